"""The subcommands of ``python -m automl_diff.study``; each takes parsed arguments and returns an exit code."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from automl_diff.errors import UserError, first_line
from automl_diff.formatting import fmt_si, text_table
from automl_diff.records import TrialAttr

__all__ = ["cmd_dashboard", "cmd_export", "cmd_pareto", "cmd_profile", "cmd_report", "cmd_run", "cmd_status", "cmd_trials"]

logger = logging.getLogger("automl_diff")


def pareto_table(study: Any) -> str:
    """The Pareto front as a text table, the teacher first."""
    from automl_diff.analysis.pareto import alignment_name, pareto_rows, teacher_metrics

    aligned = alignment_name(study)
    header = ["trial", "MACs", "trajectory MACs", "params", "FID", *([aligned] if aligned else []), "latency", "speedup"]
    rows = []
    teacher = teacher_metrics(study)
    if teacher:
        alignment = [fmt_si(teacher.get(aligned))] if aligned else []
        rows.append(
            [
                "teacher",
                fmt_si(teacher[TrialAttr.MACS]),
                fmt_si(teacher.get(TrialAttr.TRAJECTORY_MACS)),
                fmt_si(teacher[TrialAttr.PARAMS]),
                fmt_si(teacher.get(TrialAttr.FID)),
                *alignment,
                fmt_si(teacher[TrialAttr.LATENCY], "s"),
                "1x",
            ]
        )
    for r in pareto_rows(study):
        rows.append(
            [
                r.label,
                fmt_si(r.macs),
                fmt_si(r.trajectory_macs),
                fmt_si(r.params),
                fmt_si(r.fid),
                *([fmt_si(r.alignment)] if aligned else []),
                fmt_si(r.latency, "s"),
                fmt_si(r.speedup, "x"),
            ]
        )
    return text_table(header, rows)


def _dry_run(args: argparse.Namespace, config: Any) -> int:
    """``run --dry-run``: the study's stages measured and projected; no storage is opened."""
    import contextlib
    import json

    from automl_diff.runners.dryrun import dry_run

    # what the libraries print while loading (torch.hub's downloads, say) must not mix with the JSON
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = dry_run(config, study_name=args.study_name or config.study_name, progress=not args.quiet, compile=args.compile)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(f"dry run of study '{config.study_name}' ({config.path}) on {result.device}, {config.dtype}; nothing was stored")
        print(result.table())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from automl_diff.analysis.pareto import alignment_name
    from automl_diff.config import load_study_config
    from automl_diff.runners import mask_url, run_study

    config = load_study_config(args.config)
    storage = args.storage or config.storage
    if args.address and args.backend != "ray":
        raise UserError(f"--address {args.address}: only meaningful with --backend ray")
    if args.compile and not args.dry_run:
        raise UserError("--compile: only meaningful with --dry-run")
    if args.dry_run:
        return _dry_run(args, config)
    if args.backend == "ray":
        from automl_diff.runners.ray import run_study_ray

        study = run_study_ray(
            config, storage_url=storage, study_name=args.study_name, n_trials=args.n_trials, address=args.address, progress=not args.quiet
        )
    else:
        study = run_study(config, storage_url=storage, study_name=args.study_name, n_trials=args.n_trials, progress=not args.quiet)
    aligned = ", higher text alignment is better" if alignment_name(study) else ""
    print(
        f"\nPareto front of study '{study.study_name}' (MACs per UNet call, trajectory MACs and latency per image, "
        f"lower FID is better{aligned}):"
    )
    print(pareto_table(study))
    print(
        "\nExport the front as diffusers pipelines with:\n"
        f"  python -m automl_diff.study export --storage {mask_url(storage)} "
        f"--study-name {study.study_name} --pareto --out exports/{study.study_name}"
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import optuna

    from automl_diff.analysis import pareto_rows
    from automl_diff.runners import load_existing_study

    study = load_existing_study(args.storage, args.study_name)
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    front = pareto_rows(study)
    best: dict[str, Any] = {}
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    names = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
    for i, (name, direction) in enumerate(zip(names, study.directions)):
        values = [t.values[i] for t in complete if t.values]
        if values:
            best[name] = (min if direction == optuna.study.StudyDirection.MINIMIZE else max)(values)
    if args.json:
        print(
            json.dumps({"study": study.study_name, "states": dict(states), "trials": len(trials), "pareto_size": len(front), "best": best})
        )
        return 0
    print(f"study {study.study_name}: {len(trials)} trials")
    for state, count in sorted(states.items()):
        print(f"  {state.lower():9s} {count}")
    for name, value in best.items():
        counts = (TrialAttr.MACS, TrialAttr.TRAJECTORY_MACS, TrialAttr.PARAMS)
        print(f"  best {name}: {fmt_si(int(value) if name in counts else value)}")
    print(f"  Pareto front: {len(front)} trials")
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    from automl_diff.analysis import pareto_rows, trials_frame
    from automl_diff.runners import load_existing_study

    study = load_existing_study(args.storage, args.study_name)
    rows = pareto_rows(study)
    if args.csv:
        trials_frame(study, pareto_only=True).to_csv(_csv_path(args.csv), index=False)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows]))
    elif not args.csv:
        print(pareto_table(study))
    return 0


def _csv_path(value: str) -> Path:
    path = Path(value)
    if not path.parent.is_dir():
        raise UserError(f"--csv: the folder {path.parent} does not exist")
    return path


def cmd_trials(args: argparse.Namespace) -> int:
    from automl_diff.analysis import all_trials_frame
    from automl_diff.analysis.pareto import ALIGNMENT_METRICS
    from automl_diff.runners import load_existing_study

    study = load_existing_study(args.storage, args.study_name)
    frame = all_trials_frame(study)
    if args.csv:
        frame.to_csv(_csv_path(args.csv), index=False)
    if args.json:
        print(frame.to_json(orient="records"))
    elif not args.csv:
        import pandas as pd

        def cell(value: Any, unit: str = "") -> str:
            if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
                return "-"
            return fmt_si(int(value) if not isinstance(value, float) else value, unit)

        rows = []
        for r in frame.to_dict("records"):
            reason, duplicate, stopped = r[TrialAttr.FAIL_REASON], r[TrialAttr.DUPLICATE_OF], r[TrialAttr.PRUNE_REASON]
            note = reason if isinstance(reason, str) else ""
            if cell(duplicate) != "-":
                note = f"same as trial {duplicate}"
            elif isinstance(stopped, str):
                note = stopped
            elif isinstance(r[TrialAttr.RECIPE], str):
                note = f"recipe {r[TrialAttr.RECIPE]}"
            aligned = [cell(r[name]) for name in ALIGNMENT_METRICS if name in r]
            metrics = [cell(r[TrialAttr.MACS]), cell(r[TrialAttr.TRAJECTORY_MACS]), cell(r.get(TrialAttr.FID)), *aligned]
            rows.append([str(r["trial"]), r["state"], *metrics, cell(r[TrialAttr.SPEEDUP], "x"), note])
        alignment = [name for name in ALIGNMENT_METRICS if name in frame.columns]
        print(text_table(["trial", "state", "MACs", "trajectory MACs", "FID", *alignment, "speedup", "note"], rows))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from automl_diff.analysis.report import write_report
    from automl_diff.runners import load_existing_study, mask_url

    study = load_existing_study(args.storage, args.study_name)
    out = Path(args.out or f"dashboards/{study.study_name}.html")
    write_report(study, out, samples=args.samples, storage_label=mask_url(args.storage), artifacts=args.artifacts)
    print(f"report of study '{study.study_name}' -> {out} (self-contained; open it in a browser)")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    import socket

    import optuna_dashboard

    from automl_diff.runners import load_existing_study, mask_url, open_storage
    from automl_diff.runners.artifacts import study_store

    study = load_existing_study(args.storage, args.study_name)  # reachable, and names the study
    storage = open_storage(args.storage, create=False, heartbeat_interval=None)
    with socket.socket() as probe:
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            raise UserError(f"--port {args.port}: cannot listen on {args.host}:{args.port} ({exc.strerror or exc})") from None
    store = study_store(study, args.artifacts)
    print(f"optuna-dashboard for {mask_url(args.storage)} at http://{args.host}:{args.port}/dashboard (Ctrl-C stops)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("the dashboard listens on %s: anyone who can reach this address can read and edit the studies", args.host)
    optuna_dashboard.run_server(storage, host=args.host, port=args.port, artifact_store=store)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from automl_diff.analysis import pareto_rows
    from automl_diff.export import export_trial
    from automl_diff.runners import load_existing_study

    study = load_existing_study(args.storage, args.study_name)
    out = Path(args.out)
    if args.pareto:
        rows = pareto_rows(study)
        if not rows:
            raise UserError(f"study '{study.study_name}' has no completed trial to export")
        targets = [(r.trial, out / f"trial_{r.trial}") for r in rows]
    else:
        targets = [(args.trial, out)]
    for number, folder in targets:
        export = export_trial(study, number, folder, storage_url=args.storage, artifacts=args.artifacts)
        print(f"trial {number} -> {folder}")
        print(f"  load with: {export.load_call}")
        if export.schedule is not None:
            print(f"  then: automl_diff.apply_schedule(pipe, automl_diff.Schedule.load({json.dumps(str(export.schedule))}))")
    return 0


def _profile_schedule(args: argparse.Namespace, unet: Any, source: Any, text_length: int, text: Any = None) -> dict[str, Any]:
    """Trajectory MACs and measured latency of a DiP-GO schedule against the full sampler. A
    text-to-image pipeline samples ``--prompt`` with guidance and its VAE; a bare conditional UNet
    (a config, random weights) samples from random text embeddings of ``text_length`` tokens,
    with guidance too (both halves in one call). ``text``: the pipeline's parts, loaded once by
    the caller."""
    import copy
    import statistics

    import torch

    from automl_diff.gating import Schedule, apply_schedule, unit_costs
    from automl_diff.metrics.latency import first_batch_seconds, sampler_rounds
    from automl_diff.metrics.macs import condition_keyword, example_inputs
    from automl_diff.models.loading import folder_sampler, load_unet
    from automl_diff.sampling import Prompts

    schedule = Schedule.load(args.schedule)
    steps = args.steps or schedule.inference_steps
    scheduler = str(schedule.info.get("scheduler", "auto"))
    path = Path(source)
    prompts = None
    if condition_keyword(unet) == "encoder_hidden_states":
        if text is not None:
            unet = load_unet(path).eval()
            prompts = text.prompts([args.prompt], guidance_scale=args.guidance_scale)
        else:
            generator = torch.Generator().manual_seed(0)
            embeddings = torch.randn(example_inputs(unet, text_length=text_length)[2].shape, generator=generator)
            prompts = Prompts(embeddings, torch.zeros_like(embeddings), args.guidance_scale)
    sampler = folder_sampler(path if path.exists() else None, steps=steps, prompts=prompts, scheduler=scheduler)
    if sampler.model_calls != schedule.steps:
        raise UserError(f"--steps {steps}: the schedule {args.schedule} is for {schedule.inference_steps} {scheduler} steps")
    schedule.check_model(unet, source=args.schedule)
    costs = unit_costs(unet, schedule.units, text_length=text_length)
    trajectory = sampler.calls_per_step * schedule.trajectory_macs(costs)
    full = sampler.calls_per_step * costs.total.macs * schedule.steps
    models = {"full": unet, "schedule": copy.deepcopy(unet)}
    contexts = {"schedule": lambda model: apply_schedule(model, schedule)}
    warmups: dict[str, float] = {}
    if args.compile:
        models.update({"full, compiled": torch.compile(copy.deepcopy(unet)), "schedule, compiled": copy.deepcopy(unet)})
        contexts["schedule, compiled"] = lambda model: apply_schedule(model, schedule, compile=True, plan_graphs=args.plan_graphs)
        compiled = {name: models[name] for name in ("full, compiled", "schedule, compiled")}
        try:
            warmups = first_batch_seconds(compiled, sampler, contexts=contexts, batch_size=args.batch_size)
        except torch._dynamo.exc.TorchDynamoException as exc:  # no C++ compiler, an unsupported device, ...
            raise UserError(f"--compile: torch.compile failed ({type(exc).__name__}: {first_line(exc)})") from None
    rounds = sampler_rounds(models, sampler, contexts=contexts, batch_size=args.batch_size, repeats=args.repeats)
    latencies = {name: statistics.median(values) for name, values in rounds.items()}
    if args.compile:
        warm = {
            "compiled_latency": latencies["schedule, compiled"],
            "compiled_full_latency": latencies["full, compiled"],
            "compiled_speedup": latencies["full, compiled"] / latencies["schedule, compiled"],
            "compiled_warmup_s": warmups["schedule, compiled"],
            "compiled_full_warmup_s": warmups["full, compiled"],
        }
    return {
        "steps": steps,
        "scheduler": scheduler,
        "trajectory_macs": trajectory,
        "full_trajectory_macs": full,
        "macs_reduction": full / trajectory,
        "computed_fraction": schedule.computed_fraction,
        "latency": latencies["schedule"],
        "full_latency": latencies["full"],
        "speedup": latencies["full"] / latencies["schedule"],
        **({"guidance_scale": prompts.guidance_scale} if prompts is not None and prompts.guided else {}),
        **(warm if args.compile else {}),
    }


def cmd_profile(args: argparse.Namespace) -> int:
    from automl_diff.metrics import count_macs
    from automl_diff.models.loading import load_unet
    from automl_diff.models.text import is_text_to_image_folder, load_text_to_image, text_length
    from automl_diff.zoo import TEACHERS

    if args.steps is not None and args.schedule is None:
        raise UserError("--steps: only meaningful with --schedule FILE")
    if args.compile and args.schedule is None:
        raise UserError("--compile: only meaningful with --schedule FILE")
    if args.plan_graphs and not args.compile:
        raise UserError(f"--plan-graphs {args.plan_graphs}: only meaningful with --compile")
    if args.plan_graphs < 0:
        raise UserError(f"--plan-graphs {args.plan_graphs}: must be 0 or more")
    source = str(TEACHERS[args.model].folder) if args.model in TEACHERS else args.model
    unet = load_unet(source, weights=False)
    path = Path(source)
    text = load_text_to_image(path) if path.is_dir() and is_text_to_image_folder(path) else None
    tokens = args.text_length if args.text_length is not None else text_length(text)
    report = count_macs(unet, resolution=args.resolution, text_length=tokens)
    trajectory = _profile_schedule(args, unet, source, tokens, text) if args.schedule else None
    if args.json:
        data = report.to_dict()
        data["blocks"] = [{k: b[k] for k in ("name", "params", "macs", "macs_no_attention")} for b in data["blocks"]]
        data.update(trajectory or {})
        print(json.dumps(data))
        return 0
    resolution = args.resolution or unet.config.sample_size
    print(f"{args.model}: {type(unet).__name__} at {resolution}px, one forward pass, batch 1")
    rows = [[b.name, fmt_si(b.params), fmt_si(b.macs), fmt_si(b.macs_no_attention)] for b in report.blocks]
    rows.append(["total", fmt_si(report.params), fmt_si(report.macs), fmt_si(report.macs_no_attention)])
    print(text_table(["block", "params", "MACs", "MACs w/o attn matmuls"], rows))
    if trajectory:
        t = trajectory
        guided = f", guidance {t['guidance_scale']:g} (both halves counted)" if "guidance_scale" in t else ""
        print(f"\nschedule {args.schedule}: {t['steps']} steps, {t['computed_fraction']:.1%} of the unit computations{guided}")
        print(
            text_table(
                ["", "trajectory MACs per image", "latency per image"],
                [
                    ["full sampler", fmt_si(t["full_trajectory_macs"]), fmt_si(t["full_latency"], "s")],
                    ["with schedule", fmt_si(t["trajectory_macs"]), fmt_si(t["latency"], "s")],
                    ["ratio", f"{t['macs_reduction']:.3g}x fewer", f"{t['speedup']:.3g}x faster"],
                ],
            )
        )
        if "compiled_latency" in t:
            print(
                f"compiled (torch.compile): full sampler {fmt_si(t['compiled_full_latency'], 's')} per image after a "
                f"{t['compiled_full_warmup_s']:.1f} s warm-up, with schedule {fmt_si(t['compiled_latency'], 's')} after "
                f"{t['compiled_warmup_s']:.1f} s: {t['compiled_speedup']:.3g}x faster"
            )
    return 0


def print_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
