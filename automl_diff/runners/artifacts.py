"""Per-trial sample grids as Optuna artifacts, with an optuna-dashboard note that shows them.

Each evaluated trial gets ``samples.png`` (the first FID samples, same noise for every trial)
in its folder, uploaded to the study's :class:`optuna.artifacts.FileSystemArtifactStore`
(``<output_dir>/<study>/artifacts``, :attr:`~automl_diff.records.StudyAttr.ARTIFACT_DIR`), and a
Markdown note with its metrics and the image, so that a user inspecting the trial in
``python -m automl_diff.study dashboard`` sees the model's samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from automl_diff.formatting import fmt_number
from automl_diff.records import StudyFolder, TrialAttr
from automl_diff.sampling import sample_grid_png

__all__ = ["artifact_store", "attach_samples", "note_stopped"]


def artifact_store(folder: str | Path) -> Any:
    from optuna.artifacts import FileSystemArtifactStore

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(folder))


def attach_samples(
    trial: optuna.Trial,
    images: Any,
    *,
    folder: Path,
    artifact_dir: Path,
    metrics: dict[str, Any],
    storage: optuna.storages.BaseStorage | None = None,
    prompts: list[str] | None = None,
) -> str:
    """Save ``images`` as ``folder/samples.png``, upload it, and write the trial's note; returns
    the artifact id. The note shows the image where ``storage`` names the study's and the trial's
    ids (the dashboard serves artifacts under them); without it, it lists the metrics only. A
    text-to-image trial's ``prompts`` (one per image, grid order) are listed with it."""
    from optuna.artifacts import upload_artifact
    from optuna_dashboard import save_note

    path = StudyFolder.samples(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(sample_grid_png(images))
    artifact_id = upload_artifact(
        artifact_store=artifact_store(artifact_dir), file_path=str(path), study_or_trial=trial, mimetype="image/png"
    )
    trial.set_user_attr(TrialAttr.SAMPLES, str(path))
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
