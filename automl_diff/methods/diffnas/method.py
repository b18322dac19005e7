"""DiffNAS as a search method: block supernets, block-wise search, retraining swept by Optuna.

``prepare`` (once per study; cached across resumed runs) builds one supernet per block of the
``family: supernet`` search space, trains them on the teacher's block inputs and outputs (from the
data-free pool, or a dataset), and scores every block candidate by loss and cost (MACs, or measured
seconds with ``block_cost: latency``) in Optuna studies beside the main one
(``<study>/block/<block>``, or ``<study>/global``). Each trial then samples a tolerance (and a
retraining budget where several are listed), takes per block the cheapest candidate within it,
assembles the student with the supernets' weights and retrains it with the dynamic joint loss.

Stacked on another study's export, the supernets mimic the starting model's blocks, while the
training inputs and the joint loss's output term come from the original teacher.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

import torch

from automl_diff.config.options import DiffNASOptions
from automl_diff.config.search_space import SupernetSpace
from automl_diff.methods.base import Candidate, CardSection, Method, Rungs, TrainAttr, recipe_of
from automl_diff.methods.diffnas.choice import BlockChoice, Supernet
from automl_diff.methods.diffnas.retrain import JointLoss, JointWeight
from automl_diff.methods.diffnas.search import (
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
from automl_diff.methods.diffnas.supernet import assemble_student, block_pairs, build_supernets
from automl_diff.methods.training import TrainingInputs, fit
from automl_diff.methods.training.ddp import fit_data_parallel, run_job
from automl_diff.methods.training.loop import conditioning, held_out_loss
from automl_diff.methods.training.stages import distillation_step_stage, pool_stages
from automl_diff.metrics.stages import Stage
from automl_diff.models.loading import weights_digest
from automl_diff.records import TrialAttr, stable_key

__all__ = ["RETRAIN_ITERATIONS", "TOLERANCE", "DiffNAS", "DiffNASAttr"]

#: The module ``torchrun`` runs for DiffNAS's data-parallel jobs (:mod:`automl_diff.methods.diffnas.ddp`).
DIFFNAS_WORKER = "automl_diff.methods.diffnas.ddp"


class DiffNASAttr:
    """Trial attributes of a DiffNAS trial (besides :class:`~automl_diff.methods.base.TrainAttr`)."""

    #: Per block the chosen subnet's key, and its block loss.
    BLOCK_CHOICES: Final = "block_choices"
    BLOCK_LOSSES: Final = "block_losses"
    RETRAIN_ITERATIONS: Final = "retrain_iterations"
    JOINT_SCHEDULE: Final = "joint_schedule"
    SUPERNET_SECONDS: Final = "supernet_seconds"
    SUPERNET_LOSS_FIRST: Final = "supernet_loss_first"
    SUPERNET_LOSS_LAST: Final = "supernet_loss_last"
    SEARCH: Final = "search"
    BLOCK_COST: Final = "block_cost"
    SEARCH_SECONDS: Final = "search_seconds"
    BLOCK_EVALUATIONS: Final = "block_evaluations"


#: The Optuna parameters of a DiffNAS trial: the block-loss tolerance, and the retraining budget
#: where ``retrain_iterations`` lists several.
TOLERANCE = "tolerance"
RETRAIN_ITERATIONS = DiffNASAttr.RETRAIN_ITERATIONS

logger = logging.getLogger("automl_diff")


class DiffNAS(Method):
    """Block-wise NAS with distillation (DiffNAS).

    Args:
        inputs: training inputs to share with other methods (the benchmark's one pool); None:
            the method's own, from its options.
    """

    options_type = DiffNASOptions
    product = "DiffNAS student"

    def __init__(self, *args: Any, inputs: TrainingInputs | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.space: SupernetSpace = self.settings.search_space
        # (x_t, t) and output targets from the original teacher; block features from the starting model
        self.inputs = inputs or TrainingInputs(self.settings, self.original, self.options, device=self.device)
        self.supernets: dict[str, Supernet] = {n: s.to(self.device) for n, s in build_supernets(self.teacher.unet, self.space).items()}
        self.block_scores: dict[str, list[BlockScore]] | None = None
        self.global_scores: list[GlobalScore] | None = None
        self.summary: dict[str, Any] = {}
        #: Where data-parallel jobs are written (the study's folder once prepared).
        self.workdir = Path("runs")

    # -- model cards -----------------------------------------------------------------------------
    @classmethod
    def card_section(cls, attrs: Mapping[str, Any], *, steps: int, first_step: bool) -> CardSection:
        choices = attrs.get(DiffNASAttr.BLOCK_CHOICES)
        if not choices or not first_step:  # a longer lineage shows the choices per step
            return CardSection()
        return CardSection(
            f"""DiffNAS chose one subnet per teacher block (`layers`: resnets that compute, the others keep their
shortcut, or for a DiT block whether it computes; `width`: their inner width, or a DiT block's
feed-forward units, as a fraction of the block's; `attention`: kept or dropped; `depth`: transformer
layers kept, `heads`: a DiT block's attention heads kept, where chosen),
then retrained the student for {attrs.get(DiffNASAttr.RETRAIN_ITERATIONS)} steps with the joint loss
(`{attrs.get(DiffNASAttr.JOINT_SCHEDULE)}` block-feature weight):

{_choices_table(choices)}"""
        )

    @classmethod
    def lineage_facts(cls, attrs: Mapping[str, Any]) -> dict[str, Any]:
        if not attrs.get(DiffNASAttr.BLOCK_CHOICES):
            return {}
        return {k: attrs.get(k) for k in (DiffNASAttr.BLOCK_CHOICES, DiffNASAttr.RETRAIN_ITERATIONS)} | super().lineage_facts(attrs)

    @classmethod
    def lineage_note(cls, step: Mapping[str, Any], number: int) -> str:
        choices = step.get(DiffNASAttr.BLOCK_CHOICES)
        if not choices:
            return ""
        budget = step.get(DiffNASAttr.RETRAIN_ITERATIONS)
        return f"\nBlock choices of step {number} (DiffNAS, retrained {budget} steps):\n\n{_choices_table(choices)}"

    # -- prepare ---------------------------------------------------------------------------------
    def _key(self) -> str:
        o = self.options
        payload = {
            "supernet": [o.source, o.pool_size, o.pool_steps, o.pool_eta, o.supernet_iterations, o.supernet_lr, o.subnets_per_step],
            "space": Path(self.space.path).read_text(),
            "budgets": [self.settings.budgets.batch_size],
            "seed": self.settings.seed,
            "teacher": [self.teacher.source, weights_digest(self.teacher.unet)],
            "reference": [self.original.source, weights_digest(self.original.unet) if self.stacked else None],
        }
        if self.teacher.text is not None:  # what the pool's trajectories are conditioned on
            st = self.settings
            payload["conditioning"] = [list(st.train_prompts), o.prompt_dropout, st.sampling.negative_prompt, st.dataset]
        return stable_key(payload)

    def _validation(self) -> dict[str, list[BlockInputs]]:
        """Teacher block inputs/outputs on a fixed set of ``(x_t, t)`` (a separate seed)."""
        batches = self.inputs.batches(self.settings.seed + 7919)
        data: dict[str, list[BlockInputs]] = {n: [] for n in self.supernets}
        remaining = self.options.search_samples
        while remaining > 0:
            n = min(remaining, self.settings.budgets.batch_size)
            batch = batches(n)
            _, recorded = record_teacher_blocks(self.teacher.unet, batch[0], batch[1], list(self.supernets), **conditioning(batch))
            for name, value in recorded.items():
                data[name].append(value)
            remaining -= n
        return data

    def prepare(self, workdir: Path | None = None, *, storage: Any = None, study_name: str | None = None) -> None:
        from safetensors.torch import load_file, save_file

        key = self._key()
        if workdir is not None:
            self.workdir = Path(workdir)
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
            logger.info(
                "DiffNAS: training %d block supernets (%d iterations, %d subnets per block and step)",
                len(self.supernets),
                o.supernet_iterations,
                o.subnets_per_step,
            )
            start = time.perf_counter()
            training = {
                "iterations": o.supernet_iterations,
                "batch_size": self.settings.budgets.batch_size,
                "lr": o.supernet_lr,
                "subnets_per_step": o.subnets_per_step,
                "seed": self.settings.seed,
            }
            batches = self.inputs.batches(self.settings.seed + 1)
            if self.processes > 1:
                losses = self._train_supernets_data_parallel(batches, training, self.workdir)
            else:
                losses = train_supernets(self.teacher.unet, self.supernets, batches, progress=self.progress, **training)
            tail = max(1, len(losses) // 10)
            self.summary = {
                DiffNASAttr.SUPERNET_SECONDS: round(time.perf_counter() - start, 3),
                DiffNASAttr.SUPERNET_LOSS_FIRST: sum(losses[:tail]) / tail,
                DiffNASAttr.SUPERNET_LOSS_LAST: sum(losses[-tail:]) / tail,
            }
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                state = {f"{n}.{k}": v.detach().contiguous() for n, s in self.supernets.items() for k, v in s.state_dict().items()}
                save_file(state, str(cache))
                cache.with_suffix(".json").write_text(json.dumps({"key": key, "summary": self.summary}) + "\n")
        for supernet in self.supernets.values():
            supernet.requires_grad_(False).eval()
        self._search(storage, study_name or "diffnas", key)

    @property
    def processes(self) -> int:
        """Data-parallel ranks of supernet training and retraining (``execution``)."""
        return self.settings.processes

    def _job(self, task: dict[str, Any]) -> dict[str, Any]:
        """What every data-parallel task of DiffNAS's names: the starting model and the stack."""
        return {**task, "start": self.teacher.source, "stacked": self.stacked}

    def _train_supernets_data_parallel(self, batches: Any, training: dict[str, Any], workdir: Path) -> list[float]:
        """:func:`train_supernets` over the data-parallel ranks; the trained weights come back here."""
        state = {f"{n}.{k}": v for n, s in self.supernets.items() for k, v in s.state_dict().items()}
        job = {
            "teacher": self.original.source,
            "dtype": str(next(self.original.unet.parameters()).dtype).removeprefix("torch."),
            "batches": batches.record(),
            "held_out": None,
            "rungs": [],
            "fit": training,
            "task": self._job({"kind": "supernets", "space": self.space.path, "state": state}),
        }
        done = run_job(
            job, processes=self.processes, launcher=self.settings.launcher, folder=workdir / "ddp" / "supernets", worker=DIFFNAS_WORKER
        )
        for name, supernet in self.supernets.items():
            supernet.load_state_dict({k[len(name) + 1 :]: v for k, v in done.result["state"].items() if k.startswith(name + ".")})
        return list(done.result["losses"])

    def _search(self, storage: Any, name: str, key: str) -> None:
        import optuna

        if storage is None:  # outside a study (Python API): an in-memory storage
            storage = optuna.storages.InMemoryStorage()
        start = time.perf_counter()
        data = self._validation()
        o = self.options
        cost = {"cost": o.block_cost, "latency_batch": self.settings.latency_batch_size}
        if o.block_cost == "latency":  # scores measured at another batch size or device are not comparable
            key = f"{key}/latency@{self.settings.latency_batch_size}/{self.device.type}"
        if o.search == "local":
            self.block_scores = local_search(
                self.supernets, data, storage=storage, study_name=name, key=key, max_trials=o.block_trials, seed=self.settings.seed, **cost
            )
            evaluations = sum(len(v) for v in self.block_scores.values())
        else:
            self.global_scores = global_search(
                self.supernets, data, storage=storage, study_name=name, key=key, n_trials=o.global_trials, seed=self.settings.seed, **cost
            )
            evaluations = len(self.global_scores) * len(self.supernets)
        self.summary.update(
            {
                DiffNASAttr.SEARCH: o.search,
                DiffNASAttr.BLOCK_COST: o.block_cost,
                DiffNASAttr.SEARCH_SECONDS: round(time.perf_counter() - start, 3),
                DiffNASAttr.BLOCK_EVALUATIONS: evaluations,
            }
        )
        logger.info("DiffNAS: %s search scored %d block candidates in %.1f s", o.search, evaluations, time.perf_counter() - start)

    # -- trials ----------------------------------------------------------------------------------
    @property
    def recipes(self) -> tuple[str, ...]:
        return self.options.warm_start

    def suggest(self, trial: Any) -> dict[str, Any]:
        o = self.options
        recipe = recipe_of(trial)
        if recipe is not None:  # a warm start: BK-SDM's removal as the block choices, the largest retraining budget
            return {TrialAttr.RECIPE: recipe}
        params = {TOLERANCE: trial.suggest_float(TOLERANCE, o.tolerance_low, o.tolerance_high, log=True)}
        if len(o.retrain_iterations) > 1:
            params[RETRAIN_ITERATIONS] = trial.suggest_categorical(RETRAIN_ITERATIONS, list(o.retrain_iterations))
        return params

    def stages(self) -> list[Stage]:
        st, o = self.settings, self.options
        note = f"per subnet ({o.subnets_per_step} a step); the {len(self.space.blocks)} blocks' supernets as one teacher-sized student"
        retrain = max(self._iterations({}), *o.retrain_iterations)
        return [
            *pool_stages(self.original, o, st, guided=self.inputs.guided),
            distillation_step_stage("supernet step", "study", o.supernet_iterations * o.subnets_per_step, self.teacher, st, note=note),
            distillation_step_stage("retraining step", "trial", retrain, self.original, st),
        ]

    def _iterations(self, params: dict[str, Any]) -> int:
        if RETRAIN_ITERATIONS in params:
            return int(params[RETRAIN_ITERATIONS])
        if self.options.retrain_iterations:  # one budget, or a recipe's: the largest
            return int(max(self.options.retrain_iterations))
        return self.settings.budgets.train_iterations

    def choose(self, tolerance: float) -> tuple[dict[str, BlockChoice], dict[str, float]]:
        """The block choices a tolerance selects, and their block losses."""
        if self.block_scores is None and self.global_scores is None:
            self.prepare()
        if self.block_scores is not None:
            chosen = choose_local(self.block_scores, tolerance, self.options.block_cost)
            return {n: s.choice for n, s in chosen.items()}, {n: s.loss for n, s in chosen.items()}
        best = choose_global(self.global_scores, tolerance, self.options.block_cost)
        return dict(best.choices), {"mean": best.loss}

    def fingerprint(self, params: dict[str, Any]) -> str:
        """Tolerances (or a recipe) that select the same student at the same budget make the same model."""
        choices, _ = self.choices_of(params)
        return stable_key({"choices": {n: c.key for n, c in choices.items()}, "iterations": self._iterations(params)})

    def recipe_choices(self, recipe: str) -> tuple[dict[str, BlockChoice], dict[str, float]]:
        """The block choices that are a recipe's removal (full width, depth and attention in the
        blocks it keeps), and their block losses where the search scored them."""
        point = self.space.recipe_point(self.teacher.unet, recipe)
        choices = {name: sn.canonical(BlockChoice(point[name], 1.0, True, 0)) for name, sn in self.supernets.items()}
        scored = {name: {s.choice: s.loss for s in scores} for name, scores in (self.block_scores or {}).items()}
        losses = {name: scored[name][choice] for name, choice in choices.items() if choice in scored.get(name, {})}
        return choices, losses

    def choices_of(self, params: dict[str, Any]) -> tuple[dict[str, BlockChoice], dict[str, float]]:
        """The block choices a trial's parameters select (its tolerance's, or its recipe's)."""
        recipe = params.get(TrialAttr.RECIPE)
        return self.recipe_choices(recipe) if recipe else self.choose(params[TOLERANCE])

    def run_trial(self, params: dict[str, Any], *, number: int = 0, rungs: Rungs | None = None) -> Candidate:
        recipe = params.get(TrialAttr.RECIPE)
        choices, losses = self.choices_of(params)
        iterations = self._iterations(params)
        seed = self.settings.seed + number
        torch.manual_seed(seed)
        student, config = assemble_student(self.teacher.unet, self.supernets, choices)
        o = self.options
        attrs: dict[str, Any] = {
            DiffNASAttr.BLOCK_CHOICES: {n: c.key for n, c in choices.items()},
            DiffNASAttr.BLOCK_LOSSES: losses,
            DiffNASAttr.RETRAIN_ITERATIONS: iterations,
            DiffNASAttr.JOINT_SCHEDULE: o.joint_schedule,
            **self.summary,
            **({TrialAttr.RECIPE: recipe} if recipe else {}),
        }
        if iterations > 0:
            at = rungs.iterations(iterations) if rungs is not None else []
            held_out = self.inputs.held_out(self.settings.score_samples) if at else None
            weight = JointWeight(o.joint_schedule, o.joint_start, o.joint_end)
            pairs = block_pairs(self.supernets, choices)
            batches = self.inputs.batches(seed)
            options = {
                "iterations": iterations,
                "batch_size": self.settings.budgets.batch_size,
                "lr": self.settings.budgets.lr,
                "ema_decay": o.ema_decay,
                "progress": self.progress,
                "desc": f"trial {number} retraining",
            }
            student.requires_grad_(True)
            if self.processes > 1:
                result = fit_data_parallel(
                    student,
                    batches,
                    student_config=config,
                    teacher_source=self.original.source,
                    processes=self.processes,
                    launcher=self.settings.launcher,
                    folder=self.workdir / "ddp" / f"trial_{number}",
                    held_out=held_out,
                    rungs=at,
                    on_rung=(lambda k, it, score: rungs.report(k, it, score, student)) if at else None,
                    worker=DIFFNAS_WORKER,
                    task=self._job(
                        {"kind": "retrain", "weight": asdict(weight), "total": iterations, "data_weight": o.data_weight, "blocks": pairs}
                    ),
                    **options,
                )
            else:
                original = self.original.unet if self.stacked else None
                loss = JointLoss(self.teacher.unet, weight, iterations, data_weight=o.data_weight, original=original, blocks=pairs)
                result = fit(
                    student,
                    batches,
                    loss=loss,
                    rungs=at,
                    on_rung=(lambda k, it, model: rungs.report(k, it, held_out_loss(model, held_out), model)) if at else None,
                    **options,
                )
            student = result.model
            tail = max(1, len(result.losses) // 10)
            attrs.update(
                {
                    TrainAttr.TRAIN_SECONDS: round(result.seconds, 3),
                    TrainAttr.TRAIN_LOSS_FIRST: result.mean_loss(0, tail),
                    TrainAttr.TRAIN_LOSS_LAST: result.mean_loss(len(result.losses) - tail, len(result.losses)),
                    TrainAttr.TRAIN_PROCESSES: result.processes,
                }
            )
        student.requires_grad_(False).eval()
        return Candidate(student, config, attrs)


def _choices_table(choices: Mapping[str, str]) -> str:
    rows = "\n".join(f"| `{block}` | {choice} |" for block, choice in choices.items())
    return f"| block | subnet |\n|---|---|\n{rows}\n"
