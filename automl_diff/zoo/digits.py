"""The built-in digits benchmark: a small DDPM teacher and the classifier whose features drive FID.

Both are trained on scikit-learn's handwritten digits (16x16, one channel, [-1, 1]) by
``python -m automl_diff.zoo.train_digits`` with fixed seeds, and ship inside the package as
safetensors (``automl_diff/zoo/digits/``). Nothing here runs at import time.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CLASSIFIER_FILE",
    "DIGITS_DIR",
    "DIGIT_WORDS",
    "SCHEDULER_CONFIG",
    "TEACHER_CONFIG",
    "DigitsClassifier",
    "captioned_digits",
    "load_classifier",
    "load_digits",
    "train_classifier",
    "train_teacher",
    "warmup_cosine",
]

DIGITS_DIR = Path(__file__).resolve().parent / "digits"
CLASSIFIER_FILE = DIGITS_DIR / "classifier.safetensors"

#: The words the digits are named by (``a handwritten seven``: the captioned ``digits`` dataset).
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def load_digits(*, resolution: int = 16, with_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 handwritten digits, resized (bilinear) to ``resolution``, in [-1, 1].

    Returns:
        ``(1797, 1, resolution, resolution)`` float32 images, plus the labels if ``with_labels``.
    """
    import numpy as np
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    if resolution != images.shape[-1]:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 2 - 1).contiguous()
    if with_labels:
        return images, torch.from_numpy(bunch.target.astype(np.int64))
    return images


def captioned_digits(*, resolution: int = 16) -> tuple[torch.Tensor, list[str]]:
    """The digits with a caption each: ``a handwritten <digit>``."""
    images, labels = load_digits(resolution=resolution, with_labels=True)
    return images, [f"a handwritten {DIGIT_WORDS[int(label)]}" for label in labels]


#: The teacher: a diffusers UNet2DModel, 16x16x1, three levels, attention at 4x4.
TEACHER_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 16,
}

#: Cosine noise schedule over 1000 training steps, epsilon prediction.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
}


class DigitsClassifier(nn.Module):
    """A small CNN for 16x16 digits; :meth:`features` (64-d) is the FID feature space."""

    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Linear(64 * 16, 128),
            nn.ReLU(),
            nn.Linear(128, self.feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1, 16, 16)`` images in [-1, 1] -> ``(N, 64)`` features."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_classifier(path: Path | str = CLASSIFIER_FILE) -> DigitsClassifier:
    """The shipped classifier (eval mode, CPU)."""
    from safetensors.torch import load_file

    model = DigitsClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translations of up to one pixel (pads with background -1)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


@dataclass(frozen=True)
class ClassifierResult:
    model: DigitsClassifier
    accuracy: float
    seconds: float


def classifier_split(count: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed 80/20 split of ``count`` digits the classifier is trained on (seed ``seed``):
    ``(train indices, held-out indices)``. The shipped classifier used seed 0."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * count)
    return order[:split], order[split:]


def train_classifier(*, seed: int = 0, epochs: int = 30, batch_size: int = 64) -> ClassifierResult:
    """Train the digits classifier on a fixed 80/20 split (:func:`classifier_split`); accuracy is
    on the held-out 20%."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digits(resolution=16, with_labels=True)
    train_idx, test_idx = classifier_split(len(images), seed=seed)
    torch.randperm(len(images), generator=generator)  # the draw the split consumed, so training draws stay as they were
    model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=generator)]
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(_shift(images[idx], generator)), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test_idx]).argmax(1) == labels[test_idx]).float().mean().item()
    return ClassifierResult(model, accuracy, time.perf_counter() - start)


def warmup_cosine(steps: int, warmup: int = 200) -> Callable[[int], float]:
    """The learning-rate factor of step ``step``: linear warm-up over ``warmup`` steps, then a
    cosine decay to 0 at ``steps`` (the shipped teachers' schedule)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


@dataclass(frozen=True)
class TeacherResult:
    unet: nn.Module
    scheduler: Any
    seconds: float
    final_loss: float


def train_teacher(
    *,
    seed: int = 0,
    steps: int = 6000,
    batch_size: int = 64,
    lr: float = 2e-3,
    ema_decay: float = 0.999,
    progress: Callable[[int, float], None] | None = None,
) -> TeacherResult:
    """Train the DDPM teacher on all 1797 digits; returns the EMA weights.

    Args:
        seed: seeds initialisation, batches, noise and timesteps.
        steps: optimiser steps.
        batch_size: images per step.
        lr: peak AdamW learning rate (linear warm-up over 200 steps, cosine decay).
        ema_decay: decay of the exponential moving average of the weights that is returned.
        progress: called as ``progress(step, loss)`` after each step.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images = load_digits(resolution=16)
    unet = UNet2DModel(**TEACHER_CONFIG)
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    start = time.perf_counter()
    loss_value = float("nan")
    unet.train()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=generator)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        pred = unet(scheduler.add_noise(x0, noise, t), t).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        loss_value = loss.item()
        if progress is not None:
            progress(step, loss_value)
    return TeacherResult(ema.eval(), scheduler, time.perf_counter() - start, loss_value)
