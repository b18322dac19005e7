"""Plotly figures: the data read from a study, and what each figure draws."""

from __future__ import annotations

import optuna
import pytest

from automl_diff.analysis.figures import (
    block_macs_figure,
    choices_data,
    choices_figure,
    history_data,
    history_figure,
    hypervolume_2d,
    pareto_data,
    pareto_figure,
    schedule_figure,
)
from automl_diff.gating import Schedule
from automl_diff.records import StudyAttr, TrialAttr


def _study() -> optuna.Study:
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.set_metric_names(["macs", "fid"])
    study.set_user_attr(StudyAttr.TEACHER_METRICS, {TrialAttr.MACS: 100, TrialAttr.FID: 5.0, TrialAttr.PARAMS: 10, TrialAttr.LATENCY: 1.0})
    for macs, fid in [(50, 9.0), (80, 6.0), (60, 10.0), (30, 12.0)]:
        trial = study.ask()
        trial.suggest_int("width", 1, 10)
        for key, value in {
            TrialAttr.MACS: macs,
            TrialAttr.FID: fid,
            TrialAttr.PARAMS: 5,
            TrialAttr.LATENCY: 0.5,
            TrialAttr.SPEEDUP: 2.0,
        }.items():
            trial.set_user_attr(key, value)
        study.tell(trial, [macs, fid])
    return study


def test_hypervolume_2d():
    assert hypervolume_2d([(1, 1)], (2, 2)) == 1
    assert hypervolume_2d([(1, 2), (2, 1)], (3, 3)) == 3  # 2*1 + 1*1
    assert hypervolume_2d([(1, 1), (1.5, 1.5)], (2, 2)) == 1  # a dominated point adds nothing
    assert hypervolume_2d([(5, 5)], (2, 2)) == 0


def test_pareto_data_and_figure():
    data = pareto_data(_study())
    assert data.x_name == "macs" and data.trials == [0, 1, 2, 3]
    assert data.on_front == [True, True, False, True]  # trial 2 is dominated by trial 0
    assert data.teacher == (100.0, 5.0)
    assert "width" in data.hover[0]
    fig = pareto_figure(data)
    names = [t.name for t in fig.data]
    assert names == ["trials", "Pareto front", "teacher"]
    assert list(fig.data[1].x) == [50.0, 80.0, 30.0] and list(fig.data[0].x) == [60.0]


def test_history_hypervolume_never_decreases():
    data = history_data(_study())
    assert data.trials == [0, 1, 2, 3] and data.reference == (pytest.approx(110.0), pytest.approx(13.2))
    assert all(b >= a for a, b in zip(data.hypervolume, data.hypervolume[1:]))
    assert data.hypervolume[2] == data.hypervolume[1]  # the dominated trial adds nothing
    assert len(history_figure(data).data) == 3


def test_block_and_schedule_figures(tiny_unet):
    from automl_diff.metrics import count_macs

    report = count_macs(tiny_unet)
    fig = block_macs_figure(report)
    assert list(fig.data[0].x) == [b.name for b in report.blocks]
    schedule = Schedule.from_scores([[1, 1, 1], [0.9, 0.1, 0.2]], 0.5, units=["a", "b", "c"], model={})
    heat = schedule_figure(schedule)
    assert [list(r) for r in heat.data[0].z] == [[1, 1, 1], [1, 0, 0]]
    assert "67%" in heat.layout.title.text


def test_choices_across_front_trials():
    data = choices_data(_study())
    assert data.names == ["width"] and data.trials == [3, 0, 1]  # front by increasing MACs
    fig = choices_figure(data)
    assert list(fig.data[0].y) == ["trial 3", "trial 0", "trial 1"]
    assert [row[0] for row in fig.data[0].text] == [str(v[0]) for v in data.values]
