"""Where distillation batches ``(x_t, t, target)`` come from, shared by every method that trains.

Each batch is a :class:`Batch`: ``x_t``, ``t``, the target and, for a text-to-image teacher, the
text conditioning of each sample (for a class-conditional one, its class id), which every model in
the training step is called with.

* :class:`PoolBatches` (data-free, DKDM's idea): ``(x_t, t)`` from a
  :class:`~automl_diff.methods.training.pool.NoisePool` of the teacher's own generations; the
  target is the teacher's prediction at ``(x_t, t)`` (noise, or velocity for a
  ``v_prediction`` teacher), and the same prediction advances the pool. No dataset
  is read. For a text-to-image teacher with a guided pool, each state gets both halves of
  classifier-free guidance in one teacher call (its prompt and the unconditional one), the batch
  holds both rows, and the guided prediction advances the state, so the pool visits the states
  the study samples and the unconditional half is learnt where guidance evaluates it.
* :class:`DataBatches` (the baseline): real images noised with the scheduler; the target is the
  true noise (the standard DDPM objective), or the true velocity for a ``v_prediction`` teacher.

:class:`TrainingInputs` builds either from a study's :class:`~automl_diff.config.options.PoolOptions`
once, and hands every run a batch source that starts from the same pool snapshot. DKDM, DiffNAS's
supernet training and retraining, and the benchmark's Torch-Pruning fine-tune all draw from it.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from automl_diff.config.options import PoolOptions
from automl_diff.config.settings import MethodSettings
from automl_diff.methods.training.loop import world
from automl_diff.methods.training.pool import NoisePool, PoolState, drop_labels, noisy, prediction_target
from automl_diff.models.loading import Teacher
from automl_diff.sampling import predict_noise

__all__ = [
    "Batch",
    "BatchSource",
    "DataBatches",
    "PoolBatches",
    "TrainingInputs",
    "conditioning_kwargs",
    "guided_states",
    "restore_batches",
]


class Batch(NamedTuple):
    """One distillation batch: ``x_t``, ``t``, the target noise and the conditioning of each
    sample: a text-to-image teacher's ``encoder_hidden_states``, a class-conditional teacher's
    class ids (``class_labels``), or None (unconditional)."""

    x: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    context: torch.Tensor | None = None

    @property
    def conditioning(self) -> dict[str, Any]:
        """The UNet keyword arguments of the batch's conditioning (``predict_noise(m, x, t, **c)``)."""
        return conditioning_kwargs(self.context)


def conditioning_kwargs(context: torch.Tensor | None) -> dict[str, Any]:
    """The model's keyword for ``context``: class ids (integers) are ``class_labels``, text
    embeddings ``encoder_hidden_states``."""
    if context is None:
        return {}
    return {"encoder_hidden_states" if context.is_floating_point() else "class_labels": context}


class BatchSource(Protocol):
    def __call__(self, batch_size: int) -> Batch: ...


def guided_states(rows: int, unconditional: float) -> int:
    """States a guided batch of ``rows`` rows draws when an ``unconditional`` share of its rows
    are unconditional: ``rows`` less that share, at least half the rows (every unconditional row
    has its state's conditional row beside it) and at least 1."""
    return max(1, (rows + 1) // 2, rows - round(rows * unconditional))


def _context(table: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor | None:
    """The conditioning rows of ``labels`` (prompt indices into ``table``)."""
    return None if table is None else table[labels.to(table.device)]


class PoolBatches:
    """DKDM batches: the teacher labels a random pool batch and advances it one step.

    Args:
        teacher: noise-prediction model (frozen).
        pool: the noisy-sample pool.
        prompts: a latent teacher's conditioning per pool label, the unconditional prompt last:
            text embeddings ``(labels + 1, tokens, dim)`` or class ids ``(labels + 1,)`` (the null
            class last); each entry is labelled and advanced with its own prompt's prediction.
        guided: label both halves of guidance at each state and advance it with the guided
            prediction at the entry's scale.
        unconditional_rows: guided: the share of a batch's rows that are unconditional (at the
            same states as conditional rows of the batch). A batch of ``n`` rows draws
            :func:`guided_states` states, has every state's conditional row and the first
            states' unconditional rows; the teacher labels both halves of every state, which
            the guided step needs.
    """

    def __init__(
        self,
        teacher: nn.Module,
        pool: NoisePool,
        prompts: torch.Tensor | None = None,
        *,
        guided: bool = False,
        unconditional_rows: float = 0.5,
    ) -> None:
        self.teacher = teacher
        self.pool = pool
        self.prompts = prompts
        self.guided = guided and prompts is not None
        self.unconditional_rows = unconditional_rows
        self.teacher_evals = 0

    @torch.no_grad()
    def label(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's prediction for a batch. Under data-parallel training every rank holds
        the same pool and batch: each labels its share, and the shares are gathered."""
        rank, size = world()
        if size > 1 and len(x) % size == 0:
            n = len(x) // size
            part = slice(rank * n, (rank + 1) * n)
            mine = predict_noise(self.teacher, x[part], t[part], **conditioning_kwargs(None if context is None else context[part])).float()
            shares = [torch.empty_like(mine) for _ in range(size)]
            torch.distributed.all_gather(shares, mine.contiguous())
            self.teacher_evals += len(x)
            return torch.cat(shares)
        self.teacher_evals += len(x)
        return predict_noise(self.teacher, x, t, **conditioning_kwargs(context)).float()

    def both(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's two predictions at each state in one call, rows ``[conditional;
        unconditional]``, and the conditioning of those rows."""
        cond = _context(self.prompts, labels)
        context = torch.cat([cond, self.prompts[-1:].expand_as(cond)])
        return self.label(torch.cat([x, x]), torch.cat([t, t]), context), context

    def moving(self, x: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The prediction that moves entries ``idx`` (at ``x``, ``t``) on: guided at their scales,
        or their own prompt's."""
        labels = self.pool.labels[idx]
        if not self.guided:
            return self.label(x, t, _context(self.prompts, labels))
        eps, _ = self.both(x, t, labels)
        cond, uncond = eps.chunk(2)
        return uncond + self.pool.scales[idx].view(-1, *([1] * (eps.dim() - 1))) * (cond - uncond)

    def record(self) -> dict[str, Any]:
        """This source as it is now (its teacher aside), for :func:`restore_batches`."""
        prompts = None if self.prompts is None else self.prompts.cpu()
        return {
            "kind": "pool",
            "pool": self.pool.record(),
            "prompts": prompts,
            "guided": self.guided,
            "unconditional_rows": self.unconditional_rows,
        }

    def counters(self) -> dict[str, int]:
        """What this source has cost: teacher evaluations, pool trajectories finished."""
        return {"teacher_evals": self.teacher_evals, "completed": self.pool.completed}

    def set_counters(self, counters: dict[str, int]) -> None:
        """Take over the counters of another copy of this source (a data-parallel job's)."""
        self.teacher_evals = int(counters["teacher_evals"])
        self.pool.completed = int(counters["completed"])

    def __call__(self, batch_size: int) -> Batch:
        if self.guided:
            states = guided_states(batch_size, self.unconditional_rows)
            idx = self.pool.draw(states)
            x, t = self.pool.batch(idx)  # copies: advancing the pool leaves this batch as it is
            eps, context = self.both(x, t, self.pool.labels[idx])
            cond, uncond = eps.chunk(2)
            self.pool.advance(idx, uncond + self.pool.scales[idx].view(-1, *([1] * (x.dim() - 1))) * (cond - uncond))
            extra = max(0, batch_size - len(idx))  # the first states' unconditional rows (the draw is random)
            rows = torch.cat([torch.arange(len(idx)), len(idx) + torch.arange(extra)]).to(eps.device)
            return Batch(torch.cat([x, x[:extra]]), torch.cat([t, t[:extra]]), eps[rows], context[rows])
        idx = self.pool.draw(batch_size)
        x, t = self.pool.batch(idx)
        context = _context(self.prompts, self.pool.labels[idx])
        eps = self.label(x, t, context)
        self.pool.advance(idx, eps)
        return Batch(x, t, eps, context)


class DataBatches:
    """Baseline batches from real images: ``x_t = sqrt(a) x_0 + sqrt(1-a) noise``, target = noise
    (or what ``prediction_type`` names: the velocity, or ``x_0``).

    For a text-to-image teacher ``images`` are latents and ``labels`` index each one's caption in
    ``captions`` (the unconditional prompt last, used for a ``dropout`` share of the samples).
    """

    def __init__(
        self,
        images: torch.Tensor,
        alphas_cumprod: torch.Tensor,
        *,
        generator: torch.Generator,
        device: torch.device,
        labels: torch.Tensor | None = None,
        captions: torch.Tensor | None = None,
        dropout: float = 0.0,
        prediction_type: str = "epsilon",
        model_timesteps: torch.Tensor | None = None,
    ) -> None:
        self.images = images
        self.alphas_cumprod = alphas_cumprod.float()
        self.generator = generator
        self.device = device
        self.labels = labels
        self.captions = captions
        self.dropout = dropout
        self.prediction_type = prediction_type
        self.model_timesteps = model_timesteps

    def record(self) -> dict[str, Any]:
        """This source as it is now, for :func:`restore_batches`."""
        return {
            "kind": "data",
            "prediction_type": self.prediction_type,
            "model_timesteps": self.model_timesteps,
            "images": self.images.cpu(),
            "alphas_cumprod": self.alphas_cumprod.cpu(),
            "generator": self.generator.get_state(),
            "labels": self.labels,
            "captions": None if self.captions is None else self.captions.cpu(),
            "dropout": self.dropout,
        }

    def __call__(self, batch_size: int) -> Batch:
        idx = torch.randint(0, len(self.images), (batch_size,), generator=self.generator)
        x0 = self.images[idx]
        t = torch.randint(0, len(self.alphas_cumprod), (batch_size,), generator=self.generator)
        noise = torch.randn(x0.shape, generator=self.generator)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x = noisy(x0, noise, a, self.prediction_type)
        target = prediction_target(x0, noise, a, self.prediction_type)
        t = t if self.model_timesteps is None else self.model_timesteps[t]
        context = None
        if self.labels is not None and self.captions is not None:
            context = _context(self.captions, drop_labels(self.labels[idx], len(self.captions) - 1, self.dropout, self.generator))
        return Batch(x.to(self.device), t.to(self.device), target.to(self.device), context)


def restore_batches(record: dict[str, Any], *, teacher: nn.Module | None, device: torch.device) -> PoolBatches | DataBatches:
    """The batch source a ``record()`` describes, on ``device``; a pool's labels come from ``teacher``."""
    if record["kind"] == "pool":
        prompts = record["prompts"]
        pool = NoisePool.from_record(record["pool"], device=device)
        return PoolBatches(
            teacher,
            pool,
            None if prompts is None else prompts.to(device),
            guided=record["guided"],
            unconditional_rows=record["unconditional_rows"],
        )
    generator = torch.Generator()
    generator.set_state(record["generator"])
    captions = record["captions"]
    return DataBatches(
        record["images"],
        record["alphas_cumprod"],
        generator=generator,
        device=device,
        labels=record["labels"],
        captions=None if captions is None else captions.to(device),
        dropout=record["dropout"],
        prediction_type=record.get("prediction_type", "epsilon"),
        model_timesteps=record.get("model_timesteps"),
    )


class TrainingInputs:
    """Batches ``(x_t, t, target[, context])`` for distilling a teacher, per :class:`PoolOptions`.

    ``prepare`` fills the pool once (data-free) or loads the dataset; ``batches(seed)`` then gives
    a fresh batch source that starts from the same pool snapshot, so runs differ only by seed.
    The target is the teacher's prediction (pool) or the true noise or velocity (dataset), in the
    teacher's parametrisation.

    A text-to-image teacher's pool holds latents, each trajectory generated for one of the study's
    training prompts (``prompts.train``) or, for ``prompt_dropout`` of them, the unconditional
    prompt; its dataset is the captioned images encoded by the teacher's VAE. A guided pool's
    trajectories are all conditional, and ``prompt_dropout`` of a batch's rows are the
    unconditional half of guidance at the batch's own states.
    """

    def __init__(self, settings: MethodSettings, teacher: Teacher, options: PoolOptions, *, device: torch.device) -> None:
        self.settings = settings
        self.teacher = teacher
        self.options = options
        self.device = device
        self.pool: NoisePool | None = None
        self.prompts: torch.Tensor | None = None
        self._snapshot: PoolState | None = None
        self._dataset: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._held_out: Batch | None = None

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        """Conditioning of ``prompts`` and, last, of the unconditional prompt, on the device: text
        embeddings in the UNet's dtype, or a class-conditional teacher's class ids and null class."""
        text = self.teacher.text
        if text is None:
            classes = self.teacher.classes.prompts(prompts)
            return torch.cat([classes.embeddings, classes.negative]).to(self.device)
        table = torch.cat([text.encode(prompts), text.encode([self.settings.sampling.negative_prompt])])
        return table.to(self.device, next(self.teacher.unet.parameters()).dtype)

    @torch.no_grad()
    def _load_dataset(self) -> None:
        from automl_diff.zoo import captioned_images, dataset_images

        dataset = self.settings.dataset or self.teacher.dataset
        t = self.teacher
        if t.text is None:
            self._dataset = dataset_images(dataset, resolution=t.resolution, channels=t.channels)
            return
        images, captions = captioned_images(dataset, resolution=t.resolution, channels=t.channels)
        unique = sorted(set(captions))
        self.prompts = self._encode(unique)
        self._labels = torch.tensor([unique.index(c) for c in captions])
        vae = t.text.vae
        latents = []
        for start in range(0, len(images), 16):  # the latent mean: the same x_0 on every draw
            batch = images[start : start + 16].to(t.text.device, vae.dtype)
            mean = vae.encode(batch).latent_dist.mean.float().cpu()
            latents.append((mean - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor)
        self._dataset = torch.cat(latents)

    def prepare(self) -> None:
        if self.options.source == "dataset":
            if self._dataset is None:
                self._load_dataset()
            return
        if self._snapshot is not None:
            return
        unet = self.teacher.unet
        if self.teacher.latent is not None:
            self.prompts = self._encode(list(self.settings.train_prompts))
        schedule = self.teacher.noise_schedule()
        size = self.teacher.latent_resolution
        self.pool = NoisePool(
            size=self.options.pool_size,
            sample_shape=(int(unet.config.in_channels), size, size),
            alphas_cumprod=schedule.alphas_cumprod,
            num_steps=self.options.pool_steps,
            eta=self.options.pool_eta,
            clip_sample=schedule.clip_sample,
            clip_range=schedule.clip_range,
            generator=torch.Generator().manual_seed(self.settings.seed),
            device=self.device,
            num_labels=0 if self.prompts is None else len(self.prompts) - 1,
            # a guided pool's trajectories are all conditional, as sampling's are: its
            # unconditional rows are the other half of guidance at those states
            label_dropout=0.0 if self.guided else self.options.prompt_dropout,
            guidance=self._guidance(),
            prediction_type=schedule.prediction_type,
            model_timesteps=schedule.timesteps,
        )
        labeller = self._labeller()
        with torch.no_grad():
            self.pool.warm_up(labeller.moving, batch_size=max(self.settings.budgets.batch_size, 256))
        self._snapshot = self.pool.state()

    @property
    def guided(self) -> bool:
        """Whether the pool is guided: a latent (text or class) teacher, ``guided_pool``, guidance above 1."""
        return self._guidance() is not None

    def _guidance(self) -> tuple[float, float] | None:
        """The pool's guidance range (None: unguided)."""
        if self.teacher.latent is None or not self.options.guided_pool:
            return None
        scales = self.options.pool_guidance or (self.settings.sampling.guidance_scale,)
        low, high = scales[0], scales[-1]
        return None if high <= 1.0 else (low, high)

    def _labeller(self) -> PoolBatches:
        return PoolBatches(self.teacher.unet, self.pool, self.prompts, guided=self.guided, unconditional_rows=self.options.prompt_dropout)

    def _data_batches(self, generator: torch.Generator) -> DataBatches:
        schedule = self.teacher.noise_schedule()
        return DataBatches(
            self._dataset,
            schedule.alphas_cumprod,
            generator=generator,
            device=self.device,
            labels=self._labels,
            captions=self.prompts,
            dropout=self.options.prompt_dropout,
            prediction_type=schedule.prediction_type,
            model_timesteps=schedule.timesteps,
        )

    def held_out(self, samples: int) -> Batch:
        """A fixed batch that every run is scored on and none trains on: ``samples`` of the
        teacher's trajectories, taken from the pool's snapshot and moved one step on with noise
        of their own (states the training pool never holds), labelled by the teacher; or
        ``samples`` noised images of the dataset. The same batch on every call."""
        self.prepare()
        if self._held_out is None or len(self._held_out[0]) != samples:
            generator = torch.Generator().manual_seed(self.settings.seed + 7919)
            if self.options.source == "dataset":
                self._held_out = self._data_batches(generator)(samples)
            else:
                self.pool.load_state(self._snapshot)
                saved, self.pool.generator = self.pool.generator, generator
                labeller = self._labeller()
                idx = self.pool.draw(samples)
                x, t = self.pool.batch(idx)
                self.pool.advance(idx, labeller.moving(x, t, idx))
                x, t = self.pool.batch(idx)
                if labeller.guided:
                    eps, context = labeller.both(x, t, self.pool.labels[idx])
                    self._held_out = Batch(torch.cat([x, x]), torch.cat([t, t]), eps, context)
                else:
                    context = _context(self.prompts, self.pool.labels[idx])
                    self._held_out = Batch(x, t, labeller.label(x, t, context), context)
                self.pool.generator = saved
                self.pool.load_state(self._snapshot)
        return self._held_out

    def batches(self, seed: int) -> PoolBatches | DataBatches:
        """A batch source for one run, seeded with ``seed``."""
        self.prepare()
        generator = torch.Generator().manual_seed(seed)
        if self.options.source == "dataset":
            return self._data_batches(generator)
        self.pool.load_state(self._snapshot)
        self.pool.generator = generator
        self.pool.completed = 0
        return self._labeller()
