"""The dataflow between gated units: branches, what a schedule really runs, exact samples,
counted MACs equal to executed MACs, PLMS's repeated timestep, and budgets."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from automl_diff.gating import GateController, Schedule, apply_schedule, model_fingerprint, prunable_units, unit_costs
from automl_diff.metrics.macs import executed_macs
from automl_diff.models.dataflow import UnitGraph
from automl_diff.sampling import Prompts, Sampler
from tests.conftest import SD_LAYOUT

SD_BETAS = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.fixture
def sd_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**SD_LAYOUT).eval()


def _prompts(unet, guidance=1.5):
    torch.manual_seed(1)
    dim = unet.config.cross_attention_dim
    return Prompts(torch.randn(2, 5, dim), torch.randn(1, 5, dim), guidance_scale=guidance)


def _random_schedule(unet, units, steps, keep, seed):
    rng = np.random.default_rng(seed)
    gates = rng.random((steps, len(units))) < keep
    gates[0] = True
    return Schedule(steps, tuple(units), tuple(map(tuple, gates.tolist())), model_fingerprint(unet))


def test_branches_are_stable_diffusions_24(sd_unet):
    units = prunable_units(sd_unet, "branch")
    assert len(units) == 24
    assert units[:3] == ["down.0.resnets.0+down.0.attentions.0", "down.0.resnets.1+down.0.attentions.1", "down.0.downsamplers.0"]
    assert "down.3.resnets.1" in units and "mid.resnets.0+mid.attentions.0+mid.resnets.1" in units
    assert units[-1] == "up.3.resnets.2+up.3.attentions.2"
    assert "up.0.resnets.2+up.0.upsamplers.0" in units and "up.1.resnets.2+up.1.attentions.2+up.1.upsamplers.0" in units
    assert len(prunable_units(sd_unet, "layer")) == 44 and len(prunable_units(sd_unet, "block")) == 9


def test_skips_reach_the_up_resnet_that_reads_them(sd_unet):
    graph = UnitGraph.of(sd_unet, prunable_units(sd_unet, "layer"))
    index = {name: i for i, name in enumerate(graph.nodes)}

    def readers(name):
        return {graph.nodes[r] for r in graph.readers[index[name]]}

    # diffusers stacks conv_in, then per down block its pairs' and downsampler's outputs; up block
    # 0's resnet 0 takes the last one (down.3's second resnet), up.3's last resnet conv_in's
    assert readers("down.3.resnets.1") == {"mid.resnets.0", "up.0.resnets.0"}
    assert readers("down.0.attentions.0") == {"down.0.resnets.1", "up.3.resnets.1"}
    assert readers("down.0.downsamplers.0") == {"down.1.resnets.0", "up.2.resnets.2"}
    assert readers("up.3.attentions.2") == set()  # the head reads it


def test_a_reused_output_branch_idles_everything_it_alone_reads(sd_unet):
    """The authors' cascade: where the last up branch reuses its cache, nothing upstream is read."""
    units = prunable_units(sd_unet, "branch")
    steps = 4
    gates = np.ones((steps, len(units)), dtype=bool)
    gates[2, -1] = False
    plan = UnitGraph.of(sd_unet, units).plan(gates)
    assert plan.executes[[0, 1, 3]].all() and not plan.executes[2].any() and plan.idle.tolist() == [False, False, True, False]
    # one step earlier the cache of a unit that a later step reuses must be kept, and still run
    gates[2] = True
    gates[2, units.index("up.3.resnets.0+up.3.attentions.0")] = False
    plan = UnitGraph.of(sd_unet, units).plan(gates)
    graph = UnitGraph.of(sd_unet, units)
    runs = dict(zip(graph.atoms, plan.executes[2], strict=True))
    assert not runs["up.3.resnets.0"] and not runs["up.3.attentions.0"]
    # up.3.resnets.1 still reads down.0's first pair; the second fed only up.3.resnets.0 and the
    # downsampler, whose readers are idle now
    assert runs["up.3.resnets.1"] and runs["down.0.attentions.0"] and not runs["down.0.attentions.1"]
    assert plan.keeps[1, graph.atoms.index("up.3.attentions.0")] and plan.reuses[2, graph.atoms.index("up.3.attentions.0")]
    assert not runs["up.2.resnets.0"]  # read only by up.2's later layers, which nothing reads now ... through up.3.resnets.0


@pytest.mark.parametrize("granularity", ["block", "layer", "branch"])
def test_skipping_what_nothing_reads_changes_no_sample_and_costs_what_runs(sd_unet, granularity):
    """Every random schedule samples exactly as it does when every unit whose gate is on runs;
    the MACs it counts are those torch sees run."""
    units = prunable_units(sd_unet, granularity)
    sampler = Sampler(SD_BETAS, steps=6, prompts=_prompts(sd_unet))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    costs = unit_costs(sd_unet, units, text_length=5)
    # torch's counter leaves out normalisation, which the analytic count includes: compare the
    # share of the full trajectory each sees
    full = Schedule.full(sd_unet, 6, granularity)
    with torch.no_grad(), GateController(sd_unet, units, 6).use(full):
        seen = executed_macs(lambda: sampler.denoise(sd_unet, noise)) / full.trajectory_macs(costs)
    for seed in range(3):
        schedule = _random_schedule(sd_unet, units, 6, keep=0.5, seed=seed)
        with torch.no_grad():
            with GateController(sd_unet, units, 6).use(schedule) as lazy:
                lean = sampler.denoise(sd_unet, noise)
                lean_runs = sum(lazy.executed.values())
                executed = executed_macs(lambda: sampler.denoise(sd_unet, noise))
            with GateController(sd_unet, units, 6) as eager:
                eager.graph = replace(eager.graph, exact=False)
                eager.use(schedule)
                full = sampler.denoise(sd_unet, noise)
                ran = sum(eager.executed.values())
        assert torch.equal(lean, full)
        assert lean_runs < ran  # the gates on that nothing read did not run
        counted = schedule.trajectory_macs(costs)
        assert executed / counted == pytest.approx(seen, rel=0.04)  # charging what idles: some 30% off


def test_plms_gates_each_model_call_and_a_full_schedule_is_the_plain_pipeline(tiny_sd_dir):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir))
    pipe.scheduler = PNDMScheduler.from_config({**pipe.scheduler.config, "skip_prk_steps": True})
    pipe.set_progress_bar_config(disable=True)
    sampler = Sampler(pipe.scheduler.config, scheduler="pndm", steps=5)
    assert sampler.model_calls == 6  # PLMS evaluates its second timestep twice

    def run():
        return pipe(
            "a three", num_inference_steps=5, guidance_scale=2.0, generator=torch.Generator().manual_seed(0), output_type="np"
        ).images

    plain = run()
    units = prunable_units(pipe.unet, "branch")
    with apply_schedule(pipe, Schedule.full(pipe.unet, 6, "branch")) as handle:
        assert np.array_equal(run(), plain)
        assert handle.executed[handle.atoms[0]] == 6
    gates = np.ones((6, len(units)), dtype=bool)
    gates[2, :] = False  # the repeated timestep reuses everything: the 961 call returns the 981 call's output
    with apply_schedule(pipe, Schedule(6, tuple(units), tuple(map(tuple, gates.tolist())), model_fingerprint(pipe.unet))) as handle:
        pruned = run()
        assert handle.executed[handle.atoms[0]] == 5
    assert not np.array_equal(pruned, plain)
    with apply_schedule(pipe, Schedule.full(pipe.unet, 5, "branch")), pytest.raises(Exception, match="num_inference_steps=5"):
        run()


def test_a_budget_keeps_the_best_scored_gates_that_fit(sd_unet):
    from automl_diff.methods.dipgo.budget import gates_within_budget
    from automl_diff.methods.dipgo.weights import UnitWeights

    units = prunable_units(sd_unet, "branch")
    weights = UnitWeights.of(unit_costs(sd_unet, units, text_length=5))
    scores = np.random.default_rng(0).random((10, len(units)))
    previous = None
    for budget in (0.15, 0.3, 0.5, 0.8):
        gates = gates_within_budget(scores, budget, weights)
        assert gates[0].all() and weights.cost(gates) <= budget
        # every gate kept scores at least as high as every gate left off (after step 0)
        assert scores[1:][gates[1:]].min() >= scores[1:][~gates[1:]].max()
        # one more gate, the best one left off, would not fit
        nxt = np.unravel_index(np.argmax(np.where(gates[1:], -1, scores[1:])), gates[1:].shape)
        more = gates.copy()
        more[1 + nxt[0], nxt[1]] = True
        assert weights.cost(more) > budget
        if previous is not None:
            assert (gates >= previous).all()  # a larger budget keeps everything a smaller one kept
        previous = gates
    assert weights.cost(gates_within_budget(scores, 0.01, weights)) == pytest.approx(0.1)  # step 0 alone: 1 of 10 steps
