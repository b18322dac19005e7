"""The sampling loop one step at a time, and timing several samplers in lockstep."""

from __future__ import annotations

import contextlib
import time

import pytest
import torch

from automl_diff.metrics.latency import lockstep_rounds, once
from automl_diff.sampling import Sampler

SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "clip_sample": True}


def test_batches_yield_every_step_and_return_the_images(tiny_unet):
    sampler = Sampler(SCHEDULER, steps=4)
    chain = sampler.batches(tiny_unet, num_images=3, batch_size=2)
    latents = []
    with pytest.raises(StopIteration) as stop:
        while True:
            latents.append(next(chain))
    assert len(latents) == 2 * 4 and tuple(latents[0].shape) == (2, 1, 16, 16) and tuple(latents[-1].shape) == (1, 1, 16, 16)
    assert torch.equal(stop.value.value, sampler.sample(tiny_unet, num_images=3, batch_size=2))


def test_denoise_runs_the_chain_that_yields_step_by_step(tiny_unet):
    noise = torch.randn(2, 1, 16, 16)
    sampler = Sampler(SCHEDULER, steps=3)
    with torch.no_grad():
        whole = sampler.denoise(tiny_unet, noise)
        chain = sampler.chain(tiny_unet, noise)
        steps = [next(chain), next(chain), next(chain)]
    assert all(tuple(x.shape) == tuple(noise.shape) for x in steps) and torch.equal(steps[-1], whole)


def test_lockstep_rounds_advance_every_run_one_step_in_turn_inside_its_context():
    events: list[str] = []

    def run(name: str, steps: int, pause: float):
        def steps_of():
            for i in range(steps):
                time.sleep(pause)
                events.append(f"{name}{i}")
                yield i

        return steps_of

    @contextlib.contextmanager
    def context(name: str):
        events.append(f"enter {name}")
        yield
        events.append(f"exit {name}")

    runs = {"a": run("a", 3, 0.004), "b": run("b", 2, 0.001), "c": run("c", 3, 0.0)}
    rounds = lockstep_rounds(runs, contexts={"a": lambda: context("a"), "b": lambda: context("b")}, repeats=2)
    one_round = ["enter a", "enter b", "a0", "b0", "c0", "b1", "c1", "a1", "c2", "a2", "exit b", "exit a"]
    assert events == one_round * 2  # the first to go rotates every step; contexts span the round
    assert set(rounds) == {"a", "b", "c"} and all(len(values) == 2 for values in rounds.values())
    assert min(rounds["a"]) >= 3 * 0.004 and min(rounds["b"]) >= 2 * 0.001
    # a plain call is a computation of one step: calls run in turn, round after round
    calls: list[str] = []
    timed = lockstep_rounds({name: once(lambda name=name: calls.append(name)) for name in "xy"}, repeats=2, warmup=1)
    assert calls == ["x", "y"] * 3 and all(len(values) == 2 for values in timed.values())
