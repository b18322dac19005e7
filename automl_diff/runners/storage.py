"""Opening Optuna RDB storages (SQLite by default, PostgreSQL for many workers) with clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import optuna

from automl_diff.errors import UserError

__all__ = ["mask_url", "open_storage", "load_existing_study", "resolve_study_name"]


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for every log line and printout)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def _sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    rest = url[len("sqlite:///") :].split("?")[0]
    return None if rest in ("", ":memory:") else Path(rest)


def open_storage(url: str, *, create: bool = True, heartbeat_interval: int | None = 60) -> optuna.storages.RDBStorage:
    """Open an RDB storage.

    With a heartbeat, a trial whose worker died (no heartbeat for ``2 * heartbeat_interval``
    seconds) is marked failed and retried once with the same parameters.

    Args:
        url: SQLAlchemy URL (``sqlite:///file.db``, ``postgresql://user:pw@host/db``).
        create: False for commands that only read: a missing SQLite file is an error, not a new study.
        heartbeat_interval: seconds between heartbeats of a running trial (None: off).

    Raises:
        UserError: the URL is malformed, the database unreachable, or (``create=False``) absent.
    """
    path = _sqlite_path(url)
    if path is not None:
        if not create and not path.is_file():
            raise UserError(f"storage '{mask_url(url)}': the database file {path} does not exist")
        if create and not path.parent.is_dir():
            raise UserError(f"storage '{mask_url(url)}': the folder {path.parent} does not exist")
    kwargs = {}
    if heartbeat_interval:
        kwargs = dict(
            heartbeat_interval=heartbeat_interval,
            grace_period=2 * heartbeat_interval,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
    engine_kwargs = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except Exception as exc:  # sqlalchemy raises many types: ArgumentError, OperationalError, NoSuchModuleError
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot open storage '{mask_url(url)}': {mask_url(message)}") from None


def resolve_study_name(storage: optuna.storages.BaseStorage, name: str | None, *, url: str) -> str:
    """The study to read: ``name``, or the only study in the storage.

    Studies a method keeps beside its study (``<study>/block/<block>``: DiffNAS's block searches)
    do not count when choosing the only one.
    """
    every = optuna.study.get_all_study_names(storage)
    if name is not None:
        if name not in every:
            known = ", ".join(every) if every else "none"
            raise UserError(f"storage '{mask_url(url)}' has no study '{name}' (studies: {known})")
        return name
    names = [n for n in every if not any(n.startswith(other + "/") for other in every if other != n)]
    if len(names) == 1:
        return names[0]
    if not names:
        raise UserError(f"storage '{mask_url(url)}' holds no study")
    raise UserError(f"storage '{mask_url(url)}' holds several studies ({', '.join(names)}): pass --study-name")


def load_existing_study(url: str, name: str | None) -> optuna.Study:
    """Load a study that must exist (read-only commands)."""
    storage = open_storage(url, create=False, heartbeat_interval=None)
    study_name = resolve_study_name(storage, name, url=url)
    return optuna.load_study(study_name=study_name, storage=storage)
