"""The shapes dataset and the ``shapes-t2i`` teacher: scenes drawn as captioned, the shipped
classifier that reads them back, SD-1.5's block layout, the training command, and a study on the
pipeline it makes through the CLI to an export that diffusers loads alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from automl_diff.errors import UserError
from automl_diff.models.loading import load_teacher
from automl_diff.zoo import shapes

REPO = Path(__file__).resolve().parents[1]


def test_scenes_are_drawn_where_and_as_their_captions_say():
    scenes = shapes.draw_scenes(64, seed=5)
    images = shapes.render(scenes)
    assert images.shape == (64, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    assert shapes.render(scenes, resolution=32).shape == (64, 3, 32, 32)
    # the shape's colour at its centre, the background's in the corner farthest from it
    rows = (scenes.centre[:, 0] * 64).long()
    cols = (scenes.centre[:, 1] * 64).long()
    centre = images[torch.arange(64), :, rows, cols]
    torch.testing.assert_close((centre + 1) / 2, scenes.colour, atol=0.02, rtol=0)
    corner_row = torch.where(scenes.centre[:, 0] < 0.5, 63, 0)
    corner_col = torch.where(scenes.centre[:, 1] < 0.5, 63, 0)
    corner = (images[torch.arange(64), :, corner_row, corner_col] + 1) / 2
    assert ((corner - scenes.background).abs() <= 0.09).all()
    # every phrasing names the scene it was made from, in any word order
    radix = torch.tensor([120, 30, 15, 3, 1])  # 4 shapes x 4 colours x 2 sizes x 5 positions x 3 backgrounds
    for attributes in scenes.attributes[:16]:
        expected = int((attributes * radix).sum())
        assert {shapes.combination_of(shapes.caption(attributes, k)) for k in range(len(shapes.TEMPLATES))} == {expected}
        assert shapes.combination(expected) == tuple(attributes.tolist())
    assert shapes.combination_of("a red circle") is None and shapes.combination_of("a cat") is None
    # the evaluation prompt set holds every combination once
    assert sorted(shapes.combination_of(p) for p in shapes.prompt_set(templates=(3,), seed=2)) == list(range(480))


def test_the_shipped_classifier_reads_every_attribute_of_unseen_scenes():
    from automl_diff.metrics.alignment import prompt_accuracy, prompt_labels
    from automl_diff.zoo import FEATURES, JUDGES

    scenes = shapes.draw_scenes(400, seed=424242)
    images = shapes.render(scenes)
    prompts = [shapes.caption(a, k % len(shapes.TEMPLATES)) for k, a in enumerate(scenes.attributes)]
    judge = JUDGES["shapes"]
    right = prompt_accuracy(images, prompt_labels(prompts, judge), judge)
    assert right.low >= 0.97, right
    # one attribute wrong is a miss: every colour moved on by one
    moved = scenes.attributes.clone()
    moved[:, 1] = (moved[:, 1] + 1) % 4
    wrong = prompt_accuracy(images, [shapes.combination_of(shapes.caption(a)) for a in moved], judge)
    assert wrong.high < 0.05
    with pytest.raises(UserError, match="names no complete scene"):
        prompt_labels(["a red circle"], judge, where="eval.txt")
    # FID features of RGB images, and of grey ones (repeated to RGB)
    fingerprint, features = FEATURES["shapes"].model(torch.device("cpu"))
    with torch.no_grad():
        assert features(images[:4]).shape == (4, 128) and features(images[:4, :1]).shape == (4, 128)
    assert fingerprint.startswith("shapes-")


def test_the_shapes_t2i_configs_have_sd15s_layout_and_compression():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from automl_diff.zoo.shapes_t2i import UNET_CONFIG, VAE_CONFIG

    unet = UNet2DConditionModel(**UNET_CONFIG)
    # SD-1.5's layout: 4 levels, 2 resnet + transformer pairs down and 3 up, cross attention in the
    # first three levels and none in the last, a mid block with attention, no downsampler last
    assert [len(b.resnets) for b in unet.down_blocks] == [2, 2, 2, 2] and [len(b.resnets) for b in unet.up_blocks] == [3, 3, 3, 3]
    assert [len(getattr(b, "attentions", [])) for b in unet.down_blocks] == [2, 2, 2, 0]
    assert [len(getattr(b, "attentions", [])) for b in unet.up_blocks] == [0, 3, 3, 3]
    assert [b.downsamplers is not None for b in unet.down_blocks] == [True, True, True, False]
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn" and len(unet.mid_block.attentions) == 1
    # the VAE compresses 8x per side to 4 channels: 48x fewer values, as SD's
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    with torch.no_grad():
        latents = vae.encode(shapes.load_shapes(count=2)).latent_dist.mean
    assert latents.shape == (2, 4, 8, 8) and 3 * 64 * 64 // latents[0].numel() == 48


def test_a_missing_shapes_teacher_names_the_command_that_trains_it(tmp_path, monkeypatch):
    import dataclasses

    from automl_diff.zoo import TEACHERS

    teacher = TEACHERS["shapes-t2i"]
    assert teacher.dataset == "shapes" and teacher.judge == "shapes" and "train_shapes_t2i" in teacher.retrain
    monkeypatch.setitem(TEACHERS, "shapes-t2i", dataclasses.replace(teacher, folder=tmp_path))
    with pytest.raises(UserError, match=r"missing from .*; retrain it with python -m automl_diff.zoo.train_shapes_t2i"):
        load_teacher("shapes-t2i")


def test_the_shipped_shapes_teacher_draws_what_its_prompts_ask_for_through_diffusers_alone():
    """The shipped pipeline, loaded and sampled by diffusers alone (DDIM, the studies' 25 steps and
    guidance), draws the scenes of the evaluation prompts: the shapes judge reads all five
    attributes right in most images (0.90 on all 480 prompts at seed 0, BENCHMARKS.md), where a
    teacher that ignores one attribute, as the position-blind second training run did, scores 0.17."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from automl_diff.data import read_prompts
    from automl_diff.metrics.alignment import prompt_accuracy, prompt_labels
    from automl_diff.zoo import JUDGES
    from automl_diff.zoo.shapes_t2i import GUIDANCE_SCALE, SHAPES_T2I_DIR

    pipe = StableDiffusionPipeline.from_pretrained(str(SHAPES_T2I_DIR))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = list(read_prompts(REPO / "studies" / "prompts" / "shapes_eval.txt")[:120])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        images = pipe(prompts, num_inference_steps=25, guidance_scale=GUIDANCE_SCALE, generator=generator, output_type="pt").images
    assert images.shape == (120, 3, 64, 64)
    judge = JUDGES["shapes"]
    right = prompt_accuracy(images * 2 - 1, prompt_labels(prompts, judge), judge)
    assert right.low >= 0.75, right


@pytest.fixture(scope="module")
def trained_shapes_dir(tmp_path_factory: pytest.TempPathFactory):
    """A shapes-t2i pipeline folder made by the training command, a couple of steps per stage."""
    from automl_diff.zoo.train_shapes_t2i import main

    out = tmp_path_factory.mktemp("shapes") / "shapes_t2i"
    args = ["--out", str(out), "--classifier-steps", "2", "--vae-steps", "2", "--unet-steps", "2"]
    assert main([*args, "--dataset-size", "64", "--held-out", "32"]) == 0
    return out


@pytest.mark.slow
def test_the_training_command_writes_a_pipeline_that_diffusers_loads(trained_shapes_dir):
    from diffusers import StableDiffusionPipeline

    out = trained_shapes_dir
    summary = json.loads((out / "training.json").read_text())
    assert summary["dataset_size"] == 64 and set(summary["classifier_accuracy"]) == {
        "shape",
        "colour",
        "size",
        "position",
        "background",
        "all",
    }
    assert (out / "classifier.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    images = pipe("a small red circle at the centre on a black background", num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 64, 64)
    # every caption word is one token
    for word in ("triangle", "yellow", "background", "centre", ","):
        assert len(pipe.tokenizer.tokenize(word)) == 1


@pytest.mark.slow
def test_a_dipgo_study_on_shapes_t2i_runs_through_the_cli_to_an_export(trained_shapes_dir, tmp_path, capsys):
    import optuna
    from diffusers import StableDiffusionPipeline

    from automl_diff import Schedule, apply_schedule
    from automl_diff.cli import main
    from automl_diff.records import TrialAttr
    from tests.conftest import write_study

    prompts = shapes.prompt_set(templates=(0, 1, 2), seed=7, count=6)
    (tmp_path / "train.txt").write_text("\n".join(prompts[:3]) + "\n")
    (tmp_path / "eval.txt").write_text("\n".join(prompts[3:]) + "\n")
    config = write_study(
        tmp_path,
        trained_shapes_dir,
        tmp_path / "unused.yaml",
        name="shapes",
        method="dipgo",
        search_space=None,
        objectives=[{"name": "trajectory_macs"}, {"name": "fid"}, {"name": "prompt_accuracy", "direction": "maximize"}],
        n_trials=2,
        budgets={
            "train_iterations": 3,
            "batch_size": 2,
            "lr": 0.05,
            "fid_samples": 6,
            "images_per_prompt": 2,
            "sampling_steps": 4,
            "latency_repeats": 1,
            "latency_batch_size": 2,
        },
        fid={"dataset": "shapes", "features": "shapes"},
        prompts={"train": "train.txt", "eval": "eval.txt", "judge": "shapes"},
        method_options={"granularity": "branch", "reference_images": 3, "warmup": 0.0, "warm_start": ["deepcache:2"]},
    )
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="shapes", storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and study.trials[0].user_attrs[TrialAttr.RECIPE] == "deepcache:2"
    assert 0 <= complete[0].user_attrs[TrialAttr.PROMPT_ACCURACY] <= 1
    units = complete[0].user_attrs[TrialAttr.SCHEDULE]["units"]
    # SD's branches: resnet + transformer pairs, the last level's lone resnets, the resamplers
    assert {"down.0.resnets.0+down.0.attentions.0", "down.3.resnets.1", "down.0.downsamplers.0"} <= set(units)
    out_dir = tmp_path / "export"
    assert main(["export", "--storage", storage, "--study-name", "shapes", "--trial", str(complete[0].number), "--out", str(out_dir)]) == 0
    capsys.readouterr()
    pipe = StableDiffusionPipeline.from_pretrained(str(out_dir))
    schedule = Schedule.load(out_dir / "schedule.json")
    with apply_schedule(pipe, schedule):
        images = pipe(prompts[0], num_inference_steps=4, guidance_scale=2.0, output_type="pt").images
    assert images.shape == (1, 3, 64, 64)
