"""``digits-t2i``: a tiny Stable Diffusion-style text-to-image teacher for the digits.

A real ``StableDiffusionPipeline`` folder (``automl_diff/zoo/digits_t2i/``) that
``StableDiffusionPipeline.from_pretrained`` loads and samples with guidance on a CPU:

- an ``AutoencoderKL`` from 16x16 grey digits to 8x8x4 latents, its ``scaling_factor`` set so that
  latents have unit variance, as SD's;
- a ``CLIPTextModel`` with a ``CLIPTokenizer`` whose vocabulary holds every word of the prompts
  as one token (:func:`word_tokenizer`);
- a ``UNet2DConditionModel`` with SD's block kinds (``CrossAttnDownBlock2D``,
  ``UNetMidBlock2DCrossAttn``, ``CrossAttnUpBlock2D``), trained on the latents of all 1797 digits
  with prompts that name the digit in several phrasings (:data:`TEMPLATES`) and prompt dropout,
  so that classifier-free guidance works; the text encoder trains with it.

``python -m automl_diff.zoo.train_digits_t2i --out automl_diff/zoo/digits_t2i`` retrains it with
fixed seeds. :func:`digit_of` reads the digit a prompt asks for, which the shipped digits
classifier checks on the generated image (``prompt_accuracy``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from automl_diff.zoo import text_to_image
from automl_diff.zoo.digits import DIGIT_WORDS, load_digits
from automl_diff.zoo.text_to_image import SCHEDULER_CONFIG, TextToImageResult, VaeResult

__all__ = [
    "DIGITS_T2I_DIR",
    "GUIDANCE_SCALE",
    "NUMBER_WORDS",
    "SCHEDULER_CONFIG",
    "TEMPLATES",
    "UNET_CONFIG",
    "VAE_CONFIG",
    "digit_of",
    "prompt_for",
    "train_text_to_image",
    "train_vae",
    "word_tokenizer",
]

DIGITS_T2I_DIR = Path(__file__).resolve().parent / "digits_t2i"

#: The digits' names (the captioned ``digits`` dataset's words).
NUMBER_WORDS = DIGIT_WORDS

#: Phrasings of "digit d": ``{word}`` is its name, ``{num}`` its numeral.
TEMPLATES = (
    "a handwritten {word}",
    "the digit {num}",
    "a {num}",
    "the number {word}",
    "a picture of a {word}",
    "handwritten {num}",
    "a drawing of the digit {word}",
    "number {num} written by hand",
)

#: The guidance scale the pipeline is evaluated at (its quality in BENCHMARKS.md): chosen on noise
#: seed 0 among 1.5, 2 and 3 as the lowest FID whose prompt accuracy is at least 0.99.
GUIDANCE_SCALE = 1.5

#: The text encoder's width (the UNet's ``cross_attention_dim``).
TEXT_WIDTH = 32

#: The tokenizer's padded length (the longest prompt is 8 tokens with its two markers).
MAX_TOKENS = 12

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 16,
}

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": TEXT_WIDTH,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

_WORDS = {word: d for d, word in enumerate(NUMBER_WORDS)}


def prompt_for(digit: int, template: int) -> str:
    """Template ``template`` of :data:`TEMPLATES` filled in for ``digit``."""
    return TEMPLATES[template].format(word=NUMBER_WORDS[digit], num=digit)


def digit_of(prompt: str) -> int | None:
    """The digit a prompt asks for: the first numeral or number word in it (None: none)."""
    for token in re.findall(r"[a-z]+|\d", prompt.lower()):
        if token.isdigit():
            return int(token)
        if token in _WORDS:
            return _WORDS[token]
    return None


def _vocabulary() -> list[str]:
    words = {w for template in TEMPLATES for w in re.findall(r"[a-z]+", template)}
    return sorted(words | set(NUMBER_WORDS) | {str(d) for d in range(10)})


def word_tokenizer(words: Sequence[str], *, max_length: int = MAX_TOKENS) -> Any:
    """A ``CLIPTokenizer`` that spells every word of ``words`` as one token (:func:`automl_diff.zoo.text_to_image.word_tokenizer`)."""
    return text_to_image.word_tokenizer(words, max_length=max_length)


def train_vae(*, seed: int = 0, steps: int = 3000, batch_size: int = 64, **options: Any) -> VaeResult:
    """Train the autoencoder on all 1797 digits (:func:`automl_diff.zoo.text_to_image.train_vae`;
    ``options``: its ``lr``, ``kl_weight``, ``progress``)."""
    images = load_digits(resolution=16)
    return text_to_image.train_vae(images, VAE_CONFIG, seed=seed, steps=steps, batch_size=batch_size, **options)


def train_text_to_image(vae: nn.Module, *, seed: int = 0, steps: int = 8000, batch_size: int = 64, **options: Any) -> TextToImageResult:
    """Train the conditional UNet and the text encoder together on the latents of all 1797 digits,
    each image with a random phrasing of its digit (:data:`TEMPLATES`), the prompt dropped with
    probability 0.1 (:func:`automl_diff.zoo.text_to_image.train_text_to_image`; ``options``: its
    ``lr``, ``ema_decay``, ``dropout``, ``progress``)."""
    images, labels = load_digits(resolution=16, with_labels=True)
    tokenizer = word_tokenizer(_vocabulary())
    prompts = [[prompt_for(d, k) for k in range(len(TEMPLATES))] for d in range(10)]
    ids = torch.stack([tokenizer(p, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids for p in prompts])
    return text_to_image.train_text_to_image(
        vae,
        images,
        ids[labels],
        tokenizer=tokenizer,
        text_model=lambda: text_to_image.text_encoder(tokenizer, hidden_size=TEXT_WIDTH, intermediate_size=64, heads=4),
        unet_config=UNET_CONFIG,
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        **options,
    )
