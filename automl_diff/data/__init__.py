"""Image datasets, used for FID reference statistics and data-based baselines (never by DKDM
training), and prompt sets for text-to-image studies (:func:`read_prompts`).

A small explicit registry: ``digits`` (scikit-learn's handwritten digits at 16x16, one channel) and
``folder:PATH`` (every PNG/JPEG under a folder); :func:`load_captioned_dataset` adds a caption per
image (text-to-image baselines). Images are float tensors ``(N, C, H, W)`` in [-1, 1].
"""

from __future__ import annotations

from automl_diff.data._datasets import DATASETS, DIGIT_WORDS, load_captioned_dataset, load_dataset, load_digits
from automl_diff.data.prompts import read_prompts

__all__ = ["DATASETS", "DIGIT_WORDS", "load_captioned_dataset", "load_dataset", "load_digits", "read_prompts"]
