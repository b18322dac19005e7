"""A CLIP model from the local Hugging Face cache or a folder, shared by ``clip_score`` and the
``clip`` FID features.

The model is never downloaded here: an offline machine without it gets one line saying what to
download. Any transformers ``CLIPModel`` works (ViT-B/16, ViT-L/14, ViT-g/14 or a tiny folder);
images are resized to its vision tower's input size and normalised with its processor's mean and
standard deviation, all on tensors, so a batch never round-trips through PIL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from automl_diff.errors import UserError

__all__ = ["CLIP_MODEL", "Clip", "load_clip"]

#: The CLIP model ``clip_score`` (and ``clip`` features) use unless the study names another.
CLIP_MODEL = "openai/clip-vit-base-patch16"


@dataclass
class Clip:
    """A loaded CLIP model and its processor.

    Attributes:
        name: what it was loaded from (a hub id or a folder).
        model: the ``CLIPModel`` (eval mode, on ``device``).
        processor: its ``CLIPProcessor`` (the tokenizer and the image statistics).
        device: where the model runs.
    """

    name: str
    model: Any
    processor: Any
    device: torch.device

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's vision input for images in [-1, 1], ``(N, C, H, W)`` (grey repeated to RGB):
        resized (bicubic, antialiased) to the vision tower's size and normalised."""
        image_processor = self.processor.image_processor
        x = (images.float().clamp(-1, 1) + 1) / 2
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        size = self.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        mean = torch.tensor(image_processor.image_mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(image_processor.image_std, dtype=x.dtype).view(1, -1, 1, 1)
        return ((x - mean) / std).to(self.device)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings (not normalised), ``(N, projection_dim)``."""
        vision = self.model.vision_model(pixel_values=self.pixels(images))
        return self.model.visual_projection(vision.pooler_output).float()

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Projected text embeddings (not normalised), ``(N, projection_dim)``."""
        tokens = self.processor.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        text = self.model.text_model(**{k: v.to(self.device) for k, v in tokens.items()})
        return self.model.text_projection(text.pooler_output).float()


_LOADED: dict[tuple[str, str], Clip] = {}


def load_clip(model: str = CLIP_MODEL, *, device: str | torch.device = "cpu") -> Clip:
    """The CLIP model ``model`` (a hub id in the local cache, or a folder), loaded once per process
    and device.

    Raises:
        UserError: it is not on this machine, or the folder holds no ``CLIPModel`` and processor.
    """
    device = torch.device(device)
    key = (model, str(device))
    if key not in _LOADED:
        from transformers import CLIPModel, CLIPProcessor

        try:
            loaded = CLIPModel.from_pretrained(model, local_files_only=True).to(device).eval().requires_grad_(False)
            processor = CLIPProcessor.from_pretrained(model, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"the CLIP model '{model}' is not on this machine ({str(exc).splitlines()[0]}); download it once with "
                f"`huggingface-cli download {model}`, or name a local CLIP folder in prompts.clip_model"
            ) from None
        _LOADED[key] = Clip(model, loaded, processor, device)
    return _LOADED[key]
