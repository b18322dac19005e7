"""Names of the study- and trial-level user attributes that automl_diff writes (a leaf module)."""

from __future__ import annotations

#: Study attribute: the teacher's metrics (params, macs, macs_no_attention, fid, latency).
TEACHER_ATTR = "teacher_metrics"
#: Study attribute: the teacher's scheduler config, used to export pipelines.
SCHEDULER_ATTR = "scheduler_config"
#: Study attribute: the model the study started from, when it is not the teacher (stacking):
#: its metrics measured the same way as the teacher's.
START_ATTR = "start_metrics"
#: Study attribute: the original teacher (``digits``, a folder or a hub id).
ORIGINAL_TEACHER_ATTR = "original_teacher"
#: Study attribute: the studies and trials that made the starting model, oldest first (a list of
#: lineage steps as exports record them in ``automl_diff.json``; empty for a pretrained teacher).
LINEAGE_ATTR = "lineage"
