"""Exporting study results as diffusers pipelines with model cards."""

from __future__ import annotations

from automl_diff.export.pipeline import export_trial, model_card

__all__ = ["export_trial", "model_card"]
