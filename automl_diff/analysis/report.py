"""A self-contained HTML report of a study: figures, the Pareto table and samples of each front model.

The file embeds plotly.js and the sample images (PNG, base64), so it opens offline, from disk,
with no CDN. Written by ``python -m automl_diff.study report``.
"""

from __future__ import annotations

import base64
import contextlib
import html
from pathlib import Path
from typing import Any

import optuna

from automl_diff.analysis.figures import (
    block_macs_figure,
    choices_data,
    choices_figure,
    history_data,
    history_figure,
    pareto_data,
    pareto_figure,
    schedule_figure,
)
from automl_diff.analysis.pareto import TrialRow, pareto_rows, teacher_metrics
from automl_diff.config.evaluation import Evaluation, recorded_sampler
from automl_diff.errors import UserError
from automl_diff.formatting import fmt_number, fmt_si
from automl_diff.gating import Schedule, apply_schedule
from automl_diff.metrics import count_macs
from automl_diff.models.loading import load_unet, unet_from_config
from automl_diff.records import StudyAttr, TrialAttr
from automl_diff.runners.artifacts import study_store, trial_samples, trial_weights
from automl_diff.sampling import sample_grid_png

__all__ = ["write_report"]


def _samples(study: optuna.Study, trial: optuna.trial.FrozenTrial, count: int, store: Any | None) -> bytes | None:
    """The trial's sample grid: the one its evaluation stored (``samples.png`` or its copy in the
    artifact store), else ``count`` new samples of its model with the study's sampler, steps and
    seed (None where neither can be had)."""
    stored = trial_samples(trial, store)
    if stored is not None:
        return stored
    sampler = recorded_sampler(study.user_attrs)
    evaluation = Evaluation.from_record(study.user_attrs.get(StudyAttr.EVALUATION))
    if sampler is None or evaluation.prompts:  # a text-to-image model samples only with its pipeline's parts
        return None
    try:
        with trial_weights(trial, store) as weights:
            unet = load_unet(str(weights)).eval()
    except UserError:  # its weights are nowhere this host can read: the report shows the rest
        return None
    stored_schedule = trial.user_attrs.get(TrialAttr.SCHEDULE)
    schedule = Schedule.from_dict(stored_schedule) if stored_schedule else None
    with apply_schedule(unet, schedule) if schedule else contextlib.nullcontext():
        images = sampler.sample(unet, num_images=count, batch_size=count, seed=evaluation.seed)
    return sample_grid_png(images)


def _table(rows: list[TrialRow], teacher: dict[str, Any] | None) -> str:
    header = ["trial", "MACs", "trajectory MACs", "params", "FID", "latency (s)", "speedup"]
    body = []
    if teacher:
        keys = (TrialAttr.MACS, TrialAttr.TRAJECTORY_MACS, TrialAttr.PARAMS, TrialAttr.FID, TrialAttr.LATENCY)
        body.append(["teacher", *(teacher.get(key) for key in keys), 1.0])
    body += [[r.label, r.macs, r.trajectory_macs, r.params, r.fid, r.latency, r.speedup] for r in rows]
    return _html_table(header, [[fmt_number(v) for v in row] for row in body])


def _html_table(header: list[str], rows: list[list[Any]]) -> str:
    """An HTML table of the report's style; cells are escaped."""
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='pareto'><thead><tr>{''.join(f'<th>{h}</th>' for h in header)}</tr></thead><tbody>{cells}</tbody></table>"


def _stopped_table(trials: list[optuna.trial.FrozenTrial]) -> str:
    """The trials the pruner stopped: rung, MACs, held-out loss at each rung reached, and why."""
    rows = []
    for t in trials:
        reason = t.user_attrs.get(TrialAttr.PRUNE_REASON)
        if t.state != optuna.trial.TrialState.PRUNED or not reason:
            continue
        scores = t.user_attrs.get(TrialAttr.RUNG_SCORES) or {}
        iterations = t.user_attrs.get(TrialAttr.RUNG_ITERATIONS) or {}
        losses = ", ".join(f"{fmt_number(v)} @ {iterations.get(k, '?')}" for k, v in scores.items())
        macs = fmt_si(t.user_attrs.get(TrialAttr.RUNG_MACS) or 0)
        rows.append([t.number, t.user_attrs.get(TrialAttr.PRUNED_AT_RUNG), macs, losses, reason])
    if not rows:
        return ""
    return _html_table(["trial", "rung", "MACs", "held-out loss @ iteration", "reason"], rows)


def write_report(study: optuna.Study, out: str | Path, *, samples: int = 16, storage_label: str = "", artifacts: str | None = None) -> Path:
    """Write the report of ``study`` to ``out`` (an ``.html`` file); returns its path. Sample grids
    and weights come from the trials' folders where this host has them, else from the study's
    artifact store (``artifacts``: another location of it).

    Raises:
        UserError: the study has no completed trial, or ``out``'s folder does not exist.
    """
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    out = Path(out)
    if not out.parent.is_dir():
        raise UserError(f"--out: the folder {out.parent} does not exist")
    rows = pareto_rows(study)
    if not rows:
        raise UserError(f"study '{study.study_name}' has no completed trial to report")
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    teacher = teacher_metrics(study)
    store = study_store(study, artifacts) if samples else None

    def embed(fig: Any, div_id: str) -> str:
        return pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=div_id)

    sections = [
        f"<h2>Pareto front</h2>{embed(pareto_figure(pareto_data(study)), 'pareto-plot')}",
        f"<h2>Front trials</h2>{_table(rows, teacher)}",
        f"<h2>History</h2>{embed(history_figure(history_data(study)), 'history-plot')}",
        f"<h2>Choices across the front</h2>{embed(choices_figure(choices_data(study)), 'choices-plot')}",
    ]
    models = []
    for row in rows:
        trial = trials[row.trial]
        parts = [f"<h3>Trial {html.escape(row.label)}</h3>", f"<pre>{html.escape(str(trial.params))}</pre>"]
        config = trial.user_attrs.get(TrialAttr.MODEL_CONFIG)
        if config:
            report = count_macs(unet_from_config(config, where=f"trial {row.trial}"))
            parts.append(embed(block_macs_figure(report, title=f"Trial {row.trial}: MACs per block"), f"blocks-{row.trial}"))
        if trial.user_attrs.get(TrialAttr.SCHEDULE):
            schedule = Schedule.from_dict(trial.user_attrs[TrialAttr.SCHEDULE], source=f"trial {row.trial}")
            parts.append(embed(schedule_figure(schedule, title=f"Trial {row.trial} schedule"), f"schedule-{row.trial}"))
        png = _samples(study, trial, samples, store) if samples else None
        if png is not None:
            data = base64.b64encode(png).decode()
            parts.append(f"<img class='samples' alt='samples of trial {row.trial}' src='data:image/png;base64,{data}'>")
            prompts = trial.user_attrs.get(TrialAttr.SAMPLE_PROMPTS)
            if prompts:
                items = "".join(f"<li>{html.escape(str(p))}</li>" for p in prompts)
                parts.append(f"<p>Prompts, in grid order (left to right, top to bottom):</p><ol class='prompts'>{items}</ol>")
        models.append(f"<section class='model' id='trial-{row.trial}'>{''.join(parts)}</section>")
    sections.append("<h2>Front models</h2>" + "".join(models))
    stopped = _stopped_table(list(trials.values()))
    if stopped:
        sections.append(f"<h2>Trials stopped early</h2>{stopped}")
    title = html.escape(f"automl_diff report: {study.study_name}")
    method = html.escape(str(study.user_attrs.get(StudyAttr.METHOD)))
    teacher_name = html.escape(str(study.user_attrs.get(StudyAttr.TEACHER)))
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<script type="text/javascript">{get_plotlyjs()}</script>
<style>body{{font-family:sans-serif;margin:2em;}}
table.pareto td,table.pareto th{{padding:2px 10px;text-align:right;}}
img.samples{{image-rendering:pixelated;border:1px solid #ccc;}}</style>
</head><body>
<h1>{title}</h1>
<p>Storage: {html.escape(storage_label)}; method {method}; teacher {teacher_name}; {len(trials)} trials, {len(rows)} on the front.</p>
{"".join(sections)}
</body></html>
"""
    out.write_text(page)
    return out
