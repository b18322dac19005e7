"""Block-wise supernet training and the two searches over block subnets.

* :func:`train_supernets`: every block supernet learns to reproduce its teacher block from the
  teacher's own block inputs (recorded with :func:`~automl_diff.models.blocks.record_blocks` on
  ``(x_t, t)`` from the DKDM pool or a dataset). Each step trains the largest, the smallest and
  some random subnets of every block (the sandwich rule).
* :func:`local_search`: one Optuna study per block (``<study>/block/<name>`` in the study's own
  storage) scores each candidate by its block loss and its cost, exhaustively when the block has
  few candidates. :func:`choose_local` then takes, per block, the cheapest candidate whose loss is
  within the tolerance: a sum of per-block searches instead of a product.
* :func:`global_search`: one Optuna study (``<study>/global``) over all blocks jointly, scored by
  the mean block loss and the total cost, for comparison (:func:`choose_global`).

Block loss is the relative MSE ``||F_b(x) - F_b^teacher(x)||^2 / ||F_b^teacher(x)||^2`` over all
tensors the block returns, on a fixed validation set of teacher block inputs, so tolerances mean
the same thing in every block. A candidate's cost is its block MACs (executed MACs for one sample,
torch's counter; ``cost="macs"``, the paper's choice) or its measured seconds (``cost="latency"``:
the candidate cut out as a plain block, timed on the validation inputs at a batch size, where time
on the device does not follow MACs: narrow convolutions, attention over few tokens).
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from torch import nn
from tqdm import tqdm

from automl_diff.config.options import BLOCK_COSTS
from automl_diff.methods.base import TrainingDiverged
from automl_diff.methods.diffnas.choice import BlockChoice, Supernet
from automl_diff.methods.diffnas.supernet import iter_tensors
from automl_diff.methods.training.loop import conditioning, shard, world
from automl_diff.metrics.macs import executed_macs
from automl_diff.models.blocks import map_tensors, record_blocks
from automl_diff.records import BlockSearchAttr
from automl_diff.sampling import predict_noise

__all__ = [
    "BlockInputs",
    "BlockScore",
    "GlobalScore",
    "block_loss",
    "choose_global",
    "choose_local",
    "global_search",
    "local_search",
    "record_teacher_blocks",
    "train_supernets",
]

logger = logging.getLogger("automl_diff")

#: What a block candidate's cost is: executed MACs, or measured seconds.


@dataclass
class BlockInputs:
    """One batch of a block's recorded call: its arguments and the teacher's output."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any


def record_teacher_blocks(
    teacher: nn.Module, x: torch.Tensor, t: torch.Tensor, names: list[str], **conditioning: Any
) -> tuple[torch.Tensor, dict[str, BlockInputs]]:
    """Run the teacher once (with ``conditioning``: ``encoder_hidden_states``); return its noise
    prediction and every named block's inputs/output. A cross-attention block's recorded inputs
    hold the text conditioning it was called with."""
    with torch.no_grad(), record_blocks(teacher, names) as rec:
        eps = predict_noise(teacher, x, t, **conditioning).float()
    return eps, {n: BlockInputs(rec[n].args[0], rec[n].kwargs[0], rec[n].outputs[0]) for n in names}


def _global_mean(value: torch.Tensor) -> torch.Tensor:
    """``value`` averaged over the ranks of a data-parallel job (itself outside one)."""
    _, size = world()
    if size == 1:
        return value
    total = value.detach().clone()
    torch.distributed.all_reduce(total)
    return total / size


def block_loss(output: Any, target: Any) -> torch.Tensor:
    """Relative MSE between two block outputs, averaged over the tensors they hold.

    In a data-parallel job each rank holds a share of the batch: the target's mean square (the
    normaliser) is the whole batch's, averaged over the ranks, so the ranks' averaged gradients
    are the whole batch's as in one process. Every rank calls it in the same order then."""
    losses = [
        (a.float() - b.float()).pow(2).mean() / (_global_mean(b.float().pow(2).mean()) + 1e-8)
        for a, b in zip(iter_tensors(output), iter_tensors(target), strict=True)
    ]
    return torch.stack(losses).mean()


def train_supernets(
    teacher: nn.Module,
    supernets: Mapping[str, Supernet],
    batches: Callable[[int], tuple[torch.Tensor, ...]],
    *,
    iterations: int,
    batch_size: int,
    lr: float,
    subnets_per_step: int = 4,
    seed: int = 0,
    progress: bool = False,
    on_shard: Callable[[Any], None] | None = None,
) -> list[float]:
    """Train every block supernet on the teacher's block inputs and outputs.

    Under ``torch.distributed`` (a data-parallel job, :mod:`automl_diff.methods.training.ddp`)
    every rank draws the same global batch and the same subnets, records the teacher's blocks on
    its own share of the batch, and the supernets' gradients are averaged over the ranks: the step
    one process takes on the whole batch.

    Args:
        teacher: the frozen teacher.
        supernets: block name -> supernet (trained in place).
        batches: ``batches(n)`` gives ``(x_t, t, ...)`` batches (with their conditioning): a DKDM
            pool or a dataset.
        iterations: optimiser steps.
        batch_size: samples per step.
        lr: peak learning rate (AdamW, cosine decay).
        subnets_per_step: subnets trained per block and step; the largest and the smallest are
            always among them, the rest are drawn at random.
        seed: draws of the random subnets.
        on_shard: called with each share of a batch this process trains on.

    Returns:
        The summed block loss per step (the whole batch's).

    Raises:
        TrainingDiverged: the loss became NaN or infinite.
    """
    rng = random.Random(seed)
    names = list(supernets)
    params = [p for s in supernets.values() for p in s.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, iterations))))
    for s in supernets.values():
        s.train()
    losses: list[float] = []
    bar = tqdm(range(iterations), desc="supernets", unit="it", disable=not progress, file=sys.stderr, leave=False, mininterval=1)
    rank, size = world()
    for step in bar:
        batch = shard(batches(batch_size), rank, size)
        if on_shard is not None:
            on_shard(batch)
        _, inputs = record_teacher_blocks(teacher, batch[0], batch[1], names, **conditioning(batch))
        optimizer.zero_grad(set_to_none=True)
        try:
            total = sum(_train_block(supernet, inputs[name], rng, subnets_per_step) for name, supernet in supernets.items())
        except TrainingDiverged as exc:
            bar.close()
            raise TrainingDiverged(f"{exc} at iteration {step}") from None
        if size > 1:  # every rank trained the same subnets: the same parameters have gradients
            for p in params:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= size
            total = float(_global_mean(torch.tensor(total)))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(total)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{total:.4f}")
    bar.close()
    for s in supernets.values():
        s.eval()
    return losses


def _train_block(supernet: Supernet, data: BlockInputs, rng: random.Random, subnets_per_step: int) -> float:
    """One supernet's share of a step (the sandwich rule): the largest, the smallest and some random
    subnets, their block losses backpropagated; returns their mean loss."""
    candidates = supernet.candidates()
    chosen = {supernet.largest(), supernet.smallest()}
    extra = [c for c in candidates if c not in chosen]
    chosen |= set(rng.sample(extra, min(len(extra), max(0, subnets_per_step - 2))))
    total = 0.0
    for choice in sorted(chosen):
        loss = block_loss(supernet.set(choice)(*data.args, **data.kwargs), data.output)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"supernet {supernet.name} loss became {loss.item()}")
        if loss.requires_grad:  # a subnet that computes nothing (all shortcuts) has no weights to train
            (loss / len(chosen)).backward()
        total += loss.item() / len(chosen)
    return total


@dataclass(frozen=True)
class BlockScore:
    """A block candidate's score: relative block loss, executed MACs (one sample) and, when
    measured, ``latency``: seconds of the candidate as a plain block at the latency batch size."""

    block: str
    choice: BlockChoice
    loss: float
    macs: int
    latency: float = math.nan

    def cost(self, kind: str) -> float:
        """The candidate's cost of kind ``macs`` or ``latency`` (seconds)."""
        return float(self.macs) if kind == "macs" else self.latency


def _batch_of(data: list[BlockInputs], size: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The block arguments of ``size`` validation samples (the batches concatenated, repeated if
    there are fewer samples)."""
    args = [(d.args, d.kwargs) for d in data]
    total = sum(next(iter_tensors([*a, *k.values()])).shape[0] for a, k in args)
    args = args * -(-size // total)

    def cat(*parts: Any) -> Any:
        first = parts[0]
        if isinstance(first, torch.Tensor):
            return torch.cat(parts)[:size] if first.dim() else first
        if isinstance(first, (tuple, list)):
            return type(first)(cat(*p) for p in zip(*parts, strict=True))
        if isinstance(first, dict):
            return {k: cat(*(p[k] for p in parts)) for k in first}
        return first

    return cat(*(a for a, _ in args)), cat(*(k for _, k in args))


@torch.no_grad()
def block_seconds(
    supernet: Supernet, choices: Sequence[BlockChoice], data: list[BlockInputs], *, batch_size: int, repeats: int = 5
) -> dict[str, float]:
    """Median seconds of each candidate (by :attr:`BlockChoice.key`), cut out as the plain block
    the student will hold (:meth:`Supernet.subnet`), on ``batch_size`` validation samples.
    The candidates are timed interleaved, after one untimed call each, so that drifting machine
    load hits them alike."""
    import statistics

    from automl_diff.metrics.latency import lockstep_rounds, once

    args, kwargs = _batch_of(data, batch_size)
    runs = {}
    for choice in choices:
        block = supernet.subnet(choice).eval()
        runs[supernet.canonical(choice).key] = once(lambda block=block: block(*args, **kwargs))
    rounds = lockstep_rounds(runs, repeats=repeats, warmup=1, sync=supernet)
    return {key: statistics.median(values) for key, values in rounds.items()}


@torch.no_grad()
def score_candidate(
    supernet: Supernet, choice: BlockChoice, data: list[BlockInputs], *, latency_batch: int | None = None, latency: float | None = None
) -> BlockScore:
    """Block loss of a candidate on the validation batches, its MACs for one sample and its
    ``latency``: as given, else with ``latency_batch`` timed at that batch size
    (:func:`block_seconds`), else not measured."""
    choice = supernet.canonical(choice)
    supernet.set(choice)
    losses = [block_loss(supernet(*d.args, **d.kwargs), d.output).item() for d in data]
    first = data[0]
    args, kwargs = map_tensors(lambda t: t[:1], first.args), map_tensors(lambda t: t[:1], first.kwargs)
    macs = executed_macs(lambda: supernet(*args, **kwargs))
    if latency is None:
        latency = block_seconds(supernet, [choice], data, batch_size=latency_batch)[choice.key] if latency_batch else math.nan
    return BlockScore(supernet.name, choice, sum(losses) / len(losses), macs, latency)


def _suggest_choice(trial: optuna.Trial, supernet: Supernet, prefix: str = "") -> BlockChoice:
    # blocks without depth or head choices (0: all) keep the parameters they always had
    depth = trial.suggest_categorical(f"{prefix}depth", list(supernet.depths)) if supernet.depths != (0,) else 0
    heads = trial.suggest_categorical(f"{prefix}heads", list(supernet.heads)) if supernet.heads != (0,) else 0
    return supernet.canonical(
        BlockChoice(
            trial.suggest_categorical(f"{prefix}layers", list(supernet.layers)),
            trial.suggest_categorical(f"{prefix}width", list(supernet.widths)),
            trial.suggest_categorical(f"{prefix}attention", list(supernet.attention_choices)),
            depth,
            heads,
        )
    )


def _open(storage: Any, name: str, directions: list[str], metric_names: list[str], key: str, seed: int) -> optuna.Study:
    from automl_diff.errors import UserError

    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True)
    study = optuna.create_study(storage=storage, study_name=name, directions=directions, sampler=sampler, load_if_exists=True)
    stored = study.user_attrs.get(BlockSearchAttr.SUPERNET)
    if stored is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(metric_names)
        study.set_user_attr(BlockSearchAttr.SUPERNET, key)
    elif stored != key:
        raise UserError(
            f"study '{name}' was searched with other supernets (options, search space or teacher changed); use another study name"
        )
    return study


def _quiet_optimize(study: optuna.Study, objective: Callable[[optuna.Trial], Any], n_trials: int) -> None:
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study.optimize(objective, n_trials=n_trials)
    finally:
        optuna.logging.set_verbosity(level)


def _check_cost(cost: str) -> None:
    if cost not in BLOCK_COSTS:
        raise ValueError(f"cost must be one of {BLOCK_COSTS}, got {cost!r}")


def _set_costs(trial: optuna.Trial, macs: int, latency: float) -> None:
    """Both costs of a trial as user attributes (its first objective is one of them)."""
    trial.set_user_attr(BlockSearchAttr.MACS, macs)
    if not math.isnan(latency):
        trial.set_user_attr(BlockSearchAttr.LATENCY, latency)


def _stored_costs(trial: optuna.trial.FrozenTrial) -> tuple[int, float]:
    """``(macs, latency)`` of a finished trial (studies from before ``latency`` existed hold MACs
    as their first objective only)."""
    attrs = trial.user_attrs
    return int(attrs.get(BlockSearchAttr.MACS, trial.values[0])), float(attrs.get(BlockSearchAttr.LATENCY, math.nan))


def local_search(
    supernets: Mapping[str, Supernet],
    data: Mapping[str, list[BlockInputs]],
    *,
    storage: Any,
    study_name: str,
    key: str,
    max_trials: int = 64,
    seed: int = 0,
    cost: str = "macs",
    latency_batch: int = 8,
) -> dict[str, list[BlockScore]]:
    """Score every block's candidates in its own Optuna study ``<study_name>/block/<block>``,
    objectives the candidate's cost (``cost``: MACs, or seconds at ``latency_batch``) and loss.

    A block with at most ``max_trials`` candidates is searched exhaustively; a larger one gets its
    largest and smallest candidates, then TPE proposals, up to ``max_trials`` trials. A resumed
    search keeps the finished trials and only runs what is missing.

    Returns:
        Block name -> the scores of its evaluated candidates.
    """
    _check_cost(cost)
    out: dict[str, list[BlockScore]] = {}
    for name, supernet in supernets.items():
        study = _open(storage, f"{study_name}/block/{name}", ["minimize", "minimize"], [cost, "loss"], key, seed)
        done = {
            t.user_attrs[BlockSearchAttr.CANDIDATE] for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        }
        candidates = supernet.candidates()
        todo = [c for c in candidates if c.key not in done]
        if len(candidates) > max_trials:
            todo = [c for c in (supernet.largest(), supernet.smallest()) if c.key not in done]
        for choice in todo:
            study.enqueue_trial(supernet.params_of(choice))
        n_trials = len(todo) if len(candidates) <= max_trials else max(0, max_trials - len(done))
        # an exhaustive block's candidates are timed together, interleaved; TPE's one by one
        timed = (
            block_seconds(supernet, todo, data[name], batch_size=latency_batch)
            if cost == "latency" and len(candidates) <= max_trials and todo
            else {}
        )

        def objective(
            trial: optuna.Trial, supernet: Supernet = supernet, name: str = name, timed: dict[str, float] = timed
        ) -> tuple[float, float]:
            choice = _suggest_choice(trial, supernet)
            score = score_candidate(
                supernet, choice, data[name], latency_batch=latency_batch if cost == "latency" else None, latency=timed.get(choice.key)
            )
            trial.set_user_attr(BlockSearchAttr.CANDIDATE, score.choice.key)
            _set_costs(trial, score.macs, score.latency)
            return score.cost(cost), score.loss

        _quiet_optimize(study, objective, n_trials)
        scores = {}
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            choice = supernet.from_params(trial.params)
            scores[choice.key] = BlockScore(name, choice, float(trial.values[1]), *_stored_costs(trial))
        out[name] = sorted(scores.values(), key=lambda s: (s.cost(cost), s.loss))
    return out


def choose_local(scores: Mapping[str, list[BlockScore]], tolerance: float, cost: str = "macs") -> dict[str, BlockScore]:
    """Per block, the cheapest candidate (``cost``: fewest MACs or seconds) whose loss is within
    ``tolerance`` (the lowest-loss candidate when none is)."""
    _check_cost(cost)
    chosen = {}
    for name, block_scores in scores.items():
        within = [s for s in block_scores if s.loss <= tolerance]
        chosen[name] = min(within, key=lambda s: (s.cost(cost), s.macs, s.loss)) if within else min(block_scores, key=lambda s: s.loss)
    return chosen


@dataclass(frozen=True)
class GlobalScore:
    """A whole-student candidate of the global search (``seconds``: wall time of the search when it
    was scored; ``latency``: its blocks' measured seconds summed, when measured)."""

    choices: dict[str, BlockChoice]
    loss: float
    macs: int
    number: int
    seconds: float
    latency: float = math.nan

    def cost(self, kind: str) -> float:
        """The student's blocks' cost of kind ``macs`` or ``latency`` (seconds)."""
        return float(self.macs) if kind == "macs" else self.latency


def global_search(
    supernets: Mapping[str, Supernet],
    data: Mapping[str, list[BlockInputs]],
    *,
    storage: Any,
    study_name: str,
    key: str,
    n_trials: int = 200,
    seed: int = 0,
    cost: str = "macs",
    latency_batch: int = 8,
) -> list[GlobalScore]:
    """Search all blocks jointly in one Optuna study ``<study_name>/global``: parameters
    ``<block>.layers``/``.width``/``.attention`` (and ``.depth``, ``.heads`` where a block chooses them),
    objectives the blocks' total cost (``cost``:
    MACs, or seconds at ``latency_batch``) and mean block loss. The largest and the smallest
    students are tried first. Returns every evaluated student in trial order."""
    _check_cost(cost)
    study = _open(storage, f"{study_name}/global", ["minimize", "minimize"], [cost, "loss"], key, seed)
    finished = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    if finished == 0:
        for pick in ("largest", "smallest"):
            study.enqueue_trial({f"{n}.{k}": v for n, s in supernets.items() for k, v in s.params_of(getattr(s, pick)()).items()})
    start = time.perf_counter()

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        scores = [
            score_candidate(s, _suggest_choice(trial, s, f"{n}."), data[n], latency_batch=latency_batch if cost == "latency" else None)
            for n, s in supernets.items()
        ]
        trial.set_user_attr(BlockSearchAttr.SECONDS, time.perf_counter() - start)
        _set_costs(trial, sum(s.macs for s in scores), sum(s.latency for s in scores))
        return sum(s.cost(cost) for s in scores), sum(s.loss for s in scores) / len(scores)

    _quiet_optimize(study, objective, max(0, n_trials - finished))
    out = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        choices = {
            n: s.from_params({k.split(".")[-1]: v for k, v in trial.params.items() if k.rsplit(".", 1)[0] == n})
            for n, s in supernets.items()
        }
        macs, latency = _stored_costs(trial)
        out.append(
            GlobalScore(
                choices, float(trial.values[1]), macs, trial.number, float(trial.user_attrs.get(BlockSearchAttr.SECONDS, 0.0)), latency
            )
        )
    return out


def choose_global(scores: list[GlobalScore], tolerance: float, cost: str = "macs") -> GlobalScore:
    """The cheapest student (``cost``: fewest MACs or seconds) whose mean block loss is within
    ``tolerance`` (the lowest-loss one when none is)."""
    _check_cost(cost)
    within = [s for s in scores if s.loss <= tolerance]
    return min(within, key=lambda s: (s.cost(cost), s.macs, s.loss)) if within else min(scores, key=lambda s: s.loss)
