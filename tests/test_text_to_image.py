"""Text-to-image teachers: a Stable Diffusion pipeline folder loads as a teacher, guided latent
sampling is diffusers' own, and gating skips units of a conditional UNet."""

from __future__ import annotations

import shutil

import pytest
import torch

from automl_diff.errors import UserError
from automl_diff.models.loading import load_teacher
from automl_diff.sampling import Prompts
from tests.conftest import TINY_PROMPTS, build_tiny_clip


def _prompts(teacher, *, scale: float = 5.0, per_prompt: int = 1) -> Prompts:
    return teacher.text.prompts(TINY_PROMPTS, guidance_scale=scale, images_per_prompt=per_prompt)


def _sample(teacher, prompts: Prompts, *, num_images: int = 3, steps: int = 4, batch_size: int = 3, seed: int = 0, unet=None):
    return teacher.sampler(steps=steps, prompts=prompts).sample(
        unet or teacher.unet, num_images=num_images, batch_size=batch_size, seed=seed
    )


def test_pipeline_folder_is_a_teacher_with_frozen_parts(tiny_sd_dir):
    teacher = load_teacher(str(tiny_sd_dir))
    assert teacher.text is not None and teacher.text.pipeline_class == "StableDiffusionPipeline"
    assert (teacher.latent_resolution, teacher.resolution, teacher.channels) == (8, 16, 1)
    assert teacher.scheduler_config["_class_name"] == "DDIMScheduler"
    assert not any(p.requires_grad for p in teacher.text.vae.parameters())
    assert not any(p.requires_grad for p in teacher.text.text_encoder.parameters())
    # prompt embeddings are computed once per prompt list
    first = teacher.text.encode(TINY_PROMPTS)
    assert first.shape == (3, 24, 12) and teacher.text.encode(TINY_PROMPTS) is first


@pytest.mark.parametrize("part", ["vae", "text_encoder", "tokenizer", "unet", "scheduler"])
def test_pipeline_folder_missing_a_part_is_one_line(tiny_sd_dir, tmp_path, part):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_dir, broken)
    shutil.rmtree(broken / part)
    with pytest.raises(UserError) as error:
        load_teacher(str(broken))
    message = str(error.value)
    assert str(broken) in message and f"{part}/" in message and "\n" not in message


def test_guided_sampling_is_stable_diffusion_pipelines_own(tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    teacher = load_teacher(str(tiny_sd_dir))
    calls: list[int] = []
    handle = teacher.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        ours = _sample(teacher, _prompts(teacher))
    finally:
        handle.remove()
    # both halves of guidance in one call per step
    assert calls == [6] * 4
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None, requires_safety_checker=False)
    latents = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    theirs = pipe(list(TINY_PROMPTS), latents=latents, num_inference_steps=4, guidance_scale=5.0, output_type="pt").images
    assert ours.shape == (3, 1, 16, 16)
    torch.testing.assert_close((ours + 1) / 2, theirs, atol=1e-5, rtol=1e-4)
    # guidance changes the images: a scale of 1 runs the conditional half alone
    plain = _sample(teacher, _prompts(teacher, scale=1.0))
    assert (plain - ours).abs().max() > 1e-3


def test_images_follow_their_prompts_in_order(tiny_sd_dir):
    teacher = load_teacher(str(tiny_sd_dir))
    prompts = _prompts(teacher, per_prompt=2)
    assert [prompts.prompt_of(i) for i in range(8)] == [0, 0, 1, 1, 2, 2, 0, 0]
    one_batch = _sample(teacher, prompts, num_images=6, steps=2, batch_size=6, seed=3)
    batches = _sample(teacher, prompts, num_images=6, steps=2, batch_size=4, seed=3)
    torch.testing.assert_close(one_batch, batches, atol=1e-5, rtol=1e-4)


def test_gated_units_of_a_conditional_unet_do_not_run(tiny_sd_dir):
    from automl_diff.gating import Schedule, apply_schedule, model_fingerprint, prunable_units

    teacher = load_teacher(str(tiny_sd_dir))
    unet, steps = teacher.unet, 4
    units = tuple(prunable_units(unet, "layer"))
    assert "down.0.attentions.0" in units and "mid.attentions.0" in units and "up.1.attentions.0" in units

    def sample() -> torch.Tensor:
        return _sample(teacher, _prompts(teacher), steps=steps, unet=unet)

    full = sample()
    everything = Schedule.full(unet, steps, "layer")
    with apply_schedule(unet, everything):
        torch.testing.assert_close(sample(), full)
    skipped = {"down.0.attentions.0", "mid.attentions.0", "up.1.attentions.0"}
    gates = tuple(tuple(step == 0 or name not in skipped for name in units) for step in range(steps))
    with apply_schedule(unet, Schedule(steps, units, gates, model=model_fingerprint(unet))) as controller:
        gated = sample()
    # the resnet before each skipped attention feeds it alone: nothing reads it after step 0 either;
    # up.1's first attention reuses its cache, so nothing between the down path and it is read;
    # the layers after it run at every step
    idle = skipped | {name.replace("attentions", "resnets") for name in skipped} | {"mid.resnets.1", "up.0.resnets.0"}
    assert {name: controller.executed[name] for name in idle} == dict.fromkeys(idle, 1)
    assert controller.executed["up.1.resnets.1"] == controller.executed[units[-1]] == steps
    plan = controller.plan.executes.sum(axis=0)
    assert dict(controller.executed) == {name: int(n) for name, n in zip(controller.atoms, plan, strict=True) if n}
    assert gated.shape == full.shape and (gated - full).abs().max() > 0


# --- a DiP-GO study on the tiny Stable Diffusion pipeline ---------------------------------------


def _t2i_study(tmp_path, tiny_sd_dir, **overrides):
    from tests.conftest import write_study

    (tmp_path / "train.txt").write_text("\n".join(TINY_PROMPTS) + "\n")
    (tmp_path / "eval.csv").write_text("id,caption\n1,a handwritten seven\n2,the digit 2\n")
    config = {
        "name": "t2igo",
        "method": "dipgo",
        "search_space": None,
        "objectives": [{"name": "trajectory_macs"}, {"name": "fid"}, {"name": "prompt_accuracy", "direction": "maximize"}],
        "n_trials": 3,
        "budgets": {
            "train_iterations": 4,
            "batch_size": 2,
            "lr": 0.05,
            "fid_samples": 8,
            "images_per_prompt": 2,
            "sampling_steps": 4,
            "latency_repeats": 1,
            "latency_batch_size": 2,
        },
        "sampling": {"guidance_scale": 4.0},
        "prompts": {"train": "train.txt", "eval": "eval.csv", "column": "caption", "judge": "digits"},
        "method_options": {"granularity": "layer", "target_macs_ratio": 0.5, "reference_images": 4, "warmup": 0.0, "sparsity_weight": 5.0},
        **overrides,
    }
    return write_study(tmp_path, tiny_sd_dir, tmp_path / "unused.yaml", **config)


def test_dipgo_study_on_a_text_to_image_pipeline_runs_resumes_and_exports(tiny_sd_dir, tmp_path, capsys):
    import optuna
    from diffusers import StableDiffusionPipeline

    from automl_diff import Schedule, apply_schedule
    from automl_diff.cli import main
    from automl_diff.records import StudyAttr, TrialAttr
    from tests.conftest import printed_load_calls

    config = _t2i_study(tmp_path, tiny_sd_dir)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="t2igo", storage=storage)
    evaluation = study.user_attrs[StudyAttr.EVALUATION]
    assert evaluation["eval_prompts"] == ["a handwritten seven", "the digit 2"] and evaluation["guidance_scale"] == 4.0
    teacher = study.user_attrs[StudyAttr.TEACHER_METRICS]
    # a guided step runs both halves: twice one batch-1 forward pass per image
    from automl_diff.metrics.macs import count_macs

    teacher_model = load_teacher(str(tiny_sd_dir))
    assert teacher[TrialAttr.MACS] == 2 * count_macs(teacher_model.unet, text_length=24).macs
    assert teacher[TrialAttr.TRAJECTORY_MACS] == 4 * teacher[TrialAttr.MACS]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all(t.user_attrs[TrialAttr.TRAJECTORY_MACS] < teacher[TrialAttr.TRAJECTORY_MACS] for t in complete)
    assert evaluation["alignment"] == "prompt_accuracy" and study.directions[2] == optuna.study.StudyDirection.MAXIMIZE
    for t in complete:
        a = t.user_attrs
        assert t.values[2] == a[TrialAttr.PROMPT_ACCURACY] and 0 <= a[TrialAttr.PROMPT_ACCURACY_LOW] <= a[TrialAttr.PROMPT_ACCURACY]
        assert a[TrialAttr.PROMPT_ACCURACY] <= a[TrialAttr.PROMPT_ACCURACY_HIGH] <= 1
    # the sample grid holds the first image of each evaluation prompt, captioned in the report
    assert complete[0].user_attrs[TrialAttr.SAMPLE_PROMPTS] == ["a handwritten seven", "the digit 2"]
    assert main(["report", "--storage", storage, "--study-name", "t2igo", "--out", str(tmp_path / "report.html")]) == 0
    assert "<ol class='prompts'><li>a handwritten seven</li><li>the digit 2</li></ol>" in (tmp_path / "report.html").read_text()
    units = complete[0].user_attrs[TrialAttr.SCHEDULE]["units"]
    assert any(".attentions." in unit for unit in units)  # the transformer (cross-attention) layers are units
    # resume: more trials, the pruner's scores reused
    n = len(study.trials)
    assert main(["run", str(config), "--quiet", "--n-trials", "5"]) == 0
    capsys.readouterr()
    assert len(optuna.load_study(study_name="t2igo", storage=storage).trials) > n

    trial = complete[0]
    out_dir = tmp_path / "export"
    assert main(["export", "--storage", storage, "--study-name", "t2igo", "--trial", str(trial.number), "--out", str(out_dir)]) == 0
    (call,) = printed_load_calls(capsys.readouterr().out)
    assert call.startswith("diffusers.StableDiffusionPipeline.from_pretrained(")
    assert "text-to-image" in (out_dir / "README.md").read_text()
    pipe = StableDiffusionPipeline.from_pretrained(str(out_dir))
    schedule = Schedule.load(out_dir / "schedule.json")

    def sample():
        seed = torch.Generator().manual_seed(0)
        return pipe("a handwritten seven", num_inference_steps=4, guidance_scale=4.0, generator=seed, output_type="pt")

    full = sample()
    with apply_schedule(pipe, schedule) as controller:
        gated = sample()
        ran = sum(controller.executed.values())
    assert gated.images.shape == full.images.shape == (1, 1, 16, 16)
    assert ran == controller.plan.executes.sum() < 4 * len(controller.atoms)  # what the plan runs, no more


def test_text_to_image_study_errors_are_one_line(tiny_sd_dir, tiny_teacher_dir, tiny_space, tmp_path, capsys):
    from automl_diff.cli import main

    config = _t2i_study(tmp_path, tiny_sd_dir, prompts={"train": "train.txt"})
    assert main(["run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {config}: prompts.eval: required for a text-to-image teacher (a file of prompts FID is measured on)"
    config = _t2i_study(tmp_path, tiny_sd_dir, prompts={"eval": "eval.csv", "column": "caption", "judge": "digits"})
    assert main(["run", str(config), "--quiet"]) == 2
    assert "prompts.train: required for method dipgo" in capsys.readouterr().err
    config = _t2i_study(tmp_path, tiny_sd_dir, prompts={"train": "train.txt", "eval": "eval.csv", "column": "caption"})
    assert main(["run", str(config), "--quiet"]) == 2  # prompt_accuracy with no judge: the teacher has none of its own
    assert "prompts.judge: prompt_accuracy needs a prompt judge (digits, shapes)" in capsys.readouterr().err
    config = _t2i_study(tmp_path, tiny_sd_dir, prompts={"train": "train.txt", "eval": "eval.csv", "column": "text"})
    assert main(["run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {config}: prompts.eval: ") and "has no column 'text' (columns: id, caption)" in err
    config = _t2i_study(tmp_path, tiny_sd_dir, prompts={"train": "missing.txt", "eval": "eval.csv", "column": "caption"})
    assert main(["run", str(config), "--quiet"]) == 2
    assert "prompts.train: the prompt file" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    config = _t2i_study(tmp_path, tiny_sd_dir, prompts={"train": "empty.txt", "eval": "eval.csv", "column": "caption"})
    assert main(["run", str(config), "--quiet"]) == 2
    assert "holds no prompts" in capsys.readouterr().err
    # an unconditional search-space family for a text-to-image teacher names the one that fits
    config = _t2i_study(tmp_path, tiny_sd_dir, method="dkdm", search_space=str(tiny_space), method_options={"pool_size": 8})
    assert main(["run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tiny_space}: family: unet2d does not fit a text-conditioned teacher; use family: unet2d_condition"
    # prompts for an unconditional teacher
    from tests.conftest import write_study

    config = write_study(
        tmp_path,
        tiny_teacher_dir,
        tmp_path / "train.txt",
        method="dipgo",
        search_space=None,
        prompts={"train": "train.txt"},
        method_options={},
    )
    assert main(["run", str(config), "--quiet"]) == 2
    assert "is not a text-to-image or class-conditional pipeline" in capsys.readouterr().err


def test_profile_times_a_schedule_on_a_pipeline_and_on_a_bare_conditional_unet(tiny_sd_dir, tmp_path, capsys):
    import json

    from automl_diff.cli import main
    from automl_diff.gating import Schedule, model_fingerprint, prunable_units
    from automl_diff.metrics.macs import count_macs
    from tests.conftest import TINY_COND_UNET

    teacher = load_teacher(str(tiny_sd_dir))
    units = tuple(prunable_units(teacher.unet, "block"))
    steps = 3
    gates = tuple(tuple(step == 0 or unit.startswith("down") for unit in units) for step in range(steps))
    path = tmp_path / "schedule.json"
    Schedule(steps, units, gates, model=model_fingerprint(teacher.unet)).save(path)
    args = ["--schedule", str(path), "--json", "--repeats", "1", "--batch-size", "1"]
    assert main(["profile", "--model", str(tiny_sd_dir), *args]) == 0
    data = json.loads(capsys.readouterr().out)
    # guided: both halves of every step, with the tokenizer's 24 tokens
    assert data["guidance_scale"] == 7.5
    assert data["full_trajectory_macs"] == 2 * steps * count_macs(teacher.unet, text_length=24).macs
    assert data["macs_reduction"] > 1 and data["latency"] > 0 and data["full_latency"] > 0
    # the architecture alone (random weights), from random text embeddings
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"_class_name": "UNet2DConditionModel", **TINY_COND_UNET}))
    assert main(["profile", "--model", str(config), *args, "--text-length", "16", "--guidance-scale", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "guidance_scale" not in data and data["full_trajectory_macs"] == steps * count_macs(teacher.unet, text_length=16).macs


def test_prompt_accuracy_reads_the_prompted_digit_on_held_out_digits():
    from automl_diff.metrics.alignment import prompt_accuracy, prompt_labels
    from automl_diff.zoo import JUDGES
    from automl_diff.zoo.digits import classifier_split, load_digits

    images, labels = load_digits(resolution=16, with_labels=True)
    _, held_out = classifier_split(len(images))
    images, labels = images[held_out], labels[held_out]
    prompts = [
        f"a handwritten {['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine'][d]}" for d in labels.tolist()
    ]
    judge = JUDGES["digits"]
    right = prompt_accuracy(images, prompt_labels(prompts, judge), judge)
    assert right.value > 0.9 and right.low < right.value < right.high <= 1
    wrong = prompt_accuracy(images, [(d + 1) % 10 for d in labels.tolist()], judge)
    assert wrong.value < 0.1 and wrong.high < right.low
    with pytest.raises(UserError, match="names no digit"):
        prompt_labels(["a cat"], judge, where="eval.txt")


def test_wilson_interval_stays_within_zero_and_one():
    from automl_diff.metrics.intervals import proportion_interval

    assert proportion_interval(0, 20).low == 0 and 0 < proportion_interval(0, 20).high < 0.2
    assert proportion_interval(20, 20).high == 1 and 0.8 < proportion_interval(20, 20).low < 1
    half = proportion_interval(50, 100)
    assert half.value == 0.5 and half.low == pytest.approx(0.404, abs=1e-3) and half.high == pytest.approx(0.596, abs=1e-3)


def test_clip_score_uses_a_local_clip_model_and_names_what_to_download(tmp_path):
    from automl_diff.metrics.alignment import ClipScorer
    from automl_diff.zoo.digits import load_digits

    scorer = ClipScorer(str(build_tiny_clip(tmp_path / "clip")))
    images = load_digits(resolution=16)[:6]
    score = scorer(images, ["a handwritten seven"] * 3 + ["the digit 2"] * 3)
    assert 0 <= score.value <= 100 and score.low <= score.value <= score.high
    # the score is CLIP's own cosine: 100 x the image and text embeddings' dot product, at least 0
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(tmp_path / "clip"), CLIPProcessor.from_pretrained(tmp_path / "clip")
    pixels = ((images[:1] + 1) * 127.5).round().to(torch.uint8).repeat(1, 3, 1, 1)
    inputs = processor(text=["a handwritten seven"], images=list(pixels), return_tensors="pt", padding=True)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"])
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    image, text = (getattr(x, "pooler_output", x) for x in (image, text))
    expected = max(0.0, 100 * torch.nn.functional.cosine_similarity(image, text).item())
    assert scorer.scores(images[:1], ["a handwritten seven"])[0] == pytest.approx(expected, abs=1e-3)
    # the same images against other prompts score otherwise
    assert scorer(images, ["a 4"] * 6).value != score.value
    with pytest.raises(UserError) as error:
        ClipScorer("openai/not-a-cached-clip")
    assert "huggingface-cli download openai/not-a-cached-clip" in str(error.value) and "\n" not in str(error.value)


def test_a_reduced_precision_teacher_samples_and_is_recorded(tiny_sd_dir, tiny_space, tmp_path, capsys, monkeypatch):
    import optuna
    from diffusers import UNet2DConditionModel

    from automl_diff.cli import main
    from automl_diff.records import StudyAttr, TrialAttr

    # every UNet call of the run (the pruner's trajectories, FID, latency) computes in bfloat16
    seen, forward = set(), UNet2DConditionModel.forward

    def recording(self, sample, *args, **kwargs):
        seen.add((self.dtype, sample.dtype))
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    config = _t2i_study(tmp_path, tiny_sd_dir, dtype="bfloat16", n_trials=1)
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    assert seen == {(torch.bfloat16, torch.bfloat16)}, seen
    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    study = optuna.load_study(study_name="t2igo", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert study.user_attrs[StudyAttr.EVALUATION]["dtype"] == "bfloat16"
    (trial,) = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert trial.user_attrs[TrialAttr.FID] > 0
    config = _t2i_study(tmp_path, tiny_sd_dir, dtype="float16", device="cpu")
    assert main(["run", str(config), "--quiet"]) == 2
    assert (
        capsys.readouterr().err.strip() == f"error: {config}: dtype: float16 needs a CUDA device (device is cpu); use bfloat16 or float32"
    )
    config = _t2i_study(tmp_path, tiny_sd_dir, dtype="float16", method="dkdm", search_space=str(tiny_space), method_options={})
    assert main(["run", str(config), "--quiet"]) == 2
    assert "dtype: only method dipgo samples a reduced-precision teacher" in capsys.readouterr().err


def test_the_shipped_digits_t2i_teacher_loads_and_samples_with_guidance(capsys):
    import json

    from diffusers import StableDiffusionPipeline

    from automl_diff.cli import main
    from automl_diff.metrics.alignment import prompt_accuracy
    from automl_diff.zoo import JUDGES
    from automl_diff.zoo.digits_t2i import DIGITS_T2I_DIR, GUIDANCE_SCALE, NUMBER_WORDS, TEMPLATES, digit_of

    files = [f for f in DIGITS_T2I_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 15 * 2**20
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".ckpt")]  # safetensors only
    teacher = load_teacher("digits-t2i")
    assert teacher.dataset == "digits" and (teacher.resolution, teacher.channels, teacher.latent_resolution) == (16, 1, 8)
    kinds = {type(block).__name__ for block in [*teacher.unet.down_blocks, teacher.unet.mid_block, *teacher.unet.up_blocks]}
    assert {"CrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D"} <= kinds
    # sampled with diffusers alone, its digits are the ones the prompts name
    pipe = StableDiffusionPipeline.from_pretrained(str(DIGITS_T2I_DIR))
    prompts = [template.format(word=NUMBER_WORDS[d], num=d) for d in range(10) for template in TEMPLATES[:4]]
    out = pipe(
        prompts,
        num_inference_steps=20,
        guidance_scale=GUIDANCE_SCALE,
        output_type="np",
        generator=torch.Generator().manual_seed(3),
    )
    assert out.images.shape == (40, 16, 16, 1)
    images = torch.from_numpy(out.images).permute(0, 3, 1, 2) * 2 - 1
    accuracy = prompt_accuracy(images, [digit_of(p) for p in prompts], JUDGES["digits"])
    assert accuracy.low >= 0.8, accuracy
    assert digit_of("a picture of a nine") == 9 and digit_of("number 4 written by hand") == 4 and digit_of("a cat") is None
    assert main(["profile", "--model", "digits-t2i", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == sum(p.numel() for p in teacher.unet.parameters())
