"""Transformer teachers: a ``DiTPipeline`` folder (class-conditional, learned variance, RGB latents
of its own VAE) loads as a teacher, samples as ``DiTPipeline`` does, is counted per transformer
block, and a schedule gates its blocks, a skipped block adding its last update to its input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from automl_diff.errors import UserError
from automl_diff.gating import Schedule, apply_schedule
from automl_diff.gating.units import model_fingerprint
from automl_diff.models.loading import load_teacher

BLOCKS = tuple(f"transformer_blocks.{i}" for i in range(4))


def _sampler(teacher, classes=("3", "seven"), *, scale: float = 4.0, steps: int = 4):
    return teacher.sampler(steps=steps, prompts=teacher.classes.prompts(list(classes), guidance_scale=scale))


def test_a_dit_folder_is_a_teacher_that_samples_as_dit_pipeline(tiny_dit_dir, monkeypatch):
    import diffusers.pipelines.dit.pipeline_dit as dit
    from diffusers import DiTPipeline

    teacher = load_teacher(str(tiny_dit_dir))
    assert (teacher.latent_resolution, teacher.resolution, teacher.channels) == (8, 16, 3)
    assert teacher.classes is not None and teacher.text is None and teacher.classes.num_classes == 1000
    assert [teacher.classes.class_id(name) for name in ("3", "seven", "Third", " zero ")] == [3, 7, 3, 0]
    with pytest.raises(UserError, match=r"'eight' is neither a class id \(0..999\) nor a class name; names: one, seven"):
        teacher.classes.class_id("eight")
    sampler = _sampler(teacher)
    ours = sampler.sample(teacher.unet, num_images=2, batch_size=2, seed=0)
    # DiTPipeline from the same starting latents: its noise is drawn by randn_tensor
    latents = sampler._noise(teacher.unet, 2, 0)
    monkeypatch.setattr(dit, "randn_tensor", lambda shape, generator=None, device=None, dtype=None: latents.to(dtype))
    pipe = DiTPipeline.from_pretrained(str(tiny_dit_dir))
    theirs = pipe([3, 7], guidance_scale=4.0, num_inference_steps=4, output_type="np").images
    assert ours.shape == (2, 3, 16, 16)
    np.testing.assert_allclose((ours.permute(0, 2, 3, 1).numpy() + 1) / 2, theirs, atol=1e-5)
    # guidance changes the images; a class has no negative prompt
    plain = _sampler(teacher, scale=1.0).sample(teacher.unet, num_images=2, batch_size=2, seed=0)
    assert (plain - ours).abs().max() > 1e-3
    with pytest.raises(UserError, match="a class-conditional model has none"):
        teacher.classes.prompts(["3"], negative_prompt="blurry")


def test_a_dit_folder_missing_its_vae_is_one_line(tiny_dit_dir, tmp_path):
    broken = shutil.copytree(tiny_dit_dir, tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    with pytest.raises(UserError) as error:
        load_teacher(str(broken))
    assert str(error.value) == f"{broken}: vae/ is missing or has no config.json (a DiTPipeline teacher needs one)"


def test_profile_counts_each_transformer_block(tiny_dit_dir, capsys):
    from automl_diff.cli import main

    assert main(["profile", "--model", str(tiny_dit_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [b["name"] for b in report["blocks"]]
    assert names == [*BLOCKS, "other"]
    blocks = report["blocks"][:4]
    # four equal blocks cost the same: the head's second call of block 0's embedding is the head's
    assert len({b["macs"] for b in blocks}) == 1 and len({b["params"] for b in blocks}) == 1
    assert 0 < blocks[0]["macs_no_attention"] < blocks[0]["macs"]  # attention matmuls counted
    assert sum(b["macs"] for b in report["blocks"]) == report["macs"]
    assert sum(b["params"] for b in report["blocks"]) == report["params"]


def _schedule(unet, rows) -> Schedule:
    return Schedule(len(rows), BLOCKS, tuple(tuple(bool(g) for g in row) for row in rows), model=model_fingerprint(unet))


def _residual_reference(teacher, sampler, rows):
    """Sampling with each skipped block returning its input plus its last update, by hand."""
    blocks, cache, step = teacher.unet.transformer_blocks, {}, [-1]
    originals = [block.forward for block in blocks]

    def gated(i, forward):
        def run(hidden, *args, **kwargs):
            if rows[step[0]][i]:
                out = forward(hidden, *args, **kwargs)
                cache[i] = out - hidden
                return out
            return hidden + cache[i]

        return run

    for i, block in enumerate(blocks):
        block.forward = gated(i, originals[i])
    handle = teacher.unet.register_forward_pre_hook(lambda module, args: step.__setitem__(0, step[0] + 1))
    try:
        return sampler.sample(teacher.unet, num_images=2, batch_size=2, seed=0)
    finally:
        handle.remove()
        for i, block in enumerate(blocks):
            block.forward = originals[i]


def test_a_schedule_gates_dit_blocks_reusing_their_residual_update(tiny_dit_dir):
    from diffusers import DiTPipeline

    teacher = load_teacher(str(tiny_dit_dir))
    sampler = _sampler(teacher)
    full = sampler.sample(teacher.unet, num_images=2, batch_size=2, seed=0)
    with apply_schedule(teacher.unet, _schedule(teacher.unet, [[1] * 4] * 4)):
        same = sampler.sample(teacher.unet, num_images=2, batch_size=2, seed=0)
    torch.testing.assert_close(same, full, atol=0, rtol=0)
    rows = [[1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 0, 0]]
    schedule = _schedule(teacher.unet, rows)
    with apply_schedule(teacher.unet, schedule) as controller:
        gated = sampler.sample(teacher.unet, num_images=2, batch_size=2, seed=0)
        # every block before a skipped one still runs: a skipped block reads its input
        assert controller.plan.executes.tolist() == [[bool(g) for g in row] for row in rows]
        assert sum(controller.executed.values()) == 9
    torch.testing.assert_close(gated, _residual_reference(teacher, sampler, rows), atol=0, rtol=0)
    assert (gated - full).abs().max() > 1e-4
    # on the pipeline as diffusers runs it
    pipe = DiTPipeline.from_pretrained(str(tiny_dit_dir))
    with apply_schedule(pipe, schedule) as controller:
        pipe([3], num_inference_steps=4, guidance_scale=4.0, output_type="np")
        assert sum(controller.executed.values()) == 9
    # a transformer's units are its blocks
    from automl_diff.models.dataflow import prunable_units

    assert prunable_units(teacher.unet, "block") == list(BLOCKS)
    with pytest.raises(UserError, match="a transformer's units are its blocks"):
        prunable_units(teacher.unet, "layer")
