"""Data-parallel training of one trial: torch DDP over ``processes`` ranks, launched by ``torchrun``.

The trial's own process keeps everything but the training: it writes a job (the model's config and
weights, the batch source's tensors and generator state, the budgets and what the task needs:
tensors and plain values only, read back with ``weights_only=True``) and :func:`run_job` runs::

    python -m torch.distributed.run --standalone --nproc_per_node N -m WORKER JOB

or, with ``launcher="ray_train"`` (the Ray backend), as the workers of a Ray Train ``TorchTrainer``
run, whose placement group spreads them over the cluster's nodes (``SPREAD``); the job folder must
then be on storage every node reads (``output_dir`` on a shared disk). ``WORKER`` is a module
that names the task it runs in every rank ``TASK`` and whose ``__main__`` calls
:func:`worker_main` with it: this module trains a student with the noise-prediction loss (DKDM,
:func:`fit_data_parallel`); a method brings its own (DiffNAS: supernet training, and retraining
with its joint loss). Every
rank loads the job, reloads the frozen teacher from its source and runs the task under
``torch.distributed`` (gloo on CPU, NCCL on GPUs, one GPU per rank), where
:func:`~automl_diff.methods.training.loop.fit` is data-parallel: every rank draws the same global
batch and trains on its own share of it. Each rank writes ``rank-<r>.json`` (the world size it
saw, how many samples it trained on, the sums of its first shards, its node); rank 0 writes the
result. The
trial's process then evaluates and records the model as for any trial.

Rungs cross the process boundary as files: at a rung, rank 0 writes ``rung-<k>.json`` (the
held-out score) and waits for ``decision-<k>.json``, which the trial's process writes after its
runner has ruled (go on, or stop); rank 0 broadcasts the ruling to the other ranks.

A rank that fails ends the job: it writes ``error-<r>.json`` (its exception) before it exits, and
:class:`~automl_diff.methods.base.TrainingFailed` names the exit status and the first exception a
rank raised (the others then fail on the broken process group); the runner fails that trial alone.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
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

__all__ = ["LAUNCHERS", "JobResult", "Worker", "fit_data_parallel", "run_job", "worker_main"]

#: What starts a job's ranks: ``torchrun`` on this node, or ``ray_train`` (Ray Train's workers).
LAUNCHERS = ("torchrun", "ray_train")

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
            ``samples`` (how many samples it trained on), ``shard_sums`` (the sum of the inputs
            of each of its first shards) and ``node`` (its Ray node id, or host name).
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


class _Torchrun:
    """The ranks as ``torchrun``'s processes on this node."""

    def __init__(self, path: Path, worker: str, processes: int, log: Any) -> None:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={processes}"]
        self.process = subprocess.Popen(
            [*command, "-m", worker, str(path)], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )

    def poll(self) -> int | None:
        return self.process.poll()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def _ray_rank(config: dict[str, str]) -> None:
    """One Ray Train worker: the worker module's task on this rank (Ray Train set up the group)."""
    worker_main(config["job"], importlib.import_module(config["worker"]).TASK)


class _RayTrain:
    """The ranks as the workers of a Ray Train ``TorchTrainer`` run (gloo on CPU, NCCL with one GPU
    each), spread over the cluster's nodes by its placement group; ``fit`` runs in a thread."""

    def __init__(self, path: Path, worker: str, processes: int, log: Any) -> None:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        cuda = torch.cuda.is_available()
        self.log = log
        self.trainer = TorchTrainer(
            _ray_rank,
            train_loop_config={"job": str(path.resolve()), "worker": worker},
            scaling_config=ScalingConfig(num_workers=processes, use_gpu=cuda, placement_strategy="SPREAD"),
            torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
            run_config=RunConfig(
                name=f"{path.parent.name}-{uuid.uuid4().hex[:8]}",
                storage_path=str(path.parent.resolve() / "ray_train"),
                failure_config=FailureConfig(max_failures=0),  # a failed rank fails the job, as under torchrun
            ),
        )
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._fit, name=f"ray-train-{path.parent.name}", daemon=True)
        self.thread.start()

    def _fit(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as exc:  # reported through poll(); the ranks' own errors are in error-<r>.json
            self.error = exc
            self.log.write(f"{type(exc).__name__}: {exc}\n")
            self.log.flush()

    def poll(self) -> int | None:
        if self.thread.is_alive():
            return None
        return 1 if self.error is not None else 0

    def kill(self) -> None:
        """Nothing to kill from here: the run's actors belong to this process and end with it."""


def run_job(
    job: dict[str, Any],
    *,
    processes: int,
    folder: Path,
    worker: str = __name__,
    on_rung: Callable[[int, int, float], None] | None = None,
    launcher: str = "torchrun",
) -> JobResult:
    """Write ``job`` to ``folder/job.pt``, run ``worker`` over ``processes`` ranks (started by
    ``launcher``: ``torchrun`` or ``ray_train``), answer its rung reports, and return what it produced.

    Args:
        job: the task's inputs; ``teacher`` (a source :func:`load_teacher` loads), ``dtype``,
            ``batches`` (a batch source's ``record()``), ``held_out`` and ``rungs`` are read by
            every task.
        processes: DDP ranks (one GPU each where CUDA is available).
        folder: where the job, the rung files, the reports and the result are written.
        worker: the module every rank runs the ``TASK`` of.
        on_rung: ``on_rung(rung, iteration, score)`` in this process; it may raise to stop the
            trial, and the exception is raised here once the workers have stopped.
        launcher: ``torchrun`` (this node) or ``ray_train`` (Ray Train's workers, over the nodes
            of the Ray cluster this process is connected to).

    Raises:
        TrainingFailed: a rank failed (its output is in ``folder/worker.log``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (*folder.glob("*.json"), folder / "result.pt"):
        stale.unlink(missing_ok=True)
    path = folder / "job.pt"
    torch.save(_tensors(job), path)
    log = folder / "worker.log"
    pending: BaseException | None = None
    with log.open("w") as out:
        process = (_RayTrain if launcher == "ray_train" else _Torchrun)(path, worker, processes, out)
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
            raise
    if pending is not None:
        raise pending
    if process.poll() != 0:
        raise TrainingFailed(f"a data-parallel rank failed (exit {process.poll()}; {log}): {_root_cause(folder, log)}")
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
    launcher: str = "torchrun",
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
        launcher: what starts the ranks (:func:`run_job`).
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
    done = run_job(job, processes=processes, folder=folder, worker=worker, on_rung=on_rung, launcher=launcher)
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


def _node() -> str:
    """The node this rank runs on: its Ray node id under Ray Train, else the host name."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return socket.gethostname()


def worker_main(job_path: str, task: Callable[[Worker], dict[str, Any]]) -> None:
    """Run ``task`` on this rank of a job (a worker module's ``__main__`` under ``torchrun``, or a
    Ray Train worker, whose process group Ray Train set up): rank 0 writes what it returns to
    ``result.pt``; every rank writes its report."""
    folder = Path(job_path).parent
    owned = not torch.distributed.is_initialized()  # torchrun: this rank sets up its group
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"])) if owned else torch.cuda.current_device()
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if owned:
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank()
    try:
        job = torch.load(job_path, map_location=device, weights_only=True)
        teacher = load_teacher(job["teacher"], device=device, dtype=getattr(torch, job["dtype"]))
        worker = Worker(job, folder, rank, torch.distributed.get_world_size(), device, teacher)
        result = task(worker)
        report = {"rank": rank, "world_size": worker.size, "samples": worker.samples, "shard_sums": list(worker.shard_sums)}
        report["node"] = _node()
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
        if owned:
            torch.distributed.destroy_process_group()


def _fit_student(worker: Worker) -> dict[str, Any]:
    """The default task: the student trained with the noise-prediction loss (DKDM)."""
    return worker.fit(worker.student(), worker.batches())


#: What every rank runs (each worker module names its task ``TASK``; Ray Train's workers look it up).
TASK = _fit_student


if __name__ == "__main__":
    worker_main(sys.argv[1], TASK)
