"""The models and data the package ships, by name (:mod:`automl_diff.zoo.registry`): the built-in
teachers (``digits``, ``digits-t2i``), their dataset, the classifier whose features drive their FID
and the judge of their prompts; the modules that define and retrain them
(:mod:`~automl_diff.zoo.digits`, :mod:`~automl_diff.zoo.digits_t2i`)."""

from __future__ import annotations

from automl_diff.zoo.registry import (
    DATASETS,
    FEATURES,
    JUDGES,
    TEACHERS,
    BuiltinDataset,
    BuiltinFeatures,
    BuiltinTeacher,
    PromptJudge,
    captioned_images,
    dataset_batches,
    dataset_images,
    default_features,
)

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
