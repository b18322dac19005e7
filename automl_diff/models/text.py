"""The frozen parts of a text-to-image pipeline around its UNet: VAE, text encoder and tokenizer.

A Stable Diffusion-family teacher is a pipeline folder (``model_index.json`` naming ``vae``,
``text_encoder``, ``tokenizer``, ``unet`` and ``scheduler``). Studies compress the UNet only; the
parts here are loaded once, frozen, and shared by every trial: :meth:`TextToImage.encode` turns
prompts into the ``encoder_hidden_states`` the UNet is called with (cached per prompt list), and
:meth:`TextToImage.decode` turns final latents into images in [-1, 1], as diffusers'
``StableDiffusionPipeline`` does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from automl_diff.errors import UserError
from automl_diff.models.latent import LatentParts
from automl_diff.sampling import Prompts

__all__ = [
    "CLIP_TOKENS",
    "PIPELINE_PARTS",
    "TEXT_TO_IMAGE_PIPELINES",
    "TextToImage",
    "is_text_to_image_folder",
    "load_text_to_image",
    "model_index",
    "text_length",
]

#: Pipeline classes whose folders a study accepts as text-to-image teachers.
TEXT_TO_IMAGE_PIPELINES = ("StableDiffusionPipeline",)
#: The components such a folder holds besides the UNet and the scheduler.
PIPELINE_PARTS = ("vae", "text_encoder", "tokenizer")
#: Text tokens a conditional UNet is counted with when no tokenizer says otherwise (CLIP's).
CLIP_TOKENS = 77


@dataclass
class TextToImage(LatentParts):
    """What a text-to-image UNet needs around it to sample images from prompts.

    Attributes:
        vae: the ``AutoencoderKL`` whose latent space the UNet denoises in.
        text_encoder: the text model that turns tokens into ``encoder_hidden_states`` (SD's
            ``CLIPTextModel``, or whichever class the pipeline folder names).
        tokenizer: its tokenizer (SD's ``CLIPTokenizer``, or any transformers tokenizer).
        pipeline_class: the class the pipeline folder names (an export writes the same class).
        folder: the pipeline folder the parts were read from (None when built in memory).
    """

    text_encoder: nn.Module
    tokenizer: Any
    pipeline_class: str = "StableDiffusionPipeline"
    folder: str | None = None
    _cache: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict, repr=False)

    def frozen(self) -> list[nn.Module]:
        return [self.vae, self.text_encoder]

    @property
    def parts(self) -> tuple[str, ...]:
        """The pipeline folder's components besides the UNet and the scheduler."""
        return PIPELINE_PARTS

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def to(self, device: str | torch.device, *, dtype: torch.dtype | None = None) -> TextToImage:
        super().to(device, dtype=dtype)
        self._cache.clear()
        return self

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """``encoder_hidden_states`` of ``prompts``, shape ``(len(prompts), tokens, dim)``, as
        ``StableDiffusionPipeline.encode_prompt`` computes them (padded to the tokenizer's maximum
        length, the text encoder's last hidden state); computed once per prompt list."""
        key = tuple(prompts)
        if key not in self._cache:
            tokens = self.tokenizer(
                list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
            )
            mask = getattr(self.text_encoder.config, "use_attention_mask", False)
            attention = tokens.attention_mask.to(self.device) if mask else None
            states = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=attention)[0]
            self._cache[key] = states.to(dtype=self.text_encoder.dtype)
        return self._cache[key]

    def prompts(
        self, prompts: Sequence[str], *, negative_prompt: str = "", guidance_scale: float = 7.5, images_per_prompt: int = 1
    ) -> Prompts:
        """The conditioning that samples ``prompts`` with guidance against ``negative_prompt``
        and decodes with this VAE (:class:`~automl_diff.sampling.Prompts`)."""
        return Prompts(self.encode(prompts), self.encode([negative_prompt]), guidance_scale, images_per_prompt, decode=self.decode)

    def pipeline(self, unet: nn.Module, scheduler: Any) -> Any:
        """A diffusers pipeline of :attr:`pipeline_class` with these parts around ``unet`` and
        ``scheduler`` (no safety checker), ready for ``save_pretrained``."""
        import diffusers

        return getattr(diffusers, self.pipeline_class)(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def text_length(text: TextToImage | None) -> int:
    """Tokens of the text conditioning: the tokenizer's padded length, else :data:`CLIP_TOKENS`."""
    return int(text.tokenizer.model_max_length) if text is not None else CLIP_TOKENS


def model_index(folder: Path) -> dict[str, Any] | None:
    path = folder / "model_index.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read JSON: {exc}") from None
    return data if isinstance(data, dict) else None


def is_text_to_image_folder(folder: Path) -> bool:
    """Whether ``folder`` is a pipeline folder of a text-to-image class (``model_index.json``)."""
    index = model_index(folder) if folder.is_dir() else None
    return index is not None and index.get("_class_name") in TEXT_TO_IMAGE_PIPELINES


def _part_class(folder: Path, part: str, entry: Sequence[Any]) -> type:
    """The class ``model_index.json`` names for a part (``["transformers", "CLIPTextModel"]``), as
    diffusers resolves it: a tokenizer or text encoder of any transformers class loads."""
    import importlib

    library, name = [*entry, None, None][:2]
    if library not in ("diffusers", "transformers") or not isinstance(name, str):
        raise UserError(f"{folder / 'model_index.json'}: {part}: {list(entry)} is not a diffusers or transformers class")
    cls = getattr(importlib.import_module(library), name, None)
    if not isinstance(cls, type):
        raise UserError(f"{folder / 'model_index.json'}: {part}: {library} has no class {name}")
    return cls


def load_text_to_image(folder: Path) -> TextToImage:
    """The VAE, text encoder and tokenizer of a text-to-image pipeline folder.

    Raises:
        UserError: a component ``model_index.json`` names is missing or cannot be loaded.
    """
    index = model_index(folder) or {}
    for part in PIPELINE_PARTS:
        if part not in index or not index[part] or index[part][0] is None:
            raise UserError(f"{folder / 'model_index.json'}: names no {part}; a {index.get('_class_name')} teacher needs one")
        config = folder / part / ("tokenizer_config.json" if part == "tokenizer" else "config.json")
        if not config.is_file():
            raise UserError(f"{folder}: {part}/ is missing or has no {config.name} (model_index.json names a {part})")
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # one bar per loaded model, on every trial's stderr
    try:
        parts = {part: _part_class(folder, part, index[part]) for part in PIPELINE_PARTS}
        vae = parts["vae"].from_pretrained(str(folder / "vae"), use_safetensors=True, low_cpu_mem_usage=False)
        text_encoder = parts["text_encoder"].from_pretrained(str(folder / "text_encoder"), use_safetensors=True)
        tokenizer = parts["tokenizer"].from_pretrained(str(folder / "tokenizer"))
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{folder}: cannot load the pipeline's parts: {str(exc).splitlines()[0]}") from None
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    return TextToImage(vae, text_encoder, tokenizer, index["_class_name"], str(folder))
