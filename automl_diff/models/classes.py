"""The frozen parts of a class-conditional latent pipeline (DiT) around its transformer.

A DiT teacher is a ``DiTPipeline`` folder (``model_index.json`` naming ``transformer``, ``vae`` and
``scheduler``, and optionally ``id2label``). Studies compress the transformer; the VAE is loaded
once, frozen and shared by every trial. A study names the classes it samples as it names prompts
(``prompts.eval``, ``prompts.train``: one per line), each a class id or a class name of the
pipeline's ``id2label`` (any of its comma-separated names, as ``DiTPipeline.get_label_ids`` reads
them). :meth:`ClassToImage.prompts` is the conditioning that samples them with classifier-free
guidance, as ``DiTPipeline`` does: the transformer's last label embedding (``num_embeds_ada_norm``)
is the null class of the unconditional half, and the learned variance it predicts beside the
noise is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from automl_diff.errors import UserError
from automl_diff.models.latent import LatentParts
from automl_diff.models.text import model_index
from automl_diff.sampling import Prompts

__all__ = ["CLASS_TO_IMAGE_PIPELINES", "ClassToImage", "is_class_to_image_folder", "load_class_to_image"]

#: Pipeline classes whose folders a study accepts as class-conditional teachers.
CLASS_TO_IMAGE_PIPELINES = ("DiTPipeline",)


@dataclass
class ClassToImage(LatentParts):
    """What a class-conditional transformer needs around it to sample images of classes.

    Attributes:
        vae: the ``AutoencoderKL`` whose latent space the transformer denoises in.
        num_classes: the classes it was trained on; id ``num_classes`` is the null class.
        id2label: class names by id, as the pipeline folder names them (None: none given).
        pipeline_class: the class the pipeline folder names (an export writes the same class).
        folder: the pipeline folder the parts were read from (None when built in memory).
    """

    num_classes: int = 1000
    id2label: dict[int, str] | None = None
    pipeline_class: str = "DiTPipeline"
    folder: str | None = None

    @property
    def null_class(self) -> int:
        """The label of the unconditional half of guidance."""
        return self.num_classes

    @property
    def parts(self) -> tuple[str, ...]:
        """The pipeline folder's components besides the denoiser and the scheduler."""
        return ("vae",)

    def class_id(self, name: str | int) -> int:
        """The id of a class named by its id or by one of its names (case and spaces aside).

        Raises:
            UserError: neither an id of the model's classes nor a name ``id2label`` gives.
        """
        text = str(name).strip()
        if text.isdigit() and int(text) < self.num_classes:
            return int(text)
        names = {n.strip().lower(): i for i, label in (self.id2label or {}).items() for n in label.split(",")}
        if text.lower() in names:
            return names[text.lower()]
        known = f"; names: {', '.join(sorted(names)[:6])}{', ...' if len(names) > 6 else ''}" if names else " (the pipeline names none)"
        raise UserError(f"'{text}' is neither a class id (0..{self.num_classes - 1}) nor a class name{known}")

    def prompts(
        self, prompts: Sequence[str | int], *, negative_prompt: str = "", guidance_scale: float = 4.0, images_per_prompt: int = 1
    ) -> Prompts:
        """The conditioning that samples the classes ``prompts`` names (ids or names, image ``i``
        the class ``(i // images_per_prompt) % len(prompts)``) with guidance against the null
        class, and decodes with this VAE (:class:`~automl_diff.sampling.Prompts` with
        ``class_labels``). A class has no negative prompt: ``negative_prompt`` must be empty."""
        if negative_prompt:
            raise UserError(f"negative prompt '{negative_prompt}': a class-conditional model has none (its null class is the negative)")
        device = self.device
        ids = torch.tensor([self.class_id(p) for p in prompts], dtype=torch.long, device=device)
        null = torch.tensor([self.null_class], dtype=torch.long, device=device)
        return Prompts(ids, null, guidance_scale, images_per_prompt, decode=self.decode, keyword="class_labels")

    def pipeline(self, transformer: nn.Module, scheduler: Any) -> Any:
        """A diffusers pipeline of :attr:`pipeline_class` with this VAE around ``transformer`` and
        ``scheduler``, ready for ``save_pretrained``."""
        import diffusers

        return getattr(diffusers, self.pipeline_class)(transformer=transformer, vae=self.vae, scheduler=scheduler)


def is_class_to_image_folder(folder: Path) -> bool:
    """Whether ``folder`` is a pipeline folder of a class-conditional class (``model_index.json``)."""
    index = model_index(folder) if folder.is_dir() else None
    return index is not None and index.get("_class_name") in CLASS_TO_IMAGE_PIPELINES


def load_class_to_image(folder: Path, *, num_classes: int) -> ClassToImage:
    """The VAE and class names of a class-conditional pipeline folder.

    Raises:
        UserError: ``model_index.json`` names no VAE, or it cannot be loaded.
    """
    from diffusers import AutoencoderKL

    index = model_index(folder) or {}
    if not index.get("vae") or not (folder / "vae" / "config.json").is_file():
        raise UserError(f"{folder}: vae/ is missing or has no config.json (a {index.get('_class_name')} teacher needs one)")
    try:
        vae = AutoencoderKL.from_pretrained(str(folder / "vae"), use_safetensors=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{folder}: cannot load the pipeline's VAE: {str(exc).splitlines()[0]}") from None
    names = index.get("id2label")
    id2label = {int(k): str(v) for k, v in names.items()} if isinstance(names, dict) else None
    return ClassToImage(vae, num_classes=num_classes, id2label=id2label, pipeline_class=index["_class_name"], folder=str(folder))
