"""DiP-GO's few-step gradient optimisation of the pruner network.

Both samplers start from the same noise: the full sampler's final images are the targets; the
gated sampler (straight-through Gumbel gates from the pruner, every unit run and mixed with its
cache) is differentiated end to end. The loss is

    consistency(gated images, full images) + sparsity_weight * (expected MACs ratio - target_i)^2

where the expected ratio is the trajectory MACs under the gates' probabilities divided by the
full sampler's, and ``target_i`` moves linearly from 1 (all gates on, where the pruner starts)
to the target over the first ``warmup`` fraction of the iterations, so that gates turn off one by
one in order of how little they matter, as in gradual pruning. With latency weights
(:class:`~automl_diff.methods.dipgo.weights.UnitWeights`), the ratio counts each unit's measured
seconds instead of its MACs.

The consistency loss is backpropagated through the whole trajectory, as in the paper, so every
step's gates learn what skipping costs the final image. With ``checkpoint`` (the default) each
step's UNet call runs under gradient checkpointing (:class:`CheckpointedSteps`): its activations
are dropped after the forward pass and recomputed, one step at a time, in the backward pass, so
memory grows with the steps times the latents and the units' cached outputs (what one step hands
the next), not times a UNet's activations, at about one more forward pass per step.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint as torch_checkpoint
from tqdm import tqdm

from automl_diff.gating import GateController
from automl_diff.methods.base import TrainingDiverged
from automl_diff.methods.dipgo.pruner import PrunerNetwork
from automl_diff.methods.dipgo.weights import UnitWeights
from automl_diff.metrics.macs import UnitCosts
from automl_diff.records import TrialAttr
from automl_diff.sampling import denoise, predict_noise

__all__ = ["CONSISTENCY", "OBJECTIVE_VERSION", "CheckpointedSteps", "PrunerResult", "expected_ratio", "optimise_pruner", "ssim"]

#: Version of the pruner's objective; part of a DiP-GO study's pruner cache key, so that scores
#: optimised under an older loss (or expected-cost model) are not reused. Bump it when either changes.
#: 2: a step's fixed cost is charged only where some unit computes, where idle steps are free.
OBJECTIVE_VERSION = 2


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 2.0) -> torch.Tensor:
    """Mean structural similarity of two image batches (Gaussian window 11, sigma 1.5)."""
    channels = a.shape[1]
    size = min(11, a.shape[-1], a.shape[-2])
    window = _gaussian_window(size).to(a)[None, None].repeat(channels, 1, 1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return value.mean()


#: Consistency losses between the gated and the full sampler's final images (``CONSISTENCY_LOSSES`` of a config).
CONSISTENCY = {
    "mse": lambda a, b: F.mse_loss(a, b),
    "ssim": lambda a, b: 1 - ssim(a, b),
}


def expected_ratio(probs: torch.Tensor, costs: UnitCosts | UnitWeights, units: tuple[str, ...]) -> torch.Tensor:
    """Trajectory cost (MACs, or measured seconds with latency :class:`UnitWeights`) under gate
    probabilities ``probs`` (steps x units, gates independent), over the full sampler's.

    Where idle steps are free (``idle_free``), a step pays ``always`` only if some unit computes:
    with probability ``1 - prod(1 - p)`` over its units (the first step always computes, having
    no output to reuse), so the loss also rewards emptying whole steps."""
    weights = UnitWeights.of(costs)
    unit = torch.tensor([weights.units[u] for u in units], dtype=probs.dtype, device=probs.device)
    busy = torch.ones_like(probs[:, 0])  # probability that a step pays ``always``
    if weights.idle_free:
        busy = torch.cat([busy[:1], 1 - torch.prod(1 - probs[1:], dim=1)])
    return (weights.always * busy.sum() + (probs * unit).sum()) / (weights.total * probs.shape[0])


class CheckpointedSteps(nn.Module):
    """A soft-gated UNet whose every call (one sampling step) runs under gradient checkpointing.

    The sampler calls it in place of the UNet. Each call is a pure function of the step's latents
    and the units' cached outputs from the step before (:meth:`GateController.pinned`): the
    forward pass keeps only those inputs and the call's outputs (the noise prediction and the new
    caches), and the backward pass recomputes the step's activations from them. Gradients reach
    the gates of every step through the latents and the caches that the later steps read.

    Args:
        unet: the gated UNet (a :class:`GateController` in soft mode on it).
        controller: that controller.
    """

    def __init__(self, unet: nn.Module, controller: GateController) -> None:
        super().__init__()
        self.unet = unet
        self.controller = controller
        self.step = 0

    @property
    def config(self) -> Any:
        return self.unet.config

    def reset(self) -> CheckpointedSteps:
        """The next call is the first step of a trajectory."""
        self.step = 0
        self.controller.reset()
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        controller, step = self.controller, self.step
        self.step += 1
        leaves, spec = pytree.tree_flatten(controller.cache)
        out_spec: list[Any] = []

        def run(x: torch.Tensor, *cached: torch.Tensor) -> tuple[torch.Tensor, ...]:
            with controller.pinned(step, pytree.tree_unflatten(list(cached), spec)):
                eps = predict_noise(self.unet, x, t, **kwargs)
            new, new_spec = pytree.tree_flatten(controller.cache)
            out_spec[:] = [new_spec]
            return (eps, *new)

        eps, *cache = torch_checkpoint(run, x, *leaves, use_reentrant=False)
        controller.cache = pytree.tree_unflatten(cache, out_spec[0])
        return eps


@dataclass
class PrunerResult:
    """What the optimisation produced: gate scores and a summary of the run."""

    scores: np.ndarray  # (steps, units): probability that each gate computes
    units: tuple[str, ...]
    seconds: float
    final_consistency: float
    final_ratio: float
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            TrialAttr.PRUNER_SECONDS: round(self.seconds, 2),
            TrialAttr.PRUNER_CONSISTENCY: self.final_consistency,
            TrialAttr.PRUNER_EXPECTED_RATIO: self.final_ratio,
        }


def optimise_pruner(
    unet: nn.Module,
    scheduler_config: dict[str, Any],
    *,
    units: tuple[str, ...],
    costs: UnitCosts | UnitWeights,
    steps: int,
    iterations: int,
    batch_size: int,
    lr: float,
    target_ratio: float,
    sparsity_weight: float = 1.0,
    consistency: str = "mse",
    tau: float = 1.0,
    checkpoint: bool = True,
    warmup: float = 0.6,
    reference_images: int = 64,
    scheduler: str = "ddim",
    eta: float = 0.0,
    seed: int = 0,
    conditioning: dict[str, Any] | None = None,
    progress: bool = False,
) -> PrunerResult:
    """Train a :class:`PrunerNetwork` for ``unet`` and return its gate scores.

    Args:
        unet: the (frozen) model to prune over time.
        units: prunable units; ``costs`` their MACs (:class:`UnitCosts`), or the weights the
            sparsity loss counts (:class:`UnitWeights`, e.g. measured seconds).
        steps: sampling steps.
        iterations, batch_size, lr: optimiser steps, trajectories per step, Adam learning rate.
        target_ratio: trajectory cost to reach (in ``costs``' unit), as a fraction of the full sampler's.
        sparsity_weight: weight of the squared distance to ``target_ratio``.
        consistency: ``mse`` or ``ssim``.
        tau: Gumbel-softmax temperature.
        checkpoint: recompute each step's activations in the backward pass (gradient
            checkpointing per step) instead of keeping every step's in memory.
        warmup: fraction of the iterations over which the target moves from 1 to ``target_ratio``.
        reference_images: fixed noise samples (and full-sampler targets) batches are drawn from.
        conditioning: for conditional UNets, ``encoder_hidden_states`` (and
            ``negative_hidden_states`` with ``guidance_scale``), one row per reference image.
    """
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    requires_grad = [p.requires_grad for p in unet.parameters()]
    for p in unet.parameters():
        p.requires_grad_(False)
    was_training = unet.training
    unet.eval()
    config = unet.config
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((reference_images, config.in_channels, height, width), generator=generator).to(device=device, dtype=dtype)
    conditioning = dict(conditioning or {})
    per_image = {k: v for k, v in conditioning.items() if isinstance(v, torch.Tensor)}
    shared = {k: v for k, v in conditioning.items() if not isinstance(v, torch.Tensor)}
    base = {"scheduler_config": scheduler_config, "steps": steps, "scheduler": scheduler, "eta": eta}
    start = time.perf_counter()

    def run(indices: torch.Tensor | slice, *, gen_seed: int, model: nn.Module = unet) -> torch.Tensor:
        extra = {k: v[indices] for k, v in per_image.items()}
        return denoise(model, noise=noise[indices], generator=torch.Generator().manual_seed(gen_seed), **base, **extra, **shared)

    with torch.no_grad():
        targets = torch.cat([run(slice(i, i + batch_size), gen_seed=seed + 1 + i) for i in range(0, reference_images, batch_size)])
    # the pruner's initialisation and Gumbel noise depend on ``seed`` alone, not on what ran before
    rng = contextlib.ExitStack()
    rng.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
    torch.manual_seed(seed + 11)
    pruner = PrunerNetwork(steps, len(units)).to(device)
    optimiser = torch.optim.Adam(pruner.parameters(), lr=lr)
    loss_fn = CONSISTENCY[consistency]
    controller = GateController(unet, units, steps)
    model = CheckpointedSteps(unet, controller) if checkpoint else unet
    history: list[dict[str, float]] = []
    sampler = torch.Generator().manual_seed(seed + 7)
    bar = tqdm(range(iterations), desc="pruner", unit="it", disable=not progress, file=sys.stderr, leave=False)

    weights = UnitWeights.of(costs)  # converted once, not in every iteration
    cons = ratio = torch.tensor(math.nan)
    try:
        for it in bar:
            began = time.perf_counter()
            idx = torch.randperm(reference_images, generator=sampler)[:batch_size]
            gates = pruner.sample(tau)
            controller.use_soft(gates.to(dtype))
            if checkpoint:
                model.reset()
            images = run(idx.to(device), gen_seed=seed + 1 + int(idx[0]), model=model)
            cons = loss_fn(images.float(), targets[idx.to(device)].float())
            ratio = expected_ratio(pruner.probs(), weights, units)
            progress_frac = min(1.0, (it + 1) / max(1.0, warmup * iterations))
            target = 1.0 + (target_ratio - 1.0) * progress_frac
            loss = cons + sparsity_weight * (ratio - target) ** 2
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"pruner loss became {loss.item()} at iteration {it}")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            record = {
                "iteration": it,
                "consistency": cons.item(),
                "ratio": ratio.item(),
                "hard_ratio": expected_ratio(gates.detach(), weights, units).item(),
                "seconds": time.perf_counter() - began,
            }
            history.append(record)
            bar.set_postfix(cons=f"{record['consistency']:.4f}", ratio=f"{record['ratio']:.3f}")
    finally:
        bar.close()
        rng.close()
        controller.remove()
        unet.train(was_training)
        for p, flag in zip(unet.parameters(), requires_grad):
            p.requires_grad_(flag)
    with torch.no_grad():
        scores = pruner.probs().float().cpu().numpy()
    return PrunerResult(scores, tuple(units), time.perf_counter() - start, cons.item(), ratio.item(), history)
