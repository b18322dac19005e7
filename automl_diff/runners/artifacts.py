"""Per-trial sample grids as Optuna artifacts, with an optuna-dashboard note that shows them.

Each evaluated trial gets ``samples.png`` (the first FID samples, same noise for every trial)
in its folder, uploaded to the study's :class:`optuna.artifacts.FileSystemArtifactStore`
(``<output_dir>/<study>/artifacts``, recorded as the study attribute ``artifact_dir``), and a
Markdown note with its metrics and the image, so that a user inspecting the trial in
``python -m automl_diff.study dashboard`` sees the model's samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

__all__ = ["ARTIFACT_DIR_ATTR", "attach_samples", "artifact_store"]

ARTIFACT_DIR_ATTR = "artifact_dir"


def artifact_store(folder: str | Path) -> Any:
    from optuna.artifacts import FileSystemArtifactStore

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(folder))


def attach_samples(trial: optuna.Trial, images: Any, *, folder: Path, artifact_dir: Path, metrics: dict[str, Any]) -> str:
    """Save ``images`` as ``folder/samples.png``, upload it, and write the trial's note; returns
    the artifact id."""
    from optuna.artifacts import upload_artifact
    from optuna_dashboard import save_note

    from automl_diff.analysis.report import sample_grid_png

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "samples.png"
    path.write_bytes(sample_grid_png(images))
    artifact_id = upload_artifact(artifact_store=artifact_store(artifact_dir), file_path=str(path), study_or_trial=trial, mimetype="image/png")
    trial.set_user_attr("samples", str(path))
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v:,} |" for k, v in metrics.items() if isinstance(v, (int, float)))
    study_id = trial.study._study_id
    save_note(
        trial,
        f"## Trial {trial.number}\n\n| metric | value |\n|---|---|\n{rows}\n\n"
        f"Samples (same noise as every trial of the study):\n\n![samples of trial {trial.number}](/artifacts/{study_id}/{trial._trial_id}/{artifact_id})\n",
    )
    return artifact_id
