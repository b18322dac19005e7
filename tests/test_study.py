"""End to end on a tiny teacher: run, resume, status, pareto, export, profile, and CLI errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import optuna
import pytest
import torch

from automl_diff.cli import main
from automl_diff.records import StudyAttr, TrialAttr
from tests.conftest import REPO, printed_load_calls


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def finished_study(study_factory, capsys):
    config = study_factory()
    code, out, err = _run(capsys, "run", str(config), "--quiet")
    assert code == 0, err
    return config


def test_run_records_trials_and_resumes_without_duplicates(finished_study, capsys, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert len(study.trials) == 2
    assert study.metric_names == ["macs", "fid"]
    teacher = study.user_attrs[StudyAttr.TEACHER_METRICS]
    assert teacher[TrialAttr.MACS] > 0 and teacher[TrialAttr.FID] > 0
    for trial in study.trials:
        if trial.state != optuna.trial.TrialState.COMPLETE:
            assert trial.user_attrs.get(TrialAttr.DUPLICATE_OF) is not None
            continue
        attrs = trial.user_attrs
        for key in (
            TrialAttr.MACS,
            TrialAttr.PARAMS,
            TrialAttr.FID,
            TrialAttr.LATENCY,
            TrialAttr.MODEL_CONFIG,
            TrialAttr.WEIGHTS,
            TrialAttr.SPEEDUP,
        ):
            assert key in attrs, key
        assert trial.values[0] == attrs[TrialAttr.MACS] and trial.values[1] == attrs[TrialAttr.FID]
        assert (tmp_path / "runs" / "tiny" / f"trial_{trial.number}" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert attrs[TrialAttr.MODEL_CONFIG]["_class_name"] in ("UNet2DModel", "StudentUNet2DModel")
    # a second run of the same config resumes: no new trial, teacher not re-measured
    code, out, _ = _run(capsys, "run", str(finished_study), "--quiet")
    assert code == 0 and "Pareto front" in out and "export" in out
    again = optuna.load_study(study_name="tiny", storage=storage)
    assert len(again.trials) == 2
    assert again.user_attrs[StudyAttr.TEACHER_METRICS] == teacher
    # asking for more trials adds exactly the difference
    code, _, _ = _run(capsys, "run", str(finished_study), "--quiet", "--n-trials", "3")
    study = optuna.load_study(study_name="tiny", storage=storage)
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert code == 0 and len(finished) == 3 == len(study.trials)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == len(complete)


def test_status_pareto_json_and_csv(finished_study, capsys, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    code, out, _ = _run(capsys, "status", "--storage", storage, "--json")
    assert code == 0
    status = json.loads(out)
    assert status["study"] == "tiny" and sum(status["states"].values()) == 2
    code, out, _ = _run(capsys, "pareto", "--storage", storage, "--study-name", "tiny", "--json", "--csv", str(tmp_path / "front.csv"))
    assert code == 0
    front = json.loads(out)
    assert front and all(set(row) == {"trial", "macs", "params", "fid", "latency", "speedup", "recipe"} for row in front)
    assert all(row["recipe"] is None for row in front)  # no warm start: the sampler proposed every trial
    import pandas as pd

    frame = pd.read_csv(tmp_path / "front.csv")
    assert list(frame["trial"]) == [row["trial"] for row in front]
    assert any(c.startswith("param:") for c in frame.columns)
    code, out, _ = _run(capsys, "pareto", "--storage", storage)
    assert code == 0 and "teacher" in out and "speedup" in out


def test_export_round_trip_loads_and_samples(finished_study, capsys, tmp_path):
    import diffusers  # noqa: F401 - the printed calls name it

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    code, out, err = _run(capsys, "export", "--storage", storage, "--pareto", "--out", str(tmp_path / "exports"))
    assert code == 0, err
    folders = sorted((tmp_path / "exports").iterdir())
    calls = dict(zip((str(f) for f in folders), printed_load_calls(out)))
    assert folders and len(calls) == len(folders)
    study = optuna.load_study(study_name="tiny", storage=storage)
    for folder in folders:
        number = int(folder.name.split("_")[1])
        card = (folder / "README.md").read_text()
        assert "tiny" in card and f"trial {number}" in card and "FID" in card
        assert json.dumps(str(folder)) in calls[str(folder)]
        pipe = eval(calls[str(folder)])
        trained = study.trials[number].user_attrs[TrialAttr.MODEL_CONFIG]["_class_name"]
        assert type(pipe.unet).__name__ == trained
        images = pipe(batch_size=2, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (2, 16, 16, 1)
        # the exported weights are the trial's weights
        from automl_diff.models import load_unet

        original = load_unet(study.trials[number].user_attrs[TrialAttr.WEIGHTS]).state_dict()
        exported = pipe.unet.state_dict()
        assert list(original) == list(exported)
        for name in original:
            assert torch.equal(original[name], exported[name]), name


def test_student_with_per_level_depths_exports_through_ddim_pipeline(tmp_path):
    from diffusers import DDIMPipeline, DDIMScheduler

    from automl_diff import StudentUNet2DModel
    from tests.conftest import TINY_UNET

    unet = StudentUNet2DModel(**{**TINY_UNET, "layers_per_block": [1, 2]})
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    pipe = DDIMPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(pipe.unet, StudentUNet2DModel) and list(pipe.unet.config.layers_per_block) == [1, 2]
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([5])
    torch.testing.assert_close(pipe.unet(x, t).sample, unet.eval()(x, t).sample)


def test_profile_json(capsys, tiny_teacher_dir, tmp_path):
    code, out, _ = _run(capsys, "profile", "--model", str(tiny_teacher_dir), "--json")
    assert code == 0
    data = json.loads(out)
    assert {"params", "macs", "macs_no_attention", "blocks"} <= set(data)
    assert [b["name"] for b in data["blocks"]][:2] == ["down.0", "down.1"]
    assert all({"name", "params", "macs"} <= set(b) for b in data["blocks"])
    # a bare config.json counts an architecture before training it
    code, out2, _ = _run(capsys, "profile", "--model", str(tiny_teacher_dir / "unet" / "config.json"), "--json")
    assert code == 0 and json.loads(out2)["macs"] == data["macs"]
    code, out3, _ = _run(capsys, "profile", "--model", "digits")
    assert code == 0 and "total" in out3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["status", "--storage", "sqlite:///does/not/exist.db"], "does not exist"),
        (["run", "missing.yaml"], "study config 'missing.yaml' does not exist"),
        (["profile", "--model", "./no/such/folder"], "not an existing local folder"),
        (["export", "--storage", "sqlite:///x.db", "--out", "x"], "one of the arguments --trial --pareto is required"),
        (["status", "--storage", "postgresql://u:secret@127.0.0.1:1/db"], "cannot open storage 'postgresql://u:***@127.0.0.1:1/db'"),
    ],
)
def test_user_errors_exit_2_with_one_line(capsys, argv, message):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "secret" not in err


def test_bad_config_from_a_real_process_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: dkdm\nteacher: digits\nbudgets: {fid_samples: many}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "automl_diff.study", "run", str(bad)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}: budgets.fid_samples: expected an integer (got 'many')"


@pytest.mark.parametrize(
    "module",
    [
        "automl_diff.export",
        "automl_diff.runners",
        "automl_diff.analysis",
        "automl_diff.methods",
        "automl_diff.cli",
        "automl_diff.metrics",
        "automl_diff.config",
    ],
)
def test_each_subpackage_imports_on_its_own(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_importing_the_package_has_no_side_effects(tmp_path):
    code = "import automl_diff, sys; print(sorted(m for m in sys.modules if m.startswith(('torch', 'optuna', 'diffusers'))))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": ""}, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_fid_interval_and_kid_are_recorded_when_asked(study_factory, tmp_path, capsys):
    config = study_factory(n_trials=1, fid={"dataset": "digits", "features": "digits", "interval": True})
    code, _, err = _run(capsys, "run", str(config), "--quiet")
    assert code == 0, err
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert study.user_attrs[StudyAttr.EVALUATION]["fid_interval"] is True
    for attrs in (study.trials[0].user_attrs, study.user_attrs[StudyAttr.TEACHER_METRICS]):
        assert attrs[TrialAttr.FID_LOW] < attrs[TrialAttr.FID] < attrs[TrialAttr.FID_HIGH]
        assert attrs[TrialAttr.KID_STD] > 0 and math.isfinite(attrs[TrialAttr.KID])
