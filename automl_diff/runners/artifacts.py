"""The study's artifact store: what every host can read back, and the dashboard's sample notes.

A trial's folder (``<output_dir>/<study>/trial_<n>``) is on the host that ran it. What ``export``,
``report`` and the dashboard need from it goes to the study's Optuna artifact store as well
(``execution.artifact_store``, recorded as :attr:`~automl_diff.records.StudyAttr.ARTIFACT_STORE`):

* its weights folder, as one tar file (:attr:`~automl_diff.records.TrialAttr.WEIGHTS_ARTIFACT`;
  trials that share a folder, DiP-GO's schedules of one model, share the upload);
* ``samples.png`` (the first FID samples, same noise for every trial), with a Markdown note of its
  metrics and the image, so that a user inspecting the trial in ``python -m automl_diff.study
  dashboard`` sees the model's samples;
* a text-to-image teacher's pipeline without its UNet (VAE, text encoder, tokenizer), once per study.

The store is a folder (on a shared file system for a cluster; the default is
``<output_dir>/<study>/artifacts``) or an S3 bucket, ``s3://bucket/prefix`` (boto3's endpoint and
credentials: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...). Readers take the trial's own folder
where this host has it, and download from the store where it does not.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import optuna
from optuna.artifacts.exceptions import ArtifactNotFound

from automl_diff.config.study import artifact_store_problem
from automl_diff.errors import UserError
from automl_diff.formatting import fmt_number
from automl_diff.records import StudyAttr, StudyFolder, TrialAttr
from automl_diff.sampling import sample_grid_png

__all__ = [
    "artifact_store",
    "attach_samples",
    "check_store",
    "local_folder",
    "note_stopped",
    "study_store",
    "trial_samples",
    "trial_weights",
    "upload_folder",
]


class _Prefixed:
    """An artifact store whose ids live under ``prefix/`` of another store (a bucket's folder)."""

    def __init__(self, store: Any, prefix: str) -> None:
        self.store, self.prefix = store, prefix.strip("/") + "/"

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self.store.open_reader(self.prefix + artifact_id)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.store.write(self.prefix + artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self.store.remove(self.prefix + artifact_id)


def artifact_store(location: str | Path) -> Any:
    """The Optuna artifact store at ``location``: a folder (made if missing) or ``s3://bucket[/prefix]``."""
    text = str(location)
    if problem := artifact_store_problem(text):
        raise UserError(f"artifact store '{text}': {problem}")
    if text.startswith("s3://"):
        try:
            import boto3
        except ImportError:
            raise UserError(f"artifact store {text}: an S3 store needs boto3 (pip install boto3)") from None
        from optuna.artifacts import Boto3ArtifactStore

        bucket, _, prefix = text[5:].partition("/")
        store = Boto3ArtifactStore(bucket, boto3.client("s3"), avoid_buf_copy=True)  # no copy of a teacher's weights in memory
        return _Prefixed(store, prefix) if prefix.strip("/") else store
    from optuna.artifacts import FileSystemArtifactStore

    folder = Path(text)
    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(folder))


def check_store(location: str, *, where: str) -> None:
    """Fail with one line if the store at ``location`` cannot be written (an unreachable endpoint,
    a missing bucket, no credentials), before any trial runs.

    Raises:
        UserError: naming ``where`` (the config file and key) and the reason.
    """
    try:
        if location.startswith("s3://"):
            store = artifact_store(location)
            inner = store.store if isinstance(store, _Prefixed) else store
            inner.client.head_bucket(Bucket=inner.bucket)
        elif problem := artifact_store_problem(location):
            raise UserError(f"'{location}': {problem}")
        else:  # a folder: made at the first upload, under an existing folder this process may write to
            parent = next(p for p in Path(location).absolute().parents if p.exists())
            if Path(location).exists() and not Path(location).is_dir():
                raise UserError(f"'{location}' is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise UserError(f"'{location}' cannot be made: {parent} is not writable")
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    except Exception as exc:  # boto's and the file system's errors alike: the reason is their message
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{where}: '{location}' cannot be used: {reason}") from None


def study_store(study: optuna.Study, override: str | None = None) -> Any | None:
    """The artifact store a study recorded (``override``: another location of it), or None."""
    location = override or study.user_attrs.get(StudyAttr.ARTIFACT_STORE) or study.user_attrs.get(StudyAttr.ARTIFACT_DIR)
    return artifact_store(location) if location else None


def upload_folder(store: Any, folder: str | Path, study_or_trial: Any, *, only: tuple[str, ...] | None = None) -> str:
    """``folder`` as one tar file in ``store`` (``only``: just these top-level entries); returns
    the artifact id."""
    from optuna.artifacts import upload_artifact

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        packed = Path(tmp) / f"{folder.name}.tar"
        with tarfile.open(packed, "w") as tar:
            for entry in sorted(folder.iterdir()):
                if only is None or entry.name in only:
                    tar.add(entry, arcname=entry.name)
        return upload_artifact(artifact_store=store, file_path=str(packed), study_or_trial=study_or_trial, mimetype="application/x-tar")


@contextlib.contextmanager
def local_folder(folder: str | None, artifact_id: str | None, store: Any | None, *, what: str) -> Iterator[Path]:
    """``folder`` where this host has it, else the folder uploaded as ``artifact_id``, downloaded
    into a temporary folder for the ``with`` block.

    Raises:
        UserError: neither is there (``what`` names the folder in the message).
    """
    from optuna.artifacts import download_artifact

    if folder and Path(folder).is_dir():
        yield Path(folder)
        return
    if not artifact_id or store is None:
        raise UserError(f"{what}: '{folder}' is not on this machine and no artifact store holds a copy (moved or deleted?)")
    with tempfile.TemporaryDirectory(prefix="automl_diff_") as tmp:
        packed = Path(tmp) / "folder.tar"
        try:
            download_artifact(artifact_store=store, file_path=str(packed), artifact_id=artifact_id)
        except ArtifactNotFound:
            raise UserError(f"{what}: '{folder}' is not on this machine and its artifact {artifact_id} is not in the store") from None
        with tarfile.open(packed) as tar:
            tar.extractall(Path(tmp) / "folder", filter="data")
        packed.unlink()
        yield Path(tmp) / "folder"


def trial_weights(trial: optuna.trial.FrozenTrial, store: Any | None) -> contextlib.AbstractContextManager[Path]:
    """The trial's weights folder on this host (downloaded from ``store`` where it is not)."""
    attrs = trial.user_attrs
    return local_folder(attrs.get(TrialAttr.WEIGHTS), attrs.get(TrialAttr.WEIGHTS_ARTIFACT), store, what=f"trial {trial.number}: weights")


def trial_samples(trial: optuna.trial.FrozenTrial, store: Any | None) -> bytes | None:
    """The trial's stored sample grid (its ``samples.png``, else its artifact), or None."""
    path = trial.user_attrs.get(TrialAttr.SAMPLES)
    if path and Path(path).is_file():
        return Path(path).read_bytes()
    artifact_id = trial.user_attrs.get(TrialAttr.SAMPLES_ARTIFACT)
    if not artifact_id or store is None:
        return None
    with contextlib.suppress(ArtifactNotFound, OSError), contextlib.closing(store.open_reader(artifact_id)) as reader:
        return reader.read()
    return None  # not in the store: the caller draws it anew


def attach_samples(
    trial: optuna.Trial,
    images: Any,
    *,
    folder: Path,
    store: Any,
    metrics: dict[str, Any],
    storage: optuna.storages.BaseStorage | None = None,
    prompts: list[str] | None = None,
) -> str:
    """Save ``images`` as ``folder/samples.png``, upload it to ``store``, and write the trial's
    note; returns the artifact id (:attr:`~automl_diff.records.TrialAttr.SAMPLES_ARTIFACT`). The
    note shows the image where ``storage`` names the study's and the trial's ids (the dashboard
    serves artifacts under them); without it, it lists the metrics only. A text-to-image trial's
    ``prompts`` (one per image, grid order) are listed with it."""
    from optuna.artifacts import upload_artifact
    from optuna_dashboard import save_note

    path = StudyFolder.samples(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(sample_grid_png(images))
    artifact_id = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial, mimetype="image/png")
    trial.set_user_attr(TrialAttr.SAMPLES, str(path))
    trial.set_user_attr(TrialAttr.SAMPLES_ARTIFACT, artifact_id)
    rows = "\n".join(f"| {k} | {fmt_number(v)} |" for k, v in metrics.items() if isinstance(v, (int, float)))
    note = f"## Trial {trial.number}\n\n| metric | value |\n|---|---|\n{rows}\n"
    if storage is not None:
        study_id = storage.get_study_id_from_name(trial.study.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        url = f"/artifacts/{study_id}/{trial_id}/{artifact_id}"
        note += f"\nSamples (same noise as every trial of the study):\n\n![samples of trial {trial.number}]({url})\n"
    if prompts:
        trial.set_user_attr(TrialAttr.SAMPLE_PROMPTS, list(prompts))
        listed = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(prompts))
        note += f"\nPrompts, in grid order (left to right, top to bottom):\n\n{listed}\n"
    save_note(trial, note)
    return artifact_id


def note_stopped(trial: optuna.Trial, reason: str, scores: dict[str, float], iterations: dict[str, int]) -> None:
    """The optuna-dashboard note of a trial stopped early: why, and its score at each rung."""
    from optuna_dashboard import save_note

    rows = "\n".join(f"| {k} | {iterations.get(k, '-')} | {fmt_number(v)} |" for k, v in scores.items())
    save_note(trial, f"## Trial {trial.number}: stopped early\n\n{reason}\n\n| rung | iteration | held-out loss |\n|---|---|---|\n{rows}\n")
