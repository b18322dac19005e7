"""DiP-GO: gates that really skip work, schedules and their MACs, the pruner, and the study."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from automl_diff.cli import main
from automl_diff.config.options import DiPGOOptions
from automl_diff.errors import UserError
from automl_diff.gating import GateController, Schedule, ScheduleMismatch, apply_schedule, model_fingerprint, prunable_units, unit_costs
from automl_diff.methods.dipgo.method import DiPGOAttr
from automl_diff.methods.dipgo.optimise import CheckpointedSteps, expected_ratio, optimise_pruner, ssim
from automl_diff.methods.dipgo.pruner import PrunerNetwork
from automl_diff.methods.dipgo.weights import UnitWeights
from automl_diff.metrics.macs import executed_macs
from automl_diff.models.blocks import get_block, name_to_module_path
from automl_diff.models.dataflow import UnitGraph
from automl_diff.records import StudyAttr, TrialAttr
from automl_diff.sampling import Prompts, Sampler
from tests.conftest import printed_load_calls, sample_without_automl_diff

SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "clip_sample": True}


def _executed_per_module(unet, *, batch_size=1):
    """Torch's FlopCounterMode per module (``UNet2DModel.down_blocks.0`` ...) over one plain pass, in MACs."""
    from torch.utils.flop_counter import FlopCounterMode

    sample, timestep = torch.zeros(batch_size, unet.config.in_channels, 16, 16), torch.full((batch_size,), 10)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, timestep)
    return {name: sum(ops.values()) // 2 for name, ops in counter.get_flop_counts().items()}


def _executed_outside(unet, units, *, batch_size=1):
    """Executed MACs of a plain pass minus those of the units and, where the last unit feeds it
    alone, of the head (per module, FlopCounterMode)."""
    from automl_diff.gating import HEAD, head_input_atom

    per_module = _executed_per_module(unet, batch_size=batch_size)
    inside = [f"UNet2DModel.{name_to_module_path(u)}" for u in units]
    if head_input_atom(unet, UnitGraph.of(unet, units)) is not None:
        inside += [f"UNet2DModel.{h}" for h in HEAD]
    return per_module["Global"] - sum(per_module.get(m, 0) for m in inside)


def _executed_reused_step(unet, units):
    """MACs that really run at a step where every unit reuses its cache (the call itself runs)."""
    schedule = Schedule(2, tuple(units), (tuple(True for _ in units), tuple(False for _ in units)), model_fingerprint(unet))
    sample = torch.zeros(1, unet.config.in_channels, 16, 16)
    with torch.no_grad(), apply_schedule(unet, schedule) as handle:
        handle.idle_free = False
        unet(sample, torch.tensor([20]))
        return executed_macs(lambda: unet(sample, torch.tensor([10])))


def _schedule(unet, steps: int, off: dict[int, list[str]], granularity: str = "block") -> Schedule:
    units = prunable_units(unet, granularity)
    gates = [[not (i in off and u in off[i]) for u in units] for i in range(steps)]
    return Schedule(steps, tuple(units), tuple(map(tuple, gates)), model_fingerprint(unet))


def test_units_cover_blocks_and_layers(tiny_unet, tiny_cond_unet):
    assert prunable_units(tiny_unet, "block") == ["down.0", "down.1", "mid", "up.0", "up.1"]
    layers = prunable_units(tiny_unet, "layer")
    assert "down.0.downsamplers.0" in layers and "up.0.upsamplers.0" in layers and "mid.attentions.0" in layers
    for name in layers + prunable_units(tiny_cond_unet, "layer"):
        assert get_block(tiny_unet if name in layers else tiny_cond_unet, name) is not None


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_all_gates_on_equals_the_plain_pipeline(tiny_unet, granularity):
    from diffusers import DDIMPipeline, DDIMScheduler

    pipe = DDIMPipeline(unet=tiny_unet, scheduler=DDIMScheduler(**SCHEDULER))
    plain = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    with apply_schedule(pipe, Schedule.full(tiny_unet, 4, granularity)) as handle:
        gated = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
        assert sum(handle.executed.values()) == 4 * len(handle.units)
    assert np.abs(plain - gated).max() <= 1e-6
    assert not hasattr(tiny_unet, "_automl_diff_gates")  # removed on exit


def test_gate_off_skips_the_unit_and_reuses_its_cache(tiny_unet):
    calls = []
    conv = tiny_unet.up_blocks[1].resnets[0].conv1
    conv.register_forward_hook(lambda *_: calls.append(1))
    outputs = {}
    get_block(tiny_unet, "up.1").register_forward_hook(lambda m, a, o: outputs.setdefault("up.1", []).append(o))
    schedule = _schedule(tiny_unet, 3, {1: ["up.1"], 2: ["up.1", "mid"]})
    x = torch.randn(2, 1, 16, 16)
    with apply_schedule(tiny_unet, schedule) as handle, torch.no_grad():
        for t in (900, 500, 100):
            tiny_unet(x, t)
    # the last block reuses its cache at steps 1 and 2, so nothing upstream is read: both idle
    assert handle.executed == {unit: 1 for unit in handle.units}
    assert len(calls) == 1  # the skipped resnet's convolution never ran after step 0
    assert all(o is outputs["up.1"][0] for o in outputs["up.1"])  # the cached tensor, not a recomputation


def _concatenations(run) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func is torch.ops.aten.cat.default
            return func(*args, **(kwargs or {}))

    with Count():
        run()
    return Count.n


@pytest.mark.parametrize("model", ["tiny_unet", "tiny_cond_unet"])
def test_a_cached_up_resnet_skips_its_skip_concatenation(model, request, monkeypatch):
    """Where the dataflow is not known (every gate that is on runs), an up resnet that reuses its
    cache still receives a live input; its skip concatenation is not computed. (Where it is
    known, that input is never read, so it is not computed at all.)"""
    from dataclasses import replace

    from diffusers.hooks import HookRegistry

    from automl_diff.gating import hooks as gates

    unet = request.getfixturevalue(model)
    up = [u for u in prunable_units(unet, "layer") if u.startswith("up.") and ".resnets." in u]
    steps = 3
    schedule = _schedule(unet, steps, {1: up[:2], 2: up}, "layer")
    channels, size = unet.config.in_channels, unet.config.sample_size
    noise = torch.randn(2, channels, size, size)
    context = torch.randn(2, 5, 12)
    prompts = Prompts(context, torch.zeros(1, 5, 12), guidance_scale=1.0) if model == "tiny_cond_unet" else None

    def run():
        return Sampler(SCHEDULER, steps=steps, prompts=prompts).denoise(unet, noise)

    def gated():
        controller = GateController(unet, schedule.units, steps)
        controller.graph = replace(controller.graph, exact=False)
        return controller.use(schedule)

    with torch.no_grad(), gated():
        skipped = _concatenations(run)
        pruned = run()
    for block in unet.up_blocks:  # removed with the schedule
        assert gates.CONCAT_HOOK not in HookRegistry.check_if_exists_or_initialize(block).hooks
    # the same schedule with every concatenation computed: the same samples, one copy more per skipped resnet
    monkeypatch.setattr(gates._ConcatHook, "new_forward", lambda self, module, *a, **k: self.fn_ref.original_forward(*a, **k))
    with torch.no_grad(), gated():
        computed = _concatenations(run)
        reference = run()
    assert computed - skipped == len(up[:2]) + len(up)
    assert torch.equal(pruned, reference)
    with torch.no_grad(), apply_schedule(unet, schedule):
        assert torch.equal(run(), reference)


def test_a_new_trajectory_resets_and_extra_steps_fail(tiny_unet):
    schedule = _schedule(tiny_unet, 2, {1: ["mid"]})
    x = torch.randn(1, 1, 16, 16)
    with apply_schedule(tiny_unet, schedule) as handle, torch.no_grad():
        tiny_unet(x, 900), tiny_unet(x, 100)
        tiny_unet(x, 900)  # a larger timestep starts a new trajectory
        assert handle.step == 0 and handle.executed["mid"] == 2
        tiny_unet(x, 100)
        with pytest.raises(ScheduleMismatch, match="num_inference_steps=2"):
            tiny_unet(x, 50)


def test_classifier_free_guidance_pipeline_loop(tiny_cond_unet):
    steps = 3
    cond, uncond = torch.randn(2, 5, 12), torch.zeros(1, 5, 12)
    noise = torch.randn(2, 4, 8, 8)
    sampler = Sampler(SCHEDULER, steps=steps, prompts=Prompts(cond, uncond, guidance_scale=7.5))
    with torch.no_grad():
        plain = sampler.denoise(tiny_cond_unet, noise)
        with apply_schedule(tiny_cond_unet, Schedule.full(tiny_cond_unet, steps, "layer")):
            same = sampler.denoise(tiny_cond_unet, noise)
        with apply_schedule(tiny_cond_unet, _schedule(tiny_cond_unet, steps, {1: ["down.1", "mid"], 2: ["mid", "up.0"]})) as handle:
            pruned = sampler.denoise(tiny_cond_unet, noise)
    assert torch.allclose(plain, same, atol=1e-6)
    assert handle.executed["mid"] == 1 and not torch.allclose(plain, pruned)


def test_schedule_macs_are_the_sum_over_computed_units(tiny_unet):
    steps = 4
    schedule = _schedule(tiny_unet, steps, {1: ["up.1", "mid"], 2: ["down.0"], 3: ["up.0", "up.1", "down.1"]})
    costs = unit_costs(tiny_unet, schedule.units)
    # steps 1 and 3: the last block reuses its cache, so nothing it would read runs (step 3 is
    # free), except down.0 at step 1, whose output step 2 reuses; step 2 runs all but down.0
    down0 = costs.units["down.0"].macs
    assert schedule.trajectory_macs(costs) == costs.total.macs + (costs.always + down0) + (costs.total.macs - down0)
    assert Schedule.full(tiny_unet, steps).trajectory_macs(costs) == steps * costs.total.macs
    # what a step runs where every unit reuses its cache (and with the last one, the head) is
    # exactly what lies outside them, counted apart: torch's FlopCounterMode per module, plain pass
    outside = _executed_outside(tiny_unet, schedule.units)
    assert _executed_reused_step(tiny_unet, schedule.units) == outside > 0

    # an independent count of what actually runs (torch's FlopCounterMode) agrees on the fraction saved
    def run():
        Sampler(SCHEDULER, steps=steps).sample(tiny_unet, num_images=1, batch_size=1)

    full = executed_macs(run)
    with apply_schedule(tiny_unet, schedule):
        pruned = executed_macs(run)
    analytic = schedule.trajectory_macs(costs) / (steps * costs.total.macs)
    assert pruned / full == pytest.approx(analytic, rel=0.03)


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_the_head_reuses_its_output_exactly_while_the_last_unit_reuses_its_cache(tiny_unet, tiny_cond_unet, granularity):
    from automl_diff.gating import HEAD, head_input_atom
    from automl_diff.metrics.macs import count_unit_macs

    steps = 4
    units = prunable_units(tiny_unet, granularity)
    last = units[-1]
    cond_units = prunable_units(tiny_cond_unet, granularity)
    assert head_input_atom(tiny_unet, UnitGraph.of(tiny_unet, units)) == last
    assert head_input_atom(tiny_cond_unet, UnitGraph.of(tiny_cond_unet, cond_units)) == cond_units[-1]
    assert head_input_atom(tiny_unet, UnitGraph.of(tiny_unet, units[:-1])) is None  # something else reaches the head
    schedule = _schedule(tiny_unet, steps, {1: [last], 2: [last, units[0]], 3: [units[0]]}, granularity)

    def run():
        return Sampler(SCHEDULER, steps=steps).sample(tiny_unet, num_images=2, batch_size=2)

    with apply_schedule(tiny_unet, schedule) as handle:
        handle.idle_free = False  # steps 1 and 2 run nothing: make them call the UNet anyway
        cached_macs, cached = executed_macs(run), run()
        handle.head_input = None  # the head computes at every step
        plain_macs, plain = executed_macs(run), run()
    assert torch.equal(cached, plain)  # exact: the head sees the same input it cached
    one_image = torch.zeros(1, tiny_unet.conv_out.in_channels, 16, 16)
    assert plain_macs - cached_macs == 2 * 2 * executed_macs(lambda: tiny_unet.conv_out(one_image))  # 2 images, steps 1 and 2
    # costs: the head's MACs count as the last unit's, so a schedule's MACs are still exact
    costs = unit_costs(tiny_unet, units)
    _, alone = count_unit_macs(tiny_unet, [*units, *HEAD])
    assert costs.units[last].macs == sum(alone[n].macs for n in (last, *HEAD)) and set(costs.units) == set(units)
    # a step where every unit reuses its cache runs neither the units nor the head (counted apart)
    assert _executed_reused_step(tiny_unet, units) == _executed_outside(tiny_unet, units)


@pytest.mark.parametrize("conditional", [False, True])
def test_a_step_that_computes_no_unit_skips_the_whole_call_exactly(tiny_unet, tiny_cond_unet, conditional):
    from automl_diff.gating import idle_steps_free
    from automl_diff.metrics.macs import example_inputs

    unet = tiny_cond_unet if conditional else tiny_unet
    steps = 5
    units = prunable_units(unet, "layer")
    # steps 1 and 3 idle; 2 and 4 run the last layer alone, on the others' caches from step 0
    schedule = _schedule(unet, steps, {1: units, 2: units[:-1], 3: units, 4: units[:-1]}, "layer")
    costs = unit_costs(unet, units)
    assert costs.idle_free and idle_steps_free(unet, units) and not idle_steps_free(unet, units[:-1])
    noise, _, *context = example_inputs(unet, batch_size=2)  # the inputs MACs are counted on
    prompts = Prompts(context[0], torch.zeros_like(context[0][:1]), guidance_scale=1.0) if context else None

    def run():
        return Sampler(SCHEDULER, steps=steps, prompts=prompts).denoise(unet, noise)

    calls = []
    with torch.no_grad(), apply_schedule(unet, schedule) as handle:
        hook = unet.conv_in.register_forward_hook(lambda *_: calls.append(handle.step))
        idle_macs, idle = executed_macs(run), run()
        handle.idle_free = False  # every step runs the call
        busy_macs, busy = executed_macs(run), run()
        hook.remove()
    assert torch.equal(idle, busy)  # exact: the skipped calls would have returned the last output
    assert calls == [0, 2, 4] * 2 + [0, 1, 2, 3, 4] * 2  # conv_in never ran at the idle steps
    assert costs.always > 0 and busy_macs - idle_macs == 2 * noise.shape[0] * costs.always  # the two idle steps
    # a schedule's MACs count idle steps as free, in agreement with what runs
    from dataclasses import replace

    counted, counted_busy = schedule.trajectory_macs(costs), schedule.trajectory_macs(replace(costs, idle_free=False))
    assert counted_busy - counted == 2 * costs.always
    assert idle_macs / busy_macs == pytest.approx(counted / counted_busy, rel=0.03)


def test_idle_steps_answer_in_the_form_asked_and_need_diffusers_own_forward(tiny_unet):
    from diffusers import UNet2DModel

    from automl_diff.gating import idle_steps_free

    units = prunable_units(tiny_unet, "block")
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad(), apply_schedule(tiny_unet, _schedule(tiny_unet, 3, {1: units, 2: units})) as handle:
        first = tiny_unet(x, 900)
        as_tuple = tiny_unet(x, 800, return_dict=False)
        again = tiny_unet(x, 700)
        assert handle.executed[units[0]] == 1
    assert isinstance(as_tuple, tuple) and as_tuple[0] is first.sample
    assert type(again) is type(first) and again is not first and again.sample is first.sample

    class Rescaled(UNet2DModel):  # transforms the head's output: an idle step could not return the last one
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    assert idle_steps_free(tiny_unet, units) and not idle_steps_free(Rescaled.from_config(tiny_unet.config), units)


def test_gradients_reach_the_pruner(tiny_unet):
    steps = 3
    units = tuple(prunable_units(tiny_unet, "block"))
    pruner = PrunerNetwork(steps, len(units))
    gates = pruner.sample()
    assert torch.all(gates[0] == 1) and set(gates.unique().tolist()) <= {0.0, 1.0}
    noise = torch.randn(2, 1, 16, 16)
    sampler = Sampler(SCHEDULER, steps=steps)
    with torch.no_grad():
        target = sampler.denoise(tiny_unet, noise)
    for p in tiny_unet.parameters():
        p.requires_grad_(False)
    with GateController(tiny_unet, units, steps) as controller:
        controller.use_soft(gates)
        out = sampler.denoise(tiny_unet, noise)
    costs = unit_costs(tiny_unet, units)
    loss = torch.nn.functional.mse_loss(out, target) + (expected_ratio(pruner.probs(), costs) - 0.3) ** 2
    loss.backward()
    assert pruner.unit_queries.grad is not None and pruner.unit_queries.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pruner.parameters())


def _consistency_backward(unet, units, steps, gates, *, checkpoint: bool, scheduler: str = "ddim", eta: float = 0.0):
    """The pruner's consistency loss alone (no sparsity term), backpropagated to ``gates`` through
    the whole trajectory, as :func:`optimise_pruner` runs it."""
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(SCHEDULER, scheduler, steps, eta)
    with torch.no_grad():
        target = sampler.denoise(unet, noise, generator=torch.Generator().manual_seed(1))
    with GateController(unet, units, steps) as controller:
        controller.use_soft(gates)
        model = CheckpointedSteps(unet, controller).reset() if checkpoint else unet
        images = sampler.denoise(model, noise, generator=torch.Generator().manual_seed(1))
        torch.nn.functional.mse_loss(images, target).backward()


def test_every_steps_gates_learn_from_the_consistency_loss_through_checkpointed_steps(tiny_unet):
    """Over a trajectory of six checkpointed steps (six segments of one step), the consistency
    term alone reaches the gate logits of every step but the first (which always computes), and
    the checkpointed gradients are full backpropagation's."""
    unet = tiny_unet.requires_grad_(False)
    units, steps = tuple(prunable_units(unet, "layer")), 6
    torch.manual_seed(0)
    pruner = PrunerNetwork(steps, len(units))
    gates = pruner.sample(1.0)
    # a trajectory that skips some units, so that later steps read earlier caches
    mixed = (gates * torch.tensor([[1.0 if (i + u) % 3 else 0.3 for u in range(len(units))] for i in range(steps)])).detach()
    _consistency_backward(unet, units, steps, gates, checkpoint=True)
    per_step = pruner.gate_queries.grad.abs().sum(dim=(1, 2))
    assert per_step[0] == 0 and bool((per_step[1:] > 0).all()), per_step
    grads = []
    for checkpoint in (True, False):
        leaf = mixed.clone().requires_grad_(True)
        _consistency_backward(unet, units, steps, leaf, checkpoint=checkpoint, scheduler="ddpm", eta=1.0)
        grads.append(leaf.grad)
    assert bool((grads[0][1:].abs().sum(dim=1) > 0).all())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_optimise_pruner_lowers_the_expected_macs(tiny_unet):
    units = tuple(prunable_units(tiny_unet, "block"))
    costs = unit_costs(tiny_unet, units)
    result = optimise_pruner(
        tiny_unet,
        Sampler(SCHEDULER, steps=3),
        units=units,
        costs=costs,
        options=DiPGOOptions(target_macs_ratio=0.4, sparsity_weight=10.0, reference_images=4, warmup=0.0),
        iterations=12,
        batch_size=2,
        lr=0.1,
    )
    assert result.scores.shape == (3, len(units)) and np.all(result.scores[0] == 1)
    assert result.history[-1]["ratio"] < result.history[0]["ratio"]
    assert all(p.requires_grad for p in tiny_unet.parameters())  # left as found


@pytest.mark.slow
def test_optimised_schedule_is_closer_to_the_full_sampler_than_random_ones_at_the_same_macs():
    """On the shipped teacher: the pruner's schedule against schedules from random scores
    (Algorithm 1) that spend at least its trajectory MACs, all from the same noise."""
    from automl_diff.models import load_teacher

    teacher = load_teacher("digits")
    unet = teacher.unet.requires_grad_(False)
    steps, units = 10, tuple(prunable_units(teacher.unet, "layer"))
    sampler = teacher.sampler(steps=steps)
    costs = unit_costs(unet, units)
    result = optimise_pruner(
        unet,
        sampler,
        units=units,
        costs=costs,
        options=DiPGOOptions(target_macs_ratio=0.4, sparsity_weight=5.0, reference_images=4, warmup=0.3),
        iterations=30,
        batch_size=2,
        lr=0.05,
        seed=1,
    )
    from automl_diff.methods.dipgo.budget import gates_within_budget

    weights = UnitWeights.of(costs)

    def within(scores, budget=0.4):  # Algorithm 1 at a share of the trajectory MACs
        return Schedule(steps, units, tuple(map(tuple, gates_within_budget(scores, budget, weights).tolist())), model_fingerprint(unet))

    def random_at_least(macs, rng):  # random scores, the smallest budget that spends at least ``macs``
        scores = rng.random(result.scores.shape)
        budget = 0.4
        while (schedule := within(scores, budget)).trajectory_macs(costs) < macs:
            budget += 0.01
        return schedule

    optimised = within(result.scores)
    assert optimised.trajectory_macs(costs) <= 0.4 * steps * costs.total.macs  # it does skip work

    noise = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(7))

    def error(schedule):
        full = sampler.denoise(unet, noise)
        with apply_schedule(unet, schedule):
            return torch.mean((sampler.denoise(unet, noise) - full) ** 2).item()

    rng = np.random.default_rng(0)
    randoms = [random_at_least(optimised.trajectory_macs(costs), rng) for _ in range(5)]
    for schedule in randoms:  # as much computation or a little more
        assert schedule.trajectory_macs(costs) == pytest.approx(optimised.trajectory_macs(costs), rel=0.15)
    with torch.no_grad():
        mine, theirs = error(optimised), sorted(error(schedule) for schedule in randoms)
    assert mine < theirs[len(theirs) // 2], (mine, theirs)


def test_unit_latencies_time_each_unit_inside_whole_passes(tiny_unet):
    from automl_diff.metrics.latency import unit_latencies

    units = tuple(prunable_units(tiny_unet, "layer"))
    total, seconds = unit_latencies(tiny_unet, units, batch_size=2, repeats=3)
    assert set(seconds) == set(units) and all(v > 0 for v in seconds.values())
    # units do not nest (nested, a layer would count twice); embedding, conv_in/out lie outside. Each
    # figure is a median of its own, so on a busy machine their sum may pass the total's a little
    assert sum(seconds.values()) < 1.25 * total
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny_unet.modules())  # hooks removed


def test_measured_latency_weights_pay_a_skipped_pass_at_every_step(tiny_unet):
    from diffusers.hooks import HookRegistry

    from automl_diff.methods.dipgo.weights import UnitWeights, skipped_pass_seconds

    units = tuple(prunable_units(tiny_unet, "layer"))
    fixed = skipped_pass_seconds(tiny_unet, units, batch_size=2, repeats=3)
    weights = UnitWeights.measured(tiny_unet, units, batch_size=2, rounds=3)
    assert fixed > 0 and weights.kind == "latency" and set(weights.units) == set(units) and all(v > 0 for v in weights.units.values())
    # the fixed time is timed on passes that run nothing of the units: one filling pass that runs
    # everything, one pass that runs what lies outside the units, per round (counted by torch)
    full = _executed_per_module(tiny_unet, batch_size=2)["Global"]
    outside = _executed_outside(tiny_unet, units, batch_size=2)
    assert executed_macs(lambda: skipped_pass_seconds(tiny_unet, units, batch_size=2, repeats=1)) == 2 * (full + outside)
    # the gates came off again: the plain model runs, with no hooks left behind
    assert not any(HookRegistry.check_if_exists_or_initialize(m).hooks for m in tiny_unet.modules() if hasattr(m, "_diffusers_hook"))
    assert not hasattr(tiny_unet, "_automl_diff_gates")


def test_latency_weights_drive_the_expected_ratio(tiny_unet):
    from automl_diff.methods.dipgo.weights import UnitWeights

    units = tuple(prunable_units(tiny_unet, "block"))
    weights = UnitWeights("latency", 10.0, {u: 1.0 for u in units}, UnitGraph.of(tiny_unet, units))  # 5 units of 1 s in a 10 s pass
    probs = torch.ones(4, len(units))
    assert expected_ratio(probs, weights).item() == pytest.approx(1.0)
    probs[1:, 0] = 0  # one unit skipped on 3 of 4 steps: 3 s of 40 s saved
    assert expected_ratio(probs, weights).item() == pytest.approx(37 / 40)
    probs[1:] = 1
    probs[2, -1] = 0  # the last unit reuses its cache at step 2: nothing it reads runs there
    assert expected_ratio(probs, weights).item() == pytest.approx(35 / 40)
    costs = unit_costs(tiny_unet, units)
    assert UnitWeights.of(costs).units[units[0]] == costs.units[units[0]].macs
    assert UnitWeights.of(costs).idle_free == costs.idle_free
    assert expected_ratio(probs, costs).item() == pytest.approx(expected_ratio(probs, UnitWeights.of(costs)).item())


def test_optimise_pruner_depends_on_its_seed_not_on_what_ran_before(tiny_unet):
    units = tuple(prunable_units(tiny_unet, "block"))
    kwargs = dict(
        units=units,
        costs=unit_costs(tiny_unet, units),
        options=DiPGOOptions(target_macs_ratio=0.4, reference_images=4, warmup=0.0),
        iterations=3,
        batch_size=2,
        lr=0.1,
    )
    sampler = Sampler(SCHEDULER, steps=3)
    torch.manual_seed(1)
    first = optimise_pruner(tiny_unet, sampler, **kwargs).scores
    torch.manual_seed(2)
    state = torch.get_rng_state()
    second = optimise_pruner(tiny_unet, sampler, **kwargs).scores
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is left as found
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, optimise_pruner(tiny_unet, sampler, seed=5, **kwargs).scores)


def test_ssim_is_one_for_equal_images():
    a = torch.rand(2, 1, 16, 16) * 2 - 1
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-5)
    assert ssim(a, torch.rand(2, 1, 16, 16) * 2 - 1).item() < 0.2  # unrelated images
    assert ssim(a, a + 0.05).item() > ssim(a, a + 0.5 * torch.randn_like(a)).item()


def test_higher_threshold_never_keeps_more_units():
    rng = np.random.default_rng(0)
    scores = rng.random((6, 5))
    units, model = [f"u{i}" for i in range(5)], {"class": "X"}
    previous = None
    for threshold in np.linspace(0, 1, 21):
        gates = np.array(Schedule.from_scores(scores, threshold, units=units, model=model).gates)
        assert gates[0].all()
        if previous is not None:
            assert not np.any(gates & ~previous)  # nothing turns on as the threshold rises
        previous = gates


def test_schedule_json_round_trip_and_errors(tmp_path, tiny_unet, tiny_cond_unet):
    schedule = _schedule(tiny_unet, 3, {1: ["mid"]})
    path = schedule.save(tmp_path / "schedule.json")
    assert Schedule.load(path) == schedule
    assert json.loads(path.read_text())["gates"][1] == "11011"
    with pytest.raises(UserError, match="made for another model"):
        apply_schedule(tiny_cond_unet, schedule)
    bad = schedule.to_dict() | {"gates": ["11111", "1101", "11111"]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match=r"bad.json: gates\[1\]"):
        Schedule.load(tmp_path / "bad.json")
    (tmp_path / "first.json").write_text(json.dumps(schedule.to_dict() | {"gates": ["01111", "11111", "11111"]}))
    with pytest.raises(UserError, match="step 0 must compute"):
        Schedule.load(tmp_path / "first.json")
    with pytest.raises(UserError, match="does not exist"):
        Schedule.load(tmp_path / "missing.json")


# --- the study ------------------------------------------------------------------------------------


@pytest.fixture
def dipgo_study(study_factory, tmp_path, capsys):
    config = study_factory(
        name="tinygo",
        method="dipgo",
        search_space=None,
        objectives=[{"name": "trajectory_macs"}, {"name": "fid"}],
        n_trials=3,
        budgets={
            "train_iterations": 6,
            "batch_size": 2,
            "lr": 0.05,
            "fid_samples": 16,
            "sampling_steps": 4,
            "latency_repeats": 1,
            "latency_batch_size": 2,
        },
        method_options={"granularity": "block", "target_macs_ratio": 0.5, "reference_images": 4, "warmup": 0.0, "sparsity_weight": 5.0},
    )
    code = main(["run", str(config), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return config, f"sqlite:///{tmp_path / 'study.db'}", out


def test_dipgo_study_records_schedules_and_exports_them(dipgo_study, tmp_path, capsys):
    config, storage, out = dipgo_study
    assert "trajectory MACs" in out
    study = optuna.load_study(study_name="tinygo", storage=storage)
    assert study.metric_names == ["trajectory_macs", "fid"]
    teacher = study.user_attrs[StudyAttr.TEACHER_METRICS]
    assert teacher[TrialAttr.TRAJECTORY_MACS] == 4 * teacher[TrialAttr.MACS]
    assert (tmp_path / "runs" / "tinygo" / "dipgo_pruner.json").is_file()
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete
    fingerprints = [t.user_attrs[TrialAttr.FINGERPRINT] for t in complete]
    assert len(set(fingerprints)) == len(fingerprints)  # equal schedules are pruned as duplicates
    trial = complete[0]
    attrs = trial.user_attrs
    schedule = Schedule.load(attrs[TrialAttr.SCHEDULE_FILE])
    assert schedule.to_dict() == attrs[TrialAttr.SCHEDULE] and schedule.info["budget"] == attrs[DiPGOAttr.BUDGET]
    assert attrs[DiPGOAttr.COST_RATIO] <= attrs[DiPGOAttr.BUDGET]  # Algorithm 1: within the trial's budget
    assert trial.values[0] == attrs[TrialAttr.TRAJECTORY_MACS] <= teacher[TrialAttr.TRAJECTORY_MACS]
    assert not (tmp_path / "runs" / "tinygo" / f"trial_{trial.number}" / "unet").exists()  # weights are the teacher's

    out_dir = tmp_path / "export"
    assert main(["export", "--storage", storage, "--study-name", "tinygo", "--trial", str(trial.number), "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert f'Schedule.load("{out_dir / "schedule.json"}")' in printed
    assert Schedule.load(out_dir / "schedule.json") == schedule
    assert "apply_schedule" in (out_dir / "README.md").read_text()
    # the pipeline itself loads and samples with diffusers alone
    (call,) = printed_load_calls(printed)
    seen = sample_without_automl_diff(call, cwd=tmp_path)
    assert seen["unet"] == "UNet2DModel" and seen["shape"] == [2, 16, 16, 1] and not seen["imported"]
    # re-apply the exported schedule to the pipeline the printed call loads
    import diffusers  # noqa: F401 - the printed call names it

    pipe = eval(call)
    with apply_schedule(pipe, Schedule.load(out_dir / "schedule.json")) as handle:
        images = Sampler(dict(pipe.scheduler.config), steps=4).sample(pipe.unet, num_images=2, batch_size=2)
        ran = sum(handle.executed.values())
    assert ran == handle.plan.executes.sum() < 4 * len(handle.atoms)  # what the plan runs, no more
    assert images.shape == (2, 1, 16, 16)


def test_trials_lists_every_trial_with_state_and_reason(dipgo_study, tmp_path, capsys):
    import pandas as pd

    _, storage, _ = dipgo_study
    study = optuna.load_study(study_name="tinygo", storage=storage)
    assert main(["trials", "--storage", storage, "--csv", str(tmp_path / "trials.csv")]) == 0
    frame = pd.read_csv(tmp_path / "trials.csv")
    assert list(frame["trial"]) == [t.number for t in study.trials]
    assert list(frame["state"]) == [t.state.name.lower() for t in study.trials]
    assert "param:budget" in frame.columns and "trajectory_macs" in frame.columns
    for t, row in zip(study.trials, frame.to_dict("records")):
        if TrialAttr.DUPLICATE_OF in t.user_attrs:
            assert row["duplicate_of"] == t.user_attrs[TrialAttr.DUPLICATE_OF]
    capsys.readouterr()
    assert main(["trials", "--storage", storage, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == len(study.trials)
    assert main(["trials", "--storage", storage, "--csv", str(tmp_path / "no" / "such" / "t.csv")]) == 2


def test_report_is_self_contained_with_figures_table_and_samples(dipgo_study, tmp_path, capsys):
    import re

    _, storage, _ = dipgo_study
    study = optuna.load_study(study_name="tinygo", storage=storage)
    out = tmp_path / "report.html"
    assert main(["report", "--storage", storage, "--out", str(out), "--samples", "4"]) == 0
    page = out.read_text()
    front = [t for t in study.best_trials]
    assert 'id="pareto-plot"' in page and 'id="history-plot"' in page
    assert not re.search(r"<script[^>]+src=", page)  # plotly.js is inline: opens offline
    for trial in front:
        assert f"id='trial-{trial.number}'" in page and f'id="schedule-{trial.number}"' in page
        assert f"alt='samples of trial {trial.number}' src='data:image/png;base64," in page
    table = page[page.index("<table class='pareto'>") : page.index("</table>")]
    assert table.count("<tr>") == len(front) + 2  # header, the teacher, each front trial
    assert main(["report", "--storage", storage, "--out", str(tmp_path / "no" / "r.html")]) == 2
    assert "--out" in capsys.readouterr().err


def test_resumed_dipgo_study_reuses_the_pruner(dipgo_study, tmp_path, capsys):
    config, storage, _ = dipgo_study
    cache = tmp_path / "runs" / "tinygo" / "dipgo_pruner.json"
    before = cache.read_text()
    mtime = cache.stat().st_mtime_ns
    assert main(["run", str(config), "--quiet", "--n-trials", "4"]) == 0
    capsys.readouterr()
    assert cache.stat().st_mtime_ns == mtime and cache.read_text() == before
    study = optuna.load_study(study_name="tinygo", storage=storage)
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 4


def test_pruner_cached_under_an_older_objective_is_optimised_again(dipgo_study, tmp_path, capsys, monkeypatch):
    import automl_diff.methods.dipgo.method as dipgo_method

    config, storage, _ = dipgo_study
    cache = tmp_path / "runs" / "tinygo" / "dipgo_pruner.json"
    old_key = json.loads(cache.read_text())["key"]
    monkeypatch.setattr(dipgo_method, "OBJECTIVE_VERSION", dipgo_method.OBJECTIVE_VERSION + 1)
    assert main(["run", str(config), "--quiet", "--n-trials", "4"]) == 0, capsys.readouterr().err
    assert json.loads(cache.read_text())["key"] != old_key  # written only where the pruner ran again


def test_latency_unit_cost_weighs_the_units_by_their_measured_seconds(study_factory, tmp_path, capsys):
    config = study_factory(
        name="tinylat",
        method="dipgo",
        search_space=None,
        objectives=[{"name": "trajectory_macs"}, {"name": "fid"}],
        n_trials=1,
        budgets={
            "train_iterations": 3,
            "batch_size": 2,
            "lr": 0.05,
            "fid_samples": 8,
            "sampling_steps": 3,
            "latency_repeats": 1,
            "latency_batch_size": 2,
        },
        method_options={"granularity": "layer", "unit_cost": "latency", "target_macs_ratio": 0.5, "reference_images": 2, "warmup": 0.0},
    )
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="tinylat", storage=f"sqlite:///{tmp_path / 'study.db'}")
    attrs = study.trials[0].user_attrs
    seconds = attrs[DiPGOAttr.PRUNER_UNIT_SECONDS]
    assert attrs[DiPGOAttr.PRUNER_UNIT_COST] == "latency" and list(seconds) == list(
        json.loads(Path(attrs[TrialAttr.SCHEDULE_FILE]).read_text())["units"]
    )
    assert all(v > 0 for v in seconds.values()) and attrs[DiPGOAttr.PRUNER_FORWARD_SECONDS] > 0


def test_profile_schedule_reports_trajectory_and_latency(dipgo_study, tmp_path, tiny_teacher_dir, capsys):
    config, storage, _ = dipgo_study
    study = optuna.load_study(study_name="tinygo", storage=storage)
    trial = next(t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    path = trial.user_attrs[TrialAttr.SCHEDULE_FILE]
    code = main(["profile", "--model", str(tiny_teacher_dir), "--schedule", path, "--json", "--repeats", "1", "--batch-size", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    for key in ("trajectory_macs", "full_trajectory_macs", "latency", "full_latency", "speedup", "macs_reduction"):
        assert key in data, key
    assert data["trajectory_macs"] == trial.user_attrs[TrialAttr.TRAJECTORY_MACS]
    assert data["full_trajectory_macs"] == 4 * data["macs"]
    assert data["macs_reduction"] == pytest.approx(data["full_trajectory_macs"] / data["trajectory_macs"])
    assert main(["profile", "--model", str(tiny_teacher_dir), "--schedule", path, "--steps", "7"]) == 2
    assert "is for 4 ddim steps" in capsys.readouterr().err
    assert main(["profile", "--model", "digits", "--schedule", path]) == 2
    assert "made for another model" in capsys.readouterr().err


def test_dipgo_options_are_validated(study_factory, capsys):
    config = study_factory(method="dipgo", method_options={"granularity": "channel"})
    assert main(["run", str(config)]) == 2
    assert "method_options.granularity" in capsys.readouterr().err
    config = study_factory(method="dipgo", method_options={"threshold_low": 0.9, "threshold_high": 0.2})
    assert main(["run", str(config)]) == 2
    assert "threshold_low" in capsys.readouterr().err
    config = study_factory(method="dipgo", method_options={"unit_cost": "flops"})
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "method_options.unit_cost" in err and "latency" in err
    config = study_factory(method="dipgo", method_options={}, execution={"processes_per_trial": 2})
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "execution.processes_per_trial: method dipgo trains its pruner in one process" in err and "\n" not in err
    config = study_factory(method="dipgo", method_options={"truncate": 10})  # gone: every step backpropagates, checkpointed
    assert main(["run", str(config)]) == 2
    assert "method_options.truncate: unknown key" in capsys.readouterr().err


def test_idle_free_expected_ratio_charges_always_only_to_busy_steps():
    units = ("a", "b")
    # two units whose dataflow is not known: each runs wherever its gate is on
    graph = UnitGraph(units, units, (0, 1), units, (0, 1), ((1,), ()), exact=False)
    weights = UnitWeights("latency", 10.0, {"a": 3.0, "b": 2.0}, graph, idle_free=True)  # always: 5 s
    assert weights.always == pytest.approx(5.0)
    full = torch.ones(4, 2)
    assert expected_ratio(full, weights).item() == pytest.approx(1.0)
    # steps 1-3 compute nothing: they cost nothing; step 0 always computes
    first_only = torch.zeros(4, 2)
    first_only[0] = 1
    assert expected_ratio(first_only, weights).item() == pytest.approx(10 / 40)
    assert expected_ratio(torch.zeros(4, 2), weights).item() == pytest.approx(5 / 40)
    # independent gates at 0.5: a step is busy with probability 0.75
    half = torch.full((4, 2), 0.5)
    assert expected_ratio(half, weights).item() == pytest.approx((5 + 3 * 5 * 0.75 + 4 * 2.5) / 40)
    # the loss pushes a nearly empty step to empty: the always share flows into the gradient
    probs = torch.full((4, 2), 0.1, requires_grad=True)
    expected_ratio(probs, weights).backward()
    plain = torch.full((4, 2), 0.1, requires_grad=True)
    expected_ratio(plain, UnitWeights("latency", 10.0, {"a": 3.0, "b": 2.0}, graph)).backward()
    assert (probs.grad[1:] > plain.grad[1:]).all()


def test_the_papers_pruner_trains_and_starts_with_every_gate_on(tiny_cond_unet):
    from automl_diff.methods.dipgo.pruner import AttentionPruner, build_pruner

    pruner = build_pruner("attention", 5, 7, layers=2)
    assert isinstance(pruner, AttentionPruner) and len(pruner.encoder.layers) == 2
    assert pruner.probs().shape == (5, 7) and pruner.probs()[1:].min() > 0.9  # every gate starts on
    # the units of a step attend to each other: one unit's query moves the other units' logits
    before = pruner.logits().detach().clone()
    with torch.no_grad():  # not a constant shift: the layers' norm would remove it
        pruner.queries[2, 0] += torch.randn(pruner.queries.shape[-1], generator=torch.Generator().manual_seed(0)) * 3
    after = pruner.logits().detach()
    assert not torch.allclose(after[2, 3], before[2, 3]) and torch.equal(after[[0, 1, 3, 4]], before[[0, 1, 3, 4]])
    units, steps = tuple(prunable_units(tiny_cond_unet, "branch")), 3
    options = DiPGOOptions(pruner="attention", granularity="branch", target_macs_ratio=0.4, warmup=0.0, reference_images=2)
    prompts = Prompts(torch.randn(2, 5, 12), torch.zeros(1, 5, 12), guidance_scale=2.0)
    result = optimise_pruner(
        tiny_cond_unet,
        Sampler(SCHEDULER, steps=steps, prompts=prompts),
        units=units,
        costs=unit_costs(tiny_cond_unet, units, text_length=5),
        options=options,
        iterations=3,
        batch_size=2,
        lr=0.05,
    )
    assert result.scores.shape == (steps, len(units)) and len(result.history) == 3


def test_warm_start_recipes_are_the_first_trials_and_marked_on_the_front(study_factory, tmp_path, capsys):
    from automl_diff.analysis import trial_rows

    config = study_factory(
        name="warm",
        method="dipgo",
        sampler={"name": "tpe", "seed": 0},
        search_space=None,
        objectives=[{"name": "trajectory_macs"}, {"name": "fid"}],
        n_trials=3,
        budgets={
            "train_iterations": 2,
            "batch_size": 2,
            "lr": 0.05,
            "fid_samples": 8,
            "sampling_steps": 6,
            "latency_repeats": 1,
            "latency_batch_size": 2,
        },
        method_options={"granularity": "branch", "reference_images": 2, "warmup": 0.0, "warm_start": ["deepcache:2", "deepcache:3"]},
    )
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.load_study(study_name="warm", storage=storage)
    first, second, third = study.trials
    assert (first.user_attrs[TrialAttr.RECIPE], second.user_attrs[TrialAttr.RECIPE]) == ("deepcache:2", "deepcache:3")
    assert TrialAttr.RECIPE not in third.user_attrs and DiPGOAttr.BUDGET in third.params
    # the recipe's schedule: every interval-th step in full, the steps between only the last up branch
    schedule = Schedule.from_dict(second.user_attrs[TrialAttr.SCHEDULE])
    full_steps = [i for i, row in enumerate(schedule.gates) if all(row)]
    assert full_steps == [0, 3]
    kept = {u for u, on in zip(schedule.units, schedule.gates[1]) if on}
    assert kept == {schedule.units[-1]} and schedule.units[-1].startswith("up.")
    assert first.user_attrs[TrialAttr.TRAJECTORY_MACS] > second.user_attrs[TrialAttr.TRAJECTORY_MACS]
    # marked wherever trials are listed
    assert [r.label for r in trial_rows(study)] == ["0 (deepcache:2)", "1 (deepcache:3)", "2"]
    assert main(["pareto", "--storage", storage, "--study-name", "warm", "--json"]) == 0
    front = json.loads(capsys.readouterr().out)
    assert front and all(r["recipe"] == {0: "deepcache:2", 1: "deepcache:3"}.get(r["trial"]) for r in front)
    assert main(["trials", "--storage", storage, "--study-name", "warm"]) == 0
    assert "recipe deepcache:2" in capsys.readouterr().out
    # a resumed run does not make them again
    assert main(["run", str(config), "--quiet", "--n-trials", "4"]) == 0
    capsys.readouterr()
    recipes = [t.user_attrs.get(TrialAttr.RECIPE) for t in optuna.load_study(study_name="warm", storage=storage).trials]
    assert recipes.count("deepcache:2") == 1 and recipes.count("deepcache:3") == 1 and len(recipes) == 4
    # a recipe that a second worker enqueued too (both started together) is surplus, not a wasted place
    optuna.load_study(study_name="warm", storage=storage).enqueue_trial({}, user_attrs={TrialAttr.RECIPE: "deepcache:2"})
    assert main(["run", str(config), "--quiet", "--n-trials", "5"]) == 0
    capsys.readouterr()
    trials = optuna.load_study(study_name="warm", storage=storage).trials
    assert trials[4].state == optuna.trial.TrialState.FAIL
    assert trials[4].user_attrs[TrialAttr.FAIL_REASON] == "surplus: trial 0 makes the recipe deepcache:2"
    assert [t.state for t in trials].count(optuna.trial.TrialState.COMPLETE) + [t.state for t in trials].count(
        optuna.trial.TrialState.PRUNED
    ) == 5
    # recipes it has no schedule for are one line
    for options, message in (
        ({"warm_start": ["bk-sdm-base"]}, "method_options.warm_start[0]: not a recipe of method dipgo, whose recipes are deepcache:N"),
        ({"warm_start": ["deepcache:3", "deepcache:1"]}, "warm_start[1]: not a recipe of method dipgo"),
        ({"warm_start": ["steps:0"]}, "warm_start[0]: not a recipe of method dipgo, whose recipes are deepcache:N"),
        ({"warm_start": ["steps:99"]}, "method_options.warm_start: steps:99: more computed calls than the"),
        ({"warm_start": ["deepcache:3", "deepcache:3"]}, "method_options.warm_start: repeats a value"),
        ({"granularity": "block", "warm_start": ["deepcache:3"]}, "method_options.warm_start: deepcache:3 needs the last up block's"),
        ({"warm_start": ["deepcache:3"], "sampler": "nsga2"}, "method_options.warm_start: recipe trials hold no Optuna parameters"),
    ):
        sampler = {"name": options.pop("sampler", "random"), "seed": 0}
        bad = study_factory(name="bad", method="dipgo", method_options=options, sampler=sampler)
        assert main(["run", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


def test_fewer_steps_as_a_schedule_is_ddim_on_the_computed_timesteps():
    """``steps:N``: N evenly spaced calls compute, the calls between are skipped whole and the
    model's last output is used again, which DDIM at eta 0 turns into a jump straight to the next
    computed timestep. Checked against DDIM written out by hand on an RGB UNet that is not ours."""
    from diffusers import DDIMScheduler, UNet2DModel

    from tests.conftest import TINY_UNET

    torch.manual_seed(0)
    unet = UNet2DModel(**{**TINY_UNET, "in_channels": 3, "out_channels": 3}).eval()
    config = {"num_train_timesteps": 1000, "beta_schedule": "linear", "clip_sample": False}
    steps, calls = 10, 4
    schedule = Schedule.uniform_steps(unet, steps, calls, units=prunable_units(unet, "layer"))
    assert [i for i, row in enumerate(schedule.gates) if any(row)] == [0, 2, 5, 7] and all(map(all, schedule.gates[::5]))
    noise = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), apply_schedule(unet, schedule) as controller:
        gated = Sampler(config, scheduler="ddim", steps=steps).denoise(unet, noise)
    assert sum(controller.executed.values()) == calls * len(schedule.units)  # the skipped calls ran nothing

    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    alphas = scheduler.alphas_cumprod
    computed = [timesteps[i] for i in (0, 2, 5, 7)]
    x = noise
    with torch.no_grad():
        for t, following in zip(computed, [*computed[1:], None]):
            eps = unet(x, t).sample
            a, after = alphas[t], (alphas[following] if following is not None else torch.tensor(1.0))
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = after.sqrt() * x0 + (1 - after).sqrt() * eps
    torch.testing.assert_close(gated, x, rtol=1e-4, atol=1e-4)


def test_fewer_steps_is_a_warm_start_recipe(study_factory, capsys, tmp_path):
    config = study_factory(
        name="steps",
        method="dipgo",
        sampler={"name": "tpe", "seed": 0},
        search_space=None,
        objectives=[{"name": "trajectory_macs"}, {"name": "fid"}],
        n_trials=1,
        budgets={"train_iterations": 2, "batch_size": 2, "lr": 0.05, "fid_samples": 8, "sampling_steps": 6, "latency_batch_size": 2},
        method_options={"granularity": "block", "reference_images": 2, "warmup": 0.0, "warm_start": ["steps:3"]},
    )
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    (trial,) = optuna.load_study(study_name="steps", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert trial.user_attrs[TrialAttr.RECIPE] == "steps:3"
    schedule = Schedule.from_dict(trial.user_attrs[TrialAttr.SCHEDULE])
    assert [all(row) for row in schedule.gates] == [True, False, True, False, True, False] and not any(map(any, schedule.gates[1::2]))
    # the skipped calls cost nothing: half the full trajectory's MACs
    assert trial.user_attrs[DiPGOAttr.COST_RATIO] == pytest.approx(0.5)
    # exported, the pipeline loads and samples with diffusers alone, and the schedule re-applied to it skips the same calls
    out_dir = tmp_path / "export"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["export", "--storage", storage, "--study-name", "steps", "--trial", "0", "--out", str(out_dir)]) == 0
    (call,) = printed_load_calls(capsys.readouterr().out)
    assert not sample_without_automl_diff(call, cwd=tmp_path)["imported"]
    import diffusers  # noqa: F401 - the printed call names it

    pipe = eval(call)
    with torch.no_grad(), apply_schedule(pipe, Schedule.load(out_dir / "schedule.json")) as handle:
        Sampler(dict(pipe.scheduler.config), scheduler="ddim", steps=6).sample(pipe.unet, num_images=2, batch_size=2)
    assert sum(handle.executed.values()) == 3 * len(handle.atoms)
