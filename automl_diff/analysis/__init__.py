"""Reading results out of a study: trial tables, the Pareto front, pandas frames."""

from __future__ import annotations

from automl_diff.analysis.pareto import COLUMNS, TrialRow, all_trials_frame, pareto_rows, teacher_metrics, trial_rows, trials_frame

__all__ = ["COLUMNS", "TrialRow", "all_trials_frame", "pareto_rows", "teacher_metrics", "trial_rows", "trials_frame"]
