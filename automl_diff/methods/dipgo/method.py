"""DiP-GO as a study method: one pruner optimisation per study, Optuna tunes the post-processing.

``prepare`` trains the pruner network once (cached under the study's output folder, so a resumed
study reuses it); every trial then turns the same gate scores into a :class:`Schedule`, by default
the paper's way: the highest-scoring gates that fit the trial's budget, a fraction of the full
sampler's trajectory cost in MACs or measured seconds (:mod:`~automl_diff.methods.dipgo.budget`;
``postprocess: threshold`` binarises at a tuned threshold instead). The runner evaluates the
teacher under that schedule (trajectory MACs, FID and measured latency). Trials whose schedules
coincide are pruned as duplicates.

Stacked on the export of another study (``teacher: path/to/export``), the pruner gates the
starting model (a DiffNAS or DKDM student) and its consistency target is that model's full
sampler, as in the paper; the runner measures FID, MACs and speedup against the original teacher.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Final

import numpy as np

from automl_diff.config.options import DiPGOOptions, schedule_recipe
from automl_diff.errors import UserError
from automl_diff.gating import Schedule, model_fingerprint, prunable_units, unit_costs
from automl_diff.methods.base import Candidate, CardSection, Method, Rungs, recipe_of
from automl_diff.methods.dipgo.budget import gates_within_budget
from automl_diff.methods.dipgo.optimise import OBJECTIVE_VERSION, optimise_pruner, pruner_stages
from automl_diff.methods.dipgo.weights import UnitWeights
from automl_diff.metrics.macs import UnitCosts
from automl_diff.metrics.stages import Stage
from automl_diff.models.loading import weights_digest
from automl_diff.models.text import text_length
from automl_diff.records import TrialAttr, stable_key
from automl_diff.sampling import Sampler, resolve_scheduler

__all__ = ["BUDGET", "THRESHOLD", "DiPGO", "DiPGOAttr"]


class DiPGOAttr:
    """Trial attributes of a DiP-GO trial."""

    THRESHOLD: Final = "threshold"
    #: The trial's budget: the trajectory cost its schedule may have, a fraction of the full sampler's.
    BUDGET: Final = "budget"
    #: The schedule's trajectory cost over the full sampler's, in the unit the budget counts.
    COST_RATIO: Final = "schedule_cost_ratio"
    #: The share of the units' computations the schedule keeps.
    COMPUTED_FRACTION: Final = "computed_fraction"
    GRANULARITY: Final = "granularity"
    TARGET_MACS_RATIO: Final = "target_macs_ratio"
    PRUNER_UNIT_COST: Final = "pruner_unit_cost"
    PRUNER_UNIT_SECONDS: Final = "pruner_unit_seconds"
    PRUNER_FORWARD_SECONDS: Final = "pruner_forward_seconds"
    PRUNER_SECONDS: Final = "pruner_seconds"
    PRUNER_CONSISTENCY: Final = "pruner_consistency"
    PRUNER_EXPECTED_RATIO: Final = "pruner_expected_ratio"


#: The Optuna parameter of a DiP-GO trial with ``postprocess: threshold``: the threshold that
#: binarises the pruner's scores; with ``postprocess: budget``, :data:`BUDGET`.
THRESHOLD = DiPGOAttr.THRESHOLD
BUDGET = DiPGOAttr.BUDGET

logger = logging.getLogger("automl_diff")

#: Options that only turn the scores into schedules: they leave the pruner's training alone.
_POSTPROCESS_OPTIONS = ("postprocess", "budget_low", "budget_high", "threshold_low", "threshold_high", "threshold_log")


class DiPGO(Method):
    """Timestep-aware block pruning (DiP-GO) of the teacher itself: no weights change."""

    options_type = DiPGOOptions
    product = "DiP-GO schedule"

    @classmethod
    def card_section(cls, attrs: Mapping[str, Any], *, steps: int, first_step: bool) -> CardSection:
        return CardSection(
            f"""This model samples with a DiP-GO gate schedule (`schedule.json`, {steps} steps): at each step some
blocks reuse their output from an earlier step instead of computing. MACs per UNet call are the mean
over the trajectory. The schedule is for {steps} steps exactly.""",
            (
                "from automl_diff import Schedule, apply_schedule  # the schedule needs automl_diff; the pipeline alone does not",
                'apply_schedule(pipe, Schedule.load("path/to/this/folder/schedule.json"))',
                "# compiled: apply_schedule(pipe, schedule, compile=True), or apply it after pipe.unet = torch.compile(pipe.unet)",
                "# plan_graphs=K: the first step and the K-1 plans most steps share get graphs of their own (faster steps, longer warm-up)",
            ),
        )

    @classmethod
    def lineage_facts(cls, attrs: Mapping[str, Any]) -> dict[str, Any]:
        schedule = attrs.get(TrialAttr.SCHEDULE) or {}
        steps, units = schedule.get("steps"), len(schedule.get("units", ()))
        facts = {TrialAttr.SCHEDULE: {"steps": steps, "units": units, DiPGOAttr.COMPUTED_FRACTION: attrs.get(DiPGOAttr.COMPUTED_FRACTION)}}
        return facts | super().lineage_facts(attrs)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        unet = self.teacher.unet
        self.units = tuple(prunable_units(unet, self.options.granularity))
        self.costs: UnitCosts | None = None
        self.weights: UnitWeights | None = None
        self.scores: np.ndarray | None = None
        self.summary: dict[str, Any] = {}
        self.weights_dir: str | None = self.teacher.weights_dir
        self._weights_digest: str | None = None

    @property
    def steps(self) -> int:
        return self.settings.sampling.steps

    def _cache_key(self) -> str:
        st = self.settings
        b = st.budgets
        payload = {
            "objective": OBJECTIVE_VERSION,
            "options": {k: v for k, v in asdict(self.options).items() if k not in _POSTPROCESS_OPTIONS},
            "budgets": [b.train_iterations, b.batch_size, b.lr, st.sampling.steps],
            "sampling": [resolve_scheduler(self.teacher.scheduler_config, st.sampling.scheduler), st.sampling.eta],
            "text": self._text_key(),
            "seed": st.seed,
            "teacher": self.teacher.source,
            "weights": self._digest(),
            "model": model_fingerprint(self.teacher.unet),
        }
        return stable_key(payload)

    def _text_key(self) -> list[Any] | None:
        """What the pruner's trajectories are conditioned on (None: an unconditional teacher)."""
        if self.teacher.latent is None:
            return None
        s = self.settings.sampling
        return [list(self.settings.train_prompts), s.guidance_scale, s.negative_prompt]

    def sampler(self) -> Sampler:
        """The study's sampler on the training prompts (the reference trajectories take them in
        turn, guided as the study guides); the pruner compares final latents (:meth:`Sampler.denoise`)."""
        s = self.settings.sampling
        parts = self.teacher.latent  # text prompts, or a class-conditional teacher's classes
        prompts = None
        if parts is not None:
            prompts = parts.prompts(self.settings.train_prompts, negative_prompt=s.negative_prompt, guidance_scale=s.guidance_scale)
        return s.sampler_for(self.teacher, prompts)

    def prepare(self, workdir: Path | None = None, *, storage: Any = None, study_name: str | None = None) -> None:
        self.costs = unit_costs(self.teacher.unet, self.units, text_length=text_length(self.teacher.text))
        cache = workdir / "dipgo_pruner.json" if workdir is not None else None
        key = self._cache_key()
        if cache is not None and cache.is_file():
            data = json.loads(cache.read_text())
            if data.get("key") == key and tuple(data.get("units", ())) == self.units and "weights" in data:
                self.scores = np.asarray(data["scores"], dtype=np.float64)
                self.summary = data.get("summary", {})
                w = data["weights"]
                self.weights = UnitWeights(w["kind"], w["total"], w["units"], self.costs.graph, self.costs.idle_free)
                logger.info("DiP-GO: reusing the pruner scores in %s", cache)
        if self.scores is None:
            b = self.settings.budgets
            o = self.options
            self.weights = weights = self._weights()
            logger.info(
                "DiP-GO: optimising the pruner (%d units x %d steps, target %.2f of the trajectory %s, %d iterations)",
                len(self.units),
                self.sampler().model_calls,
                o.target_macs_ratio,
                "MACs" if o.unit_cost == "macs" else "time",
                b.train_iterations,
            )
            result = optimise_pruner(
                self.teacher.unet,
                self.sampler(),
                units=self.units,
                costs=weights,
                options=o,
                iterations=b.train_iterations,
                batch_size=b.batch_size,
                lr=b.lr,
                seed=self.settings.seed + 1000,  # training noise differs from the FID noise (seed)
                progress=self.progress,
            )
            self.scores = result.scores
            self.summary = {
                DiPGOAttr.PRUNER_SECONDS: round(result.seconds, 2),
                DiPGOAttr.PRUNER_CONSISTENCY: result.final_consistency,
                DiPGOAttr.PRUNER_EXPECTED_RATIO: result.final_ratio,
                DiPGOAttr.PRUNER_UNIT_COST: o.unit_cost,
            }
            if o.unit_cost == "latency":
                self.summary[DiPGOAttr.PRUNER_UNIT_SECONDS] = {name: round(v, 6) for name, v in weights.units.items()}
                self.summary[DiPGOAttr.PRUNER_FORWARD_SECONDS] = round(weights.total, 6)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                saved = {"kind": weights.kind, "total": weights.total, "units": dict(weights.units)}
                data = {"key": key, "units": list(self.units), "scores": self.scores.tolist(), "summary": self.summary, "weights": saved}
                cache.write_text(json.dumps(data) + "\n")
        stacked = self.stacked
        if workdir is not None and (self.weights_dir is None or stacked):
            # a hub teacher, or another study's export that may be overwritten later: the trials'
            # schedules point at one local copy of exactly the weights they were scored on
            folder = workdir / "teacher_unet" if not stacked else workdir / f"start_unet_{self._digest()[:12]}"
            if not (folder / "config.json").is_file():
                self.teacher.unet.save_pretrained(str(folder), safe_serialization=True)
            self.weights_dir = str(folder)

    def stages(self) -> list[Stage]:
        b = self.settings.budgets
        sampler = self.sampler()
        return pruner_stages(
            self.teacher.unet, sampler, units=self.units, options=self.options, iterations=b.train_iterations, batch_size=b.batch_size
        )

    def _weights(self) -> UnitWeights:
        """What the sparsity loss counts: the units' MACs, or their seconds measured now."""
        assert self.costs is not None
        if self.options.unit_cost == "macs":
            return UnitWeights.of(self.costs)
        b = self.settings
        weights = UnitWeights.measured(
            self.teacher.unet,
            self.units,
            batch_size=b.latency_batch_size,
            rounds=max(25, b.latency_repeats),
            idle_free=self.costs.idle_free,
        )
        logger.info(
            "DiP-GO: one step at batch %d takes %.4g s; the units take %.0f%% of it, the rest is paid at every step%s",
            b.latency_batch_size,
            weights.total,
            100 * (1 - weights.always / weights.total),
            " that computes some unit" if weights.idle_free else "",
        )
        return weights

    def _digest(self) -> str:
        if self._weights_digest is None:
            self._weights_digest = weights_digest(self.teacher.unet)
        return self._weights_digest

    @property
    def recipes(self) -> tuple[str, ...]:
        return self.options.warm_start

    def suggest(self, trial: Any) -> dict[str, Any]:
        o = self.options
        recipe = recipe_of(trial)
        if recipe is not None:  # a warm start: the recipe's schedule, no pruner scores
            return {TrialAttr.RECIPE: recipe}
        if o.postprocess == "budget":
            return {BUDGET: trial.suggest_float(BUDGET, o.budget_low, o.budget_high)}
        return {THRESHOLD: trial.suggest_float(THRESHOLD, o.threshold_low, o.threshold_high, log=o.threshold_log)}

    def fingerprint(self, params: dict[str, Any]) -> str:
        """Parameters that give the same schedule make the same model."""
        return self.schedule_for(params).key()

    def schedule_for(self, params: Mapping[str, Any]) -> Schedule:
        """The schedule the pruner's scores give for a trial's parameters: the gates within its
        budget, or above its threshold; or the schedule of the recipe it was enqueued for."""
        if self.scores is None or self.weights is None:
            self.prepare()
        assert self.scores is not None and self.weights is not None
        sampler = self.sampler()
        info: dict[str, Any] = {
            "target_macs_ratio": self.options.target_macs_ratio,
            "unit_cost": self.options.unit_cost,
            "granularity": self.options.granularity,
            "teacher": self.teacher.source,
            "scheduler": sampler.scheduler,
            "num_inference_steps": sampler.steps,
        }
        model = model_fingerprint(self.teacher.unet)
        if TrialAttr.RECIPE in params:
            recipe = schedule_recipe(params[TrialAttr.RECIPE])
            if recipe is None:
                raise UserError(f"{self.settings.where}: method_options.warm_start: no recipe '{params[TrialAttr.RECIPE]}' for dipgo")
            rows = int(self.scores.shape[0])
            info = {TrialAttr.RECIPE: params[TrialAttr.RECIPE], **info}
            uniform = Schedule.uniform_cache if recipe[0] == "deepcache" else Schedule.uniform_steps
            schedule = uniform(self.teacher.unet, rows, recipe[1], units=self.units, info=info)
        elif BUDGET in params:
            gates = gates_within_budget(self.scores, params[BUDGET], self.weights)
            schedule = Schedule(len(gates), self.units, tuple(map(tuple, gates.tolist())), model, {BUDGET: float(params[BUDGET]), **info})
        else:
            schedule = Schedule.from_scores(self.scores, params[THRESHOLD], units=self.units, model=model, info=info)
        return replace(schedule, info={**schedule.info, DiPGOAttr.COST_RATIO: round(self.weights.cost(np.asarray(schedule.gates)), 6)})

    def run_trial(self, params: dict[str, Any], *, number: int = 0, rungs: Rungs | None = None) -> Candidate:
        schedule = self.schedule_for(params)
        unet = self.teacher.unet
        config = {"_class_name": type(unet).__name__, **{k: v for k, v in dict(unet.config).items() if not k.startswith("_")}}
        attrs = {
            **{key: params[key] for key in (THRESHOLD, BUDGET, TrialAttr.RECIPE) if key in params},
            DiPGOAttr.COST_RATIO: schedule.info[DiPGOAttr.COST_RATIO],
            DiPGOAttr.COMPUTED_FRACTION: schedule.computed_fraction,
            DiPGOAttr.GRANULARITY: self.options.granularity,
            DiPGOAttr.TARGET_MACS_RATIO: self.options.target_macs_ratio,
            **self.summary,
        }
        return Candidate(unet, config, attrs, schedule=schedule, weights=self.weights_dir)
