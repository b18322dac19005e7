"""What automl_diff keeps in a study: attribute names, the evaluation record, and the folders.

Every study and trial user attribute automl_diff writes or reads is named here, once, so that the
runners, the methods, analysis, export and the dashboard notes agree on them, and a study written
by one version stays readable by the next. Trial folders live under
``<output_dir>/<study>/trial_<n>/`` (:class:`StudyFolder`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

__all__ = ["METRICS", "BlockSearchAttr", "StudyAttr", "StudyFolder", "TrialAttr", "stable_key"]


class StudyAttr:
    """Study user attributes."""

    #: Objective names, in order (a resumed run must optimise the same ones).
    OBJECTIVES: Final = "objectives"
    #: The method's registry name.
    METHOD: Final = "method"
    #: The model the study compresses, as the config names it.
    TEACHER: Final = "teacher"
    #: The study config file, and its search space file.
    CONFIG_FILE: Final = "config_file"
    SEARCH_SPACE: Final = "search_space"
    #: The original teacher's metrics (:data:`METRICS`), measured once per study; written last, so a
    #: study that has it has every other start-up attribute too.
    TEACHER_METRICS: Final = "teacher_metrics"
    #: The starting model's metrics, when the study starts from another study's export (stacking).
    START_METRICS: Final = "start_metrics"
    #: The teacher's scheduler config, used to export pipelines.
    SCHEDULER_CONFIG: Final = "scheduler_config"
    #: The original teacher (``digits``, a folder or a hub id).
    ORIGINAL_TEACHER: Final = "original_teacher"
    #: The studies and trials that made the starting model, oldest first (empty for a pretrained teacher).
    LINEAGE: Final = "lineage"
    #: How every model of the study is measured (:meth:`automl_diff.config.Evaluation.to_record`).
    EVALUATION: Final = "evaluation"
    #: The study's artifact store: a folder or ``s3://bucket/prefix`` (weights, sample grids and a
    #: text-to-image teacher's pipeline, for every host; :mod:`automl_diff.runners.artifacts`).
    ARTIFACT_STORE: Final = "artifact_store"
    #: The artifact store folder of studies written before :attr:`ARTIFACT_STORE` (read only).
    ARTIFACT_DIR: Final = "artifact_dir"
    #: The folder of the latest Ray Tune experiment (resumed when it was interrupted).
    RAY_EXPERIMENT: Final = "ray_experiment"
    #: A text-to-image teacher's pipeline: ``{"class": ..., "folder": ...}``, the folder its VAE,
    #: text encoder and tokenizer are exported from (absent for an unconditional teacher), and
    #: ``"artifact"``: the id of its copy without the UNet in the artifact store.
    PIPELINE: Final = "pipeline"


class TrialAttr:
    """Trial user attributes the runner records for every trial, whatever its method. Each method
    names the facts it adds in a class of its own (``DKDMAttr``, ``DiffNASAttr``, ``DiPGOAttr``, and
    :class:`automl_diff.methods.base.TrainAttr` for what training records)."""

    # metrics of the trial's model (lower is better), as the evaluator measures them
    PARAMS: Final = "params"
    MACS: Final = "macs"
    MACS_NO_ATTENTION: Final = "macs_no_attention"
    TRAJECTORY_MACS: Final = "trajectory_macs"
    FID: Final = "fid"
    LATENCY: Final = "latency"
    # with ``fid.interval: true``: FID's 95% interval, KID and its standard deviation over subsets
    FID_LOW: Final = "fid_low"
    FID_HIGH: Final = "fid_high"
    KID: Final = "kid"
    KID_STD: Final = "kid_std"
    # text-to-image teachers: how well images follow their prompts (higher is better), its interval
    PROMPT_ACCURACY: Final = "prompt_accuracy"
    PROMPT_ACCURACY_LOW: Final = "prompt_accuracy_low"
    PROMPT_ACCURACY_HIGH: Final = "prompt_accuracy_high"
    CLIP_SCORE: Final = "clip_score"
    CLIP_SCORE_LOW: Final = "clip_score_low"
    CLIP_SCORE_HIGH: Final = "clip_score_high"
    # against the teacher
    SPEEDUP: Final = "speedup"
    MACS_REDUCTION: Final = "macs_reduction"
    # what the runner keeps
    WEIGHTS: Final = "weights"
    #: The weights folder's copy in the study's artifact store (a tar file's artifact id).
    WEIGHTS_ARTIFACT: Final = "weights_artifact"
    MODEL_CONFIG: Final = "model_config"
    SCHEDULE: Final = "schedule"
    SCHEDULE_FILE: Final = "schedule_file"
    SAMPLES: Final = "samples"
    SAMPLES_ARTIFACT: Final = "samples_artifact"
    #: Text-to-image trials: the prompt of each image of the sample grid, in grid order.
    SAMPLE_PROMPTS: Final = "sample_prompts"
    FINGERPRINT: Final = "fingerprint"
    #: A known recipe the study enqueued as a warm start (``deepcache:5``): the trial makes it.
    RECIPE: Final = "recipe"
    DUPLICATE_OF: Final = "duplicate_of"
    FAIL_REASON: Final = "fail_reason"
    #: The Ray node a trial ran on (``{"id", "ip", "host"}``; Ray backend only).
    NODE: Final = "ray_node"
    # early stopping: the score at each rung reached (``{"0": 0.031, ...}``), the training
    # iteration of each rung, the MACs the pruner ranked the trial by, and why it was stopped
    RUNG_SCORES: Final = "rung_scores"
    RUNG_ITERATIONS: Final = "rung_iterations"
    RUNG_MACS: Final = "rung_macs"
    PRUNED_AT_RUNG: Final = "pruned_at_rung"
    PRUNE_REASON: Final = "prune_reason"


class BlockSearchAttr:
    """Attributes of DiffNAS's block searches, the studies ``<study>/block/<block>`` and ``<study>/global``."""

    #: Study: the key of the supernets its candidates were scored with (another key: another search).
    SUPERNET: Final = "supernet"
    #: Trial: the candidate's key (``layers=1,width=0.5,...``), and its costs.
    CANDIDATE: Final = "candidate"
    MACS: Final = TrialAttr.MACS
    LATENCY: Final = TrialAttr.LATENCY
    #: Trial of the global search: seconds since the search started.
    SECONDS: Final = "seconds"


#: The metrics every evaluated model has, in the order tables show them.
METRICS: Final = (
    TrialAttr.PARAMS,
    TrialAttr.MACS,
    TrialAttr.MACS_NO_ATTENTION,
    TrialAttr.TRAJECTORY_MACS,
    TrialAttr.FID,
    TrialAttr.LATENCY,
)


@dataclass(frozen=True)
class StudyFolder:
    """``<output_dir>/<study>``: trial folders, method caches, the artifact store, Ray experiments."""

    path: Path

    @classmethod
    def of(cls, output_dir: str | Path, study_name: str) -> StudyFolder:
        return cls(Path(output_dir).resolve() / study_name)

    def trial(self, number: int) -> Path:
        """A trial's folder: its weights (``unet/``), ``samples.png`` and ``schedule.json``."""
        return self.path / f"trial_{number}"

    @staticmethod
    def weights(trial_folder: Path) -> Path:
        return trial_folder / "unet"

    @staticmethod
    def samples(trial_folder: Path) -> Path:
        return trial_folder / "samples.png"

    @staticmethod
    def schedule(trial_folder: Path) -> Path:
        return trial_folder / "schedule.json"

    @property
    def artifacts(self) -> Path:
        return self.path / "artifacts"

    @property
    def ray(self) -> Path:
        return self.path / "ray"


def stable_key(payload: Any, *, length: int = 16) -> str:
    """A short SHA-256 of ``payload`` as sorted JSON (non-JSON values by ``str``): equal payloads
    get equal keys, across processes and runs. Cache keys and fingerprints use it."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
