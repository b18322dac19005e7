"""The frozen parts of a text-to-image pipeline around its denoiser: VAE, text encoders, tokenizers.

A Stable Diffusion-family teacher is a pipeline folder (``model_index.json`` naming ``vae``,
``text_encoder``, ``tokenizer``, ``unet`` and ``scheduler``). Studies compress the UNet only; the
parts here are loaded once, frozen, and shared by every trial: :meth:`TextToImage.encode` turns
prompts into the ``encoder_hidden_states`` the UNet is called with (cached per prompt list), and
:meth:`TextToImage.decode` turns final latents into images in [-1, 1], as diffusers'
``StableDiffusionPipeline`` does.

A Stable Diffusion 3 folder (``StableDiffusion3Pipeline``: an ``SD3Transformer2DModel`` trained
with flow matching, two CLIP text encoders and an optional T5) is one too
(:class:`JointTextToImage`): the pipeline's own ``encode_prompt`` gives the token and pooled
embeddings, packed in one tensor (:func:`~automl_diff.sampling.pack_pooled`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from automl_diff.errors import UserError
from automl_diff.models.latent import LatentParts
from automl_diff.sampling import Prompts, pack_pooled

__all__ = [
    "CLIP_TOKENS",
    "DENOISERS",
    "PIPELINE_PARTS",
    "TEXT_TO_IMAGE_PIPELINES",
    "JointTextToImage",
    "TextToImage",
    "is_text_to_image_folder",
    "load_text_to_image",
    "model_index",
    "text_length",
]

#: Pipeline classes whose folders a study accepts as text-to-image teachers.
TEXT_TO_IMAGE_PIPELINES = ("StableDiffusionPipeline", "StableDiffusion3Pipeline")
#: The components a ``StableDiffusionPipeline`` folder holds besides the UNet and the scheduler.
PIPELINE_PARTS = ("vae", "text_encoder", "tokenizer")
#: Those of a ``StableDiffusion3Pipeline`` folder besides the transformer and the scheduler.
SD3_PARTS = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
#: Components a folder may name as null (SD3 without its T5 encoder).
OPTIONAL_PARTS = ("text_encoder_3", "tokenizer_3")
#: The component each pipeline class holds its denoiser in.
DENOISERS = {"StableDiffusionPipeline": "unet", "StableDiffusion3Pipeline": "transformer"}
#: T5 tokens of SD3's prompt embeddings (``StableDiffusion3Pipeline``'s ``max_sequence_length``).
SD3_T5_TOKENS = 256
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

    @property
    def tokens(self) -> int:
        """Tokens of the conditioning the denoiser attends to (the tokenizer's padded length)."""
        return int(self.tokenizer.model_max_length)

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


class _TextWidth(nn.Module):
    """Stands for an SD3 transformer where ``encode_prompt`` reads its config."""

    def __init__(self, joint_attention_dim: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(joint_attention_dim=joint_attention_dim, sample_size=None, patch_size=None)


@dataclass
class JointTextToImage(TextToImage):
    """The parts of a ``StableDiffusion3Pipeline`` around its ``SD3Transformer2DModel``: the VAE
    (with its ``shift_factor``), two CLIP text encoders with projection and an optional T5.

    :meth:`encode` is the pipeline's own ``encode_prompt`` (the CLIP states' penultimate layers
    beside T5's, or T5's zeros without it, and the pooled projections), packed into one tensor
    ``(n, tokens + 1, joint_attention_dim)`` (:func:`~automl_diff.sampling.pack_pooled`).

    Attributes:
        extra: ``text_encoder_2``, ``tokenizer_2``, ``text_encoder_3``, ``tokenizer_3`` (the last
            two may be None).
        max_sequence_length: T5 tokens (the pipeline's default, 256).
        joint_attention_dim: the transformer's text width, where T5's zeros stand in for a missing T5.
    """

    extra: dict[str, Any] = field(default_factory=dict)
    max_sequence_length: int = SD3_T5_TOKENS
    joint_attention_dim: int | None = None

    def frozen(self) -> list[nn.Module]:
        encoders = [self.extra.get(name) for name in ("text_encoder_2", "text_encoder_3")]
        return [self.vae, self.text_encoder, *(e for e in encoders if e is not None)]

    @property
    def parts(self) -> tuple[str, ...]:
        return SD3_PARTS

    @property
    def tokens(self) -> int:
        """CLIP's tokens and T5's (the packed pooled row is not a token)."""
        return int(self.tokenizer.model_max_length) + self.max_sequence_length

    def _encoder(self) -> Any:
        """The pipeline around the text encoders, whose ``encode_prompt`` reads only the
        transformer's text width."""
        import diffusers

        if self.joint_attention_dim is None:
            raise UserError(f"{self.folder}: transformer/config.json is missing (SD3's text width, joint_attention_dim)")
        return diffusers.StableDiffusion3Pipeline(
            transformer=_TextWidth(self.joint_attention_dim),
            scheduler=None,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            **self.extra,
        )

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Packed token and pooled embeddings of ``prompts`` as ``StableDiffusion3Pipeline``
        computes them; computed once per prompt list."""
        key = tuple(prompts)
        if key not in self._cache:
            embeds, _, pooled, _ = self._encoder().encode_prompt(
                list(prompts),
                None,
                None,
                device=self.device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
            self._cache[key] = pack_pooled(embeds, pooled).to(dtype=self.text_encoder.dtype)
        return self._cache[key]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1]: ``vae.decode(latents / scaling_factor + shift_factor)``, as SD3 does."""
        config = self.vae.config
        z = latents.to(self.vae.dtype) / config.scaling_factor + (config.shift_factor or 0.0)
        return self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)

    def pipeline(self, unet: nn.Module, scheduler: Any) -> Any:
        import diffusers

        return diffusers.StableDiffusion3Pipeline(
            transformer=unet, scheduler=scheduler, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, **self.extra
        )


def text_length(text: TextToImage | None) -> int:
    """Tokens of the text conditioning: :attr:`TextToImage.tokens`, else :data:`CLIP_TOKENS`."""
    return text.tokens if text is not None else CLIP_TOKENS


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
    """The VAE, text encoders and tokenizers of a text-to-image pipeline folder.

    Raises:
        UserError: a component ``model_index.json`` names is missing or cannot be loaded.
    """
    index = model_index(folder) or {}
    name = index.get("_class_name")
    wanted = SD3_PARTS if name == "StableDiffusion3Pipeline" else PIPELINE_PARTS
    named = []
    for part in wanted:
        if part not in index or not index[part] or index[part][0] is None:
            if part in OPTIONAL_PARTS:
                continue
            raise UserError(f"{folder / 'model_index.json'}: names no {part}; a {name} teacher needs one")
        config = folder / part / ("tokenizer_config.json" if part.startswith("tokenizer") else "config.json")
        if not config.is_file():
            raise UserError(f"{folder}: {part}/ is missing or has no {config.name} (model_index.json names a {part})")
        named.append(part)
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # one bar per loaded model, on every trial's stderr
    try:
        loaded = {part: _load_part(folder, part, _part_class(folder, part, index[part])) for part in named}
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{folder}: cannot load the pipeline's parts: {str(exc).splitlines()[0]}") from None
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    vae, text_encoder, tokenizer = (loaded.pop(part) for part in PIPELINE_PARTS)
    if name == "StableDiffusion3Pipeline":
        extra = {part: loaded.get(part) for part in SD3_PARTS if part not in PIPELINE_PARTS}
        transformer = folder / "transformer" / "config.json"
        width = json.loads(transformer.read_text()).get("joint_attention_dim") if transformer.is_file() else None
        return JointTextToImage(vae, text_encoder, tokenizer, name, str(folder), extra=extra, joint_attention_dim=width)
    return TextToImage(vae, text_encoder, tokenizer, name, str(folder))


def _load_part(folder: Path, part: str, cls: type) -> Any:
    if part.startswith("tokenizer"):
        return cls.from_pretrained(str(folder / part))
    if part == "vae":
        return cls.from_pretrained(str(folder / part), use_safetensors=True, low_cpu_mem_usage=False)
    return cls.from_pretrained(str(folder / part), use_safetensors=True)
