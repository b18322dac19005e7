"""The ``method_options`` of each method, as typed dataclasses read once, when a study config loads.

Each method's options are data, like the rest of a study config: the loader reads them
(:func:`read_options`: types, choices, ranges; errors name the file and
``method_options.<key>``), the study config carries them, typed, and the method reads the same
object. Each options class names its method (:data:`METHOD_OPTIONS` is the registry of names a
config may give) and checks itself against the loaded teacher
(:meth:`MethodOptions.check_against`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from automl_diff.config._reader import Section, positive, read_settings, setting
from automl_diff.config.search_space import SearchSpace, SupernetSpace, TransformerSpace
from automl_diff.errors import UserError
from automl_diff.metrics.macs import condition_keyword
from automl_diff.models.dataflow import GRANULARITIES, is_transformer
from automl_diff.models.recipes import BK_SDM_RECIPES, BK_SDM_VARIANTS
from automl_diff.sampling import PREDICTION_TYPES

if TYPE_CHECKING:
    from automl_diff.config.settings import MethodSettings
    from automl_diff.models.loading import Teacher

__all__ = [
    "BLOCK_COSTS",
    "CONSISTENCY_LOSSES",
    "DEEPCACHE_RECIPE",
    "JOINT_SCHEDULES",
    "METHOD_OPTIONS",
    "POSTPROCESS",
    "PRUNERS",
    "STEPS_RECIPE",
    "DKDMOptions",
    "DiPGOOptions",
    "DiffNASOptions",
    "MethodOptions",
    "PoolOptions",
    "read_options",
    "schedule_recipe",
]

#: What DiffNAS minimises per block among the candidates within a tolerance.
BLOCK_COSTS = ("macs", "latency")
#: How DiffNAS's block-feature weight changes over retraining.
JOINT_SCHEDULES = ("linear", "cosine", "static")
#: DiP-GO's consistency losses between the gated and the full sampler's final images.
CONSISTENCY_LOSSES = ("mse", "ssim")
#: DiP-GO's pruner networks.
PRUNERS = ("mlp", "attention")
#: How DiP-GO turns its pruner's scores into a schedule.
POSTPROCESS = ("budget", "threshold")
_SECTION = "method_options"
#: DiP-GO's warm-start recipes: DeepCache's uniform cache schedule, refreshed every N steps; and
#: fewer sampling steps, N evenly spaced calls computed and the calls between skipped.
DEEPCACHE_RECIPE = "deepcache:"
STEPS_RECIPE = "steps:"


def schedule_recipe(recipe: str) -> tuple[str, int] | None:
    """A DiP-GO recipe's kind and number: ``deepcache:N`` (N of at least 2) or ``steps:N`` (N of
    at least 1); None where ``recipe`` is neither."""
    for prefix, least in ((DEEPCACHE_RECIPE, 2), (STEPS_RECIPE, 1)):
        found = re.fullmatch(re.escape(prefix) + r"([1-9][0-9]*)", str(recipe))
        if found is not None and int(found.group(1)) >= least:
            return prefix.rstrip(":"), int(found.group(1))
    return None


def _dipgo_recipe(recipe: str) -> str | None:
    if schedule_recipe(recipe) is None:
        return (
            "not a recipe of method dipgo, whose recipes are deepcache:N (DeepCache's schedule, refreshed every N steps; "
            "N of at least 2) and steps:N (N evenly spaced calls computed, the calls between skipped)"
        )
    return None


def _bk_sdm_recipe(method: str) -> Any:
    def check(recipe: str) -> str | None:
        if recipe in BK_SDM_RECIPES:
            return None
        names = ", ".join(f"{name} ({BK_SDM_VARIANTS[variant]})" for name, variant in BK_SDM_RECIPES.items())
        return f"not a recipe of method {method}, whose recipes are {names}"

    return check


def _unit_interval(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be in [0, 1]"


def _guidance_scales(value: tuple[float, ...]) -> str | None:
    ok = len(value) <= 2 and all(g >= 1 for g in value) and list(value) == sorted(value)
    return None if ok else "one or two scales of at least 1, low first"


def _positive_fraction(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


def _open_interval(value: float) -> str | None:
    return None if 0 < value < 1 else "must be in (0, 1)"


def _decay(value: float) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1)"


def _at_least(minimum: int) -> Any:
    return lambda v: None if v >= minimum else f"must be at least {minimum}"


def _option(default: Any, doc: str, **kwargs: Any) -> Any:
    return setting(default, section=_SECTION, doc=doc, **kwargs)


class MethodOptions:
    """What every method's options class has: its method's name, whether that method reports
    rung scores (early stopping), and its checks."""

    #: The method's registry name (``method:`` in a study config).
    method: ClassVar[str]
    #: Whether the method reports intermediate scores at rungs (``pruner:``).
    reports_rungs: ClassVar[bool] = False

    def check(self, file: str) -> None:
        """Options against each other (after reading). Default: nothing."""

    def check_against(self, settings: MethodSettings, teacher: Teacher, original: Teacher) -> None:
        """Options and settings against the loaded teachers (``teacher``: the model compressed,
        ``original``: the yardstick). Default: nothing.

        Raises:
            UserError: one line naming the config file and the key.
        """


@dataclass(frozen=True)
class PoolOptions(MethodOptions):
    """Where training inputs come from: the teacher's own generations (data-free) or a dataset."""

    source: str = _option(
        "teacher",
        "teacher (data-free DKDM: the teacher's own generations) or dataset (fid.dataset's images)",
        choices=("teacher", "dataset"),
    )
    pool_size: int = _option(4096, "noisy samples in the pool (at least the batch size)", check=positive)
    pool_steps: int = _option(50, "DDIM steps of a pool trajectory, from pure noise to a clean image", check=positive)
    pool_eta: float = _option(1.0, "stochasticity of the pool's steps (1: ancestral-like, 0: deterministic)", check=_unit_interval)
    prompt_dropout: float = _option(
        0.1,
        "text-to-image: share of pool entries (or images) with the unconditional prompt; with guided_pool, the share of a "
        "training batch's rows that are the unconditional half of guidance at the batch's states (its trajectories are all "
        "conditional)",
        check=_unit_interval,
    )
    guided_pool: bool = _option(
        False,
        "text-to-image: the teacher labels both halves of classifier-free guidance at every pool state in one call, the "
        "student learns the conditional half and, for prompt_dropout of its rows, the unconditional half at the same "
        "states, and the state moves on with the guided prediction (false: one conditional prediction labels and moves "
        "it, so the pool follows the unguided distribution; on digits-t2i at guidance 3 the guided pool halved the DKDM "
        "student's FID, see BENCHMARKS.md)",
    )
    pool_guidance: tuple[float, ...] = _option(
        (),
        "text-to-image, guided pool: the guidance scale of the pool's trajectories; empty: the study's "
        "sampling.guidance_scale; two values: a range each trajectory draws its scale from",
        check=_guidance_scales,
    )

    def check_against(self, settings: MethodSettings, teacher: Teacher, original: Teacher) -> None:
        where = settings.where
        prediction = original.prediction_type
        if prediction not in PREDICTION_TYPES:
            raise UserError(
                f"teacher '{original.source}': method {self.method} distils {', '.join(PREDICTION_TYPES)} predictions; its "
                f"scheduler predicts '{prediction}'"
            )
        if original.latent is not None and self.source == "teacher" and not settings.train_prompts:
            raise UserError(
                f"{where}: prompts.train: required to distil a {'text-to-image' if original.text else 'class-conditional'} teacher "
                "data-free (the prompts or classes its generations are conditioned on)"
            )
        if self.source == "dataset" and (settings.dataset or original.dataset) is None:
            raise UserError(f"{where}: fid.dataset: needed for method_options.source=dataset")
        if self.source == "dataset" and original.classes is not None:
            raise UserError(f"{where}: method_options.source: dataset has no class labels for a class-conditional teacher; use teacher")
        batch, processes = settings.budgets.batch_size, settings.processes
        if processes > 1 and batch % processes:
            raise UserError(
                f"{where}: budgets.batch_size: {batch} does not split over {processes} processes (execution.processes_per_trial)"
            )

    def _space(self, settings: MethodSettings, kind: type | tuple[type, ...], families: str) -> Any:
        space = settings.search_space
        if space is None:
            raise UserError(f"{settings.where}: search_space: required for method {self.method}")
        if not isinstance(space, kind):
            raise UserError(f"{space.path}: family: method {self.method} needs family {families}")
        return space


@dataclass(frozen=True)
class DKDMOptions(PoolOptions):
    """``method_options`` of a DKDM study: the pool's options plus the student's training."""

    method: ClassVar[str] = "dkdm"
    reports_rungs: ClassVar[bool] = True

    ema_decay: float = _option(0.995, "weight EMA of the student (0: off)", check=_decay)
    init: str = _option(
        "teacher", "teacher (the student starts from a cut of the teacher's weights) or random", choices=("teacher", "random")
    )
    warm_start: tuple[str, ...] = _option(
        (),
        "known students enqueued as the study's first trials, so that the study always holds them, each distilled like "
        "any other: bk-sdm-base and bk-sdm-small are BK-SDM's block removals (one resnet + attention pair fewer per "
        "stage; small also drops the mid block) with the teacher's remaining weights, whatever the search space holds",
        check=_bk_sdm_recipe("dkdm"),
    )

    def check_against(self, settings: MethodSettings, teacher: Teacher, original: Teacher) -> None:
        super().check_against(settings, teacher, original)
        transformer = is_transformer(teacher.unet)
        if transformer:
            space = self._space(settings, (TransformerSpace, SearchSpace), "dit, or unet2d with student: (students of a DiT teacher)")
            if self.warm_start:
                raise UserError(f"{settings.where}: method_options.warm_start: BK-SDM's recipes remove UNet blocks; a DiT has none")
        else:
            space = self._space(
                settings, (SearchSpace, TransformerSpace), "unet2d or unet2d_condition (student architectures), or dit with student:"
            )
        space.validate_for(dict(teacher.unet.config))
        if self.pool_size < settings.budgets.batch_size:
            raise UserError(
                f"{settings.where}: method_options.pool_size: must be at least budgets.batch_size "
                f"({settings.budgets.batch_size}) (got {self.pool_size})"
            )


@dataclass(frozen=True)
class DiffNASOptions(PoolOptions):
    """``method_options`` of a DiffNAS study: the pool's options (where the teacher's block inputs
    come from) plus supernet training, the block-wise search and retraining."""

    method: ClassVar[str] = "diffnas"
    reports_rungs: ClassVar[bool] = True

    search: str = _option("local", "local (one search per block, DiffNAS) or global (all blocks jointly)", choices=("local", "global"))
    supernet_iterations: int = _option(400, "supernet training steps (each trains every block)", check=positive)
    supernet_lr: float = _option(1e-3, "supernet learning rate", check=positive)
    subnets_per_step: int = _option(4, "subnets trained per block and step (largest and smallest included)", check=_at_least(2))
    search_samples: int = _option(256, "validation samples that score the candidates", check=positive)
    block_trials: int = _option(64, "per-block trials; smaller blocks are searched exhaustively", check=_at_least(2))
    global_trials: int = _option(200, "trials of the global search", check=_at_least(2))
    block_cost: str = _option(
        "macs", "what a tolerance minimises per block: macs (the paper's) or latency (measured seconds)", choices=BLOCK_COSTS
    )
    tolerance_low: float = _option(0.01, "low end of the tolerance on the relative block loss (log scale)", check=positive)
    tolerance_high: float = _option(0.3, "high end of the tolerance range", check=positive)
    retrain_iterations: tuple[int, ...] = _option(
        (), "retraining budgets Optuna chooses from (empty: budgets.train_iterations)", check=_at_least(0)
    )
    joint_schedule: str = _option("linear", "the block-feature weight over retraining: linear, cosine or static", choices=JOINT_SCHEDULES)
    joint_start: float = _option(1.0, "block-feature weight at the first step", check=_unit_interval)
    joint_end: float = _option(0.0, "block-feature weight at the last step", check=_unit_interval)
    data_weight: float = _option(0.0, "weight of the data loss (source: dataset only)", check=_at_least(0))
    ema_decay: float = _option(0.995, "weight EMA of the retrained student (0: off)", check=_decay)
    warm_start: tuple[str, ...] = _option(
        (),
        "known students enqueued as the study's first trials, so that the study always holds them: bk-sdm-base and "
        "bk-sdm-small take per block the subnet that is BK-SDM's removal (it must be a point of the search space: down "
        "stages drop their last pair, up stages the one before their last, drop: middle; small also sets the mid "
        "block's layers to 0) and retrain it like any other",
        check=_bk_sdm_recipe("diffnas"),
    )

    def check(self, file: str) -> None:
        _require_below(self, file, "tolerance_low", "tolerance_high")
        if self.data_weight and self.source != "dataset":
            raise UserError(f"{file}: method_options.data_weight: needs source: dataset (got source: {self.source})")

    def check_against(self, settings: MethodSettings, teacher: Teacher, original: Teacher) -> None:
        if is_transformer(teacher.unet) and self.warm_start:
            raise UserError(f"{settings.where}: method_options.warm_start: BK-SDM's recipes remove UNet blocks; a DiT has none")
        super().check_against(settings, teacher, original)
        space = self._space(settings, SupernetSpace, "supernet (per-block subnet choices)")
        space.validate_for(teacher.unet)
        for recipe in self.warm_start:
            space.recipe_point(teacher.unet, recipe)


@dataclass(frozen=True)
class DiPGOOptions(MethodOptions):
    """``method_options`` of a DiP-GO study (the pruner trains for ``budgets.train_iterations``
    steps of ``budgets.batch_size`` trajectories at ``budgets.lr``, over the study's sampler)."""

    method: ClassVar[str] = "dipgo"

    granularity: str = _option(
        "layer",
        "block (down.i, mid, up.i), layer (their resnets, attentions and resamplers) or branch (each resnet with its "
        "attention, each downsampler, the mid block: the units DiP-GO's authors gate on Stable Diffusion)",
        choices=GRANULARITIES,
    )
    target_macs_ratio: float = _option(
        0.25, "trajectory cost the pruner aims for, a fraction of the full sampler's", check=_positive_fraction
    )
    unit_cost: str = _option(
        "macs",
        "what the sparsity loss and the budget count per unit: macs (the paper's) or latency (seconds measured here)",
        choices=("macs", "latency"),
    )
    sparsity_weight: float = _option(1.0, "weight of the sparsity loss", check=positive)
    consistency: str = _option("mse", "mse or ssim between the gated and the full samplers' final images", choices=CONSISTENCY_LOSSES)
    tau: float = _option(1.0, "Gumbel-softmax temperature", check=positive)
    checkpoint: bool = _option(
        True, "backpropagate through every step with one step's activations in memory at a time (recomputed in the backward pass)"
    )
    warmup: float = _option(0.6, "fraction of the iterations over which the target falls from 1", check=_unit_interval)
    reference_images: int = _option(64, "fixed noise samples the pruner trains on (not the FID noise)", check=positive)
    pruner: str = _option(
        "mlp",
        "the pruner network: mlp (step and unit queries through a shared MLP) or attention (the paper's: a query per gate, "
        "stacked self-attention over each step's units, a linear head)",
        choices=PRUNERS,
    )
    pruner_layers: int = _option(2, "self-attention layers of the attention pruner", check=positive)
    postprocess: str = _option(
        "budget",
        "how the pruner's scores become a schedule: budget (the paper's Algorithm 1: the highest-scoring gates that fit a "
        "trajectory cost budget, in unit_cost's unit; Optuna tunes the budget) or threshold (gates scoring above it compute; "
        "Optuna tunes the threshold)",
        choices=POSTPROCESS,
    )
    budget_low: float = _option(0.1, "low end of the budget Optuna tunes, a fraction of the full sampler's cost", check=_positive_fraction)
    budget_high: float = _option(0.5, "high end of the budget range", check=_positive_fraction)
    threshold_low: float = _option(1e-4, "low end of the threshold Optuna tunes (postprocess: threshold)", check=_open_interval)
    threshold_high: float = _option(0.5, "high end of the threshold range", check=_open_interval)
    threshold_log: bool = _option(True, "sample the threshold on a log scale")
    warm_start: tuple[str, ...] = _option(
        (),
        "known recipes enqueued as the study's first trials, so that the study always holds them: deepcache:N is DeepCache's "
        "uniform schedule (every N-th step computes every unit; the steps between compute only the last up block's last "
        "resnet and attention and reuse the rest, as DeepCache's helper does at cache branch 0); steps:N is fewer sampling "
        "steps (N evenly spaced calls compute every unit, the calls between are skipped whole and the model's last output "
        "is used again: with DDIM at eta 0, DDIM on those N timesteps)",
        check=_dipgo_recipe,
    )

    def check(self, file: str) -> None:
        _require_below(self, file, "threshold_low", "threshold_high")
        _require_below(self, file, "budget_low", "budget_high")
        caches = [r for r in self.warm_start if (schedule_recipe(r) or ("",))[0] == "deepcache"]
        if caches and self.granularity == "block":
            raise UserError(
                f"{file}: method_options.warm_start: {caches[0]} needs the last up block's last branch as a unit of "
                "its own; use granularity layer or branch"
            )

    def check_against(self, settings: MethodSettings, teacher: Teacher, original: Teacher) -> None:
        where = settings.where
        if condition_keyword(teacher.unet) == "encoder_hidden_states" and teacher.text is None:
            raise UserError(
                f"{where}: teacher: '{teacher.source}' is a text-conditional model without its pipeline; name the pipeline folder "
                "(model_index.json with vae, text encoders, tokenizers, the denoiser and scheduler) as the teacher"
            )
        if teacher.latent is not None and not settings.train_prompts:
            what = "text-to-image teacher (the prompts" if teacher.text is not None else "class-conditional teacher (the classes"
            raise UserError(f"{where}: prompts.train: required for method dipgo on a {what} its pruner trains on)")
        if is_transformer(teacher.unet) and self.warm_start:
            raise UserError(
                f"{where}: method_options.warm_start: {self.warm_start[0]}: DeepCache's recipes cache a UNet's up blocks, which a "
                "transformer has none of, and a transformer's blocks skipped at a call reuse their residual updates on new inputs, "
                "which is not fewer steps"
            )
        if is_transformer(teacher.unet) and self.granularity != "block":
            raise UserError(f"{where}: method_options.granularity: a transformer's units are its blocks; use granularity: block")
        for recipe in self.warm_start:
            kind, number = schedule_recipe(recipe) or ("", 0)
            if kind == "steps" and number > settings.sampling.steps:
                raise UserError(
                    f"{where}: method_options.warm_start: {recipe}: more computed calls than the {settings.sampling.steps} "
                    "sampling steps (budgets.sampling_steps)"
                )
        if settings.processes > 1:
            raise UserError(
                f"{where}: execution.processes_per_trial: method dipgo trains its pruner in one process; {settings.processes} "
                "data-parallel processes (processes_per_trial, or gpus_per_trial) are for dkdm and diffnas: set processes_per_trial: 1"
            )


#: The options class of every method a study config may name (``method:``), by name.
METHOD_OPTIONS: dict[str, type[MethodOptions]] = {cls.method: cls for cls in (DKDMOptions, DiffNASOptions, DiPGOOptions)}


def _require_below(options: Any, file: str, low: str, high: str) -> None:
    """Option ``low`` must be below option ``high`` (a range Optuna samples from)."""
    if getattr(options, low) >= getattr(options, high):
        raise UserError(f"{file}: method_options.{low}: must be below {high} ({getattr(options, high)}) (got {getattr(options, low)})")


def read_options(options_type: type, values: dict[str, Any], *, file: str) -> Any:
    """Validate ``method_options`` into ``options_type``: each field's type, choices and check
    (:func:`~automl_diff.config._reader.setting`), no unknown key, then the options against each
    other (``check``). Errors name ``file`` and ``method_options.<key>``."""
    section = Section(values, file=file, prefix=_SECTION)
    options = read_settings(options_type, {_SECTION: section})
    section.done()
    options.check(file)
    return options
