"""One evaluation for every model of a study: params, MACs, FID and latency, measured the same way.

For a text-to-image teacher every model samples the study's evaluation prompts with the teacher's
frozen text encoder, guidance and VAE (:class:`~automl_diff.sampling.Prompts`); MACs count what
a guided step executes per image (both halves of guidance), and latency includes the decoding.
"""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from automl_diff.config.evaluation import Evaluation
from automl_diff.errors import UserError
from automl_diff.gating import Schedule, apply_schedule, unit_costs
from automl_diff.metrics.alignment import ClipScorer, prompt_accuracy, prompt_labels
from automl_diff.metrics.fid import FeatureExtractor, ReferenceSet, fid_from_features, get_extractor, reference_set
from automl_diff.metrics.intervals import Interval, Kid, fid_interval, kid
from automl_diff.metrics.latency import sampler_rounds
from automl_diff.metrics.macs import count_macs
from automl_diff.models.loading import Teacher
from automl_diff.models.text import text_length
from automl_diff.records import TrialAttr
from automl_diff.sampling import Prompts
from automl_diff.zoo import JUDGES, PromptJudge

__all__ = ["Evaluator", "ModelMetrics"]


@dataclass(frozen=True)
class ModelMetrics:
    """Metrics of one model (all lower is better).

    Attributes:
        params: parameter count.
        macs: MACs of one denoising step per image (one UNet forward pass, two with
            classifier-free guidance; attention matmuls included); with a DiP-GO schedule, the
            mean over the steps of the trajectory.
        macs_no_attention: the same without the attention matmuls.
        trajectory_macs: MACs of one image's whole sampling trajectory (``sampling_steps`` calls).
        fid: FID of ``fid_samples`` images against the dataset's reference statistics.
        latency: median seconds per image for ``sampling_steps`` denoising steps.
        fid_interval: FID's 95% interval (``fid.interval: true``; half-sampling, see
            :mod:`automl_diff.metrics.intervals`).
        kid: KID with its standard deviation over subsets (with ``fid.interval: true``).
        alignment: the text alignment of the FID images with their prompts (``prompts.alignment``:
            ``prompt_accuracy`` or ``clip_score``, higher is better), with its 95% interval.
    """

    params: int
    macs: int
    macs_no_attention: int
    trajectory_macs: int
    fid: float
    latency: float
    fid_interval: Interval | None = None
    kid: Kid | None = None
    alignment: tuple[str, Interval] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The metrics as trial attributes (:class:`~automl_diff.records.TrialAttr`)."""
        data = {k: v for k, v in asdict(self).items() if k not in ("fid_interval", "kid", "alignment")}
        if self.alignment is not None:
            name, a = self.alignment  # prompt_accuracy, prompt_accuracy_low, prompt_accuracy_high; clip_score, ...
            data.update({name: a.value, f"{name}_low": a.low, f"{name}_high": a.high})
        if self.fid_interval is not None:
            data.update({TrialAttr.FID_LOW: self.fid_interval.low, TrialAttr.FID_HIGH: self.fid_interval.high})
        if self.kid is not None:
            data.update({TrialAttr.KID: self.kid.mean, TrialAttr.KID_STD: self.kid.std})
        return data


class Evaluator:
    """Evaluates models the way a study's :class:`~automl_diff.config.Evaluation` says, against
    the study's (original) teacher.

    Every model is sampled from the same initial noise (``evaluation.seed``) with the same
    sampler (and, for a text-to-image teacher, the same prompts, guidance and VAE), so FID and
    latency compare like with like. The settings are checked against the teacher beforehand
    (:meth:`~automl_diff.config.StudyConfig.check_against`).

    Args:
        evaluation: the study's evaluation settings.
        teacher: the teacher models are measured against (its noise schedule, its pipeline's
            parts, its FID dataset and prompt judge where the settings name none).
        device: where models sample.
        where: what errors name (the config file, or a benchmark preset).
        progress: show progress bars.

    Raises:
        UserError: the CLIP model of ``clip_score`` is not on this machine.
    """

    def __init__(
        self, evaluation: Evaluation, teacher: Teacher, *, device: str | torch.device, where: str = "study", progress: bool = False
    ) -> None:
        self.device = torch.device(device)
        self.where = where
        #: The settings with what the teacher decides filled in (the record a study keeps).
        self.evaluation = e = evaluation.resolved(dataset=teacher.dataset, device=str(self.device), dtype=evaluation.dtype)
        self.text = teacher.text
        self.prompts: Prompts | None = None
        #: The class each FID image's prompt names, and the judge that reads it (``prompt_accuracy``).
        self.labels: list[int] | None = None
        self.judge: PromptJudge | None = None
        self._clip: ClipScorer | None = None
        if teacher.text is not None:
            s = e.sampling
            self.prompts = teacher.text.prompts(
                e.prompts, negative_prompt=s.negative_prompt, guidance_scale=s.guidance_scale, images_per_prompt=e.images_per_prompt
            )
            if e.alignment == "prompt_accuracy":
                self.judge = JUDGES[e.judge or teacher.judge]
                labels = prompt_labels(e.prompts, self.judge, where=f"{where}: prompts.eval")
                self.labels = [labels[self.prompts.prompt_of(i)] for i in range(e.fid_samples)]
            elif e.alignment == "clip_score":
                try:
                    self._clip = ClipScorer(e.clip_model, device=self.device)
                except UserError as exc:
                    raise UserError(f"{where}: prompts.alignment: {exc}") from None
        #: How every model samples: the study's scheduler, steps and eta, the evaluation prompts.
        self.sampler = e.sampling.sampler_for(teacher, self.prompts)
        self.dataset = e.fid_dataset
        self.features = e.fid_features
        self.resolution = teacher.resolution
        self.channels = teacher.channels
        self.progress = progress
        self._extractor: FeatureExtractor | None = None
        #: The first images of the last FID run (the same noise for every model): for sample grids;
        #: for a text-to-image teacher the first image of each prompt, and those prompts.
        self.last_samples: torch.Tensor | None = None
        self.last_prompts: list[str] | None = None
        #: The features of the last FID run's images (row ``i``: the image from noise ``i``).
        self.last_features: np.ndarray | None = None
        #: The last FID run's text alignment (``prompts.alignment``): its name and interval.
        self.last_alignment: tuple[str, Interval] | None = None
        self._reference: ReferenceSet | None = None

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = get_extractor(self.features, device=self.device, clip_model=self.evaluation.clip_model)
        return self._extractor

    @property
    def reference_set(self) -> ReferenceSet:
        """The dataset's features and statistics (computed once, cached on disk)."""
        if self._reference is None:
            self._reference = reference_set(self.dataset, self.extractor, resolution=self.resolution, channels=self.channels)
        return self._reference

    @property
    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        """The dataset's feature mean and covariance."""
        return self.reference_set.statistics

    def fid(self, unet: nn.Module, *, schedule: Schedule | None = None, desc: str = "sampling") -> float:
        """FID of ``fid_samples`` images of ``unet`` (lower is better), under ``schedule`` if given."""
        e = self.evaluation
        with _gated(unet, schedule):
            images = self.sampler.sample(
                unet, num_images=e.fid_samples, batch_size=e.fid_batch_size, seed=e.seed, progress=self.progress, desc=desc
            )
        if self.prompts is not None:  # one image per prompt, so the grid shows what each prompt gives
            per = self.prompts.images_per_prompt
            first = [i * per for i in range(min(16, len(e.prompts))) if i * per < len(images)]
            self.last_samples = images[first].clone()
            self.last_prompts = [e.prompts[self.prompts.prompt_of(i)] for i in first]
        else:
            self.last_samples = images[:16].clone()
        self.last_alignment = self.alignment(images)
        self.last_features = self.extractor(images)
        return fid_from_features(self.last_features, self.reference)

    def alignment(self, images: torch.Tensor) -> tuple[str, Interval] | None:
        """The text alignment of ``images`` (an evaluation's, in order) with their prompts:
        ``(metric, interval)``, or None where the study measures none."""
        if self.labels is not None and self.judge is not None:
            return "prompt_accuracy", prompt_accuracy(images, self.labels, self.judge)
        if self._clip is not None and self.prompts is not None:
            prompts = [self.evaluation.prompts[self.prompts.prompt_of(i)] for i in range(len(images))]
            return "clip_score", self._clip(images, prompts)
        return None

    def fid_interval(self, fid: float) -> Interval:
        """The 95% interval of ``fid``, the FID of the last run (:func:`~automl_diff.metrics.intervals.fid_interval`)."""
        return fid_interval(fid, self.last_features, *self.reference, seed=self.evaluation.seed)

    def kid(self) -> Kid:
        """KID of the last run's images against the dataset's features."""
        return kid(self.last_features, self.reference_set.features, seed=self.evaluation.seed)

    @property
    def text_length(self) -> int:
        """Tokens of the text conditioning MACs are counted with (the tokenizer's; CLIP's 77)."""
        return text_length(self.text)

    def macs(self, unet: nn.Module) -> int:
        """MACs of one denoising step of ``unet`` per image, as :meth:`evaluate` counts them."""
        return self.sampler.calls_per_step * count_macs(unet, text_length=self.text_length).macs

    def evaluate(self, unet: nn.Module, *, schedule: Schedule | None = None, desc: str = "sampling") -> ModelMetrics:
        """All metrics of one model, sampled under a DiP-GO ``schedule`` if given."""
        e = self.evaluation
        steps = self.sampler.steps
        calls = self.sampler.calls_per_step
        if schedule is None:
            cost = count_macs(unet, text_length=self.text_length)
            macs, macs_no_attention, trajectory = calls * cost.macs, calls * cost.macs_no_attention, calls * cost.macs * steps
            params = cost.params
        else:
            if schedule.steps != steps:
                raise UserError(f"{self.where}: budgets.sampling_steps: the schedule has {schedule.steps} steps (got {steps})")
            costs = unit_costs(unet, schedule.units, text_length=self.text_length)
            trajectory = calls * schedule.trajectory_macs(costs)
            macs = round(trajectory / steps)
            macs_no_attention = round(calls * schedule.trajectory_macs(costs, attention=False) / steps)
            params = costs.total.params
        fid = self.fid(unet, schedule=schedule, desc=desc)
        with _gated(unet, schedule):
            rounds = sampler_rounds({"model": unet}, self.sampler, batch_size=e.latency_batch_size, repeats=e.latency_repeats)
        latency = statistics.median(rounds["model"])
        extra: dict[str, Any] = {"alignment": self.last_alignment}
        if e.fid_interval:
            extra.update(fid_interval=self.fid_interval(fid), kid=self.kid())
        return ModelMetrics(params, macs, macs_no_attention, trajectory, fid, latency, **extra)


def _gated(unet: nn.Module, schedule: Schedule | None) -> Any:
    """A context in which ``unet`` samples under ``schedule`` (nothing to do for None)."""
    return contextlib.nullcontext() if schedule is None else apply_schedule(unet, schedule)
