"""The Ray backend on a multi-node cluster: trials per node, the backend's overhead per trial
against the local runner, and the time from a node's death to its trial's retry.

The cluster is Ray's own test cluster on this machine (``ray.cluster_utils.Cluster``): a head
node without CPUs and ``--nodes`` worker nodes of one CPU each, every node its own raylet and
object store. The study is a short DKDM study on the shipped digits teacher (``--trials`` trials,
``--iterations`` training steps each, FID on 100 samples); every run uses one torch thread per
trial (``OMP_NUM_THREADS=1``, what Ray gives a one-CPU worker), so the runners differ only in
their bookkeeping.

1. Local: ``study run`` (one process, trials one after another).
2. Ray, one trial at a time (``max_concurrent: 1``) on the cluster: the same trials; the
   difference in wall time per trial is the backend's overhead (Ray and Tune start-up, worker
   processes importing torch, Tune's checkpoints).
3. Ray, as many trials as nodes: the trials per node.
4. Ray, as many trials as nodes, and the node of the first running trial killed (SIGKILL of its
   raylet) ``--kill-after`` seconds after that trial started: the seconds from the kill to the
   retry's start on another node, and what the study holds afterwards.

    python experiments/ray_cluster.py --trials 6 --nodes 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from automl_diff.records import TrialAttr  # noqa: E402
from tests.test_ray_cluster import ray_cluster  # noqa: E402


def _config(folder: Path, name: str, *, trials: int, iterations: int, execution: dict | None = None) -> Path:
    config = {
        "name": name,
        "method": "dkdm",
        "teacher": "digits",
        "search_space": str(REPO / "search_spaces" / "digits_dkdm.yaml"),
        "objectives": [{"name": "macs", "direction": "minimize"}, {"name": "fid", "direction": "minimize"}],
        "sampler": {"name": "random", "seed": 0},
        "n_trials": trials,
        "budgets": {
            "train_iterations": iterations,
            "batch_size": 32,
            "fid_samples": 100,
            "sampling_steps": 10,
            "latency_repeats": 1,
            "latency_batch_size": 8,
        },
        "storage": f"sqlite:///{folder / (name + '.db')}",
        "output_dir": str(folder / "runs"),
        "device": "cpu",
        "seed": 0,
        "method_options": {"pool_size": 256, "pool_steps": 20},
        "execution": {"cpus_per_trial": 1, **(execution or {})},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(config: Path, *extra: str) -> tuple[float, subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "automl_diff.study", "run", str(config), "--quiet", *extra]
    return time.perf_counter(), subprocess.Popen(
        command, cwd=config.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(start: float, process: subprocess.Popen) -> float:
    _, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"study run failed ({process.returncode}): {err[-2000:]}")
    return time.perf_counter() - start


def _trials(config: Path) -> list[optuna.trial.FrozenTrial]:
    loaded = yaml.safe_load(config.read_text())
    return optuna.load_study(study_name=loaded["name"], storage=loaded["storage"]).trials


def _per_trial(trials: list[optuna.trial.FrozenTrial]) -> float:
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    return sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done) / len(done)


def _kill_running(config: Path, cluster, workers, after: float) -> float:
    """Kill the node of the first trial seen running, ``after`` seconds after it started; the kill's time."""
    by_id = {w.node_id: w for w in workers}
    while True:
        try:
            trials = _trials(config)
        except KeyError:  # the driver has not created the study yet
            trials = []
        running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and TrialAttr.NODE in t.user_attrs]
        if running:
            trial = running[0]
            time.sleep(max(0.0, after - (time.time() - trial.datetime_start.timestamp())))
            killed = time.time()
            cluster.remove_node(by_id[trial.user_attrs[TrialAttr.NODE]["id"]], allow_graceful=False)
            print(f"killed the node of trial {trial.number} ({trial.user_attrs[TrialAttr.NODE]['id'][:12]})", flush=True)
            return killed
        time.sleep(0.5)


def _local(folder: Path, args: argparse.Namespace) -> float:
    """Step 1, before the cluster starts: the local runner's wall time."""
    local = _config(folder, "local", trials=args.trials, iterations=args.iterations)
    wall = _finish(*_run(local))
    inside = _per_trial(_trials(local))
    print(f"local: {args.trials} trials in {wall:.0f} s, {wall / args.trials:.1f} s per trial ({inside:.1f} s inside the trial)")
    return wall


def _overhead_and_spread(folder: Path, cluster, workers, args: argparse.Namespace, wall: float) -> None:
    """Steps 2 and 3: Ray one trial at a time against the local runner's ``wall``, one trial per node."""
    names = {w.node_id: f"node {i}" for i, w in enumerate(workers)}
    serial = _config(folder, "ray_serial", trials=args.trials, iterations=args.iterations, execution={"max_concurrent": 1})
    ray_wall = _finish(*_run(serial, "--backend", "ray", "--address", cluster.address))
    print(
        f"ray, one at a time: {ray_wall:.0f} s, {ray_wall / args.trials:.1f} s per trial ({_per_trial(_trials(serial)):.1f} s inside "
        f"the trial); overhead {(ray_wall - wall) / args.trials:.1f} s per trial"
    )
    spread = _config(folder, "ray_spread", trials=args.trials, iterations=args.iterations, execution={"max_concurrent": args.nodes})
    spread_wall = _finish(*_run(spread, "--backend", "ray", "--address", cluster.address))
    count = Counter(names[t.user_attrs[TrialAttr.NODE]["id"]] for t in _trials(spread))
    print(f"ray, {args.nodes} at a time: {spread_wall:.0f} s; trials per node: {dict(sorted(count.items()))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--kill-after", type=float, default=10.0)
    parser.add_argument("--only-kill", action="store_true", help="measure the node's death alone (step 4)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ray_cluster_"))
    wall = None if args.only_kill else _local(folder, args)
    os.environ["OMP_NUM_THREADS"] = "1"  # the nodes' workers inherit it
    with ray_cluster(args.nodes) as (cluster, workers):
        if wall is not None:
            _overhead_and_spread(folder, cluster, workers, args, wall)
        lose = _config(
            folder, "ray_lose", trials=args.trials, iterations=args.iterations, execution={"max_concurrent": args.nodes, "max_failures": 1}
        )
        start, process = _run(lose, "--backend", "ray", "--address", cluster.address)
        killed = _kill_running(lose, cluster, workers, args.kill_after)
        lose_wall = _finish(start, process)
    trials = _trials(lose)
    lost = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    retries = [t for t in trials if t.system_attrs.get("retry_history")]
    states = Counter(t.state.name for t in trials)
    print(f"ray, a node killed: {lose_wall:.0f} s; states {dict(states)}")
    for t in lost:
        print(f"  trial {t.number}: {t.user_attrs.get(TrialAttr.FAIL_REASON)}")
    for t in retries:
        after = t.datetime_start.timestamp() - killed
        print(f"  trial {t.number} retries {t.system_attrs['retry_history']}: started {after:.1f} s after the kill")


if __name__ == "__main__":
    main()
