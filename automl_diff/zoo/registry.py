"""The built-in teachers, datasets, FID feature spaces and prompt judges, by name.

The package ships small models of its own (the digits teacher, the ``digits-t2i`` pipeline, the
``shapes-t2i`` pipeline with Stable Diffusion's layout), the datasets they are measured against,
the classifiers whose features drive their FID, and the judges of whether an image shows what its
prompt asks for (``prompt_accuracy``). Every other layer asks
these registries instead of naming them: a teacher spec, a dataset spec (a name, or
``folder:PATH``) or a feature space is looked up here, so a new built-in model is one entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from automl_diff.errors import UserError
from automl_diff.zoo import digits, digits_dit, digits_t2i, shapes, shapes_t2i

__all__ = [
    "DATASETS",
    "FEATURES",
    "JUDGES",
    "TEACHERS",
    "BuiltinDataset",
    "BuiltinFeatures",
    "BuiltinTeacher",
    "PromptJudge",
    "captioned_images",
    "dataset_batches",
    "dataset_images",
    "default_features",
]

#: A dataset spec naming an image folder: ``folder:PATH``.
FOLDER = "folder:"


@dataclass(frozen=True)
class BuiltinTeacher:
    """A teacher the package ships.

    Attributes:
        name: what a study's ``teacher:`` calls it.
        folder: the diffusers folder its weights ship in.
        retrain: the command that retrains it into ``folder``.
        dataset: the built-in dataset its samples are measured against (FID).
        judge: the prompt judge of a text-to-image teacher (``prompt_accuracy``), if any.
    """

    name: str
    folder: Path
    retrain: str
    dataset: str
    judge: str | None = None

    def check(self) -> None:
        """Raise one line naming the command that retrains it, where its weights are missing."""
        weights = "diffusion_pytorch_model.safetensors"
        if not any((self.folder / part / weights).is_file() for part in ("unet", "transformer")):
            raise UserError(f"the built-in {self.name} teacher is missing from {self.folder}; retrain it with {self.retrain}")


@dataclass(frozen=True)
class BuiltinDataset:
    """A dataset the package can load without a download.

    Attributes:
        name: what ``fid.dataset`` calls it.
        images: ``images(resolution)``: every image, ``(N, C, H, W)`` in [-1, 1].
        channels: its images' channels.
        features: the feature space its FID is measured in by default.
        captioned: ``captioned(resolution)``: the images with one caption each (data-based
            baselines of a text-to-image teacher), if it has captions.
    """

    name: str
    images: Callable[[int], torch.Tensor]
    channels: int
    features: str
    captioned: Callable[[int], tuple[torch.Tensor, list[str]]] | None = None


@dataclass(frozen=True)
class BuiltinFeatures:
    """A feature space for FID that ships with the package.

    Attributes:
        name: what ``fid.features`` calls it.
        weights: the file its network's weights are in (their hash fingerprints cached statistics).
        load: ``load()``: the network (eval mode, CPU); ``network.features(x)`` maps images in
            [-1, 1] of the size it was trained on to feature vectors.
        size: the image side it was trained on; other sizes are resized, RGB is averaged to grey
            where ``grey``, grey is repeated to RGB where not.
    """

    name: str
    weights: Path
    load: Callable[[], torch.nn.Module]
    size: int
    grey: bool = True

    def model(self, device: torch.device) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
        """``(fingerprint, images -> features)`` on ``device``."""
        if not self.weights.is_file():
            raise UserError(f"the {self.name} feature extractor is missing: {self.weights}; retrain it with the zoo's training command")
        network = self.load().to(device)
        digest = hashlib.sha256(self.weights.read_bytes()).hexdigest()[:12]

        def run(x: torch.Tensor) -> torch.Tensor:
            if self.grey and x.shape[1] != 1:
                x = x.mean(1, keepdim=True)
            elif not self.grey and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            if x.shape[-2:] != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
            return network.features(x.float())

        return f"{self.name}-{digest}", run


@dataclass(frozen=True)
class PromptJudge:
    """Reads what a prompt asks for and what an image shows, for ``prompt_accuracy``.

    Attributes:
        name: the judge's name.
        label_of: the class a prompt asks for (None: the prompt names none).
        load: ``load()``: a classifier mapping images in [-1, 1] to class logits.
        image_shape: ``(C, H, W)`` of the images it judges.
        what: what the classes are, for messages (``digit``).
    """

    name: str
    label_of: Callable[[str], int | None]
    load: Callable[[], torch.nn.Module]
    image_shape: tuple[int, int, int]
    what: str


TEACHERS: dict[str, BuiltinTeacher] = {
    "digits": BuiltinTeacher(
        "digits",
        digits.DIGITS_DIR,
        f"python -m automl_diff.zoo.train_digits --out {digits.DIGITS_DIR}",
        dataset="digits",
    ),
    "digits-t2i": BuiltinTeacher(
        "digits-t2i",
        digits_t2i.DIGITS_T2I_DIR,
        f"python -m automl_diff.zoo.train_digits_t2i --out {digits_t2i.DIGITS_T2I_DIR}",
        dataset="digits",
        judge="digits",
    ),
    "digits-dit": BuiltinTeacher(
        "digits-dit",
        digits_dit.DIGITS_DIT_DIR,
        f"python -m automl_diff.zoo.train_digits_dit --out {digits_dit.DIGITS_DIT_DIR}",
        dataset="digits",
        judge="digits",
    ),
    "shapes-t2i": BuiltinTeacher(
        "shapes-t2i",
        shapes_t2i.SHAPES_T2I_DIR,
        f"python -m automl_diff.zoo.train_shapes_t2i --out {shapes_t2i.SHAPES_T2I_DIR}",
        dataset="shapes",
        judge="shapes",
    ),
}

DATASETS: dict[str, BuiltinDataset] = {
    "digits": BuiltinDataset(
        "digits",
        lambda resolution: digits.load_digits(resolution=resolution),
        channels=1,
        features="digits",
        captioned=lambda resolution: digits.captioned_digits(resolution=resolution),
    ),
    "shapes": BuiltinDataset(
        "shapes",
        lambda resolution: shapes.load_shapes(resolution=resolution),
        channels=3,
        features="shapes",
        captioned=lambda resolution: shapes.captioned_shapes(resolution=resolution),
    ),
}

FEATURES: dict[str, BuiltinFeatures] = {
    "digits": BuiltinFeatures("digits", digits.CLASSIFIER_FILE, digits.load_classifier, size=16),
    "shapes": BuiltinFeatures("shapes", shapes.CLASSIFIER_FILE, shapes.load_classifier, size=shapes.RESOLUTION, grey=False),
}

JUDGES: dict[str, PromptJudge] = {
    "digits": PromptJudge("digits", digits_t2i.digit_of, digits.load_classifier, (1, 16, 16), "digit"),
    "shapes": PromptJudge(
        "shapes",
        shapes.combination_of,
        shapes.load_classifier,
        (3, shapes.RESOLUTION, shapes.RESOLUTION),
        "complete scene (a shape, a colour, a size, a position and a background)",
    ),
}


def _spec(spec: str) -> tuple[BuiltinDataset | None, str | None]:
    if spec.startswith(FOLDER):
        return None, spec[len(FOLDER) :]
    if spec not in DATASETS:
        raise UserError(f"unknown dataset '{spec}'; known: {', '.join(DATASETS)} or {FOLDER}PATH")
    return DATASETS[spec], None


def dataset_images(spec: str, *, resolution: int, channels: int) -> torch.Tensor:
    """The images of a dataset spec (a built-in name, or ``folder:PATH``), ``(N, C, H, W)`` in [-1, 1]."""
    from automl_diff.data import load_image_folder

    builtin, folder = _spec(spec)
    if builtin is None:
        return load_image_folder(folder, resolution=resolution, channels=channels)
    if builtin.channels != channels:
        raise UserError(f"dataset '{spec}' has {builtin.channels} channel(s), the model expects {channels}")
    return builtin.images(resolution)


def dataset_batches(spec: str, *, resolution: int, channels: int, batch_size: int = 250) -> Iterator[torch.Tensor]:
    """The images of :func:`dataset_images`, ``batch_size`` at a time (a folder is read as it goes)."""
    from automl_diff.data import iter_image_folder

    builtin, folder = _spec(spec)
    if builtin is None:
        yield from iter_image_folder(folder, resolution=resolution, channels=channels, batch_size=batch_size)
        return
    images = dataset_images(spec, resolution=resolution, channels=channels)
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


def captioned_images(spec: str, *, resolution: int, channels: int) -> tuple[torch.Tensor, list[str]]:
    """The images of a dataset spec with one caption each (``folder:PATH`` with a ``metadata.jsonl``)."""
    from automl_diff.data import load_captioned_folder

    builtin, folder = _spec(spec)
    if builtin is None:
        return load_captioned_folder(folder, resolution=resolution, channels=channels)
    if builtin.captioned is None:
        raise UserError(f"dataset '{spec}' has no captions; captioned datasets: {FOLDER}PATH with metadata.jsonl")
    return builtin.captioned(resolution)


def default_features(dataset: str) -> str:
    """The feature space a dataset's FID is measured in unless a study names one: a built-in
    dataset's own, else Inception."""
    builtin = DATASETS.get(dataset)
    return builtin.features if builtin is not None else "inception"
