"""Sampling images from a UNet with a real diffusers scheduler (DDIM by default).

The loop is the one ``DDIMPipeline`` runs (``set_timesteps``, then ``scheduler.step`` on the
UNet's noise prediction), written out so that it batches, seeds per image and returns tensors in
[-1, 1] for FID, and so that latency is measured on exactly the computation that produces samples.
With a :class:`Prompts` it is the loop of ``StableDiffusionPipeline``: the UNet denoises latents
conditioned on text embeddings, classifier-free guidance runs both halves in one batched call per
step, and the final latents are decoded into images.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

__all__ = [
    "SCHEDULERS",
    "Prompts",
    "denoise",
    "denoising_steps",
    "make_scheduler",
    "predict_noise",
    "sample_grid_png",
    "sample_images",
    "sampling_steps",
]


def predict_noise(model: nn.Module, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``model(x, t)`` for any noise-prediction model: a diffusers UNet (``.sample``) or a module
    that returns the tensor itself. ``kwargs`` (``encoder_hidden_states``) go to the model."""
    out = model(x, t, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.sample


def _schedulers() -> dict[str, type]:
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    return {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler}


#: Sampler names a study may use.
SCHEDULERS = ("ddim", "ddpm", "dpm")


def make_scheduler(scheduler_config: dict[str, Any], name: str = "ddim") -> Any:
    """A fresh scheduler of kind ``name`` built from the teacher's scheduler config."""
    return _schedulers()[name].from_config(scheduler_config)


@dataclass(frozen=True)
class Prompts:
    """Text conditioning for sampling: image ``i`` is generated from prompt
    ``(i // images_per_prompt) % len(embeddings)``.

    Attributes:
        embeddings: ``encoder_hidden_states`` of each prompt, shape ``(prompts, tokens, dim)``.
        negative: the negative (or empty) prompt's, shape ``(1, tokens, dim)``: the unconditional
            half of classifier-free guidance.
        guidance_scale: ``uncond + scale * (cond - uncond)``; 1 runs the conditional half alone.
        images_per_prompt: consecutive images sharing a prompt.
        decode: turns final latents into images in [-1, 1] (a VAE's decoder); None: the latents
            are the images.
    """

    embeddings: torch.Tensor
    negative: torch.Tensor
    guidance_scale: float = 7.5
    images_per_prompt: int = 1
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None

    def prompt_of(self, index: int) -> int:
        """The prompt image ``index`` is generated from."""
        return (index // self.images_per_prompt) % len(self.embeddings)

    def for_images(self, start: int, count: int) -> dict[str, Any]:
        """:func:`denoise`'s conditioning arguments for images ``start`` to ``start + count``."""
        rows = torch.tensor([self.prompt_of(i) for i in range(start, start + count)])
        return {
            "encoder_hidden_states": self.embeddings[rows.to(self.embeddings.device)],
            "negative_hidden_states": self.negative.expand(count, *self.negative.shape[1:]),
            "guidance_scale": self.guidance_scale,
        }


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def denoising_steps(
    unet: nn.Module,
    scheduler_config: dict[str, Any],
    noise: torch.Tensor,
    *,
    steps: int,
    scheduler: str = "ddim",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    negative_hidden_states: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> Generator[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The sampling chain of :func:`denoise` one step at a time: yields the latents after each
    step (latents sent back replace them) and returns the final ones. Lets a caller interleave
    several samplers step by step (:func:`~automl_diff.metrics.latency.time_lockstep`)."""
    sched = make_scheduler(scheduler_config, scheduler)  # fresh per batch: multistep solvers keep state
    sched.set_timesteps(steps)
    device = noise.device
    x = noise * sched.init_noise_sigma
    step_kwargs: dict[str, Any] = {"eta": eta} if scheduler == "ddim" else {}
    guided = encoder_hidden_states is not None and negative_hidden_states is not None and guidance_scale > 1.0
    context = torch.cat([negative_hidden_states, encoder_hidden_states]) if guided else None
    for t in sched.timesteps:
        model_in = sched.scale_model_input(x, t)
        if guided:
            uncond, cond = predict_noise(unet, torch.cat([model_in, model_in]), t.to(device), encoder_hidden_states=context).chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        elif encoder_hidden_states is not None:
            eps = predict_noise(unet, model_in, t.to(device), encoder_hidden_states=encoder_hidden_states)
        else:
            eps = predict_noise(unet, model_in, t.to(device))
        x = sched.step(eps, t, x, generator=generator, **step_kwargs).prev_sample
        replaced = yield x
        if replaced is not None:
            x = replaced
    return x


def denoise(
    unet: nn.Module,
    scheduler_config: dict[str, Any],
    noise: torch.Tensor,
    *,
    steps: int,
    scheduler: str = "ddim",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    negative_hidden_states: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Run one batch of noise through the whole sampling chain and return the final latents.

    Differentiable when called with gradients enabled (DiP-GO backpropagates through it).
    With ``encoder_hidden_states`` the UNet is conditional; with ``negative_hidden_states`` too
    and ``guidance_scale != 1``, classifier-free guidance runs both halves in one batched call per
    step, as diffusers' pipelines do.
    """
    chain = denoising_steps(
        unet,
        scheduler_config,
        noise,
        steps=steps,
        scheduler=scheduler,
        eta=eta,
        generator=generator,
        encoder_hidden_states=encoder_hidden_states,
        negative_hidden_states=negative_hidden_states,
        guidance_scale=guidance_scale,
    )
    return _drain(chain)


def _drain(chain: Generator[Any, Any, Any], after_step: Callable[[int, Any], Any] | None = None) -> Any:
    """Run a step generator to its end (``after_step(i, value)`` replaces each yielded value) and
    return what it returns."""
    try:
        value, i = next(chain), 0
        while True:
            if after_step is not None:
                value = after_step(i, value)
            value, i = chain.send(value), i + 1
    except StopIteration as stop:
        return stop.value


@torch.no_grad()
def sample_images(
    unet: nn.Module,
    scheduler_config: dict[str, Any],
    *,
    num_images: int,
    steps: int,
    batch_size: int = 250,
    seed: int = 0,
    scheduler: str = "ddim",
    eta: float = 0.0,
    progress: bool = False,
    desc: str = "sampling",
    prompts: Prompts | None = None,
) -> torch.Tensor:
    """Generate ``num_images`` images in [-1, 1], shape ``(N, C, H, W)``, on the CPU.

    The initial noise of image ``i`` depends only on ``seed`` and ``i`` (drawn on the CPU), so two
    models sampled with the same seed start from the same noise whatever the batch size or device.

    Args:
        unet: noise-prediction model (``UNet2DModel``-like: ``unet(x, t).sample``).
        scheduler_config: the teacher's scheduler config.
        num_images: how many images.
        steps: denoising steps.
        batch_size: images per forward pass.
        seed: noise seed.
        scheduler: ``ddim``, ``ddpm`` or ``dpm``.
        eta: DDIM's stochasticity (0: deterministic).
        progress: show a progress bar (stderr).
        prompts: text conditioning of a text-to-image UNet (guided, decoded); the noise is the
            latents'.
    """
    total = -(-num_images // batch_size) * steps
    with tqdm(total=total, desc=desc, unit="step", disable=not progress, file=sys.stderr, leave=False) as bar:

        def tick(i: int, x: torch.Tensor) -> torch.Tensor:
            bar.update(1)
            return x

        chain = sampling_steps(
            unet,
            scheduler_config,
            num_images=num_images,
            steps=steps,
            batch_size=batch_size,
            seed=seed,
            scheduler=scheduler,
            eta=eta,
            prompts=prompts,
        )
        return _drain(chain, tick)


@torch.no_grad()
def sampling_steps(
    unet: nn.Module,
    scheduler_config: dict[str, Any],
    *,
    num_images: int,
    steps: int,
    batch_size: int = 250,
    seed: int = 0,
    scheduler: str = "ddim",
    eta: float = 0.0,
    prompts: Prompts | None = None,
) -> Generator[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """:func:`sample_images` one denoising step at a time: yields the latents after every step of
    every batch and returns the images. Timing several of these in lockstep
    (:func:`~automl_diff.metrics.latency.time_lockstep`) exposes them all to the same machine load."""
    was_training = unet.training
    unet.eval()
    device = _device(unet)
    dtype = next(unet.parameters()).dtype
    config = unet.config
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_images, config.in_channels, height, width), generator=generator)
    out = []
    try:
        for start in range(0, num_images, batch_size):
            x = noise[start : start + batch_size].to(device=device, dtype=dtype)
            step_generator = torch.Generator().manual_seed(seed + 1 + start)
            text = prompts.for_images(start, len(x)) if prompts is not None else {}
            x = yield from denoising_steps(
                unet, scheduler_config, x, steps=steps, scheduler=scheduler, eta=eta, generator=step_generator, **text
            )
            if prompts is not None and prompts.decode is not None:
                x = prompts.decode(x)
            out.append(x.float().clamp(-1, 1).cpu())
    finally:
        unet.train(was_training)
    return torch.cat(out)


def sample_grid_png(images: Any, *, columns: int = 8, scale: int = 3) -> bytes:
    """A PNG grid of images in [-1, 1], shape ``(N, C, H, W)`` (1 or 3 channels)."""
    import io

    import numpy as np
    from PIL import Image

    array = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    n, c, h, w = array.shape
    rows = -(-n // columns)
    grid = np.full((rows * h, columns * w, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, columns)
        grid[r * h : (r + 1) * h, k * w : (k + 1) * w] = array[i].transpose(1, 2, 0)
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
