"""What the shipped text-to-image teachers share: a word-level CLIP tokenizer, a small CLIP text
encoder, Stable Diffusion's noise schedule, and the two training loops (the ``AutoencoderKL``,
then the conditional UNet and the text encoder together on its latents).

Each teacher (:mod:`~automl_diff.zoo.digits_t2i`, :mod:`~automl_diff.zoo.shapes_t2i`) brings its
images, its captions and its configs; the loops draw their batches, noise and timesteps from one
seeded generator, so a teacher retrains to the same weights on the same machine.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from automl_diff.zoo.digits import warmup_cosine

__all__ = [
    "SCHEDULER_CONFIG",
    "TextToImageResult",
    "VaeResult",
    "encode_latents",
    "progress_bar",
    "save_pipeline",
    "text_encoder",
    "train_text_to_image",
    "train_vae",
    "train_with_ema",
    "word_tokenizer",
]

#: SD's noise schedule (scaled linear betas), sampled with DDIM.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

#: Images encoded per VAE call where a whole dataset is encoded (the digits fit in one).
_ENCODE_CHUNK = 2048


def word_tokenizer(words: Sequence[str], *, max_length: int) -> Any:
    """A ``CLIPTokenizer`` that spells every word of ``words`` as one token, any other word letter
    by letter.

    Each word's characters are merged left to right; where another word's merge ranks earlier and
    splits a word differently, a merge of its leftover parts is appended (ranked last, so no word
    already whole changes)."""
    from transformers import CLIPTokenizer

    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for word in sorted(words):
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            rule = f"{parts[0]} {parts[1]}"
            if rule not in merges:
                merges.append(rule)
            vocab.setdefault(merged, len(vocab))
            parts = [merged, *parts[2:]]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))

    def build() -> Any:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
            (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
            files = str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt")
            return CLIPTokenizer(*files, pad_token="<|endoftext|>", model_max_length=max_length)

    tokenizer = build()
    for word in sorted(words):
        while len(parts := tokenizer.tokenize(word)) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            tokenizer = build()
    return tokenizer


def text_encoder(tokenizer: Any, *, hidden_size: int, intermediate_size: int, heads: int, layers: int = 2) -> nn.Module:
    """A randomly initialised ``CLIPTextModel`` for ``tokenizer``'s vocabulary and length."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )


def encode_latents(vae: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior means and standard deviations of ``images``, a chunk at a time."""
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(images), _ENCODE_CHUNK):
            posterior = vae.encode(images[start : start + _ENCODE_CHUNK]).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@dataclass(frozen=True)
class VaeResult:
    vae: nn.Module
    seconds: float
    reconstruction: float
    scaling_factor: float


def train_vae(
    images: torch.Tensor,
    config: dict[str, Any],
    *,
    seed: int = 0,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 2e-3,
    kl_weight: float = 1e-4,
    weights: torch.Tensor | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> VaeResult:
    """Train an ``AutoencoderKL(**config)`` on ``images`` (L1 + MSE reconstruction, a small KL
    term) and set its ``scaling_factor`` to one over the latents' standard deviation, as SD's.
    Its reconstruction error is measured on the first 2048 images (all of a smaller dataset).

    Args:
        weights: per-pixel weights of the reconstruction terms, one map per image broadcastable
            against it (``(N, 1, H, W)``), so that small objects are not averaged away; None
            weighs every pixel alike.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL(**config)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    start = time.perf_counter()
    vae.train()
    loss_value = float("nan")
    for step in range(steps):
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        x = images[index]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        out = vae.decode(z).sample
        if weights is None:
            fit = F.l1_loss(out, x) + F.mse_loss(out, x)
        else:
            error = out - x
            fit = (weights[index] * (error.abs() + error.square())).mean()
        loss = fit + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        lr_sched.step()
        loss_value = loss.item()
        if progress is not None:
            progress(step, loss_value)
    vae.eval()
    latents, _ = encode_latents(vae, images)
    with torch.no_grad():  # on the first chunk of images (all of a small dataset)
        x = images[:_ENCODE_CHUNK]
        reconstruction = F.mse_loss(vae.decode(latents[: len(x)]).sample.clamp(-1, 1), x).item()
    scale = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scale)
    return VaeResult(vae.requires_grad_(False), time.perf_counter() - start, reconstruction, scale)


@dataclass(frozen=True)
class TextToImageResult:
    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: Any
    seconds: float
    final_loss: float


def _noise_loss(pred: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, x0_weight_cap: float) -> torch.Tensor:
    """The noise prediction's MSE, each sample weighted ``1 + min(1 / SNR, x0_weight_cap)`` where
    the cap is set (``alpha``: the samples' cumulative alphas)."""
    if not x0_weight_cap:
        return F.mse_loss(pred, noise)
    weight = 1 + ((1 - alpha) / alpha).clamp(max=x0_weight_cap)
    return (weight * (pred - noise).square().mean((1, 2, 3))).mean()


def train_text_to_image(
    vae: nn.Module,
    images: torch.Tensor,
    captions: torch.Tensor,
    *,
    tokenizer: Any,
    text_model: Callable[[], nn.Module],
    unet_config: dict[str, Any],
    seed: int = 0,
    steps: int = 8000,
    batch_size: int = 64,
    lr: float = 2e-3,
    ema_decay: float = 0.999,
    dropout: float = 0.1,
    x0_weight_cap: float = 0.0,
    progress: Callable[[int, float], None] | None = None,
) -> TextToImageResult:
    """Train a ``UNet2DConditionModel(**unet_config)`` and a text encoder (``text_model()``, built
    after the seed) together on the latents of ``images``, each image with a random one of its
    captions, replaced by the empty prompt with probability ``dropout`` (what guidance's
    unconditional half learns from). Returns the EMA weights of both.

    Args:
        captions: ``(N, K, L)`` token ids: image ``i``'s ``K`` phrasings, padded to ``L``.
        x0_weight_cap: adds the clean-latent loss to the noise loss: per sample, the noise loss is
            weighted ``1 + min(1 / SNR(t), x0_weight_cap)`` (the clean-latent loss is the noise
            loss times ``1 / SNR``), so that the noisiest steps, where the prompt alone decides
            the layout, teach it; the UNet still predicts the noise. 0: the noise loss alone.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    means, stds = encode_latents(vae, images)
    scale = vae.config.scaling_factor
    length = captions.shape[-1]
    empty = tokenizer([""], padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    text = text_model()
    unet = UNet2DConditionModel(**unet_config)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_text = copy.deepcopy(text).requires_grad_(False)
    noise_scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one", "steps_offset")})

    def loss_of(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(means), (batch_size,), generator=generator)
        z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=generator)) * scale
        phrasing = torch.randint(0, captions.shape[1], (batch_size,), generator=generator)
        tokens = captions[idx, phrasing].clone()
        drop = torch.rand(batch_size, generator=generator) < dropout
        tokens[drop] = empty[0]
        noise = torch.randn(z.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        states = text(tokens)[0]
        pred = unet(noise_scheduler.add_noise(z, noise, t), t, encoder_hidden_states=states).sample
        return _noise_loss(pred, noise, noise_scheduler.alphas_cumprod[t], x0_weight_cap)

    seconds, loss_value = train_with_ema(
        ((unet, ema_unet), (text, ema_text)), loss_of, steps=steps, lr=lr, ema_decay=ema_decay, progress=progress
    )
    return TextToImageResult(ema_unet.eval(), ema_text.eval(), tokenizer, DDIMScheduler(**SCHEDULER_CONFIG), seconds, loss_value)


def train_with_ema(
    pairs: Sequence[tuple[nn.Module, nn.Module]],
    loss_of: Callable[[int], torch.Tensor],
    *,
    steps: int,
    lr: float,
    ema_decay: float,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[float, float]:
    """Train the first module of each ``(model, ema)`` pair on ``loss_of(step)`` with AdamW (a
    warm-up then cosine learning rate, gradients clipped to norm 1), the second following it as
    an exponential moving average (decay ramped up to ``ema_decay``); returns the seconds taken
    and the last loss."""
    params = [p for model, _ in pairs for p in model.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    start = time.perf_counter()
    for model, _ in pairs:
        model.train()
    loss_value = float("nan")
    for step in range(steps):
        loss = loss_of(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for model, ema in pairs:
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1 - decay)
        loss_value = loss.item()
        if progress is not None:
            progress(step, loss_value)
    return time.perf_counter() - start, loss_value


def progress_bar(total: int, desc: str) -> tuple[Any, Callable[[int, float], None]]:
    """A tqdm bar on stderr and the ``progress(step, loss)`` callback that advances it."""
    import sys

    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, mininterval=5)

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss:.4f}")

    return bar, progress


def save_pipeline(out: Path, vae: nn.Module, result: TextToImageResult) -> None:
    """Write a ``StableDiffusionPipeline`` folder (safetensors only, no safety checker)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=result.text_encoder,
        tokenizer=result.tokenizer,
        unet=result.unet,
        scheduler=result.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
