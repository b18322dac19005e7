"""DKDM's pool of noisy samples, generated and advanced by the teacher itself (no training data).

Each pool entry is a point ``x_t`` on one teacher sampling trajectory of ``num_steps`` DDIM steps
from ``t = T-1`` down to the clean image. The teacher's prediction at ``(x_t, t)`` that supervises
the student on a batch is the same one that moves those entries one step on (``t -> t_prev``); an
entry that reaches the clean image is replaced by fresh noise at ``t = T-1``. The prediction is in
the teacher's own parametrisation (``prediction_type``: noise, velocity or the clean sample), which
the student learns as it is and the step converts (:func:`split_prediction`). A flow-matching
teacher's entries are its own inputs ``(1 - sigma) x_0 + sigma eps``; the step runs in the
variance-preserving frame of the same signal-to-noise ratio, where a deterministic DDIM step is
exactly flow matching's Euler step (``FlowMatchEulerDiscreteScheduler``'s).
The pool is larger than the batch and batches are drawn at random, so a batch mixes timesteps.

Each trajectory gets a random offset in ``[0, T/num_steps)`` added to its timestep grid, so that
across trajectories the student sees every timestep, not just ``num_steps`` of them.

For a text-to-image teacher each trajectory also carries a label: the index of the prompt it is
generated for (drawn when the trajectory starts), or ``num_labels`` for the unconditional prompt
(a ``label_dropout`` share of the trajectories), and, for a guided pool, the guidance scale it is
sampled at (``guidance``: one scale, or a range each trajectory draws from when it starts). The
pool stores only the labels and scales; the caller turns them into the teacher's conditioning and
the guided prediction that advances the entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["NoisePool", "PoolState", "drop_labels", "model_input_scale", "noisy", "prediction_target", "split_prediction"]


def model_input_scale(alpha: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    """What the model's input is, as a multiple of the variance-preserving state ``sqrt(alpha) x_0 +
    sqrt(1 - alpha) eps`` with the same signal-to-noise ratio: 1, except for a flow-matching model,
    whose input ``(1 - sigma) x_0 + sigma eps`` is that state times ``1 / (sqrt(alpha) + sqrt(1 - alpha))``."""
    if prediction_type == "flow":
        return 1 / (alpha.sqrt() + (1 - alpha).sqrt())
    return torch.ones_like(alpha)


def _sigma(alpha: torch.Tensor) -> torch.Tensor:
    """Flow matching's ``sigma`` at the equivalent cumulative alpha ``alpha``."""
    return (1 - alpha).sqrt() * model_input_scale(alpha, "flow")


def noisy(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    """The model's input ``x_t`` for a clean sample and noise at cumulative alpha ``alpha``:
    ``sqrt(alpha) x0 + sqrt(1 - alpha) noise``, or ``(1 - sigma) x0 + sigma noise`` for flow matching."""
    return model_input_scale(alpha, prediction_type) * (alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise)


def split_prediction(
    prediction: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, prediction_type: str = "epsilon"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_0, eps)`` of a model's ``prediction`` at its input ``x`` (:func:`noisy`: ``sqrt(alpha)
    x_0 + sqrt(1 - alpha) eps``, or ``(1 - sigma) x_0 + sigma eps`` for flow matching; ``alpha``:
    the cumulative alpha at ``t``, broadcastable to ``x``)."""
    a, s = alpha.sqrt(), (1 - alpha).sqrt()
    if prediction_type == "flow":
        sigma = _sigma(alpha)
        return x - sigma * prediction, x + (1 - sigma) * prediction
    if prediction_type == "v_prediction":
        return a * x - s * prediction, a * prediction + s * x
    if prediction_type == "sample":
        return prediction, (x - a * prediction) / s
    return (x - s * prediction) / a, prediction


def prediction_target(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    """What a model of ``prediction_type`` should output at ``noisy(x0, noise, alpha)``."""
    if prediction_type == "flow":
        return noise - x0
    if prediction_type == "v_prediction":
        return alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
    if prediction_type == "sample":
        return x0
    return noise


def drop_labels(labels: torch.Tensor, unconditional: int, share: float, generator: torch.Generator) -> torch.Tensor:
    """``labels`` with each replaced by ``unconditional`` (the unconditional prompt's index) with
    probability ``share``: prompt dropout, so that students learn what guidance's other half needs."""
    dropped = torch.rand(len(labels), generator=generator) < share
    return torch.where(dropped, torch.full_like(labels, unconditional), labels)


@dataclass
class PoolState:
    """A snapshot of a pool (tensors on the pool's device)."""

    x: torch.Tensor
    position: torch.Tensor
    offset: torch.Tensor
    labels: torch.Tensor
    scales: torch.Tensor


class NoisePool:
    """A pool of ``size`` noisy samples at mixed timesteps, advanced by the teacher.

    Args:
        size: number of entries (larger than the training batch).
        sample_shape: ``(C, H, W)``.
        alphas_cumprod: the teacher scheduler's cumulative alphas, length ``T``.
        num_steps: denoising steps of a trajectory (its timestep grid has this many points).
        eta: DDIM stochasticity of the pool's steps (1.0: ancestral-like, 0.0: deterministic).
        clip_sample: clip the predicted clean image (as the teacher's scheduler does).
        clip_range: the clipping bound (the scheduler's ``clip_sample_range``).
        generator: CPU random generator (noise, batch draws, offsets, labels).
        device: where the pool lives.
        num_labels: prompts a trajectory can be generated for (0: unconditional teacher).
        label_dropout: share of trajectories generated for the unconditional prompt.
        guidance: ``(low, high)``: each trajectory's guidance scale, drawn uniformly when it
            starts (equal ends: one scale); None: an unguided pool (scale 1).
        prediction_type: what the teacher's predictions that advance the pool are
            (:data:`~automl_diff.sampling.PREDICTION_TYPES`); entries hold the model's input, a
            flow-matching model's included (:func:`model_input_scale`).
        model_timesteps: the timestep the model is called with at each train index (default: the
            index; ``sigma * T`` for flow matching): what :meth:`batch` returns.
    """

    def __init__(
        self,
        *,
        size: int,
        sample_shape: tuple[int, ...],
        alphas_cumprod: torch.Tensor,
        num_steps: int,
        eta: float = 1.0,
        clip_sample: bool = True,
        clip_range: float = 1.0,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
        num_labels: int = 0,
        label_dropout: float = 0.0,
        guidance: tuple[float, float] | None = None,
        prediction_type: str = "epsilon",
        model_timesteps: torch.Tensor | None = None,
    ) -> None:
        if size < 1 or num_steps < 1:
            raise ValueError("pool size and num_steps must be positive")
        self.size = size
        self.sample_shape = tuple(sample_shape)
        self.device = torch.device(device)
        self.alphas_cumprod = alphas_cumprod.to(self.device, torch.float32)
        self.train_timesteps = len(alphas_cumprod)
        self.num_steps = min(num_steps, self.train_timesteps)
        self.stride = -(-self.train_timesteps // self.num_steps)  # ceil: the grid reaches T-1
        self.eta = eta
        self.clip_sample = clip_sample
        self.clip_range = clip_range
        self.generator = generator or torch.Generator().manual_seed(0)
        self.num_labels = num_labels
        self.label_dropout = label_dropout
        self.guidance = guidance
        self.prediction_type = prediction_type
        self.model_timesteps = None if model_timesteps is None else model_timesteps.to(self.device)
        self.labels = torch.full((size,), num_labels, dtype=torch.long, device=self.device)
        self.scales = torch.ones(size, device=self.device)
        self.x = torch.empty((size, *self.sample_shape), device=self.device)
        self.position = torch.zeros(size, dtype=torch.long, device=self.device)
        self.offset = torch.zeros(size, dtype=torch.long, device=self.device)
        self.completed = 0
        self._reset(torch.arange(size, device=self.device))

    # -- timesteps --------------------------------------------------------------------------------
    def _timestep_at(self, position: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Timestep of grid point ``position`` (0 = noisiest); -1 past the last point (clean)."""
        t = (self.num_steps - 1 - position) * self.stride + offset
        return torch.where(position >= self.num_steps, torch.full_like(t, -1), t.clamp(max=self.train_timesteps - 1))

    def timesteps(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Current timestep of the given entries (all by default)."""
        if idx is None:
            return self._timestep_at(self.position, self.offset)
        return self._timestep_at(self.position[idx], self.offset[idx])

    # -- sampling ---------------------------------------------------------------------------------
    def _randn(self, n: int) -> torch.Tensor:
        return torch.randn((n, *self.sample_shape), generator=self.generator).to(self.device)

    def _reset(self, idx: torch.Tensor) -> None:
        noise = self._randn(len(idx))
        self.position[idx] = 0
        self.offset[idx] = torch.randint(0, self.stride, (len(idx),), generator=self.generator).to(self.device)
        a = self.alphas_cumprod[self.timesteps(idx)].view(-1, *([1] * len(self.sample_shape)))
        self.x[idx] = noise * model_input_scale(a, self.prediction_type)  # the model's input at the first grid point
        if self.num_labels:
            labels = torch.randint(0, self.num_labels, (len(idx),), generator=self.generator)
            self.labels[idx] = drop_labels(labels, self.num_labels, self.label_dropout, self.generator).to(self.device)
        if self.guidance is not None:
            low, high = self.guidance
            self.scales[idx] = (low + (high - low) * torch.rand(len(idx), generator=self.generator)).to(self.device)

    def draw(self, batch_size: int) -> torch.Tensor:
        """Indices of a random batch of distinct entries."""
        return torch.randperm(self.size, generator=self.generator)[: min(batch_size, self.size)].to(self.device)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, t)`` of the given entries, ``t`` as the model takes it (``model_timesteps``)."""
        t = self.timesteps(idx)
        return self.x[idx], t if self.model_timesteps is None else self.model_timesteps[t]

    @torch.no_grad()
    def advance(self, idx: torch.Tensor, prediction: torch.Tensor) -> None:
        """Move entries ``idx`` one DDIM step on with the teacher's ``prediction`` (of the pool's
        ``prediction_type``); entries that reach the clean image are replaced by fresh noise."""
        t = self.timesteps(idx)
        t_prev = self._timestep_at(self.position[idx] + 1, self.offset[idx])
        a_t = self.alphas_cumprod[t].view(-1, *([1] * len(self.sample_shape)))
        a_prev = torch.where(t_prev >= 0, self.alphas_cumprod[t_prev.clamp(min=0)], torch.ones_like(t_prev, dtype=torch.float32))
        a_prev = a_prev.view_as(a_t)
        x = self.x[idx]
        x0, eps = split_prediction(prediction.to(x.dtype), x, a_t, self.prediction_type)  # x: the model's input
        if self.clip_sample:  # DDIM's step: the noise comes from the unclipped prediction
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        sigma = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
        direction = (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        x_prev = a_prev.sqrt() * x0 + direction + sigma * self._randn(len(idx))
        self.x[idx] = x_prev * model_input_scale(a_prev, self.prediction_type)
        self.position[idx] += 1
        done = idx[self.position[idx] >= self.num_steps]
        if len(done):
            self.completed += len(done)
            self._reset(done)

    @torch.no_grad()
    def warm_up(self, teacher: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], *, batch_size: int = 256) -> None:
        """Spread the entries over the trajectory so that batches mix timesteps from the start.

        Entry ``i`` is advanced by the teacher, ``teacher(x_t, t, idx)`` (the prediction that
        moves entries ``idx``, conditioned on their labels and scales), to a random position
        in ``[0, num_steps)``; this costs about ``size * num_steps / 2`` teacher evaluations, once
        per pool.
        """
        target = torch.randint(0, self.num_steps, (self.size,), generator=self.generator).to(self.device)
        for step in range(self.num_steps):
            active = torch.nonzero(target > step).flatten()
            for start in range(0, len(active), batch_size):
                idx = active[start : start + batch_size]
                x, t = self.batch(idx)
                self.advance(idx, teacher(x, t, idx))
        self.completed = 0

    def state(self) -> PoolState:
        return PoolState(self.x.clone(), self.position.clone(), self.offset.clone(), self.labels.clone(), self.scales.clone())

    def record(self) -> dict[str, Any]:
        """Everything that rebuilds this pool as it is now, generator included: tensors and plain
        values only (``torch.load(..., weights_only=True)`` reads it back)."""
        return {
            "size": self.size,
            "sample_shape": list(self.sample_shape),
            "alphas_cumprod": self.alphas_cumprod.cpu(),
            "num_steps": self.num_steps,
            "eta": self.eta,
            "clip_sample": self.clip_sample,
            "clip_range": self.clip_range,
            "num_labels": self.num_labels,
            "label_dropout": self.label_dropout,
            "guidance": None if self.guidance is None else list(self.guidance),
            "prediction_type": self.prediction_type,
            "model_timesteps": None if self.model_timesteps is None else self.model_timesteps.cpu(),
            "generator": self.generator.get_state(),
            "completed": self.completed,
            "x": self.x.cpu(),
            "position": self.position.cpu(),
            "offset": self.offset.cpu(),
            "labels": self.labels.cpu(),
            "scales": self.scales.cpu(),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], *, device: str | torch.device = "cpu") -> NoisePool:
        """The pool :meth:`record` describes, on ``device``."""
        generator = torch.Generator()
        generator.set_state(record["generator"])
        pool = cls(
            size=record["size"],
            sample_shape=tuple(record["sample_shape"]),
            alphas_cumprod=record["alphas_cumprod"],
            num_steps=record["num_steps"],
            eta=record["eta"],
            clip_sample=record["clip_sample"],
            clip_range=record["clip_range"],
            generator=torch.Generator(),
            device=device,
            num_labels=record["num_labels"],
            label_dropout=record["label_dropout"],
            guidance=None if record["guidance"] is None else tuple(record["guidance"]),
            prediction_type=record.get("prediction_type", "epsilon"),
            model_timesteps=record.get("model_timesteps"),
        )
        pool.load_state(PoolState(record["x"], record["position"], record["offset"], record["labels"], record["scales"]))
        pool.generator = generator
        pool.completed = record["completed"]
        return pool

    def load_state(self, state: PoolState) -> None:
        self.x.copy_(state.x)
        self.position.copy_(state.position)
        self.offset.copy_(state.offset)
        self.labels.copy_(state.labels)
        self.scales.copy_(state.scales)
