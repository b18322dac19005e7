"""DiffNAS: block supernets, block-wise search, assembly, joint-loss retraining, the study method."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
import yaml

from automl_diff.cli import main
from automl_diff.config.search_space import SupernetBlock, SupernetSpace, load_search_space
from automl_diff.errors import UserError
from automl_diff.methods.diffnas import (
    BlockChoice,
    JointWeight,
    assemble_student,
    build_supernets,
    choose_global,
    choose_local,
    global_search,
    local_search,
    train_supernets,
)
from automl_diff.methods.diffnas.method import DiffNASAttr
from automl_diff.methods.diffnas.retrain import JointLoss
from automl_diff.methods.diffnas.search import BlockScore, record_teacher_blocks, score_candidate
from automl_diff.methods.diffnas.supernet import iter_tensors, plug_supernets
from automl_diff.models.blocks import block_names, get_block
from automl_diff.models.student import StudentUNet2DModel
from automl_diff.records import BlockSearchAttr, TrialAttr
from tests.conftest import printed_load_calls, sample_without_automl_diff

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _space(unet, widths=(0.5, 1.0)) -> SupernetSpace:
    """Every block: all depths (0 to its resnets), the given widths, attention where it has some."""
    blocks = []
    for name in block_names(unet):
        module = get_block(unet, name)
        attends = bool(getattr(module, "attentions", None))
        blocks.append(
            SupernetBlock(name, layers=tuple(range(len(module.resnets) + 1)), width=widths, attention=(True, False) if attends else None)
        )
    return SupernetSpace("space.yaml", tuple(blocks))


def _inputs(unet, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 1000, (n,), generator=g)


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(iter_tensors(a), iter_tensors(b), strict=True))


def test_every_candidate_keeps_the_teacher_block_shapes_and_the_largest_is_the_teacher(tiny_unet):
    space = _space(tiny_unet, widths=(0.25, 0.5, 1.0))
    space.validate_for(tiny_unet)
    supernets = build_supernets(tiny_unet, space)
    x, t = _inputs(tiny_unet)
    _, recorded = record_teacher_blocks(tiny_unet, x, t, list(supernets))
    counted = 0
    with torch.no_grad():
        for name, supernet in supernets.items():
            data = recorded[name]
            assert _max_diff(supernet.set(supernet.largest())(*data.args, **data.kwargs), data.output) < 1e-6
            for choice in supernet.candidates():
                out = supernet.set(choice)(*data.args, **data.kwargs)
                assert [o.shape for o in iter_tensors(out)] == [o.shape for o in iter_tensors(data.output)], (name, choice)
                # the cut-out subnet computes what the supernet computes
                assert _max_diff(supernet.subnet(choice)(*data.args, **data.kwargs), out) < 1e-6
                counted += 1
    assert counted > 30


def test_candidate_macs_grow_with_depth_and_width(tiny_unet):
    supernets = build_supernets(tiny_unet, _space(tiny_unet, widths=(0.25, 0.5, 1.0)))
    x, t = _inputs(tiny_unet)
    _, recorded = record_teacher_blocks(tiny_unet, x, t, list(supernets))
    up = supernets["up.1"]  # two resnets at 16 channels... plus attention in up.0; up.1 has none
    data = [recorded["up.1"]]
    by_width = [score_candidate(up, BlockChoice(2, w, False), data).macs for w in (0.25, 0.5, 1.0)]
    by_depth = [score_candidate(up, BlockChoice(d, 0.5, False), data).macs for d in (0, 1, 2)]
    assert by_width == sorted(by_width) and len(set(by_width)) == 3
    assert by_depth == sorted(by_depth) and len(set(by_depth)) == 3
    attn = supernets["up.0"]
    with_attention = score_candidate(attn, BlockChoice(2, 1.0, True), [recorded["up.0"]]).macs
    without = score_candidate(attn, BlockChoice(2, 1.0, False), [recorded["up.0"]]).macs
    assert with_attention > without


def test_local_search_picks_the_smallest_candidate_within_tolerance():
    def s(block, layers, width, loss, macs):
        return BlockScore(block, BlockChoice(layers, width, False), loss, macs)

    scores = {
        "down.0": [
            s("down.0", 0, 1.0, 0.50, 10),
            s("down.0", 1, 0.5, 0.08, 40),
            s("down.0", 1, 0.75, 0.04, 60),
            s("down.0", 1, 1.0, 0.01, 100),
        ],
        "mid": [s("mid", 1, 0.5, 0.30, 20), s("mid", 1, 1.0, 0.20, 50)],
    }
    chosen = choose_local(scores, 0.05)
    assert chosen["down.0"].choice == BlockChoice(1, 0.75, False)  # 40 MACs is cheaper but 0.08 > 0.05
    assert chosen["mid"].choice == BlockChoice(1, 1.0, False)  # none within: the lowest loss
    assert choose_local(scores, 0.6)["down.0"].macs == 10
    assert choose_local(scores, 0.001)["down.0"].loss == 0.01


def test_latency_cost_picks_the_fastest_candidate_within_tolerance_whatever_its_macs():
    def s(layers, width, loss, macs, latency):
        return BlockScore("down.0", BlockChoice(layers, width, False), loss, macs, latency)

    # a narrow resnet: fewer MACs than the full one, but slower on the device
    scores = {"down.0": [s(1, 0.25, 0.04, 30, 0.012), s(1, 1.0, 0.01, 100, 0.010), s(0, 1.0, 0.50, 0, 0.001)]}
    assert choose_local(scores, 0.05)["down.0"].choice == BlockChoice(1, 0.25, False)
    assert choose_local(scores, 0.05, "latency")["down.0"].choice == BlockChoice(1, 1.0, False)
    assert choose_local(scores, 0.6, "latency")["down.0"].latency == 0.001
    with pytest.raises(ValueError, match="cost"):
        choose_local(scores, 0.05, "flops")


def test_latency_search_times_each_candidate_as_a_plain_block_at_the_latency_batch(tiny_unet, tmp_path):
    from automl_diff.methods.diffnas.search import _batch_of

    supernets = build_supernets(tiny_unet, _space(tiny_unet))
    data = {}
    for seed in range(2):
        x, t = _inputs(tiny_unet, n=3, seed=seed)
        _, recorded = record_teacher_blocks(tiny_unet, x, t, list(supernets))
        for name, value in recorded.items():
            data.setdefault(name, []).append(value)
    args, kwargs = _batch_of(data["up.0"], 8)  # 6 samples, repeated up to 8
    first = data["up.0"][0]
    batched = [*iter_tensors([*args, *kwargs.values()])]
    assert len(batched) == len([*iter_tensors([*first.args, *first.kwargs.values()])]) > 2  # hidden, temb, skips
    assert all(t.shape[0] == 8 for t in batched)
    assert torch.equal(batched[0][:3], next(iter_tensors([*first.args, *first.kwargs.values()])))
    assert torch.equal(batched[0][6:], batched[0][:2])

    storage = f"sqlite:///{tmp_path / 'search.db'}"
    scores = local_search(supernets, data, storage=storage, study_name="p", key="k", cost="latency", latency_batch=8)
    for name, supernet in supernets.items():
        study = optuna.load_study(study_name=f"p/block/{name}", storage=storage)
        assert study.metric_names == ["latency", "loss"]
        assert {sc.choice for sc in scores[name]} == set(supernet.candidates())
        assert all(sc.latency > 0 and sc.macs >= 0 for sc in scores[name])
        for trial in study.trials:
            assert trial.values[0] == trial.user_attrs[BlockSearchAttr.LATENCY] and BlockSearchAttr.MACS in trial.user_attrs
    # computing nothing (every resnet a shortcut, identity where channels match) is faster than the full block
    up1 = {sc.choice.layers: sc for sc in scores["up.1"] if sc.choice.width == 1.0}
    assert up1[0].latency < up1[2].latency
    fastest = choose_local(scores, 1e9, "latency")
    assert all(fastest[n].latency == min(sc.latency for sc in scores[n]) for n in scores)


def test_block_searches_are_optuna_studies_in_the_storage_and_both_modes_run(tiny_unet, tmp_path):
    supernets = build_supernets(tiny_unet, _space(tiny_unet))
    data = {}
    for seed in range(2):
        x, t = _inputs(tiny_unet, seed=seed)
        _, recorded = record_teacher_blocks(tiny_unet, x, t, list(supernets))
        for name, value in recorded.items():
            data.setdefault(name, []).append(value)
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    local = local_search(supernets, data, storage=storage, study_name="parent", key="k1", max_trials=64)
    names = set(optuna.get_all_study_names(storage))
    assert names == {f"parent/block/{n}" for n in supernets}
    for name, supernet in supernets.items():
        assert {sc.choice for sc in local[name]} == set(supernet.candidates())  # exhaustive
        study = optuna.load_study(study_name=f"parent/block/{name}", storage=storage)
        assert study.metric_names == ["macs", "loss"]
    # the full candidate reproduces the (untrained-supernet) teacher block exactly
    assert all(min(sc.loss for sc in v) < 1e-10 for v in local.values())
    # resuming runs nothing new
    again = local_search(supernets, data, storage=storage, study_name="parent", key="k1", max_trials=64)
    assert {n: len(v) for n, v in again.items()} == {n: len(v) for n, v in local.items()}
    assert len(optuna.load_study(study_name="parent/block/up.0", storage=storage).trials) == len(local["up.0"])
    with pytest.raises(UserError, match="other supernets"):
        local_search(supernets, data, storage=storage, study_name="parent", key="k2")

    scores = global_search(supernets, data, storage=storage, study_name="parent", key="k1", n_trials=6)
    assert len(scores) == 6 and "parent/global" in optuna.get_all_study_names(storage)
    largest = {n: s.largest() for n, s in supernets.items()}
    assert scores[0].choices == largest and scores[0].loss < 1e-10  # the largest student is tried first
    best = choose_global(scores, 0.5)
    assert best.loss <= 0.5 and best.macs == min(sc.macs for sc in scores if sc.loss <= 0.5)


def test_supernet_training_lowers_the_block_loss_of_small_subnets(tiny_unet):
    teacher = tiny_unet
    supernets = build_supernets(teacher, _space(teacher, widths=(0.5, 1.0)))
    x, t = _inputs(teacher, n=8, seed=3)
    _, val = record_teacher_blocks(teacher, x, t, list(supernets))

    def small_loss():
        return sum(
            score_candidate(s, s.smallest() if s.smallest().layers else BlockChoice(1, 0.5, False), [val[n]]).loss
            for n, s in supernets.items()
        )

    before = small_loss()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    losses = train_supernets(
        teacher,
        supernets,
        lambda n: (torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 1000, (n,), generator=g)),
        iterations=25,
        batch_size=8,
        lr=3e-3,
        subnets_per_step=3,
    )
    assert len(losses) == 25 and all(v == v for v in losses)
    assert small_loss() < before
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())  # the teacher is untouched


def test_assembled_student_inherits_the_supernet_weights_and_round_trips(tiny_unet, tmp_path):
    teacher = tiny_unet
    supernets = build_supernets(teacher, _space(teacher, widths=(0.5, 1.0)))
    with torch.no_grad():  # move the shared weights away from the teacher's
        for s in supernets.values():
            for p in s.parameters():
                p.add_(0.01 * torch.randn_like(p))
    choices = {
        "down.0": BlockChoice(1, 0.5, False),
        "down.1": BlockChoice(1, 1.0, False),
        "mid": BlockChoice(1, 0.5, True),
        "up.0": BlockChoice(1, 0.5, True),
        "up.1": BlockChoice(0, 1.0, False),
    }
    student, config = assemble_student(teacher, supernets, choices)
    assert config["_class_name"] == "StudentUNet2DModel"
    assert config["resnet_widths"] == {
        "down.0.resnets.0": 4,
        "mid.resnets.0": 8,
        "mid.resnets.1": 0,
        "up.0.resnets.0": 8,
        "up.0.resnets.1": 0,
        "up.1.resnets.0": 0,
        "up.1.resnets.1": 0,
    }
    assert config["skip_attentions"] == ["down.1.attentions.0", "up.0.attentions.1"]
    composite = plug_supernets(teacher, supernets)
    for name, supernet in supernets.items():
        supernet.set(choices.get(name, supernet.largest()))
    x, t = _inputs(teacher)
    with torch.no_grad():
        assert (student(x, t).sample - composite(x, t).sample).abs().max() < 1e-5
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())

    student.save_pretrained(tmp_path / "student")
    loaded = StudentUNet2DModel.from_pretrained(tmp_path / "student")
    assert loaded.config.resnet_widths == config["resnet_widths"]
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, student(x, t).sample)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [("linear", [1.0, 0.75, 0.5, 0.25, 0.0]), ("cosine", [1.0, 0.8536, 0.5, 0.1464, 0.0]), ("static", [1.0] * 5)],
)
def test_joint_weight_follows_its_schedule(schedule, expected):
    weight = JointWeight(schedule, 1.0, 0.0)
    assert [round(weight(s, 5), 4) for s in range(5)] == expected
    assert JointWeight("linear", 0.8, 0.2)(0, 10) == 0.8 and JointWeight("linear", 0.8, 0.2)(9, 10) == pytest.approx(0.2)


def test_joint_loss_mixes_block_and_output_terms_and_reaches_every_block(tiny_unet):
    teacher = tiny_unet
    student, _ = assemble_student(teacher, build_supernets(teacher, _space(teacher)), {"up.1": BlockChoice(1, 0.5, False)})
    student.requires_grad_(True)
    x, t = _inputs(teacher)
    loss_fn = JointLoss(teacher, JointWeight("linear", 1.0, 0.0), total=3)
    first = loss_fn(student, (x, t, torch.zeros_like(x)), 0)
    assert loss_fn.last["w"] == 1.0 and first.item() == pytest.approx(loss_fn.last["features"], rel=1e-5)
    first.backward()
    assert student.down_blocks[0].resnets[0].conv1.weight.grad.abs().sum() > 0
    last = loss_fn(student, (x, t, torch.zeros_like(x)), 2)
    assert loss_fn.last["w"] == 0.0 and last.item() == pytest.approx(loss_fn.last["output"], rel=1e-5)


def test_search_space_errors_name_file_key_and_value(tiny_unet, tmp_path):
    def check(blocks, match):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({"family": "supernet", "blocks": blocks}))
        with pytest.raises(UserError, match=match):
            load_search_space(path).validate_for(tiny_unet)

    check({"down.5": {"layers": [1]}}, r"blocks\.down\.5: unknown block")
    check({"down.0": {"layers": [2]}}, r"blocks\.down\.0\.layers: 2 is more than the block's 1 resnets")
    check({"down.0": {"width": [0.3]}}, r"blocks\.down\.0\.width: 0\.3 .*norm group")
    check({"down.0": {"width": [1.5]}}, r"blocks\.down\.0\.width\[0\]")
    check({"down.0": {"attention": [True]}}, r"blocks\.down\.0\.attention: true, but .* no attention")
    check({"down.0": {"depth": [1]}}, r"down\.0\.depth")


@pytest.fixture
def diffnas_study(study_factory, tiny_supernet_space, tmp_path, capsys):
    space = tiny_supernet_space  # and up.0's depth and attention
    blocks = yaml.safe_load(space.read_text())
    blocks["blocks"]["up.0"] = {"layers": [1, 2], "attention": [True, False]}
    space.write_text(yaml.safe_dump(blocks))
    config = study_factory(
        name="tinynas",
        method="diffnas",
        search_space=str(space),
        n_trials=3,
        budgets={
            "train_iterations": 3,
            "batch_size": 4,
            "lr": 0.001,
            "fid_samples": 16,
            "sampling_steps": 2,
            "latency_repeats": 1,
            "latency_batch_size": 2,
        },
        method_options={
            "pool_size": 16,
            "pool_steps": 4,
            "supernet_iterations": 3,
            "search_samples": 8,
            "tolerance_low": 0.001,
            "tolerance_high": 1.0,
            "retrain_iterations": [0, 2],
        },
    )
    code = main(["run", str(config), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return config, f"sqlite:///{tmp_path / 'study.db'}"


def test_diffnas_study_records_choices_and_exports_loadable_students(diffnas_study, tmp_path, capsys):
    config, storage = diffnas_study
    names = set(optuna.get_all_study_names(storage))
    assert {"tinynas", "tinynas/block/down.0", "tinynas/block/up.1", "tinynas/block/mid"} <= names
    assert (tmp_path / "runs" / "tinynas" / "diffnas_supernets.safetensors").is_file()
    study = optuna.load_study(study_name="tinynas", storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete
    fingerprints = [t.user_attrs[TrialAttr.FINGERPRINT] for t in complete]
    assert len(set(fingerprints)) == len(fingerprints)  # same student and budget: pruned, not retrained
    trial = complete[-1]
    attrs = trial.user_attrs
    assert set(attrs[DiffNASAttr.BLOCK_CHOICES]) == set(block_names_of(attrs[TrialAttr.MODEL_CONFIG]))
    assert attrs[DiffNASAttr.RETRAIN_ITERATIONS] in (0, 2) and attrs[DiffNASAttr.SEARCH] == "local"
    assert attrs[TrialAttr.MODEL_CONFIG]["_class_name"] == "StudentUNet2DModel"
    assert main(["status", "--storage", storage]) == 0  # the block studies do not hide the only study
    assert "tinynas" in capsys.readouterr().out
    out_dir = tmp_path / "export"
    assert main(["export", "--storage", storage, "--study-name", "tinynas", "--trial", str(trial.number), "--out", str(out_dir)]) == 0
    (call,) = printed_load_calls(capsys.readouterr().out)
    assert "trust_remote_code=True" in call
    seen = sample_without_automl_diff(call, cwd=tmp_path)
    assert seen["unet"] == "StudentUNet2DModel" and seen["shape"] == [2, 16, 16, 1] and not seen["imported"]
    import diffusers  # noqa: F401 - the printed call names it

    pipe = eval(call)
    assert type(pipe.unet).__name__ == "StudentUNet2DModel"
    card = (out_dir / "README.md").read_text()
    assert "DiffNAS chose one subnet per teacher block" in card and "`up.1`" in card
    assert pipe.unet.config.resnet_widths == attrs[TrialAttr.MODEL_CONFIG]["resnet_widths"]
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 1)

    # a resumed run reuses the supernets and the block studies, and only adds trials
    before = len(optuna.load_study(study_name="tinynas/block/up.1", storage=storage).trials)
    cache = tmp_path / "runs" / "tinynas" / "diffnas_supernets.safetensors"
    stamp = cache.stat().st_mtime_ns
    assert main(["run", str(config), "--quiet", "--n-trials", "4"]) == 0, capsys.readouterr().err
    assert cache.stat().st_mtime_ns == stamp
    assert len(optuna.load_study(study_name="tinynas/block/up.1", storage=storage).trials) == before


def block_names_of(config: dict) -> list[str]:
    levels = len(config["block_out_channels"])
    return [f"down.{i}" for i in range(levels)] + ["mid"] + [f"up.{i}" for i in range(levels)]


def test_global_mode_study_and_option_errors(study_factory, tmp_path, capsys):
    space = tmp_path / "supernet.yaml"
    space.write_text(yaml.safe_dump({"family": "supernet", "blocks": {"up.1": {"layers": [1, 2], "width": [0.5, 1.0]}}}))
    common = dict(
        name="tinyglobal",
        method="diffnas",
        search_space=str(space),
        n_trials=1,
        budgets={
            "train_iterations": 1,
            "batch_size": 4,
            "fid_samples": 16,
            "sampling_steps": 2,
            "latency_repeats": 1,
            "latency_batch_size": 2,
        },
    )
    options = {
        "pool_size": 8,
        "pool_steps": 3,
        "supernet_iterations": 2,
        "search_samples": 4,
        "search": "global",
        "global_trials": 4,
        "block_cost": "latency",
    }
    config = study_factory(**common, method_options=options)
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    search = optuna.load_study(study_name="tinyglobal/global", storage=storage)
    assert len(search.trials) == 4 and search.metric_names == ["latency", "loss"]
    assert all(t.values[0] == t.user_attrs[BlockSearchAttr.LATENCY] > 0 for t in search.trials)
    trial = optuna.load_study(study_name="tinyglobal", storage=storage).best_trials[0]
    assert trial.user_attrs[DiffNASAttr.SEARCH] == "global" and trial.user_attrs[DiffNASAttr.BLOCK_COST] == "latency"
    assert json.dumps(trial.user_attrs[DiffNASAttr.BLOCK_CHOICES])

    for options, match in [
        ({"tolerance_low": 0.5, "tolerance_high": 0.1}, "tolerance_low: must be below"),
        ({"retrain_iterations": [10, "x"]}, r"retrain_iterations\[1\]"),
        ({"joint_schedule": "step"}, "joint_schedule"),
        ({"block_cost": "flops"}, "block_cost"),
        ({"data_weight": 0.5}, "data_weight: needs source: dataset"),
    ]:
        config = study_factory(**common, method_options=options)
        assert main(["run", str(config)]) == 2
        err = capsys.readouterr().err
        assert match.split(":")[0].replace("\\", "") in err and "Traceback" not in err
    dkdm_space = study_factory(**{**common, "search_space": str(tmp_path / "space.yaml")})
    assert main(["run", str(dkdm_space)]) == 2
    assert "family" in capsys.readouterr().err


def test_ddpm_cifar10_search_space_and_study_fit_its_architecture():
    """google/ddpm-cifar10-32's architecture with random weights: every declared candidate of every
    block keeps the block's output shapes, and the GPU study config validates."""
    from diffusers import UNet2DModel

    from automl_diff.config.study import load_study_config
    from tests.conftest import REPO
    from tests.test_macs import DDPM_CIFAR10

    torch.manual_seed(0)
    unet = UNet2DModel(**DDPM_CIFAR10).eval()
    space = load_search_space(REPO / "search_spaces" / "ddpm_cifar10.yaml")
    space.validate_for(unet)
    supernets = build_supernets(unet, space)
    x = torch.randn(1, 3, 32, 32)
    _, recorded = record_teacher_blocks(unet, x, torch.tensor([500]), list(supernets))
    n = 0
    with torch.no_grad():
        for name, supernet in supernets.items():
            data = recorded[name]
            shapes = [o.shape for o in iter_tensors(data.output)]
            for choice in supernet.candidates():
                assert [o.shape for o in iter_tensors(supernet.set(choice)(*data.args, **data.kwargs))] == shapes, (name, choice)
                n += 1
    assert n == sum(len(s.candidates()) for s in supernets.values()) > 100
    smallest, config = assemble_student(unet, supernets, {k: s.smallest() for k, s in supernets.items()})
    assert count_params(smallest) < 0.5 * count_params(unet)
    study = load_study_config(REPO / "studies" / "diffnas_ddpm_cifar10.yaml")
    assert study.method == "diffnas" and study.method_options.retrain_iterations == (10000, 20000)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
