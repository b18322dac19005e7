"""Data-parallel training of one trial: torch DDP over ``processes`` ranks, launched by ``torchrun``.

The trial's own process keeps everything but the training: it builds the student and its batch
source, writes them with the budgets to a job file (the student's config and weights, the batch
source's tensors and generator state: tensors and plain values only, read back with
``weights_only=True``), and :func:`fit_data_parallel` runs::

    python -m torch.distributed.run --standalone --nproc_per_node N -m automl_diff.methods.training.ddp JOB

Every rank loads the job, reloads the frozen teacher from its source, and runs
:func:`~automl_diff.methods.training.loop.fit`, which is data-parallel under ``torch.distributed``
(gloo on CPU, NCCL on GPUs, one GPU per rank). Rank 0 writes the trained weights and the losses
back; the trial's process then evaluates and records the model as for any trial.

Rungs cross the process boundary as files: at a rung, rank 0 writes ``rung-<k>.json`` (the
held-out score) and waits for ``decision-<k>.json``, which the trial's process writes after its
runner has ruled (go on, or stop); rank 0 broadcasts the ruling to the other ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from automl_diff.methods.training.inputs import Batch, restore_batches
from automl_diff.methods.training.loop import FitResult, fit, held_out_loss
from automl_diff.models.loading import load_teacher, unet_from_config

__all__ = ["fit_data_parallel"]

#: Seconds between looks at the job folder (rung files, the worker's exit).
_POLL = 0.05


class _Stopped(Exception):
    """The runner stopped the trial at a rung (raised on every rank)."""


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
    **fit_options: Any,
) -> FitResult:
    """Train ``student`` as :func:`fit` would, over ``processes`` DDP ranks.

    Args:
        student: the model to train, with its starting weights.
        batches: its batch source (a ``PoolBatches`` or ``DataBatches``, as a run starts it); a
            pool's teacher is reloaded from ``teacher_source`` in every rank.
        student_config: the student's diffusers config (every rank builds it from this).
        teacher_source: what :func:`~automl_diff.models.loading.load_teacher` loads the teacher from.
        processes: DDP ranks (one GPU each where CUDA is available).
        folder: where the job, the rung files and the result are written.
        held_out: the fixed batch rung scores are measured on.
        rungs: iteration counts after which rank 0 reports a score.
        on_rung: ``on_rung(rung, iteration, score)`` in this process; it may raise to stop the
            trial, and the exception is raised here once the workers have stopped.
        fit_options: the keyword arguments of :func:`fit` (iterations, batch_size, lr, ...).

    Raises:
        RuntimeError: a rank failed (its output is in ``folder/worker.log``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (*folder.glob("*.json"), folder / "result.pt"):
        stale.unlink(missing_ok=True)
    teacher = getattr(batches, "teacher", None)
    job = folder / "job.pt"
    torch.save(
        {
            "student_config": json.dumps(student_config),
            "student_state": {k: v.detach().cpu() for k, v in student.state_dict().items()},
            "batches": batches.record(),
            "teacher": teacher_source,
            "dtype": str(next(teacher.parameters()).dtype).removeprefix("torch.") if teacher is not None else "float32",
            "held_out": None if held_out is None else {k: None if v is None else v.cpu() for k, v in held_out._asdict().items()},
            "rungs": list(rungs or ()),
            "fit": fit_options,
        },
        job,
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc_per_node={processes}",
        "-m",
        "automl_diff.methods.training.ddp",
        str(job),
    ]
    log = folder / "worker.log"
    pending: BaseException | None = None
    with log.open("w") as out:
        worker = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        answered: set[int] = set()
        try:
            while worker.poll() is None:
                for path in sorted(folder.glob("rung-*.json")):
                    report = json.loads(path.read_text())
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
            worker.kill()
            worker.wait()
            raise
    if pending is not None:
        raise pending
    if worker.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"data-parallel training failed (exit {worker.returncode}; {log}): {tail[0]}")
    result = torch.load(folder / "result.pt", weights_only=True)
    student.load_state_dict(result["state"])
    return FitResult(student.eval(), losses=result["losses"], seconds=result["seconds"])


def _write(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


def _main(job_path: str) -> None:
    folder = Path(job_path).parent
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    torch.distributed.init_process_group(backend)
    try:
        job = torch.load(job_path, map_location=device, weights_only=True)
        teacher = load_teacher(job["teacher"], device=device, dtype=getattr(torch, job["dtype"]))
        batches = restore_batches(job["batches"], teacher=teacher.unet, device=device)
        student = unet_from_config(json.loads(job["student_config"]), where=job_path).to(device)
        student.load_state_dict(job["student_state"])
        held_out = None if job["held_out"] is None else Batch(**job["held_out"])

        def on_rung(k: int, iteration: int, model: nn.Module) -> None:
            flag = torch.zeros(1, device=device)
            if rank == 0:
                score = held_out_loss(model, held_out)
                _write(folder / f"rung-{k}.json", {"rung": k, "iteration": iteration, "score": score})
                decision = folder / f"decision-{k}.json"
                while not decision.exists():
                    time.sleep(_POLL)
                flag[0] = float(json.loads(decision.read_text())["decision"] == "stop")
            torch.distributed.broadcast(flag, 0)
            if flag.item():
                raise _Stopped

        try:
            result = fit(student, batches, rungs=job["rungs"], on_rung=on_rung if job["rungs"] else None, **job["fit"])
        except _Stopped:
            return
        if rank == 0:
            state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
            torch.save({"state": state, "losses": result.losses, "seconds": result.seconds, "processes": size}, folder / "result.pt")
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _main(sys.argv[1])
