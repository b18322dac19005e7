"""Image folders: every PNG/JPEG under a folder, and captioned folders (``metadata.jsonl``).

Images are float tensors ``(N, C, H, W)`` in [-1, 1]. Named datasets (the shipped ``digits``)
live in :mod:`automl_diff.zoo`, which resolves a dataset spec (a name, or ``folder:PATH``).
"""

from __future__ import annotations

import json
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
