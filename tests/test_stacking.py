"""Stacking: a study starts from another study's export (DiP-GO on a DiffNAS student), measures
against the original teacher, and exports a model that keeps architecture, schedule and lineage."""

from __future__ import annotations

import json
import shutil

import optuna
import pytest
import torch
import yaml

from automl_diff.cli import main
from automl_diff.gating import Schedule
from automl_diff.records import StudyAttr, TrialAttr
from tests.conftest import printed_load_calls


@pytest.fixture
def diffnas_export(study_factory, tiny_supernet_space, tmp_path, capsys):
    """A tiny DiffNAS study, run and its only trial exported."""
    config = study_factory(
        name="nas",
        method="diffnas",
        search_space=str(tiny_supernet_space),
        n_trials=1,
        budgets={
            "train_iterations": 2,
            "batch_size": 4,
            "fid_samples": 16,
            "sampling_steps": 4,
            "latency_repeats": 1,
            "latency_batch_size": 2,
        },
        method_options={
            "pool_size": 8,
            "pool_steps": 3,
            "supernet_iterations": 2,
            "search_samples": 4,
            "tolerance_low": 0.5,
            "tolerance_high": 1.0,
        },
    )
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    out = tmp_path / "exports" / "nas"
    assert (
        main(["export", "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--study-name", "nas", "--trial", "0", "--out", str(out)]) == 0
    )
    capsys.readouterr()
    return out


def _dipgo_config(tmp_path, teacher, **extra):
    config = {
        "name": "stacked",
        "method": "dipgo",
        "teacher": str(teacher),
        "objectives": ["trajectory_macs", "fid"],
        "sampler": {"name": "random", "seed": 0},
        "n_trials": 2,
        "budgets": {
            "train_iterations": 4,
            "batch_size": 2,
            "lr": 0.05,
            "fid_samples": 16,
            "sampling_steps": 4,
            "latency_repeats": 1,
            "latency_batch_size": 2,
        },
        "fid": {"dataset": "digits", "features": "digits"},
        "storage": f"sqlite:///{tmp_path / 'stacked.db'}",
        "output_dir": str(tmp_path / "runs"),
        "device": "cpu",
        "method_options": {
            "granularity": "layer",
            "target_macs_ratio": 0.5,
            "reference_images": 2,
            "warmup": 0.0,
            "sparsity_weight": 5.0,
            "threshold_low": 0.05,
            "threshold_high": 0.9,
            "threshold_log": False,
        },
        **extra,
    }
    path = tmp_path / "stacked.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_dipgo_on_a_diffnas_export_keeps_architecture_schedule_and_lineage(diffnas_export, tiny_teacher_dir, tmp_path, capsys):
    nas_info = json.loads((diffnas_export / "automl_diff.json").read_text())
    assert nas_info["original_teacher"] == str(tiny_teacher_dir) and [s["method"] for s in nas_info["lineage"]] == ["diffnas"]

    config = _dipgo_config(tmp_path, diffnas_export)  # no original_teacher: the export's record names it
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    storage = f"sqlite:///{tmp_path / 'stacked.db'}"
    study = optuna.load_study(study_name="stacked", storage=storage)
    attrs = study.user_attrs
    teacher, start = attrs[StudyAttr.TEACHER_METRICS], attrs[StudyAttr.START_METRICS]
    assert attrs[StudyAttr.ORIGINAL_TEACHER] == str(tiny_teacher_dir)
    assert [s["study"] for s in attrs[StudyAttr.LINEAGE]] == ["nas"]
    # the yardstick is the original teacher; the starting model is the smaller DiffNAS student
    assert start[TrialAttr.PARAMS] == nas_info["metrics"]["params"] < teacher[TrialAttr.PARAMS]
    assert start[TrialAttr.MACS] < teacher[TrialAttr.MACS]
    trial = next(t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert trial.user_attrs[TrialAttr.MACS_REDUCTION] == pytest.approx(
        teacher[TrialAttr.TRAJECTORY_MACS] / trial.user_attrs[TrialAttr.TRAJECTORY_MACS]
    )
    assert trial.user_attrs[TrialAttr.TRAJECTORY_MACS] <= start[TrialAttr.TRAJECTORY_MACS] < teacher[TrialAttr.TRAJECTORY_MACS]

    # the trials keep their own copy of the weights they were scheduled for: the starting export
    # may be overwritten or deleted afterwards
    nas_widths = json.loads((diffnas_export / "unet" / "config.json").read_text())["resnet_widths"]
    shutil.rmtree(diffnas_export)
    out = tmp_path / "exports" / "stacked"
    assert main(["export", "--storage", storage, "--study-name", "stacked", "--trial", str(trial.number), "--out", str(out)]) == 0
    (call,) = printed_load_calls(capsys.readouterr().out)
    info = json.loads((out / "automl_diff.json").read_text())
    assert info["original_teacher"] == str(tiny_teacher_dir)
    assert [(s["study"], s["method"]) for s in info["lineage"]] == [("nas", "diffnas"), ("stacked", "dipgo")]
    assert info["lineage"][0]["block_choices"] == nas_info["lineage"][0]["block_choices"]
    card = (out / "README.md").read_text()
    assert "starting model" in card and "## Lineage" in card and "DiffNAS student: study `nas`" in card
    assert "DiP-GO schedule: study `stacked`" in card and "Block choices of step 1" in card

    import diffusers  # noqa: F401 - the printed call names it

    from automl_diff.gating import apply_schedule
    from automl_diff.sampling import Sampler

    pipe = eval(call)
    assert type(pipe.unet).__name__ == "StudentUNet2DModel"
    assert pipe.unet.config.resnet_widths == nas_widths
    schedule = Schedule.load(out / "schedule.json")
    assert schedule.to_dict() == trial.user_attrs[TrialAttr.SCHEDULE]
    with apply_schedule(pipe, schedule):
        images = Sampler(dict(pipe.scheduler.config), steps=4).sample(pipe.unet, num_images=2, batch_size=2)
    assert images.shape == (2, 1, 16, 16)

    # an export that samples with a schedule cannot be a starting model: one line, exit 2
    again = _dipgo_config(tmp_path, out, name="again")
    assert main(["run", str(again)]) == 2
    err = capsys.readouterr().err
    assert "teacher:" in err and "DiP-GO schedule" in err and "Traceback" not in err


def test_stacking_errors_name_the_key(diffnas_export, tiny_teacher_dir, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(diffnas_export, moved)
    info = json.loads((moved / "automl_diff.json").read_text())
    info["original_teacher"] = str(tmp_path / "gone")
    (moved / "automl_diff.json").write_text(json.dumps(info))
    assert main(["run", str(_dipgo_config(tmp_path, moved))]) == 2
    err = capsys.readouterr().err
    assert "teacher:" in err and "original_teacher:" in err and "gone" in err and "Traceback" not in err

    assert main(["run", str(_dipgo_config(tmp_path, moved, original_teacher=str(tmp_path / "nowhere")))]) == 2
    err = capsys.readouterr().err
    assert "original_teacher:" in err and "nowhere" in err and "Traceback" not in err

    # original_teacher belongs to a teacher that is an export
    assert main(["run", str(_dipgo_config(tmp_path, tiny_teacher_dir, original_teacher=str(diffnas_export)))]) == 2
    err = capsys.readouterr().err
    assert "original_teacher:" in err and "not one" in err and "Traceback" not in err

    # a resumed study keeps its yardstick: another original teacher is refused, not mixed in
    other = tmp_path / "other_teacher"
    shutil.copytree(tiny_teacher_dir, other)
    assert main(["run", str(_dipgo_config(tmp_path, diffnas_export, n_trials=1)), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", str(_dipgo_config(tmp_path, diffnas_export, n_trials=2, original_teacher=str(other)))]) == 2
    err = capsys.readouterr().err
    assert "original_teacher:" in err and str(other) in err and "another --study-name" in err and "Traceback" not in err


def test_distillation_targets_come_from_the_original_teacher(tiny_unet, tiny_teacher_dir, study_factory):
    from automl_diff.config.study import load_study_config
    from automl_diff.methods.diffnas import JointLoss, JointWeight
    from automl_diff.methods.dkdm import DKDM
    from automl_diff.models.loading import load_teacher
    from automl_diff.sampling import predict_noise

    original = load_teacher(str(tiny_teacher_dir))
    start = load_teacher(str(tiny_teacher_dir))
    torch.manual_seed(1)
    for p in start.unet.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    method = DKDM.from_config(load_study_config(study_factory()), start, original=original)
    assert method.inputs.teacher is original

    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    student = tiny_unet
    loss = JointLoss(start.unet, JointWeight("static", 0.0), 1, original=original.unet)
    with torch.no_grad():
        value = loss(student, (x, t, torch.zeros_like(x)), 0)
        expected = torch.nn.functional.mse_loss(predict_noise(student, x, t).float(), predict_noise(original.unet, x, t).float())
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
