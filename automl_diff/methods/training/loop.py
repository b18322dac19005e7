"""The training loop every method shares: AdamW, warm-up + cosine schedule, clipping, weight EMA.

A method supplies where batches come from and, optionally, its loss. The default loss is the
noise-prediction MSE on ``(x_t, t, target)`` batches (DKDM); DiffNAS passes its joint block-feature
and output loss.

Under ``torch.distributed`` (a ``torchrun`` job, see :mod:`automl_diff.methods.training.ddp`) the
loop is data-parallel: every rank draws the same global batch, trains on its share of it through
``DistributedDataParallel`` (gradients averaged over ranks), and so takes the step a single
process takes on the whole batch; the reported loss is the global batch's.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from automl_diff.methods.base import TrainingDiverged
from automl_diff.sampling import predict_noise

__all__ = ["FitResult", "conditioning", "fit", "held_out_loss", "noise_loss", "shard", "world"]


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process in ``torch.distributed`` (``(0, 1)`` outside it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard(batch: Any, rank: int, size: int) -> Any:
    """This rank's contiguous share of a batch (a tuple of tensors or None entries)."""
    if size == 1:
        return batch
    n = len(batch[0])
    if n % size:
        raise ValueError(f"a batch of {n} samples does not split over {size} processes")
    return _rebuild(batch, slice(rank * n // size, (rank + 1) * n // size))


def _rebuild(batch: Any, part: slice) -> Any:
    values = [None if v is None else v[part] for v in batch]
    return type(batch)(*values) if hasattr(batch, "_fields") else tuple(values)


def conditioning(batch: Any) -> dict[str, Any]:
    """The UNet keyword arguments a batch's samples are conditioned with (none for a plain
    ``(x_t, t, target)`` tuple)."""
    return getattr(batch, "conditioning", {})


def noise_loss(model: nn.Module, batch: Any, step: int) -> torch.Tensor:
    """MSE between the model's noise prediction for ``(x_t, t)`` (with the batch's conditioning)
    and the batch's target."""
    x, t, target = batch[:3]
    return F.mse_loss(predict_noise(model, x, t, **conditioning(batch)).float(), target)


@torch.no_grad()
def held_out_loss(model: nn.Module, batch: Any, *, chunk: int = 256) -> float:
    """:func:`noise_loss` of ``model`` on a fixed batch, in eval mode: a score that compares runs."""
    was_training = model.training
    model.eval()
    n, total = len(batch[0]), 0.0
    for start in range(0, n, chunk):
        part = _rebuild(batch, slice(start, start + chunk))
        total += noise_loss(model, part, 0).item() * len(part[0])
    model.train(was_training)
    return total / n


def _optimiser(student: nn.Module, *, lr: float, iterations: int, warmup: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over ``student`` with a linear warm-up (at most a fifth of the run) and a cosine decay."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(warmup, max(1, iterations // 5))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, iterations - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _global(value: torch.Tensor, size: int) -> torch.Tensor:
    """A rank's loss averaged over the ranks (itself in one process)."""
    if size == 1:
        return value
    total = value.clone()
    torch.distributed.all_reduce(total)
    return total / size


@torch.no_grad()
def _update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - decay)


@dataclass
class FitResult:
    """What training produced. ``model`` is the EMA of the weights when EMA is on; ``processes``
    the data-parallel ranks that trained it (the world size they saw)."""

    model: nn.Module
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    processes: int = 1

    def mean_loss(self, first: int, last: int) -> float:
        window = self.losses[first:last]
        return sum(window) / max(1, len(window))


def fit(
    student: nn.Module,
    batches: Callable[[int], Any],
    *,
    iterations: int,
    batch_size: int,
    lr: float,
    ema_decay: float = 0.0,
    warmup: int = 20,
    grad_clip: float = 1.0,
    progress: bool = False,
    desc: str = "training",
    on_step: Callable[[int, float], Any] | None = None,
    loss: Callable[[nn.Module, Any, int], torch.Tensor] = noise_loss,
    rungs: Sequence[int] = (),
    on_rung: Callable[[int, int, nn.Module], Any] | None = None,
) -> FitResult:
    """Train ``student`` on ``loss``; AdamW, warm-up + cosine LR.

    Args:
        student: any model mapping ``(x_t, t)`` to a noise prediction of ``x_t``'s shape (a diffusers
            UNet, or a module returning the tensor).
        batches: ``batches(batch_size)`` returns the next batch (e.g. DKDM's ``PoolBatches``).
        iterations: optimiser steps.
        batch_size: samples per step.
        lr: peak learning rate.
        ema_decay: decay of a weight EMA that is returned instead of the raw weights (0: off).
        warmup: linear warm-up steps.
        grad_clip: max gradient norm.
        progress: show a progress bar (stderr).
        on_step: called as ``on_step(step, loss)``.
        loss: ``loss(student, batch, step)``, a scalar tensor (default :func:`noise_loss`).
        rungs: iteration counts after which ``on_rung`` is called.
        on_rung: ``on_rung(rung, iteration, model)`` with the model as it would be returned then
            (the EMA when EMA is on); it may raise to end training.

    Raises:
        TrainingDiverged: the loss became NaN or infinite.
    """
    student.train()
    rank, size = world()
    model: nn.Module = nn.parallel.DistributedDataParallel(student) if size > 1 else student
    optimizer, scheduler = _optimiser(student, lr=lr, iterations=iterations, warmup=warmup)
    ema = copy.deepcopy(student).requires_grad_(False).eval() if ema_decay > 0 else None
    result = FitResult(student, processes=size)
    start = time.perf_counter()
    bar = tqdm(range(iterations), desc=desc, unit="it", disable=not progress or rank > 0, file=sys.stderr, leave=False, mininterval=1)
    rung_at = {iteration: k for k, iteration in enumerate(sorted(rungs))}
    for step in bar:
        value_t = loss(model, shard(batches(batch_size), rank, size), step)
        reported = _global(value_t.detach(), size)  # the global batch's loss, as one process computes it
        if not torch.isfinite(reported):
            bar.close()
            raise TrainingDiverged(f"loss became {reported.item()} at iteration {step}")
        optimizer.zero_grad(set_to_none=True)
        value_t.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            _update_ema(ema, student, min(ema_decay, (1 + step) / (10 + step)))
        value = reported.item()
        result.losses.append(value)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{value:.4f}")
        if on_step is not None:
            on_step(step, value)
        if on_rung is not None and step + 1 in rung_at:
            try:
                on_rung(rung_at[step + 1], step + 1, ema if ema is not None else student)
            except BaseException:
                bar.close()
                raise
            student.train()
    bar.close()
    result.seconds = time.perf_counter() - start
    student.eval()
    result.model = ema if ema is not None else student
    return result
