"""Schedules that compile: ``apply_schedule(..., compile=True)`` and a UNet compiled by the user
(``torch.compile``) sample what the eager schedule samples, on an unconditional UNet through a
diffusers pipeline, on a text-to-image UNet of Stable Diffusion's layout and on transformers (DiT,
SD3), in one graph that every step and every schedule of the model runs (gates as inputs, each atom
a ``torch.cond``); ``profile --schedule --compile`` reports both compiled."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from automl_diff.cli import main
from automl_diff.gating import Schedule, apply_schedule, model_fingerprint, prunable_units

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _schedule(unet: torch.nn.Module, steps: int, granularity: str = "layer", share: float = 0.3) -> Schedule:
    units = tuple(prunable_units(unet, granularity))
    keep = np.random.default_rng(0).random((steps, len(units))) < share
    keep[0] = True
    return Schedule(steps, units, tuple(tuple(bool(v) for v in row) for row in keep), model_fingerprint(unet))


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_a_compiled_schedule_samples_what_the_eager_one_does_through_a_pipeline(tiny_unet):
    from diffusers import DDIMPipeline, DDIMScheduler

    steps = 8
    schedule = _schedule(tiny_unet, steps)
    pipe = DDIMPipeline(unet=tiny_unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)

    def sample() -> np.ndarray:
        return pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(3), output_type="np").images

    full = sample()
    with apply_schedule(pipe, schedule) as eager:
        expected = sample()
    with apply_schedule(pipe, schedule, compile=True) as compiled:
        first = sample()
        executed, graphs = dict(compiled.executed), _graphs()
        again = sample()
    assert graphs == 1 and _graphs() == graphs  # one graph for every step, none broken; the second trajectory compiled nothing
    np.testing.assert_allclose(first, expected, atol=1e-4)
    np.testing.assert_allclose(again, expected, atol=1e-4)
    assert executed == dict(eager.executed)  # the same atoms ran, as often
    assert 0 < sum(executed.values()) < steps * len(eager.atoms)
    with apply_schedule(pipe, schedule, compile=True):  # applied again to the same model: its graph is reused
        np.testing.assert_allclose(sample(), expected, atol=1e-4)
    other = _schedule(tiny_unet, steps, share=0.6)
    with apply_schedule(pipe, other):
        expected_other = sample()
    with apply_schedule(pipe, other, compile=True):  # so is it by another schedule of the same model
        np.testing.assert_allclose(sample(), expected_other, atol=1e-4)
    assert _graphs() == graphs
    np.testing.assert_allclose(sample(), full, atol=1e-6)  # removed: the plain model again


def test_compiled_schedules_of_two_models_of_one_class_keep_their_graphs_apart(tiny_unet):
    """A compiled schedule's graphs do not check the model's modules (dynamo's lookup would cost
    as much as a gated call), so each controller keeps its own: two UNets of one class, of other
    widths, gated and compiled side by side, each sample what they sample eagerly."""
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    from tests.conftest import TINY_UNET

    torch.manual_seed(1)
    wider = UNet2DModel(**{**TINY_UNET, "block_out_channels": [12, 24]}).eval()
    steps = 4
    pipes = [DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000)) for unet in (tiny_unet, wider)]
    schedules = [_schedule(unet, steps, share=0.5) for unet in (tiny_unet, wider)]

    def sample(pipe) -> np.ndarray:
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np").images

    expected = []
    for pipe, schedule in zip(pipes, schedules):
        with apply_schedule(pipe, schedule):
            expected.append(sample(pipe))
    eager_backend = {"backend": "eager"}  # dynamo's graphs and guards, without inductor's code generation
    with apply_schedule(pipes[0], schedules[0], compile=eager_backend), apply_schedule(pipes[1], schedules[1], compile=eager_backend):
        for index in (0, 1, 0, 1):
            np.testing.assert_allclose(sample(pipes[index]), expected[index], atol=1e-4)


def test_a_user_compiled_unet_takes_a_schedule_and_is_itself_again_afterwards(tiny_cond_unet):
    from automl_diff.sampling import Prompts, Sampler

    steps = 5
    schedule = _schedule(tiny_cond_unet, steps, granularity="branch")
    embeddings = torch.randn(2, 7, tiny_cond_unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
    prompts = Prompts(embeddings, torch.zeros_like(embeddings), guidance_scale=3.0)
    sampler = Sampler({"num_train_timesteps": 1000, "beta_schedule": "linear"}, steps=steps, prompts=prompts)
    with apply_schedule(tiny_cond_unet, schedule):
        expected = sampler.sample(tiny_cond_unet, num_images=2, batch_size=2, seed=1)
    full = sampler.sample(tiny_cond_unet, num_images=2, batch_size=2, seed=1)

    user = torch.compile(tiny_cond_unet)
    with apply_schedule(user, schedule) as controller:  # accepted: the original module is gated, its pieces compiled
        assert controller.compile_options is not None
        got = sampler.sample(user, num_images=2, batch_size=2, seed=1)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sampler.sample(user, num_images=2, batch_size=2, seed=1), full, atol=1e-4, rtol=1e-4)


def test_profile_reports_the_compiled_schedule_beside_the_eager_one(tiny_teacher_dir, tmp_path, capsys, monkeypatch):
    from diffusers import UNet2DModel

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))  # the figures' plumbing

    unet = UNet2DModel.from_pretrained(tiny_teacher_dir / "unet")
    path = _schedule(unet, 4, granularity="block").save(tmp_path / "schedule.json")
    argv = ["profile", "--model", str(tiny_teacher_dir), "--schedule", str(path), "--repeats", "1", "--batch-size", "2"]
    assert main([*argv, "--compile", "--plan-graphs", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("compiled_latency", "compiled_full_latency", "compiled_warmup_s", "compiled_full_warmup_s"):
        assert report[key] > 0
    assert report["compiled_speedup"] == pytest.approx(report["compiled_full_latency"] / report["compiled_latency"])
    assert main(["profile", "--model", str(tiny_teacher_dir), "--compile"]) == 2
    assert "--compile: only meaningful with --schedule" in capsys.readouterr().err
    assert main([*argv, "--plan-graphs", "2"]) == 2
    assert "--plan-graphs 2: only meaningful with --compile" in capsys.readouterr().err


def test_compile_modes_that_replay_cuda_graphs_and_plan_graphs_without_compiling_are_refused(tiny_unet):
    schedule = _schedule(tiny_unet, 3)
    with pytest.raises(ValueError, match="CUDA graphs"):
        apply_schedule(tiny_unet, schedule, compile={"mode": "reduce-overhead"})
    with pytest.raises(ValueError, match="plan_graphs=2: 0 or more, and more than 0 only with compile"):
        apply_schedule(tiny_unet, schedule, plan_graphs=2)
    assert not hasattr(tiny_unet, "_automl_diff_gates")


def test_a_dry_run_reports_the_teacher_compiled_apart_from_the_projection(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    from tests.test_text_to_image import _t2i_study

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))  # the figures' plumbing
    config = _t2i_study(tmp_path, tiny_sd_dir, n_trials=2)
    assert main(["run", str(config), "--dry-run", "--compile", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    compiled = report["compiled"]
    assert compiled["error"] == "" and compiled["warmup_seconds"] > 0 and compiled["seconds"] > 0 and compiled["eager_seconds"] > 0
    assert not any("compiled" in s["name"] for s in report["stages"])  # not part of the projection
    assert main(["run", str(config), "--dry-run", "--compile", "--quiet"]) == 0
    assert "compiled (torch.compile, the teacher): one model call" in capsys.readouterr().out
    assert main(["run", str(config), "--compile"]) == 2
    assert "--compile: only meaningful with --dry-run" in capsys.readouterr().err


@pytest.mark.parametrize("folder", ["tiny_dit_dir", "tiny_sd3_dir"])
def test_a_compiled_schedule_of_a_transformer_samples_what_the_eager_one_does(folder, request):
    """DiT's blocks, and SD3's joint blocks (two streams, a skipped block adding both of its last
    updates), guided: compiled, the schedule samples what it samples eagerly, and a second
    trajectory compiles nothing."""
    from automl_diff.models.loading import load_teacher

    teacher = load_teacher(str(request.getfixturevalue(folder)))
    schedule = _schedule(teacher.unet, 4, "block", share=0.4)
    parts = teacher.text or teacher.classes
    sampler = teacher.sampler(steps=4, prompts=parts.prompts(["a red square", "blue"] if teacher.text else ["3", "7"], guidance_scale=3.0))
    with apply_schedule(teacher.unet, schedule) as eager:
        expected = sampler.sample(teacher.unet, num_images=2, batch_size=2, seed=0)
    with apply_schedule(teacher.unet, schedule, compile=True) as compiled:
        first = sampler.sample(teacher.unet, num_images=2, batch_size=2, seed=0)
        executed, graphs = dict(compiled.executed), _graphs()
        again = sampler.sample(teacher.unet, num_images=2, batch_size=2, seed=0)
    assert graphs == 1 and _graphs() == graphs
    torch.testing.assert_close(first, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(again, expected, atol=1e-4, rtol=0)
    assert executed == dict(eager.executed) and 0 < sum(executed.values()) < 4 * len(schedule.units)


def _recurring(unet: torch.nn.Module, steps: int, granularity: str) -> Schedule:
    """A schedule whose calls after the first alternate two plans (all but the first unit run;
    only the last runs), and end with a third (the last two run)."""
    n = len(units := tuple(prunable_units(unet, granularity)))
    patterns = [[k > 0 for k in range(n)], [k == n - 1 for k in range(n)], [k >= n - 2 for k in range(n)]]
    rows = [[True] * n] + [patterns[k % 2] for k in range(steps - 2)] + [patterns[2]]
    return Schedule(steps, units, tuple(tuple(row) for row in rows), model_fingerprint(unet))


@pytest.mark.parametrize("folder, granularity, backend", [("tiny_sd_dir", "branch", "inductor"), ("tiny_dit_dir", "block", "eager")])
def test_the_plans_that_recur_most_compile_graphs_of_their_own_that_sample_what_the_eager_schedule_does(
    folder, granularity, backend, request
):
    """``plan_graphs=3``: the first call and the two plans most later calls share run graphs with
    their gates as constants (a reused atom returns its cache uncopied), the last call the shared
    graph; one trajectory compiles four graphs, the next none, and both sample what the eager
    schedule samples."""
    from automl_diff.models.loading import load_teacher

    teacher = load_teacher(str(request.getfixturevalue(folder)))
    steps = 7
    schedule = _recurring(teacher.unet, steps, granularity)
    parts = teacher.text or teacher.classes
    sampler = teacher.sampler(
        steps=steps, prompts=parts.prompts(["a red square", "blue"] if teacher.text else ["3", "7"], guidance_scale=3.0)
    )
    with apply_schedule(teacher.unet, schedule) as eager:
        expected = sampler.sample(teacher.unet, num_images=2, batch_size=2, seed=0)
    with apply_schedule(teacher.unet, schedule, compile={"backend": backend}, plan_graphs=3) as compiled:
        first = sampler.sample(teacher.unet, num_images=2, batch_size=2, seed=0)
        executed, graphs = dict(compiled.executed), _graphs()
        again = sampler.sample(teacher.unet, num_images=2, batch_size=2, seed=0)
    with apply_schedule(teacher.unet, schedule, compile={"backend": backend}, plan_graphs=3):  # applied again: the same graphs
        applied_again = sampler.sample(teacher.unet, num_images=2, batch_size=2, seed=0)
    assert graphs == 4 and _graphs() == graphs
    for images in (first, again, applied_again):
        torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)
    assert executed == dict(eager.executed)
