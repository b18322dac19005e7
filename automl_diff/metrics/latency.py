"""Wall-clock latency of sampling, per image (seconds, lower is better)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from automl_diff.sampling import sample_images

__all__ = ["measure_latency"]


def _sync(module: nn.Module) -> None:
    device = next(module.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    unet: nn.Module,
    scheduler_config: dict[str, Any],
    *,
    steps: int,
    batch_size: int = 8,
    repeats: int = 3,
    warmup: int = 1,
    scheduler: str = "ddim",
) -> float:
    """Median wall-clock seconds per image to sample a batch with ``steps`` denoising steps.

    Runs ``warmup`` untimed batches first, then ``repeats`` timed ones, and returns the median
    batch time divided by ``batch_size``. Measures the same loop that produces FID samples.
    """
    def once() -> float:
        _sync(unet)
        start = time.perf_counter()
        sample_images(unet, scheduler_config, num_images=batch_size, steps=steps, batch_size=batch_size, scheduler=scheduler)
        _sync(unet)
        return time.perf_counter() - start

    for _ in range(warmup):
        once()
    return statistics.median(once() for _ in range(max(1, repeats))) / batch_size
