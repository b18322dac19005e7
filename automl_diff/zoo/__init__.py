"""The models and data the package ships, by name (:mod:`automl_diff.zoo.registry`): the built-in
teachers (``digits``, ``digits-t2i``, ``digits-dit``, ``shapes-t2i``), their datasets, the classifiers whose
features drive their FID and the judges of their prompts; the modules that define and retrain them
(:mod:`~automl_diff.zoo.digits`, :mod:`~automl_diff.zoo.digits_t2i`, :mod:`~automl_diff.zoo.shapes`,
:mod:`~automl_diff.zoo.shapes_t2i`, :mod:`~automl_diff.zoo.text_to_image`)."""

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
