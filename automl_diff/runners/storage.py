"""Opening Optuna RDB storages (SQLite by default, PostgreSQL for many workers) with clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import optuna

from automl_diff.errors import UserError, first_line

__all__ = ["load_existing_study", "mask_url", "open_storage", "resolve_study_name"]


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for every log line and printout)."""
    url = re.sub(r"(://[^:/@\s]+:)[^@\s]*@", r"\1***@", url)
    return re.sub(r"([?&]password=)[^&\s]*", r"\1***", url)


def _sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    rest = url[len("sqlite:///") :].split("?")[0]
    return None if rest in ("", ":memory:") else Path(rest)


def _with_driver(url: str) -> str:
    """``postgresql://`` names no driver and SQLAlchemy's default changed between releases
    (psycopg2, then psycopg 3): use the one that is installed, psycopg2 first."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    for module, dialect in (("psycopg2", "postgresql+psycopg2://"), ("psycopg", "postgresql+psycopg://")):
        if importlib.util.find_spec(module) is not None:
            return dialect + url[len("postgresql://") :]
    return url


def _create_storage(url: str, engine_kwargs: dict, kwargs: dict, *, attempts: int = 5) -> optuna.storages.RDBStorage:
    """``RDBStorage``, retried when workers that start together race to create the tables of an
    empty database (one wins; the others see a duplicate key and find the tables on retry)."""
    import time

    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def open_storage(url: str, *, create: bool = True, heartbeat_interval: int | None = 60, retries: int = 1) -> optuna.storages.RDBStorage:
    """Open an RDB storage.

    With a heartbeat, a trial whose worker died (no heartbeat for ``2 * heartbeat_interval``
    seconds) is marked failed and retried with the same parameters, up to ``retries`` times.

    Args:
        url: SQLAlchemy URL (``sqlite:///file.db``, ``postgresql://user:pw@host/db``).
        create: False for commands that only read: a missing SQLite file is an error, not a new study.
        heartbeat_interval: seconds between heartbeats of a running trial (None: off).
        retries: times a stale trial is retried.

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
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retries),
        )
    engine_kwargs = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        return _create_storage(_with_driver(url), engine_kwargs, kwargs)
    except ImportError:
        raise UserError(
            f"cannot open storage '{mask_url(url)}': its database driver is not "
            "installed (for PostgreSQL: pip install 'automl_diff[postgres]')"
        ) from None
    except Exception as exc:  # sqlalchemy raises many types: ArgumentError, OperationalError, NoSuchModuleError
        raise UserError(f"cannot open storage '{mask_url(url)}': {mask_url(first_line(exc))}") from None


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
