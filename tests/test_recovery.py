"""Crash recovery: a diverged or out-of-memory trial fails with its reason and the study goes on;
a worker killed mid-trial leaves a trial that the restarted worker fails and retries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import optuna
import torch

from automl_diff.cli import main
from automl_diff.records import TrialAttr
from tests.conftest import REPO, TINY_BUDGETS, holding_env, wait_for_file

FAIL, COMPLETE, RUNNING = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING
FINISHED = (COMPLETE, optuna.trial.TrialState.PRUNED)


def test_diverged_and_out_of_memory_trials_fail_with_their_reason(study_factory, tmp_path, monkeypatch, capfd):
    """The first student's loss turns NaN, the second runs out of memory; both trials fail with
    ``fail_reason`` recorded (and no traceback), and the study still reaches its two finished trials."""
    import automl_diff.methods.dkdm.method as dkdm

    built = []
    real = dkdm.unet_from_config

    def faulty(config, **kwargs):
        unet = real(config, **kwargs)
        if len(built) == 0:
            unet.register_forward_hook(lambda module, args, out: type(out)(sample=out.sample * float("nan")))
        elif len(built) == 1:

            def out_of_memory(module, args, out):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

            unet.register_forward_hook(out_of_memory)
        built.append(unet)
        return unet

    monkeypatch.setattr(dkdm, "unet_from_config", faulty)
    config = study_factory(n_trials=2)
    assert main(["run", str(config), "--quiet"]) == 0
    _, err = capfd.readouterr()
    assert "Traceback" not in err
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study.db'}")
    failed = [t for t in study.trials if t.state == FAIL]
    assert [t.number for t in failed] == [0, 1]
    assert failed[0].user_attrs[TrialAttr.FAIL_REASON].startswith("TrainingDiverged: loss became nan")
    assert failed[1].user_attrs[TrialAttr.FAIL_REASON] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert len([t for t in study.trials if t.state in FINISHED]) == 2
    assert main(["trials", "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--json"]) == 0
    rows = json.loads(capfd.readouterr().out)
    assert rows[0]["state"] == "fail" and rows[0]["fail_reason"].startswith("TrainingDiverged")


def test_failure_budget_stops_a_run_that_only_fails(study_factory, tmp_path, monkeypatch, capfd):
    import automl_diff.methods.dkdm.method as dkdm

    real = dkdm.unet_from_config

    def diverging(config, **kwargs):
        unet = real(config, **kwargs)
        unet.register_forward_hook(lambda module, args, out: type(out)(sample=out.sample * float("inf")))
        return unet

    monkeypatch.setattr(dkdm, "unet_from_config", diverging)
    config = study_factory(n_trials=5, execution={"failure_budget": 2})
    assert main(["run", str(config), "--quiet"]) == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert [t.state for t in study.trials] == [FAIL, FAIL]


def _trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name="tiny", storage=storage).trials
    except KeyError:  # the worker has not created the study yet
        return []


def test_worker_killed_mid_trial_is_recovered_by_a_restarted_worker(study_factory, tmp_path):
    """SIGKILL during trial 1, then the same command again: trial 1 is failed for its missing
    heartbeat and retried with its parameters, trial 0 is untouched, two trials finish."""
    budgets = {**TINY_BUDGETS, "train_iterations": 6}
    config = study_factory(n_trials=2, budgets=budgets, execution={"heartbeat": 1})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    command = [sys.executable, "-m", "automl_diff.study", "run", str(config), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holding, marker = holding_env(tmp_path, trial=1)  # trial 1 holds mid-training until killed
    worker = subprocess.Popen(command, cwd=tmp_path, env=holding, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(marker, worker)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    victim = _trials(storage)[1]
    assert [t.state for t in _trials(storage)] == [COMPLETE, RUNNING] and victim.params  # killed mid-trial: nobody closed it
    before = {t.number: (t.values, t.user_attrs) for t in _trials(storage) if t.state == COMPLETE}

    restarted = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stderr
    assert "Traceback" not in restarted.stderr
    trials = _trials(storage)
    assert trials[victim.number].state == FAIL
    retries = [t for t in trials if victim.number in t.system_attrs.get("retry_history", [])]
    assert len(retries) == 1 and retries[0].params == victim.params and retries[0].state in FINISHED
    assert {t.number: (t.values, t.user_attrs) for t in trials if t.number in before} == before
    assert len([t for t in trials if t.state in FINISHED]) == 2
    rows = json.loads(
        subprocess.run(
            [sys.executable, "-m", "automl_diff.study", "trials", "--storage", storage, "--json"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    )
    assert rows[victim.number]["fail_reason"] == f"no heartbeat (its worker was lost); retried as trial {retries[0].number}"
