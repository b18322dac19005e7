"""DiffNAS, DKDM and BK-SDM on text-to-image teachers: cross-attention supernets, the conditional
pool and dataset, the conditional search-space family, studies that run, resume and export
StableDiffusionPipelines, stacking DiP-GO on such an export, and SD-1.5's DiffNAS study offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from automl_diff.config.search_space import SupernetBlock, SupernetSpace, load_search_space
from automl_diff.errors import UserError
from automl_diff.methods.diffnas.search import record_teacher_blocks
from automl_diff.methods.diffnas.supernet import assemble_student, build_supernets, iter_tensors
from automl_diff.models.loading import load_teacher
from automl_diff.models.recipes import bk_sdm_removed
from tests.conftest import SD_LAYOUT, TINY_PROMPTS, build_tiny_sd_pipeline, printed_load_calls, sample_without_automl_diff, write_study

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sd_layout_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("sd_layout"), {**SD_LAYOUT, "transformer_layers_per_block": 2})


def _blocks(teacher, space):
    supernets = build_supernets(teacher.unet, space)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([5, 400, 900])
    context = teacher.text.encode(["a handwritten seven", "the digit 2", ""])
    _, recorded = record_teacher_blocks(teacher.unet, x, t, list(supernets), encoder_hidden_states=context)
    return supernets, recorded, (x, t, context)


def test_cross_attention_candidates_keep_shapes_and_the_largest_is_the_teacher_block(sd_layout_dir):
    torch.manual_seed(0)
    teacher = load_teacher(str(sd_layout_dir))
    space = SupernetSpace(
        "space.yaml",
        (
            SupernetBlock("down.0", layers=(0, 1, 2), width=(0.25, 1.0), attention=(True, False), depth=(1, 2)),
            SupernetBlock("mid", layers=(0, 2), width=(0.5, 1.0), attention=(True, False), depth=(1, 2)),
            SupernetBlock("up.2", layers=(1, 3), width=(0.5, 1.0), attention=(True, False), depth=(1, 2)),
        ),
    )
    space.validate_for(teacher.unet)
    supernets, recorded, (x, t, context) = _blocks(teacher, space)
    assert "encoder_hidden_states" in recorded["down.0"].kwargs  # the text reaches every block
    for name in ("down.0", "mid", "up.2"):
        supernet, data = supernets[name], recorded[name]
        candidates = supernet.candidates()
        assert any(c.depth == 1 for c in candidates) and len(candidates) >= 7
        reference = [o.shape for o in iter_tensors(data.output)]
        for choice in candidates:
            assert [o.shape for o in iter_tensors(supernet.set(choice)(*data.args, **data.kwargs))] == reference, (name, choice)
        out = supernet.set(supernet.largest())(*data.args, **data.kwargs)
        for a, b in zip(iter_tensors(out), iter_tensors(data.output), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the cut-out subnet computes what the supernet computes, transformer depth included
    choice = next(c for c in supernets["up.2"].candidates() if c.depth == 1 and c.attention and c.width == 0.5 and c.layers == 3)
    data = recorded["up.2"]
    with torch.no_grad():
        cut = supernets["up.2"].subnet(choice)(*data.args, **data.kwargs)
        torch.testing.assert_close(cut, supernets["up.2"].set(choice)(*data.args, **data.kwargs), atol=1e-5, rtol=1e-5)
    student, config = assemble_student(teacher.unet, supernets, {"up.2": choice, "down.0": supernets["down.0"].smallest()})
    assert config["_class_name"] == "StudentUNet2DConditionModel"
    assert config["transformer_depths"] == {f"up.2.attentions.{i}": 1 for i in range(3)}
    assert len(student.up_blocks[2].attentions[0].transformer_blocks) == 1


def test_an_assembled_student_round_trips_through_stable_diffusion_pipeline(sd_layout_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    teacher = load_teacher(str(sd_layout_dir))
    space = SupernetSpace("s.yaml", (SupernetBlock("down.1", layers=(1,), width=(0.5,), attention=(False,), depth=None),))
    supernets = build_supernets(teacher.unet, space)
    student, _ = assemble_student(teacher.unet, supernets, {n: s.smallest() for n, s in supernets.items()})
    pipe = teacher.text.pipeline(student, StableDiffusionPipeline.from_pretrained(str(sd_layout_dir)).scheduler)
    pipe.save_pretrained(str(tmp_path / "pipe"), safe_serialization=True)
    loaded = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert type(loaded.unet).__name__ == "StudentUNet2DConditionModel"
    assert loaded.unet.config.skip_attentions == ["down.1.attentions.0", "down.1.attentions.1"]
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([50])
    context = teacher.text.encode(["a three"])
    torch.testing.assert_close(loaded.unet(x, t, encoder_hidden_states=context).sample, student(x, t, encoder_hidden_states=context).sample)
    image = loaded("a handwritten seven", num_inference_steps=3, guidance_scale=3.0, output_type="pt").images
    assert image.shape == (1, 1, 16, 16) and torch.isfinite(image).all()


def test_the_conditional_pool_advances_entries_with_their_own_prompts_and_reads_no_dataset(tiny_sd_dir, monkeypatch, tmp_path):
    import automl_diff.zoo
    from automl_diff.config.options import DKDMOptions
    from automl_diff.config.study import load_study_config
    from automl_diff.methods.training import TrainingInputs
    from automl_diff.methods.training.inputs import Batch

    def no_dataset(*args, **kwargs):
        raise AssertionError("the data-free pool read a dataset")

    monkeypatch.setattr(automl_diff.zoo, "dataset_images", no_dataset)
    monkeypatch.setattr(automl_diff.zoo, "captioned_images", no_dataset)
    (tmp_path / "train.txt").write_text("\n".join(TINY_PROMPTS) + "\n")
    (tmp_path / "eval.txt").write_text("a handwritten seven\n")
    config = load_study_config(
        write_study(tmp_path, tiny_sd_dir, tmp_path / "s.yaml", prompts={"train": "train.txt", "eval": "eval.txt"}, search_space=None)
    )
    teacher = load_teacher(str(tiny_sd_dir))
    options = DKDMOptions(pool_size=64, pool_steps=5, prompt_dropout=0.25)
    inputs = TrainingInputs(config.method_settings, teacher, options, device=torch.device("cpu"))
    inputs.prepare()
    pool = inputs.pool
    assert pool.sample_shape == (4, 8, 8)  # latents, not images
    labels = pool.labels.tolist()
    assert set(labels) <= set(range(len(TINY_PROMPTS) + 1)) and len(TINY_PROMPTS) in labels  # some unconditional
    assert len(set(labels)) > 2
    negative = teacher.text.encode([""])[0]
    seen = []
    teacher_unet = teacher.unet

    def spy(x, t, encoder_hidden_states=None, **kwargs):
        seen.append(encoder_hidden_states.clone())
        return teacher_unet.__class__.forward(teacher_unet, x, t, encoder_hidden_states=encoder_hidden_states, **kwargs)

    batches = inputs.batches(3)
    monkeypatch.setattr(teacher_unet, "forward", spy)
    idx_before = pool.labels.clone()
    batch = batches(16)
    assert isinstance(batch, Batch) and batch.context.shape == (16, *negative.shape)
    # each entry is labelled with its own prompt's conditioning (or the unconditional one)
    assert torch.equal(seen[0], batch.context)
    for row in batch.context:
        assert any(torch.equal(row, p) for p in inputs.prompts)
    assert any(torch.equal(row, negative) for row in inputs.prompts)
    # a trajectory keeps its prompt until it reaches the clean image; then it draws a new one
    fresh = pool.position == 0
    assert torch.equal(pool.labels[~fresh], idx_before[~fresh])


def test_captioned_dataset_batches_carry_their_captions(tiny_sd_dir, tmp_path):
    from PIL import Image

    from automl_diff.config.options import DKDMOptions
    from automl_diff.config.study import load_study_config
    from automl_diff.methods.training import TrainingInputs
    from automl_diff.zoo import captioned_images as load_captioned_dataset

    images, captions = load_captioned_dataset("digits", resolution=16, channels=1)
    assert len(images) == len(captions) == 1797 and captions[0] == "a handwritten zero"
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        Image.new("L", (16, 16), color=40 * i).save(folder / name)
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a one"}\n{"file_name": "c.png", "text": "a two"}\n')
    images, captions = load_captioned_dataset(f"folder:{folder}", resolution=16, channels=1)
    assert images.shape == (2, 1, 16, 16) and captions == ["a one", "a two"]
    (folder / "metadata.jsonl").write_text("not json\n")
    with pytest.raises(UserError, match=r"metadata.jsonl:1: expected a JSON object with file_name and text"):
        load_captioned_dataset(f"folder:{folder}", resolution=16, channels=1)

    (tmp_path / "eval.txt").write_text("a handwritten seven\n")
    config = load_study_config(write_study(tmp_path, tiny_sd_dir, tmp_path / "s.yaml", prompts={"eval": "eval.txt"}, search_space=None))
    teacher = load_teacher(str(tiny_sd_dir))
    inputs = TrainingInputs(config.method_settings, teacher, DKDMOptions(source="dataset", prompt_dropout=0.0), device=torch.device("cpu"))
    batch = inputs.batches(0)(8)
    assert batch.x.shape == (8, 4, 8, 8) and batch.context.shape[0] == 8  # latents with their captions
    digits = [f"a handwritten {w}" for w in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]
    assert torch.equal(inputs.prompts[:10], teacher.text.encode(sorted(digits)))


def test_conditional_family_emits_unet2d_condition_models_and_checks_the_teacher(tiny_sd_dir, tiny_space, tmp_path):
    import optuna
    from diffusers import UNet2DConditionModel

    teacher = load_teacher(str(tiny_sd_dir))
    path = tmp_path / "cond.yaml"
    path.write_text(
        "family: unet2d_condition\nblocks:\n  down.0: {channels: [4, 8], attention: [true, false]}\n"
        "  down.1: {channels: [8, 16], layers: [1, 2]}\n  mid: {attention: [true, false]}\n"
    )
    space = load_search_space(path)
    space.validate_for(dict(teacher.unet.config))
    params = {"down.0.channels": 4, "down.0.attention": False, "down.1.channels": 8, "down.1.layers": 2, "mid.attention": False}
    assert space.suggest(optuna.trial.FixedTrial(params)) == params
    config = space.to_config(params, dict(teacher.unet.config))
    assert config["_class_name"] == "UNet2DConditionModel" and config["layers_per_block"] == [1, 2]
    assert config["down_block_types"] == ["DownBlock2D", "DownBlock2D"] and config["up_block_types"] == ["UpBlock2D", "UpBlock2D"]
    assert config["mid_block_type"] == "UNetMidBlock2D"
    student = UNet2DConditionModel.from_config(config)
    context = teacher.text.encode(["a seven"])
    assert student(torch.randn(1, 4, 8, 8), torch.tensor([3]), encoder_hidden_states=context).sample.shape == (1, 4, 8, 8)
    keep = space.to_config({"down.0.channels": 8}, dict(teacher.unet.config))
    assert keep["down_block_types"] == ["CrossAttnDownBlock2D", "DownBlock2D"] and keep["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    with pytest.raises(UserError, match=r"family: unet2d_condition does not fit an unconditional teacher; use family: unet2d"):
        space.validate_for({**dict(teacher.unet.config), "cross_attention_dim": None})
    path.write_text("family: unet2d_condition\nblocks:\n  down.0: {channels: [6]}\n")
    with pytest.raises(UserError, match=r"cond\.yaml: blocks\.down\.0\.channels: 6 is not divisible by norm_num_groups=4"):
        load_search_space(path).validate_for(dict(teacher.unet.config))
    path.write_text("family: supernet\nblocks:\n  down.0: {depth: [2]}\n")
    with pytest.raises(UserError, match=r"cond\.yaml: blocks\.down\.0\.depth: 2 is more than the 1 transformer layers of down\.0"):
        load_search_space(path).validate_for(teacher.unet)
    path.write_text("family: supernet\nblocks:\n  down.1: {depth: [1]}\n")
    with pytest.raises(UserError, match=r"blocks\.down\.1\.depth: 1, but the teacher's down\.1 has no transformer attention"):
        load_search_space(path).validate_for(teacher.unet)


def _study(tmp_path, teacher, method, space, **overrides):
    (tmp_path / "train.txt").write_text("\n".join(TINY_PROMPTS) + "\n")
    (tmp_path / "eval.txt").write_text("a handwritten seven\nthe digit 2\n")
    config = {
        "name": f"t2i-{method}",
        "method": method,
        "search_space": str(space),
        "objectives": [{"name": "macs"}, {"name": "fid"}, {"name": "prompt_accuracy", "direction": "maximize"}],
        "budgets": {
            "train_iterations": 3,
            "batch_size": 4,
            "fid_samples": 8,
            "images_per_prompt": 4,
            "sampling_steps": 3,
            "latency_repeats": 1,
            "latency_batch_size": 2,
        },
        "sampling": {"guidance_scale": 2.0},
        "prompts": {"train": "train.txt", "eval": "eval.txt", "judge": "digits"},
        **overrides,
    }
    return write_study(tmp_path, teacher, Path(space), **config)


@pytest.mark.parametrize("method", ["dkdm", "diffnas"])
def test_dkdm_and_diffnas_studies_on_a_text_to_image_pipeline_run_resume_and_export(method, tiny_sd_dir, tmp_path, capsys):
    import optuna
    from diffusers import StableDiffusionPipeline

    from automl_diff.cli import main
    from automl_diff.records import TrialAttr

    space = tmp_path / "space.yaml"
    if method == "dkdm":
        space.write_text("family: unet2d_condition\nblocks:\n  down.0: {channels: [4, 8]}\n  down.1: {channels: [8, 16]}\n")
        options = {"pool_size": 16, "pool_steps": 4}
    else:
        space.write_text(
            "family: supernet\nblocks:\n  down.0: {layers: [0, 1], width: [0.5, 1.0], attention: [true, false]}\n"
            "  up.1: {layers: [1, 2], width: [0.5, 1.0], attention: [true, false]}\n"
        )
        options = {"pool_size": 16, "pool_steps": 4, "supernet_iterations": 2, "search_samples": 8, "retrain_iterations": [3]}
    config = _study(tmp_path, tiny_sd_dir, method, space, method_options=options)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    front = capsys.readouterr().out.split("Pareto front of study")[1].splitlines()
    assert front[1].split() == ["trial", "MACs", "trajectory", "MACs", "params", "FID", "prompt_accuracy", "latency", "speedup"]
    name = f"t2i-{method}"
    complete = [t for t in optuna.load_study(study_name=name, storage=storage).trials if t.state.name == "COMPLETE"]
    assert len(complete) == 2 and all(0 <= t.user_attrs[TrialAttr.PROMPT_ACCURACY] <= 1 for t in complete)
    assert main(["trials", "--storage", storage, "--study-name", name]) == 0
    assert "prompt_accuracy" in capsys.readouterr().out.splitlines()[0]
    assert main(["run", str(config), "--quiet", "--n-trials", "3"]) == 0  # resumed: one more trial
    assert len(optuna.load_study(study_name=name, storage=storage).trials) == 3
    capsys.readouterr()
    trial = complete[0].number
    out = tmp_path / "export"
    assert main(["export", "--storage", storage, "--study-name", name, "--trial", str(trial), "--out", str(out)]) == 0
    (call,) = printed_load_calls(capsys.readouterr().out)
    custom = method == "diffnas"
    remote = ", trust_remote_code=True" if custom else ""
    assert call == f"diffusers.StableDiffusionPipeline.from_pretrained({json.dumps(str(out))}{remote})"
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == (["student_unet", "StudentUNet2DConditionModel"] if custom else ["diffusers", "UNet2DConditionModel"])
    pipe = StableDiffusionPipeline.from_pretrained(str(out), trust_remote_code=custom)
    image = pipe("a handwritten seven", num_inference_steps=3, guidance_scale=2.0, output_type="pt").images
    assert image.shape == (1, 1, 16, 16)
    assert "text-to-image" in (out / "README.md").read_text()


def test_stacking_dipgo_on_a_diffnas_text_to_image_export(tiny_sd_dir, tmp_path, capsys):
    import optuna

    from automl_diff import Schedule
    from automl_diff.cli import main

    space = tmp_path / "space.yaml"
    space.write_text("family: supernet\nblocks:\n  up.1: {layers: [1, 2], width: [0.5, 1.0], attention: [true, false]}\n")
    options = {"pool_size": 16, "pool_steps": 4, "supernet_iterations": 2, "search_samples": 8, "retrain_iterations": [3]}
    first = tmp_path / "first"
    first.mkdir()
    config = _study(first, tiny_sd_dir, "diffnas", space, method_options=options, n_trials=1)
    assert main(["run", str(config), "--quiet"]) == 0
    export = tmp_path / "student"
    first_storage = f"sqlite:///{first / 'study.db'}"
    assert main(["export", "--storage", first_storage, "--study-name", "t2i-diffnas", "--trial", "0", "--out", str(export)]) == 0
    second = tmp_path / "second"
    second.mkdir()
    dipgo = {"granularity": "layer", "target_macs_ratio": 0.5, "reference_images": 3, "warmup": 0.0}
    config = _study(second, export, "dipgo", space, search_space=None, method_options=dipgo, n_trials=2)
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    storage = f"sqlite:///{second / 'study.db'}"
    study = optuna.load_study(study_name="t2i-dipgo", storage=storage)
    assert study.user_attrs["original_teacher"] == str(tiny_sd_dir)
    trial = next(t for t in study.trials if t.state.name == "COMPLETE")
    out = tmp_path / "stacked"
    capsys.readouterr()
    assert main(["export", "--storage", storage, "--study-name", "t2i-dipgo", "--trial", str(trial.number), "--out", str(out)]) == 0
    info = json.loads((out / "automl_diff.json").read_text())
    assert [step["method"] for step in info["lineage"]] == ["diffnas", "dipgo"]
    assert json.loads((out / "model_index.json").read_text())["unet"] == ["student_unet", "StudentUNet2DConditionModel"]
    assert Schedule.load(out / "schedule.json").steps == 3


def test_bk_sdm_removes_the_layers_the_paper_names():
    from diffusers import UNet2DConditionModel

    from automl_diff.models.recipes import bk_sdm_peer
    from tests.conftest import TINY_COND_UNET

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD_LAYOUT).eval()  # SD-1.x's layout
    base = bk_sdm_removed(unet, "base")
    # BK-SDM-Base: the second resnet/attention pair of each down stage, the second of three of each up stage
    expected = [f"down.{i}.{k}.1" for i in range(3) for k in ("resnets", "attentions")] + ["down.3.resnets.1", "up.0.resnets.1"]
    expected += [f"up.{i}.{k}.1" for i in range(1, 4) for k in ("resnets", "attentions")]
    assert base == expected
    small = bk_sdm_removed(unet, "small")  # BK-SDM-Small: also the whole mid block
    assert set(small) - set(base) == {"mid.resnets.0", "mid.resnets.1", "mid.attentions.0"}
    # on SD's layout the student is BK-SDM's own: a stock UNet2DConditionModel, one pair fewer per stage
    student, config, removed = bk_sdm_peer(unet, "small")
    assert removed == small and config["_class_name"] == "UNet2DConditionModel" and student.mid_block is None
    assert config["layers_per_block"] == [1, 1, 1, 1] and [len(b.resnets) for b in student.up_blocks] == [2, 2, 2, 2]
    # kept layers hold the teacher's weights: up stages' last pair moves down one place, as BK-SDM copies it
    torch.testing.assert_close(student.down_blocks[0].resnets[0].conv1.weight, unet.down_blocks[0].resnets[0].conv1.weight)
    torch.testing.assert_close(student.up_blocks[1].resnets[1].conv1.weight, unet.up_blocks[1].resnets[2].conv1.weight)
    torch.testing.assert_close(student.up_blocks[2].attentions[1].proj_in.weight, unet.up_blocks[2].attentions[2].proj_in.weight)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 12)
    assert student(x, t, encoder_hidden_states=context).sample.shape == (1, 4, 8, 8)
    # a teacher with one pair per down stage: the removed layers stay in place and compute nothing
    shallow = UNet2DConditionModel(**TINY_COND_UNET).eval()
    student, config, removed = bk_sdm_peer(shallow, "small")
    assert removed[:3] == ["down.0.resnets.0", "down.0.attentions.0", "down.1.resnets.0"]
    assert config["_class_name"] == "StudentUNet2DConditionModel" and config["resnet_widths"]["down.0.resnets.0"] == 0
    h = torch.randn(1, 16, 2, 2)
    with torch.no_grad():
        assert torch.equal(student.mid_block(h, torch.zeros(1, 32), encoder_hidden_states=torch.zeros(1, 3, 12)), h)
        assert student(x, t, encoder_hidden_states=context).sample.shape == (1, 4, 8, 8)
    with pytest.raises(UserError, match=r"unknown BK-SDM variant 'tiny'; variants: base, small"):
        bk_sdm_removed(unet, "tiny")


@pytest.mark.parametrize("variant", ["base", "small"])
def test_bk_sdm_retrains_on_sds_layout_with_its_own_loss(sd_layout_dir, tmp_path, variant):
    """BK-SDM-Base and -Small, built on SD's layout, retrain end to end on the data-free pool of a
    conditional teacher with BK-SDM's loss (task + output + stage features, weight 1 each)."""
    import torch.nn.functional as F

    from automl_diff.bench.peers import BkSdmLoss, retrain_bk_sdm
    from automl_diff.config.options import DKDMOptions
    from automl_diff.config.study import load_study_config
    from automl_diff.methods.training import TrainingInputs
    from automl_diff.models.blocks import record_blocks
    from automl_diff.models.recipes import bk_sdm_label
    from automl_diff.sampling import predict_noise

    (tmp_path / "train.txt").write_text("\n".join(TINY_PROMPTS) + "\n")
    config = load_study_config(write_study(tmp_path, sd_layout_dir, tmp_path / "s.yaml", prompts={"train": "train.txt"}, search_space=None))
    teacher = load_teacher(str(sd_layout_dir))
    inputs = TrainingInputs(config.method_settings, teacher, DKDMOptions(pool_size=8, pool_steps=3), device=torch.device("cpu"))
    result, student_config, removed = retrain_bk_sdm(teacher.unet, variant, inputs.batches(0), iterations=4, batch_size=4, lr=1e-3)
    assert student_config["_class_name"] == "UNet2DConditionModel" and len(result.losses) == 4
    assert all(torch.isfinite(torch.tensor(result.losses))) and (result.model.mid_block is None) == (variant == "small")
    assert bk_sdm_label(teacher.unet, variant) == {"base": "BK-SDM-Base", "small": "BK-SDM-Small"}[variant]
    # the loss is BK-SDM's: the three MSE terms summed, features on the down and up stages' hidden states
    batch = inputs.batches(1)(2)
    loss = BkSdmLoss(teacher.unet)
    value = loss(result.model, batch, 0)
    stages = [f"down.{i}" for i in range(4)] + [f"up.{i}" for i in range(4)]
    assert loss.stages == stages
    with torch.no_grad(), record_blocks(teacher.unet, stages) as t, record_blocks(result.model, stages) as s:
        eps_t = predict_noise(teacher.unet, batch.x, batch.t, **batch.conditioning)
        eps_s = predict_noise(result.model, batch.x, batch.t, **batch.conditioning)
    hidden = lambda out: out[0] if isinstance(out, tuple) else out
    features = sum(F.mse_loss(hidden(s[n].outputs[0]), hidden(t[n].outputs[0])) for n in stages)
    expected = F.mse_loss(eps_s, batch.target) + F.mse_loss(eps_s, eps_t) + features
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    # one pair per down stage: the rule empties every down stage, and the row says so
    from diffusers import UNet2DConditionModel

    from tests.conftest import TINY_COND_UNET

    assert bk_sdm_label(UNet2DConditionModel(**TINY_COND_UNET), variant).endswith("'s rule, every down stage emptied")


def test_the_sd15_diffnas_study_runs_offline_on_a_tiny_pipeline_of_sd15s_layout(sd_layout_dir, tmp_path, capsys):
    """studies/diffnas_sd15.yaml and its search space, unchanged but for the teacher, the user's
    files and the budgets: SD-1.5's block layout at tiny widths."""
    import optuna

    from automl_diff.cli import main

    config = yaml.safe_load((REPO / "studies" / "diffnas_sd15.yaml").read_text())
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "sd_train.txt").write_text("\n".join(TINY_PROMPTS) + "\n")
    (tmp_path / "prompts" / "coco_val.csv").write_text("id,caption\n1,a handwritten seven\n2,the digit 2\n")
    config.update(
        teacher=str(sd_layout_dir),
        search_space=str(REPO / "search_spaces" / "sd15_supernet.yaml"),
        storage=f"sqlite:///{tmp_path / 'sd15.db'}",
        output_dir=str(tmp_path / "runs"),
        device="cpu",
        n_trials=3,
        fid={"dataset": "digits", "features": "digits"},
    )
    config["prompts"].pop("alignment")
    config["budgets"].update(fid_samples=4, sampling_steps=2, latency_repeats=1, latency_batch_size=1, batch_size=2, train_iterations=2)
    config["method_options"].update(
        pool_size=8, pool_steps=3, supernet_iterations=1, search_samples=2, retrain_iterations=[2], block_trials=4
    )
    path = tmp_path / "diffnas_sd15.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--quiet"]) == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="diffnas_sd15", storage=config["storage"])
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    # BK-SDM-Base and -Small first, as block choices of the space, then a tolerance of the search
    assert [t.user_attrs.get("recipe") for t in study.trials] == ["bk-sdm-base", "bk-sdm-small", None]
    base, small, searched = (t.user_attrs["block_choices"] for t in study.trials)
    assert set(searched) >= {"down.0", "down.3", "mid", "up.0", "up.3"} and "tolerance" in study.trials[2].params
    assert base["down.1"] == "layers=1,width=1,attention=true" and base["up.2"] == "layers=2,width=1,attention=true"
    assert base["mid"] == "layers=2,width=1,attention=true" and small["mid"].startswith("layers=0,")
    removed = set(bk_sdm_removed(load_teacher(str(sd_layout_dir)).unet, "small"))
    layout = study.trials[1].user_attrs["model_config"]
    assert {n for n, w in layout["resnet_widths"].items() if w == 0} | set(layout["skip_attentions"]) == removed
    assert study.trials[0].user_attrs["macs"] > study.trials[1].user_attrs["macs"]
    # the recipe's student exports and samples with diffusers alone
    storage = config["storage"]
    capsys.readouterr()
    out = tmp_path / "bk_sdm_small"
    assert main(["export", "--storage", storage, "--study-name", "diffnas_sd15", "--trial", "1", "--out", str(out)]) == 0
    (call,) = printed_load_calls(capsys.readouterr().out)
    seen = sample_without_automl_diff(call, cwd=tmp_path, prompt="a handwritten seven")
    assert seen["unet"] == "StudentUNet2DConditionModel" and not seen["imported"]
    assert json.loads((out / "automl_diff.json").read_text())["lineage"][0]["recipe"] == "bk-sdm-small"
    # unchanged, offline, the study names the user's files first
    capsys.readouterr()
    assert main(["run", str(REPO / "studies" / "diffnas_sd15.yaml"), "--quiet"]) == 2
    assert "prompts.train: the prompt file" in capsys.readouterr().err


def test_bk_sdm_is_a_point_of_sd15s_supernet_space_whose_up_stages_drop_the_middle_pair():
    from diffusers import UNet2DConditionModel

    from automl_diff.config.search_space import computing_resnets

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD_LAYOUT).eval()
    space = load_search_space(REPO / "search_spaces" / "sd15_supernet.yaml")
    assert computing_resnets(3, 2, "middle") == {0, 2} and computing_resnets(3, 1, "middle") == {2}
    assert computing_resnets(3, 2, "end") == {0, 1} and computing_resnets(3, 0, "middle") == set()
    base = space.point_of(unet, bk_sdm_removed(unet, "base"), "bk-sdm-base")
    assert base == {"down.0": 1, "down.1": 1, "down.2": 1, "down.3": 1, "mid": 2, "up.0": 2, "up.1": 2, "up.2": 2, "up.3": 2}
    assert space.point_of(unet, bk_sdm_removed(unet, "small"), "bk-sdm-small")["mid"] == 0
    # the subnets of that point remove exactly BK-SDM's layers (a removed resnet keeps its shortcut)
    from automl_diff.methods.diffnas.supernet import BlockChoice

    supernets = build_supernets(unet, space)
    choices = {n: sn.canonical(BlockChoice(base[n], 1.0, True, 0)) for n, sn in supernets.items()}
    _, config = assemble_student(unet, supernets, choices)
    zero = {n for n, w in config["resnet_widths"].items() if w == 0}
    assert zero | set(config["skip_attentions"]) == set(bk_sdm_removed(unet, "base"))
    # a space whose up stages drop their last pairs first does not hold BK-SDM: one line says what it needs
    end = SupernetSpace("s.yaml", tuple(SupernetBlock(b.name, b.layers, b.width, b.attention, b.depth) for b in space.blocks))
    needs = r"^s.yaml: blocks.up.0: bk-sdm-base removes up.0.resnets.1, which is not a point of this space; "
    with pytest.raises(UserError, match=needs + "it needs drop: middle$"):
        end.point_of(unet, bk_sdm_removed(unet, "base"), "bk-sdm-base")
    blocks = [SupernetBlock(b.name, b.layers, (0.5,), b.attention, b.depth, b.drop) if b.name == "down.1" else b for b in space.blocks]
    with pytest.raises(UserError, match=r"blocks.down.1: .* down.1.resnets.1, down.1.attentions.1, which .* it needs width: 1.0$"):
        SupernetSpace("s.yaml", tuple(blocks)).point_of(unet, bk_sdm_removed(unet, "base"), "bk-sdm-base")
    with pytest.raises(UserError, match=r"blocks.down.0: .* it needs layers: 1$"):  # an undeclared block keeps the teacher's
        narrow = SupernetSpace("s.yaml", (SupernetBlock("down.1", (1, 2)),))
        narrow.point_of(unet, bk_sdm_removed(unet, "base"), "bk-sdm-base")


def test_dkdm_warm_starts_distil_bk_sdms_students_first(sd_layout_dir, tmp_path, capsys):
    """A DKDM study on SD's layout names BK-SDM-Base and -Small: they are its first trials, stock
    UNet2DConditionModels with the teacher's remaining weights (whatever the space holds), marked on
    the front, and they export as pipelines diffusers loads alone."""
    import optuna

    from automl_diff.cli import main

    (tmp_path / "train.txt").write_text("\n".join(TINY_PROMPTS) + "\n")
    (tmp_path / "eval.txt").write_text("\n".join(TINY_PROMPTS) + "\n")
    space = tmp_path / "space.yaml"
    space.write_text("family: unet2d_condition\nblocks:\n  down.0: {channels: [16, 32], layers: [1, 2]}\n")
    path = write_study(
        tmp_path,
        sd_layout_dir,
        space,
        n_trials=3,
        sampler={"name": "tpe", "seed": 0},
        prompts={"train": "train.txt", "eval": "eval.txt"},
        budgets={**yaml.safe_load(write_study(tmp_path, sd_layout_dir, space).read_text())["budgets"], "batch_size": 4, "fid_samples": 6},
        method_options={"pool_size": 8, "pool_steps": 3, "warm_start": ["bk-sdm-base", "bk-sdm-small"]},
    )
    assert main(["run", str(path), "--quiet"]) == 0, capsys.readouterr().err
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    trials = optuna.load_study(study_name="tiny", storage=storage).trials
    assert [t.user_attrs.get("recipe") for t in trials] == ["bk-sdm-base", "bk-sdm-small", None]
    base, small = (t.user_attrs["model_config"] for t in trials[:2])
    assert base["_class_name"] == "UNet2DConditionModel" and base["layers_per_block"] == [1, 1, 1, 1]
    assert small["mid_block_type"] is None and trials[0].user_attrs["inherited_fraction"] == 1.0
    assert "down.0.layers" in trials[2].params
    capsys.readouterr()
    assert main(["pareto", "--storage", storage, "--study-name", "tiny", "--json"]) == 0
    front = json.loads(capsys.readouterr().out)
    assert all(r["recipe"] == {0: "bk-sdm-base", 1: "bk-sdm-small"}.get(r["trial"]) for r in front)
    out = tmp_path / "export"
    assert main(["export", "--storage", storage, "--study-name", "tiny", "--trial", "1", "--out", str(out)]) == 0
    (call,) = printed_load_calls(capsys.readouterr().out)
    seen = sample_without_automl_diff(call, cwd=tmp_path, prompt="a three")
    assert seen["unet"] == "UNet2DConditionModel" and not seen["imported"]
    # recipes of another method, or one the space cannot hold, are one line
    for method, options, message in (
        (
            "dkdm",
            {"warm_start": ["deepcache:3"]},
            "method_options.warm_start[0]: not a recipe of method dkdm, whose recipes are bk-sdm-base",
        ),
        ("diffnas", {"warm_start": ["bk-sdm-small"]}, "blocks.down.0: warm_start bk-sdm-small (BK-SDM-Small) removes down.0.resnets.1, "),
    ):
        supernet = tmp_path / "supernet.yaml"
        supernet.write_text("family: supernet\nblocks:\n  mid: {layers: [1, 2]}\n")
        bad = write_study(
            tmp_path,
            sd_layout_dir,
            supernet if method == "diffnas" else space,
            method=method,
            prompts={"train": "train.txt", "eval": "eval.txt"},
            method_options=options,
        )
        assert main(["run", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
