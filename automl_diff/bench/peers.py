"""The published peers the benchmark measures beside our methods, from their own packages.

* Torch-Pruning (``torch-pruning``): structural pruning of the teacher with L2 magnitude
  importance at a uniform ratio, as Diff-Pruning does, ``conv_out`` kept.
* DeepCache (``DeepCache``): its ``DeepCacheSDHelper`` on a ``DDIMPipeline`` of the teacher,
  uniform caching of the skip branch 0 every ``interval`` steps.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from automl_diff.errors import UserError
from automl_diff.metrics.macs import count_macs

__all__ = ["deepcache", "torch_pruning_peer"]


def torch_pruning_peer(
    teacher: nn.Module, target_macs: int, ratios: Sequence[float], *, log: Callable[[str], None] = print
) -> tuple[nn.Module, float]:
    """The teacher pruned by Torch-Pruning at the ratio (of ``ratios``) whose MACs are closest to
    ``target_macs``; returns the pruned copy and its ratio. Ratios that break the model (norm
    groups or attention heads no longer divide the channels) are skipped."""
    import torch_pruning as tp
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    size = teacher.config.sample_size
    size = size if isinstance(size, int) else size[0]
    device = next(teacher.parameters()).device
    best: tuple[int, nn.Module, float] | None = None
    for ratio in ratios:
        model = copy.deepcopy(teacher).requires_grad_(True)
        example = {
            "sample": torch.randn(1, teacher.config.in_channels, size, size, device=device),
            "timestep": torch.ones(1, dtype=torch.long, device=device),
        }
        pruner = tp.pruner.MetaPruner(
            model, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio, ignored_layers=[model.conv_out]
        )
        pruner.step()
        for module in model.modules():  # diffusers' resamplers check their channel attributes
            if isinstance(module, (Upsample2D, Downsample2D)):
                module.channels = module.conv.in_channels
                module.out_channels = module.conv.out_channels
        try:
            macs = count_macs(model).macs
        except Exception as exc:
            log(f"  torch-pruning ratio {ratio}: unusable ({str(exc).splitlines()[0][:120]})")
            continue
        log(f"  torch-pruning ratio {ratio}: {macs / 1e6:.2f}M MACs per step")
        if best is None or abs(macs - target_macs) < abs(best[0] - target_macs):
            best = (macs, model.eval(), ratio)
    if best is None:
        raise UserError(f"no Torch-Pruning ratio of {list(ratios)} gives a working model")
    return best[1], best[2]


def deepcache(
    unet: nn.Module, scheduler_config: dict[str, Any], steps: int, interval: int, branch: int = 0
) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """A context factory under which ``unet`` samples with DeepCache (``steps`` DDIM steps)."""

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        from DeepCache import DeepCacheSDHelper
        from diffusers import DDIMPipeline, DDIMScheduler

        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler_config))
        pipe.scheduler.set_timesteps(steps)  # the helper reads the step index from pipe.scheduler
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
        try:
            yield
        finally:
            helper.disable()

    return context
