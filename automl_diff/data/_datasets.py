from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from automl_diff.errors import UserError


def load_digits(*, resolution: int = 16, with_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 handwritten digits, resized (bilinear) to ``resolution``, in [-1, 1].

    Returns:
        ``(1797, 1, resolution, resolution)`` float32 images, plus the labels if ``with_labels``.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    if resolution != images.shape[-1]:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 2 - 1).contiguous()
    if with_labels:
        return images, torch.from_numpy(bunch.target.astype(np.int64))
    return images


#: The words the ``digits`` captions name their digit with (``a handwritten seven``).
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _image_files(path: str) -> list[Path]:
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"dataset folder '{path}' does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not files:
        raise UserError(f"dataset folder '{path}' holds no .png/.jpg images")
    return files


def _load_folder(path: str, *, resolution: int, channels: int, files: list[Path] | None = None) -> torch.Tensor:
    from PIL import Image

    files = files if files is not None else _image_files(path)
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for file in files:
        with Image.open(file) as img:
            img = img.convert(mode).resize((resolution, resolution), Image.BICUBIC)
            arr = np.asarray(img, dtype=np.float32) / 255.0
        arrays.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays)) * 2 - 1


DATASETS: dict[str, Callable[..., torch.Tensor]] = {
    "digits": lambda *, resolution, channels: load_digits(resolution=resolution),
}


def _folder_captions(path: str) -> dict[str, str]:
    """``metadata.jsonl`` of a captioned image folder (Hugging Face's imagefolder layout: one
    ``{"file_name": ..., "text": ...}`` per line), file name -> caption."""
    metadata = Path(path) / "metadata.jsonl"
    if not metadata.is_file():
        raise UserError(f'dataset folder \'{path}\' has no metadata.jsonl with a caption ("text") per "file_name"')
    captions = {}
    for number, line in enumerate(metadata.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[str(row["file_name"])] = str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{metadata}:{number}: expected a JSON object with file_name and text") from None
    return captions


def load_captioned_dataset(spec: str, *, resolution: int, channels: int) -> tuple[torch.Tensor, list[str]]:
    """Images with one caption each: ``digits`` (captioned ``a handwritten <digit>``) or
    ``folder:PATH`` with a ``metadata.jsonl``; images as :func:`load_dataset`'s."""
    if spec == "digits":
        images, labels = load_digits(resolution=resolution, with_labels=True)
        return images, [f"a handwritten {DIGIT_WORDS[int(label)]}" for label in labels]
    if spec.startswith("folder:"):
        path = spec[len("folder:") :]
        captions = _folder_captions(path)
        files = [f for f in _image_files(path) if f.relative_to(path).as_posix() in captions]
        if not files:
            raise UserError(f"dataset folder '{path}': metadata.jsonl names none of its images")
        images = _load_folder(path, resolution=resolution, channels=channels, files=files)
        return images, [captions[f.relative_to(path).as_posix()] for f in files]
    raise UserError(f"dataset '{spec}' has no captions; captioned datasets: digits or folder:PATH with metadata.jsonl")


def load_dataset(spec: str, *, resolution: int, channels: int) -> torch.Tensor:
    """Images of a dataset by name (``digits``) or ``folder:PATH``, ``(N, C, H, W)`` in [-1, 1]."""
    if spec.startswith("folder:"):
        return _load_folder(spec[len("folder:") :], resolution=resolution, channels=channels)
    if spec not in DATASETS:
        raise UserError(f"unknown dataset '{spec}'; known: {', '.join(DATASETS)} or folder:PATH")
    images = DATASETS[spec](resolution=resolution, channels=channels)
    if images.shape[1] != channels:
        raise UserError(f"dataset '{spec}' has {images.shape[1]} channel(s), the model expects {channels}")
    return images
