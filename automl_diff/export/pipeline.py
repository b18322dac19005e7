"""Exporting trials as diffusers pipelines (``unet/`` + ``scheduler/``) with a model card.

A trial of a text-to-image study is exported as a pipeline of its teacher's own class
(``StableDiffusionPipeline``): the trial's UNet beside the teacher's VAE, text encoder, tokenizer
and a DDIM scheduler of its config.

An export loads where only diffusers is installed, with the call :func:`export_trial` returns.
Students that stock diffusers can express are saved as plain ``UNet2DModel`` or
``UNet2DConditionModel`` (``DDIMPipeline.from_pretrained(folder)``). The others (per-level depths
of an unconditional UNet, DiffNAS's per-resnet widths, dropped layers and shallower transformers)
are :mod:`~automl_diff.models.student` classes, shipped as custom component code in
``unet/student_unet.py`` that ``model_index.json`` names, diffusers' convention for custom
components: ``DDIMPipeline.from_pretrained(folder, trust_remote_code=True)``
(``StableDiffusionPipeline`` for a text-to-image export).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from automl_diff.config.evaluation import Evaluation, recorded_sampler
from automl_diff.errors import UserError
from automl_diff.formatting import fmt_number
from automl_diff.gating import Schedule
from automl_diff.methods import METHODS, CardSection, Method
from automl_diff.records import METRICS, StudyAttr, StudyFolder, TrialAttr
from automl_diff.runners.artifacts import local_folder, study_store, trial_weights
from automl_diff.runners.storage import mask_url

__all__ = ["Export", "export_trial", "lineage", "load_call", "model_card"]

_METRICS = (*METRICS, TrialAttr.SPEEDUP, TrialAttr.MACS_REDUCTION)


@dataclass(frozen=True)
class Export:
    """An exported trial.

    Attributes:
        folder: the pipeline folder.
        custom_code: the UNet ships as custom component code (``trust_remote_code=True`` loads it).
        schedule: the DiP-GO schedule file beside the pipeline, if any.
        pipeline: the diffusers pipeline class.
        absent: components the pipeline holds as None (SD3 without T5), which loading names.
    """

    folder: Path
    custom_code: bool
    schedule: Path | None = None
    pipeline: str = "DDIMPipeline"
    absent: tuple[str, ...] = ()

    @property
    def load_call(self) -> str:
        """The Python expression that loads this export with diffusers alone."""
        return load_call(str(self.folder), custom_code=self.custom_code, pipeline=self.pipeline, absent=self.absent)


def load_call(folder: str, *, custom_code: bool, pipeline: str = "DDIMPipeline", absent: Sequence[str] = ()) -> str:
    """``diffusers.<pipeline>.from_pretrained("<folder>"[, trust_remote_code=True][, <part>=None ...])``:
    diffusers loads a component saved as None (SD3's T5) only when the call names it."""
    extra = ("trust_remote_code=True",) * bool(custom_code) + tuple(f"{part}=None" for part in absent)
    return f"diffusers.{pipeline}.from_pretrained({', '.join([json.dumps(folder), *extra])})"


def _absent_parts(folder: Path) -> tuple[str, ...]:
    """The optional components a saved pipeline's ``model_index.json`` names as None."""
    from automl_diff.models.text import OPTIONAL_PARTS

    index = json.loads((folder / "model_index.json").read_text())
    return tuple(part for part in OPTIONAL_PARTS if part in index and not any(index[part] or []))


def _method(name: str | None) -> type[Method] | None:
    return METHODS.get(name or "")


def lineage(study: optuna.Study, trial: optuna.trial.FrozenTrial, *, storage_url: str) -> list[dict[str, Any]]:
    """The chain of studies that made a trial's model, oldest first: the lineage of the model
    the study started from (empty for a pretrained teacher), then this study and trial."""
    attrs = trial.user_attrs
    method = study.user_attrs.get(StudyAttr.METHOD)
    step: dict[str, Any] = {
        "study": study.study_name,
        "storage": mask_url(storage_url),
        "trial": trial.number,
        "method": method,
        "teacher": study.user_attrs.get(StudyAttr.TEACHER),
        "params": dict(trial.params),
        "metrics": {k: attrs.get(k) for k in _METRICS},
        "evaluation": study.user_attrs.get(StudyAttr.EVALUATION, {}),
    }
    cls = _method(method)
    if cls is not None:
        step.update(cls.lineage_facts(attrs))
    return [*study.user_attrs.get(StudyAttr.LINEAGE, []), step]


def _lineage_section(steps: list[dict[str, Any]], original: str | None) -> str:
    """The model card's lineage: the original teacher, then one entry per study of the chain."""
    lines = [f"0. the original teacher `{original}`"]
    notes = []
    for i, step in enumerate(steps, 1):
        metrics = step.get("metrics") or {}
        cls = _method(step.get("method"))
        what = cls.product if cls is not None else f"method `{step.get('method')}`"
        evaluation = Evaluation.from_record(step.get("evaluation"))
        lines.append(
            f"{i}. {what}: study `{step.get('study')}`"
            + (f" in `{step['storage']}`" if step.get("storage") else "")
            + f", trial {step.get('trial')}, from `{step.get('teacher')}`; "
            f"MACs per call {fmt_number(metrics.get(TrialAttr.MACS))}, trajectory "
            f"MACs {fmt_number(metrics.get(TrialAttr.TRAJECTORY_MACS))}, "
            f"FID {fmt_number(metrics.get(TrialAttr.FID))} ({evaluation.fid_samples or '?'} "
            f"samples, {evaluation.sampling.steps or '?'} steps); "
            f"parameters `{json.dumps(step.get('params', {}), sort_keys=True)}`"
        )
        if cls is not None and len(steps) > 1:  # a single step's card shows its method's section itself
            notes.append(cls.lineage_note(step, i))
    return "\n".join(lines) + "\n" + "".join(notes)


def _metrics_table(columns: list[dict[str, Any]], *, start: bool) -> str:
    rows = [
        ("params", TrialAttr.PARAMS, ""),
        ("MACs per UNet call", TrialAttr.MACS, ""),
        ("MACs without attention matmuls", TrialAttr.MACS_NO_ATTENTION, ""),
        ("MACs per image (whole trajectory)", TrialAttr.TRAJECTORY_MACS, ""),
        ("FID (lower is better)", TrialAttr.FID, ""),
        ("latency per image", TrialAttr.LATENCY, " s"),
    ]
    names = ["metric", "this model", *(["starting model"] if start else []), "teacher"]
    header = "| " + " | ".join(names) + " |\n|" + "---|" * len(names)
    body = "\n".join(f"| {name} | " + " | ".join(fmt_number(c.get(key), unit) for c in columns) + " |" for name, key, unit in rows)
    return header + "\n" + body


def _usage(evaluation: Evaluation, load: str, section: CardSection, pipeline: str) -> str:
    """The card's snippet: load the pipeline (with the method's set-up, if any) and sample."""
    steps = evaluation.sampling.steps or 20
    if evaluation.prompts and pipeline == "DiTPipeline":  # the first evaluation class, by id or by name
        first = evaluation.prompts[0]
        labels = f"[{int(first)}]" if first.isdigit() else f"pipe.get_label_ids([{json.dumps(first)}])"
        call = f"pipe(class_labels={labels}, num_inference_steps={steps}, guidance_scale={evaluation.sampling.guidance_scale:g}).images"
    elif evaluation.prompts:
        prompt = json.dumps(evaluation.prompts[0])
        call = f"pipe({prompt}, num_inference_steps={steps}, guidance_scale={evaluation.sampling.guidance_scale:g}).images"
    else:
        call = f"pipe(batch_size=4, num_inference_steps={steps}).images"
    imports, setup = (["import diffusers", section.setup[0]], [section.setup[1]]) if section.setup else (["import diffusers"], [])
    return "\n".join([*imports, "", f"pipe = {load}", *setup, f"images = {call}"])


def _task_tag(evaluation: Evaluation, pipeline: str) -> str:
    if pipeline == "DiTPipeline":
        return "class-conditional-image-generation"
    return "text-to-image" if evaluation.prompts else "unconditional-image-generation"


def model_card(
    *,
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    storage_url: str,
    custom_code: tuple[str, str] | None = None,
    pipeline: str = "DDIMPipeline",
    absent: Sequence[str] = (),
) -> str:
    """A Hugging Face style README: metrics against the teacher (and the starting model of a
    stacked study), the method's own section, the lineage from the original teacher, source study
    and trial, usage."""
    attrs = trial.user_attrs
    teacher = study.user_attrs.get(StudyAttr.TEACHER_METRICS, {})
    start = study.user_attrs.get(StudyAttr.START_METRICS)
    original = study.user_attrs.get(StudyAttr.ORIGINAL_TEACHER, study.user_attrs.get(StudyAttr.TEACHER))
    evaluation = Evaluation.from_record(study.user_attrs.get(StudyAttr.EVALUATION))
    chain = lineage(study, trial, storage_url=storage_url)
    method, teacher_name = study.user_attrs.get(StudyAttr.METHOD), study.user_attrs.get(StudyAttr.TEACHER)
    cls = _method(method)
    steps = evaluation.sampling.steps or 20
    section = cls.card_section(attrs, steps=steps, first_step=len(chain) == 1) if cls is not None else CardSection()
    custom_note = (
        f"\nThe denoiser is a `{custom_code[1]}` (searched depths, widths or dropped layers) whose code ships in\n"
        f"`{custom_code[0]}`; `trust_remote_code=True` lets diffusers import it. Read it before you trust it.\n"
        if custom_code
        else ""
    )
    load = load_call("path/to/this/folder", custom_code=bool(custom_code), pipeline=pipeline, absent=absent)
    sampler = recorded_sampler(study.user_attrs)  # the scheduler the study's auto resolved to
    scheduler = sampler.scheduler if sampler is not None else evaluation.sampling.scheduler
    method_text = f"\n{section.text}\n" if section.text else ""
    return f"""---
library_name: diffusers
tags:
- automl_diff
- {method or "unknown"}
- {_task_tag(evaluation, pipeline)}
---

# {study.study_name} — trial {trial.number}

A compressed diffusion UNet found by automl_diff (method `{method}`) from
`{teacher_name}`{"" if not start else f", itself compressed from the teacher `{original}`"}.

{_metrics_table([attrs, *([start] if start else []), teacher], start=bool(start))}

Speedup against the teacher (measured latency): {fmt_number(attrs.get(TrialAttr.SPEEDUP), "x")}.
{method_text}
FID: {evaluation.fid_samples or "?"} samples, {evaluation.sampling.steps or "?"} {scheduler} steps,
features `{evaluation.fid_features}`, dataset `{evaluation.fid_dataset}`, seed {evaluation.seed};
latency on `{evaluation.device}` with batches of {evaluation.latency_batch_size}.{_prompts_note(evaluation, pipeline)}

## Lineage

{_lineage_section(chain, original)}
## Source

- study: `{study.study_name}` in `{mask_url(storage_url)}`
- trial: {trial.number}
- parameters:

```json
{json.dumps(trial.params, indent=2, sort_keys=True)}
```

## Use

```python
{_usage(evaluation, load, section, pipeline)}
```
{custom_note}"""


def _prompts_note(evaluation: Evaluation, pipeline: str) -> str:
    if not evaluation.prompts:
        return ""
    prompts = evaluation.prompts
    what, whats = ("class", "classes") if pipeline == "DiTPipeline" else ("prompt", "prompts")
    shown = ", ".join(f"`{p}`" for p in prompts[:5]) + (f" and {len(prompts) - 5} more" if len(prompts) > 5 else "")
    return (
        f"\nImages from {len(prompts)} evaluation {whats} ({shown}), {evaluation.images_per_prompt} per {what}, "
        f"classifier-free guidance {evaluation.sampling.guidance_scale:g}; MACs per image count both halves of guidance."
    )


def _save_latent_pipeline(pipeline: dict[str, Any], unet: Any, scheduler: Any, out: Path, store: Any | None) -> str:
    """The teacher's pipeline (text-to-image, or class-conditional: DiT) with ``unet`` and
    ``scheduler`` in it, saved at ``out``: its VAE (text encoder, tokenizer) from the teacher's
    folder, else from the store's copy; a class-conditional one keeps its class names."""
    from automl_diff.models.classes import CLASS_TO_IMAGE_PIPELINES, load_class_to_image
    from automl_diff.models.text import TEXT_TO_IMAGE_PIPELINES, load_text_to_image

    name, folder = pipeline.get("class"), pipeline.get("folder")
    if name not in TEXT_TO_IMAGE_PIPELINES + CLASS_TO_IMAGE_PIPELINES:
        raise UserError(f"the study's teacher '{folder}' has a pipeline class automl_diff does not export: {name}")
    with local_folder(folder, pipeline.get("artifact"), store, what=f"the study's {name} teacher") as parts:
        if name in TEXT_TO_IMAGE_PIPELINES:
            load_text_to_image(parts).pipeline(unet, scheduler).save_pretrained(str(out), safe_serialization=True)
            return name
        config = unet.config  # a DiT's classes, or a UNet student's class embeddings less the null class
        num_classes = int(config.num_embeds_ada_norm) if getattr(config, "num_embeds_ada_norm", None) else int(config.num_class_embeds) - 1
        classes = load_class_to_image(parts, num_classes=num_classes)
    classes.pipeline(unet, scheduler).save_pretrained(str(out), safe_serialization=True)
    if classes.id2label:  # DiTPipeline reads them from model_index.json but does not write them
        index = json.loads((out / "model_index.json").read_text())
        index["id2label"] = {str(k): v for k, v in sorted(classes.id2label.items())}
        (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return name


def _completed(study: optuna.Study, trial_number: int) -> optuna.trial.FrozenTrial:
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if trial_number not in trials:
        raise UserError(f"study '{study.study_name}' has no trial {trial_number} (trials 0..{len(trials) - 1})")
    trial = trials[trial_number]
    if trial.state != optuna.trial.TrialState.COMPLETE:
        raise UserError(f"trial {trial_number} of study '{study.study_name}' is {trial.state.name}, not COMPLETE")
    return trial


def _plain_unet(weights: Path) -> Any:
    """The trial's UNet (or transformer), as stock diffusers' class where that can express it."""
    from automl_diff.models.loading import load_unet
    from automl_diff.models.students import as_stock

    return as_stock(load_unet(str(weights)))


def _ship_student_code(unet: Any, out: Path) -> tuple[str, str]:
    """diffusers' custom components: the student's code in its component's folder (``unet/``, or
    ``transformer/`` in a DiT pipeline), named in model_index.json. Returns the code's path in
    the folder and the class."""
    from automl_diff.models.students import student_module

    module = student_module(type(unet).__name__)
    index = json.loads((out / "model_index.json").read_text())
    component = next(k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[1] == type(unet).__name__)
    (out / component / module.MODULE_FILE).write_text(Path(module.__file__).read_text())
    index[component] = [Path(module.MODULE_FILE).stem, type(unet).__name__]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return f"{component}/{module.MODULE_FILE}", type(unet).__name__


def export_trial(study: optuna.Study, trial_number: int, out: str | Path, *, storage_url: str, artifacts: str | None = None) -> Export:
    """Write trial ``trial_number`` as a diffusers DDIM pipeline folder at ``out``.

    The trial's weights (and a text-to-image teacher's VAE and text encoder) are read from where
    the trial saved them when this host has them, else from the study's artifact store
    (``artifacts``: another location of it).

    Returns:
        The export, whose :attr:`Export.load_call` loads it with diffusers alone.

    Raises:
        UserError: no such completed trial, or its weights are gone.
    """
    from diffusers import DDIMPipeline, DDPMPipeline

    from automl_diff.models.loading import EXPORT_INFO
    from automl_diff.models.students import STUDENT_CLASSES

    unconditional = {"ddim": DDIMPipeline, "ddpm": DDPMPipeline, "dpm": DDPMPipeline}  # pipelines that run each scheduler
    trial = _completed(study, trial_number)
    sampler = recorded_sampler(study.user_attrs)
    if sampler is None:
        raise UserError(f"study '{study.study_name}' has no scheduler config recorded; was it created by automl_diff?")
    pipeline = study.user_attrs.get(StudyAttr.PIPELINE)
    if not pipeline and sampler.scheduler not in unconditional:
        raise UserError(
            f"study '{study.study_name}' sampled with {sampler.scheduler}, which no unconditional diffusers pipeline runs "
            f"(exports of an unconditional UNet sample with {', '.join(unconditional)})"
        )
    store = study_store(study, artifacts)
    with trial_weights(trial, store) as weights:
        unet = _plain_unet(weights)
    custom_code = type(unet).__name__ in STUDENT_CLASSES
    scheduler = sampler.make_scheduler()  # exports sample with the study's scheduler
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if pipeline:
        pipeline_class = _save_latent_pipeline(pipeline, unet, scheduler, out, store)
    else:
        kind = unconditional[sampler.scheduler]
        pipeline_class = kind.__name__
        kind(unet=unet, scheduler=scheduler).save_pretrained(str(out), safe_serialization=True)
    code = _ship_student_code(unet, out) if custom_code else None
    absent = _absent_parts(out)
    card = model_card(study=study, trial=trial, storage_url=storage_url, custom_code=code, pipeline=pipeline_class, absent=absent)
    (out / "README.md").write_text(card)
    metrics = {k: trial.user_attrs.get(k) for k in _METRICS}
    summary = {
        "study": study.study_name,
        "trial": trial_number,
        "method": study.user_attrs.get(StudyAttr.METHOD),
        "params": trial.params,
        "metrics": metrics,
        "teacher": study.user_attrs.get(StudyAttr.TEACHER),
        "original_teacher": study.user_attrs.get(StudyAttr.ORIGINAL_TEACHER, study.user_attrs.get(StudyAttr.TEACHER)),
        "lineage": lineage(study, trial, storage_url=storage_url),
    }
    schedule_path = None
    if trial.user_attrs.get(TrialAttr.SCHEDULE):
        schedule = Schedule.from_dict(trial.user_attrs[TrialAttr.SCHEDULE], source=f"trial {trial_number}: schedule")
        schedule_path = schedule.save(StudyFolder.schedule(out))
        summary["schedule"] = schedule_path.name
    (out / EXPORT_INFO).write_text(json.dumps(summary, indent=2) + "\n")
    return Export(out, custom_code, schedule_path, pipeline_class, absent)
