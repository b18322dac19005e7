"""Study configs: ``studies/*.yaml`` read once into a typed, frozen :class:`StudyConfig`.

Every key a study file may set is a field of one of the dataclasses below (or of
:class:`~automl_diff.config.evaluation.Evaluation`, or of the method's options in
:mod:`automl_diff.config.options`), declared with :func:`~automl_diff.config._reader.setting`: its
default, its YAML section and key, its check and its documentation live there, the loader reads
them declaratively, and ``docs/configuration.md`` is generated from the same fields
(:mod:`automl_diff.config.reference`). Paths are relative to the config file; every error names the
file and the dotted key. The checks that need the loaded teacher are
:meth:`StudyConfig.check_against`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from automl_diff.config._reader import Section, load_yaml, positive, read_settings, resolve_path, setting
from automl_diff.config.evaluation import NO_FID, Evaluation
from automl_diff.config.options import METHOD_OPTIONS, MethodOptions, read_options
from automl_diff.config.search_space import SearchSpace, SupernetSpace, TransformerSpace, load_search_space
from automl_diff.config.settings import Budgets, MethodSettings
from automl_diff.errors import UserError
from automl_diff.models.loading import Teacher
from automl_diff.records import TrialAttr
from automl_diff.zoo import JUDGES, TEACHERS

__all__ = [
    "DEFAULT_STORAGE",
    "OBJECTIVES",
    "PROMPT_FILES",
    "STORE_SCHEMES",
    "Budgets",
    "ExecutionSettings",
    "MethodSettings",
    "Objective",
    "OptunaSampler",
    "PrunerSettings",
    "StudyConfig",
    "artifact_store_problem",
    "load_study_config",
    "resolve_device",
]

#: Objectives that measure text alignment (text-to-image teachers; higher is better).
ALIGNMENT_OBJECTIVES = (TrialAttr.PROMPT_ACCURACY, TrialAttr.CLIP_SCORE)
#: Metrics a study may optimise (direction is explicit: an alignment metric is maximised).
OBJECTIVES = (TrialAttr.MACS, TrialAttr.TRAJECTORY_MACS, TrialAttr.PARAMS, TrialAttr.FID, TrialAttr.LATENCY, *ALIGNMENT_OBJECTIVES)
SAMPLERS = ("tpe", "nsga2", "random")
#: Precisions a teacher may be loaded in (``dtype:``).
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_STORAGE = "sqlite:///automl_diff.db"
#: The prompt-file keys of ``prompts:`` (read by the loader; documented here for the reference).
PROMPT_FILES = {
    "train": "text-to-image: a file of the prompts a method may train on (.txt: one per line; .csv/.tsv: a column)",
    "eval": "text-to-image: a file of the prompts FID and text alignment are measured on",
    "column": "the prompt column of a .csv/.tsv prompt file",
}


def _not_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


#: Object-store schemes ``execution.artifact_store`` takes; anything else is a folder.
STORE_SCHEMES = ("s3://",)


def artifact_store_problem(location: str) -> str | None:
    """Why ``location`` cannot name an artifact store (None: it can), before anything connects."""
    if "://" in location and not location.startswith(STORE_SCHEMES):
        return "must be a folder or s3://bucket[/prefix]"
    if location.startswith("s3://") and not location[5:].partition("/")[0]:
        return "must name a bucket: s3://bucket[/prefix]"
    return None


def _device(value: str) -> str | None:
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return None
    return "must be auto, cpu, cuda or cuda:N"


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str = "minimize"


@dataclass(frozen=True)
class OptunaSampler:
    """``sampler:``: the Optuna sampler that proposes the trials' parameters."""

    name: str = setting("tpe", section="sampler", choices=SAMPLERS, doc="the Optuna sampler")
    seed: int | None = setting(0, section="sampler", doc="the sampler's seed (shifted by the trials already in a resumed study)")
    options: dict[str, Any] = setting({}, section="sampler", doc="keyword arguments of the Optuna sampler")


@dataclass(frozen=True)
class ExecutionSettings:
    """``execution:``: how trials run, locally or on Ray."""

    heartbeat: int = setting(
        60,
        section="execution",
        check=positive,
        doc="seconds between a running trial's heartbeats; a trial silent for twice as long is failed and retried",
    )
    retries: int = setting(1, section="execution", check=_not_negative, doc="retries of a trial whose worker was lost")
    failure_budget: int = setting(
        0, section="execution", check=_not_negative, doc="failed trials one run tolerates before it stops (0: n_trials, at least 3)"
    )
    cpus_per_trial: float = setting(1.0, section="execution", check=positive, doc="Ray: CPUs reserved per trial")
    gpus_per_trial: float = setting(0.0, section="execution", check=_not_negative, doc="Ray: GPUs per trial (fractions share a GPU)")
    max_concurrent: int = setting(0, section="execution", check=_not_negative, doc="Ray: trials at once (0: as the resources allow)")
    max_failures: int = setting(
        2,
        section="execution",
        check=_not_negative,
        doc="Ray: retries of a trial whose worker or node died, each a new Optuna trial with its parameters (the lost one fails)",
    )
    processes_per_trial: int = setting(
        0,
        section="execution",
        check=_not_negative,
        doc="data-parallel training processes of a trial (0: one per whole GPU of gpus_per_trial)",
    )
    launcher: str = setting(
        "auto",
        section="execution",
        choices=("auto", "torchrun", "ray_train"),
        doc="what starts a data-parallel trial's processes: torchrun (one node) or Ray Train's TorchTrainer (workers spread over "
        "the cluster's nodes); auto: ray_train on the Ray backend, torchrun on the local one",
    )
    artifact_store: str = setting(
        "",
        section="execution",
        check=lambda v: artifact_store_problem(v) if v else None,
        doc="where trials' weights and sample grids are copied so that export, report and the dashboard work from any host: "
        "a folder (shared storage) or s3://bucket/prefix (boto3; AWS_ENDPOINT_URL for another endpoint); "
        "empty: <output_dir>/<study>/artifacts",
    )

    @property
    def processes(self) -> int:
        """Training processes per trial."""
        return self.processes_per_trial or max(1, int(self.gpus_per_trial))


def _rungs(values: Any) -> str | None:
    if not 0 < values < 1:
        return "must be a fraction of the training budget, between 0 and 1"
    return None


@dataclass(frozen=True)
class PrunerSettings:
    """``pruner:``: early stopping of trials whose intermediate score is hopeless (MO-ASHA: a trial
    stops where, given its MACs, its held-out score ranks it outside the best ``1 / reduction_factor``
    of the trials at the rung and off their first non-dominated front; both backends)."""

    name: str = setting("none", section="pruner", choices=("none", "mo_asha"), doc="none trains every trial in full")
    rungs: tuple[float, ...] = setting((0.1, 0.3), section="pruner", check=_rungs, doc="where trials report, as fractions of training")
    reduction_factor: float = setting(
        3.0, section="pruner", check=lambda v: None if v > 1 else "must be above 1", doc="a rung keeps its best 1 / reduction_factor"
    )
    min_trials: int = setting(3, section="pruner", check=positive, doc="trials that must reach a rung before it stops any")
    score_samples: int = setting(256, section="pruner", check=positive, doc="samples of the held-out batch the score is measured on")

    @property
    def enabled(self) -> bool:
        return self.name != "none"


@dataclass(frozen=True)
class StudyConfig:
    """A validated study config. Paths are resolved relative to the config file."""

    path: str
    method: str = setting("", section=None, required=True, choices=sorted(METHOD_OPTIONS), doc="the compression method")
    teacher: str = setting(
        "",
        section=None,
        required=True,
        doc="what to compress: a built-in teacher, a diffusers folder, a hub id, or another study's export",
    )
    name: str | None = setting(None, section=None, doc="the study's name in the storage (default: the file's name)")
    original_teacher: str | None = setting(
        None, section=None, doc="stacking: the teacher of the chain (default: the one the export records)"
    )
    search_space: SearchSpace | TransformerSpace | SupernetSpace | None = setting(
        None, section=None, kind="file", doc="the search space of the students (dkdm, diffnas): a YAML file"
    )
    objectives: tuple[Objective, ...] = setting(
        (),
        section=None,
        kind="list of {name, direction}",
        doc="what the study minimises (direction: maximize for an alignment metric): macs, trajectory_macs, params, fid, latency, "
        "prompt_accuracy, clip_score (default: macs and fid)",
    )
    sampler: OptunaSampler = field(default_factory=OptunaSampler)
    n_trials: int = setting(10, section=None, check=positive, doc="the total of finished trials to reach (a rerun adds nothing)")
    budgets: Budgets = field(default_factory=Budgets)
    evaluation: Evaluation = field(default_factory=Evaluation)
    train_prompts: tuple[str, ...] = ()
    pruner: PrunerSettings = field(default_factory=PrunerSettings)
    execution: ExecutionSettings = field(default_factory=ExecutionSettings)
    storage: str = setting(DEFAULT_STORAGE, section=None, doc="any Optuna RDB URL (postgresql://... for many workers)")
    output_dir: str = setting("runs", section=None, doc="trial folders: <output_dir>/<study>/trial_<n>/")
    device: str = setting("auto", section=None, check=_device, doc="where models train and sample: auto, cpu, cuda or cuda:N")
    dtype: str = setting("float32", section=None, choices=DTYPES, doc="the teacher's precision (reduced: method dipgo only)")
    seed: int = setting(0, section=None, doc="training seed, and the noise seed of every FID")
    method_options: MethodOptions | None = None

    def with_overrides(self, **changes: Any) -> StudyConfig:
        """A copy with some fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def study_name(self) -> str:
        return self.name or Path(self.path).stem

    @property
    def objective_names(self) -> list[str]:
        return [o.name for o in self.objectives]

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def method_settings(self) -> MethodSettings:
        """What the study hands its method."""
        e = self.evaluation
        return MethodSettings(
            budgets=self.budgets,
            sampling=e.sampling,
            train_prompts=self.train_prompts,
            search_space=self.search_space,
            dataset=e.fid_dataset,
            latency_batch_size=e.latency_batch_size,
            latency_repeats=e.latency_repeats,
            score_samples=self.pruner.score_samples,
            processes=self.execution.processes,
            launcher="ray_train" if self.execution.launcher == "ray_train" else "torchrun",
            seed=self.seed,
            where=self.path,
        )

    def check_against(self, teacher: Teacher, original: Teacher) -> None:
        """Every check that needs the loaded teachers (``teacher``: the model the study
        compresses; ``original``: its yardstick, the same model unless stacked).

        Raises:
            UserError: one line naming the file and the key.
        """
        e = self.evaluation
        try:
            e.sampling.sampler_for(original).make_scheduler()
        except UserError as exc:
            raise UserError(f"{self.path}: {exc}") from None
        if original.latent is None and (e.prompts or self.train_prompts):
            raise UserError(f"{self.path}: prompts: the teacher '{original.source}' is not a text-to-image or class-conditional pipeline")
        if original.text is None and e.alignment == TrialAttr.CLIP_SCORE:
            raise UserError(f"{self.path}: prompts.alignment: {e.alignment} needs a text-to-image teacher")
        if original.latent is None and e.alignment is not None:
            raise UserError(f"{self.path}: prompts.alignment: {e.alignment} needs a text-to-image or class-conditional teacher")
        if original.text is not None and not e.prompts:
            raise UserError(f"{self.path}: prompts.eval: required for a text-to-image teacher (a file of prompts FID is measured on)")
        if original.classes is not None:
            self._check_classes(original)
        if e.alignment == TrialAttr.PROMPT_ACCURACY and (e.judge or original.judge) is None:
            raise UserError(
                f"{self.path}: prompts.judge: prompt_accuracy needs a prompt judge ({', '.join(JUDGES)}); this teacher has none of its "
                "own: name one, or measure clip_score"
            )
        if e.measures_fid and (e.fid_dataset or original.dataset) is None:
            raise UserError(f"{self.path}: fid.dataset: required for a teacher other than a built-in one (a dataset name or folder:PATH)")
        if (original.resolution, original.channels) != (teacher.resolution, teacher.channels):
            raise UserError(
                f"{self.path}: original_teacher: '{original.source}' makes {original.channels}x{original.resolution}px images, the "
                f"teacher {teacher.channels}x{teacher.resolution}px"
            )
        options = self.method_options
        if getattr(options, "warm_start", ()) and self.sampler.name == "nsga2":
            raise UserError(
                f"{self.path}: method_options.warm_start: recipe trials hold no Optuna parameters, which NSGA-II's crossover "
                "needs from every trial; use sampler tpe or random"
            )
        if self.pruner.enabled and not options.reports_rungs:
            raise UserError(f"{self.path}: pruner.name: method {self.method} reports no intermediate scores; use pruner: {{name: none}}")
        options.check_against(self.method_settings, teacher, original)

    def _check_classes(self, original: Teacher) -> None:
        """A class-conditional teacher's prompt files name its classes, and it has no negative prompt."""
        e, classes = self.evaluation, original.classes
        if not e.prompts:
            raise UserError(
                f"{self.path}: prompts.eval: required for a class-conditional teacher (a file of the classes FID is measured on, "
                "an id or a class name per line)"
            )
        if e.sampling.negative_prompt:
            raise UserError(f"{self.path}: sampling.negative_prompt: a class-conditional teacher has none (its null class is the negative)")
        for key, names in (("eval", e.prompts), ("train", self.train_prompts)):
            try:
                [classes.class_id(name) for name in names]
            except UserError as exc:
                raise UserError(f"{self.path}: prompts.{key}: {exc}") from None


def load_study_config(path: str | Path) -> StudyConfig:
    """Read and validate a study YAML file.

    Raises:
        UserError: one line naming the file and the key.
    """
    path = Path(path)
    data = load_yaml(path, what="study config")
    if isinstance(data, dict) and data.get("fid") == NO_FID:  # fid: none
        data = {**data, "fid": {"features": NO_FID}}
    top = Section(data, file=path)
    base = path.resolve().parent
    names = ("sampler", "budgets", "sampling", "fid", "prompts", "execution", "pruner")
    sections: dict[str | None, Section] = {None: top, **{name: top.section(name) for name in names}}
    method = top.take("method", str, choices=sorted(METHOD_OPTIONS))
    objectives = _objectives(top, path)
    train, evaluate = _prompt_files(sections["prompts"], base)
    evaluation = read_settings(Evaluation, sections, base=base, prompts=evaluate, seed=top.take("seed", int, 0))
    config = read_settings(
        StudyConfig,
        sections,
        path=str(path),
        method=method,
        teacher=_teacher(top, "teacher", base, required=True),
        original_teacher=_teacher(top, "original_teacher", base),
        search_space=_search_space(top, base),
        objectives=objectives,
        evaluation=_with_alignment(evaluation, objectives, top),
        train_prompts=train,
        method_options=read_options(METHOD_OPTIONS[method], top.take("method_options", dict, {}), file=str(path)),
    )
    for section in sections.values():
        section.done()
    if list(config.pruner.rungs) != sorted(config.pruner.rungs):
        raise sections["pruner"].error("pruner.rungs", list(config.pruner.rungs), "must be increasing")
    dataset = config.evaluation.fid_dataset
    if dataset and dataset.startswith("folder:"):
        config = replace(config, evaluation=replace(config.evaluation, fid_dataset="folder:" + resolve_path(base, dataset[7:])))
    e = config.evaluation
    if not e.measures_fid:
        if TrialAttr.FID in [o.name for o in config.objectives] or "objectives" not in top.data:
            raise top.error(
                "objectives", [o.name for o in config.objectives], "with fid: none, name objectives without fid (macs, clip_score)"
            )
        if e.fid_interval:
            raise top.error("fid.interval", True, "an interval of FID needs FID (fid: none measures none)")
    if config.dtype != "float32" and method != "dipgo":
        raise top.error("dtype", config.dtype, "only method dipgo samples a reduced-precision teacher (the others train students)")
    return replace(config, name=config.study_name)


def _teacher(top: Section, key: str, base: Path, *, required: bool = False) -> str | None:
    raw = top.take(key, str) if required else top.take(key, str, None)
    if raw is None or raw in TEACHERS:
        return raw
    resolved = resolve_path(base, raw)
    if Path(resolved).is_absolute() and not Path(resolved).exists():
        raise top.error(
            key, raw, f"the folder {resolved} does not exist (a teacher is {', '.join(TEACHERS)}, a diffusers folder or a hub id org/name)"
        )
    return resolved


def _search_space(top: Section, base: Path) -> SearchSpace | TransformerSpace | SupernetSpace | None:
    raw = top.take("search_space", str, None)
    if raw is None:
        return None
    resolved = resolve_path(base, raw)
    if not Path(resolved).is_file():
        raise top.error("search_space", raw, f"the file {resolved} does not exist")
    return load_search_space(resolved)


def _objectives(top: Section, path: Path) -> tuple[Objective, ...]:
    raw = top.data.get("objectives", [{"name": "macs"}, {"name": "fid"}])
    top.take("objectives", list, [])
    if not isinstance(raw, list) or not raw:
        raise top.error("objectives", raw, "expected a non-empty list")
    objectives = []
    for i, item in enumerate(raw):
        section = Section({"name": item} if isinstance(item, str) else item, file=path, prefix=f"objectives[{i}]")
        name = section.take("name", str, choices=OBJECTIVES)
        objectives.append(Objective(name, section.take("direction", str, "minimize", choices=("minimize", "maximize"))))
        section.done()
    if len({o.name for o in objectives}) != len(objectives):
        raise top.error("objectives", [o.name for o in objectives], "repeats an objective")
    return tuple(objectives)


def _with_alignment(evaluation: Evaluation, objectives: tuple[Objective, ...], top: Section) -> Evaluation:
    """An alignment objective implies the alignment metric (and must agree with a named one)."""
    wanted = [o.name for o in objectives if o.name in ALIGNMENT_OBJECTIVES]
    if not wanted:
        return evaluation
    if evaluation.alignment not in (None, wanted[0]):
        raise top.error("prompts", evaluation.alignment, f"alignment is {evaluation.alignment} but the objectives name {wanted[0]}")
    return replace(evaluation, alignment=wanted[0])


def _prompt_files(section: Section, base: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``prompts: {train: FILE, eval: FILE, column: NAME}``: the prompts of both files."""
    from automl_diff.data import read_prompts

    column = section.take("column", str, None)
    read = []
    for key in ("train", "eval"):
        raw = section.take(key, str, None)
        file = None if raw is None else (base / Path(raw).expanduser()).resolve()
        read.append(() if file is None else read_prompts(file, column=column, where=f"{section.file}: {section.key(key)}"))
    return read[0], read[1]


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
