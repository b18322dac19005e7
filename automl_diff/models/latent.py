"""What a latent diffusion model needs around its denoiser to make images: the frozen VAE.

:class:`LatentParts` is shared by the text-to-image pipelines (:mod:`~automl_diff.models.text`,
which add the text encoder and tokenizer) and the class-conditional ones
(:mod:`~automl_diff.models.classes`, DiT), so that resolution, channels and decoding are one code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["LatentParts"]


@dataclass
class LatentParts:
    """The frozen parts of a latent pipeline around its denoiser.

    Attributes:
        vae: the ``AutoencoderKL`` whose latent space the denoiser works in.
    """

    vae: nn.Module

    def __post_init__(self) -> None:
        for part in self.frozen():
            part.eval().requires_grad_(False)

    def frozen(self) -> list[nn.Module]:
        """The modules that never train (moved and cast together)."""
        return [self.vae]

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def to(self, device: str | torch.device, *, dtype: torch.dtype | None = None) -> Any:
        for part in self.frozen():
            part.to(device) if dtype is None else part.to(device=device, dtype=dtype)
        return self

    @property
    def vae_scale_factor(self) -> int:
        """How many image pixels one latent pixel stands for, per side (diffusers' rule)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.out_channels)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from final latents (``vae.decode(latents / scaling_factor)``)."""
        scale = self.vae.config.scaling_factor
        return self.vae.decode(latents.to(self.vae.dtype) / scale, return_dict=False)[0].float().clamp(-1, 1)
