"""Exporting study results as diffusers pipelines with model cards."""

from __future__ import annotations

from automl_diff.export.pipeline import Export, export_trial, load_call, model_card

__all__ = ["Export", "export_trial", "load_call", "model_card"]
