"""Data-parallel training of one trial: torch DDP over ``processes`` ranks, launched by ``torchrun``.

The trial's own process keeps everything but the training: it writes a job (the model's config and
weights, the batch source's tensors and generator state, the budgets and what the task needs:
tensors and plain values only, read back with ``weights_only=True``) and :func:`run_job` runs::

    python -m torch.distributed.run --standalone --nproc_per_node N -m WORKER JOB

``WORKER`` is a module whose ``__main__`` calls :func:`worker_main` with the task it runs in every
rank: this module trains a student with the noise-prediction loss (DKDM, :func:`fit_data_parallel`);
a method brings its own (DiffNAS: supernet training, and retraining with its joint loss). Every
rank loads the job, reloads the frozen teacher from its source and runs the task under
``torch.distributed`` (gloo on CPU, NCCL on GPUs, one GPU per rank), where
:func:`~automl_diff.methods.training.loop.fit` is data-parallel: every rank draws the same global
batch and trains on its own share of it. Each rank writes ``rank-<r>.json`` (the world size it
saw, how many samples it trained on, the sums of its first shards); rank 0 writes the result. The
trial's process then evaluates and records the model as for any trial.

Rungs cross the process boundary as files: at a rung, rank 0 writes ``rung-<k>.json`` (the
held-out score) and waits for ``decision-<k>.json``, which the trial's process writes after its
runner has ruled (go on, or stop); rank 0 broadcasts the ruling to the other ranks.

A rank that fails ends the job: it writes ``error-<r>.json`` (its exception) before it exits, and
:class:`~automl_diff.methods.base.TrainingFailed` names the exit status and the first exception a
rank raised (the others then fail on the broken process group); the runner fails that trial alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from automl_diff.methods.base import TrainingFailed
from automl_diff.methods.training.inputs import Batch, restore_batches
from automl_diff.methods.training.loop import FitResult, fit, held_out_loss, noise_loss
from automl_diff.models.loading import Teacher, load_teacher, unet_from_config

__all__ = ["JobResult", "Worker", "fit_data_parallel", "run_job", "worker_main"]

#: Seconds between looks at the job folder (rung files, the workers' exit).
_POLL = 0.05
#: How many of its first shards a rank reports the sum of (``rank-<r>.json``).
_TRACED_STEPS = 4


class _Stopped(Exception):
    """The runner stopped the trial at a rung (raised on every rank)."""


@dataclass
class JobResult:
    """What a data-parallel job produced.

    Attributes:
        result: what rank 0's task returned (tensors and plain values).
        ranks: every rank's report, by rank: ``rank``, ``world_size`` (as the rank saw it),
            ``samples`` (how many samples it trained on) and ``shard_sums`` (the sum of the inputs
            of each of its first shards).
    """

    result: dict[str, Any]
    ranks: list[dict[str, Any]]

    @property
    def world_size(self) -> int:
        """The world size the ranks saw (they agree, or the job would have failed)."""
        return int(self.ranks[0]["world_size"]) if self.ranks else 1


def _tensors(value: Any) -> Any:
    """``value`` with its tensors detached on the CPU (for the job file)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_tensors(v) for v in value)
    return value


def run_job(
    job: dict[str, Any],
    *,
    processes: int,
    folder: Path,
    worker: str = __name__,
    on_rung: Callable[[int, int, float], None] | None = None,
) -> JobResult:
    """Write ``job`` to ``folder/job.pt``, run ``worker`` over ``processes`` ranks under ``torchrun``,
    answer its rung reports, and return what it produced.

    Args:
        job: the task's inputs; ``teacher`` (a source :func:`load_teacher` loads), ``dtype``,
            ``batches`` (a batch source's ``record()``), ``held_out`` and ``rungs`` are read by
            every task.
        processes: DDP ranks (one GPU each where CUDA is available).
        folder: where the job, the rung files, the reports and the result are written.
        worker: the module ``torchrun`` runs (its ``__main__`` calls :func:`worker_main`).
        on_rung: ``on_rung(rung, iteration, score)`` in this process; it may raise to stop the
            trial, and the exception is raised here once the workers have stopped.

    Raises:
        TrainingFailed: a rank failed (its output is in ``folder/worker.log``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (*folder.glob("*.json"), folder / "result.pt"):
        stale.unlink(missing_ok=True)
    path = folder / "job.pt"
    torch.save(_tensors(job), path)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc_per_node={processes}",
        "-m",
        worker,
        str(path),
    ]
    log = folder / "worker.log"
    pending: BaseException | None = None
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        answered: set[int] = set()
        try:
            while process.poll() is None:
                for report_path in sorted(folder.glob("rung-*.json")):
                    report = json.loads(report_path.read_text())
                    k = int(report["rung"])
                    if k in answered:
                        continue
                    answered.add(k)
                    decision = "go"
                    if on_rung is not None and pending is None:
                        try:
                            on_rung(k, int(report["iteration"]), float(report["score"]))
                        except BaseException as exc:  # the runner's stop signal, or an error
                            pending, decision = exc, "stop"
                    _write(folder / f"decision-{k}.json", {"decision": decision})
                time.sleep(_POLL)
        except BaseException:
            process.kill()
            process.wait()
            raise
    if pending is not None:
        raise pending
    if process.returncode != 0:
        raise TrainingFailed(f"a data-parallel rank failed (exit {process.returncode}; {log}): {_root_cause(folder, log)}")
    ranks = [json.loads(p.read_text()) for p in sorted(folder.glob("rank-*.json"), key=lambda p: int(p.stem.split("-")[1]))]
    return JobResult(torch.load(folder / "result.pt", weights_only=True), ranks)


def fit_data_parallel(
    student: nn.Module,
    batches: Any,
    *,
    student_config: dict[str, Any],
    teacher_source: str,
    processes: int,
    folder: Path,
    held_out: Batch | None = None,
    rungs: list[int] | None = None,
    on_rung: Callable[[int, int, float], None] | None = None,
    worker: str = __name__,
    task: dict[str, Any] | None = None,
    **fit_options: Any,
) -> FitResult:
    """Train ``student`` as :func:`fit` would, over ``processes`` DDP ranks.

    Args:
        student: the model to train, with its starting weights.
        batches: its batch source (a ``PoolBatches`` or ``DataBatches``, as a run starts it); a
            pool's teacher is reloaded from ``teacher_source`` in every rank, and the pool's
            counters (teacher evaluations, finished trajectories) come back from rank 0.
        student_config: the student's diffusers config (every rank builds it from this).
        teacher_source: what :func:`~automl_diff.models.loading.load_teacher` loads the teacher from.
        processes: DDP ranks.
        folder: where the job is written (:func:`run_job`).
        held_out: the fixed batch rung scores are measured on.
        rungs: iteration counts after which rank 0 reports a score.
        on_rung: ``on_rung(rung, iteration, score)`` in this process (:func:`run_job`).
        worker: the module whose task trains the student (default: this one, the noise loss).
        task: what that worker's task needs besides the student (its loss, say).
        fit_options: the keyword arguments of :func:`fit` (iterations, batch_size, lr, ...).

    Returns:
        The training result; ``processes`` is the world size the ranks saw.

    Raises:
        TrainingFailed: a rank failed.
    """
    teacher = getattr(batches, "teacher", None)
    job = {
        "student_config": json.dumps(student_config),
        "student_state": student.state_dict(),
        "batches": batches.record(),
        "teacher": teacher_source,
        "dtype": str(next(teacher.parameters()).dtype).removeprefix("torch.") if teacher is not None else "float32",
        "held_out": None if held_out is None else held_out._asdict(),
        "rungs": list(rungs or ()),
        "fit": fit_options,
        "task": task or {},
    }
    done = run_job(job, processes=processes, folder=folder, worker=worker, on_rung=on_rung)
    student.load_state_dict(done.result["state"])
    if hasattr(batches, "set_counters"):
        batches.set_counters(done.result["counters"])
    return FitResult(student.eval(), losses=done.result["losses"], seconds=done.result["seconds"], processes=done.world_size)


def _root_cause(folder: Path, log: Path) -> str:
    """The exception that ended a failed job: the first one a rank raised (each writes
    ``error-<r>.json``; the others then fail on the broken group), else the log's last line."""
    errors = [json.loads(p.read_text()) for p in folder.glob("error-*.json")]
    if errors:
        return min(errors, key=lambda e: e["time"])["error"]
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _write(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


@dataclass
class Worker:
    """One rank of a data-parallel job, as its task sees it.

    Attributes:
        job: the job :func:`run_job` wrote.
        folder: the job's folder.
        rank, size: this rank and the world size.
        device: this rank's device.
        teacher: the teacher, reloaded from the job's source (the pool's labeller).
    """

    job: dict[str, Any]
    folder: Path
    rank: int
    size: int
    device: torch.device
    teacher: Teacher
    samples: int = 0
    shard_sums: tuple[float, ...] = ()

    def batches(self) -> Any:
        """The job's batch source on this rank (every rank draws the same global batches)."""
        return restore_batches(self.job["batches"], teacher=self.teacher.unet, device=self.device)

    def student(self) -> nn.Module:
        """The job's student with its starting weights."""
        student = unet_from_config(json.loads(self.job["student_config"]), where=str(self.folder / "job.pt")).to(self.device)
        student.load_state_dict(self.job["student_state"])
        return student

    def trace(self, shard: Any) -> None:
        """Count a shard this rank trains on (``samples``; the sums of the first shards)."""
        self.samples += len(shard[0])
        if len(self.shard_sums) < _TRACED_STEPS:
            self.shard_sums = (*self.shard_sums, float(shard[0].double().sum()))

    def traced(self, loss: Callable[[nn.Module, Any, int], torch.Tensor]) -> Callable[[nn.Module, Any, int], torch.Tensor]:
        """``loss`` counting the shards it is called on (:meth:`trace`)."""

        def counted(model: nn.Module, shard: Any, step: int) -> torch.Tensor:
            self.trace(shard)
            return loss(model, shard, step)

        return counted

    def _on_rung(self, k: int, iteration: int, model: nn.Module) -> None:
        flag = torch.zeros(1, device=self.device)
        if self.rank == 0:
            score = held_out_loss(model, Batch(**self.job["held_out"]))
            _write(self.folder / f"rung-{k}.json", {"rung": k, "iteration": iteration, "score": score})
            decision = self.folder / f"decision-{k}.json"
            while not decision.exists():
                time.sleep(_POLL)
            flag[0] = float(json.loads(decision.read_text())["decision"] == "stop")
        torch.distributed.broadcast(flag, 0)
        if flag.item():
            raise _Stopped

    def fit(self, student: nn.Module, batches: Any, loss: Callable[[nn.Module, Any, int], torch.Tensor] = noise_loss) -> dict[str, Any]:
        """:func:`fit` of ``student`` with the job's budgets and rungs; what rank 0 writes back."""
        rungs = self.job["rungs"]
        result = fit(student, batches, loss=self.traced(loss), rungs=rungs, on_rung=self._on_rung if rungs else None, **self.job["fit"])
        counters = batches.counters() if hasattr(batches, "counters") else {}
        state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
        return {"state": state, "losses": result.losses, "seconds": result.seconds, "counters": counters}


def worker_main(job_path: str, task: Callable[[Worker], dict[str, Any]]) -> None:
    """Run ``task`` on this rank of a ``torchrun`` job (a worker module's ``__main__``): rank 0
    writes what it returns to ``result.pt``; every rank writes its report."""
    folder = Path(job_path).parent
    local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank()
    try:
        job = torch.load(job_path, map_location=device, weights_only=True)
        teacher = load_teacher(job["teacher"], device=device, dtype=getattr(torch, job["dtype"]))
        worker = Worker(job, folder, rank, torch.distributed.get_world_size(), device, teacher)
        result = task(worker)
        report = {"rank": rank, "world_size": worker.size, "samples": worker.samples, "shard_sums": list(worker.shard_sums)}
        _write(folder / f"rank-{rank}.json", report)
        torch.distributed.barrier()
        if rank == 0:
            torch.save(result, folder / "result.pt")
    except _Stopped:
        return
    except BaseException as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
        _write(folder / f"error-{rank}.json", {"error": f"{type(exc).__name__}: {message}", "time": time.time()})
        raise
    finally:
        torch.distributed.destroy_process_group()


def _fit_student(worker: Worker) -> dict[str, Any]:
    """The default task: the student trained with the noise-prediction loss (DKDM)."""
    return worker.fit(worker.student(), worker.batches())


if __name__ == "__main__":
    worker_main(sys.argv[1], _fit_student)
