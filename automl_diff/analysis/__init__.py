"""Reading results out of a study: trial tables, the Pareto front, pandas frames; plotly figures
in :mod:`automl_diff.analysis.figures` (imported on use: plotly loads only then)."""

from __future__ import annotations

from automl_diff.analysis.pareto import COLUMNS, TrialRow, all_trials_frame, pareto_rows, teacher_metrics, trial_rows, trials_frame

__all__ = ["COLUMNS", "TrialRow", "all_trials_frame", "pareto_rows", "teacher_metrics", "trial_rows", "trials_frame"]
