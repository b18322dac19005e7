"""The ``method_options`` of each method, as typed dataclasses validated when a study config loads.

Each method's options are data, like the rest of a study config: the loader validates them
(types, choices, ranges; errors name the file and ``method_options.<key>``) before anything runs,
and the method (:mod:`automl_diff.methods`) reads the same dataclass. :data:`METHOD_OPTIONS`
names the methods a config may ask for; the method registry has the same names.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from automl_diff.config._reader import Section, positive
from automl_diff.errors import UserError

__all__ = [
    "BLOCK_COSTS",
    "CONSISTENCY_LOSSES",
    "JOINT_SCHEDULES",
    "METHOD_OPTIONS",
    "DKDMOptions",
    "DiPGOOptions",
    "DiffNASOptions",
    "PoolOptions",
    "read_options",
]

#: What DiffNAS minimises per block among the candidates within a tolerance.
BLOCK_COSTS = ("macs", "latency")
#: How DiffNAS's block-feature weight changes over retraining.
JOINT_SCHEDULES = ("linear", "cosine", "static")
#: DiP-GO's consistency losses between the gated and the full sampler's final images.
CONSISTENCY_LOSSES = ("mse", "ssim")


def _unit_interval(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be in [0, 1]"


def _positive_fraction(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


def _open_interval(value: float) -> str | None:
    return None if 0 < value < 1 else "must be in (0, 1)"


def _decay(value: float) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1)"


def _at_least(minimum: int) -> Any:
    return lambda v: None if v >= minimum else f"must be at least {minimum}"


@dataclass(frozen=True)
class PoolOptions:
    """Where training inputs come from: the teacher's own generations (data-free) or a dataset.

    Attributes:
        source: ``teacher`` (DKDM, data-free) or ``dataset`` (the real images of ``fid.dataset``,
            noised with the teacher's scheduler; not data-free).
        pool_size: noisy samples in the pool (at least the batch size). Larger pools decorrelate
            batches (see BENCHMARKS.md); warm-up costs about pool_size * pool_steps / 2 teacher calls.
        pool_steps: DDIM steps of a pool trajectory, from pure noise to a clean image.
        pool_eta: stochasticity of the pool's steps (1.0 ancestral-like, 0.0 deterministic DDIM).
        prompt_dropout: text-to-image teachers: the share of pool entries (or dataset images) that
            carry the unconditional prompt (``sampling.negative_prompt``) instead of a training
            prompt (or caption), so that students learn the unconditional prediction that
            classifier-free guidance needs.
    """

    source: str = field(default="teacher", metadata={"choices": ("teacher", "dataset")})
    pool_size: int = field(default=4096, metadata={"check": positive})
    pool_steps: int = field(default=50, metadata={"check": positive})
    pool_eta: float = field(default=1.0, metadata={"check": _unit_interval})
    prompt_dropout: float = field(default=0.1, metadata={"check": _unit_interval})


@dataclass(frozen=True)
class DKDMOptions(PoolOptions):
    """``method_options`` of a DKDM study: :class:`PoolOptions` plus

    Attributes:
        ema_decay: weight EMA of the student (0 turns it off).
        init: where a student's weights start: ``teacher`` (cut from the teacher's: layers kept
            by position, channels by L1 importance, :mod:`automl_diff.models.inherit`; layers the
            teacher lacks start random) or ``random`` (diffusers' own init).
    """

    ema_decay: float = field(default=0.995, metadata={"check": _decay})
    init: str = field(default="teacher", metadata={"choices": ("teacher", "random")})


@dataclass(frozen=True)
class DiffNASOptions(PoolOptions):
    """``method_options`` of a DiffNAS study (plus :class:`PoolOptions`: ``source``, ``pool_*``).

    Attributes:
        search: ``local`` (one search per block, DiffNAS) or ``global`` (all blocks jointly).
        supernet_iterations: supernet training steps (each trains every block).
        supernet_lr: supernet learning rate.
        subnets_per_step: subnets trained per block and step (largest and smallest included).
        search_samples: ``(x_t, t)`` samples of the validation set that scores candidates.
        block_trials: per-block trials; blocks with at most this many candidates are searched
            exhaustively.
        global_trials: trials of the global search.
        block_cost: what a tolerance minimises among the candidates within it: ``macs`` (the
            paper's choice) or ``latency``, each candidate cut out as a plain block and timed on
            the validation inputs at ``budgets.latency_batch_size`` on the study's device (narrow
            convolutions and attention over few tokens cost more time than their MACs say).
        tolerance_low, tolerance_high: range of the tolerance on the relative block loss (log scale).
        retrain_iterations: retraining budgets for Optuna to choose from (empty: budgets.train_iterations).
        joint_schedule: how the block-feature weight changes: ``linear``, ``cosine`` or ``static``.
        joint_start, joint_end: the weight at the first and the last step (``static`` uses joint_start).
        data_weight: weight of the data loss (``source: dataset`` only).
        ema_decay: weight EMA of the retrained student (0 turns it off).
    """

    search: str = field(default="local", metadata={"choices": ("local", "global")})
    supernet_iterations: int = field(default=400, metadata={"check": positive})
    supernet_lr: float = field(default=1e-3, metadata={"check": positive})
    subnets_per_step: int = field(default=4, metadata={"check": _at_least(2)})
    search_samples: int = field(default=256, metadata={"check": positive})
    block_trials: int = field(default=64, metadata={"check": _at_least(2)})
    global_trials: int = field(default=200, metadata={"check": _at_least(2)})
    block_cost: str = field(default="macs", metadata={"choices": BLOCK_COSTS})
    tolerance_low: float = field(default=0.01, metadata={"check": positive})
    tolerance_high: float = field(default=0.3, metadata={"check": positive})
    retrain_iterations: tuple[int, ...] = field(default=(), metadata={"check": _at_least(0)})
    joint_schedule: str = field(default="linear", metadata={"choices": JOINT_SCHEDULES})
    joint_start: float = field(default=1.0, metadata={"check": _unit_interval})
    joint_end: float = field(default=0.0, metadata={"check": _unit_interval})
    data_weight: float = field(default=0.0, metadata={"check": _at_least(0)})
    ema_decay: float = field(default=0.995, metadata={"check": _decay})

    def check(self, file: str) -> None:
        _require_below(self, file, "tolerance_low", "tolerance_high")
        if self.data_weight and self.source != "dataset":
            raise UserError(f"{file}: method_options.data_weight: needs source: dataset (got source: {self.source})")


@dataclass(frozen=True)
class DiPGOOptions:
    """``method_options`` of a DiP-GO study (the pruner trains for ``budgets.train_iterations``
    steps of ``budgets.batch_size`` trajectories at ``budgets.lr``, over ``budgets.sampling_steps``).

    Attributes:
        granularity: ``block`` (down.i, mid, up.i) or ``layer`` (their resnets, attentions and
            resamplers, as DeepCache caches them).
        target_macs_ratio: trajectory MACs the pruner aims for, as a fraction of the full sampler's
            (with ``unit_cost: latency``, the fraction of its measured time).
        unit_cost: what the sparsity loss counts per unit: ``macs`` (the paper's choice), or
            ``latency``, each unit's seconds measured on the study's device at
            ``budgets.latency_batch_size`` (``budgets.latency_repeats`` passes, at least 3): the
            pruner then prefers to skip what is slow on that device (memory-bound layers, narrow
            convolutions, 1x1 shortcuts) over what merely has many MACs.
        sparsity_weight: weight of the sparsity loss.
        consistency: ``mse`` or ``ssim`` between gated and full samplers' final images.
        tau: Gumbel-softmax temperature.
        checkpoint: gradient checkpointing per sampling step while the pruner trains: the
            consistency loss backpropagates through the whole trajectory with one step's
            activations in memory at a time (recomputed in the backward pass); false keeps every
            step's activations (faster where they fit).
        warmup: fraction of the pruner's iterations over which its target falls from 1.
        reference_images: fixed noise samples the pruner trains on (not the FID noise).
        threshold_low, threshold_high: range of the threshold Optuna tunes (a gate computes
            where the pruner's probability of computing is above it).
        threshold_log: sample the threshold on a log scale. The optimised scores are nearly
            binary; their small values (how sure the pruner is that a gate may be skipped) spread
            over decades, so a log-scale threshold turns gates back on in order of doubt.
    """

    granularity: str = field(default="layer", metadata={"choices": ("block", "layer")})
    target_macs_ratio: float = field(default=0.25, metadata={"check": _positive_fraction})
    unit_cost: str = field(default="macs", metadata={"choices": ("macs", "latency")})
    sparsity_weight: float = field(default=1.0, metadata={"check": positive})
    consistency: str = field(default="mse", metadata={"choices": CONSISTENCY_LOSSES})
    tau: float = field(default=1.0, metadata={"check": positive})
    checkpoint: bool = True
    warmup: float = field(default=0.6, metadata={"check": _unit_interval})
    reference_images: int = field(default=64, metadata={"check": positive})
    threshold_low: float = field(default=1e-4, metadata={"check": _open_interval})
    threshold_high: float = field(default=0.5, metadata={"check": _open_interval})
    threshold_log: bool = True

    def check(self, file: str) -> None:
        _require_below(self, file, "threshold_low", "threshold_high")


#: The options dataclass of every method a study config may name (``method:``).
METHOD_OPTIONS: dict[str, type] = {"dkdm": DKDMOptions, "diffnas": DiffNASOptions, "dipgo": DiPGOOptions}


def _require_below(options: Any, file: str, low: str, high: str) -> None:
    """Option ``low`` must be below option ``high`` (a range Optuna samples from)."""
    if getattr(options, low) >= getattr(options, high):
        raise UserError(f"{file}: method_options.{low}: must be below {high} ({getattr(options, high)}) (got {getattr(options, low)})")


def read_options(options_type: type, values: dict[str, Any], *, file: str) -> Any:
    """Validate ``method_options`` into ``options_type``.

    Field types (int, float, str, bool, and tuples of them read from lists) are checked; a field's
    ``metadata["choices"]`` restricts its values, ``metadata["check"]`` returns a message for a bad
    one; unknown keys are rejected; the dataclass's ``check(file)``, where it has one, checks
    options against each other. Errors name ``file`` and ``method_options.<key>``.
    """
    section = Section(values, file=file, prefix="method_options")
    hints = typing.get_type_hints(options_type)
    kwargs = {}
    for f in dataclasses.fields(options_type):
        kind = hints[f.name]
        if typing.get_origin(kind) is tuple:  # tuple[int, ...]: a list, each item checked
            kwargs[f.name] = tuple(section.take_list(f.name, typing.get_args(kind)[0], f.default, check=f.metadata.get("check")))
            continue
        kwargs[f.name] = section.take(f.name, kind, f.default, choices=f.metadata.get("choices"), check=f.metadata.get("check"))
    section.done()
    options = options_type(**kwargs)
    if hasattr(options, "check"):
        options.check(file)
    return options
