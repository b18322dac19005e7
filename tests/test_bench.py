"""The benchmark command on a tiny teacher: every row runs, is measured the same way, and its
section of BENCHMARKS.md is rewritten in place."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import replace

import pytest
import torch

from automl_diff.bench import PRESETS, BenchPreset
from automl_diff.bench.__main__ import main as bench_main
from automl_diff.bench.presets import Goal, bench_evaluation
from automl_diff.bench.report import markdown, write_section
from automl_diff.bench.run import run_bench
from automl_diff.bench.session import BenchResult
from automl_diff.metrics.intervals import across_sets, paired_across_sets

pytest.importorskip("torch_pruning")
pytest.importorskip("DeepCache")


@pytest.fixture
def tiny_preset(tiny_teacher_dir, tiny_space, tiny_supernet_space):
    return BenchPreset(
        name="tiny",
        teacher=str(tiny_teacher_dir),
        evaluation=bench_evaluation(
            steps=4, fid_samples=16, fid_batch_size=16, fid_dataset="digits", fid_features="digits", latency_batch_size=2, latency_repeats=2
        ),
        fid_sets=3,
        latency_batches=(1,),
        batch_size=4,
        pool_size=8,
        pool_steps=3,
        dkdm_space=str(tiny_space),
        dkdm_params={"down.0.channels": 4, "down.1.channels": 8, "down.1.layers": 1, "down.1.attention": False},
        dkdm_iterations=2,
        diffnas_space=str(tiny_supernet_space),
        supernet_iterations=2,
        subnets_per_step=2,
        search_samples=4,
        max_ratio=1.0,
        diffnas_block_cost="latency",
        retrain_iterations=2,
        prune_ratios=(0.25, 0.5),
        dipgo={"granularity": "layer", "target_macs_ratio": 0.5, "reference_images": 2, "warmup": 0.0, "sparsity_weight": 5.0},
        dipgo_iterations=3,
        dipgo_batch=2,
        dipgo_lr=0.05,
        dipgo_budgets=(0.5, 0.3),
        stacked_dipgo={"unit_cost": "latency"},
        dipgo_weights_batch=1,
        deepcache_intervals=(2, 3),
        device="cpu",
    )


def test_bench_measures_every_method_and_peer_side_by_side(tiny_preset, tmp_path):
    from automl_diff.metrics.macs import executed_macs
    from automl_diff.models.loading import load_teacher

    lines: list[str] = []
    result = run_bench(tiny_preset, log=lines.append)
    rows = {row.name: row for row in result.rows}
    assert result.rows[0].name == "teacher"
    assert {"DKDM student", "DiffNAS student", "Torch-Pruning peer", "DeepCache peer"} <= set(rows)
    dipgo = [r for r in result.rows if r.name.startswith("DiP-GO")]
    stacked = [r for r in result.rows if r.kind == "stacked"]
    assert dipgo and stacked
    teacher, student = rows["teacher"], rows["DiffNAS student"]
    # the teacher's trajectory is its steps times one forward pass, counted apart from the sampler
    unet = load_teacher(tiny_preset.teacher).unet
    one_call = executed_macs(lambda: unet(torch.zeros(1, 1, 16, 16), torch.tensor([10])))
    assert teacher.trajectory_macs == tiny_preset.steps * one_call
    for row in result.rows:
        assert row.fid.low <= row.fid.value <= row.fid.high and row.fid.high > row.fid.low
        assert math.isfinite(row.kid.mean) and row.kid.std > 0
        assert set(row.latency) == {1, 2} and all(s.q1 <= s.median <= s.q3 and s.median > 0 for s in row.latency.values())
    # every row is compared with the teacher on the same noise
    assert teacher.versus_teacher is None and all(r.versus_teacher is not None for r in result.rows[1:])
    # one FID per evaluation seed, the row's FID their mean; paired set by set
    assert tiny_preset.eval_seeds == (1, 2, 3) and all(len(row.fid_sets) == 3 for row in result.rows)
    assert len(set(teacher.fid_sets)) == 3, "each set has its own noise"
    # (the intervals' arithmetic is tested in test_intervals.py; here, that each row pairs its own
    # sets with the teacher's, in order)
    for row in result.rows:
        assert row.fid == across_sets(row.fid_sets)
    for row in result.rows[1:]:
        difference, ratio = paired_across_sets(row.fid_sets, teacher.fid_sets)
        assert (row.versus_teacher.difference, row.versus_teacher.ratio) == (difference, ratio)
    # the peers are compared with the rows they were matched to, both ways
    assert [c.other for c in rows["Torch-Pruning peer"].versus_peers] == ["DiffNAS student"]
    assert [c.other for c in student.versus_peers] == ["Torch-Pruning peer"]
    deepcache = rows["DeepCache peer"]
    (matched,) = deepcache.versus_peers
    assert matched.other in {r.name for r in dipgo} and deepcache.name in [c.other for c in rows[matched.other].versus_peers]
    # fewer steps: n of the sampler's calls computed, the rest skipped whole, matched to the same schedule as DeepCache
    fewer = rows["Fewer steps peer"]
    n = int(fewer.notes.split()[0])
    assert fewer.trajectory_macs == n * one_call and [c.other for c in fewer.versus_peers] == [matched.other]
    assert [c.other for c in rows[matched.other].versus_peers] == ["DeepCache peer", "Fewer steps peer"]
    # schedules skip work: fewer executed MACs than the model they gate
    assert all(r.trajectory_macs < teacher.trajectory_macs for r in dipgo) and deepcache.trajectory_macs < teacher.trajectory_macs
    assert all(r.trajectory_macs < student.trajectory_macs for r in stacked)
    # search cost: the stacked run's includes the student's, which includes the shared pool's warm-up
    assert result.details["pool_seconds"] > 0 and student.search_seconds > result.details["pool_seconds"]
    assert min(r.search_seconds for r in stacked) > student.search_seconds
    assert "fastest candidate within it (timed at batch 2)" in student.notes
    # the real-data floor at the same count, with its interval
    assert result.floor.low <= result.floor.value <= result.floor.high

    text = markdown(result, command="python -m automl_diff.bench --preset tiny")
    assert "| model | params | trajectory MACs | MACs reduction | FID [95%] |" in text and "search cost |" in text
    assert "| model | latency, batch 1 | latency, batch 2 |" in text and "speedup / MACs reduction, batch 2 |" in text
    assert "Goal for the stacked model" in text and result.machine["torch"] in text and "(seeds 1 to 3)" in text
    assert text.count("\n| ") == 2 * (len(result.rows) + 1)

    # a run saved with --json is written again without measuring, to the same section
    import json

    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({**result.to_dict(), "command": "python -m automl_diff.bench --preset tiny"}, default=str))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(PRESETS, "tiny", tiny_preset)
        rendered = tmp_path / "RENDERED.md"
        assert bench_main(["--preset", "tiny", "--render", str(saved), "--out", str(rendered)]) == 0
    assert markdown(result, command="python -m automl_diff.bench --preset tiny") in rendered.read_text()

    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nintro\n\n## Older section\n\nkept\n")
    write_section(out, "tiny", text)
    write_section(out, "tiny", text.replace("Goal for", "GOAL FOR"))
    written = out.read_text()
    assert written.count("automl_diff.bench tiny: begin") == 1 and "GOAL FOR" in written and "Goal for" not in written
    assert written.index("All methods side by side") < written.index("## Older section") and "kept" in written
    # a second preset's section goes beside the first, never inside it, and both survive rewrites
    write_section(out, "other", "## Other preset\n\nfigures\n")
    write_section(out, "tiny", text)
    written = out.read_text()
    assert written.count("## Other preset") == 1 and written.count("automl_diff.bench tiny: begin") == 1
    assert written.index("automl_diff.bench other: end") < written.index("automl_diff.bench tiny: begin")


def test_bench_command_errors_are_one_line(monkeypatch, tiny_preset, capsys):
    from dataclasses import replace

    monkeypatch.setitem(PRESETS, "tiny", replace(tiny_preset, dkdm_space="/nonexistent/space.yaml"))
    assert bench_main(["--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "dkdm_space" in err and "/nonexistent/space.yaml" in err and "Traceback" not in err
    monkeypatch.setitem(PRESETS, "tiny", replace(tiny_preset, teacher="/nonexistent/teacher"))
    assert bench_main(["--preset", "tiny"]) == 2
    assert "teacher" in capsys.readouterr().err
    assert bench_main(["--preset", "tiny", "--out", "/nonexistent/dir/BENCHMARKS.md"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out:") and "/nonexistent/dir/BENCHMARKS.md" in err and "Traceback" not in err


def test_bench_overrides_reach_the_run_and_bad_ones_fail_first(monkeypatch, tiny_preset, capsys):
    """--guidance, --pool-option and --dipgo-option change the preset the rows run with; an
    unknown key or a bad value is one line before anything runs."""
    from automl_diff.bench import run as runner
    from automl_diff.errors import UserError

    monkeypatch.setitem(PRESETS, "tiny", tiny_preset)
    seen = []

    def stop(preset, **kwargs):
        seen.append(preset)
        raise UserError("stopped")

    monkeypatch.setattr(runner, "run_bench", stop)
    argv = ["--preset", "tiny", "--guidance", "3", "--pool-option", "guided_pool=false", "--dipgo-option", "pruner=attention"]
    assert bench_main(argv) == 2 and "stopped" in capsys.readouterr().err
    (preset,) = seen
    assert preset.evaluation.sampling.guidance_scale == 3.0 and preset.pool == {"guided_pool": False}
    assert preset.dipgo == {**tiny_preset.dipgo, "pruner": "attention"}
    for flag, value, key in (("--pool-option", "guided=false", "guided"), ("--dipgo-option", "pruner=transformer", "pruner")):
        assert bench_main(["--preset", "tiny", flag, value]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and key in err and "Traceback" not in err and len(seen) == 1
    assert bench_main(["--preset", "tiny", "--pool-option", "guided_pool"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_fit_their_teachers(name):
    """Each preset's DKDM student is a complete point of its search space and its supernet space
    fits the teacher's architecture (google/ddpm-cifar10-32's, built locally with random weights);
    a text-to-image preset's prompt files name a digit in every prompt."""
    import optuna
    import torch
    from diffusers import UNet2DModel

    from automl_diff.bench.rows import plan
    from automl_diff.config.search_space import load_search_space
    from automl_diff.data import read_prompts
    from automl_diff.metrics.alignment import prompt_labels
    from automl_diff.metrics.macs import count_macs
    from automl_diff.models.loading import load_unet, unet_from_config
    from tests.test_macs import DDPM_CIFAR10

    preset = PRESETS[name]
    torch.manual_seed(0)
    if preset.prompts_eval is not None:
        from automl_diff.models.loading import load_teacher
        from automl_diff.zoo import JUDGES, TEACHERS

        judge = JUDGES[preset.evaluation.judge or TEACHERS[preset.teacher].judge]
        train, evaluate = read_prompts(preset.prompts_train), read_prompts(preset.prompts_eval)
        labels = set(prompt_labels(evaluate, judge))
        assert prompt_labels(train, judge) and (labels == set(range(10)) if judge.name == "digits" else len(labels) == len(evaluate))
        assert not set(train) & set(evaluate)
        loaded = load_teacher(preset.teacher)
        teacher = loaded.unet
        if loaded.classes is not None:  # a class-conditional transformer: DKDM, DiffNAS, DiP-GO and diffusers' caches
            assert set(preset.rows) == {"teacher", "dkdm", "diffnas", "dipgo", "fbcache", "taylorseer"}
            load_search_space(preset.diffnas_space).validate_for(teacher)
            assert [loaded.classes.class_id(name) for name in evaluate] == list(range(10))
            space = load_search_space(preset.dkdm_space)
            space.validate_for(dict(teacher.config))
            assert space.suggest(optuna.trial.FixedTrial(dict(preset.dkdm_params))) == preset.dkdm_params
            student = unet_from_config(space.to_config(preset.dkdm_params, dict(teacher.config)))
            assert count_macs(student).macs <= 0.5 * count_macs(teacher).macs  # the goal's limit
            return
        assert {"dkdm", "dkdm_data", "diffnas", "bk_sdm", "stacked"} <= set(plan(None, preset))
    elif preset.teacher == "digits":
        from automl_diff.zoo.digits import DIGITS_DIR

        teacher = load_unet(DIGITS_DIR)
    else:
        teacher = UNet2DModel(**DDPM_CIFAR10)
    space = load_search_space(preset.dkdm_space)
    space.validate_for(dict(teacher.config))
    assert space.suggest(optuna.trial.FixedTrial(dict(preset.dkdm_params))) == preset.dkdm_params
    student = unet_from_config(space.to_config(preset.dkdm_params, dict(teacher.config)))
    assert count_macs(student).macs < 0.6 * count_macs(teacher).macs
    load_search_space(preset.diffnas_space).validate_for(teacher)


def test_text_to_image_bench_measures_fid_and_prompt_accuracy_with_the_peer(tiny_sd_dir, tmp_path):
    """The digits-t2i preset's rows on the tiny Stable Diffusion pipeline: guided, decoded FID
    and prompt accuracy per set, DiP-GO against DeepCache at matched MACs, the goal with alignment."""
    from dataclasses import replace

    from automl_diff.metrics.macs import executed_macs
    from automl_diff.models.loading import load_teacher

    (tmp_path / "train.txt").write_text("a handwritten seven\nthe digit 2\na three\n")
    (tmp_path / "eval.txt").write_text("the number four\na 1\n")
    (tmp_path / "dkdm.yaml").write_text("family: unet2d_condition\nblocks:\n  down.0: {channels: [4, 8]}\n  down.1: {channels: [8, 16]}\n")
    (tmp_path / "supernet.yaml").write_text(
        "family: supernet\nblocks:\n  down.0: {layers: [0, 1], width: [0.5, 1.0], attention: [true, false]}\n"
        "  up.1: {layers: [1, 2], width: [0.5, 1.0], attention: [true, false]}\n"
    )
    small = "BK-SDM-Small's rule, every down stage emptied"
    preset = replace(
        PRESETS["digits-t2i"],
        name="tiny-t2i",
        teacher=str(tiny_sd_dir),
        evaluation=bench_evaluation(
            steps=4,
            guidance_scale=1.5,
            fid_samples=8,
            fid_batch_size=8,
            fid_dataset="digits",
            fid_features="digits",
            latency_batch_size=2,
            latency_repeats=2,
            images_per_prompt=2,
            alignment="prompt_accuracy",
            judge="digits",
        ),
        fid_sets=2,
        prompts_train=str(tmp_path / "train.txt"),
        prompts_eval=str(tmp_path / "eval.txt"),
        dipgo={"granularity": "layer", "target_macs_ratio": 0.4, "reference_images": 3, "warmup": 0.0, "sparsity_weight": 5.0},
        dipgo_iterations=3,
        dipgo_batch=2,
        dipgo_lr=0.05,
        dipgo_budgets=(0.5, 0.3),
        deepcache_intervals=(2, 3),
        device="cpu",
        batch_size=4,
        pool_size=16,
        pool_steps=4,
        dkdm_space=str(tmp_path / "dkdm.yaml"),
        dkdm_params={"down.0.channels": 4, "down.1.channels": 8},
        dkdm_iterations=3,
        diffnas_space=str(tmp_path / "supernet.yaml"),
        supernet_iterations=2,
        search_samples=8,
        retrain_iterations=3,
        max_ratio=0.9,
        stacked_dipgo_iterations=2,
        compiled=None,  # timed compiled: test_the_bench_times_the_teacher_and_its_schedules_compiled
        bk_sdm_variants=("base", "small"),
        goals=(
            *PRESETS["digits-t2i"].goals,
            Goal(("DiffNAS student", "DKDM student"), against=f"BK-SDM peer ({small})", fid_lower=True),
            Goal("DiP-GO", efficiency=0.01),
        ),
    )
    result = run_bench(preset, log=lambda line: None)
    rows = {row.name: row for row in result.rows}
    assert result.rows[0].kind == "teacher" and "DeepCache peer" in rows
    assert "Torch-Pruning peer" not in rows  # the preset's rows only
    students = (
        "DKDM student",
        "DKDM architecture, trained on the dataset",
        "DiffNAS student",
        "BK-SDM peer (BK-SDM-Base's rule, every down stage emptied)",
        f"BK-SDM peer ({small})",
    )
    assert set(students) <= set(rows) and any(name.startswith("DiffNAS + DiP-GO") for name in rows)
    assert [c.other for c in rows["DKDM student"].versus_peers] == ["DKDM architecture, trained on the dataset"]
    assert [c.other for c in rows["DiffNAS student"].versus_peers] == ["BK-SDM peer (BK-SDM-Base's rule, every down stage emptied)"]
    assert all(rows[name].trajectory_macs < rows["teacher"].trajectory_macs for name in students)
    teacher = rows["teacher"]
    # guided steps: both halves of the UNet per step, nothing of the text encoder or the VAE
    unet = load_teacher(str(tiny_sd_dir)).unet
    guided_call = executed_macs(lambda: unet(torch.zeros(2, 4, 8, 8), torch.tensor([10]), encoder_hidden_states=torch.zeros(2, 24, 12)))
    assert teacher.trajectory_macs == 4 * guided_call
    for row in result.rows:
        assert len(row.alignment_sets) == 2 and all(0 <= a <= 1 for a in row.alignment_sets)
        assert row.alignment.value == pytest.approx(sum(row.alignment_sets) / 2)
    for row in result.rows[1:]:
        c = row.versus_teacher
        assert c.alignment.value == pytest.approx(row.alignment.value - teacher.alignment.value)
    dipgo = [r for r in result.rows if r.name.startswith("DiP-GO")]
    assert dipgo and all(r.trajectory_macs < teacher.trajectory_macs for r in dipgo)
    assert rows["DeepCache peer"].versus_peers[0].other in {r.name for r in dipgo}
    text = markdown(result, command="python -m automl_diff.bench --preset tiny-t2i")
    assert "| prompt_accuracy [95%] | prompt_accuracy - teacher [95%] |" in text
    assert "classifier-free guidance 1.5" in text and "Goal for each method's row" in text
    for goal in preset.goals:  # every goal gets its verdict, with its figures
        assert f"- {goal.describe()}: **" in text
    row, _, figures = result.judge(preset.goals[-2])  # either student may beat the recipe
    assert row.name in {"DiffNAS student", "DKDM student"} and "FID - BK-SDM peer (BK-SDM-Small's" in figures
    assert "DiffNAS student or DKDM student: FID below" in preset.goals[-2].describe()
    _, met, figures = result.judge(preset.goals[-1])
    efficiencies = [result.efficiency(r, preset.latency_batch).q1 for r in result.rows if r.name.startswith("DiP-GO")]
    assert "speedup / MACs reduction" in figures and met == any(q1 >= 0.01 for q1 in efficiencies)
    assert text.count("\n| ") == 2 * (len(result.rows) + 1)


def test_the_bench_times_the_teacher_and_its_schedules_compiled(tiny_preset, monkeypatch):
    """With ``compiled``, the teacher (whole UNet) and every DiP-GO schedule (the first call and the
    plans most calls share in graphs of their own) are timed compiled in the same lockstep rounds,
    warm-ups apart, and each schedule is judged against the compiled teacher; the figures
    survive the JSON. (Dynamo's eager backend: what inductor's
    kernels compute is tests/test_compiled_schedule.py's.)"""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    preset = replace(tiny_preset, compiled=(0.8, 0.7, 3.0), compiled_plan_graphs=2, latency_batches=())
    result = run_bench(preset, rows=["dipgo"], log=lambda _: None)
    teacher, *schedules = result.rows
    assert schedules and all(row.name.startswith("DiP-GO") for row in schedules)
    for row in result.rows:
        assert set(row.compiled) == set(row.latency) == {2} and row.warmup[2] > 0
        assert row.compiled_speedup[2].median > 0
    assert teacher.compiled_speedup[2].median == pytest.approx(1.0)
    text = markdown(result, command="python -m automl_diff.bench --preset tiny --rows dipgo")
    assert "Compiled (`torch.compile`" in text and f"- {schedules[0].name}, compiled: **" in text
    assert "compile=True, plan_graphs=2)" in text
    again = BenchResult.from_dict(json.loads(json.dumps(result.to_dict())), preset)
    assert again.rows[1].compiled == schedules[0].compiled and again.rows[1].warmup == schedules[0].warmup
    met, figures = again.compiled_goal(again.rows[1])
    assert "speedup / MACs reduction at batch 2" in figures and "warm-up at most" in figures


@pytest.mark.parametrize("interval", [2, 3, 4])
def test_the_deepcache_peer_caches_at_its_interval_of_the_samplers_steps(tiny_unet, interval):
    """DeepCache computes its deep branch every ``interval`` sampler steps, whatever the stride of
    the sampler's timesteps (here 100: an index among all training timesteps would make intervals
    2 and 4 compute at every step)."""
    from automl_diff.bench.peers import deepcache
    from automl_diff.sampling import Sampler

    sampler = Sampler({"num_train_timesteps": 1000}, steps=10)
    target = tiny_unet.mid_block.resnets[0]
    calls = []
    hook = target.register_forward_pre_hook(lambda *_: calls.append(1))
    with deepcache(tiny_unet, sampler, interval)():
        sampler.sample(tiny_unet, num_images=1, batch_size=1)
    hook.remove()
    assert len(calls) == math.ceil(10 / interval)
