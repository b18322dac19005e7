"""``shapes-t2i``: a text-to-image teacher with Stable Diffusion 1.5's own layout, scaled down.

A real ``StableDiffusionPipeline`` folder (``automl_diff/zoo/shapes_t2i/``, with the dataset's
classifier beside it) trained on the
``shapes`` dataset (:mod:`automl_diff.zoo.shapes`: 64x64 RGB scenes captioned with five
attributes, so prompts are compositional):

- an ``AutoencoderKL`` with SD's four levels, compressing 8x per side to 4 latent channels
  (64x64x3 -> 8x8x4, 48x fewer values, as SD's), its ``scaling_factor`` set so that latents have
  unit variance;
- a ``CLIPTextModel`` with a ``CLIPTokenizer`` that holds every word of the captions as one token;
- a ``UNet2DConditionModel`` with SD-1.5's block layout: four levels; two resnet + transformer
  pairs per down stage and three per up stage; cross-attention in the first three levels and none
  in the last (``DownBlock2D``, ``UpBlock2D``); a mid block with attention; no downsampler after
  the last level. So BK-SDM's rules, DiP-GO's branch units and DeepCache's skip branches apply
  as they do to SD.

``python -m automl_diff.zoo.train_shapes_t2i --out automl_diff/zoo/shapes_t2i`` retrains it with
fixed seeds, with the dataset's classifier (the ``shapes`` FID features and prompt judge).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from automl_diff.zoo import shapes, text_to_image
from automl_diff.zoo.text_to_image import SCHEDULER_CONFIG, TextToImageResult, VaeResult

__all__ = [
    "GUIDANCE_SCALE",
    "MAX_TOKENS",
    "SCHEDULER_CONFIG",
    "SHAPES_T2I_DIR",
    "SHAPE_WEIGHT",
    "UNET_CONFIG",
    "VAE_CONFIG",
    "X0_WEIGHT_CAP",
    "reconstruction_error",
    "train_text_to_image",
    "train_vae",
    "vocabulary",
]

SHAPES_T2I_DIR = Path(__file__).resolve().parent / "shapes_t2i"

#: The guidance scale the pipeline is evaluated at: among 1.5, 2, 3 and 4, the lowest FID whose
#: prompt accuracy is within 2 points of the best, on 480 images of noise seed 0 (BENCHMARKS.md).
GUIDANCE_SCALE = 2.0

#: How much more the autoencoder's loss weighs the shape's pixels than the background's (the
#: shape covers about 7% of an image; weighed alike, the autoencoder loses its colour).
SHAPE_WEIGHT = 10.0

#: The cap of the clean-latent loss's weight in the UNet's training
#: (:func:`automl_diff.zoo.text_to_image.train_text_to_image`'s ``x0_weight_cap``): with the noise
#: loss alone the UNet ignores the prompt's position (BENCHMARKS.md).
X0_WEIGHT_CAP = 20.0

#: The tokenizer's padded length (the longest caption is 16 tokens with its two markers).
MAX_TOKENS = 20

#: The text encoder's width (the UNet's ``cross_attention_dim``).
TEXT_WIDTH = 64

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": shapes.RESOLUTION,
}

UNET_CONFIG: dict[str, Any] = {
    "sample_size": shapes.RESOLUTION // 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 48, 64, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
    "cross_attention_dim": TEXT_WIDTH,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}


def vocabulary() -> list[str]:
    """Every word of every caption (:data:`automl_diff.zoo.shapes.TEMPLATES`), the comma included."""
    words = {w for template in shapes.TEMPLATES for w in re.findall(r"[a-z]+", re.sub(r"\{\w+\}", "", template))}
    for _, options in shapes.ATTRIBUTES:
        words |= {w for option in options for w in option.split()}
    return sorted(words | {","})


def train_vae(
    *,
    seed: int = 0,
    steps: int = 1200,
    batch_size: int = 32,
    count: int = shapes.DATASET_SIZE,
    shape_weight: float = SHAPE_WEIGHT,
    progress: Callable[[int, float], None] | None = None,
) -> VaeResult:
    """Train the autoencoder on ``count`` scenes of the dataset's seed (all of the dataset by
    default), the shape's pixels weighted ``shape_weight`` times the background's
    (:func:`automl_diff.zoo.shapes.shape_mask`, :func:`automl_diff.zoo.text_to_image.train_vae`)."""
    scenes = shapes.draw_scenes(count, seed=0)
    images = shapes.render(scenes)
    weights = 1 + (shape_weight - 1) * shapes.shape_mask(scenes, images)
    return text_to_image.train_vae(images, VAE_CONFIG, seed=seed, steps=steps, batch_size=batch_size, weights=weights, progress=progress)


def reconstruction_error(vae: nn.Module, *, count: int = 512) -> tuple[float, float]:
    """The autoencoder's mean squared error on the dataset's first ``count`` scenes (their latents'
    means decoded, clamped to [-1, 1]): over all pixels, and over the shape's pixels alone."""
    scenes = shapes.draw_scenes(count, seed=0)
    images = shapes.render(scenes)
    mask = shapes.shape_mask(scenes, images)
    with torch.no_grad():
        error = (vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1) - images).square()
    return error.mean().item(), ((error * mask).sum() / (mask.sum() * error.shape[1])).item()


def train_text_to_image(
    vae: nn.Module,
    *,
    seed: int = 0,
    steps: int = 4500,
    batch_size: int = 64,
    count: int = shapes.DATASET_SIZE,
    progress: Callable[[int, float], None] | None = None,
) -> TextToImageResult:
    """Train the conditional UNet and the text encoder together on the latents of ``count`` scenes
    of the dataset's seed (all of the dataset by default), each
    image with a random phrasing of its scene, the prompt dropped with probability 0.1, the noisiest
    steps weighted up (:data:`X0_WEIGHT_CAP`; :func:`automl_diff.zoo.text_to_image.train_text_to_image`)."""
    scenes = shapes.draw_scenes(count, seed=0)
    images = shapes.render(scenes)
    tokenizer = text_to_image.word_tokenizer(vocabulary(), max_length=MAX_TOKENS)
    captions = [[shapes.caption(a, k) for k in range(len(shapes.TEMPLATES))] for a in scenes.attributes]
    ids = torch.stack([tokenizer(c, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids for c in captions])
    return text_to_image.train_text_to_image(
        vae,
        images,
        ids,
        tokenizer=tokenizer,
        text_model=lambda: text_to_image.text_encoder(tokenizer, hidden_size=TEXT_WIDTH, intermediate_size=128, heads=4),
        unet_config=UNET_CONFIG,
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        x0_weight_cap=X0_WEIGHT_CAP,
        progress=progress,
    )
