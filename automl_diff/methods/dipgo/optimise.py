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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint as torch_checkpoint
from tqdm import tqdm

from automl_diff.config.options import DiPGOOptions
from automl_diff.gating import GateController
from automl_diff.methods.base import TrainingDiverged
from automl_diff.methods.dipgo.pruner import Pruner, build_pruner
from automl_diff.methods.dipgo.weights import UnitWeights
from automl_diff.metrics.macs import UnitCosts
from automl_diff.metrics.stages import Stage
from automl_diff.sampling import Sampler, predict_noise

__all__ = [
    "CONSISTENCY",
    "OBJECTIVE_VERSION",
    "CheckpointedSteps",
    "PrunerResult",
    "expected_ratio",
    "optimise_pruner",
    "pruner_stages",
    "ssim",
]

#: Version of the pruner's objective; part of a DiP-GO study's pruner cache key, so that scores
#: optimised under an older loss (or expected-cost model) are not reused. Bump it when either changes.
#: 2: a step's fixed cost is charged only where some unit computes, where idle steps are free.
#: 3: an atom is charged only where something that runs reads it (the dataflow of the units).
OBJECTIVE_VERSION = 3


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


def expected_ratio(probs: torch.Tensor, costs: UnitCosts | UnitWeights) -> torch.Tensor:
    """Trajectory cost (MACs, or measured seconds with latency :class:`UnitWeights`) under gate
    probabilities ``probs`` (steps x units, gates independent), over the full sampler's.

    An atom costs where it runs: its unit's gate is on and something that runs reads its output
    (:meth:`~automl_diff.models.dataflow.UnitGraph.expected_runs`), so switching off a unit also
    saves what only feeds it. Where idle steps are free (``idle_free``), a step pays ``always``
    only if some atom runs (the first step always does, having no output to reuse), so the loss
    also rewards emptying whole steps."""
    weights = UnitWeights.of(costs)
    runs = weights.graph.expected_runs(probs)
    busy = torch.ones_like(probs[:, 0])  # probability that a step pays ``always``
    if weights.idle_free:
        busy = torch.cat([busy[:1], 1 - torch.prod(1 - runs[1:], dim=1)])
    return (weights.always * busy.sum() + (runs * weights.vector(runs)).sum()) / (weights.total * probs.shape[0])


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


@contextlib.contextmanager
def _frozen(unet: nn.Module) -> Iterator[None]:
    """``unet`` in eval mode without gradients of its own, restored as found afterwards."""
    requires_grad = [p.requires_grad for p in unet.parameters()]
    was_training = unet.training
    unet.requires_grad_(False).eval()
    try:
        yield
    finally:
        unet.train(was_training)
        for p, flag in zip(unet.parameters(), requires_grad):
            p.requires_grad_(flag)


def _reference_noise(unet: nn.Module, count: int, seed: int) -> torch.Tensor:
    """The fixed noise of the pruner's ``count`` reference trajectories (seeded, drawn on the CPU)."""
    param = next(unet.parameters())
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    noise = torch.randn((count, unet.config.in_channels, height, width), generator=torch.Generator().manual_seed(seed))
    return noise.to(device=param.device, dtype=param.dtype)


def optimise_pruner(
    unet: nn.Module,
    sampler: Sampler,
    *,
    units: tuple[str, ...],
    costs: UnitCosts | UnitWeights,
    options: DiPGOOptions,
    iterations: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    progress: bool = False,
) -> PrunerResult:
    """Train a pruner network (:func:`~automl_diff.methods.dipgo.pruner.build_pruner`, ``options.pruner``)
    for ``unet`` sampled by ``sampler`` and return its gate scores.

    Args:
        unet: the (frozen) model to prune over time.
        sampler: the sampler whose trajectories are pruned (its steps are the schedule's; the
            reference trajectories take its prompts in turn, guided as it guides).
        units: prunable units; ``costs`` their MACs (:class:`UnitCosts`), or the weights the
            sparsity loss counts (:class:`UnitWeights`, e.g. measured seconds).
        options: the target (``target_macs_ratio``, in ``costs``' unit, a fraction of the full
            sampler's), ``sparsity_weight``, ``consistency``, ``tau``, ``checkpoint``, ``warmup``
            and ``reference_images`` (:class:`~automl_diff.config.options.DiPGOOptions`).
        iterations, batch_size, lr: optimiser steps, trajectories per step, Adam learning rate.
        seed: the reference noise, the pruner's initialisation and its Gumbel noise.
    """
    device = next(unet.parameters()).device
    start = time.perf_counter()
    with _frozen(unet), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        noise = _reference_noise(unet, options.reference_images, seed)

        def run(indices: Sequence[int], model: nn.Module) -> torch.Tensor:
            generator = torch.Generator().manual_seed(seed + 1 + int(indices[0]))
            return sampler.denoise(model, noise[torch.as_tensor(list(indices), device=device)], generator=generator, images=indices)

        with torch.no_grad():
            chunks = [range(i, min(i + batch_size, len(noise))) for i in range(0, len(noise), batch_size)]
            targets = torch.cat([run(chunk, unet) for chunk in chunks])
        # the pruner's initialisation and Gumbel noise depend on ``seed`` alone, not on what ran before
        torch.manual_seed(seed + 11)
        pruner = build_pruner(options.pruner, sampler.model_calls, len(units), layers=options.pruner_layers).to(device)
        with GateController(unet, units, sampler.model_calls) as controller:
            history = _train(pruner, controller, run, targets, UnitWeights.of(costs), options, iterations, batch_size, lr, seed, progress)
    with torch.no_grad():
        scores = pruner.probs().float().cpu().numpy()
    last = history[-1] if history else {"consistency": math.nan, "ratio": math.nan}
    return PrunerResult(scores, tuple(units), time.perf_counter() - start, last["consistency"], last["ratio"], history)


def pruner_stages(
    unet: nn.Module, sampler: Sampler, *, units: tuple[str, ...], options: DiPGOOptions, iterations: int, batch_size: int
) -> list[Stage]:
    """What optimising the pruner costs (once per study), for a dry run: the reference
    trajectories' model calls (no gradients), and each model call of an iteration, forward and,
    under checkpointing, recomputed and backpropagated. Every step of an iteration's trajectory
    holds its inputs (latents and the units' cached outputs) for the backward pass: memory grows
    with the steps by that much (``held``)."""
    calls = sampler.model_calls
    per_image: list[int] = []

    @torch.no_grad()
    def target(batch: int) -> None:
        sampler.first_step(unet, batch)

    def step(batch: int) -> None:
        param = next(unet.parameters())
        size = unet.config.sample_size
        with _frozen(unet), GateController(unet, units, calls) as controller:
            controller.use_soft(torch.ones(calls, len(units), dtype=param.dtype, device=param.device))
            model = CheckpointedSteps(unet, controller).reset()
            x = torch.randn(batch, unet.config.in_channels, size, size, device=param.device, dtype=param.dtype, requires_grad=True)
            out = next(sampler.chain(model, x))
            held = sum(t.numel() * t.element_size() for t in pytree.tree_leaves(controller.cache) if isinstance(t, torch.Tensor))
            per_image.append((held + x.numel() * x.element_size()) // batch)
            out.float().square().mean().backward()

    reference = -(-options.reference_images // batch_size) * calls
    return [
        Stage("pruner targets: one model call of the reference trajectories", "study", reference, batch_size, target),
        Stage(
            "pruner iteration: one model call, forward and checkpointed backward",
            "study",
            iterations * calls,
            batch_size,
            step,
            held=lambda batch: per_image[-1] * batch,
            held_units=calls if options.checkpoint else 1,
            note="" if options.checkpoint else "checkpoint: false keeps every step's activations: the peak is a lower bound",
        ),
    ]


def _train(
    pruner: Pruner,
    controller: GateController,
    run: Callable[[Sequence[int], nn.Module], torch.Tensor],
    targets: torch.Tensor,
    weights: UnitWeights,
    o: DiPGOOptions,
    iterations: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool,
) -> list[dict[str, float]]:
    """The pruner's optimisation loop; returns one record per iteration."""
    unet = controller.unet
    dtype = next(unet.parameters()).dtype
    optimiser = torch.optim.Adam(pruner.parameters(), lr=lr)
    loss_fn = CONSISTENCY[o.consistency]
    model = CheckpointedSteps(unet, controller) if o.checkpoint else unet
    draws = torch.Generator().manual_seed(seed + 7)
    history: list[dict[str, float]] = []
    for it in tqdm(range(iterations), desc="pruner", unit="it", disable=not progress, file=sys.stderr, leave=False):
        began = time.perf_counter()
        idx = torch.randperm(len(targets), generator=draws)[:batch_size].tolist()
        gates = pruner.sample(o.tau)
        controller.use_soft(gates.to(dtype))
        if o.checkpoint:
            model.reset()
        cons = loss_fn(run(idx, model).float(), targets[torch.as_tensor(idx, device=targets.device)].float())
        ratio = expected_ratio(pruner.probs(), weights)
        target = 1.0 + (o.target_macs_ratio - 1.0) * min(1.0, (it + 1) / max(1.0, o.warmup * iterations))
        loss = cons + o.sparsity_weight * (ratio - target) ** 2
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"pruner loss became {loss.item()} at iteration {it}")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        history.append(
            {
                "iteration": it,
                "consistency": cons.item(),
                "ratio": ratio.item(),
                "hard_ratio": expected_ratio(gates.detach(), weights).item(),
                "seconds": time.perf_counter() - began,
            }
        )
    return history
