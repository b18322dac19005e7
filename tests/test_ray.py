"""The Ray Tune backend on a local Ray instance: the same trials, recorded in the same study."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest

from automl_diff.cli import main
from automl_diff.records import StudyAttr, TrialAttr
from tests.conftest import REPO, TINY_BUDGETS, holding_env, later_trials_score_worse_env, wait_for_file

pytest.importorskip("ray.tune")

COMPLETE, RUNNING, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL
FINISHED = (COMPLETE, optuna.trial.TrialState.PRUNED)


def _run_ray(config: Path, cwd: Path, *extra: str, timeout: int = 400, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = env or {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "automl_diff.study", "run", str(config), "--backend", "ray", "--quiet", *extra]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_ray_backend_records_trials_that_every_command_reads(study_factory, tmp_path, capfd):
    config = study_factory(execution={"cpus_per_trial": 1, "max_concurrent": 1, "max_failures": 1})
    # `ray start` recorded a cluster on this machine that has since died: a run without --address starts its own
    stale = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        (stale / "ray").mkdir()
        (stale / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")
        done = _run_ray(config, tmp_path, env={**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(stale)})
    finally:
        shutil.rmtree(stale, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Pareto front of study 'tiny'" in done.stdout
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert len(study.trials) == 2 and all(t.state in FINISHED for t in study.trials)
    assert study.user_attrs[StudyAttr.TEACHER_METRICS][TrialAttr.MACS] > 0
    for trial in study.trials:
        if trial.state == COMPLETE:
            assert {TrialAttr.MACS, TrialAttr.FID, TrialAttr.LATENCY, TrialAttr.WEIGHTS, TrialAttr.MODEL_CONFIG, TrialAttr.SPEEDUP} <= set(
                trial.user_attrs
            )
            assert trial.values == [trial.user_attrs[TrialAttr.MACS], trial.user_attrs[TrialAttr.FID]]
            assert (Path(trial.user_attrs[TrialAttr.WEIGHTS]) / "diffusion_pytorch_model.safetensors").is_file()
    # Tune kept a checkpoint (the trial folder) per trial
    experiment = Path(study.user_attrs[StudyAttr.RAY_EXPERIMENT])
    assert len(list(experiment.glob("*/checkpoint_*/unet/diffusion_pytorch_model.safetensors"))) == len(
        [t for t in study.trials if t.state == COMPLETE]
    )
    assert main(["status", "--storage", storage, "--json"]) == 0
    assert sum(json.loads(capfd.readouterr().out)["states"].values()) == 2
    assert main(["pareto", "--storage", storage, "--json"]) == 0
    front = json.loads(capfd.readouterr().out)
    assert main(["export", "--storage", storage, "--trial", str(front[0]["trial"]), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    # a second run reaches the new total: one more trial, in a new Tune experiment
    again = _run_ray(config, tmp_path, "--n-trials", "3")
    assert again.returncode == 0, again.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert len([t for t in study.trials if t.state in FINISHED]) == 3 == len(study.trials)


def test_interrupted_ray_experiment_resumes(study_factory, tmp_path):
    """Ctrl-C while a Tune trial runs leaves it running in the study; the same command restores
    the Tune experiment and retries that trial."""
    budgets = {
        "train_iterations": 40,
        "batch_size": 8,
        "fid_samples": 24,
        "sampling_steps": 2,
        "latency_repeats": 1,
        "latency_batch_size": 2,
    }
    config = study_factory(n_trials=1, budgets=budgets, execution={"max_concurrent": 1})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    holding, marker = holding_env(tmp_path, trial=0)  # the Tune trial holds mid-training until interrupted
    command = [sys.executable, "-m", "automl_diff.study", "run", str(config), "--backend", "ray", "--quiet"]
    driver = subprocess.Popen(command, cwd=tmp_path, env=holding, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(marker, driver)
        driver.send_signal(signal.SIGINT)
        driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    trials = optuna.load_study(study_name="tiny", storage=storage).trials
    assert [t.state for t in trials] == [RUNNING]
    resumed = _run_ray(config, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the interrupted Ray Tune experiment" in resumed.stderr
    trials = optuna.load_study(study_name="tiny", storage=storage).trials
    # the interrupted attempt's work went with its Ray instance: that trial fails with the reason,
    # and a new trial with its parameters, naming it in its retry history, completes the study
    assert [t.state for t in trials] == [FAIL, COMPLETE]
    assert "is no longer in the cluster" in trials[0].user_attrs[TrialAttr.FAIL_REASON]
    assert trials[1].system_attrs["retry_history"] == [0] and trials[1].params == trials[0].params


def test_ray_trials_stop_at_rungs_by_the_same_multi_objective_decision_as_local_ones(study_factory, tmp_path, capfd):
    """Each trial scores worse than the ones before it (the patched score is the clock). Trial 1
    (more MACs than trial 0, a worse score) is dominated and stopped at its first rung; trial 2 has
    the worst score of all but the fewest MACs, so it stays on the rung's front and completes,
    where a single-objective scheduler (Tune's ASHA) would have stopped it first."""
    config = study_factory(
        n_trials=3,
        execution={"cpus_per_trial": 1, "max_concurrent": 1, "max_failures": 0},
        budgets={**TINY_BUDGETS, "train_iterations": 8},
        pruner={"name": "mo_asha", "rungs": [0.25, 0.5], "reduction_factor": 2, "min_trials": 2},
    )
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="tiny", storage=storage, directions=["minimize", "minimize"])
    large = {"down.0.channels": 8, "down.1.channels": 16, "down.1.layers": 2}
    for params in ({**large, "down.1.attention": False}, {**large, "down.1.attention": True}):
        study.enqueue_trial(params)
    study.enqueue_trial({"down.0.channels": 4, "down.1.channels": 8, "down.1.layers": 1, "down.1.attention": False})
    done = _run_ray(config, tmp_path, env=later_trials_score_worse_env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    trials = optuna.load_study(study_name="tiny", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    macs = [t.user_attrs[TrialAttr.RUNG_MACS] for t in trials]
    scores = [t.user_attrs[TrialAttr.RUNG_SCORES]["0"] for t in trials]
    assert macs[2] < macs[0] < macs[1] and scores[0] < scores[1] < scores[2]
    stopped = trials[1].user_attrs
    assert stopped[TrialAttr.PRUNED_AT_RUNG] == 0 and "off their front" in stopped[TrialAttr.PRUNE_REASON]
    assert set(trials[2].user_attrs[TrialAttr.RUNG_SCORES]) == {"0", "1"}
    assert main(["trials", "--storage", storage, "--study-name", "tiny"]) == 0
    assert "off their front" in capfd.readouterr().out
