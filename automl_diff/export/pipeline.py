"""Exporting trials as diffusers pipelines (``unet/`` + ``scheduler/``) with a model card.

An export loads with ``DDIMPipeline.from_pretrained(folder)``. Students that stock diffusers can
express are plain ``UNet2DModel``; others (per-level depths, DiffNAS's per-resnet widths and dropped
layers) are :class:`automl_diff.StudentUNet2DModel`, which ``model_index.json`` names (library
``automl_diff.models.student``) so that the same call loads them wherever ``automl_diff`` is
installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna

from automl_diff.errors import UserError
from automl_diff.runners.attrs import SCHEDULER_ATTR, TEACHER_ATTR
from automl_diff.runners.storage import mask_url

__all__ = ["export_trial", "model_card"]


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}{unit}"
    return f"{value:,}{unit}"


def model_card(*, study: optuna.Study, trial: optuna.trial.FrozenTrial, storage_url: str) -> str:
    """A Hugging Face style README: metrics, teacher, source study and trial."""
    attrs = trial.user_attrs
    teacher = study.user_attrs.get(TEACHER_ATTR, {})
    evaluation = study.user_attrs.get("evaluation", {})
    rows = [
        ("params", attrs.get("params"), teacher.get("params"), ""),
        ("MACs per UNet call", attrs.get("macs"), teacher.get("macs"), ""),
        ("MACs without attention matmuls", attrs.get("macs_no_attention"), teacher.get("macs_no_attention"), ""),
        ("MACs per image (whole trajectory)", attrs.get("trajectory_macs"), teacher.get("trajectory_macs"), ""),
        ("FID (lower is better)", attrs.get("fid"), teacher.get("fid"), ""),
        ("latency per image", attrs.get("latency"), teacher.get("latency"), " s"),
    ]
    table = "\n".join(f"| {name} | {_fmt(mine, unit)} | {_fmt(ref, unit)} |" for name, mine, ref, unit in rows)
    speedup = attrs.get("speedup")
    params = json.dumps(trial.params, indent=2, sort_keys=True)
    steps = evaluation.get("sampling_steps", 20)
    schedule_note = ""
    use = f"""pipe = DDIMPipeline.from_pretrained("path/to/this/folder")
images = pipe(batch_size=4, num_inference_steps={steps}).images"""
    if attrs.get("schedule"):
        schedule_note = f"""
This model samples with a DiP-GO gate schedule (`schedule.json`, {steps} steps): at each step some
blocks reuse their output from an earlier step instead of computing. MACs per UNet call are the mean
over the trajectory. The schedule is for {steps} steps exactly.
"""
        use = f"""from automl_diff.methods.dipgo import Schedule, apply_schedule

pipe = DDIMPipeline.from_pretrained("path/to/this/folder")
apply_schedule(pipe, Schedule.load("path/to/this/folder/schedule.json"))
images = pipe(batch_size=4, num_inference_steps={steps}).images"""
    if attrs.get("block_choices"):
        lines = "\n".join(f"| `{block}` | {choice} |" for block, choice in attrs["block_choices"].items())
        schedule_note += f"""
DiffNAS chose one subnet per teacher block (`layers`: resnets that compute, the others keep their
shortcut; `width`: their inner width as a fraction of the block's; `attention`: kept or dropped),
then retrained the student for {attrs.get("retrain_iterations")} steps with the joint loss
(`{attrs.get("joint_schedule")}` block-feature weight):

| block | subnet |
|---|---|
{lines}
"""
    return f"""---
library_name: diffusers
tags:
- automl_diff
- {study.user_attrs.get("method", "unknown")}
- unconditional-image-generation
---

# {study.study_name} — trial {trial.number}

A compressed diffusion UNet found by automl_diff (method `{study.user_attrs.get("method")}`) from the
teacher `{study.user_attrs.get("teacher")}`.

| metric | this model | teacher |
|---|---|---|
{table}

Speedup against the teacher (measured latency): {_fmt(speedup, "x")}.
{schedule_note}
FID: {evaluation.get("fid_samples", "?")} samples, {evaluation.get("sampling_steps", "?")} {evaluation.get("scheduler", "ddim")} steps,
features `{evaluation.get("fid_features")}`, dataset `{evaluation.get("fid_dataset")}`, seed {evaluation.get("seed", "?")};
latency on `{evaluation.get("device")}` with batches of {evaluation.get("latency_batch_size")}.

## Source

- study: `{study.study_name}` in `{mask_url(storage_url)}`
- trial: {trial.number}
- parameters:

```json
{params}
```

## Use

```python
from diffusers import DDIMPipeline

# a StudentUNet2DModel (per-level depths, searched widths) loads the same way once automl_diff is installed
{use}
```
"""


def export_trial(study: optuna.Study, trial_number: int, out: str | Path, *, storage_url: str) -> Path:
    """Write trial ``trial_number`` as a diffusers DDIM pipeline folder at ``out``.

    Raises:
        UserError: no such completed trial, or its weights are gone.
    """
    from diffusers import DDIMPipeline, DDIMScheduler

    from automl_diff.models.loading import load_unet

    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if trial_number not in trials:
        raise UserError(f"study '{study.study_name}' has no trial {trial_number} (trials 0..{len(trials) - 1})")
    trial = trials[trial_number]
    if trial.state != optuna.trial.TrialState.COMPLETE:
        raise UserError(f"trial {trial_number} of study '{study.study_name}' is {trial.state.name}, not COMPLETE")
    weights = trial.user_attrs.get("weights")
    if not weights or not Path(weights).is_dir():
        raise UserError(f"trial {trial_number}: its weights folder '{weights}' does not exist (moved or deleted?)")
    scheduler_config = study.user_attrs.get(SCHEDULER_ATTR)
    if not scheduler_config:
        raise UserError(f"study '{study.study_name}' has no scheduler config recorded; was it created by automl_diff?")
    unet = load_unet(weights)
    scheduler = DDIMScheduler.from_config(scheduler_config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(out), safe_serialization=True)
    (out / "README.md").write_text(model_card(study=study, trial=trial, storage_url=storage_url))
    metrics = {k: trial.user_attrs.get(k) for k in ("params", "macs", "macs_no_attention", "trajectory_macs", "fid", "latency", "speedup", "macs_reduction")}
    summary = {"study": study.study_name, "trial": trial_number, "params": trial.params, "metrics": metrics, "teacher": study.user_attrs.get("teacher")}
    if trial.user_attrs.get("schedule"):
        from automl_diff.methods.dipgo.schedule import Schedule

        Schedule.from_dict(trial.user_attrs["schedule"], source=f"trial {trial_number}: schedule").save(out / "schedule.json")
        summary["schedule"] = "schedule.json"
    (out / "automl_diff.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out
