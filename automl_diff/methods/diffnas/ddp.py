"""DiffNAS's data-parallel tasks (``execution.processes_per_trial`` above 1), run in every rank of a
``torchrun`` job (:mod:`automl_diff.methods.training.ddp`):

* ``supernets``: the block supernets, rebuilt from the search space on the starting model and
  trained by :func:`~automl_diff.methods.diffnas.search.train_supernets`, each rank on its share
  of every batch;
* ``retrain``: an assembled student retrained with the dynamic joint loss
  (:class:`~automl_diff.methods.diffnas.retrain.JointLoss`) through the shared data-parallel loop.

The job's teacher (the pool's labeller, the joint loss's output target) is the original teacher;
the block features come from the starting model, reloaded from its own source when the study is
stacked on another's export.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from automl_diff.config.search_space import load_search_space
from automl_diff.methods.diffnas.retrain import JointLoss, JointWeight
from automl_diff.methods.diffnas.search import train_supernets
from automl_diff.methods.diffnas.supernet import build_supernets
from automl_diff.methods.training.ddp import Worker, worker_main
from automl_diff.models.loading import Teacher, load_teacher

__all__ = ["WORKER"]

#: The module ``torchrun`` runs for DiffNAS's data-parallel jobs.
WORKER = __name__


def _starting_model(worker: Worker) -> Teacher:
    """The model whose blocks are mimicked: the job's teacher, or the starting model of a stack."""
    task = worker.job["task"]
    if not task["stacked"]:
        return worker.teacher
    return load_teacher(task["start"], device=worker.device, dtype=getattr(torch, worker.job["dtype"]))


def _supernets(worker: Worker) -> dict[str, Any]:
    task = worker.job["task"]
    start = _starting_model(worker)
    supernets = build_supernets(start.unet, load_search_space(task["space"]))
    state = task["state"]
    for name, supernet in supernets.items():
        supernet.to(worker.device).load_state_dict({k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")})
    options = worker.job["fit"]
    losses = train_supernets(start.unet, supernets, worker.batches(), on_shard=worker.trace, **options)
    state = {f"{n}.{k}": v.detach().cpu() for n, s in supernets.items() for k, v in s.state_dict().items()}
    return {"state": state, "losses": losses}


def _retrain(worker: Worker) -> dict[str, Any]:
    task = worker.job["task"]
    start = _starting_model(worker)
    original = worker.teacher.unet if task["stacked"] else None
    weight = JointWeight(**task["weight"])
    loss = JointLoss(start.unet, weight, task["total"], data_weight=task["data_weight"], original=original, blocks=task.get("blocks"))
    return worker.fit(worker.student().requires_grad_(True), worker.batches(), loss)


_TASKS = {"supernets": _supernets, "retrain": _retrain}


def _run(worker: Worker) -> dict[str, Any]:
    return _TASKS[worker.job["task"]["kind"]](worker)


#: What every rank runs (each worker module names its task ``TASK``; Ray Train's workers look it up).
TASK = _run


if __name__ == "__main__":
    worker_main(sys.argv[1], TASK)
