"""Cheaper searches: teacher-initialised students, early stopping at rungs, data-parallel trials."""

from __future__ import annotations

import dataclasses
import json

import optuna
import pytest
import torch
from diffusers import UNet2DConditionModel

from automl_diff.config.search_space import load_search_space
from automl_diff.config.study import PrunerSettings, load_study_config
from automl_diff.methods import Rungs
from automl_diff.methods.base import TrainAttr
from automl_diff.methods.diffnas.method import DiffNASAttr
from automl_diff.methods.dkdm import DKDM
from automl_diff.methods.dkdm.method import DKDMAttr
from automl_diff.models.inherit import channel_plan, cut, cut_resnet, inherit_from_teacher
from automl_diff.models.loading import load_teacher, unet_from_config
from automl_diff.records import TrialAttr
from automl_diff.runners import run_study
from automl_diff.runners.pruning import MOASHA, non_dominated_fronts, rank_order
from tests.conftest import TINY_BUDGETS, TINY_COND_UNET

# --- teacher-initialised students ---------------------------------------------------------------


def _relative_error(a: torch.nn.Module, b: torch.nn.Module, **kwargs) -> float:
    torch.manual_seed(0)
    x, t = torch.randn(6, a.config.in_channels, 16, 16), torch.randint(0, 1000, (6,))
    with torch.no_grad():
        ya, yb = a(x, t, **kwargs).sample, b(x, t, **kwargs).sample
    return ((ya - yb).norm() / ya.norm()).item()


@pytest.fixture(scope="module")
def digits():
    return load_teacher("digits").unet


@pytest.fixture(scope="module")
def digits_space():
    return load_search_space("search_spaces/digits_dkdm.yaml")


def _student(space, teacher, **params):
    full = {"down.0.channels": 32, "down.1.channels": 64, "down.2.channels": 64, "down.1.layers": 1, "down.2.layers": 1}
    full.update({"down.2.attention": True, "mid.attention": True}, **params)
    torch.manual_seed(1)
    return unet_from_config(space.to_config(full, dict(teacher.config)), where="test")


def test_a_student_of_the_teachers_architecture_inherits_it_exactly(digits, digits_space):
    student = _student(digits_space, digits)
    inherited = inherit_from_teacher(student, digits)
    assert inherited.fraction == 1.0 and inherited.tensors == inherited.total_tensors
    assert _relative_error(digits, student) < 1e-5


def test_a_narrower_student_keeps_the_most_important_channels_consistently(digits, digits_space):
    narrow = {"down.0.channels": 16, "down.1.channels": 32, "down.2.channels": 32}
    student, random = _student(digits_space, digits, **narrow), _student(digits_space, digits, **narrow)
    inherited = inherit_from_teacher(student, digits)
    assert inherited.fraction == 1.0  # every tensor is a cut of the teacher's
    assert _relative_error(digits, student) < 0.8 < _relative_error(digits, random)
    # the kept channels of level 0 are the ones with the largest summed L1 filter norms: the
    # student's conv_in is exactly those rows of the teacher's
    rows = [i for i in range(32) if any(torch.equal(digits.conv_in.weight[i], w) for w in student.conv_in.weight)]
    assert len(rows) == 16
    assert torch.equal(student.down_blocks[0].resnets[0].norm1.weight, digits.down_blocks[0].resnets[0].norm1.weight[rows])


def test_layers_the_teacher_lacks_keep_their_init(digits, digits_space):
    student = _student(digits_space, digits, **{"down.1.layers": 2})
    before = student.down_blocks[1].resnets[1].conv1.weight.clone()
    inherited = inherit_from_teacher(student, digits)
    assert 0.7 < inherited.fraction < 1.0
    assert torch.equal(student.down_blocks[1].resnets[1].conv1.weight, before)  # new layer: random
    assert torch.equal(student.down_blocks[1].resnets[0].conv1.weight, digits.down_blocks[1].resnets[0].conv1.weight)
    # the up block's last resnet (the skip from the level below) is the teacher's last one
    assert torch.equal(student.up_blocks[1].resnets[2].conv1.weight, digits.up_blocks[1].resnets[1].conv1.weight)


def test_text_conditioned_students_inherit_heads_and_transformers():
    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**TINY_COND_UNET).eval()
    config = {**dict(teacher.config), "block_out_channels": [8, 8]}
    student = UNet2DConditionModel.from_config(config)
    inherited = inherit_from_teacher(student, teacher)
    assert inherited.fraction == 1.0
    plan = channel_plan(student)
    assert any(name.endswith("attn2.to_k.weight") and dims[1][0][0] == "context" for name, dims in plan.items())
    context = torch.randn(6, 3, TINY_COND_UNET["cross_attention_dim"])
    same = UNet2DConditionModel.from_config(dict(teacher.config))
    inherit_from_teacher(same, teacher)
    assert _relative_error(teacher, same, encoder_hidden_states=context) < 1e-5


def test_cut_resnet_keeps_the_chosen_inner_channels(digits):
    import copy

    source = torch.arange(24.0).view(4, 6)
    assert torch.equal(cut(source, [torch.tensor([0, 2]), slice(0, 3)]), source[[0, 2]][:, :3])
    resnet = copy.deepcopy(digits.down_blocks[1].resnets[0])
    keep = torch.tensor([1, 5, 9, 12, 30, 41, 50, 60])
    cut_resnet(resnet, keep)
    assert resnet.conv1.out_channels == 8 and resnet.conv2.in_channels == 8
    full = digits.down_blocks[1].resnets[0]
    assert torch.equal(resnet.conv1.weight, full.conv1.weight[keep]) and torch.equal(resnet.norm2.bias, full.norm2.bias[keep])
    assert torch.equal(resnet.conv2.weight, full.conv2.weight[:, keep]) and torch.equal(resnet.conv2.bias, full.conv2.bias)
    assert torch.equal(resnet.time_emb_proj.weight, full.time_emb_proj.weight[keep])


# --- early stopping ----------------------------------------------------------------------------------


def test_non_dominated_sorting_and_ranking():
    points = [(1, 5), (2, 2), (3, 3), (4, 1), (5, 5)]
    assert non_dominated_fronts(points) == [0, 0, 1, 0, 2]
    order = rank_order(points)
    assert order[-1] == 4 and set(order[:3]) == {0, 1, 3}


def test_mo_asha_stops_a_dominated_trial_and_records_why():
    study = optuna.create_study(directions=["minimize", "minimize"])
    settings = PrunerSettings(name="mo_asha", rungs=(0.5,), reduction_factor=2, min_trials=3)
    for macs, score in ((100, 0.1), (200, 0.05)):
        trial = study.ask()
        MOASHA(settings, trial, lambda m, macs=macs: macs)(0, 5, score, None)
        study.tell(trial, [macs, score])
    hopeless = study.ask()
    with pytest.raises(optuna.TrialPruned, match="stopped at rung 0"):
        MOASHA(settings, hopeless, lambda m: 300)(0, 5, 0.2, None)
    attrs = hopeless.study.trials[-1].user_attrs
    assert attrs[TrialAttr.PRUNED_AT_RUNG] == 0 and attrs[TrialAttr.RUNG_SCORES] == {"0": 0.2}
    assert attrs[TrialAttr.RUNG_MACS] == 300 and "held-out loss 0.2" in attrs[TrialAttr.PRUNE_REASON]
    # a trial on the rung's front goes on, however many trials are ahead of it
    MOASHA(settings, study.ask(), lambda m: 50)(0, 5, 0.9, None)


def test_a_study_with_the_pruner_records_stopped_trials_off_the_front(study_factory, monkeypatch, capsys, tmp_path):
    from automl_diff.cli import main
    from automl_diff.evaluation import Evaluator

    # every student the same MACs at the rungs: a later trial with a worse score is dominated
    monkeypatch.setattr(Evaluator, "macs", lambda self, unet: 1000)
    scores = iter(float(i) for i in range(1, 100))
    monkeypatch.setattr("automl_diff.methods.dkdm.method.held_out_loss", lambda model, batch: next(scores))
    path = study_factory(
        n_trials=3,
        budgets={**TINY_BUDGETS, "train_iterations": 8},
        pruner={"name": "mo_asha", "rungs": [0.25, 0.5], "reduction_factor": 100, "min_trials": 2},
    )
    study = run_study(load_study_config(path))
    states = [t.state for t in study.trials]
    assert states[0] == optuna.trial.TrialState.COMPLETE
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED and TrialAttr.PRUNE_REASON in t.user_attrs]
    assert pruned, states
    assert all(t.user_attrs[TrialAttr.PRUNED_AT_RUNG] == 0 for t in pruned)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    # a stopped trial has no final values and never reaches the front the commands print
    assert all(t.values is None for t in pruned)
    assert main(["pareto", "--json", "--storage", storage, "--study-name", "tiny"]) == 0
    front = {row["trial"] for row in json.loads(capsys.readouterr().out)}
    assert front and front.isdisjoint(t.number for t in pruned)
    assert main(["trials", "--storage", storage, "--study-name", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "pruned" in out and "stopped at rung 0 (iteration 2)" in out
    report = tmp_path / "report.html"
    assert main(["report", "--storage", storage, "--study-name", "tiny", "--out", str(report), "--samples", "0"]) == 0
    assert "Trials stopped early" in report.read_text()


def test_pruner_config_errors_name_the_key(study_factory, capsys):
    from automl_diff.cli import main

    for pruner, message in (
        ({"name": "hyperband"}, "pruner.name"),
        ({"name": "mo_asha", "rungs": [0.5, 0.2]}, "pruner.rungs: must be increasing"),
        ({"name": "mo_asha", "rungs": [1.5]}, "pruner.rungs"),
        ({"name": "mo_asha", "reduction_factor": 1}, "pruner.reduction_factor: must be above 1"),
    ):
        assert main(["run", str(study_factory(pruner=pruner))]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


# --- data-parallel trials ----------------------------------------------------------------------------


def _flat_close(one: torch.nn.Module, two: torch.nn.Module, lr: float, iterations: int) -> None:
    """Two trainings of one model on the same global batches reached the same weights."""
    state_one, state_two = one.state_dict(), two.state_dict()
    assert state_one.keys() == state_two.keys()
    flat_one = torch.cat([v.flatten() for v in state_one.values()])
    flat_two = torch.cat([state_two[k].flatten() for k in state_one])
    # the same model within float noise, except that Adam divides each step by the gradient's own
    # size: a bias whose gradient is zero up to rounding (a conv before a one-channel norm group)
    # moves by up to the learning rate either way, so single entries may differ by a few steps' lr
    assert ((flat_two - flat_one).norm() / flat_one.norm()).item() < 1e-3
    assert (flat_two - flat_one).abs().max().item() <= 2 * lr * iterations


def _ranks(folder) -> list[dict]:
    import json

    return [json.loads((folder / f"rank-{r}.json").read_text()) for r in range(2)]


def train_in_one_and_two_processes(study_factory, tmp_path, *, launcher: str) -> tuple:
    """One DKDM trial (6 steps, a rung at half) trained in one process, then over two ranks that
    ``launcher`` starts, from the same teacher, batches and seed. Returns the config, the
    two-rank run's method, and ``{processes: (candidate, rung reports)}``."""
    path = study_factory(
        budgets={**TINY_BUDGETS, "train_iterations": 6},
        method_options={"pool_size": 16, "pool_steps": 5, "ema_decay": 0.9, "init": "random"},
        pruner={"name": "mo_asha", "rungs": [0.5]},
    )
    config = load_study_config(path)
    teacher = load_teacher(config.teacher)
    params = {"down.0.channels": 4, "down.1.channels": 8, "down.1.layers": 2, "down.1.attention": True}
    outcome = {}
    for processes in (1, 2):
        execution = dataclasses.replace(config.execution, processes_per_trial=processes, launcher=launcher)
        method = DKDM.from_config(dataclasses.replace(config, execution=execution), teacher)
        method.prepare(tmp_path / f"p{processes}")
        reported: list[tuple[int, int, float]] = []
        candidate = method.run_trial(params, rungs=Rungs((0.5,), lambda k, it, score, model, into=reported: into.append((k, it, score))))
        outcome[processes] = (candidate, reported)
    return config, method, outcome


@pytest.mark.slow
def test_two_gloo_processes_train_what_one_process_trains(study_factory, tmp_path):
    """``execution.processes_per_trial: 2`` trains over torchrun and gloo: the same losses, rung
    scores, weights and pool counters as one process on the same global batch, each rank on its
    own half of every batch, in a world of the size asked for."""
    config, method, outcome = train_in_one_and_two_processes(study_factory, tmp_path, launcher="torchrun")
    first = method.inputs.batches(config.seed)(config.budgets.batch_size).x  # trial 0's first global batch
    (one, one_rungs), (two, two_rungs) = outcome[1], outcome[2]
    assert two.attrs[TrainAttr.TRAIN_PROCESSES] == 2 and one.attrs[TrainAttr.TRAIN_PROCESSES] == 1
    for key in (TrainAttr.TRAIN_LOSS_FIRST, TrainAttr.TRAIN_LOSS_LAST):
        assert two.attrs[key] == pytest.approx(one.attrs[key], rel=1e-4, abs=1e-6)
    # the pool's counters come back from the workers: every label and finished trajectory counted once
    for key in (DKDMAttr.TEACHER_EVALUATIONS, DKDMAttr.POOL_TRAJECTORIES_COMPLETED):
        assert two.attrs[key] == one.attrs[key]
    assert two.attrs[DKDMAttr.TEACHER_EVALUATIONS] == 6 * config.budgets.batch_size
    assert [r[:2] for r in two_rungs] == [r[:2] for r in one_rungs] == [(0, 3)]
    assert two_rungs[0][2] == pytest.approx(one_rungs[0][2], rel=1e-4)
    _flat_close(one.unet, two.unet, config.budgets.lr, config.budgets.train_iterations)
    # each rank saw a world of two and trained on its own half of every global batch
    ranks = _ranks(tmp_path / "p2" / "ddp" / "trial_0")
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    half = config.budgets.batch_size // 2
    assert [r["samples"] for r in ranks] == [6 * half, 6 * half]
    assert ranks[0]["shard_sums"][0] == pytest.approx(first[:half].double().sum().item(), rel=1e-6)
    assert ranks[1]["shard_sums"][0] == pytest.approx(first[half:].double().sum().item(), rel=1e-6)


@pytest.mark.slow
def test_diffnas_trains_its_supernets_and_retrains_data_parallel(tiny_teacher_dir, tiny_supernet_space, tmp_path):
    """DiffNAS with two processes: supernet training and joint-loss retraining over torchrun give
    the losses and weights of one process on the same global batches."""
    from automl_diff.methods.diffnas import DiffNAS
    from tests.conftest import write_study

    options = {"pool_size": 16, "pool_steps": 5, "supernet_iterations": 3, "search_samples": 8, "retrain_iterations": [4]}
    path = write_study(tmp_path, tiny_teacher_dir, tiny_supernet_space, method="diffnas", method_options=options)
    config = load_study_config(path)
    teacher = load_teacher(config.teacher)
    outcome = {}
    for processes in (1, 2):
        run = dataclasses.replace(config, execution=dataclasses.replace(config.execution, processes_per_trial=processes))
        method = DiffNAS.from_config(run, teacher)
        method.prepare(tmp_path / f"p{processes}")
        outcome[processes] = (method, method.run_trial({"tolerance": 0.05}))
    (m1, one), (m2, two) = outcome[1], outcome[2]
    for key in (DiffNASAttr.SUPERNET_LOSS_FIRST, DiffNASAttr.SUPERNET_LOSS_LAST, TrainAttr.TRAIN_LOSS_FIRST, TrainAttr.TRAIN_LOSS_LAST):
        assert two.attrs[key] == pytest.approx(one.attrs[key], rel=1e-4, abs=1e-7), key
    assert two.attrs[DiffNASAttr.BLOCK_CHOICES] == one.attrs[DiffNASAttr.BLOCK_CHOICES]
    assert two.attrs[TrainAttr.TRAIN_PROCESSES] == 2 and one.attrs[TrainAttr.TRAIN_PROCESSES] == 1
    for name in m1.supernets:
        _flat_close(m1.supernets[name], m2.supernets[name], 1e-3, 3)
    _flat_close(one.unet, two.unet, config.budgets.lr, 4)
    half = config.budgets.batch_size // 2
    for job, steps in (("supernets", 3), ("trial_0", 4)):
        ranks = _ranks(tmp_path / "p2" / "ddp" / job)
        assert [r["world_size"] for r in ranks] == [2, 2] and [r["samples"] for r in ranks] == [steps * half] * 2
        assert ranks[0]["shard_sums"][0] != ranks[1]["shard_sums"][0]


_FAIL_RANK_1_ONCE = """
def _patch(module):
    import os
    fit = module.fit
    marker = Path({marker!r})

    def failing_fit(*args, **kwargs):
        if os.environ.get("RANK") == "1" and not marker.exists():
            marker.write_text("failed")
            raise RuntimeError("rank 1 lost its device")
        return fit(*args, **kwargs)

    module.fit = failing_fit
"""


@pytest.mark.slow
def test_a_failing_rank_fails_its_trial_and_the_study_goes_on(study_factory, tmp_path):
    """Rank 1 of the first trial's data-parallel job raises: that trial fails with the rank's
    error as its reason, without a traceback, and the next trial completes."""
    import subprocess
    import sys

    from tests.conftest import patched_dkdm_env

    config = study_factory(execution={"processes_per_trial": 2}, method_options={"pool_size": 16, "pool_steps": 5, "init": "random"})
    patch = _FAIL_RANK_1_ONCE.format(marker=str(tmp_path / "rank_1_failed"))
    env = patched_dkdm_env(tmp_path / "fail", patch, target="automl_diff.methods.training.loop")
    command = [sys.executable, "-m", "automl_diff.study", "run", str(config), "--quiet"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    reason = trials[0].user_attrs[TrialAttr.FAIL_REASON]
    assert reason.startswith("TrainingFailed: a data-parallel rank failed") and "RuntimeError: rank 1 lost its device" in reason
    assert trials[1].user_attrs[TrainAttr.TRAIN_PROCESSES] == 2
