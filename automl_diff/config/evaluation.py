"""How every model of a study is measured: one frozen type for the study config's evaluation keys,
a benchmark preset's evaluation and the record a study keeps.

:class:`SamplingSettings` is the sampler every model of a study samples with (FID, latency, and
the sampler DiP-GO prunes); :class:`Evaluation` adds the FID, latency and text-alignment settings
and the evaluation prompts. A study config reads both from its ``budgets``, ``sampling``, ``fid``
and ``prompts`` sections (each field names its key); a run resolves what the teacher decides
(:meth:`Evaluation.resolved`: the FID dataset and features, the device) and stores the result as
the study's ``evaluation`` attribute (:meth:`Evaluation.to_record`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from automl_diff.config._reader import positive, setting
from automl_diff.metrics.alignment import ALIGNMENT_METRICS
from automl_diff.metrics.clip import CLIP_MODEL
from automl_diff.metrics.fid import FEATURE_EXTRACTORS
from automl_diff.models.loading import Teacher
from automl_diff.records import StudyAttr
from automl_diff.sampling import SCHEDULERS, Prompts, Sampler
from automl_diff.zoo import JUDGES, default_features

__all__ = ["Evaluation", "SamplingSettings", "recorded_sampler"]


def _at_least(minimum: float, what: str = "") -> Any:
    return lambda v: None if v >= minimum else (what or f"must be at least {minimum:g}")


@dataclass(frozen=True)
class SamplingSettings:
    """The sampler every model of a study runs (its FID, latency, and DiP-GO's pruner)."""

    scheduler: str = setting(
        "auto",
        section="sampling",
        choices=SCHEDULERS,
        doc="the diffusers scheduler (dpm: DPM-Solver++; pndm: PLMS, Stable Diffusion's default, one model call more than steps; "
        "flow: flow matching's Euler; auto: flow for a flow-matching teacher, else ddim)",
    )
    steps: int = setting(20, section="budgets", key="sampling_steps", check=positive, doc="denoising steps of every sampler")
    eta: float = setting(0.0, section="sampling", doc="DDIM's stochasticity (0: deterministic)")
    guidance_scale: float = setting(
        7.5,
        section="sampling",
        check=_at_least(1),
        doc="text-to-image: classifier-free guidance, both halves in one UNet call (1: the conditional half alone)",
    )
    negative_prompt: str = setting("", section="sampling", doc="text-to-image: the unconditional half's prompt")

    def sampler_for(self, teacher: Teacher, prompts: Prompts | None = None) -> Sampler:
        """This sampler on a teacher's noise schedule (with ``prompts``)."""
        return teacher.sampler(self.scheduler, self.steps, self.eta, prompts)


#: ``fid.features`` (or ``fid: none``) of an evaluation without FID.
NO_FID = "none"


@dataclass(frozen=True)
class Evaluation:
    """How every model of a study is measured: the config's evaluation keys, a preset's, the record.

    ``prompts``, ``seed``, ``device`` and ``dtype`` are not evaluation keys of their own: a study
    config's ``prompts.eval`` file, ``seed``, ``device`` and ``dtype`` set them.
    """

    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    fid_samples: int = setting(500, section="budgets", check=_at_least(2, "needs at least 2 images"), doc="images per FID")
    images_per_prompt: int = setting(1, section="budgets", check=positive, doc="text-to-image: consecutive evaluation images per prompt")
    latency_batch_size: int = setting(8, section="budgets", check=positive, doc="batch size latency is timed at")
    latency_repeats: int = setting(3, section="budgets", check=positive, doc="timed batches; latency is their median after a warm-up")
    fid_dataset: str | None = setting(
        None, section="fid", key="dataset", doc="FID reference: a built-in dataset or folder:PATH (default: the teacher's)"
    )
    fid_features: str | None = setting(
        None,
        section="fid",
        key="features",
        choices=[*sorted(FEATURE_EXTRACTORS), NO_FID],
        doc="FID feature space (default: the dataset's own, else inception); none, or fid: none, measures no FID (a CLIP-only "
        "evaluation, for prompts without reference images)",
    )
    fid_batch_size: int = setting(250, section="fid", key="batch_size", check=positive, doc="images per sampling batch of an FID")
    fid_interval: bool = setting(False, section="fid", key="interval", doc="record FID's 95% interval and KID on every trial")
    alignment: str | None = setting(
        None,
        section="prompts",
        choices=ALIGNMENT_METRICS,
        doc="text-to-image: the alignment metric every model is measured with (an alignment objective implies it)",
    )
    clip_model: str = setting(CLIP_MODEL, section="prompts", path=True, doc="the CLIP model of clip_score and clip features (a folder)")
    judge: str | None = setting(
        None, section="prompts", choices=sorted(JUDGES), doc="the built-in prompt judge of prompt_accuracy (default: the teacher's)"
    )
    prompts: tuple[str, ...] = ()
    seed: int = 0
    device: str | None = None
    dtype: str = "float32"

    @property
    def measures_fid(self) -> bool:
        """Whether models get an FID (not with ``fid: none``)."""
        return self.fid_features != NO_FID

    @property
    def text(self) -> bool:
        """Whether the evaluation samples prompts (a text-to-image teacher)."""
        return bool(self.prompts)

    def resolved(self, *, dataset: str | None, device: str, dtype: str) -> Evaluation:
        """The settings as a run measures with them: the FID dataset (``dataset``: the teacher's,
        where none is set), its feature space, the device and the teacher's precision."""
        if not self.measures_fid:
            return replace(self, device=device, dtype=dtype)
        fid_dataset = self.fid_dataset or dataset
        features = self.fid_features or (default_features(fid_dataset) if fid_dataset else None)
        return replace(self, fid_dataset=fid_dataset, fid_features=features, device=device, dtype=dtype)

    def to_record(self) -> dict[str, Any]:
        """The study attribute (JSON): flat keys, the sampler's among them."""
        data = {k: v for k, v in asdict(self).items() if k not in ("sampling", "prompts")}
        s = self.sampling
        data.update(
            scheduler=s.scheduler,
            sampling_steps=s.steps,
            eta=s.eta,
            eval_prompts=list(self.prompts),
            **({"guidance_scale": s.guidance_scale, "negative_prompt": s.negative_prompt} if self.text else {}),
        )
        return data

    @classmethod
    def from_record(cls, data: Mapping[str, Any] | None) -> Evaluation:
        """The settings a stored record holds (a key it lacks: the default)."""
        data = dict(data or {})
        keys = {f.name for f in fields(SamplingSettings)}
        flat = {"steps": data.pop("sampling_steps", None), **{k: data.pop(k, None) for k in keys - {"steps"}}}
        sampling = SamplingSettings(**{k: v for k, v in flat.items() if v is not None})
        prompts = tuple(data.pop("eval_prompts", None) or ())
        known = {f.name for f in fields(cls)} - {"sampling", "prompts"}
        return cls(sampling=sampling, prompts=prompts, **{k: v for k, v in data.items() if k in known and v is not None})


def recorded_sampler(attrs: Mapping[str, Any]) -> Sampler | None:
    """The sampler a study's models were evaluated with, from its user attributes: the teacher's
    noise schedule and the evaluation's sampling settings (None: the study recorded no schedule)."""
    schedule = attrs.get(StudyAttr.SCHEDULER_CONFIG)
    if not schedule:
        return None
    s = Evaluation.from_record(attrs.get(StudyAttr.EVALUATION)).sampling
    return Sampler(schedule, s.scheduler, s.steps, s.eta)
