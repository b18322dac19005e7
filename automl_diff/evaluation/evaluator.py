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
from automl_diff.metrics.alignment import ClipScorer, prompt_hits, prompt_labels
from automl_diff.metrics.fid import FeatureExtractor, FeatureStats, ReferenceSet, frechet_distance, get_extractor, reference_set
from automl_diff.metrics.intervals import Interval, Kid, across_sets, fid_interval, kid, proportion_interval
from automl_diff.metrics.latency import sampler_rounds
from automl_diff.metrics.macs import count_macs
from automl_diff.metrics.stages import Stage
from automl_diff.models.loading import Teacher
from automl_diff.models.text import text_length
from automl_diff.records import TrialAttr
from automl_diff.sampling import Prompts
from automl_diff.zoo import JUDGES, PromptJudge

__all__ = ["Evaluator", "ModelMetrics", "SampleSet"]


@dataclass(frozen=True)
class SampleSet:
    """One set of evaluation images, reduced: their feature statistics (and features, where
    kept), their text alignment, and the first few images with their prompts."""

    stats: FeatureStats
    alignment: tuple[str, Interval] | None
    samples: torch.Tensor | None
    prompts: list[str] | None

    def fid(self, reference: tuple[np.ndarray, np.ndarray]) -> float:
        """FID of the set against reference statistics."""
        return frechet_distance(self.stats.mu, self.stats.sigma, *reference)


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
        fid: FID of ``fid_samples`` images against the dataset's reference statistics (None:
            ``fid: none``).
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
    fid: float | None
    latency: float
    fid_interval: Interval | None = None
    kid: Kid | None = None
    alignment: tuple[str, Interval] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The metrics as trial attributes (:class:`~automl_diff.records.TrialAttr`)."""
        data = {k: v for k, v in asdict(self).items() if k not in ("fid_interval", "kid", "alignment") and v is not None}
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
        if teacher.latent is not None:  # text prompts, or the classes a class-conditional teacher samples
            s = e.sampling
            self.prompts = teacher.latent.prompts(
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

    def sample_set(self, unet: nn.Module, *, seed: int, keep_features: bool = False, desc: str = "sampling") -> SampleSet:
        """``fid_samples`` images of ``unet`` from noise ``seed``, reduced batch by batch to their
        feature statistics and text alignment (one batch of images in memory at a time), with
        the first images for a grid: for a text-to-image teacher the first image of each of the
        first 16 prompts."""
        e = self.evaluation
        stats = FeatureStats(keep=keep_features)
        per = self.prompts.images_per_prompt if self.prompts is not None else 1
        wanted = [i * per for i in range(min(16, len(e.prompts)))] if self.prompts is not None else list(range(16))
        grid: list[torch.Tensor] = []
        hits, scores = 0, []
        batches = self.sampler.stream(
            unet, num_images=e.fid_samples, batch_size=e.fid_batch_size, seed=seed, progress=self.progress, desc=desc
        )
        for start, images in batches:
            grid += [images[i - start] for i in wanted if start <= i < start + len(images)]
            if self.labels is not None and self.judge is not None:
                hits += prompt_hits(images, self.labels[start : start + len(images)], self.judge)
            elif self._clip is not None and self.prompts is not None:
                scores += self._clip.scores(images, [e.prompts[self.prompts.prompt_of(start + i)] for i in range(len(images))])
            if e.measures_fid:
                stats.add(self.extractor(images))
            else:
                stats.count += len(images)
        alignment = None
        if self.labels is not None:
            alignment = ("prompt_accuracy", proportion_interval(hits, stats.count))
        elif self._clip is not None:
            alignment = ("clip_score", across_sets(scores))
        prompts = [e.prompts[self.prompts.prompt_of(i)] for i in wanted[: len(grid)]] if self.prompts is not None else None
        return SampleSet(stats, alignment, torch.stack(grid) if grid else None, prompts)

    def fid(self, unet: nn.Module, *, schedule: Schedule | None = None, desc: str = "sampling") -> float | None:
        """FID of ``fid_samples`` images of ``unet`` (lower is better), under ``schedule`` if given
        (None with ``fid: none``: the images are sampled for their text alignment alone)."""
        e = self.evaluation
        with _gated(unet, schedule):
            sampled = self.sample_set(unet, seed=e.seed, keep_features=e.fid_interval, desc=desc)
        self.last_samples, self.last_prompts = sampled.samples, sampled.prompts
        self.last_alignment = sampled.alignment
        self.last_features = sampled.stats.features if e.fid_interval else None
        return sampled.fid(self.reference) if e.measures_fid else None

    def stages(self, unet: nn.Module, *, per: str = "trial") -> list[Stage]:
        """What evaluating ``unet`` costs, as :class:`~automl_diff.metrics.stages.Stage` s: the
        model calls of the FID batches, their decoding and features, and the latency rounds
        (``per``: ``trial`` for each candidate, ``study`` for the teacher, measured once)."""
        e = self.evaluation
        batches, calls = -(-e.fid_samples // e.fid_batch_size), self.sampler.model_calls

        @torch.no_grad()
        def call(batch: int) -> None:
            self.sampler.first_step(unet, batch)

        @torch.no_grad()
        def reduce(batch: int) -> None:
            config, param = unet.config, next(unet.parameters())
            size = config.sample_size
            x = torch.randn(batch, config.in_channels, size, size, device=param.device, dtype=param.dtype)
            images = self.prompts.decode(x) if self.prompts is not None and self.prompts.decode is not None else x
            if e.measures_fid:
                self.extractor(images.float().clamp(-1, 1).cpu())

        who = "the teacher" if per == "study" else "a candidate"
        reduced = f"FID of {who}: a batch decoded{' and its features' if e.measures_fid else ''}"
        return [
            Stage(
                f"FID of {who}: one model call of a sampling batch", per, batches * calls, e.fid_batch_size, call, key=("call", id(unet))
            ),
            Stage(reduced, per, batches, e.fid_batch_size, reduce, key=("reduce", id(unet))),
            Stage(
                f"latency of {who}: one model call",
                per,
                (e.latency_repeats + 1) * calls,
                e.latency_batch_size,
                call,
                key=("call", id(unet)),
            ),
        ]

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
        steps = self.sampler.model_calls  # one per model call: PNDM makes one more than its steps
        calls = self.sampler.calls_per_step
        if schedule is None:
            cost = count_macs(unet, text_length=self.text_length)
            macs, macs_no_attention, trajectory = calls * cost.macs, calls * cost.macs_no_attention, calls * cost.macs * steps
            params = cost.params
        else:
            if schedule.steps != steps:
                raise UserError(
                    f"{self.where}: budgets.sampling_steps: the schedule has {schedule.steps} model calls "
                    f"({self.sampler.scheduler} at {self.sampler.steps} steps makes {steps})"
                )
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
