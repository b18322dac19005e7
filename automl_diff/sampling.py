"""Sampling images from a UNet with a real diffusers scheduler (DDIM by default).

The loop is the one ``DDIMPipeline`` runs (``set_timesteps``, then ``scheduler.step`` on the
UNet's noise prediction), written out so that it batches, seeds per image and returns tensors in
[-1, 1] for FID, and so that latency is measured on exactly the computation that produces samples.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

__all__ = ["make_scheduler", "predict_noise", "sample_images", "SCHEDULERS"]


def predict_noise(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``model(x, t)`` for any noise-prediction model: a diffusers UNet (``.sample``) or a module
    that returns the tensor itself."""
    out = model(x, t)
    return out if isinstance(out, torch.Tensor) else out.sample


def _schedulers() -> dict[str, type]:
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    return {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler}


#: Sampler names a study may use.
SCHEDULERS = ("ddim", "ddpm", "dpm")


def make_scheduler(scheduler_config: dict[str, Any], name: str = "ddim") -> Any:
    """A fresh scheduler of kind ``name`` built from the teacher's scheduler config."""
    return _schedulers()[name].from_config(scheduler_config)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def sample_images(
    unet: nn.Module,
    scheduler_config: dict[str, Any],
    *,
    num_images: int,
    steps: int,
    batch_size: int = 250,
    seed: int = 0,
    scheduler: str = "ddim",
    eta: float = 0.0,
    progress: bool = False,
    desc: str = "sampling",
) -> torch.Tensor:
    """Generate ``num_images`` images in [-1, 1], shape ``(N, C, H, W)``, on the CPU.

    The initial noise of image ``i`` depends only on ``seed`` and ``i`` (drawn on the CPU), so two
    models sampled with the same seed start from the same noise whatever the batch size or device.

    Args:
        unet: noise-prediction model (``UNet2DModel``-like: ``unet(x, t).sample``).
        scheduler_config: the teacher's scheduler config.
        num_images: how many images.
        steps: denoising steps.
        batch_size: images per forward pass.
        seed: noise seed.
        scheduler: ``ddim``, ``ddpm`` or ``dpm``.
        eta: DDIM's stochasticity (0: deterministic).
        progress: show a progress bar (stderr).
    """
    was_training = unet.training
    unet.eval()
    device = _device(unet)
    dtype = next(unet.parameters()).dtype
    config = unet.config
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_images, config.in_channels, height, width), generator=generator)
    step_kwargs: dict[str, Any] = {"eta": eta} if scheduler == "ddim" else {}
    out = []
    total = -(-num_images // batch_size) * steps
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, file=sys.stderr, leave=False)
    try:
        for start in range(0, num_images, batch_size):
            sched = make_scheduler(scheduler_config, scheduler)  # fresh per batch: multistep solvers keep state
            sched.set_timesteps(steps)
            x = noise[start : start + batch_size].to(device=device, dtype=dtype) * sched.init_noise_sigma
            step_generator = torch.Generator().manual_seed(seed + 1 + start)
            for t in sched.timesteps:
                model_in = sched.scale_model_input(x, t)
                eps = predict_noise(unet, model_in, t.to(device))
                x = sched.step(eps, t, x, generator=step_generator, **step_kwargs).prev_sample
                bar.update(1)
            out.append(x.float().clamp(-1, 1).cpu())
    finally:
        bar.close()
        unet.train(was_training)
    return torch.cat(out)
