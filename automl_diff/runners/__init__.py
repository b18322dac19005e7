"""Where trials run and where results live: RDB storages and the local runner.

* :mod:`~automl_diff.runners.storage`: opening SQLite/PostgreSQL storages, masking passwords.
* :mod:`~automl_diff.runners.trial`: what one trial does (train, save, evaluate, record).
* :mod:`~automl_diff.runners.local`: create or resume a study and optimise in this process.
"""

from __future__ import annotations

from automl_diff.runners.local import make_sampler, open_study, run_study
from automl_diff.runners.storage import load_existing_study, mask_url, open_storage, resolve_study_name
from automl_diff.runners.trial import StudySession

__all__ = ["StudySession", "load_existing_study", "make_sampler", "mask_url", "open_storage", "open_study", "resolve_study_name", "run_study"]
