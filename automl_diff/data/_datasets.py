"""Image folders: every PNG/JPEG under a folder, and captioned folders (``metadata.jsonl``).

Images are float tensors ``(N, C, H, W)`` in [-1, 1], each centre-cropped to a square and resized
(bicubic) to the model's resolution, as reference images for FID are prepared. A large folder is
read batch by batch (:func:`iter_image_folder`), so that its features can be accumulated without
holding its images. Named datasets (the shipped ``digits``) live in :mod:`automl_diff.zoo`, which
resolves a dataset spec (a name, or ``folder:PATH``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from automl_diff.errors import UserError


def _image_files(path: str) -> list[Path]:
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"dataset folder '{path}' does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not files:
        raise UserError(f"dataset folder '{path}' holds no .png/.jpg images")
    return files


def load_image(file: Path, *, resolution: int, channels: int) -> np.ndarray:
    """One image file as ``(C, H, W)`` float32 in [0, 1]: the largest centred square, resized
    (bicubic) to ``resolution``."""
    from PIL import Image

    with Image.open(file) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _load_folder(path: str, *, resolution: int, channels: int, files: list[Path] | None = None) -> torch.Tensor:
    files = files if files is not None else _image_files(path)
    return torch.from_numpy(np.stack([load_image(f, resolution=resolution, channels=channels) for f in files])) * 2 - 1


def iter_image_folder(path: str, *, resolution: int, channels: int, batch_size: int = 250) -> Iterator[torch.Tensor]:
    """The images of :func:`load_image_folder`, ``batch_size`` at a time."""
    files = _image_files(path)
    for start in range(0, len(files), batch_size):
        yield _load_folder(path, resolution=resolution, channels=channels, files=files[start : start + batch_size])


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


def load_image_folder(path: str, *, resolution: int, channels: int) -> torch.Tensor:
    """Every PNG/JPEG under ``path`` (sorted), ``(N, C, H, W)`` in [-1, 1]."""
    return _load_folder(path, resolution=resolution, channels=channels)


def load_captioned_folder(path: str, *, resolution: int, channels: int) -> tuple[torch.Tensor, list[str]]:
    """The images of ``path`` that its ``metadata.jsonl`` captions (Hugging Face's imagefolder
    layout), with their captions; images as :func:`load_image_folder`'s."""
    captions = _folder_captions(path)
    files = [f for f in _image_files(path) if f.relative_to(path).as_posix() in captions]
    if not files:
        raise UserError(f"dataset folder '{path}': metadata.jsonl names none of its images")
    images = _load_folder(path, resolution=resolution, channels=channels, files=files)
    return images, [captions[f.relative_to(path).as_posix()] for f in files]
