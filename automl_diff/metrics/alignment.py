"""Text alignment of generated images: does an image show what its prompt asked for?

``prompt_accuracy`` (the shipped ``digits-t2i`` teacher and its students): the fraction of images
that the shipped digits classifier reads as the digit their prompt names
(:func:`~automl_diff.zoo.digits_t2i.digit_of`). Higher is better; its 95% interval is Wilson's
score interval for a proportion.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from automl_diff.errors import UserError
from automl_diff.metrics.intervals import Interval, proportion_interval

__all__ = ["ALIGNMENT_METRICS", "prompt_accuracy", "prompt_digits"]

#: Text-alignment metrics a study may record or optimise (higher is better).
ALIGNMENT_METRICS = ("prompt_accuracy",)


def prompt_digits(prompts: Sequence[str], *, where: str = "prompts") -> list[int]:
    """The digit each prompt names.

    Raises:
        UserError: a prompt names no digit (``prompt_accuracy`` cannot judge it).
    """
    from automl_diff.zoo.digits_t2i import digit_of

    digits = []
    for prompt in prompts:
        digit = digit_of(prompt)
        if digit is None:
            raise UserError(f"{where}: the prompt '{prompt}' names no digit, so prompt_accuracy cannot judge its images")
        digits.append(digit)
    return digits


@torch.no_grad()
def prompt_accuracy(images: torch.Tensor, digits: Sequence[int], *, batch_size: int = 500) -> Interval:
    """The fraction of ``images`` (``(N, 1, 16, 16)`` in [-1, 1]) the shipped digits classifier
    reads as ``digits[i]``, with its 95% interval."""
    from automl_diff.zoo.digits import load_classifier

    if images.shape[1:] != (1, 16, 16):
        raise UserError(f"prompt_accuracy judges 16x16 grey digits; the images are {tuple(images.shape[1:])}")
    classifier = load_classifier()
    predicted = torch.cat([classifier(images[i : i + batch_size].float().cpu()).argmax(1) for i in range(0, len(images), batch_size)])
    correct = int((predicted == torch.as_tensor(list(digits))).sum())
    return proportion_interval(correct, len(images))
