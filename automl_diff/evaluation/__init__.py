"""The evaluation every model of a study goes through (:class:`Evaluator`): params, MACs per step
and per trajectory, FID on the same noise, text alignment and latency, measured the same way for
the teacher, every trial and every benchmark row, as :class:`~automl_diff.config.Evaluation` says."""

from __future__ import annotations

from automl_diff.evaluation.evaluator import Evaluator, ModelMetrics

__all__ = ["Evaluator", "ModelMetrics"]
