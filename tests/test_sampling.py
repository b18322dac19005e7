"""The sampling loop one step at a time, and timing several samplers in lockstep."""

from __future__ import annotations

import contextlib
import time

import pytest
import torch

from automl_diff.metrics.latency import time_lockstep
from automl_diff.sampling import denoise, denoising_steps, sample_images, sampling_steps

SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "clip_sample": True}


def test_sampling_steps_yield_every_step_and_return_the_images(tiny_unet):
    chain = sampling_steps(tiny_unet, SCHEDULER, num_images=3, steps=4, batch_size=2)
    latents = []
    with pytest.raises(StopIteration) as stop:
        while True:
            latents.append(next(chain))
    assert len(latents) == 2 * 4 and tuple(latents[0].shape) == (2, 1, 16, 16) and tuple(latents[-1].shape) == (1, 1, 16, 16)
    assert torch.equal(stop.value.value, sample_images(tiny_unet, SCHEDULER, num_images=3, steps=4, batch_size=2))


def test_denoise_runs_the_chain_that_denoising_steps_yields_step_by_step(tiny_unet):
    noise = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        whole = denoise(tiny_unet, SCHEDULER, noise, steps=3)
        chain = denoising_steps(tiny_unet, SCHEDULER, noise, steps=3)
        steps = [next(chain), next(chain), next(chain)]
    assert all(tuple(x.shape) == tuple(noise.shape) for x in steps) and torch.equal(steps[-1], whole)


def test_time_lockstep_advances_every_run_one_step_in_turn_inside_its_context():
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
    seconds = time_lockstep(runs, contexts={"a": lambda: context("a"), "b": lambda: context("b")}, repeats=2)
    one_round = ["enter a", "enter b", "a0", "b0", "c0", "b1", "c1", "a1", "c2", "a2", "exit b", "exit a"]
    assert events == one_round * 2  # the first to go rotates every step; contexts span the round
    assert seconds["a"] >= 3 * 0.004 and seconds["b"] >= 2 * 0.001 and set(seconds) == {"a", "b", "c"}
