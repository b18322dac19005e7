"""Study configs: ``studies/*.yaml`` validated into a typed :class:`StudyConfig`.

Each YAML section is one frozen dataclass below (``budgets:`` is :class:`Budgets`, ``execution:``
is :class:`ExecutionSettings`, ...); ``method_options:`` is the method's dataclass in
:mod:`automl_diff.config.options`. The README's "Study configs" section shows every key. Paths are
relative to the config file; every error names the file and the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from automl_diff.config._reader import Section, load_yaml, positive
from automl_diff.config.options import METHOD_OPTIONS, read_options
from automl_diff.errors import UserError
from automl_diff.records import TrialAttr
from automl_diff.zoo import JUDGES, TEACHERS

__all__ = [
    "DEFAULT_STORAGE",
    "OBJECTIVES",
    "Budgets",
    "ExecutionSettings",
    "FidSettings",
    "Objective",
    "PromptSettings",
    "PrunerSettings",
    "SamplerSettings",
    "SamplingSettings",
    "StudyConfig",
    "load_study_config",
]

#: Metrics a study may optimise (direction is explicit: ``prompt_accuracy`` is maximised).
#: Objectives that measure text alignment (text-to-image teachers; higher is better).
ALIGNMENT_OBJECTIVES = (TrialAttr.PROMPT_ACCURACY, TrialAttr.CLIP_SCORE)
OBJECTIVES = (TrialAttr.MACS, TrialAttr.TRAJECTORY_MACS, TrialAttr.PARAMS, TrialAttr.FID, TrialAttr.LATENCY, *ALIGNMENT_OBJECTIVES)
SAMPLERS = ("tpe", "nsga2", "random")
#: Precisions a teacher may be loaded in (``dtype:``).
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_STORAGE = "sqlite:///automl_diff.db"


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str = "minimize"


@dataclass(frozen=True)
class SamplerSettings:
    name: str = "tpe"
    seed: int | None = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Budgets:
    """Per-trial budgets. ``train_iterations`` optimiser steps of ``batch_size``; FID on
    ``fid_samples`` images sampled with ``sampling_steps`` steps; latency as the median of
    ``latency_repeats`` batches of ``latency_batch_size``."""

    train_iterations: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    fid_samples: int = 500
    sampling_steps: int = 20
    latency_repeats: int = 3
    latency_batch_size: int = 8
    #: Text-to-image teachers: consecutive evaluation images generated from one prompt.
    images_per_prompt: int = 1


@dataclass(frozen=True)
class SamplingSettings:
    """The sampler every model of a study runs (its FID, latency and DiP-GO's pruner).
    ``guidance_scale`` and ``negative_prompt`` apply to text-to-image teachers: classifier-free
    guidance with both halves in one UNet call, as diffusers' pipelines run it."""

    scheduler: str = "ddim"
    eta: float = 0.0
    guidance_scale: float = 7.5
    negative_prompt: str = ""


@dataclass(frozen=True)
class PromptSettings:
    """The prompt sets of a text-to-image study (read from the files the config names).

    Attributes:
        train: what a method may use (DiP-GO's pruner, distillation).
        eval: what FID and text alignment are measured on.
        train_file, eval_file: the files they were read from.
        alignment: the text-alignment metric every model is measured with (``prompt_accuracy``
            for ``digits-t2i``, ``clip_score`` for real models; None: FID only); an alignment
            objective implies it.
        clip_model: the CLIP model of ``clip_score`` and of ``fid.features: clip`` (a hub id in the
            local cache, or a folder).
        judge: the built-in prompt judge of ``prompt_accuracy`` (:data:`automl_diff.zoo.JUDGES`);
            None: the teacher's own (a built-in text-to-image teacher has one).
    """

    train: tuple[str, ...] = ()
    eval: tuple[str, ...] = ()
    train_file: str | None = None
    eval_file: str | None = None
    alignment: str | None = None
    clip_model: str = "openai/clip-vit-base-patch16"
    judge: str | None = None

    @property
    def given(self) -> bool:
        return bool(self.train or self.eval)


@dataclass(frozen=True)
class FidSettings:
    """``dataset``/``features`` None: taken from the teacher (``digits`` for the built-in one)."""

    dataset: str | None = None
    features: str | None = None
    batch_size: int = 250
    #: Record FID's 95% interval and KID on every trial (half-sampling; see metrics/intervals.py).
    interval: bool = False


@dataclass(frozen=True)
class ExecutionSettings:
    """How trials run, locally or on Ray.

    Attributes:
        heartbeat: seconds between the heartbeats a running trial writes to the storage. A trial
            silent for twice as long (its worker was killed, its host lost) is marked failed and
            retried with the same parameters by the next worker that looks (crash recovery).
        retries: how many times such a stale trial is retried.
        failure_budget: failed trials (diverged, out of memory) one run tolerates before it stops
            (0: as many as ``n_trials``, at least 3).
        cpus_per_trial: CPUs Ray reserves for each trial (``--backend ray``).
        gpus_per_trial: GPUs Ray reserves for each trial; fractions share a GPU.
        max_concurrent: trials Ray runs at once (0: as many as the resources allow).
        max_failures: times Ray restarts a trial whose worker crashed (Tune ``FailureConfig``).
        processes_per_trial: data-parallel training processes of one trial (torch DDP under
            ``torchrun``, inside the trial's Ray worker on the Ray backend: one node); 0 follows
            ``gpus_per_trial`` (one process per whole GPU, at least one).
    """

    heartbeat: int = 60
    retries: int = 1
    failure_budget: int = 0
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0
    max_failures: int = 2
    processes_per_trial: int = 0

    @property
    def processes(self) -> int:
        """Training processes per trial."""
        return self.processes_per_trial or max(1, int(self.gpus_per_trial))


@dataclass(frozen=True)
class PrunerSettings:
    """``pruner:``: early stopping of trials whose intermediate score is hopeless.

    A trial reports a score at each rung (a fraction of its training budget); ``mo_asha`` stops it
    when, given its MACs, its score ranks it outside the best ``1 / reduction_factor`` of the trials
    that reached the rung and off their first non-dominated front (multi-objective asynchronous
    successive halving), on the local and the Ray backend alike.

    Attributes:
        name: ``none`` (every trial trains in full) or ``mo_asha``.
        rungs: fractions of the training budget at which a trial reports (increasing, in (0, 1)).
        reduction_factor: the share ``1 / reduction_factor`` of a rung's trials that go on.
        min_trials: trials that must have reached a rung before it stops any.
        score_samples: noisy samples of the held-out batch the score is measured on.
    """

    name: str = "none"
    rungs: tuple[float, ...] = (0.1, 0.3)
    reduction_factor: float = 3.0
    min_trials: int = 3
    score_samples: int = 256

    @property
    def enabled(self) -> bool:
        return self.name != "none"


@dataclass(frozen=True)
class StudyConfig:
    """A validated study config. Paths are resolved relative to the config file."""

    path: str
    name: str
    method: str
    teacher: str
    search_space: str | None
    objectives: tuple[Objective, ...]
    sampler: SamplerSettings
    n_trials: int
    budgets: Budgets
    sampling: SamplingSettings
    fid: FidSettings
    storage: str
    output_dir: str
    device: str
    seed: int
    method_options: dict[str, Any]
    execution: ExecutionSettings = field(default_factory=ExecutionSettings)
    prompts: PromptSettings = field(default_factory=PromptSettings)
    pruner: PrunerSettings = field(default_factory=PrunerSettings)
    #: The teacher's precision: ``float32``, or ``float16``/``bfloat16`` (method dipgo, whose
    #: trials sample the teacher itself; float16 on a CUDA device).
    dtype: str = "float32"
    #: Stacking: the teacher a chain of studies started from, when ``teacher`` is an export of
    #: another study (None: the export's own record, or ``teacher`` itself).
    original_teacher: str | None = None

    def with_overrides(self, **changes: Any) -> StudyConfig:
        """A copy with some fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def objective_names(self) -> list[str]:
        return [o.name for o in self.objectives]

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]


def _device(value: str) -> str | None:
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return None
    return "must be auto, cpu, cuda or cuda:N"


def _resolve(base: Path, value: str) -> str:
    """Paths in a config are relative to the config file; hub ids and names stay as they are."""
    candidate = (base / value).resolve()
    if candidate.exists() or value.startswith((".", "/", "~")) or value.endswith((".yaml", ".yml", ".json")):
        return str(candidate) if not value.startswith("~") else str(Path(value).expanduser())
    return value


def load_study_config(path: str | Path) -> StudyConfig:
    """Read and validate a study YAML file.

    Raises:
        UserError: one line naming the file and the key.
    """
    from automl_diff.sampling import SCHEDULERS

    path = Path(path)
    top = Section(load_yaml(path, what="study config"), file=path)
    base = path.resolve().parent
    name = top.take("name", str, path.stem)
    method = top.take("method", str, choices=sorted(METHOD_OPTIONS))
    raw_teacher = top.take("teacher", str)
    teacher = raw_teacher if raw_teacher in TEACHERS else _resolve(base, raw_teacher)
    if Path(teacher).is_absolute() and not Path(teacher).exists():
        raise top.error(
            "teacher", raw_teacher, f"the folder {teacher} does not exist (a teacher is digits, a diffusers folder or a hub id org/name)"
        )
    raw_original = top.take("original_teacher", str, None)
    original_teacher = None
    if raw_original is not None:
        original_teacher = raw_original if raw_original in TEACHERS else _resolve(base, raw_original)
        if Path(original_teacher).is_absolute() and not Path(original_teacher).exists():
            raise top.error(
                "original_teacher",
                raw_original,
                f"the folder {original_teacher} does not exist (a teacher is digits, a diffusers folder or a hub id org/name)",
            )
    raw_space = top.take("search_space", str, None)
    space = None if raw_space is None else _resolve(base, raw_space)
    if space is not None and not Path(space).is_file():
        raise top.error("search_space", raw_space, f"the file {space} does not exist")

    raw_objectives = top.data.get("objectives", [{"name": "macs"}, {"name": "fid"}])
    top.take("objectives", list, [])
    if not isinstance(raw_objectives, list) or not raw_objectives:
        raise top.error("objectives", raw_objectives, "expected a non-empty list")
    objectives = []
    for i, item in enumerate(raw_objectives):
        if isinstance(item, str):
            item = {"name": item}
        sec = Section(item, file=path, prefix=f"objectives[{i}]")
        objectives.append(
            Objective(sec.take("name", str, choices=OBJECTIVES), sec.take("direction", str, "minimize", choices=("minimize", "maximize")))
        )
        sec.done()
    if len({o.name for o in objectives}) != len(objectives):
        raise top.error("objectives", [o.name for o in objectives], "repeats an objective")

    sampler_sec = top.section("sampler")
    sampler = SamplerSettings(
        name=sampler_sec.take("name", str, "tpe", choices=SAMPLERS),
        seed=sampler_sec.take("seed", int, 0),
        options=dict(sampler_sec.take("options", dict, {})),
    )
    sampler_sec.done()

    b = top.section("budgets")
    defaults = Budgets()
    budgets = Budgets(
        train_iterations=b.take("train_iterations", int, defaults.train_iterations, check=positive),
        batch_size=b.take("batch_size", int, defaults.batch_size, check=positive),
        lr=b.take("lr", float, defaults.lr, check=positive),
        fid_samples=b.take("fid_samples", int, defaults.fid_samples, check=lambda v: None if v >= 2 else "needs at least 2 images"),
        sampling_steps=b.take("sampling_steps", int, defaults.sampling_steps, check=positive),
        latency_repeats=b.take("latency_repeats", int, defaults.latency_repeats, check=positive),
        latency_batch_size=b.take("latency_batch_size", int, defaults.latency_batch_size, check=positive),
        images_per_prompt=b.take("images_per_prompt", int, defaults.images_per_prompt, check=positive),
    )
    b.done()

    s = top.section("sampling")
    sampling = SamplingSettings(
        s.take("scheduler", str, "ddim", choices=SCHEDULERS),
        s.take("eta", float, 0.0),
        s.take("guidance_scale", float, SamplingSettings.guidance_scale, check=lambda v: None if v >= 1 else "must be at least 1"),
        s.take("negative_prompt", str, ""),
    )
    s.done()

    prompts = _prompt_settings(top.section("prompts"), base)
    wanted = [o.name for o in objectives if o.name in ALIGNMENT_OBJECTIVES]
    if wanted:
        if prompts.alignment not in (None, wanted[0]):
            raise top.error("prompts", prompts.alignment, f"alignment is {prompts.alignment} but the objectives name {wanted[0]}")
        prompts = replace(prompts, alignment=wanted[0])

    f = top.section("fid")
    from automl_diff.metrics.fid import FEATURE_EXTRACTORS

    fid = FidSettings(
        dataset=f.take("dataset", str, None),
        features=f.take("features", str, None, choices=sorted(FEATURE_EXTRACTORS)),
        batch_size=f.take("batch_size", int, 250, check=positive),
        interval=f.take("interval", bool, False),
    )
    f.done()
    if fid.dataset and fid.dataset.startswith("folder:"):
        fid = replace(fid, dataset="folder:" + _resolve(base, fid.dataset[len("folder:") :]))

    e = top.section("execution")
    not_negative = lambda v: None if v >= 0 else "must not be negative"
    execution = ExecutionSettings(
        heartbeat=e.take("heartbeat", int, ExecutionSettings.heartbeat, check=positive),
        retries=e.take("retries", int, ExecutionSettings.retries, check=not_negative),
        failure_budget=e.take("failure_budget", int, ExecutionSettings.failure_budget, check=not_negative),
        cpus_per_trial=e.take("cpus_per_trial", float, ExecutionSettings.cpus_per_trial, check=positive),
        gpus_per_trial=e.take("gpus_per_trial", float, ExecutionSettings.gpus_per_trial, check=not_negative),
        max_concurrent=e.take("max_concurrent", int, ExecutionSettings.max_concurrent, check=not_negative),
        max_failures=e.take("max_failures", int, ExecutionSettings.max_failures, check=not_negative),
        processes_per_trial=e.take("processes_per_trial", int, ExecutionSettings.processes_per_trial, check=not_negative),
    )
    e.done()
    pruner = _pruner_settings(top.section("pruner"))

    config = StudyConfig(
        path=str(path),
        name=name,
        method=method,
        teacher=teacher,
        search_space=space,
        objectives=tuple(objectives),
        sampler=sampler,
        n_trials=top.take("n_trials", int, 10, check=positive),
        budgets=budgets,
        sampling=sampling,
        fid=fid,
        storage=top.take("storage", str, DEFAULT_STORAGE),
        output_dir=top.take("output_dir", str, "runs"),
        device=top.take("device", str, "auto", check=_device),
        seed=top.take("seed", int, 0),
        method_options=dict(top.take("method_options", dict, {})),
        execution=execution,
        prompts=prompts,
        pruner=pruner,
        dtype=top.take("dtype", str, "float32", choices=DTYPES),
        original_teacher=original_teacher,
    )
    if config.dtype != "float32" and method != "dipgo":
        raise top.error("dtype", config.dtype, "only method dipgo samples a reduced-precision teacher (the others train students)")
    top.done()
    read_options(METHOD_OPTIONS[method], config.method_options, file=config.path)  # now, naming the file
    return config


def _pruner_settings(section: Section) -> PrunerSettings:
    default = PrunerSettings()

    def rungs(values: list[Any]) -> str | None:
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in values):
            return "must be a list of fractions of the training budget, each between 0 and 1"
        if list(values) != sorted(set(values)):
            return "must be increasing"
        return None

    settings = PrunerSettings(
        name=section.take("name", str, default.name, choices=("none", "mo_asha")),
        rungs=tuple(float(v) for v in section.take("rungs", list, list(default.rungs), check=rungs)),
        reduction_factor=section.take(
            "reduction_factor", float, default.reduction_factor, check=lambda v: None if v > 1 else "must be above 1"
        ),
        min_trials=section.take("min_trials", int, default.min_trials, check=positive),
        score_samples=section.take("score_samples", int, default.score_samples, check=positive),
    )
    section.done()
    return settings


def _prompt_settings(section: Section, base: Path) -> PromptSettings:
    """``prompts: {train: FILE, eval: FILE, column: NAME}``: the files relative to the config."""
    from automl_diff.data import read_prompts

    column = section.take("column", str, None)
    alignment = section.take("alignment", str, None, choices=ALIGNMENT_OBJECTIVES)
    clip_model = _resolve(base, section.take("clip_model", str, PromptSettings.clip_model))
    judge = section.take("judge", str, None, choices=sorted(JUDGES))
    read: dict[str, tuple[tuple[str, ...], str | None]] = {}
    for key in ("train", "eval"):
        raw = section.take(key, str, None)
        if raw is None:
            read[key] = ((), None)
            continue
        file = (base / Path(raw).expanduser()).resolve()
        read[key] = (read_prompts(file, column=column, where=f"{section.file}: {section.key(key)}"), str(file))
    section.done()
    return PromptSettings(read["train"][0], read["eval"][0], read["train"][1], read["eval"][1], alignment, clip_model, judge)


def resolve_device(name: str, *, source: str | None = None) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``.

    Args:
        name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        source: the config file that asked for it (named in the error).
    """
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    where = f"{source}: device: " if source else ""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{where}'{name}' was asked for but CUDA is not available on this machine")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"{where}'{name}' was asked for but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name
