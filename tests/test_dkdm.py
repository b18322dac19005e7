from __future__ import annotations

import itertools

import pytest
import torch

from automl_diff.methods.training import NoisePool, PoolBatches, fit
from automl_diff.sampling import make_scheduler


def _pool(size=6, steps=4, eta=1.0, seed=0):
    alphas = make_scheduler({"num_train_timesteps": 1000}, "ddpm").alphas_cumprod
    return NoisePool(
        size=size, sample_shape=(1, 4, 4), alphas_cumprod=alphas, num_steps=steps, eta=eta, generator=torch.Generator().manual_seed(seed)
    )


def test_pool_timesteps_decrease_and_samples_reset_after_the_last_step():
    pool = _pool(size=3, steps=4)
    idx = torch.arange(3)
    start = pool.timesteps().clone()
    assert (start >= 750).all() and (start <= 999).all()  # first grid point: (4-1)*250 + offset
    seen = [start]
    for _ in range(3):
        before = pool.x.clone()
        pool.advance(idx, torch.zeros(3, 1, 4, 4))
        assert not torch.equal(before, pool.x)  # samples really move
        seen.append(pool.timesteps().clone())
    for earlier, later in itertools.pairwise(seen):
        assert (later < earlier).all()
    assert (seen[-1] < 250).all()
    assert pool.completed == 0
    pool.advance(idx, torch.zeros(3, 1, 4, 4))  # past t = offset (< stride): the clean image is done
    assert pool.completed == 3
    assert torch.equal(pool.position, torch.zeros(3, dtype=torch.long))
    assert (pool.timesteps() >= 750).all()
    assert pool.x.std() > 0.5  # fresh unit-variance noise, not the finished images


def test_pool_step_is_ddim_with_the_teacher_prediction():
    pool = _pool(size=1, steps=10, eta=0.0)
    x, t = pool.batch(torch.tensor([0]))
    eps = torch.randn_like(x)
    t_prev = t - pool.stride
    a_t, a_prev = pool.alphas_cumprod[t], pool.alphas_cumprod[t_prev]
    x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
    expected = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    pool.advance(torch.tensor([0]), eps)
    torch.testing.assert_close(pool.x[0:1], expected)
    assert pool.timesteps(torch.tensor([0])).item() == t_prev.item()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_a_pool_step_with_the_exact_prediction_of_any_parametrisation_lands_on_the_trajectory(prediction_type):
    """Deterministic DDIM with the exact prediction (noise, velocity or clean sample) of ``x_t =
    sqrt(a) x_0 + sqrt(1-a) eps`` moves it to ``sqrt(a') x_0 + sqrt(1-a') eps``."""
    from automl_diff.methods.training.pool import prediction_target, split_prediction

    alphas = make_scheduler({"num_train_timesteps": 1000}, "ddpm").alphas_cumprod
    pool = NoisePool(
        size=1, sample_shape=(1, 4, 4), alphas_cumprod=alphas, num_steps=10, eta=0.0, clip_sample=False, prediction_type=prediction_type
    )
    x0, eps = torch.rand(1, 1, 4, 4) * 2 - 1, torch.randn(1, 1, 4, 4)
    t = pool.timesteps(torch.tensor([0]))
    a_t, a_prev = alphas[t].view(1, 1, 1, 1), alphas[t - pool.stride].view(1, 1, 1, 1)
    pool.x[0:1] = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
    prediction = prediction_target(x0, eps, a_t, prediction_type)
    torch.testing.assert_close(split_prediction(prediction, pool.x[0:1], a_t, prediction_type), (x0, eps), atol=1e-4, rtol=1e-4)
    pool.advance(torch.tensor([0]), prediction)
    torch.testing.assert_close(pool.x[0:1], a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, atol=1e-4, rtol=1e-4)


def test_warm_up_spreads_the_pool_and_batches_mix_timesteps(tiny_unet):
    pool = _pool(size=32, steps=8)
    with torch.no_grad():
        pool.warm_up(lambda x, t, labels: tiny_unet(x, t).sample)
    assert len(set(pool.position.tolist())) >= 5
    idx = pool.draw(8)
    assert len(set(idx.tolist())) == 8
    _, t = pool.batch(torch.arange(32))
    assert t.max() - t.min() > 500


def test_distillation_loss_falls_and_no_data_is_read(tiny_unet, monkeypatch):
    from diffusers import UNet2DModel

    from tests.conftest import TINY_UNET

    def no_data(*args, **kwargs):
        raise AssertionError("DKDM read the dataset")

    monkeypatch.setattr("automl_diff.zoo.digits.load_digits", no_data)
    monkeypatch.setattr("automl_diff.zoo.registry.dataset_images", no_data)
    monkeypatch.setattr("automl_diff.zoo.dataset_images", no_data)
    alphas = make_scheduler({"num_train_timesteps": 1000}, "ddpm").alphas_cumprod
    pool = NoisePool(size=64, sample_shape=(1, 16, 16), alphas_cumprod=alphas, num_steps=10, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    student = UNet2DModel(**{**TINY_UNET, "block_out_channels": [4, 8], "attention_head_dim": 4})
    batches = PoolBatches(tiny_unet, pool)
    result = fit(student, batches, iterations=60, batch_size=16, lr=3e-3)
    assert result.mean_loss(50, 60) < 0.7 * result.mean_loss(0, 10)
    assert batches.teacher_evals == 60 * 16
    assert pool.completed > 0  # trajectories finished and restarted during training


def test_diverging_training_fails_with_a_reason(tiny_unet):
    from automl_diff.methods import TrainingDiverged

    def nan_batches(batch_size):
        x = torch.full((batch_size, 1, 16, 16), float("nan"))
        return x, torch.zeros(batch_size, dtype=torch.long), x

    with pytest.raises(TrainingDiverged, match="loss became nan at iteration 0"):
        fit(tiny_unet, nan_batches, iterations=3, batch_size=2, lr=1e-3)


def test_any_architecture_can_be_the_student(tiny_unet):
    """DKDM only needs (x_t, t) -> noise prediction: here a plain conv net that ignores t."""
    from torch import nn

    class ConvStudent(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 1, 3, padding=1))

        def forward(self, x, t):
            return self.net(x)

    pool = NoisePool(
        size=32,
        sample_shape=(1, 16, 16),
        alphas_cumprod=make_scheduler({"num_train_timesteps": 1000}, "ddpm").alphas_cumprod,
        num_steps=10,
        generator=torch.Generator().manual_seed(0),
    )
    torch.manual_seed(0)
    result = fit(ConvStudent(), PoolBatches(tiny_unet, pool), iterations=40, batch_size=8, lr=3e-3)
    assert result.mean_loss(30, 40) < result.mean_loss(0, 10)


def test_a_v_prediction_teacher_is_distilled_in_its_own_parametrisation(tmp_path, tiny_space, capsys):
    """A user's v-prediction UNet (as SD 2.x's 768 models are): the pool moves with the velocity
    the teacher predicts, the student learns that velocity, and the export samples as its teacher
    does (the scheduler's prediction_type kept)."""
    import json

    import optuna
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from automl_diff.cli import main
    from automl_diff.methods.training import TrainingInputs
    from automl_diff.models.loading import load_teacher
    from tests.conftest import TINY_UNET, write_study

    torch.manual_seed(0)
    folder = tmp_path / "v-teacher"
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    DDPMPipeline(unet=UNet2DModel(**TINY_UNET), scheduler=scheduler).save_pretrained(folder)
    config = write_study(tmp_path, folder, tiny_space, n_trials=1)
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study.db'}")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    out = tmp_path / "export"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["export", "--storage", storage, "--study-name", "tiny", "--trial", "0", "--out", str(out)]) == 0
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"

    from automl_diff.config import load_study_config

    study_config = load_study_config(config)
    teacher = load_teacher(str(folder))
    inputs = TrainingInputs(study_config.method_settings, teacher, study_config.method_options, device=torch.device("cpu"))
    batch = inputs.batches(0)(4)
    assert inputs.pool.prediction_type == "v_prediction"
    with torch.no_grad():  # the target is the teacher's own output: a velocity
        torch.testing.assert_close(batch.target, teacher.unet(batch.x, batch.t).sample)
