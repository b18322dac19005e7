"""The published peers the benchmark measures beside our methods, from their own packages.

* Torch-Pruning (``torch-pruning``): structural pruning of the teacher with L2 magnitude
  importance at a uniform ratio, as Diff-Pruning does, ``conv_out`` kept.
* DeepCache (``DeepCache``): its ``DeepCacheSDHelper`` on a ``DDIMPipeline`` of the teacher,
  uniform caching of the skip branch 0 every ``interval`` steps.
* First Block Cache (diffusers' own, ``apply_first_block_cache``) on a transformer teacher: at each
  step the first block runs, and where its residual changed by less than ``threshold`` (relative)
  since the last step, the other blocks are skipped and their last residual added instead.
* TaylorSeer (diffusers' own, ``apply_taylorseer_cache``; Liu et al., 2025, "From Reusing to
  Forecasting") on a transformer teacher: after a few computed steps, one step in ``interval``
  computes each block's attention and feed-forward, and the steps between forecast their outputs
  by a Taylor expansion of the computed ones.
* BK-SDM (Kim et al., 2023, "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable
  Diffusion"): block removal. :func:`~automl_diff.models.recipes.bk_sdm_peer` removes what its
  variants remove from SD's UNet and keeps the teacher's remaining weights; :func:`retrain_bk_sdm` retrains it with BK-SDM's own
  loss (:class:`BkSdmLoss`: task + output distillation + feature distillation on the stage
  outputs, plain MSE, weight 1 each, as its ``kd_train_text_to_image.py``) through the training
  loop every method shares.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from automl_diff.errors import UserError
from automl_diff.methods.training import FitResult, fit
from automl_diff.methods.training.loop import conditioning
from automl_diff.metrics.macs import count_macs
from automl_diff.models.blocks import block_names, record_blocks
from automl_diff.models.recipes import bk_sdm_peer
from automl_diff.sampling import Sampler, predict_noise

__all__ = [
    "BkSdmLoss",
    "deepcache",
    "diffusers_cache",
    "first_block_cache",
    "retrain_bk_sdm",
    "taylorseer_cache",
    "torch_pruning_peer",
]


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


def deepcache(unet: nn.Module, sampler: Sampler, interval: int, branch: int = 0) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """A context factory under which ``unet`` samples with DeepCache (the sampler's scheduler and steps)."""

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        from DeepCache import DeepCacheSDHelper
        from diffusers import DDIMPipeline

        # The helper reads the step index from pipe.scheduler.timesteps: they must be the sampler's.
        # DDIMPipeline converts the scheduler it is given into a fresh one (all training timesteps):
        # an index among those makes the interval a multiple of the sampler's stride, and an
        # interval sharing a factor with the stride then caches nothing.
        pipe = DDIMPipeline(unet=unet, scheduler=sampler.make_scheduler())
        pipe.scheduler = sampler.make_scheduler()
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
        try:
            yield
        finally:
            helper.disable()

    return context


#: A context factory: each call gives a context manager under which a model samples with a peer.
PeerContext = Callable[[], contextlib.AbstractContextManager[None]]


def diffusers_cache(model: nn.Module, apply: Callable[[nn.Module], None], hooks: Sequence[str]) -> PeerContext:
    """A context factory under which a transformer samples with one of diffusers' cache hooks:
    ``apply(model)`` registers them (``apply_first_block_cache``, ``apply_taylorseer_cache``, ...),
    the hooks named ``hooks`` are removed on exit. The hooks keep their state in a cache context,
    which diffusers' pipelines set around each call of a ``CacheMixin`` model; a DiT is none, so
    the context is set here the way ``CacheMixin.cache_context`` sets it (one context, "cond":
    guidance's halves go in one call), and the state is reset where a trajectory starts (a
    timestep above the last one)."""

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        apply(model)
        registry = HookRegistry.check_if_exists_or_initialize(model)
        fresh(registry)
        last = [float("inf")]

        def begin(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            value = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)
            if value > last[0]:
                registry.reset_stateful_hooks()
            last[0] = value
            _set_cache_context(module, CacheContext("cond", timestep=value))

        handle = model.register_forward_pre_hook(begin, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for name in hooks:
                registry.remove_hook(name, recurse=True)
            fresh(registry)

    return context


def fresh(registry: Any) -> None:
    """Drop the registries of hooked submodules that a diffusers ``HookRegistry`` caches, as
    ``CacheMixin`` does whenever it adds or removes hooks: else a cache applied after another
    one's hooks were removed sets its context on the other's stale registries."""
    if hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()


def first_block_cache(model: nn.Module, threshold: float) -> PeerContext:
    """diffusers' First Block Cache at ``threshold`` (:func:`diffusers_cache`)."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    return diffusers_cache(
        model, lambda m: apply_first_block_cache(m, FirstBlockCacheConfig(threshold=threshold)), ("fbc_leader_block_hook", "fbc_block_hook")
    )


#: The modules whose outputs TaylorSeer forecasts in a DiT: each block's attention and feed-forward
#: (the paper's features; diffusers' default patterns name ``attn`` modules, which a DiT's
#: ``attn1`` does not match in full).
TAYLORSEER_MODULES = (r"transformer_blocks\.\d+\.(attn1|ff)",)


def taylorseer_cache(model: nn.Module, interval: int, *, warmup: int = 3, order: int = 1) -> PeerContext:
    """diffusers' TaylorSeer cache (:func:`diffusers_cache`): the first ``warmup`` steps compute,
    then one step in ``interval`` does, and in between each block's attention and feed-forward
    outputs are forecast by a Taylor expansion of ``order`` from their last computed values
    (:data:`TAYLORSEER_MODULES`), in float32."""
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    config = TaylorSeerCacheConfig(
        cache_interval=interval,
        disable_cache_before_step=warmup,
        max_order=order,
        taylor_factors_dtype=torch.float32,
        cache_identifiers=list(TAYLORSEER_MODULES),
    )
    return diffusers_cache(model, lambda m: apply_taylorseer_cache(m, config), ("taylorseer_cache",))


class BkSdmLoss:
    """BK-SDM's distillation loss as a :func:`~automl_diff.methods.training.fit` loss::

        MSE(eps_student, target) + MSE(eps_student, eps_teacher)
            + sum over the down and up stages of MSE(stage output of the student, of the teacher)

    plain MSE with weight 1 each, as BK-SDM's ``kd_train_text_to_image.py`` (its
    ``lambda_sd``, ``lambda_kd_output``, ``lambda_kd_feat``). A stage's output is a down block's
    hidden state (not its skip connections) or an up block's output; the mid block is not a
    feature target (BK-SDM-Small has none). The task target is the batch's: the true noise on
    captioned images, the teacher's own prediction on data-free batches (where the task and output
    terms coincide). Every model is called with the batch's text conditioning.
    """

    def __init__(self, teacher: nn.Module) -> None:
        self.teacher = teacher
        self.stages = [name for name in block_names(teacher) if name != "mid"]
        self.last: dict[str, float] = {}

    @staticmethod
    def _hidden(output: Any) -> torch.Tensor:
        return output[0] if isinstance(output, tuple) else output

    def __call__(self, student: nn.Module, batch: Any, step: int) -> torch.Tensor:
        x, t, target = batch[:3]
        kwargs = conditioning(batch)
        with torch.no_grad(), record_blocks(self.teacher, self.stages) as teacher_rec:
            eps_teacher = predict_noise(self.teacher, x, t, **kwargs).float()
        model = getattr(student, "module", student)  # hooks go on the model inside a DDP wrapper
        with record_blocks(model, self.stages, detach=False) as student_rec:
            eps = predict_noise(student, x, t, **kwargs).float()
        task = F.mse_loss(eps, target.float())
        output = F.mse_loss(eps, eps_teacher)
        features = sum(
            F.mse_loss(self._hidden(student_rec[n].outputs[0]).float(), self._hidden(teacher_rec[n].outputs[0]).float())
            for n in self.stages
        )
        self.last = {"task": task.detach().item(), "output": output.detach().item(), "features": float(features.detach())}
        return task + output + features


def retrain_bk_sdm(teacher: nn.Module, variant: str, batches: Any, **fit_options: Any) -> tuple[FitResult, dict[str, Any], list[str]]:
    """BK-SDM's student of ``teacher`` (:func:`bk_sdm_peer`) retrained with :class:`BkSdmLoss` on
    ``batches`` through :func:`~automl_diff.methods.training.fit` (``fit_options``: iterations,
    batch size, learning rate, EMA). Returns the training result, the student's config and the
    removed layers."""
    student, config, removed = bk_sdm_peer(teacher, variant)
    result = fit(student.requires_grad_(True), batches, loss=BkSdmLoss(teacher), **fit_options)
    result.model.requires_grad_(False)
    return result, config, removed
