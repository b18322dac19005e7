"""Plotly figures of a study. Each figure has a data step (``*_data``: plain dataclasses read from
the study, a schedule or a MACs report) and a drawing step (``*_figure``), so the data can be
tested and reused without plotly, and the figures drawn from data saved elsewhere."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import optuna

from automl_diff.analysis.pareto import alignment_name, pareto_rows, teacher_metrics, trial_rows
from automl_diff.records import TrialAttr

__all__ = [
    "ChoicesData",
    "HistoryData",
    "ParetoData",
    "block_macs_figure",
    "choices_data",
    "choices_figure",
    "history_data",
    "history_figure",
    "hypervolume_2d",
    "pareto_data",
    "pareto_figure",
    "schedule_figure",
]


@dataclass
class ParetoData:
    """Points of a MACs-against-FID plot (against the text alignment, with ``fid: none``): every
    completed trial, which are on the front, the teacher."""

    x_name: str
    y_name: str = TrialAttr.FID
    trials: list[int] = field(default_factory=list)
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    on_front: list[bool] = field(default_factory=list)
    hover: list[str] = field(default_factory=list)
    teacher: tuple[float, float] | None = None


def pareto_data(study: optuna.Study) -> ParetoData:
    """Trajectory MACs when the study optimises them (DiP-GO), else MACs per call, against FID
    (or, where the study measures none, its text alignment)."""
    names = study.metric_names or []
    key = TrialAttr.TRAJECTORY_MACS if TrialAttr.TRAJECTORY_MACS in names else TrialAttr.MACS
    front = {r.trial for r in pareto_rows(study)}
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    rows = trial_rows(study)
    y_name = TrialAttr.FID if any(r.fid is not None for r in rows) or not rows else (alignment_name(study) or TrialAttr.FID)
    data = ParetoData(key, y_name)
    for row in rows:
        attrs = trials[row.trial].user_attrs
        x = getattr(row, key)
        y = row.fid if y_name == TrialAttr.FID else row.alignment
        if x is None or y is None:
            continue
        data.trials.append(row.trial)
        data.x.append(float(x))
        data.y.append(y)
        data.on_front.append(row.trial in front)
        facts = {
            "trial": row.trial,
            key: x,
            y_name: round(y, 4),
            TrialAttr.SPEEDUP: attrs.get(TrialAttr.SPEEDUP),
            "params": trials[row.trial].params,
        }
        data.hover.append("<br>".join(f"{k}: {json.dumps(v) if isinstance(v, dict) else v}" for k, v in facts.items()))
    teacher = teacher_metrics(study)
    if teacher and teacher.get(key) is not None and teacher.get(y_name) is not None:
        data.teacher = (float(teacher[key]), float(teacher[y_name]))
    return data


def pareto_figure(data: ParetoData) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for on, name, size in ((False, "trials", 8), (True, "Pareto front", 12)):
        idx = [i for i, f in enumerate(data.on_front) if f == on]
        fig.add_trace(
            go.Scatter(
                x=[data.x[i] for i in idx],
                y=[data.y[i] for i in idx],
                mode="markers",
                name=name,
                marker={"size": size},
                text=[data.hover[i] for i in idx],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    if data.teacher:
        fig.add_trace(
            go.Scatter(x=[data.teacher[0]], y=[data.teacher[1]], mode="markers", name="teacher", marker={"symbol": "star", "size": 16})
        )
    label = "trajectory MACs per image" if data.x_name == "trajectory_macs" else "MACs per UNet call"
    y = "FID (lower is better)" if data.y_name == TrialAttr.FID else f"{data.y_name} (higher is better)"
    fig.update_layout(title=f"Pareto front: MACs against {y.split(' (')[0]}", xaxis_title=label, yaxis_title=y)
    return fig


def hypervolume_2d(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by ``points`` (both objectives minimised) and bounded by ``reference``."""
    inside = sorted(p for p in points if p[0] < reference[0] and p[1] < reference[1])
    area, best_y = 0.0, reference[1]
    for x, y in inside:
        if y < best_y:
            area += (reference[0] - x) * (best_y - y)
            best_y = y
    return area


@dataclass
class HistoryData:
    """Objective values by trial number, and the hypervolume of the front so far (two objectives)."""

    names: list[str]
    trials: list[int] = field(default_factory=list)
    values: list[list[float]] = field(default_factory=list)
    hypervolume: list[float] | None = None
    reference: tuple[float, float] | None = None


def history_data(study: optuna.Study) -> HistoryData:
    """The reference point is the worst value of each objective times 1.1 (or the teacher's
    metric where it is worse), so the hypervolume is comparable within one study."""
    names = list(study.metric_names or [f"objective_{i}" for i in range(len(study.directions))])
    done = sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: t.number)
    data = HistoryData(names, [t.number for t in done], [list(t.values) for t in done])
    minimise = all(d == optuna.study.StudyDirection.MINIMIZE for d in study.directions)
    if len(names) == 2 and minimise and done:
        teacher = teacher_metrics(study) or {}
        ref = tuple(max([v[i] for v in data.values] + [float(teacher.get(names[i], 0.0))]) * 1.1 for i in range(2))
        data.reference = (ref[0], ref[1])
        data.hypervolume = [hypervolume_2d([tuple(v) for v in data.values[: k + 1]], data.reference) for k in range(len(done))]
    return data


def history_figure(data: HistoryData) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = len(data.names) + (1 if data.hypervolume is not None else 0)
    titles = [*data.names, *(["hypervolume"] if data.hypervolume is not None else [])]
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, subplot_titles=titles)
    for i, name in enumerate(data.names):
        fig.add_trace(go.Scatter(x=data.trials, y=[v[i] for v in data.values], mode="markers+lines", name=name), row=i + 1, col=1)
    if data.hypervolume is not None:
        fig.add_trace(go.Scatter(x=data.trials, y=data.hypervolume, mode="lines+markers", name="hypervolume"), row=rows, col=1)
    fig.update_layout(title="Optimisation history", xaxis_title="trial", height=250 * rows)
    return fig


def block_macs_figure(report: Any, *, title: str = "MACs per block") -> Any:
    """Bars of a :class:`~automl_diff.metrics.macs.MacsReport` (attention matmuls stacked)."""
    import plotly.graph_objects as go

    names = [b.name for b in report.blocks]
    fig = go.Figure(
        [
            go.Bar(x=names, y=[b.macs_no_attention for b in report.blocks], name="without attention matmuls"),
            go.Bar(x=names, y=[b.macs - b.macs_no_attention for b in report.blocks], name="attention matmuls"),
        ]
    )
    fig.update_layout(barmode="stack", title=title, yaxis_title="MACs (batch 1)")
    return fig


def schedule_figure(schedule: Any, *, title: str = "DiP-GO schedule") -> Any:
    """A steps-by-units heatmap of a schedule: 1 where the unit computes, 0 where it reuses its cache."""
    import plotly.graph_objects as go

    z = [[1 if on else 0 for on in row] for row in schedule.gates]
    fig = go.Figure(
        go.Heatmap(z=z, x=list(schedule.units), y=list(range(schedule.steps)), colorscale=[[0, "#eeeeee"], [1, "#1f77b4"]], showscale=False)
    )
    fig.update_layout(
        title=f"{title}: {schedule.computed_fraction:.0%} of unit computations",
        xaxis_title="unit",
        yaxis_title="step",
        yaxis_autorange="reversed",
    )
    return fig


@dataclass
class ChoicesData:
    """The parameters (per-block choices, for DiffNAS and DKDM spaces) of the front trials."""

    trials: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    values: list[list[Any]] = field(default_factory=list)  # [trial][parameter]


def choices_data(study: optuna.Study) -> ChoicesData:
    """Front trials by increasing MACs, with every parameter any of them has (sorted by name)."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    rows = [trials[r.trial] for r in pareto_rows(study)]
    names = sorted({name for t in rows for name in t.params})
    return ChoicesData([t.number for t in rows], names, [[t.params.get(n) for n in names] for t in rows])


def choices_figure(data: ChoicesData, *, title: str = "Choices of the front trials") -> Any:
    """A trials-by-parameters heatmap: colour is each value's rank within its parameter, the text
    the value itself, so block-wise choices across the front read at a glance."""
    import plotly.graph_objects as go

    z = []
    for row in data.values:
        line = []
        for j, value in enumerate(row):
            column = sorted({str(r[j]) for r in data.values if r[j] is not None}, key=_natural)
            line.append(None if value is None else column.index(str(value)) / max(1, len(column) - 1))
        z.append(line)
    text = [["-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v)) for v in row] for row in data.values]
    fig = go.Figure(
        go.Heatmap(
            z=z, x=data.names, y=[f"trial {t}" for t in data.trials], text=text, texttemplate="%{text}", colorscale="Blues", showscale=False
        )
    )
    fig.update_layout(title=title, xaxis_title="parameter", yaxis_autorange="reversed")
    return fig


def _natural(value: str) -> tuple[int, float | str]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)
