"""Trial bookkeeping throughput: per-trial storage overhead of the local runner, and ``pareto`` on
a study of 1000 trials.

1. Overhead: the real runner loop (``automl_diff.runners.local.run_study``: stale-trial check,
   trial counts, sampler, ``study.optimize`` with its heartbeat thread, admission, duplicate
   check) runs trials whose objective does every storage call a real trial makes and nothing
   else: the method's ``suggest`` on the quickstart search space, the user attributes a real
   quickstart trial recorded (replayed from a reference study), its fingerprint and the duplicate
   check, the metrics through ``StudySession._record``, the sample-grid artifact and its dashboard
   note, and the tell. Its time per trial is compared with the wall time of the reference study's
   real trials.
2. ``pareto``: 1000 such trials recorded in an SQLite study, then the ``pareto`` command timed
   end to end (a fresh process) and in-process (load the study, compute the front, format it).

Usage::

    python experiments/storage_overhead.py --reference sqlite:///quickstart.db \\
        [--postgres postgresql://user:pw@127.0.0.1:5432/bench] [--trials 50] [--pareto-trials 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from automl_diff.config import OptunaSampler, load_study_config  # noqa: E402
from automl_diff.evaluation import ModelMetrics  # noqa: E402
from automl_diff.records import METRICS, StudyAttr, TrialAttr, stable_key  # noqa: E402
from automl_diff.runners import local, mask_url, open_storage  # noqa: E402
from automl_diff.runners.session import StudySession  # noqa: E402

#: What a trial's replayed attributes leave out: the runner writes them itself (metrics, ratios to
#: the teacher, the fingerprint before the duplicate check).
WRITTEN_BY_RUNNER = frozenset({*METRICS, TrialAttr.SPEEDUP, TrialAttr.MACS_REDUCTION, TrialAttr.FINGERPRINT, TrialAttr.DUPLICATE_OF})


def reference_trials(url: str) -> tuple[list[float], dict[str, Any], dict[str, Any]]:
    """Wall seconds of the reference study's completed trials, one trial's user attributes, and
    the teacher metrics."""
    storage = open_storage(url, create=False, heartbeat_interval=None)
    name = optuna.study.get_all_study_names(storage)[0]
    study = optuna.load_study(study_name=name, storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    return seconds, dict(done[0].user_attrs), dict(study.user_attrs.get(StudyAttr.TEACHER_METRICS, {}))


class BookkeepingSession:
    """Stands in for :class:`StudySession`: a trial's storage calls without its training."""

    def __init__(self, config: Any, attrs: dict[str, Any], teacher: dict[str, Any], workdir: Path, seed: int = 0) -> None:
        self.config = config
        self.space = config.search_space
        self.attrs = {k: v for k, v in attrs.items() if k not in WRITTEN_BY_RUNNER}
        self.teacher = teacher
        self.workdir = workdir
        self.generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(16, 1, 16, 16, generator=self.generator) * 2 - 1
        #: The study's storage, as the runner hands it to a real session (the sample notes name ids in it).
        self.storage: optuna.storages.BaseStorage | None = None

    def record_teacher(self, study: optuna.Study) -> dict[str, Any]:
        return self.teacher

    def objective(self, trial: optuna.Trial) -> tuple[float, ...]:
        from automl_diff.runners.artifacts import artifact_store, attach_samples

        params = self.space.suggest(trial)
        fingerprint = stable_key(params)  # a DKDM trial's fingerprint: its parameters
        trial.set_user_attr(TrialAttr.FINGERPRINT, fingerprint)
        duplicate = StudySession._duplicate_of(trial.study, trial, fingerprint)
        if duplicate is not None:
            trial.set_user_attr(TrialAttr.DUPLICATE_OF, duplicate)
            raise optuna.TrialPruned(f"same model as trial {duplicate}")
        for key, value in self.attrs.items():
            trial.set_user_attr(key, value)
        width = sum(v for k, v in params.items() if k.endswith("channels"))
        macs = int(width * 4e5 * (1 + 0.1 * torch.rand(1, generator=self.generator).item()))
        metrics = ModelMetrics(
            params=width * 5000,
            macs=macs,
            macs_no_attention=int(macs * 0.97),
            trajectory_macs=macs * 20,
            fid=float(3e9 / macs + torch.rand(1, generator=self.generator).item()),
            latency=macs / 2e9,
        )
        StudySession._record(trial, metrics, self.teacher)
        attach_samples(
            trial,
            self.images,
            folder=self.workdir / f"trial_{trial.number}",
            store=artifact_store(self.workdir / "artifacts"),
            metrics=metrics.to_dict(),
            storage=self.storage,
        )
        return metrics.macs, metrics.fid


class StorageClock:
    """Wraps every public method of a storage and adds up the seconds spent in them (all threads:
    the heartbeat thread's writes count too). Several storages may be wrapped, one in front of the
    other: a call counts once, where it enters the outermost wrapped storage."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._depth = threading.local()

    def wrap(self, storage: optuna.storages.BaseStorage) -> None:
        for name in dir(optuna.storages.BaseStorage):
            if name.startswith("_") or not callable(getattr(storage, name, None)):
                continue
            setattr(storage, name, self._timed(getattr(storage, name)))

    def _timed(self, method: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._depth, "value", 0)
            self._depth.value = depth + 1
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._depth.value = depth
                if depth == 0:
                    self.seconds += time.perf_counter() - start
                    self.calls += 1

        return timed


def run_bookkeeping(
    config: Any, url: str, *, trials: int, attrs: dict[str, Any], teacher: dict[str, Any], workdir: Path
) -> dict[str, float]:
    """Per trial of the runner loop with bookkeeping-only trials: seconds in storage calls, their
    count, seconds writing artifact files, and the loop's whole wall time (sampler, garbage
    collection after each trial and the storage included)."""
    session = BookkeepingSession(config, attrs, teacher, workdir)
    clock = StorageClock()

    def start_study(config: Any, *, storage_url: str, study_name: str, progress: bool = False) -> Any:
        study, storage = local.open_study(config, storage_url=storage_url, study_name=study_name)
        # the study's calls go through the cache Optuna puts in front of an RDB storage: load the
        # study on one we hold, and time both it and the storage the session writes to directly
        cached = optuna.storages.get_storage(storage)
        study = optuna.load_study(study_name=study_name, storage=cached, sampler=study.sampler)
        clock.wrap(cached)
        clock.wrap(storage)
        session.storage = storage
        return session, study

    from automl_diff.runners import artifacts

    original_upload = artifacts.artifact_store
    files = [0.0]

    def store(folder: Any) -> Any:  # the artifact store's file writes, outside the RDB storage
        inner = original_upload(folder)
        write = inner.write

        def timed_write(artifact_id: str, content_body: Any) -> None:
            start = time.perf_counter()
            write(artifact_id, content_body)
            files[0] += time.perf_counter() - start

        inner.write = timed_write
        return inner

    original = local.start_study
    local.start_study = start_study
    artifacts.artifact_store = store
    try:
        start = time.perf_counter()
        study = local.run_study(config, storage_url=url, study_name="bench", n_trials=trials)
        wall = time.perf_counter() - start
    finally:
        local.start_study = original
        artifacts.artifact_store = original_upload
    finished = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)))
    assert finished == trials, finished
    return {"storage": clock.seconds / trials, "calls": clock.calls / trials, "files": files[0] / trials, "wall": wall / trials}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="storage of a finished quickstart study (real trial times and attributes)")
    parser.add_argument("--postgres", default=None, help="an empty PostgreSQL database URL to measure as well")
    parser.add_argument("--trials", type=int, default=50, help="bookkeeping trials per storage (default 50)")
    parser.add_argument("--pareto-trials", type=int, default=1000, help="trials of the study that pareto reads (default 1000)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    seconds, attrs, teacher = reference_trials(args.reference)
    trial_time = statistics.median(seconds)
    print(
        f"reference: {len(seconds)} quickstart trials, median {trial_time:.1f} s per trial (min {min(seconds):.1f}, max {max(seconds):.1f})"
    )
    config = load_study_config(REPO / "studies" / "quickstart.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        storages = [("sqlite", f"sqlite:///{tmp_path / 'bench.db'}")]
        if args.postgres:
            storages.append(("postgresql", args.postgres))
        for label, url in storages:
            r = run_bookkeeping(config, url, trials=args.trials, attrs=attrs, teacher=teacher, workdir=tmp_path / label)
            bookkeeping = r["storage"] + r["files"]
            print(
                f"{label} ({mask_url(url)}), {args.trials} trials: per trial "
                f"{r['calls']:.0f} storage calls in {r['storage'] * 1000:.1f} ms "
                f"+ artifact files {r['files'] * 1000:.1f} ms = {bookkeeping * 1000:.1f} "
                f"ms = {100 * bookkeeping / trial_time:.3f}% of a quickstart trial; "
                f"whole runner loop (with sampler and gc) {r['wall'] * 1000:.0f} ms = {100 * r['wall'] / trial_time:.2f}%"
            )

        random_config = config.with_overrides(sampler=OptunaSampler("random", 0))
        url = f"sqlite:///{tmp_path / 'pareto.db'}"
        start = time.perf_counter()
        # the same trials, recorded in one optimize call (no per-trial garbage collection)
        session = BookkeepingSession(random_config, attrs, teacher, tmp_path / "pareto")
        study, session.storage = local.open_study(random_config, storage_url=url, study_name="bench")
        session.record_teacher(study)
        study.set_user_attr(StudyAttr.TEACHER_METRICS, teacher)
        study.optimize(session.objective, n_trials=args.pareto_trials)
        print(f"recorded {args.pareto_trials} trials in {time.perf_counter() - start:.1f} s")

        env = {**os.environ, "PYTHONPATH": str(REPO)}
        command = [sys.executable, "-m", "automl_diff.study", "pareto", "--storage", url]
        walls = []
        for _ in range(3):
            start = time.perf_counter()
            proc = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            walls.append(time.perf_counter() - start)
        rows = len(proc.stdout.strip().splitlines()) - 3
        from automl_diff.cli.commands import pareto_table
        from automl_diff.runners import load_existing_study

        inproc = []
        for _ in range(3):
            start = time.perf_counter()
            pareto_table(load_existing_study(url, None))
            inproc.append(time.perf_counter() - start)
        print(
            f"pareto on {args.pareto_trials} trials ({rows} on the front): end to end {min(walls):.2f} s "
            f"(best of 3; {', '.join(f'{w:.2f}' for w in walls)}), in-process {min(inproc):.3f} s (best of 3)"
        )


if __name__ == "__main__":
    main()
