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


def _dit_study(tmp_path, teacher, clip, **overrides):
    """A DiP-GO study of a DiT pipeline, written as a user would: classes by id and by name in
    text files, a folder of reference images, CLIP features for FID from a local CLIP."""
    import yaml
    from PIL import Image

    references = tmp_path / "references"
    references.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(references / f"{i}.png")
    (tmp_path / "train.txt").write_text("3\nseven\n1\n")
    (tmp_path / "eval.txt").write_text("zero\nthird\n")
    config = {
        "name": "dit",
        "method": "dipgo",
        "teacher": str(teacher),
        "objectives": [{"name": "trajectory_macs"}, {"name": "fid"}],
        "sampler": {"name": "random", "seed": 0},
        "n_trials": 3,
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
        "sampling": {"guidance_scale": 4.0},
        "prompts": {"train": "train.txt", "eval": "eval.txt", "clip_model": str(clip)},
        "fid": {"dataset": f"folder:{references}", "features": "clip"},
        "storage": f"sqlite:///{tmp_path / 'study.db'}",
        "output_dir": str(tmp_path / "runs"),
        "device": "cpu",
        "method_options": {"granularity": "block", "reference_images": 2, "warmup": 0.0, "target_macs_ratio": 0.5, "sparsity_weight": 5.0},
    }
    if overrides.get("method", "dipgo") != "dipgo":  # another method's options replace DiP-GO's
        config.pop("method_options")
    for key, value in overrides.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tests.conftest import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_a_dipgo_study_of_a_dit_pipeline_exports_a_dit_pipeline(tiny_dit_dir, tiny_clip, tmp_path, capsys):
    import optuna

    from automl_diff.cli import main
    from automl_diff.records import StudyAttr, TrialAttr
    from tests.conftest import printed_load_calls, sample_without_automl_diff

    config = _dit_study(tmp_path, tiny_dit_dir, tiny_clip)
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.load_study(study_name="dit", storage=storage)
    teacher = study.user_attrs[StudyAttr.TEACHER_METRICS]
    assert study.user_attrs[StudyAttr.EVALUATION]["eval_prompts"] == ["zero", "third"]
    assert study.user_attrs[StudyAttr.PIPELINE]["class"] == "DiTPipeline"
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all(t.user_attrs[TrialAttr.TRAJECTORY_MACS] < teacher[TrialAttr.TRAJECTORY_MACS] for t in complete)
    assert all(tuple(t.user_attrs[TrialAttr.SCHEDULE]["units"]) == BLOCKS for t in complete)
    assert all(np.isfinite(t.user_attrs[TrialAttr.FID]) for t in complete)
    capsys.readouterr()
    out = tmp_path / "export"
    assert main(["export", "--storage", storage, "--study-name", "dit", "--trial", str(complete[0].number), "--out", str(out)]) == 0
    (call,) = printed_load_calls(capsys.readouterr().out)
    assert call.startswith("diffusers.DiTPipeline.from_pretrained(")
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "DiTTransformer2DModel"] and index["id2label"]["7"] == "seven"
    card = (out / "README.md").read_text()
    assert 'pipe(class_labels=pipe.get_label_ids(["zero"]), num_inference_steps=4, guidance_scale=4)' in card
    seen = sample_without_automl_diff(call, cwd=tmp_path, steps=4, prompt=3)
    assert seen["unet"] == "DiTTransformer2DModel" and seen["shape"] == [2, 16, 16, 3] and seen["imported"] == []
    # the exported schedule gates the exported pipeline
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(str(out))
    with apply_schedule(pipe, Schedule.load(out / "schedule.json")) as controller:
        pipe([3], num_inference_steps=4, output_type="np")
        assert sum(controller.executed.values()) == controller.plan.executes.sum() < 4 * 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method_options": {"granularity": "layer"}}, "method_options.granularity: a transformer's units are its blocks"),
        (
            {"method": "diffnas", "method_options": {"warm_start": ["bk-sdm-base"]}, "search_space": "supernet_space.yaml"},
            "method_options.warm_start: BK-SDM's recipes remove UNet blocks; a DiT has none",
        ),
        (
            {"method": "dkdm", "method_options": {"warm_start": ["bk-sdm-base"]}, "search_space": "dit_space.yaml"},
            "method_options.warm_start: BK-SDM's recipes remove UNet blocks; a DiT has none",
        ),
        (
            {"method": "dkdm", "method_options": {"source": "dataset"}, "search_space": "dit_space.yaml"},
            "method_options.source: dataset has no class labels for a class-conditional teacher; use teacher",
        ),
        ({"sampling": {"negative_prompt": "blurry"}}, "sampling.negative_prompt: a class-conditional teacher has none"),
        ({"prompts": {"eval": "bad.txt"}}, "prompts.eval: 'eight' is neither a class id (0..999) nor a class name; names: one, seven"),
    ],
)
def test_dit_study_errors_are_one_line(tiny_dit_dir, tiny_clip, tmp_path, capsys, overrides, message):
    from automl_diff.cli import main

    (tmp_path / "bad.txt").write_text("seven\neight\n")
    (tmp_path / "space.yaml").write_text("family: unet2d\nblocks:\n  down.0: {channels: [4, 8]}\n")
    (tmp_path / "dit_space.yaml").write_text("family: dit\ntransformer: {layers: [2]}\n")
    (tmp_path / "supernet_space.yaml").write_text("family: supernet\nblocks:\n  all: {layers: [0, 1]}\n")
    if overrides.get("method") == "dkdm":
        overrides["method_options"] = {"pool_size": 8, "pool_steps": 4, **overrides["method_options"]}
    config = _dit_study(tmp_path, tiny_dit_dir, tiny_clip, **overrides)
    assert main(["run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {config}: ") and message in err and "\n" not in err


def test_the_shipped_digits_dit_teacher_draws_the_digits_it_is_asked_for(capsys):
    from diffusers import DiTPipeline

    from automl_diff.cli import main
    from automl_diff.metrics.alignment import prompt_accuracy
    from automl_diff.zoo import JUDGES
    from automl_diff.zoo.digits_dit import DIGITS_DIT_DIR, GUIDANCE_SCALE

    files = [f for f in DIGITS_DIT_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 15 * 2**20
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".ckpt")]  # safetensors only
    teacher = load_teacher("digits-dit")
    assert teacher.dataset == "digits" and (teacher.resolution, teacher.channels, teacher.latent_resolution) == (16, 1, 8)
    assert type(teacher.unet).__name__ == "DiTTransformer2DModel" and teacher.classes.null_class == 1000
    assert [teacher.classes.class_id(name) for name in ("seven", "7")] == [7, 7]
    # sampled with diffusers alone (its own null class, id 1000), the digits are the classes asked for
    pipe = DiTPipeline.from_pretrained(str(DIGITS_DIT_DIR))
    labels = [d for d in range(10) for _ in range(4)]
    out = pipe(labels, num_inference_steps=20, guidance_scale=GUIDANCE_SCALE, output_type="np", generator=torch.Generator().manual_seed(3))
    assert out.images.shape == (40, 16, 16, 1)
    images = torch.from_numpy(out.images).permute(0, 3, 1, 2) * 2 - 1
    accuracy = prompt_accuracy(images, labels, JUDGES["digits"])
    assert accuracy.low >= 0.8, accuracy
    assert main(["profile", "--model", "digits-dit", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == sum(p.numel() for p in teacher.unet.parameters())


def test_first_block_cache_peer_skips_blocks_per_trajectory_and_leaves_the_model_as_it_was(tiny_dit_dir):
    from dataclasses import replace

    from automl_diff.bench.peers import first_block_cache
    from automl_diff.metrics.macs import executed_macs

    teacher = load_teacher(str(tiny_dit_dir))
    sampler = _sampler(teacher, steps=8)

    def sample():
        return sampler.sample(teacher.unet, num_images=2, batch_size=2, seed=0)

    def macs():  # the transformer's, not the VAE's decoding
        latents = sampler.with_prompts(replace(sampler.prompts, decode=None))
        return executed_macs(lambda: latents.sample(teacher.unet, num_images=1, batch_size=1))

    full, full_macs = sample(), macs()
    with first_block_cache(teacher.unet, 0.0)():  # nothing changes by less than 0: every block runs
        torch.testing.assert_close(sample(), full, atol=0, rtol=0)
    with first_block_cache(teacher.unet, 1e6)():  # after the first step, only the first block runs
        cached, again, cached_macs = sample(), sample(), macs()
    torch.testing.assert_close(again, cached, atol=0, rtol=0)  # each trajectory starts from a fresh state
    assert (cached - full).abs().max() > 1e-4
    assert cached_macs < 0.5 * full_macs
    torch.testing.assert_close(sample(), full, atol=0, rtol=0)  # its hooks are gone


def test_taylorseer_peer_forecasts_attention_and_feed_forward_between_computed_steps(tiny_dit_dir):
    from dataclasses import replace

    from automl_diff.bench.peers import first_block_cache, taylorseer_cache
    from automl_diff.metrics.macs import executed_macs

    teacher = load_teacher(str(tiny_dit_dir))
    sampler = _sampler(teacher, steps=9)
    calls = {}

    def count(module, args, output):
        calls[module] = calls.get(module, 0) + 1

    def sample():
        return sampler.sample(teacher.unet, num_images=2, batch_size=2, seed=0)

    def macs():
        latents = sampler.with_prompts(replace(sampler.prompts, decode=None))
        return executed_macs(lambda: latents.sample(teacher.unet, num_images=1, batch_size=1))

    full, full_macs = sample(), macs()
    with first_block_cache(teacher.unet, 0.0)():  # another cache's hooks came and went first, as in the bench
        sample()
    attention = teacher.unet.transformer_blocks[2].attn1.to_q
    handle = attention.register_forward_hook(count)
    try:
        with taylorseer_cache(teacher.unet, 3)():  # steps 0-2 compute, then 4 and 7: 5 of 9
            cached, again, cached_macs = sample(), sample(), macs()
    finally:
        handle.remove()
    assert calls[attention] == 3 * 5  # three trajectories, each computing 5 of its 9 steps
    torch.testing.assert_close(again, cached, atol=0, rtol=0)  # each trajectory starts from a fresh state
    assert (cached - full).abs().max() > 1e-4
    assert cached_macs < 0.7 * full_macs
    torch.testing.assert_close(sample(), full, atol=0, rtol=0)  # its hooks are gone


def test_the_dit_bench_compares_dipgo_with_first_block_cache(tiny_dit_dir, tmp_path):
    """The digits-dit preset's rows on the tiny DiT (RGB: no digit judge): FID per set, a DKDM
    student cut from the teacher, DiP-GO's schedules against diffusers' First Block Cache at
    matched MACs."""
    from dataclasses import replace

    from PIL import Image

    from automl_diff.bench import PRESETS
    from automl_diff.bench.presets import bench_evaluation
    from automl_diff.bench.run import run_bench

    (tmp_path / "train.txt").write_text("3\nseven\n1\n")
    (tmp_path / "eval.txt").write_text("zero\n2\n")
    (tmp_path / "space.yaml").write_text("family: dit\ntransformer: {layers: [2, 3], heads: [1, 2]}\n")
    (tmp_path / "supernet.yaml").write_text("family: supernet\nblocks:\n  all: {layers: [0, 1], heads: [1, 2], width: [0.5, 1.0]}\n")
    references = tmp_path / "references"
    references.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(references / f"{i}.png")
    preset = replace(
        PRESETS["digits-dit"],
        name="tiny-dit",
        teacher=str(tiny_dit_dir),
        evaluation=bench_evaluation(
            steps=6,
            guidance_scale=1.5,
            fid_samples=8,
            fid_batch_size=8,
            fid_dataset=f"folder:{references}",
            fid_features="digits",
            latency_batch_size=2,
            latency_repeats=2,
            images_per_prompt=2,
        ),
        fid_sets=2,
        latency_batches=(2,),
        prompts_train=str(tmp_path / "train.txt"),
        prompts_eval=str(tmp_path / "eval.txt"),
        dipgo={"granularity": "block", "target_macs_ratio": 0.5, "reference_images": 2, "warmup": 0.0, "sparsity_weight": 5.0},
        dipgo_iterations=3,
        dipgo_batch=2,
        dipgo_lr=0.05,
        dipgo_budgets=(0.5, 0.35),
        fbcache_thresholds=(0.0, 0.05, 0.2, 1e6),
        taylorseer_intervals=(2, 4),
        rows=("teacher", "dkdm", "diffnas", "dipgo", "fbcache", "taylorseer"),
        pool_size=8,
        pool_steps=4,
        batch_size=4,
        dkdm_space=str(tmp_path / "space.yaml"),
        dkdm_params={"transformer.layers": 2, "transformer.heads": 1},
        dkdm_iterations=3,
        diffnas_space=str(tmp_path / "supernet.yaml"),
        supernet_iterations=2,
        search_samples=4,
        retrain_iterations=2,
        max_ratio=0.6,
        device="cpu",
    )
    result = run_bench(preset, log=lambda line: None)
    rows = {row.name: row for row in result.rows}
    assert list(rows) == [
        "teacher",
        "DKDM student",
        "DiffNAS student",
        "DiP-GO, budget 0.5",
        "DiP-GO, budget 0.35",
        "FirstBlockCache peer",
        "TaylorSeer peer",
    ]
    student = rows["DKDM student"]
    assert student.params < rows["teacher"].params / 2 and "from a cut of the teacher" in student.notes
    nas = rows["DiffNAS student"]
    assert nas.trajectory_macs <= 0.6 * rows["teacher"].trajectory_macs and "transformer_blocks.3" in nas.notes
    peer = rows["FirstBlockCache peer"]
    assert peer.kind == "peer" and "threshold" in peer.notes and peer.trajectory_macs < rows["teacher"].trajectory_macs
    assert all(len(row.fid_sets) == 2 for row in result.rows)
    # the cheapest schedule (none reaches 3x) is compared with both caches matched to it, not only the last
    assert {c.other for c in rows["DiP-GO, budget 0.35"].versus_peers} == {"FirstBlockCache peer", "TaylorSeer peer"}
    levels = result.details["fbcache_levels"]
    assert levels[0.0] == rows["teacher"].trajectory_macs and levels[1e6] < levels[0.0]
    taylorseer = result.details["taylorseer_levels"]
    assert taylorseer[4] <= taylorseer[2] < rows["teacher"].trajectory_macs and "one in" in rows["TaylorSeer peer"].notes


def _without_blocks(teacher, kept):
    """A copy of ``teacher`` that runs only the blocks ``kept``, in order (the reference of a
    shallower student's starting point)."""
    import copy

    import torch

    reference = copy.deepcopy(teacher)
    reference.transformer_blocks = torch.nn.ModuleList([reference.transformer_blocks[k] for k in kept])
    return reference


def test_a_dit_student_starts_from_the_teachers_most_influential_blocks(tiny_dit_dir):
    import torch
    from diffusers import DiTTransformer2DModel

    from automl_diff.models.inherit_transformer import block_influence, inherit_transformer
    from automl_diff.sampling import predict_noise

    teacher = DiTTransformer2DModel.from_pretrained(str(tiny_dit_dir / "transformer")).eval()
    with torch.no_grad():  # a trained DiT's blocks write: give the random ones a residual update
        for block in teacher.transformer_blocks:
            block.norm1.linear.bias.normal_(0, 1)
    x, t, labels = torch.randn(3, 4, 8, 8), torch.tensor([999, 500, 20]), torch.tensor([3, 7, 1000])
    influence = block_influence(teacher, x, t, {"class_labels": labels})
    assert influence.shape == (4,) and (influence > 0).all()
    config = dict(teacher.config)
    student = DiTTransformer2DModel.from_config({**config, "num_layers": 2})
    copied, total, kept = inherit_transformer(student, teacher, influence)
    assert copied == total and kept == sorted(influence.topk(2).indices.tolist())
    with torch.no_grad():
        expected = predict_noise(_without_blocks(teacher, kept), x, t, class_labels=labels)
        assert torch.allclose(predict_noise(student.eval(), x, t, class_labels=labels), expected, atol=1e-5)
    # one head of two: half the width, every tensor cut from the teacher's, and a working model
    narrow = DiTTransformer2DModel.from_config({**config, "num_layers": 3, "num_attention_heads": 1})
    copied, total, kept = inherit_transformer(narrow, teacher, influence)
    assert copied == total and len(kept) == 3
    assert narrow.proj_out_1.weight.shape == (16, 8)
    with torch.no_grad():
        assert torch.isfinite(predict_noise(narrow, x, t, class_labels=labels)).all()


def test_a_dkdm_study_of_a_dit_pipeline_distils_shallower_narrower_dits(tiny_dit_dir, tiny_clip, tmp_path, capsys):
    import optuna

    from automl_diff.cli import main
    from automl_diff.methods.dkdm.method import DKDMAttr
    from automl_diff.records import TrialAttr
    from tests.conftest import printed_load_calls, sample_without_automl_diff

    (tmp_path / "space.yaml").write_text("family: dit\ntransformer: {layers: [2, 3], heads: [1, 2]}\n")
    config = _dit_study(
        tmp_path,
        tiny_dit_dir,
        tiny_clip,
        method="dkdm",
        search_space="space.yaml",
        objectives=[{"name": "macs"}, {"name": "fid"}],
        method_options={"pool_size": 8, "pool_steps": 4, "guided_pool": True, "prompt_dropout": 0.25},
    )
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.load_study(study_name="dit", storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    for trial in complete:
        attrs = trial.user_attrs
        assert attrs[DKDMAttr.INHERITED_FRACTION] == 1.0 and len(attrs[DKDMAttr.INHERITED_BLOCKS]) == trial.params["transformer.layers"]
        assert attrs[DKDMAttr.TEACHER_EVALUATIONS] > 0 and np.isfinite(attrs[TrialAttr.FID])
    smallest = min(complete, key=lambda t: t.values[0])
    capsys.readouterr()
    out = tmp_path / "export"
    assert main(["export", "--storage", storage, "--study-name", "dit", "--trial", str(smallest.number), "--out", str(out)]) == 0
    (call,) = printed_load_calls(capsys.readouterr().out)
    assert call.startswith("diffusers.DiTPipeline.from_pretrained(")
    saved = json.loads((out / "transformer" / "config.json").read_text())
    assert saved["_class_name"] == "DiTTransformer2DModel"
    chosen = smallest.params
    assert (saved["num_layers"], saved["num_attention_heads"]) == (chosen["transformer.layers"], chosen["transformer.heads"])
    seen = sample_without_automl_diff(call, cwd=tmp_path, steps=4, prompt=3)
    assert seen["unet"] == "DiTTransformer2DModel" and seen["shape"] == [2, 16, 16, 3] and seen["imported"] == []


def test_a_unet_student_of_a_dit_teacher_is_distilled_and_exported_as_a_dit_pipeline(tiny_dit_dir, tiny_clip, tmp_path, capsys):
    """DKDM into another architecture: class-conditional UNet2DModel students of a DiT teacher,
    their layout from the space's ``student:``, distilled data-free, exported as a DiTPipeline
    whose denoiser is the UNet, which diffusers alone samples."""
    import optuna

    from automl_diff.cli import main
    from automl_diff.methods.dkdm.method import DKDMAttr
    from automl_diff.records import TrialAttr
    from tests.conftest import printed_load_calls, sample_without_automl_diff

    (tmp_path / "space.yaml").write_text(
        "family: unet2d\n"
        "student: {block_out_channels: [16, 32], down_block_types: [DownBlock2D, AttnDownBlock2D],\n"
        "          up_block_types: [AttnUpBlock2D, UpBlock2D], layers_per_block: 1, norm_num_groups: 8, attention_head_dim: 8}\n"
        "blocks:\n  down.0: {channels: [8, 16]}\n"
    )
    config = _dit_study(
        tmp_path,
        tiny_dit_dir,
        tiny_clip,
        method="dkdm",
        search_space="space.yaml",
        n_trials=1,
        objectives=[{"name": "macs"}, {"name": "fid"}],
        method_options={"pool_size": 8, "pool_steps": 4, "guided_pool": True},
    )
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.load_study(study_name="dit", storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 1 and complete[0].user_attrs[DKDMAttr.INIT] == "random"
    assert all(np.isfinite(t.user_attrs[TrialAttr.FID]) and t.user_attrs[TrialAttr.MACS] > 0 for t in complete)
    capsys.readouterr()
    out = tmp_path / "export"
    assert main(["export", "--storage", storage, "--study-name", "dit", "--trial", str(complete[0].number), "--out", str(out)]) == 0
    (call,) = printed_load_calls(capsys.readouterr().out)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["transformer"] == ["diffusers", "UNet2DModel"]
    assert json.loads((out / "transformer" / "config.json").read_text())["num_class_embeds"] == 1001
    seen = sample_without_automl_diff(call, cwd=tmp_path, steps=4, prompt=3)
    assert seen["unet"] == "UNet2DModel" and seen["shape"] == [2, 16, 16, 3] and seen["imported"] == []


def test_a_dit_supernet_cuts_out_the_student_it_computes(tiny_dit_dir):
    """Every DiT block candidate (skipped, fewer heads, no attention, a narrower MLP), cut out and
    assembled into a StudentDiTTransformer2DModel, computes what the supernets compute; at the
    largest candidates the supernets compute the teacher (heads and units reordered by importance)."""
    import random

    from automl_diff.config.search_space import SupernetBlock, SupernetSpace
    from automl_diff.methods.diffnas.supernet import assemble_student, build_supernets, plug_supernets
    from automl_diff.models import load_teacher

    teacher = load_teacher(str(tiny_dit_dir))
    model = teacher.unet
    space = SupernetSpace("space.yaml", (SupernetBlock("all", layers=(0, 1), width=(0.5, 1.0), attention=(False, True), heads=(1, 2)),))
    space.validate_for(model)
    supernets = build_supernets(model, space)
    assert len(supernets["transformer_blocks.0"].candidates()) == 7
    x, t, labels = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.tensor([3, 7])
    with torch.no_grad():
        full = plug_supernets(model, supernets)(x, t, class_labels=labels).sample
        assert torch.allclose(full, model(x, t, class_labels=labels).sample, atol=1e-5)
        rng = random.Random(0)
        for _ in range(4):
            choices = {n: rng.choice(s.candidates()) for n, s in supernets.items()}
            choices["transformer_blocks.0"] = supernets["transformer_blocks.0"].smallest()  # skipped: the output layer reads its norm1
            for name, supernet in supernets.items():
                supernet.set(choices[name])
            expected = plug_supernets(model, supernets)(x, t, class_labels=labels).sample
            student, config = assemble_student(model, supernets, choices)
            assert type(student).__name__ == config["_class_name"] == "StudentDiTTransformer2DModel"
            assert 0 in config["skip_blocks"] and len(config["block_heads"]) == len(config["block_ff_dims"]) == 4
            assert torch.allclose(student(x, t, class_labels=labels).sample, expected, atol=1e-6)
            reloaded = type(student).from_config(config)
            reloaded.load_state_dict(student.state_dict(), strict=True)


def test_a_diffnas_study_of_a_dit_pipeline_exports_students_diffusers_loads(tiny_dit_dir, tiny_clip, tmp_path, capsys):
    """DiffNAS on a DiT, run as a user would: supernets per transformer block (skipped, heads, MLP
    width, attention), the block-wise search, retraining, and an export that diffusers' DiTPipeline
    loads with the student's code and samples where automl_diff cannot be imported."""
    import optuna

    from automl_diff.cli import main
    from automl_diff.methods.diffnas.method import DiffNASAttr
    from automl_diff.records import TrialAttr
    from tests.conftest import printed_load_calls, sample_without_automl_diff

    (tmp_path / "space.yaml").write_text(
        "family: supernet\nblocks:\n  all: {layers: [0, 1], heads: [1, 2], width: [0.5, 1.0]}\n"
        "  transformer_blocks.0: {width: [0.25, 1.0], attention: [false, true]}\n"
    )
    config = _dit_study(
        tmp_path,
        tiny_dit_dir,
        tiny_clip,
        method="diffnas",
        search_space="space.yaml",
        objectives=[{"name": "macs"}, {"name": "fid"}],
        sampler={"name": "tpe", "seed": 0},
        method_options={
            "pool_size": 8,
            "pool_steps": 4,
            "supernet_iterations": 3,
            "search_samples": 4,
            "retrain_iterations": [3],
            "tolerance_low": 0.01,
            "tolerance_high": 5.0,
        },
    )
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.load_study(study_name="dit", storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and len(study.trials) == 3  # tolerances that select a student already trained are pruned as duplicates
    for trial in complete:
        choices = trial.user_attrs[DiffNASAttr.BLOCK_CHOICES]
        assert sorted(choices) == [f"transformer_blocks.{i}" for i in range(4)]
        assert np.isfinite(trial.user_attrs[TrialAttr.FID])
    smallest = min(complete, key=lambda t: t.values[0])
    assert smallest.values[0] < study.user_attrs["teacher_metrics"]["macs"]
    capsys.readouterr()
    out = tmp_path / "export"
    assert main(["export", "--storage", storage, "--study-name", "dit", "--trial", str(smallest.number), "--out", str(out)]) == 0
    (call,) = printed_load_calls(capsys.readouterr().out)
    saved = json.loads((out / "transformer" / "config.json").read_text())
    if saved["_class_name"] == "StudentDiTTransformer2DModel":  # a student stock diffusers cannot express ships its code
        assert call.endswith("trust_remote_code=True)") and (out / "transformer" / "student_transformer.py").is_file()
        assert json.loads((out / "model_index.json").read_text())["transformer"] == ["student_transformer", "StudentDiTTransformer2DModel"]
        assert "transformer/student_transformer.py" in (out / "README.md").read_text()
    seen = sample_without_automl_diff(call, cwd=tmp_path, steps=4, prompt=3)
    assert seen["unet"] == saved["_class_name"] and seen["shape"] == [2, 16, 16, 3] and seen["imported"] == []


@pytest.mark.parametrize(
    ("method", "space", "message"),
    [
        ("dkdm", "family: unet2d\nblocks:\n  down.0: {channels: [8]}\n", "student: required for UNet students of a DiT teacher"),
        (
            "dkdm",
            "family: unet2d\nstudent: {down_block_types: [DownBlock2D], up_block_types: [UpBlock2D]}\nblocks:\n  down.0: {channels: [8]}\n",
            "student.block_out_channels: required",
        ),
        ("dkdm", "family: dit\ntransformer: {layers: [9]}\n", "transformer.layers: 9 is more than the teacher's 4 (num_layers)"),
        (
            "diffnas",
            "family: supernet\nblocks:\n  down.0: {layers: [0]}\n",
            "blocks.down.0: unknown block; the teacher has blocks transformer_",
        ),
        ("diffnas", "family: supernet\nblocks:\n  all: {layers: [0, 2]}\n", "blocks.all.layers: 2; a transformer block is computed (1) or"),
        (
            "diffnas",
            "family: supernet\nblocks:\n  transformer_blocks.1: {heads: [3]}\n",
            "blocks.transformer_blocks.1.heads: 3 is more than the 2",
        ),
        ("diffnas", "family: supernet\nblocks:\n  all: {depth: [1]}\n", "blocks.all.depth: applies to UNet blocks; a DiT block chooses"),
        ("diffnas", "family: supernet\nblocks:\n  all: {width: [0.3]}\n", "blocks.all.width: 0.3 gives 19.2 of the 64 feed-forward units"),
    ],
)
def test_dit_student_spaces_that_cannot_be_built_are_one_line(tiny_dit_dir, tiny_clip, tmp_path, capsys, method, space, message):
    """DKDM's student spaces and DiffNAS's supernet spaces on a DiT teacher."""
    from automl_diff.cli import main

    (tmp_path / "space.yaml").write_text(space)
    config = _dit_study(tmp_path, tiny_dit_dir, tiny_clip, method=method, search_space="space.yaml", method_options={"pool_size": 8})
    assert main(["run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'space.yaml'}: ") and message in err and "\n" not in err, err


def test_a_dit_student_of_an_unconditional_unet_is_distilled_and_exported_as_a_ddim_pipeline(tiny_teacher_dir, tmp_path, capsys):
    """DKDM from a UNet into a transformer (the other direction of "any architecture"): one-class
    DiT students of an unconditional UNet teacher, called as the UNet is, exported as a
    DDIMPipeline whose unet ships its code and samples where automl_diff cannot be imported."""
    import optuna

    from automl_diff.cli import main
    from automl_diff.methods.dkdm.method import DKDMAttr
    from tests.conftest import printed_load_calls, sample_without_automl_diff, write_study

    space = tmp_path / "space.yaml"
    space.write_text(
        "family: dit\nstudent: {patch_size: 4, attention_head_dim: 4, num_attention_heads: 2, num_layers: 2}\n"
        "transformer: {layers: [1, 2]}\n"
    )
    config = write_study(tmp_path, tiny_teacher_dir, space)
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.load_study(study_name="tiny", storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all(t.user_attrs[DKDMAttr.INIT] == "random" for t in complete)
    capsys.readouterr()
    out = tmp_path / "export"
    assert main(["export", "--storage", storage, "--study-name", "tiny", "--trial", str(complete[0].number), "--out", str(out)]) == 0
    (call,) = printed_load_calls(capsys.readouterr().out)
    saved = json.loads((out / "unet" / "config.json").read_text())
    assert (
        saved["_class_name"] == "StudentDiTTransformer2DModel"
        and saved["unconditional"]
        and (out / "unet" / "student_transformer.py").is_file()
    )
    assert call.startswith("diffusers.DDIMPipeline.from_pretrained(") and call.endswith("trust_remote_code=True)")
    seen = sample_without_automl_diff(call, cwd=tmp_path, steps=2)
    assert seen["unet"] == "StudentDiTTransformer2DModel" and seen["shape"] == [2, 16, 16, 1] and seen["imported"] == []


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("family: dit\ntransformer: {layers: [1]}\n", "student: required for DiT students of a UNet teacher"),
        ("family: dit\nstudent: {patch_size: 3}\ntransformer: {layers: [1]}\n", "student.patch_size: 3 does not divide the teacher's"),
        ("family: dit\nstudent: {patches: 2}\ntransformer: {layers: [1]}\n", "student.patches: not a DiTTransformer2DModel config key"),
    ],
)
def test_dit_students_of_a_unet_that_cannot_be_built_are_one_line(tiny_teacher_dir, tmp_path, capsys, space, message):
    from automl_diff.cli import main
    from tests.conftest import write_study

    (tmp_path / "space.yaml").write_text(space)
    config = write_study(tmp_path, tiny_teacher_dir, tmp_path / "space.yaml")
    assert main(["run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'space.yaml'}: ") and message in err and "\n" not in err, err


def test_dipgo_stacks_on_a_diffnas_dit_export(tiny_dit_dir, tiny_clip, tmp_path, capsys):
    """A DiffNAS DiT student (its class shipped as code in the export) is a starting model: DiP-GO
    gates its blocks against the original teacher, and the stacked export keeps the student's
    layout, its schedule and the lineage, and loads with diffusers."""
    import optuna

    from automl_diff.cli import main
    from automl_diff.gating import Schedule, apply_schedule
    from automl_diff.records import StudyAttr, TrialAttr
    from tests.conftest import printed_load_calls

    (tmp_path / "space.yaml").write_text("family: supernet\nblocks:\n  all: {layers: [0, 1], heads: [1, 2], width: [0.5, 1.0]}\n")
    nas = _dit_study(
        tmp_path,
        tiny_dit_dir,
        tiny_clip,
        name="nas",
        method="diffnas",
        search_space="space.yaml",
        n_trials=1,
        objectives=[{"name": "macs"}, {"name": "fid"}],
        storage=f"sqlite:///{tmp_path / 'nas.db'}",
        method_options={
            "pool_size": 8,
            "pool_steps": 4,
            "supernet_iterations": 2,
            "search_samples": 4,
            "tolerance_low": 0.5,
            "tolerance_high": 1.0,
        },
    )
    assert main(["run", str(nas), "--quiet"]) == 0, capsys.readouterr().err
    student = tmp_path / "exports" / "nas"
    assert (
        main(["export", "--storage", f"sqlite:///{tmp_path / 'nas.db'}", "--study-name", "nas", "--trial", "0", "--out", str(student)]) == 0
    )
    layout = json.loads((student / "transformer" / "config.json").read_text())
    assert layout["_class_name"] == "StudentDiTTransformer2DModel"

    stacked = _dit_study(tmp_path, student, tiny_clip, name="stacked", n_trials=1, storage=f"sqlite:///{tmp_path / 'stacked.db'}")
    assert main(["run", str(stacked), "--quiet"]) == 0, capsys.readouterr().err
    storage = f"sqlite:///{tmp_path / 'stacked.db'}"
    study = optuna.load_study(study_name="stacked", storage=storage)
    assert study.user_attrs[StudyAttr.ORIGINAL_TEACHER] == str(tiny_dit_dir)
    (trial,) = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert trial.user_attrs[TrialAttr.TRAJECTORY_MACS] <= study.user_attrs[StudyAttr.START_METRICS][TrialAttr.TRAJECTORY_MACS]
    capsys.readouterr()
    out = tmp_path / "exports" / "stacked"
    assert main(["export", "--storage", storage, "--study-name", "stacked", "--trial", str(trial.number), "--out", str(out)]) == 0
    (call,) = printed_load_calls(capsys.readouterr().out)
    info = json.loads((out / "automl_diff.json").read_text())
    assert [s["method"] for s in info["lineage"]] == ["diffnas", "dipgo"]
    import diffusers  # noqa: F401 - the printed call names it

    pipe = eval(call)
    kept = {k: pipe.transformer.config[k] for k in ("skip_blocks", "block_heads", "block_ff_dims")}
    assert kept == {k: layout[k] for k in kept}
    with apply_schedule(pipe, Schedule.load(out / "schedule.json")) as controller:
        pipe([3], num_inference_steps=4, output_type="np")
        assert sum(controller.executed.values()) == controller.plan.executes.sum()
