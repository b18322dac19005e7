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

import functools
import inspect
import sys
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from automl_diff.errors import UserError

__all__ = [
    "FLOW_SCHEDULERS",
    "PREDICTION_TYPES",
    "SCHEDULERS",
    "NoiseSchedule",
    "Prompts",
    "Sampler",
    "is_flow_matching",
    "make_scheduler",
    "noise_schedule",
    "pack_pooled",
    "predict_noise",
    "resolve_scheduler",
    "sample_grid_png",
    "takes_pooled",
]


def takes_pooled(model: nn.Module) -> bool:
    """Whether a model is conditioned on pooled text embeddings beside the token embeddings
    (``pooled_projections``: SD3's MMDiT). Its conditioning travels packed in one tensor
    (:func:`pack_pooled`), so that prompts, pools and batches index one table whatever the model.
    A wrapper that takes ``(x, t, **conditioning)`` and passes it on is not (a compiled model's
    original, or a data-parallel one's, is looked at)."""
    return "pooled_projections" in _parameters(type(_unwrapped(model)))


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a compiled (``_orig_mod``) or data-parallel (``module``) wrapper."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


@functools.cache
def _parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def pack_pooled(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Token embeddings ``(n, tokens, dim)`` and pooled embeddings ``(n, pooled_dim)`` as one tensor
    ``(n, tokens + 1, dim)``: the pooled row last, zero-padded to ``dim``."""
    row = torch.zeros(len(tokens), 1, tokens.shape[-1], dtype=tokens.dtype, device=tokens.device)
    row[:, 0, : pooled.shape[-1]] = pooled.to(tokens.dtype)
    return torch.cat([tokens, row], dim=1)


def predict_noise(model: nn.Module, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``model(x, t)`` for any diffusion model: a diffusers UNet or transformer (``.sample``) or a
    module that returns the tensor itself (or in a tuple), in its own parametrisation (noise, velocity, flow).
    ``kwargs`` (``encoder_hidden_states``, ``class_labels``) go to the model. A model that also
    predicts the variance (DiT's learned sigma: twice the input's channels) gives the noise half,
    as ``DiTPipeline`` takes it. A model with pooled text embeddings (SD3) receives its packed
    conditioning (:func:`pack_pooled`) as ``encoder_hidden_states`` and ``pooled_projections``,
    and a timestep per row, as ``StableDiffusion3Pipeline`` calls it."""
    if takes_pooled(model):
        packed = kwargs.pop("encoder_hidden_states", None)
        if packed is None:
            raise UserError(f"a {type(_unwrapped(model)).__name__} is text-conditioned: it needs its pipeline's prompts")
        pooled = packed[:, -1, : _unwrapped(model).config.pooled_projection_dim]
        t = t.expand(len(x)) if t.dim() == 0 else t
        out = model(x, encoder_hidden_states=packed[:, :-1], pooled_projections=pooled, timestep=t, **kwargs)
    else:
        out = model(x, t, **kwargs)
    out = out if isinstance(out, torch.Tensor) else out[0] if isinstance(out, tuple) else out.sample
    return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out


def _schedulers() -> dict[str, type]:
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler

    return {
        "ddim": DDIMScheduler,
        "ddpm": DDPMScheduler,
        "dpm": DPMSolverMultistepScheduler,
        "pndm": PNDMScheduler,
        "flow": FlowMatchEulerDiscreteScheduler,
    }


#: What a denoiser's output can be: the noise, the velocity ``v = sqrt(a) eps - sqrt(1 - a) x_0``
#: (Salimans & Ho, 2022) or the clean sample (its scheduler's ``prediction_type``), or, for a
#: flow-matching model (SD3: ``x_t = (1 - sigma) x_0 + sigma eps``), the flow ``eps - x_0``.
#: Sampling leaves it to the diffusers scheduler; distillation learns the teacher's own.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")

#: Sampler names a study may use: DDIM, DDPM, DPM-Solver++ (multistep), PNDM (PLMS, Stable
#: Diffusion's own default), flow matching's Euler (SD3's own), and ``auto``: ``flow`` for a
#: flow-matching teacher, else ``ddim``.
SCHEDULERS = ("auto", "ddim", "ddpm", "dpm", "pndm", "flow")

#: Scheduler classes of flow-matching models: their teachers predict the flow and sample with ``flow``.
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


def is_flow_matching(scheduler_config: Mapping[str, Any]) -> bool:
    """Whether a scheduler config is a flow-matching model's (its model predicts the flow)."""
    return scheduler_config.get("_class_name") in FLOW_SCHEDULERS


def resolve_scheduler(scheduler_config: Mapping[str, Any], name: str) -> str:
    """The sampler ``name`` stands for on a schedule: ``auto`` is ``flow`` for a flow-matching
    one, else ``ddim``; any other name is itself."""
    if name != "auto":
        return name
    return "flow" if is_flow_matching(scheduler_config) else "ddim"


def make_scheduler(scheduler_config: Mapping[str, Any], name: str = "auto") -> Any:
    """A fresh scheduler of kind ``name`` built from a teacher's scheduler config.

    Raises:
        UserError: ``name`` is ``flow`` for a noise-prediction schedule, or another sampler for a
            flow-matching one (they parametrise time differently).
    """
    name = resolve_scheduler(scheduler_config, name)
    if (name == "flow") != is_flow_matching(scheduler_config):
        kind = scheduler_config.get("_class_name", "DDPMScheduler")
        fix = "a flow-matching model samples with flow (or auto)" if name != "flow" else "flow samples flow-matching models only"
        raise UserError(f"sampling.scheduler: {name} does not run a model trained with {kind}; {fix}")
    return _schedulers()[name].from_config(dict(scheduler_config))


@dataclass(frozen=True)
class NoiseSchedule:
    """A teacher's training noise schedule, indexed by train timestep ``0 .. T-1`` (least noisy first).

    Distillation works in one frame for every kind of teacher: ``alphas_cumprod`` is, per index,
    the cumulative alpha of the variance-preserving schedule with the same signal-to-noise ratio
    (a DDPM schedule's own; for flow matching ``(1 - sigma)^2 / ((1 - sigma)^2 + sigma^2)``), and
    :func:`model_input_scale` turns that frame's ``x_t`` into what the model takes.

    Attributes:
        alphas_cumprod: the (equivalent) cumulative alphas, length ``T``.
        timesteps: the timestep the model is called with at each index (the index itself for a
            DDPM schedule; ``sigma * T`` for flow matching, as ``FlowMatchEulerDiscreteScheduler``
            passes it).
        prediction_type: what the model predicts (:data:`PREDICTION_TYPES`).
        clip_sample: whether the scheduler clips its clean-sample estimate, and to what bound.
    """

    alphas_cumprod: torch.Tensor
    timesteps: torch.Tensor
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_range: float = 1.0


def noise_schedule(scheduler_config: Mapping[str, Any]) -> NoiseSchedule:
    """The training noise schedule of a teacher's scheduler config (:class:`NoiseSchedule`)."""
    if not is_flow_matching(scheduler_config):
        ddpm = _schedulers()["ddpm"].from_config(dict(scheduler_config))
        config = ddpm.config
        steps = torch.arange(len(ddpm.alphas_cumprod))
        return NoiseSchedule(
            ddpm.alphas_cumprod, steps, str(config.prediction_type), bool(config.clip_sample), float(config.clip_sample_range)
        )
    if scheduler_config.get("use_dynamic_shifting"):
        raise ValueError("use_dynamic_shifting: a resolution-dependent shift is not supported; the schedule needs a fixed shift")
    flow = _schedulers()["flow"].from_config(dict(scheduler_config))
    sigmas = flow.sigmas.double().flip(0)  # the training sigmas, least noisy first
    alphas = (1 - sigmas) ** 2 / ((1 - sigmas) ** 2 + sigmas**2)
    return NoiseSchedule(alphas.float(), (sigmas * flow.config.num_train_timesteps).float(), "flow")


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
        scheduler: ``ddim``, ``ddpm``, ``dpm``, ``pndm`` or ``flow``: the diffusers scheduler that
            runs it (``auto`` given: the schedule's own kind, :func:`resolve_scheduler`).
        steps: inference steps (``num_inference_steps``); :attr:`calls` the model calls they take.
        eta: DDIM's stochasticity (0: deterministic).
        prompts: the text conditioning of a text-to-image UNet (guided, decoded); None: an
            unconditional UNet.
    """

    scheduler_config: Mapping[str, Any] = field(repr=False)
    scheduler: str = "auto"
    steps: int = 20
    eta: float = 0.0
    prompts: Prompts | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheduler", resolve_scheduler(self.scheduler_config, self.scheduler))

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
        x = noise * getattr(sched, "init_noise_sigma", 1.0)
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
            model_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
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
