"""Wall-clock latency (seconds, lower is better).

Two ways to time: :func:`lockstep_rounds` runs several step-by-step computations side by side,
one step each in turn, and :func:`sampler_rounds` times models sampling with a
:class:`~automl_diff.sampling.Sampler` that way (seconds per image). :func:`unit_latencies` times
the units inside a model's forward pass (DiP-GO's latency weights).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import torch
from torch import nn

from automl_diff.sampling import Sampler

__all__ = ["first_batch_seconds", "lockstep_rounds", "once", "sampler_rounds", "synchronize", "unit_latencies"]


def synchronize(module: nn.Module) -> None:
    """Wait for the work queued on ``module``'s CUDA device (nothing to wait for on a CPU)."""
    device = next(module.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sampler_rounds(
    models: dict[str, nn.Module],
    sampler: Sampler,
    *,
    contexts: dict[str, Callable[[nn.Module], ContextManager[Any]]] | None = None,
    batch_size: int = 8,
    repeats: int = 3,
    warmup: int = 1,
) -> dict[str, list[float]]:
    """Seconds per image of several models sampling one batch of ``batch_size`` each with
    ``sampler``, in each of ``repeats`` rounds (after ``warmup`` untimed ones), timed in lockstep
    (:func:`lockstep_rounds`): ``models[name]`` samples under ``contexts[name](model)`` (none: as
    it is). Models under different contexts must be different objects (give each its own copy).
    Round ``k`` of every model ran side by side, so per-round ratios compare like with like; the
    median over the rounds is a model's latency. The loop is the one that produces FID samples
    (for a text-to-image UNet: guided steps and the VAE's decoding; the prompts' embeddings are
    computed beforehand, once)."""
    contexts = contexts or {}

    def run(model: nn.Module) -> Callable[[], Any]:
        return lambda: sampler.batches(model, num_images=batch_size, batch_size=batch_size)

    entered = {name: (lambda name=name: contexts[name](models[name])) for name in models if name in contexts}
    sync = next(iter(models.values()), None)
    rounds = lockstep_rounds(
        {name: run(model) for name, model in models.items()}, contexts=entered, repeats=repeats, warmup=warmup, sync=sync
    )
    return {name: [value / batch_size for value in values] for name, values in rounds.items()}


def first_batch_seconds(
    models: dict[str, nn.Module],
    sampler: Sampler,
    *,
    contexts: dict[str, Callable[[nn.Module], ContextManager[Any]]] | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Wall-clock seconds of each model's first sampling batch (under its context, as
    :func:`sampler_rounds`): for a compiled model, its warm-up (compilation included), to report
    apart from the timed rounds that follow."""
    contexts = contexts or {}
    seconds = {}
    for name, model in models.items():
        with contexts.get(name, lambda _: contextlib.nullcontext())(model):
            start = time.perf_counter()
            for _ in sampler.batches(model, num_images=batch_size, batch_size=batch_size):
                pass
            synchronize(model)
            seconds[name] = time.perf_counter() - start
    return seconds


def once(call: Callable[[], Any]) -> Callable[[], Iterator[Any]]:
    """A plain call as a computation of one step, to time calls side by side with :func:`lockstep_rounds`."""
    return lambda: (call() for _ in range(1))


def lockstep_rounds(
    runs: dict[str, Callable[[], Iterator[Any]]],
    *,
    contexts: dict[str, Callable[[], ContextManager[Any]]] | None = None,
    repeats: int = 3,
    warmup: int = 0,
    sync: nn.Module | None = None,
) -> dict[str, list[float]]:
    """Wall-clock seconds of several step-by-step computations run in lockstep, per timed round.

    Each run makes an iterator (:func:`~automl_diff.sampling.sampling_steps`, say); all of them
    advance one step in turn, the first to go rotating every step, and each step's time counts for
    its run. Machine load that comes and goes over seconds (other tenants of the host, memory
    bandwidth) then hits every run alike, which whole runs timed one after another
    only do on average over many repeats.

    Args:
        runs: iterator factories by name; each call starts a fresh computation (:func:`once`
            makes a plain call one).
        contexts: context factories by name, all entered for the whole of a repeat (attaching a
            schedule's hooks, say), outside the timing. Runs under different contexts must not
            share a model: give each its own copy.
        repeats: timed rounds; ``warmup``: untimed rounds first.
        sync: a module whose CUDA device is synchronised after every step.
    """
    contexts = contexts or {}
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + max(1, repeats)):
        spent = dict.fromkeys(names, 0.0)
        with contextlib.ExitStack() as stack:
            for name in names:
                stack.enter_context(contexts.get(name, contextlib.nullcontext)())
            active = {name: runs[name]() for name in names}
            if sync is not None:
                synchronize(sync)  # then after every step, so each starts with nothing queued
            turn = 0
            while active:
                for name in names[turn % len(names) :] + names[: turn % len(names)]:
                    if name not in active:
                        continue
                    start = time.perf_counter()
                    try:
                        next(active[name])
                    except StopIteration:
                        del active[name]
                    if sync is not None:
                        synchronize(sync)
                    spent[name] += time.perf_counter() - start
                turn += 1
        if round_ >= warmup:
            for name in names:
                times[name].append(spent[name])
    return times


@torch.no_grad()
def unit_latencies(
    unet: nn.Module,
    units: list[str] | tuple[str, ...],
    *,
    batch_size: int,
    repeats: int = 5,
    warmup: int = 1,
    **kwargs: Any,
) -> tuple[float, dict[str, float]]:
    """Wall-clock seconds of one forward pass of ``unet`` at ``batch_size``, and of each unit in it.

    Units (blocks or layers, not nested in each other, as :func:`~automl_diff.models.blocks.get_block`
    names them, or top-level layers such as ``conv_out``) are timed by forward hooks around them
    inside whole forward passes, so each sees the inputs and memory state it has when sampling.
    The passes take the inputs MACs are counted on
    (:func:`~automl_diff.metrics.macs.example_inputs`, text conditioning included for a
    conditional UNet) at ``batch_size``. Returns the medians over ``repeats`` passes (after
    ``warmup`` untimed ones): ``(total, {unit: seconds})``. Extra ``kwargs`` go to the UNet.
    """
    from automl_diff.metrics.macs import example_inputs
    from automl_diff.models.blocks import get_block, is_block_name

    inputs = example_inputs(unet, batch_size=batch_size)
    started: dict[str, float] = {}
    current: dict[str, float] = dict.fromkeys(units, 0.0)  # this pass's seconds per unit
    spent: dict[str, list[float]] = {name: [] for name in units}

    def before(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            synchronize(unet)
            started[name] = time.perf_counter()

        return hook

    def after(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            synchronize(unet)
            current[name] += time.perf_counter() - started[name]

        return hook

    handles = []
    for name in units:
        module = get_block(unet, name) if is_block_name(name) else unet.get_submodule(name)
        handles += [module.register_forward_pre_hook(before(name)), module.register_forward_hook(after(name))]
    totals: list[float] = []
    try:
        for i in range(warmup + repeats):
            current.update(dict.fromkeys(units, 0.0))
            synchronize(unet)
            start = time.perf_counter()
            unet(*inputs, **kwargs)
            synchronize(unet)
            if i >= warmup:
                totals.append(time.perf_counter() - start)
                for name, seconds in current.items():
                    spent[name].append(seconds)
    finally:
        for handle in handles:
            handle.remove()
    return statistics.median(totals), {name: statistics.median(values) for name, values in spent.items()}
