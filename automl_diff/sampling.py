"""Sampling images from a UNet with a real diffusers scheduler (DDIM by default).

A :class:`Sampler` is how a study samples: the teacher's scheduler config, which diffusers
scheduler runs it, the number of steps, DDIM's eta and, for a text-to-image UNet, the
:class:`Prompts` with their guidance. Evaluation, latency, DiP-GO's pruner and ``profile`` all
sample through one; its chain (:meth:`Sampler.chain`) is the loop ``DDIMPipeline`` runs
(``set_timesteps``, then ``scheduler.step`` on the UNet's noise prediction), written out so that
it batches, seeds per image and returns tensors in [-1, 1] for FID, and so that latency is
measured on exactly the computation that produces samples. With prompts it is the loop of
``StableDiffusionPipeline``: the UNet denoises latents conditioned on text embeddings,
classifier-free guidance runs both halves in one batched call per step, and the final latents are
decoded into images.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

__all__ = ["PREDICTION_TYPES", "SCHEDULERS", "Prompts", "Sampler", "make_scheduler", "predict_noise", "sample_grid_png"]


def predict_noise(model: nn.Module, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``model(x, t)`` for any noise-prediction model: a diffusers UNet or transformer
    (``.sample``) or a module that returns the tensor itself. ``kwargs`` (``encoder_hidden_states``,
    ``class_labels``) go to the model. A model that also predicts the variance (DiT's learned
    sigma: twice the input's channels) gives the noise half, as ``DiTPipeline`` takes it."""
    out = model(x, t, **kwargs)
    out = out if isinstance(out, torch.Tensor) else out.sample
    return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out


def _schedulers() -> dict[str, type]:
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    return {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler, "pndm": PNDMScheduler}


#: What a denoiser's output can be (its scheduler's ``prediction_type``): the noise, the velocity
#: ``v = sqrt(a) eps - sqrt(1 - a) x_0`` (Salimans & Ho, 2022) or the clean sample. Sampling
#: leaves it to the diffusers scheduler; distillation learns the teacher's own.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

#: Sampler names a study may use: DDIM, DDPM, DPM-Solver++ (multistep) and PNDM (PLMS, Stable
#: Diffusion's own default).
SCHEDULERS = ("ddim", "ddpm", "dpm", "pndm")


def make_scheduler(scheduler_config: Mapping[str, Any], name: str = "ddim") -> Any:
    """A fresh scheduler of kind ``name`` built from a teacher's scheduler config."""
    return _schedulers()[name].from_config(dict(scheduler_config))


@dataclass(frozen=True)
class Prompts:
    """The conditioning of sampling, text prompts or class labels: image ``i`` is generated from
    prompt ``(i // images_per_prompt) % len(embeddings)``.

    Attributes:
        embeddings: what the model takes per prompt: ``encoder_hidden_states`` of each text prompt,
            shape ``(prompts, tokens, dim)``, or a class-conditional model's class ids, shape
            ``(classes,)``.
        negative: the unconditional half of classifier-free guidance, one row: the negative (or
            empty) prompt's embeddings, or the null class id.
        guidance_scale: ``uncond + scale * (cond - uncond)``; 1 runs the conditional half alone.
        images_per_prompt: consecutive images sharing a prompt.
        decode: turns final latents into images in [-1, 1] (a VAE's decoder); None: the latents
            are the images.
        keyword: the model's argument the rows go to: ``encoder_hidden_states`` (a text-to-image
            UNet) or ``class_labels`` (DiT).
    """

    embeddings: torch.Tensor
    negative: torch.Tensor
    guidance_scale: float = 7.5
    images_per_prompt: int = 1
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    keyword: str = "encoder_hidden_states"

    @property
    def guided(self) -> bool:
        """Whether both halves of classifier-free guidance run (a scale above 1)."""
        return self.guidance_scale > 1.0

    @property
    def calls_per_step(self) -> int:
        """UNet rows one image costs per step: 2 under guidance (both halves in one call), else 1."""
        return 2 if self.guided else 1

    def prompt_of(self, index: int) -> int:
        """The prompt image ``index`` is generated from."""
        return (index // self.images_per_prompt) % len(self.embeddings)

    def context(self, images: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditional and the negative embeddings of ``images`` (image indices), a row each."""
        rows = torch.tensor([self.prompt_of(int(i)) for i in images], dtype=torch.long)
        return self.embeddings[rows.to(self.embeddings.device)], self.negative.expand(len(rows), *self.negative.shape[1:])


@dataclass(frozen=True)
class Sampler:
    """How a study samples: a diffusers scheduler of the teacher's config, steps, eta, prompts.

    Attributes:
        scheduler_config: the teacher's scheduler config (its noise schedule).
        scheduler: ``ddim``, ``ddpm``, ``dpm`` or ``pndm``: the diffusers scheduler that runs it.
        steps: inference steps (``num_inference_steps``); :attr:`calls` the model calls they take.
        eta: DDIM's stochasticity (0: deterministic).
        prompts: the text conditioning of a text-to-image UNet (guided, decoded); None: an
            unconditional UNet.
    """

    scheduler_config: Mapping[str, Any] = field(repr=False)
    scheduler: str = "ddim"
    steps: int = 20
    eta: float = 0.0
    prompts: Prompts | None = field(default=None, repr=False)

    @property
    def calls_per_step(self) -> int:
        """UNet rows one image costs per step (both halves of guidance count)."""
        return self.prompts.calls_per_step if self.prompts is not None else 1

    @property
    def model_calls(self) -> int:
        """Model calls of one trajectory: one per timestep of the scheduler, which PNDM's PLMS
        steps take one more of (it evaluates its second timestep twice). A gate schedule has a
        row per call."""
        return len(self.make_scheduler().timesteps)

    def with_prompts(self, prompts: Prompts | None) -> Sampler:
        """The same sampler with other prompts (another prompt set, or none)."""
        return replace(self, prompts=prompts)

    def with_steps(self, steps: int) -> Sampler:
        return replace(self, steps=steps)

    def make_scheduler(self) -> Any:
        """A fresh diffusers scheduler with its timesteps set (multistep solvers keep state)."""
        scheduler = make_scheduler(self.scheduler_config, self.scheduler)
        scheduler.set_timesteps(self.steps)
        return scheduler

    def chain(
        self,
        unet: nn.Module,
        noise: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        images: Sequence[int] | None = None,
    ) -> Generator[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The sampling chain of one batch one step at a time: yields the latents after each step
        (latents sent back replace them) and returns the final ones (not decoded). Lets a caller
        interleave several samplers step by step
        (:func:`~automl_diff.metrics.latency.lockstep_rounds`).

        Args:
            unet: the noise-prediction model.
            noise: the batch's starting noise (latents for a text-to-image UNet).
            generator: the scheduler's noise (DDPM, DDIM with ``eta`` above 0).
            images: the index of each noise row among the study's images, which picks its prompt
                (default: ``0 .. len(noise) - 1``).
        """
        sched = self.make_scheduler()
        device = noise.device
        x = noise * sched.init_noise_sigma
        accepts = inspect.signature(sched.step).parameters
        step_kwargs: dict[str, Any] = {"eta": self.eta} if self.scheduler == "ddim" else {}
        if "generator" in accepts:
            step_kwargs["generator"] = generator
        p = self.prompts
        context = None
        if p is not None:
            cond, negative = p.context(range(len(noise)) if images is None else images)
            context = torch.cat([negative, cond]) if p.guided else cond
        for t in sched.timesteps:
            model_in = sched.scale_model_input(x, t)
            if p is not None and p.guided:
                both = torch.cat([model_in, model_in])
                both = predict_noise(unet, both, _timestep(p, t.to(device), len(both)), **{p.keyword: context})
                uncond, cond_eps = both.chunk(2)
                eps = uncond + p.guidance_scale * (cond_eps - uncond)
            elif p is not None:
                eps = predict_noise(unet, model_in, _timestep(p, t.to(device), len(model_in)), **{p.keyword: context})
            else:
                eps = predict_noise(unet, model_in, _timestep(p, t.to(device), len(model_in)))
            x = sched.step(eps, t, x, **step_kwargs).prev_sample
            replaced = yield x
            if replaced is not None:
                x = replaced
        return x

    def denoise(
        self, unet: nn.Module, noise: torch.Tensor, *, generator: torch.Generator | None = None, images: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Run one batch of noise through the whole chain (:meth:`chain`) and return the final
        latents. Differentiable when called with gradients enabled (DiP-GO backpropagates
        through it)."""
        return _drain(self.chain(unet, noise, generator=generator, images=images))

    def first_step(self, unet: nn.Module, batch: int) -> torch.Tensor:
        """The first model call (and scheduler step) of a trajectory of ``batch`` images: what each
        call of a sampling batch costs (a dry run times it)."""
        param = next(unet.parameters())
        noise = self._noise(unet, batch, 0).to(device=param.device, dtype=param.dtype)
        return next(self.chain(unet, noise))

    def _noise(self, unet: nn.Module, num_images: int, seed: int) -> torch.Tensor:
        config = unet.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return torch.randn((num_images, config.in_channels, height, width), generator=torch.Generator().manual_seed(seed))

    def _batch(
        self, unet: nn.Module, noise: torch.Tensor, start: int, seed: int
    ) -> Generator[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One batch of images, starting at image ``start``, one step at a time (decoded, in
        [-1, 1], on the CPU)."""
        param = next(unet.parameters())
        x = noise.to(device=param.device, dtype=param.dtype)
        step_generator = torch.Generator().manual_seed(seed + 1 + start)
        x = yield from self.chain(unet, x, generator=step_generator, images=range(start, start + len(x)))
        if self.prompts is not None and self.prompts.decode is not None:
            x = self.prompts.decode(x)
        return x.float().clamp(-1, 1).cpu()

    @torch.no_grad()
    def batches(
        self, unet: nn.Module, *, num_images: int, batch_size: int = 250, seed: int = 0
    ) -> Generator[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """:meth:`sample` one denoising step at a time: yields the latents after every step of
        every batch and returns the images. Timing several of these in lockstep
        (:func:`~automl_diff.metrics.latency.lockstep_rounds`) exposes them all to the same load."""
        was_training = unet.training
        unet.eval()
        noise = self._noise(unet, num_images, seed)
        out = []
        try:
            for start in range(0, num_images, batch_size):
                out.append((yield from self._batch(unet, noise[start : start + batch_size], start, seed)))
        finally:
            unet.train(was_training)
        return torch.cat(out)

    @torch.no_grad()
    def stream(
        self,
        unet: nn.Module,
        *,
        num_images: int,
        batch_size: int = 250,
        seed: int = 0,
        progress: bool = False,
        desc: str = "sampling",
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """:meth:`sample` one batch at a time: yields ``(start, images)``, the batch's first image
        index and its images, so that a caller can reduce each batch (to features, scores) and let
        it go: memory holds one batch of images, whatever ``num_images``."""
        was_training = unet.training
        unet.eval()
        noise = self._noise(unet, num_images, seed)
        total = -(-num_images // batch_size) * self.model_calls
        try:
            with tqdm(total=total, desc=desc, unit="step", disable=not progress, file=sys.stderr, leave=False) as bar:

                def tick(x: torch.Tensor) -> torch.Tensor:
                    bar.update(1)
                    return x

                for start in range(0, num_images, batch_size):
                    yield start, _drain(self._batch(unet, noise[start : start + batch_size], start, seed), tick)
        finally:
            unet.train(was_training)

    def sample(
        self,
        unet: nn.Module,
        *,
        num_images: int,
        batch_size: int = 250,
        seed: int = 0,
        progress: bool = False,
        desc: str = "sampling",
    ) -> torch.Tensor:
        """Generate ``num_images`` images in [-1, 1], shape ``(N, C, H, W)``, on the CPU.

        The initial noise of image ``i`` depends only on ``seed`` and ``i`` (drawn on the CPU), so
        two models sampled with the same seed start from the same noise whatever the batch size
        or device.
        """
        batches = self.stream(unet, num_images=num_images, batch_size=batch_size, seed=seed, progress=progress, desc=desc)
        return torch.cat([images for _, images in batches])


def _timestep(prompts: Prompts | None, t: torch.Tensor, rows: int) -> torch.Tensor:
    """The timestep as the model's own pipeline passes it: a scalar to a UNet (as ``DDIMPipeline``
    and ``StableDiffusionPipeline`` do, and as DeepCache reads it), one per row to a
    class-conditional transformer (``DiTPipeline``; DiT requires it)."""
    return t.expand(rows) if prompts is not None and prompts.keyword == "class_labels" else t


def _drain(chain: Generator[Any, Any, Any], each: Callable[[Any], Any] | None = None) -> Any:
    """Run a step generator to its end (``each(value)`` replaces each yielded value) and return
    what it returns."""
    try:
        value = next(chain)
        while True:
            if each is not None:
                value = each(value)
            value = chain.send(value)
    except StopIteration as stop:
        return stop.value


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
