"""Text-to-image teachers: a Stable Diffusion pipeline folder loads as a teacher, guided latent
sampling is diffusers' own, and gating skips units of a conditional UNet."""

from __future__ import annotations

import shutil

import pytest
import torch

from automl_diff.errors import UserError
from automl_diff.models.loading import load_teacher
from automl_diff.sampling import Prompts, sample_images
from tests.conftest import TINY_PROMPTS


def _prompts(teacher, *, scale: float = 5.0, per_prompt: int = 1) -> Prompts:
    text = teacher.text
    return Prompts(text.encode(TINY_PROMPTS), text.encode([""]), scale, per_prompt, decode=text.decode)


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
        ours = sample_images(teacher.unet, teacher.scheduler_config, num_images=3, steps=4, batch_size=3, seed=0, prompts=_prompts(teacher))
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
    plain = sample_images(
        teacher.unet, teacher.scheduler_config, num_images=3, steps=4, batch_size=3, seed=0, prompts=_prompts(teacher, scale=1.0)
    )
    assert (plain - ours).abs().max() > 1e-3


def test_images_follow_their_prompts_in_order(tiny_sd_dir):
    teacher = load_teacher(str(tiny_sd_dir))
    prompts = _prompts(teacher, per_prompt=2)
    assert [prompts.prompt_of(i) for i in range(8)] == [0, 0, 1, 1, 2, 2, 0, 0]
    one_batch = sample_images(teacher.unet, teacher.scheduler_config, num_images=6, steps=2, batch_size=6, seed=3, prompts=prompts)
    batches = sample_images(teacher.unet, teacher.scheduler_config, num_images=6, steps=2, batch_size=4, seed=3, prompts=prompts)
    torch.testing.assert_close(one_batch, batches, atol=1e-5, rtol=1e-4)


def test_gated_units_of_a_conditional_unet_do_not_run(tiny_sd_dir):
    from automl_diff.gating import Schedule, apply_schedule, model_fingerprint, prunable_units

    teacher = load_teacher(str(tiny_sd_dir))
    unet, steps = teacher.unet, 4
    units = tuple(prunable_units(unet, "layer"))
    assert "down.0.attentions.0" in units and "mid.attentions.0" in units and "up.1.attentions.0" in units

    def sample() -> torch.Tensor:
        return sample_images(unet, teacher.scheduler_config, num_images=3, steps=steps, batch_size=3, seed=0, prompts=_prompts(teacher))

    full = sample()
    everything = Schedule.full(unet, steps, "layer")
    with apply_schedule(unet, everything):
        torch.testing.assert_close(sample(), full)
    skipped = {"down.0.attentions.0", "mid.attentions.0", "up.1.attentions.0"}
    gates = tuple(tuple(step == 0 or name not in skipped for name in units) for step in range(steps))
    with apply_schedule(unet, Schedule(steps, units, gates, model=model_fingerprint(unet))) as controller:
        gated = sample()
    assert all(controller.executed[name] == 1 for name in skipped)
    assert all(controller.executed[name] == steps for name in units if name not in skipped)
    assert gated.shape == full.shape and (gated - full).abs().max() > 0
