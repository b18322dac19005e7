"""Text alignment of generated images: does an image show what its prompt asked for?

- ``prompt_accuracy`` (a built-in teacher with a prompt judge, :data:`automl_diff.zoo.JUDGES`):
  the fraction of images that the judge's classifier reads as the class their prompt names, with
  Wilson's 95% score interval.
- ``clip_score`` (real models): the CLIP score as torchmetrics and the text-to-image literature
  define it, ``max(100 * cos(image embedding, text embedding), 0)`` from a transformers
  ``CLIPModel`` read from the local Hugging Face cache (or a folder), the mean over the images with
  its 95% t-interval. The embeddings come from ``CLIPModel``'s own forward pass (projected and
  normalised there); torchmetrics' helper is not called, as its 1.9 release reads
  ``get_image_features`` as a tensor, which transformers 5 no longer returns.

Higher is better for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from automl_diff.errors import UserError
from automl_diff.metrics.clip import CLIP_MODEL, load_clip
from automl_diff.metrics.intervals import Interval, across_sets, proportion_interval
from automl_diff.zoo import PromptJudge

__all__ = ["ALIGNMENT_METRICS", "CLIP_MODEL", "ClipScorer", "prompt_accuracy", "prompt_hits", "prompt_labels"]

#: Text-alignment metrics a study may record or optimise (higher is better).
ALIGNMENT_METRICS = ("prompt_accuracy", "clip_score")


def prompt_labels(prompts: Sequence[str], judge: PromptJudge, *, where: str = "prompts") -> list[int]:
    """The class each prompt asks for, as ``judge`` reads it.

    Raises:
        UserError: a prompt names no class (``prompt_accuracy`` cannot judge it).
    """
    labels = []
    for prompt in prompts:
        label = judge.label_of(prompt)
        if label is None:
            raise UserError(f"{where}: the prompt '{prompt}' names no {judge.what}, so prompt_accuracy cannot judge its images")
        labels.append(label)
    return labels


@torch.no_grad()
def prompt_hits(images: torch.Tensor, labels: Sequence[int], judge: PromptJudge, *, batch_size: int = 500) -> int:
    """How many of ``images`` (in [-1, 1]) the judge's classifier reads as ``labels[i]``."""
    if tuple(images.shape[1:]) != judge.image_shape:
        shape = tuple(images.shape[1:])
        raise UserError(f"prompt_accuracy ({judge.name}) judges images of shape {judge.image_shape}; the images are {shape}")
    classifier = judge.load()
    predicted = torch.cat([classifier(images[i : i + batch_size].float().cpu()).argmax(1) for i in range(0, len(images), batch_size)])
    return int((predicted == torch.as_tensor(list(labels))).sum())


def prompt_accuracy(images: torch.Tensor, labels: Sequence[int], judge: PromptJudge, *, batch_size: int = 500) -> Interval:
    """The fraction of ``images`` (in [-1, 1]) the judge's classifier reads as ``labels[i]``, with
    its 95% interval."""
    return proportion_interval(prompt_hits(images, labels, judge, batch_size=batch_size), len(images))


class ClipScorer:
    """The CLIP score of images against their prompts, with a CLIP model loaded once from the local
    Hugging Face cache (never downloaded: an offline machine gets one line saying what to download)
    or from a folder holding a ``CLIPModel`` and its ``CLIPProcessor``
    (:func:`~automl_diff.metrics.clip.load_clip`).

    Raises:
        UserError: the model is not in the local cache or the folder cannot be loaded.
    """

    def __init__(self, model: str = CLIP_MODEL, *, device: str | torch.device = "cpu") -> None:
        clip = load_clip(model, device=device)
        self.name = model
        self.device = clip.device
        self.model = clip.model
        self.processor = clip.processor

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: Sequence[str], *, batch_size: int = 64) -> list[float]:
        """The CLIP score of each image (``(N, C, H, W)`` in [-1, 1]; grey ones are repeated to
        RGB) against ``prompts[i]``."""
        if len(images) != len(prompts):
            raise ValueError("one prompt per image")
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if pixels.shape[1] == 1:
            pixels = pixels.repeat(1, 3, 1, 1)
        scores: list[Any] = []
        for start in range(0, len(pixels), batch_size):
            inputs = self.processor(
                text=list(prompts[start : start + batch_size]),
                images=list(pixels[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
            )
            out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
            cosine = (out.image_embeds * out.text_embeds).sum(-1)
            scores += (100 * cosine).clamp(min=0).float().cpu().tolist()
        return scores

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], *, batch_size: int = 64) -> Interval:
        """The mean CLIP score of ``images`` against their prompts, with its 95% interval."""
        return across_sets(self.scores(images, prompts, batch_size=batch_size))
