"""The Ray backend on a real multi-node cluster (Ray's own test cluster: a head and two worker
nodes, each its own raylet with its own resources, on this machine), the study on PostgreSQL:
trials spread over the nodes, a node killed mid-trial, and a data-parallel trial whose ranks run
on two nodes."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from automl_diff.cli import main
from automl_diff.records import TrialAttr
from tests.conftest import holding_env, printed_load_calls, sample_without_automl_diff, wait_for_file

pytest.importorskip("ray.tune")

COMPLETE, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL
#: Each node's shared-memory object store: the trials pass nothing big through it.
_OBJECT_STORE = 100 * 1024 * 1024


@contextlib.contextmanager
def ray_cluster(workers: int = 2) -> Iterator[tuple]:
    """A head node without CPUs (no trial can run there) and ``workers`` nodes of one CPU each.
    Their processes inherit this process's environment (``PYTHONPATH`` included)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, "object_store_memory": _OBJECT_STORE}
    )
    try:
        nodes = [cluster.add_node(num_cpus=1, object_store_memory=_OBJECT_STORE) for _ in range(workers)]
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        cluster.shutdown()


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    from automl_diff.runners import open_storage

    return optuna.load_study(study_name="tiny", storage=open_storage(url, heartbeat_interval=None)).trials


def _node_of(url: str, number: int) -> str | None:
    trial = next((t for t in _trials(url) if t.number == number), None)
    return trial.user_attrs.get(TrialAttr.NODE, {}).get("id") if trial is not None else None


def test_trials_spread_over_the_nodes_and_a_node_killed_mid_trial_is_retried_elsewhere(
    study_factory, postgres_url, tmp_path, monkeypatch, capfd
):
    """Trial 0 holds mid-training on one worker node while trial 1 runs on the other; that node
    is then killed (its raylet and plasma store, SIGKILL; its workers go with them). Trial 0
    fails with a reason that names the dead node, a new trial with its parameters retries it on
    the surviving node, trial 1's result is untouched, and the study reaches its total."""
    config = study_factory(storage=postgres_url, n_trials=3, execution={"cpus_per_trial": 1, "max_concurrent": 2, "max_failures": 1})
    env, marker = holding_env(tmp_path, trial=0)
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])  # the nodes' workers hold trial 0 too
    with ray_cluster() as (cluster, nodes):
        ids = {node.node_id: node for node in nodes}
        command = [
            sys.executable,
            "-m",
            "automl_diff.study",
            "run",
            str(config),
            "--backend",
            "ray",
            "--address",
            cluster.address,
            "--quiet",
        ]
        driver = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_file(marker, driver)
            doomed = _node_of(postgres_url, 0)
            assert doomed in ids
            killed = time.time()
            cluster.remove_node(ids[doomed], allow_graceful=False)
            out, err = driver.communicate(timeout=600)
        finally:
            if driver.poll() is None:
                driver.kill()
        assert driver.returncode == 0, err[-3000:]
        trials = _trials(postgres_url)
    lost = trials[0]
    assert lost.state == FAIL and lost.user_attrs[TrialAttr.NODE]["id"] == doomed
    reason = lost.user_attrs[TrialAttr.FAIL_REASON]  # once the cluster knows, the reason names the dead node
    assert reason.startswith(f"lost mid-trial: Ray node {doomed[:12]}") and reason.endswith("died"), reason
    retries = [t for t in trials if t.system_attrs.get("retry_history") == [0]]
    assert len(retries) == 1 and retries[0].state == COMPLETE and retries[0].params == lost.params
    assert retries[0].user_attrs[TrialAttr.NODE]["id"] != doomed
    assert retries[0].datetime_start.timestamp() > killed  # retried after the node died, not before
    # exactly the total: three finished trials, the lost one failed and nothing left running
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"]
    ran_on = {t.user_attrs[TrialAttr.NODE]["id"] for t in trials}
    assert ran_on == set(ids)  # both worker nodes ran trials; the head, without CPUs, none
    assert all(t.user_attrs[TrialAttr.WEIGHTS] and Path(t.user_attrs[TrialAttr.WEIGHTS]).is_dir() for t in trials if t.state == COMPLETE)
    assert "retried as trial" in err
    assert main(["trials", "--storage", postgres_url, "--study-name", "tiny"]) == 0
    assert "lost mid-trial" in capfd.readouterr().out
    # the retried trial exports like any other, and the export loads and samples with diffusers alone
    out_dir = tmp_path / "export"
    export = ["export", "--storage", postgres_url, "--study-name", "tiny", "--trial", str(retries[0].number), "--out", str(out_dir)]
    assert main(export) == 0
    (call,) = printed_load_calls(capfd.readouterr().out)
    seen = sample_without_automl_diff(call, cwd=tmp_path)
    assert seen["shape"][0] == 2 and not seen["imported"]


@pytest.mark.slow
def test_a_data_parallel_trial_runs_its_ranks_on_two_nodes_and_trains_what_one_process_trains(study_factory, tmp_path):
    """``launcher: ray_train`` (the Ray backend's default) runs a trial's two ranks as Ray Train
    workers, one on each worker node (each has one CPU): the same losses, rung scores and weights
    as one process on the same global batches, in a world of two."""
    import ray

    from automl_diff.methods.base import TrainAttr
    from tests.test_cheaper_search import _flat_close, _ranks, train_in_one_and_two_processes

    with ray_cluster() as (cluster, nodes):
        ray.init(address=cluster.address, logging_level="ERROR")  # the trial's process, connected as a Tune worker is
        try:
            config, _, outcome = train_in_one_and_two_processes(study_factory, tmp_path, launcher="ray_train")
        finally:
            ray.shutdown()
    (one, one_rungs), (two, two_rungs) = outcome[1], outcome[2]
    assert two.attrs[TrainAttr.TRAIN_PROCESSES] == 2
    for key in (TrainAttr.TRAIN_LOSS_FIRST, TrainAttr.TRAIN_LOSS_LAST):
        assert two.attrs[key] == pytest.approx(one.attrs[key], rel=1e-4, abs=1e-6)
    assert [r[:2] for r in two_rungs] == [r[:2] for r in one_rungs] == [(0, 3)]
    assert two_rungs[0][2] == pytest.approx(one_rungs[0][2], rel=1e-4)
    _flat_close(one.unet, two.unet, config.budgets.lr, config.budgets.train_iterations)
    ranks = _ranks(tmp_path / "p2" / "ddp" / "trial_0")
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["samples"] for r in ranks] == [6 * config.budgets.batch_size // 2] * 2
    assert {r["node"] for r in ranks} == {node.node_id for node in nodes}  # one rank on each worker node
