"""Names of the study- and trial-level user attributes that automl_diff writes (a leaf module)."""

from __future__ import annotations

#: Study attribute: the teacher's metrics (params, macs, macs_no_attention, fid, latency).
TEACHER_ATTR = "teacher_metrics"
#: Study attribute: the teacher's scheduler config, used to export pipelines.
SCHEDULER_ATTR = "scheduler_config"
