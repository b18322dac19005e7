"""Evaluation at scale and before it: features accumulated batch by batch, reference images
centre-cropped, a CLIP-only study (``fid: none``), the guided data-free pool, and the dry run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY_PROMPTS, build_tiny_clip


def test_feature_statistics_accumulate_batch_by_batch():
    from automl_diff.metrics.fid import FeatureStats

    features = np.random.default_rng(0).normal(3.0, 2.0, size=(1000, 6))
    stats = FeatureStats(keep=True)
    for start in range(0, 1000, 64):
        stats.add(features[start : start + 64])
    assert stats.count == 1000
    np.testing.assert_allclose(stats.mu, features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(features, rowvar=False), rtol=1e-10)
    np.testing.assert_array_equal(stats.features, features.astype(np.float32))
    with pytest.raises(ValueError):
        _ = FeatureStats().features


def test_fid_is_the_same_whatever_the_sampling_batch(tiny_unet):
    from automl_diff.config.evaluation import Evaluation, SamplingSettings
    from automl_diff.evaluation import Evaluator
    from automl_diff.models.loading import Teacher

    teacher = Teacher(unet=tiny_unet, scheduler_config={"num_train_timesteps": 1000}, source="tiny", dataset="digits")
    fids = []
    for batch in (40, 7):
        evaluation = Evaluation(SamplingSettings(steps=3), fid_samples=40, fid_batch_size=batch, fid_features="digits")
        fids.append(Evaluator(evaluation, teacher, device="cpu").fid(tiny_unet))
    assert fids[0] == pytest.approx(fids[1], rel=1e-6)  # batches change float rounding, not the statistics


def test_reference_images_are_centre_cropped_then_resized(tmp_path):
    from automl_diff.data import load_image_folder

    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, :20] = (255, 0, 0)  # left third red, centre green, right third blue
    wide[:, 20:40] = (0, 255, 0)
    wide[:, 40:] = (0, 0, 255)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    (image,) = load_image_folder(str(tmp_path), resolution=8, channels=3)
    assert image.shape == (3, 8, 8)
    green = (image + 1) / 2
    assert torch.allclose(green[1], torch.ones(8, 8), atol=0.02) and green[0].max() < 0.02 and green[2].max() < 0.02


def _clip_only_study(tmp_path, tiny_sd_dir, clip):
    from tests.conftest import write_study

    (tmp_path / "train.txt").write_text("\n".join(TINY_PROMPTS) + "\n")
    (tmp_path / "eval.txt").write_text("a handwritten seven\nthe digit 2\n")
    return write_study(
        tmp_path,
        tiny_sd_dir,
        tmp_path / "unused.yaml",
        name="cliponly",
        method="dipgo",
        search_space=None,
        objectives=[{"name": "trajectory_macs"}, {"name": "clip_score", "direction": "maximize"}],
        n_trials=2,
        budgets={
            "train_iterations": 2,
            "batch_size": 2,
            "fid_samples": 4,
            "sampling_steps": 3,
            "latency_repeats": 1,
            "latency_batch_size": 2,
        },
        sampling={"guidance_scale": 2.0},
        prompts={"train": "train.txt", "eval": "eval.txt", "alignment": "clip_score", "clip_model": str(clip)},
        fid="none",
        method_options={"granularity": "block", "target_macs_ratio": 0.5, "reference_images": 2, "warmup": 0.0},
    )


def test_a_clip_only_study_needs_no_reference_images(tiny_sd_dir, tmp_path, capsys):
    import optuna

    from automl_diff.cli import main
    from automl_diff.records import StudyAttr, TrialAttr

    config = _clip_only_study(tmp_path, tiny_sd_dir, build_tiny_clip(tmp_path / "clip"))
    code, captured = main(["run", str(config), "--quiet"]), capsys.readouterr()
    assert code == 0, captured.err
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.load_study(study_name="cliponly", storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all(TrialAttr.FID not in t.user_attrs for t in done)
    assert all(t.user_attrs["clip_score_low"] <= t.user_attrs[TrialAttr.CLIP_SCORE] <= t.user_attrs["clip_score_high"] for t in done)
    assert TrialAttr.FID not in study.user_attrs[StudyAttr.TEACHER_METRICS]
    assert main(["pareto", "--storage", storage, "--json"]) == 0
    printed = capsys.readouterr().out
    assert all(row["fid"] is None for row in json.loads(printed)), printed
    report = tmp_path / "report.html"
    assert main(["report", "--storage", storage, "--out", str(report), "--samples", "0"]) == 0
    assert "clip_score (higher is better)" in report.read_text()
    # FID cannot be an objective of a study that measures none
    text = config.read_text().replace("name: clip_score", "name: fid")
    config.write_text(text)
    assert main(["run", str(config), "--quiet"]) == 2
    assert "with fid: none" in capsys.readouterr().err


@pytest.mark.parametrize(("guided", "dropout", "states"), [(True, 0.5, 2), (True, 0.25, 3), (False, 0.1, 4)])
def test_the_guided_pool_labels_both_halves_and_moves_with_the_guided_prediction(tiny_sd_dir, guided, dropout, states):
    from automl_diff.config.evaluation import SamplingSettings
    from automl_diff.config.options import DKDMOptions, read_options
    from automl_diff.config.settings import Budgets, MethodSettings
    from automl_diff.methods.training import TrainingInputs
    from automl_diff.models.loading import load_teacher
    from automl_diff.sampling import predict_noise

    teacher = load_teacher(str(tiny_sd_dir))
    raw = {"pool_size": 8, "pool_steps": 4, "pool_eta": 0.0, "guided_pool": guided, "prompt_dropout": dropout}
    options = read_options(DKDMOptions, raw, file="test")
    settings = MethodSettings(
        budgets=Budgets(batch_size=4), sampling=SamplingSettings(guidance_scale=3.0), train_prompts=TINY_PROMPTS, seed=0
    )
    inputs = TrainingInputs(settings, teacher, options, device=torch.device("cpu"))
    batches = inputs.batches(seed=1)
    pool = batches.pool
    # entries that do not finish their trajectory at this step (those restart from fresh noise),
    # in a known order, so that the test knows which moved
    ready = torch.nonzero(pool.position < pool.num_steps - 1).flatten()
    assert len(ready) >= 4
    pool.draw = lambda n: ready[:n]
    assert batches.guided == guided
    before = pool.x.clone()
    batch = batches(4)
    assert len(batch.x) == 4
    with torch.no_grad():
        eps = predict_noise(teacher.unet, batch.x, batch.t, encoder_hidden_states=batch.context)
    torch.testing.assert_close(batch.target, eps.float(), rtol=1e-5, atol=1e-5)  # the teacher's own predictions
    moved = (pool.x != before).flatten(1).any(1)
    assert moved.nonzero().flatten().tolist() == ready[:states].tolist()
    if not guided:
        return
    # a guided pool's trajectories are all conditional: the unconditional rows are guidance's other half
    assert bool((pool.labels < len(inputs.prompts) - 1).all())
    # each state with its prompt, then the first states again with the unconditional one
    extra = 4 - states
    assert torch.equal(batch.x[states:], batch.x[:extra]) and torch.equal(batch.t[states:], batch.t[:extra])
    assert torch.equal(batch.context[states:], inputs.prompts[-1:].expand(extra, -1, -1))
    assert not torch.equal(batch.context[:states], inputs.prompts[-1:].expand(states, -1, -1))
    # moved on (DDIM, eta 0) by uncond + 3 (cond - uncond): the study's guidance
    with torch.no_grad():
        cond = batch.target[:states]
        empty = inputs.prompts[-1:].expand(states, -1, -1)
        uncond = predict_noise(teacher.unet, batch.x[:states], batch.t[:states], encoder_hidden_states=empty).float()
    guided_eps = uncond + 3.0 * (cond - uncond)
    t = batch.t[:states]
    a_t = pool.alphas_cumprod[t].view(-1, 1, 1, 1)
    t_prev = t - pool.stride
    a_prev = torch.where(t_prev >= 0, pool.alphas_cumprod[t_prev.clamp(min=0)], torch.ones(states)).view(-1, 1, 1, 1)
    x0 = (batch.x[:states] - (1 - a_t).sqrt() * guided_eps) / a_t.sqrt()
    if pool.clip_sample:
        x0 = x0.clamp(-pool.clip_range, pool.clip_range)
    expected = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * guided_eps
    torch.testing.assert_close(pool.x[ready[:states]], expected, rtol=1e-4, atol=1e-4)


def test_a_guided_batch_draws_its_states_from_the_unconditional_share():
    from automl_diff.methods.training.inputs import guided_states

    assert [guided_states(64, share) for share in (0.0, 0.1, 0.5, 1.0)] == [64, 58, 32, 32]
    assert guided_states(1, 0.5) == 1 and guided_states(5, 0.5) == 3


def test_a_dry_run_projects_the_study_and_stores_nothing(tiny_sd_dir, tmp_path, capsys):
    from automl_diff.cli import main
    from tests.test_text_to_image import _t2i_study

    config = _t2i_study(tmp_path, tiny_sd_dir, n_trials=5)
    assert main(["run", str(config), "--dry-run", "--json", "--quiet"]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "study.db").exists() and not (tmp_path / "runs").exists()
    names = [s["name"] for s in report["stages"]]
    assert any(n.startswith("pruner iteration") for n in names) and any(n.startswith("FID of a candidate") for n in names)
    assert all(s["seconds"] > 0 and s["peak_bytes"] > 0 for s in report["stages"])
    iteration = next(s for s in report["stages"] if s["name"].startswith("pruner iteration"))
    assert iteration["count"] == 4 * 4 and iteration["per"] == "study"  # 4 iterations x 4 DDIM model calls
    per_trial = sum(s["total_seconds"] for s in report["stages"] if s["per"] == "trial")
    once = sum(s["total_seconds"] for s in report["stages"] if s["per"] == "study")
    assert report["trial_seconds"] == pytest.approx(per_trial) and report["study_seconds"] == pytest.approx(once + 5 * per_trial)
    assert main(["run", str(config), "--dry-run", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "nothing was stored" in out and "a trial:" in out and "peak memory" in out


def test_a_dry_run_of_a_training_method_counts_its_pool_and_steps(tiny_sd_dir, tiny_space, tmp_path, capsys):
    from automl_diff.cli import main
    from tests.test_text_to_image import _t2i_study

    space = Path(tiny_space)
    space.write_text(space.read_text().replace("family: unet2d", "family: unet2d_condition"))
    config = _t2i_study(
        tmp_path,
        tiny_sd_dir,
        method="dkdm",
        search_space=str(space),
        method_options={"pool_size": 16, "pool_steps": 4, "guided_pool": True},
        objectives=[{"name": "macs"}, {"name": "fid"}],
    )
    assert main(["run", str(config), "--dry-run", "--json", "--quiet"]) == 0, capsys.readouterr().err
    stages = {s["name"]: s for s in json.loads(capsys.readouterr().out)["stages"]}
    assert stages["training step"]["count"] == 4 and stages["training step"]["per"] == "trial"
    assert stages["pool warm-up: one teacher call"]["batch"] == 2 * 256  # both halves of guidance
