"""The artifact store: a study's weights, sample grids and text-to-image parts copied where every
host can read them (a folder on shared storage, or an S3 bucket: moto's S3 server here), so that
``export`` and ``report`` work on a host that has neither the trials' folders nor the teacher."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import optuna
import pytest

from automl_diff.cli import main
from automl_diff.records import StudyAttr, TrialAttr
from tests.conftest import TINY_PROMPTS, printed_load_calls, sample_without_automl_diff, write_study

BUCKET = "automl-diff"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on a local port, with one bucket; yields its URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    credentials = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}
    boto3.client("s3", endpoint_url=url, **credentials).create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """boto3 pointed at the server the way a user points it at theirs: the environment."""
    for key, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    return s3_endpoint


def _bucket_keys(endpoint: str) -> list[str]:
    import boto3

    listed = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=BUCKET)
    return [item["Key"] for item in listed.get("Contents", [])]


def test_a_text_to_image_study_exports_and_reports_from_a_host_without_its_folders(tiny_sd_dir, tmp_path, s3_env, capsys):
    """DiP-GO on a pipeline folder with an S3 store; then the trials' folders and the teacher are
    deleted (another host has neither), and export and report read everything from the bucket."""
    teacher = shutil.copytree(tiny_sd_dir, tmp_path / "teacher")
    (tmp_path / "train.txt").write_text("\n".join(TINY_PROMPTS) + "\n")
    (tmp_path / "eval.txt").write_text("a handwritten seven\nthe digit 2\n")
    config = write_study(
        tmp_path,
        teacher,
        tmp_path / "unused.yaml",
        name="remote",
        method="dipgo",
        search_space=None,
        objectives=[{"name": "trajectory_macs"}, {"name": "fid"}],
        n_trials=4,
        budgets={"train_iterations": 4, "batch_size": 2, "lr": 0.05, "fid_samples": 4, "images_per_prompt": 2, "sampling_steps": 4},
        prompts={"train": "train.txt", "eval": "eval.txt"},
        method_options={"granularity": "layer", "reference_images": 2, "warmup": 0.0, "target_macs_ratio": 0.5, "sparsity_weight": 5.0},
        execution={"artifact_store": f"s3://{BUCKET}/studies/remote"},
    )
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.load_study(study_name="remote", storage=storage)
    assert study.user_attrs[StudyAttr.ARTIFACT_STORE] == f"s3://{BUCKET}/studies/remote"
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) >= 2
    # every schedule gates the one teacher: its weights are uploaded once, not per trial
    assert len({t.user_attrs[TrialAttr.WEIGHTS_ARTIFACT] for t in complete}) == 1
    keys = _bucket_keys(s3_env)
    assert keys and all(key.startswith("studies/remote/") for key in keys)
    assert len(keys) == 2 + len(complete)  # the teacher's parts, its UNet, one sample grid per trial

    shutil.rmtree(tmp_path / "runs")
    shutil.rmtree(teacher)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    capsys.readouterr()
    assert main(["export", "--storage", storage, "--study-name", "remote", "--pareto", "--out", str(elsewhere / "front")]) == 0
    calls = printed_load_calls(capsys.readouterr().out)
    assert calls and all(call.startswith("diffusers.StableDiffusionPipeline.from_pretrained(") for call in calls)
    seen = sample_without_automl_diff(calls[0], cwd=elsewhere, prompt="the digit 2")
    assert seen["unet"] == "UNet2DConditionModel" and seen["shape"] == [2, 16, 16, 1]
    report = elsewhere / "report.html"
    assert main(["report", "--storage", storage, "--study-name", "remote", "--out", str(report)]) == 0
    assert report.read_text().count("<img class='samples'") == len(calls)  # each front trial's grid, from the bucket
    # the dashboard serves the grid its note links to from the bucket too
    assert _dashboard_get(storage, _note_image(storage, complete[0])).startswith(b"\x89PNG")


def _note_image(storage: str, trial: optuna.trial.FrozenTrial) -> str:
    """The artifact URL of the image in a trial's optuna-dashboard note."""
    from optuna_dashboard import get_note

    study = optuna.load_study(study_name="remote", storage=storage)
    note = get_note(optuna.Trial(study, trial._trial_id))
    return note.split("](", 1)[1].split(")", 1)[0]


def _dashboard_get(storage: str, path: str) -> bytes:
    """``GET path`` from optuna-dashboard's WSGI app with the study's recorded artifact store."""
    import io
    from wsgiref.util import setup_testing_defaults

    import optuna_dashboard

    from automl_diff.runners.artifacts import study_store

    study = optuna.load_study(study_name="remote", storage=storage)
    app = optuna_dashboard.wsgi(optuna.storages.get_storage(storage), artifact_store=study_store(study))
    environ: dict = {"PATH_INFO": path, "wsgi.input": io.BytesIO()}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda code, headers, exc_info=None: status.append(code)))
    assert status[0].startswith("200"), (status, body[:200])
    return body


def test_a_folder_store_elsewhere_serves_export_and_report(study_factory, tmp_path, capsys):
    """A folder store (shared storage), then moved: ``--artifacts`` names where it is now."""
    from diffusers import DDIMPipeline

    config = study_factory(execution={"artifact_store": str(tmp_path / "shared" / "store")})
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.load_study(study_name="tiny", storage=storage)
    trial = next(t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    grid = Path(trial.user_attrs[TrialAttr.SAMPLES]).read_bytes()
    shutil.rmtree(tmp_path / "runs")
    moved = shutil.move(tmp_path / "shared" / "store", tmp_path / "mounted")
    args = ["--storage", storage, "--study-name", "tiny"]
    assert main(["export", *args, "--trial", str(trial.number), "--out", str(tmp_path / "out")]) == 2  # the store moved
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: trial {trial.number}: weights: ") and "is not in the store" in err and "\n" not in err
    out = tmp_path / "out"
    assert main(["export", *args, "--trial", str(trial.number), "--out", str(out), "--artifacts", str(moved)]) == 0
    pipe = DDIMPipeline.from_pretrained(str(out), trust_remote_code=True)
    assert pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 1)
    report = tmp_path / "report.html"
    assert main(["report", *args, "--out", str(report), "--artifacts", str(moved)]) == 0
    import base64

    assert base64.b64encode(grid).decode() in report.read_text()  # the trial's own grid, not a new one


def test_an_unusable_store_is_one_line_before_any_trial(study_factory, tmp_path, s3_env, monkeypatch, capsys):
    config = study_factory(execution={"artifact_store": "gs://bucket/runs"})
    assert main(["run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {config}: execution.artifact_store: must be a folder or s3://bucket[/prefix] (got 'gs://bucket/runs')"
    config = study_factory(execution={"artifact_store": "s3://no-such-bucket"})
    assert main(["run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {config}: execution.artifact_store: 's3://no-such-bucket' cannot be used: ") and "\n" not in err
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed.getsockname()[1]}")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        config = study_factory(execution={"artifact_store": f"s3://{BUCKET}"})
        assert main(["run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "execution.artifact_store: 's3://automl-diff' cannot be used: Could not connect" in err and "\n" not in err
    (tmp_path / "a_file").write_text("")
    config = study_factory(execution={"artifact_store": str(tmp_path / "a_file")})
    assert main(["run", str(config), "--quiet"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "study.db") or not optuna.get_all_study_names(f"sqlite:///{tmp_path / 'study.db'}")
