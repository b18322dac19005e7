"""Search cost to a front: the DKDM digits sweep four ways, hypervolume against wall time.

Runs one study config (default ``studies/dkdm_digits_sweep.yaml``: five trials of 300 steps) four times in this process, each in its
own SQLite storage, with the same sampler seed and the same number of trials started:

* ``random``: students start from diffusers' random init, every trial trains in full;
* ``teacher``: students start from a cut of the teacher's weights (``method_options.init: teacher``);
* ``stopping``: random init, with MO-ASHA early stopping (``pruner: {name: mo_asha}``);
* ``both``: teacher init and early stopping.

For each it prints the wall time of the whole run (teacher measurement and pool warm-up
included), the trials completed and stopped, the 2-D hypervolume of the final front in (MACs /
teacher MACs, FID / teacher FID) against the reference point (1, 10), the time at which its front
first reached the ``random`` run's final hypervolume, and the best FID among students with at
most half the teacher's MACs (with its interval where ``fid.interval`` is on).

With ``--judge-seeds``, the front students of the ``both`` run (or, with ``--judge-only
--judge-config``, of any study already run, such as the quickstart's) with at most half the
teacher's MACs are then judged on noise seeds the study never sampled: each student
and the teacher draw ``fid_samples`` images from each seed, and the student's FID over the
teacher's is the geometric mean of the per-seed ratios with its 95% t-interval (paired sets).

    python experiments/search_cost.py --json search_cost.json --judge-seeds 101 102 103 104 105
    python experiments/search_cost.py --judge-only --judge-config studies/quickstart.yaml --judge-seeds 201 202 203 204 205
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import optuna

from automl_diff.analysis.figures import hypervolume_2d
from automl_diff.config.study import PrunerSettings, StudyConfig, load_study_config
from automl_diff.evaluation import Evaluator
from automl_diff.metrics.intervals import paired_across_sets
from automl_diff.models.loading import load_teacher, load_unet
from automl_diff.records import StudyAttr, TrialAttr
from automl_diff.runners import run_study

VARIANTS = {
    "random": ("random", False),
    "teacher": ("teacher", False),
    "stopping": ("random", True),
    "both": ("teacher", True),
}
REFERENCE = (1.0, 10.0)


def _front_curve(study: optuna.Study, start: float, teacher: dict) -> list[tuple[float, float]]:
    """(seconds since the run started, hypervolume of the front so far) at each completed trial."""
    done = sorted(
        study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: t.datetime_complete.timestamp()
    )
    points, curve = [], []
    for t in done:
        points.append((t.values[0] / teacher[TrialAttr.MACS], t.values[1] / teacher[TrialAttr.FID]))
        curve.append((t.datetime_complete.timestamp() - start, hypervolume_2d(points, REFERENCE)))
    return curve


def judge(config: StudyConfig, study: optuna.Study, seeds: list[int]) -> list[dict]:
    """Paired FID ratios (student / teacher) over ``seeds`` for the front students with at most
    half the teacher's MACs."""
    teacher_metrics = study.user_attrs[StudyAttr.TEACHER_METRICS]
    students = [t for t in study.best_trials if t.user_attrs[TrialAttr.MACS] <= 0.5 * teacher_metrics[TrialAttr.MACS]]
    if not students:
        return []
    teacher = load_teacher(config.teacher, device="cpu")
    models = {"teacher": teacher.unet, **{t.number: load_unet(t.user_attrs[TrialAttr.WEIGHTS]).eval() for t in students}}
    fids: dict = {name: [] for name in models}
    for seed in seeds:
        evaluator = Evaluator(replace(config.evaluation, seed=seed), teacher, device="cpu")
        for name, unet in models.items():
            fids[name].append(evaluator.fid(unet))
    out = []
    for t in students:
        _, ratio = paired_across_sets(fids[t.number], fids["teacher"])
        out.append(
            {
                "trial": t.number,
                "macs_ratio": round(t.user_attrs[TrialAttr.MACS] / teacher_metrics[TrialAttr.MACS], 3),
                "speedup": t.user_attrs.get(TrialAttr.SPEEDUP),
                "fids": fids[t.number],
                "teacher_fids": fids["teacher"],
                "fid_ratio": [ratio.value, ratio.low, ratio.high],
                "met": ratio.high <= 1.5 and (t.user_attrs.get(TrialAttr.SPEEDUP) or 0) > 1,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="studies/dkdm_digits_sweep.yaml")
    parser.add_argument("--n-trials", type=int, default=None)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rungs", type=float, nargs="+", default=list(PrunerSettings.rungs))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--judge-seeds", type=int, nargs="*", default=[], help="judge the both run's front on these noise seeds")
    parser.add_argument("--judge-only", action="store_true", help="judge the both run already in --workdir, run nothing")
    parser.add_argument("--judge-config", default=None, help="with --judge-only: judge this config's study instead")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="search_cost_"))
    base = load_study_config(args.config)
    rows = []
    studies = {}
    for variant in [] if args.judge_only else args.variants:
        init, stopping = VARIANTS[variant]
        folder = workdir / variant
        folder.mkdir(parents=True, exist_ok=True)
        config = replace(
            base,
            name=f"search_cost_{variant}",
            storage=f"sqlite:///{folder / 'study.db'}",
            output_dir=str(folder / "runs"),
            n_trials=args.n_trials or base.n_trials,
            method_options=replace(base.method_options, init=init),
            pruner=replace(base.pruner, name="mo_asha" if stopping else "none", rungs=tuple(args.rungs)),
        )
        start = time.time()
        study = studies[variant] = run_study(config)
        seconds = time.time() - start
        teacher = study.user_attrs[StudyAttr.TEACHER_METRICS]
        curve = _front_curve(study, start, teacher)
        states = [t.state for t in study.trials]
        half = [
            t
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.user_attrs[TrialAttr.MACS] <= 0.5 * teacher[TrialAttr.MACS]
        ]
        best = min(half, key=lambda t: t.user_attrs[TrialAttr.FID], default=None)
        row = {
            "variant": variant,
            "seconds": round(seconds, 1),
            "completed": states.count(optuna.trial.TrialState.COMPLETE),
            "stopped": sum(TrialAttr.PRUNE_REASON in t.user_attrs for t in study.trials),
            "duplicates": sum(TrialAttr.DUPLICATE_OF in t.user_attrs for t in study.trials),
            "hypervolume": round(curve[-1][1], 4) if curve else 0.0,
            "curve": [(round(s, 1), round(h, 4)) for s, h in curve],
            "teacher_fid": teacher[TrialAttr.FID],
            "teacher_fid_high": teacher.get(TrialAttr.FID_HIGH),
            "best_half_macs": None
            if best is None
            else {
                "trial": best.number,
                "macs_ratio": round(best.user_attrs[TrialAttr.MACS] / teacher[TrialAttr.MACS], 3),
                "fid": best.user_attrs[TrialAttr.FID],
                "fid_high": best.user_attrs.get(TrialAttr.FID_HIGH),
                "speedup": best.user_attrs.get(TrialAttr.SPEEDUP),
            },
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    baseline = next((r for r in rows if r["variant"] == "random"), None)
    print(f"\n{'variant':10} {'wall s':>8} {'done':>5} {'stopped':>8} {'HV':>7} {'s to random HV':>15} {'best FID at <=0.5x MACs':>28}")
    for r in rows:
        reach = "-"
        if baseline is not None:
            hit = next((s for s, h in r["curve"] if h >= baseline["hypervolume"] - 1e-9), None)
            reach = f"{hit:.0f}" if hit is not None else "never"
            r["seconds_to_random_hypervolume"] = hit
        b = r["best_half_macs"]
        best = "-" if b is None else f"{b['fid']:.3g} [..{b['fid_high'] or math.nan:.3g}] ({b['macs_ratio']}x MACs)"
        print(f"{r['variant']:10} {r['seconds']:8.0f} {r['completed']:5d} {r['stopped']:8d} {r['hypervolume']:7.4f} {reach:>15} {best:>28}")
    verdicts = []
    if args.judge_seeds:
        folder = workdir / "both"
        config = replace(base, name="search_cost_both", storage=f"sqlite:///{folder / 'study.db'}", output_dir=str(folder / "runs"))
        if args.judge_config:
            config = load_study_config(args.judge_config)
        study = studies.get("both") or optuna.load_study(study_name=config.name, storage=config.storage)
        verdicts = judge(config, study, args.judge_seeds)
        print(f"\nfront students of study {config.name} with <= 0.5x the teacher's MACs, judged on seeds {args.judge_seeds}:")
        for v in verdicts:
            r = v["fid_ratio"]
            print(
                f"trial {v['trial']}: {v['macs_ratio']}x MACs, speedup {v['speedup']:.2f}x, FID / teacher {r[0]:.3f} "
                f"[{r[1]:.3f}, {r[2]:.3f}], goal (<= 1.5 at the upper end, speedup > 1) {'met' if v['met'] else 'not met'}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "verdicts": verdicts}, indent=2))


if __name__ == "__main__":
    main()
