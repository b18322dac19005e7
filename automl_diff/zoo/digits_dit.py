"""The shipped ``digits-dit`` teacher: a class-conditional diffusion transformer (DiT) on the
digits, in the latent space of the ``digits-t2i`` teacher's autoencoder.

A ``DiTTransformer2DModel`` (6 blocks of width 128, patch 2: 16 tokens of the 8x8x4 latents of a
16x16 digit) learns the noise of the latents of all 1797 digits, each conditioned on its digit's
class, the class replaced by the null class with probability 0.1 (what guidance's unconditional
half learns from). It keeps DiT's layout: adaptive layer norm (``ada_norm_zero``) conditioned on the
timestep and the class, and 1000 class embeddings (ImageNet's count, so that diffusers'
``DiTPipeline``, whose null class is id 1000, guides it), of which the digits use the first ten.
The pipeline folder names the classes (``id2label``: ``zero`` ... ``nine``). Retrained by
``python -m automl_diff.zoo.train_digits_dit``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from automl_diff.zoo.digits import DIGIT_WORDS, load_digits
from automl_diff.zoo.text_to_image import SCHEDULER_CONFIG, encode_latents, train_with_ema

__all__ = ["CLASSES", "DIGITS_DIT_DIR", "GUIDANCE_SCALE", "TRANSFORMER_CONFIG", "DiTResult", "save_dit_pipeline", "train_dit"]

DIGITS_DIT_DIR = Path(__file__).parent / "digits_dit"
#: The classes the teacher was trained on, by id: the digits' names.
CLASSES = dict(enumerate(DIGIT_WORDS))
#: The classifier-free guidance the teacher is sampled with by default.
GUIDANCE_SCALE = 1.5
#: ImageNet's class count: the null class is id 1000, as diffusers' ``DiTPipeline`` assumes.
NUM_EMBEDS = 1000

TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 6,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "num_embeds_ada_norm": NUM_EMBEDS,
    "norm_type": "ada_norm_zero",
}


@dataclass(frozen=True)
class DiTResult:
    transformer: nn.Module
    seconds: float
    final_loss: float


def train_dit(
    vae: nn.Module,
    *,
    seed: int = 0,
    steps: int = 8000,
    batch_size: int = 64,
    lr: float = 5e-4,
    ema_decay: float = 0.999,
    dropout: float = 0.1,
    progress: Any = None,
) -> DiTResult:
    """Train the transformer on the latents ``vae`` gives the digits (every batch, noise and
    timestep drawn from one generator seeded with ``seed``); returns its EMA weights."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digits(resolution=16, with_labels=True)
    means, stds = encode_latents(vae, images)
    scale = vae.config.scaling_factor
    transformer = DiTTransformer2DModel(**TRANSFORMER_CONFIG)
    ema = DiTTransformer2DModel(**TRANSFORMER_CONFIG).requires_grad_(False)
    ema.load_state_dict(transformer.state_dict())
    noise_scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one", "steps_offset")})

    def loss_of(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(means), (batch_size,), generator=generator)
        z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=generator)) * scale
        classes = labels[idx].clone()
        classes[torch.rand(batch_size, generator=generator) < dropout] = NUM_EMBEDS
        noise = torch.randn(z.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        pred = transformer(noise_scheduler.add_noise(z, noise, t), timestep=t, class_labels=classes).sample
        return torch.nn.functional.mse_loss(pred, noise)

    seconds, loss = train_with_ema(((transformer, ema),), loss_of, steps=steps, lr=lr, ema_decay=ema_decay, progress=progress)
    return DiTResult(ema.eval(), seconds, loss)


def save_dit_pipeline(out: Path, vae: nn.Module, transformer: nn.Module) -> None:
    """Write a ``DiTPipeline`` folder (safetensors only) with DDIM on SD's noise schedule and the
    class names in ``model_index.json``."""
    import json

    from diffusers import DDIMScheduler, DiTPipeline

    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(**SCHEDULER_CONFIG)).save_pretrained(out, safe_serialization=True)
    index = json.loads((out / "model_index.json").read_text())
    index["id2label"] = {str(k): v for k, v in CLASSES.items()}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
