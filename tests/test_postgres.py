"""Studies on a real PostgreSQL server: one run, several workers sharing a study, a wrong password."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import optuna

from automl_diff.cli import main
from automl_diff.records import TrialAttr
from tests.conftest import POSTGRES_PASSWORD, REPO

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    from automl_diff.runners import open_storage

    return optuna.load_study(study_name="tiny", storage=open_storage(url, heartbeat_interval=None)).trials


def test_run_status_pareto_trials_on_postgres(study_factory, postgres_url, capfd):
    config = study_factory(storage=postgres_url)
    assert main(["run", str(config), "--quiet"]) == 0
    out, err = capfd.readouterr()
    assert "postgresql://automl:***@" in out and POSTGRES_PASSWORD not in out + err
    assert main(["status", "--storage", postgres_url, "--json"]) == 0
    status = json.loads(capfd.readouterr().out)
    assert status["study"] == "tiny" and sum(status["states"].values()) == 2
    assert main(["pareto", "--storage", postgres_url, "--json"]) == 0
    assert json.loads(capfd.readouterr().out)
    assert main(["run", str(config), "--quiet"]) == 0  # resumes: nothing to add
    assert len(_trials(postgres_url)) == 2


def test_workers_sharing_a_study_finish_exactly_n_trials(study_factory, postgres_url, tmp_path):
    """Three worker processes, started together on an empty database, finish exactly the study's
    five trials, never train one architecture twice, and never print the password."""
    config = study_factory(storage=postgres_url, n_trials=5)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "automl_diff.study", "run", str(config), "--quiet"]
    workers = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)
    ]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err
        assert POSTGRES_PASSWORD not in out + err and "Traceback" not in err
    trials = _trials(postgres_url)
    states = Counter(t.state for t in trials)
    assert states[optuna.trial.TrialState.COMPLETE] + states[optuna.trial.TrialState.PRUNED] == 5
    assert states[optuna.trial.TrialState.RUNNING] == states[optuna.trial.TrialState.WAITING] == 0
    # a trial that started when the study was already full failed as surplus, doing nothing
    assert all(t.user_attrs[TrialAttr.FAIL_REASON].startswith("surplus") for t in trials if t.state == optuna.trial.TrialState.FAIL)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == len(complete)
    assert sorted(t.number for t in trials) == list(range(len(trials)))


def test_wrong_password_is_one_line_without_the_password(study_factory, postgres_url, capfd):
    wrong = postgres_url.replace(POSTGRES_PASSWORD, "not-the-password")
    config = study_factory()
    for argv in (["run", str(config), "--storage", wrong], ["status", "--storage", wrong]):
        assert main(argv) == 2
        out, err = capfd.readouterr()
        assert "not-the-password" not in out + err and POSTGRES_PASSWORD not in out + err
        assert len(err.strip().splitlines()) == 1 and "password authentication failed" in err and "automl:***@" in err
