"""Image folders, used for FID reference statistics and data-based baselines (never by DKDM
training), and prompt sets for text-to-image studies (:func:`read_prompts`).

A folder is every PNG/JPEG under it, centre-cropped and resized (:func:`load_image_folder`, or
batch by batch :func:`iter_image_folder`); a captioned folder adds a caption
per image from its ``metadata.jsonl`` (:func:`load_captioned_folder`, text-to-image baselines).
Images are float tensors ``(N, C, H, W)`` in [-1, 1]. Named datasets, and the ``folder:PATH``
spec studies use, are resolved by :mod:`automl_diff.zoo`.
"""

from __future__ import annotations

from automl_diff.data._datasets import iter_image_folder, load_captioned_folder, load_image, load_image_folder
from automl_diff.data.prompts import read_prompts

__all__ = ["iter_image_folder", "load_captioned_folder", "load_image", "load_image_folder", "read_prompts"]
