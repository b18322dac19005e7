"""DiffNAS as a search method: block supernets, block-wise search, retraining swept by Optuna.

``prepare`` (once per study, cached across resumed runs):

1. builds one supernet per teacher block from the study's ``search_space`` (``family: supernet``),
2. trains them on the teacher's block inputs and outputs, recorded on ``(x_t, t)`` from the DKDM
   pool (data-free) or the dataset (``source``); the weights are cached in
   ``<output_dir>/<study>/diffnas_supernets.safetensors``,
3. scores block candidates on a fixed validation set by loss and cost (MACs, or with
   ``block_cost: latency`` their measured seconds at ``budgets.latency_batch_size`` on the study's
   device), in Optuna studies kept in the study's own storage: ``<study>/block/<block>`` per block
   (``search: local``) or ``<study>/global`` (``search: global``).

Each trial of the outer study then samples a tolerance (log scale) and, when
``retrain_iterations`` lists several budgets, a retraining budget; picks per block the cheapest
subnet within the tolerance; assembles the student with the supernets' weights; and retrains it
with the dynamic joint loss. Tolerances that select the same student at the same budget are pruned
as duplicates before any training.

Stacked on the export of another study (``teacher: path/to/export``), the supernets mirror and
mimic the blocks of that starting model, while the training inputs and the output term of the
joint loss come from the original teacher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from automl_diff.config._reader import positive
from automl_diff.config.search_space import SupernetSpace, load_search_space
from automl_diff.errors import UserError
from automl_diff.methods.base import Candidate, Method, require_range
from automl_diff.methods.diffnas.retrain import JOINT_SCHEDULES, JointLoss, JointWeight
from automl_diff.methods.diffnas.search import (
    BLOCK_COSTS,
    BlockInputs,
    BlockScore,
    GlobalScore,
    choose_global,
    choose_local,
    global_search,
    local_search,
    record_teacher_blocks,
    train_supernets,
)
from automl_diff.methods.diffnas.supernet import BlockChoice, BlockSupernet, assemble_student, build_supernets
from automl_diff.methods.dkdm.method import PoolOptions, TrainingInputs
from automl_diff.methods.training import fit
from automl_diff.models.loading import weights_digest

__all__ = ["DiffNAS", "DiffNASOptions"]

logger = logging.getLogger("automl_diff")


def _fraction(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be in [0, 1]"


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
    subnets_per_step: int = field(default=4, metadata={"check": lambda v: None if v >= 2 else "must be at least 2"})
    search_samples: int = field(default=256, metadata={"check": positive})
    block_trials: int = field(default=64, metadata={"check": lambda v: None if v >= 2 else "must be at least 2"})
    global_trials: int = field(default=200, metadata={"check": lambda v: None if v >= 2 else "must be at least 2"})
    block_cost: str = field(default="macs", metadata={"choices": BLOCK_COSTS})
    tolerance_low: float = field(default=0.01, metadata={"check": positive})
    tolerance_high: float = field(default=0.3, metadata={"check": positive})
    retrain_iterations: tuple[int, ...] = field(default=(), metadata={"check": lambda v: None if v >= 0 else "must be at least 0"})
    joint_schedule: str = field(default="linear", metadata={"choices": JOINT_SCHEDULES})
    joint_start: float = field(default=1.0, metadata={"check": _fraction})
    joint_end: float = field(default=0.0, metadata={"check": _fraction})
    data_weight: float = field(default=0.0, metadata={"check": lambda v: None if v >= 0 else "must be at least 0"})
    ema_decay: float = field(default=0.995, metadata={"check": lambda v: None if 0 <= v < 1 else "must be in [0, 1)"})


class DiffNAS(Method):
    """Block-wise NAS with distillation (DiffNAS)."""

    name = "diffnas"
    options_type = DiffNASOptions

    @classmethod
    def options_from(cls, config: Any) -> DiffNASOptions:
        options = super().options_from(config)
        require_range(config, options, "tolerance_low", "tolerance_high")
        if options.data_weight and options.source != "dataset":
            raise UserError(f"{config.path}: method_options.data_weight: needs source: dataset (got source: {options.source})")
        return options

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.config.search_space is None:
            raise UserError(f"{self.config.path}: search_space: required for method diffnas")
        unet = self.teacher.unet
        if getattr(unet.config, "cross_attention_dim", None) is not None:
            raise UserError(f"teacher '{self.teacher.source}': method diffnas supports unconditional UNet2DModel teachers")
        space = load_search_space(self.config.search_space)
        if not isinstance(space, SupernetSpace):
            raise UserError(f"{self.config.search_space}: family: method diffnas needs family supernet (per-block subnet choices)")
        space.validate_for(unet)
        self.space = space
        # (x_t, t) and output targets from the original teacher; block features from the starting model
        self.inputs = TrainingInputs(self.config, self.reference, self.options, device=self.device)
        self.supernets: dict[str, BlockSupernet] = {n: s.to(self.device) for n, s in build_supernets(unet, space).items()}
        self.block_scores: dict[str, list[BlockScore]] | None = None
        self.global_scores: list[GlobalScore] | None = None
        self.summary: dict[str, Any] = {}

    # -- prepare ---------------------------------------------------------------------------------
    def _key(self) -> str:
        o = self.options
        payload = {
            "supernet": [o.source, o.pool_size, o.pool_steps, o.pool_eta, o.supernet_iterations, o.supernet_lr, o.subnets_per_step],
            "space": Path(self.space.path).read_text(),
            "budgets": [self.config.budgets.batch_size],
            "seed": self.config.seed,
            "teacher": [self.teacher.source, weights_digest(self.teacher.unet)],
            "reference": [self.reference.source, weights_digest(self.reference.unet) if self.reference is not self.teacher else None],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _validation(self) -> dict[str, list[BlockInputs]]:
        """Teacher block inputs/outputs on a fixed set of ``(x_t, t)`` (a separate seed)."""
        batches = self.inputs.batches(self.config.seed + 7919)
        data: dict[str, list[BlockInputs]] = {n: [] for n in self.supernets}
        remaining = self.options.search_samples
        while remaining > 0:
            n = min(remaining, self.config.budgets.batch_size)
            x, t = batches(n)[:2]
            _, recorded = record_teacher_blocks(self.teacher.unet, x, t, list(self.supernets))
            for name, value in recorded.items():
                data[name].append(value)
            remaining -= n
        return data

    def prepare(self, workdir: Path | None = None, study: Any = None) -> None:
        from safetensors.torch import load_file, save_file

        key = self._key()
        cache = workdir / "diffnas_supernets.safetensors" if workdir is not None else None
        loaded = False
        if cache is not None and cache.is_file() and cache.with_suffix(".json").is_file():
            meta = json.loads(cache.with_suffix(".json").read_text())
            if meta.get("key") == key:
                state = load_file(str(cache), device=str(self.device))
                for name, supernet in self.supernets.items():
                    supernet.load_state_dict({k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")})
                self.summary = meta.get("summary", {})
                loaded = True
                logger.info("DiffNAS: reusing the supernets in %s", cache)
        if not loaded:
            o = self.options
            logger.info("DiffNAS: training %d block supernets (%d iterations, %d subnets per block and step)", len(self.supernets), o.supernet_iterations, o.subnets_per_step)
            start = time.perf_counter()
            losses = train_supernets(
                self.teacher.unet,
                self.supernets,
                self.inputs.batches(self.config.seed + 1),
                iterations=o.supernet_iterations,
                batch_size=self.config.budgets.batch_size,
                lr=o.supernet_lr,
                subnets_per_step=o.subnets_per_step,
                seed=self.config.seed,
                progress=self.progress,
            )
            tail = max(1, len(losses) // 10)
            self.summary = {
                "supernet_seconds": round(time.perf_counter() - start, 3),
                "supernet_loss_first": sum(losses[:tail]) / tail,
                "supernet_loss_last": sum(losses[-tail:]) / tail,
            }
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                state = {f"{n}.{k}": v.detach().contiguous() for n, s in self.supernets.items() for k, v in s.state_dict().items()}
                save_file(state, str(cache))
                cache.with_suffix(".json").write_text(json.dumps({"key": key, "summary": self.summary}) + "\n")
        for supernet in self.supernets.values():
            supernet.requires_grad_(False).eval()
        self._search(study, key)

    def _search(self, study: Any, key: str) -> None:
        import optuna

        if study is not None:
            storage, name = study._storage, study.study_name
        else:  # outside a study (Python API): an in-memory storage
            storage, name = optuna.storages.InMemoryStorage(), self.config.name
        start = time.perf_counter()
        data = self._validation()
        o = self.options
        cost = {"cost": o.block_cost, "latency_batch": self.config.budgets.latency_batch_size}
        if o.block_cost == "latency":  # scores measured at another batch size or device are not comparable
            key = f"{key}/latency@{self.config.budgets.latency_batch_size}/{self.device.type}"
        if o.search == "local":
            self.block_scores = local_search(self.supernets, data, storage=storage, study_name=name, key=key, max_trials=o.block_trials, seed=self.config.seed, **cost)
            evaluations = sum(len(v) for v in self.block_scores.values())
        else:
            self.global_scores = global_search(self.supernets, data, storage=storage, study_name=name, key=key, n_trials=o.global_trials, seed=self.config.seed, **cost)
            evaluations = len(self.global_scores) * len(self.supernets)
        self.summary.update(search=o.search, block_cost=o.block_cost, search_seconds=round(time.perf_counter() - start, 3), block_evaluations=evaluations)
        logger.info("DiffNAS: %s search scored %d block candidates in %.1f s", o.search, evaluations, time.perf_counter() - start)

    # -- trials ----------------------------------------------------------------------------------
    def suggest(self, trial: Any) -> dict[str, Any]:
        o = self.options
        params = {"tolerance": trial.suggest_float("tolerance", o.tolerance_low, o.tolerance_high, log=True)}
        if len(o.retrain_iterations) > 1:
            params["retrain_iterations"] = trial.suggest_categorical("retrain_iterations", list(o.retrain_iterations))
        return params

    def _iterations(self, params: dict[str, Any]) -> int:
        if "retrain_iterations" in params:
            return int(params["retrain_iterations"])
        if len(self.options.retrain_iterations) == 1:
            return int(self.options.retrain_iterations[0])
        return self.config.budgets.train_iterations

    def choose(self, tolerance: float) -> tuple[dict[str, BlockChoice], dict[str, float]]:
        """The block choices a tolerance selects, and their block losses."""
        if self.block_scores is None and self.global_scores is None:
            self.prepare()
        if self.block_scores is not None:
            chosen = choose_local(self.block_scores, tolerance, self.options.block_cost)
            return {n: s.choice for n, s in chosen.items()}, {n: s.loss for n, s in chosen.items()}
        best = choose_global(self.global_scores, tolerance, self.options.block_cost)
        return dict(best.choices), {"mean": best.loss}

    def fingerprint(self, trial: Any) -> str | None:
        params = self.suggest(trial)
        choices, _ = self.choose(params["tolerance"])
        payload = {"choices": {n: c.key for n, c in choices.items()}, "iterations": self._iterations(params)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def run_trial(self, trial: Any) -> Candidate:
        params = self.suggest(trial)
        choices, losses = self.choose(params["tolerance"])
        iterations = self._iterations(params)
        seed = self.config.seed + int(getattr(trial, "number", 0))
        torch.manual_seed(seed)
        student, config = assemble_student(self.teacher.unet, self.supernets, choices)
        o = self.options
        attrs: dict[str, Any] = {
            "block_choices": {n: c.key for n, c in choices.items()},
            "block_losses": losses,
            "retrain_iterations": iterations,
            "joint_schedule": o.joint_schedule,
            **self.summary,
        }
        if iterations > 0:
            weight = JointWeight(o.joint_schedule, o.joint_start, o.joint_end)
            reference = None if self.reference is self.teacher else self.reference.unet
            loss = JointLoss(self.teacher.unet, weight, iterations, data_weight=o.data_weight, reference=reference)
            result = fit(
                student.requires_grad_(True),
                self.inputs.batches(seed),
                iterations=iterations,
                batch_size=self.config.budgets.batch_size,
                lr=self.config.budgets.lr,
                ema_decay=o.ema_decay,
                progress=self.progress,
                desc=f"trial {getattr(trial, 'number', '-')} retraining",
                loss=loss,
            )
            student = result.model
            tail = max(1, len(result.losses) // 10)
            attrs.update(
                train_seconds=round(result.seconds, 3),
                train_loss_first=result.mean_loss(0, tail),
                train_loss_last=result.mean_loss(len(result.losses) - tail, len(result.losses)),
            )
        student.requires_grad_(False).eval()
        return Candidate(student, config, attrs)

