"""A user's own Stable Diffusion model through the command line, the way a user runs it: SD's UNet
layout, RGB images, a word-piece tokenizer, SD's PNDM scheduler, training prompts in a text file,
evaluation captions in a CSV column, a folder of reference images, CLIP score and CLIP features
from a local CLIP folder; every method, export, and the export loaded with diffusers alone."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import USER_WORDS, build_tiny_clip, build_user_pipeline, printed_load_calls, sample_without_automl_diff

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255)}


def _shape_image(colour: str, shape: str, background: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A coloured square or circle of random size and place on a plain background."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[background]
    radius = int(rng.integers(3, size // 2))
    cy, cx = (int(v) for v in rng.integers(radius, size - radius + 1, size=2))
    yy, xx = np.mgrid[:size, :size]
    if shape == "circle":
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    else:
        inside = (abs(yy - cy) <= radius) & (abs(xx - cx) <= radius)
    image[inside] = COLOURS[colour]
    return Image.fromarray(image)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The user's pipeline folder, CLIP folder, prompt files and reference images."""
    root = tmp_path_factory.mktemp("user")
    rng = np.random.default_rng(0)
    references = root / "references"
    references.mkdir()
    captions = []
    for i in range(24):
        colour, shape, background = list(COLOURS)[i % 4], ("square", "circle")[i % 2], list(BACKGROUNDS)[(i // 4) % 2]
        _shape_image(colour, shape, background, 24, rng).save(references / f"{i:03d}.png")  # not the model's size: resized
        captions.append(f"a {colour} {shape} on a {background} background")
    (root / "train.txt").write_text("\n".join(captions[:8]) + "\n")
    rows = [f"{i},{caption},{len(caption)}" for i, caption in enumerate(captions[8:12])]
    (root / "eval.csv").write_text("image_id,caption,length\n" + "\n".join(rows) + "\n")
    return {
        "root": root,
        "pipeline": build_user_pipeline(root),
        "clip": build_tiny_clip(root / "clip", USER_WORDS),
        "references": references,
    }


def _spaces(root: Path) -> dict[str, tuple[str | None, dict]]:
    """Per method: its search space (a file in ``root``) and method options at tiny budgets."""
    (root / "dkdm.yaml").write_text(
        "family: unet2d_condition\nblocks:\n  down.0: {channels: [16, 32]}\n  down.3: {channels: [32, 64], layers: [1, 2]}\n"
    )
    (root / "diffnas.yaml").write_text(
        "family: supernet\nblocks:\n  down.1: {layers: [1, 2], width: [0.5, 1.0], attention: [true, false]}\n"
        "  mid: {width: [0.5, 1.0], attention: [true, false]}\n  up.2: {layers: [1, 3], width: [0.5, 1.0]}\n"
    )
    pool = {"pool_size": 8, "pool_steps": 3}
    return {
        "dkdm": (str(root / "dkdm.yaml"), pool),
        "diffnas": (str(root / "diffnas.yaml"), {**pool, "supernet_iterations": 2, "search_samples": 4, "retrain_iterations": [2]}),
        "dipgo": (
            None,
            {"granularity": "branch", "pruner": "attention", "target_macs_ratio": 0.5, "reference_images": 2, "warmup": 0.0},
        ),
    }


@pytest.mark.parametrize("method", ["dkdm", "diffnas", "dipgo"])
def test_a_users_sd_model_runs_every_method_with_clip_score_and_exports(user_files, method, tmp_path, capsys):
    from automl_diff.cli import main
    from automl_diff.records import StudyAttr, TrialAttr

    root = user_files["root"]
    space, options = _spaces(tmp_path)[method]
    config = {
        "name": f"user_{method}",
        "method": method,
        "teacher": str(user_files["pipeline"]),
        "objectives": [{"name": "trajectory_macs"}, {"name": "fid"}, {"name": "clip_score", "direction": "maximize"}],
        "sampler": {"name": "random", "seed": 0},
        "n_trials": 1,
        "budgets": {
            "train_iterations": 2,
            "batch_size": 2,
            "fid_samples": 4,
            "sampling_steps": 3,
            "latency_repeats": 1,
            "latency_batch_size": 1,
        },
        "sampling": {"scheduler": "pndm", "guidance_scale": 3.0},  # the user's own PLMS
        "prompts": {"train": str(root / "train.txt"), "eval": str(root / "eval.csv"), "column": "caption"},
        "fid": {"dataset": f"folder:{user_files['references']}", "features": "clip"},
        "storage": f"sqlite:///{tmp_path / 'study.db'}",
        "output_dir": str(tmp_path / "runs"),
        "device": "cpu",
        "method_options": options,
    }
    config["prompts"]["clip_model"] = str(user_files["clip"])
    if space is not None:
        config["search_space"] = space
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))

    assert main(["run", str(path), "--quiet"]) == 0, capsys.readouterr().err
    study = optuna.load_study(study_name=f"user_{method}", storage=config["storage"])
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get(TrialAttr.FAIL_REASON)
    a = trial.user_attrs
    assert trial.values[2] == a[TrialAttr.CLIP_SCORE] and a["clip_score_low"] <= a[TrialAttr.CLIP_SCORE] <= a["clip_score_high"]
    assert np.isfinite(a[TrialAttr.FID]) and a[TrialAttr.FID] >= 0
    evaluation = study.user_attrs[StudyAttr.EVALUATION]
    assert evaluation["alignment"] == "clip_score" and evaluation["fid_features"] == "clip"
    assert evaluation["eval_prompts"] == [line.split(",")[1] for line in (root / "eval.csv").read_text().splitlines()[1:]]
    teacher = study.user_attrs[StudyAttr.TEACHER_METRICS]
    assert "clip_score" in teacher and teacher[TrialAttr.MACS] > 0
    # the sample grid is RGB: the user's images, not the digits
    assert Image.open(Path(a[TrialAttr.SAMPLES])).mode == "RGB"

    out = tmp_path / "export"
    assert main(["export", "--storage", config["storage"], "--study-name", f"user_{method}", "--trial", "0", "--out", str(out)]) == 0
    (call,) = printed_load_calls(capsys.readouterr().out)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["tokenizer"] == ["transformers", "BertTokenizer"]
    seen = sample_without_automl_diff(call, cwd=tmp_path, steps=3, prompt="a red circle on a black background")
    assert seen["shape"] == [2, 16, 16, 3] and seen["imported"] == []
    if method == "dipgo":  # SD's branches gated at each of PLMS's model calls, within the trial's budget
        schedule = json.loads((out / "schedule.json").read_text())
        assert schedule["steps"] == 4 and schedule["info"]["num_inference_steps"] == 3 and schedule["info"]["scheduler"] == "pndm"
        assert len(schedule["units"]) == 24 and "down.0.resnets.0+down.0.attentions.0" in schedule["units"]
        assert schedule["info"]["schedule_cost_ratio"] <= trial.params["budget"] + 1e-9
        with pytest.MonkeyPatch.context() as patch:  # compiled too: dynamo traces the branch units (eager backend: quick)
            patch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
            argv = ["profile", "--model", str(out), "--schedule", str(out / "schedule.json"), "--json", "--repeats", "1", "--compile"]
            assert main(argv) == 0
        profiled = json.loads(capsys.readouterr().out)
        assert profiled["scheduler"] == "pndm" and profiled["steps"] == 3 and profiled["macs_reduction"] >= 1
        assert profiled["compiled_speedup"] > 0 and profiled["compiled_warmup_s"] > 0
