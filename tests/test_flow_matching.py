"""Flow-matching text-to-image transformers: a ``StableDiffusion3Pipeline`` folder (an MMDiT of
joint text and image blocks, two CLIP text encoders and no T5, flow matching's Euler scheduler, a
VAE with a shift) loads as a teacher, samples as its pipeline does, distils on flow targets, has
its joint blocks gated step by step, and exports pipelines that diffusers alone loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from automl_diff.gating import Schedule, apply_schedule
from automl_diff.gating.units import model_fingerprint
from automl_diff.models.loading import load_teacher

BLOCKS = tuple(f"transformer_blocks.{i}" for i in range(4))
PROMPTS = ["a red square", "a blue circle"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tests.conftest import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip"), ("a", "red", "blue", "green", "square", "circle"))


def _sampler(teacher, *, scale: float = 3.0, steps: int = 4):
    return teacher.sampler(steps=steps, prompts=teacher.text.prompts(PROMPTS, guidance_scale=scale))


def test_an_sd3_folder_is_a_flow_matching_teacher_that_samples_as_its_pipeline(tiny_sd3_dir, capsys):
    from diffusers import StableDiffusion3Pipeline

    from automl_diff.cli import main
    from automl_diff.models.text import JointTextToImage

    teacher = load_teacher(str(tiny_sd3_dir))
    assert isinstance(teacher.text, JointTextToImage) and teacher.prediction_type == "flow"
    assert (teacher.latent_resolution, teacher.resolution, teacher.channels) == (8, 16, 3)
    sampler = _sampler(teacher)
    assert sampler.scheduler == "flow" and sampler.model_calls == 4
    ours = sampler.sample(teacher.unet, num_images=2, batch_size=2, seed=0)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir), text_encoder_3=None, tokenizer_3=None)
    latents = sampler._noise(teacher.unet, 2, 0)
    theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, height=16, width=16, latents=latents, output_type="np").images
    np.testing.assert_allclose((ours.permute(0, 2, 3, 1).numpy() + 1) / 2, theirs, atol=1e-5)
    plain = _sampler(teacher, scale=1.0).sample(teacher.unet, num_images=2, batch_size=2, seed=0)
    assert (plain - ours).abs().max() > 1e-3
    # MACs per joint block, attention included; the last block updates the image stream alone
    assert main(["profile", "--model", str(tiny_sd3_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    blocks = report["blocks"]
    assert [b["name"] for b in blocks] == [*BLOCKS, "other"]
    assert blocks[0]["macs"] == blocks[2]["macs"] > blocks[3]["macs"] > 0
    assert 0 < blocks[0]["macs_no_attention"] < blocks[0]["macs"]
    assert sum(b["macs"] for b in blocks) == report["macs"]


def test_flow_matching_batches_and_pool_steps_follow_its_euler_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from automl_diff.methods.training.inputs import DataBatches
    from automl_diff.methods.training.pool import NoisePool
    from automl_diff.sampling import noise_schedule

    config = {**FlowMatchEulerDiscreteScheduler(shift=3.0).config, "_class_name": "FlowMatchEulerDiscreteScheduler"}  # as saved
    schedule = noise_schedule(config)
    assert schedule.prediction_type == "flow"
    sigmas = schedule.timesteps / 1000
    assert torch.all(sigmas[1:] > sigmas[:-1]) and sigmas[-1] == 1.0
    # a dataset batch: x_t = (1 - sigma) x_0 + sigma noise, the target the flow noise - x_0
    x0 = torch.randn(1, 4, 8, 8)
    batches = DataBatches(
        x0,
        schedule.alphas_cumprod,
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        prediction_type="flow",
        model_timesteps=schedule.timesteps,
    )
    x, t, target = batches(6)[:3]
    sigma = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(x, x0 + sigma * target)
    # fresh entries are noise at the model's input scale at their first timestep, sqrt((1 - sigma)^2
    # + sigma^2) (a unit-variance x_0's); a deterministic pool step is flow matching's Euler step
    # x + (sigma_next - sigma) v, the last one to x - sigma v
    pool = NoisePool(
        size=6,
        sample_shape=(4, 8, 8),
        alphas_cumprod=schedule.alphas_cumprod,
        num_steps=4,
        eta=0.0,
        clip_sample=False,
        generator=torch.Generator().manual_seed(0),
        prediction_type="flow",
        model_timesteps=schedule.timesteps,
    )
    noise = torch.randn((6, 4, 8, 8), generator=torch.Generator().manual_seed(0))  # the pool's first draw
    x, t = pool.batch(torch.arange(6))
    assert (t < 1000).any()  # offsets start some entries below sigma = 1
    sigma = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(x, ((1 - sigma) ** 2 + sigma**2).sqrt() * noise)
    idx = torch.arange(6)
    for step in range(4):
        x, t = pool.batch(idx)
        after = pool._timestep_at(pool.position + 1, pool.offset)
        sigma_next = torch.where(after >= 0, schedule.timesteps[after.clamp(min=0)] / 1000, torch.zeros(6)).view(-1, 1, 1, 1)
        velocity = 0.3 * x + 0.1
        expected = x + (sigma_next - (t / 1000).view(-1, 1, 1, 1)) * velocity
        if step < 3:
            pool.advance(idx, velocity)
            torch.testing.assert_close(pool.x, expected, atol=1e-5, rtol=1e-5)
        else:  # the last step reaches the clean sample, where the pool starts the trajectories anew
            assert (after < 0).all() and (sigma_next == 0).all()
            from automl_diff.methods.training.pool import split_prediction

            clean, _ = split_prediction(velocity, x, schedule.alphas_cumprod[pool.timesteps(idx)].view(-1, 1, 1, 1), "flow")
            torch.testing.assert_close(clean, expected, atol=1e-5, rtol=1e-5)
            pool.advance(idx, velocity)
            assert pool.completed == 6 and (pool.position == 0).all()
    # with eta, DDIM's noise in the equivalent frame: still the model's input, finite
    pool.eta = 1.0
    pool.advance(idx, 0.3 * pool.x)
    assert torch.isfinite(pool.x).all()


def _schedule(unet, rows) -> Schedule:
    return Schedule(len(rows), BLOCKS, tuple(tuple(bool(g) for g in row) for row in rows), model=model_fingerprint(unet))


def _joint_reference(teacher, sampler, rows):
    """Sampling with each skipped joint block adding its last updates of both streams (text and
    image) to its inputs, by hand."""
    blocks, cache, step = teacher.unet.transformer_blocks, {}, [-1]
    originals = [block.forward for block in blocks]

    def gated(i, forward):
        def run(*, hidden_states, encoder_hidden_states, **kwargs):
            if rows[step[0]][i]:
                context, hidden = forward(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, **kwargs)
                cache[i] = (None if context is None else context - encoder_hidden_states, hidden - hidden_states)
                return context, hidden
            context, hidden = cache[i]
            return (None if context is None else encoder_hidden_states + context), hidden_states + hidden

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


def test_a_schedule_gates_sd3_joint_blocks_reusing_both_streams_updates(tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    teacher = load_teacher(str(tiny_sd3_dir))
    sampler = _sampler(teacher)
    full = sampler.sample(teacher.unet, num_images=2, batch_size=2, seed=0)
    with apply_schedule(teacher.unet, _schedule(teacher.unet, [[1] * 4] * 4)):
        same = sampler.sample(teacher.unet, num_images=2, batch_size=2, seed=0)
    torch.testing.assert_close(same, full, atol=0, rtol=0)
    rows = [[1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 0, 0]]
    schedule = _schedule(teacher.unet, rows)
    with apply_schedule(teacher.unet, schedule) as controller:
        gated = sampler.sample(teacher.unet, num_images=2, batch_size=2, seed=0)
        assert sum(controller.executed.values()) == 9
    torch.testing.assert_close(gated, _joint_reference(teacher, sampler, rows), atol=0, rtol=0)
    assert (gated - full).abs().max() > 1e-4
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir), text_encoder_3=None, tokenizer_3=None)
    with apply_schedule(pipe, schedule) as controller:
        pipe(PROMPTS[0], num_inference_steps=4, guidance_scale=3.0, output_type="np")
        assert sum(controller.executed.values()) == 9


def _sd3_study(tmp_path, teacher, clip, **overrides):
    """A study of an SD3 pipeline as a user writes it: prompt files, a folder of reference images,
    CLIP features for FID from a local CLIP; DiP-GO unless ``overrides`` say otherwise."""
    import yaml
    from PIL import Image

    references = tmp_path / "references"
    references.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(references / f"{i}.png")
    (tmp_path / "train.txt").write_text("a red square\na blue circle\n")
    (tmp_path / "eval.txt").write_text("a green square\nred circle\n")
    (tmp_path / "space.yaml").write_text("family: dit\ntransformer: {layers: [2, 3]}\n")
    config = {
        "name": "sd3",
        "method": "dipgo",
        "teacher": str(teacher),
        "objectives": [{"name": "trajectory_macs"}, {"name": "fid"}],
        "sampler": {"name": "random", "seed": 0},
        "n_trials": 2,
        "budgets": {
            "train_iterations": 4,
            "batch_size": 2,
            "lr": 0.05,
            "fid_samples": 4,
            "images_per_prompt": 2,
            "sampling_steps": 4,
            "latency_repeats": 1,
            "latency_batch_size": 2,
        },
        "sampling": {"guidance_scale": 3.0},
        "prompts": {"train": "train.txt", "eval": "eval.txt", "clip_model": str(clip)},
        "fid": {"dataset": f"folder:{references}", "features": "clip"},
        "storage": f"sqlite:///{tmp_path / 'study.db'}",
        "output_dir": str(tmp_path / "runs"),
        "device": "cpu",
        "method_options": {"granularity": "block", "reference_images": 2, "warmup": 0.0, "budget_low": 0.3, "budget_high": 0.5},
    }
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config and key != "method_options" else value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _export_and_sample(tmp_path, capsys, trial):
    from automl_diff.cli import main
    from tests.conftest import printed_load_calls, sample_without_automl_diff

    capsys.readouterr()
    out = tmp_path / "export"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["export", "--storage", storage, "--study-name", "sd3", "--trial", str(trial), "--out", str(out)]) == 0
    (call,) = printed_load_calls(capsys.readouterr().out)
    assert call.startswith("diffusers.StableDiffusion3Pipeline.from_pretrained(") and "text_encoder_3=None, tokenizer_3=None" in call
    assert "text_encoder_3=None, tokenizer_3=None" in (out / "README.md").read_text()
    seen = sample_without_automl_diff(call, cwd=tmp_path, steps=4, prompt="a red square")
    assert seen["unet"] == "SD3Transformer2DModel" and seen["shape"] == [2, 16, 16, 3] and seen["imported"] == []
    return out


def test_a_dipgo_study_of_an_sd3_pipeline_exports_a_gated_sd3_pipeline(tiny_sd3_dir, tiny_clip, tmp_path, capsys):
    import optuna
    from diffusers import StableDiffusion3Pipeline

    from automl_diff.cli import main
    from automl_diff.records import StudyAttr, TrialAttr

    config = _sd3_study(tmp_path, tiny_sd3_dir, tiny_clip)
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="sd3", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert study.user_attrs[StudyAttr.PIPELINE]["class"] == "StableDiffusion3Pipeline"
    assert study.user_attrs[StudyAttr.EVALUATION]["scheduler"] == "auto"
    teacher = study.user_attrs[StudyAttr.TEACHER_METRICS]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all(t.user_attrs[TrialAttr.TRAJECTORY_MACS] < teacher[TrialAttr.TRAJECTORY_MACS] for t in complete)
    assert all(tuple(t.user_attrs[TrialAttr.SCHEDULE]["units"]) == BLOCKS for t in complete)
    out = _export_and_sample(tmp_path, capsys, complete[0].number)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out), text_encoder_3=None, tokenizer_3=None)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    with apply_schedule(pipe, Schedule.load(out / "schedule.json")) as controller:
        pipe("a red square", num_inference_steps=4, output_type="np")
        assert sum(controller.executed.values()) == controller.plan.executes.sum() < 4 * 4


def test_a_dkdm_study_of_an_sd3_pipeline_distils_shallower_sd3_transformers(tiny_sd3_dir, tiny_clip, tmp_path, capsys):
    import optuna

    from automl_diff.cli import main
    from automl_diff.records import StudyAttr, TrialAttr

    (tmp_path / "two.yaml").write_text("family: dit\ntransformer: {layers: [2]}\n")
    config = _sd3_study(
        tmp_path, tiny_sd3_dir, tiny_clip, method="dkdm", search_space="two.yaml", n_trials=1, method_options={"pool_size": 8}
    )
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="sd3", storage=f"sqlite:///{tmp_path / 'study.db'}")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and np.isfinite(trial.user_attrs[TrialAttr.FID])
    assert trial.user_attrs[TrialAttr.MACS] < study.user_attrs[StudyAttr.TEACHER_METRICS][TrialAttr.MACS]
    out = _export_and_sample(tmp_path, capsys, trial.number)
    exported = json.loads((out / "transformer" / "config.json").read_text())
    assert exported["_class_name"] == "SD3Transformer2DModel" and exported["num_layers"] == 2


class _DataParallelLike(torch.nn.Module):
    """Holds its model as ``module`` and passes every call on, as DistributedDataParallel does."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_sd3_teachers_with_dual_attention_blocks_are_refused_by_both_student_spaces():
    from diffusers import SD3Transformer2DModel

    from automl_diff.config.search_space import SupernetBlock, SupernetSpace, TransformerSpace
    from automl_diff.errors import UserError

    model = SD3Transformer2DModel(
        sample_size=8, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=8, dual_attention_layers=(0,),
    )  # fmt: skip
    with pytest.raises(UserError, match=r"space.yaml: blocks: the teacher's blocks differ \(dual_attention_layers"):
        SupernetSpace("space.yaml", (SupernetBlock("all", layers=(0, 1)),)).validate_for(model)
    with pytest.raises(UserError, match=r"dit.yaml: transformer.layers: the teacher's blocks differ \(dual_attention_layers"):
        TransformerSpace("dit.yaml", layers=(2,)).validate_for({"_class_name": "SD3Transformer2DModel", **model.config})


def test_an_sd3_supernet_cuts_out_the_shallower_sd3_it_computes(tiny_sd3_dir):
    """Joint blocks kept or skipped (the last always kept), cut out and assembled into a stock
    SD3Transformer2DModel with the kept blocks numbered anew, compute what the supernets compute."""
    from automl_diff.config.search_space import SupernetBlock, SupernetSpace
    from automl_diff.methods.diffnas.supernet import assemble_student, block_pairs, build_supernets, plug_supernets
    from automl_diff.sampling import predict_noise

    model = load_teacher(str(tiny_sd3_dir)).unet
    space = SupernetSpace("space.yaml", (SupernetBlock("all", layers=(0, 1)),))
    space.validate_for(model)
    supernets = build_supernets(model, space)
    assert [len(s.candidates()) for s in supernets.values()] == [2, 2, 2, 1]
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 13, 32)
    with torch.no_grad():
        full = predict_noise(plug_supernets(model, supernets), x, t, encoder_hidden_states=context)
        torch.testing.assert_close(full, predict_noise(model, x, t, encoder_hidden_states=context))
        wrapped = _DataParallelLike(model)  # a data-parallel wrapper is called, its model's conditioning unpacked
        torch.testing.assert_close(predict_noise(wrapped, x, t, encoder_hidden_states=context), full)
        for skipped in ({1}, {0, 2}, {0, 1, 2}):
            choices = {n: (s.smallest() if i in skipped else s.largest()) for i, (n, s) in enumerate(supernets.items())}
            for name, supernet in supernets.items():
                supernet.set(choices[name])
            expected = predict_noise(plug_supernets(model, supernets), x, t, encoder_hidden_states=context)
            student, config = assemble_student(model, supernets, choices)
            assert type(student).__name__ == config["_class_name"] == "SD3Transformer2DModel"
            assert config["num_layers"] == 4 - len(skipped) and student.transformer_blocks[-1].context_pre_only
            torch.testing.assert_close(predict_noise(student, x, t, encoder_hidden_states=context), expected, atol=1e-6, rtol=1e-5)
            assert list(block_pairs(supernets, choices).values()) == [f"transformer_blocks.{i}" for i in range(4 - len(skipped))]


def test_a_diffnas_study_of_an_sd3_pipeline_exports_shallower_sd3_pipelines(tiny_sd3_dir, tiny_clip, tmp_path, capsys):
    import optuna

    from automl_diff.cli import main
    from automl_diff.methods.diffnas.method import DiffNASAttr

    (tmp_path / "nas.yaml").write_text("family: supernet\nblocks:\n  all: {layers: [0, 1]}\n")
    options = {"pool_size": 8, "pool_steps": 4, "supernet_iterations": 3, "search_samples": 4, "retrain_iterations": [3]}
    config = _sd3_study(
        tmp_path,
        tiny_sd3_dir,
        tiny_clip,
        method="diffnas",
        search_space="nas.yaml",
        objectives=[{"name": "macs"}, {"name": "fid"}],
        method_options={**options, "tolerance_low": 1.0, "tolerance_high": 100.0},
    )
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="sd3", storage=f"sqlite:///{tmp_path / 'study.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    smallest = min(complete, key=lambda t: t.values[0])
    assert smallest.values[0] < study.user_attrs["teacher_metrics"]["macs"]
    assert sorted(smallest.user_attrs[DiffNASAttr.BLOCK_CHOICES]) == list(BLOCKS)
    out = _export_and_sample(tmp_path, capsys, smallest.number)
    exported = json.loads((out / "transformer" / "config.json").read_text())
    assert exported["_class_name"] == "SD3Transformer2DModel" and exported["num_layers"] < 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sampling": {"scheduler": "ddim"}}, "sampling.scheduler: ddim does not run a model trained with FlowMatchEulerDiscreteScheduler"),
        (
            {"method": "diffnas", "search_space": "joint.yaml", "method_options": {}},
            "blocks.transformer_blocks.1.heads: an SD3 joint block is kept or skipped (layers: [0, 1]); it chooses nothing else",
        ),
        (
            {"method": "diffnas", "search_space": "last.yaml", "method_options": {}},
            "blocks.transformer_blocks.3.layers: 0; the last SD3 block (it updates the image stream alone) is always kept",
        ),
        (
            {"method": "dkdm", "search_space": "heads.yaml", "method_options": {"pool_size": 8}},
            "transformer.heads: an SD3 student keeps the teacher's heads",
        ),
        (
            {"method": "dkdm", "search_space": "unet.yaml", "method_options": {"pool_size": 8}},
            "family: unet2d: an SD3 teacher's students are shallower SD3 transformers; use family: dit",
        ),
        (
            {"teacher": "TRANSFORMER"},
            "is not a text-to-image or class-conditional pipeline",
        ),
        (
            {"method": "dkdm", "search_space": "one.yaml", "method_options": {"pool_size": 8}},
            "transformer.layers: an SD3 student keeps at least 2 blocks",
        ),
    ],
)
def test_sd3_study_errors_are_one_line(tiny_sd3_dir, tiny_clip, tmp_path, capsys, overrides, message):
    from automl_diff.cli import main

    (tmp_path / "heads.yaml").write_text("family: dit\ntransformer: {layers: [2], heads: [1]}\n")
    (tmp_path / "unet.yaml").write_text("family: unet2d\nblocks:\n  down.0: {channels: [4, 8]}\n")
    (tmp_path / "one.yaml").write_text("family: dit\ntransformer: {layers: [1, 2]}\n")
    (tmp_path / "joint.yaml").write_text("family: supernet\nblocks:\n  transformer_blocks.1: {heads: [1]}\n")
    (tmp_path / "last.yaml").write_text("family: supernet\nblocks:\n  transformer_blocks.3: {layers: [0, 1]}\n")
    teacher = tiny_sd3_dir / "transformer" if overrides.pop("teacher", None) == "TRANSFORMER" else tiny_sd3_dir  # the folder alone
    config = _sd3_study(tmp_path, teacher, tiny_clip, **overrides)
    assert main(["run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(tmp_path) in err and message in err and "\n" not in err
