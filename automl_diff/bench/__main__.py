"""``python -m automl_diff.bench [--preset NAME] [--out BENCHMARKS.md]``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from automl_diff.bench.presets import PRESETS
from automl_diff.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m automl_diff.bench",
        description="Teacher, DKDM, DiffNAS, Torch-Pruning, DeepCache, DiP-GO and DiffNAS + DiP-GO on one teacher, measured side by side.",
    )
    parser.add_argument("--preset", default=next(iter(PRESETS)), choices=sorted(PRESETS))
    parser.add_argument(
        "--out", default=None, help="write the table into this markdown file (its section for the preset), e.g. BENCHMARKS.md"
    )
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--teacher", default=None, help="override the preset's teacher (a diffusers folder or hub id)")
    parser.add_argument("--fid-dataset", default=None, help="override the preset's FID dataset (e.g. folder:PATH)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--eval-seed", type=int, default=None, help="noise seed of every FID (default: the preset's, which differs from its tuning seed)"
    )
    parser.add_argument("--render", default=None, metavar="JSON", help="write the section of a run saved with --json again (no measuring)")
    parser.add_argument(
        "--rows",
        default=None,
        help="run only these rows, comma-separated (with the rows they build on and the teacher): "
        "teacher, dkdm, diffnas, torch_pruning, bk_sdm, dkdm_data, dipgo, deepcache, steps, fbcache, taylorseer, stacked; "
        "not with --out",
    )
    parser.add_argument("--guidance", type=float, default=None, help="override the preset's classifier-free guidance scale")
    for flag, what in (("--pool-option", "the data-free pool's"), ("--dipgo-option", "DiP-GO's")):
        parser.add_argument(
            flag, action="append", default=[], metavar="KEY=VALUE", help=f"override one of {what} options (a YAML value); repeatable"
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    preset = PRESETS[args.preset]
    preset = replace(
        preset,
        **{k: v for k, v in {"teacher": args.teacher, "device": args.device, "eval_seed": args.eval_seed}.items() if v is not None},
    )
    if args.fid_dataset is not None:
        preset = replace(preset, evaluation=replace(preset.evaluation, fid_dataset=args.fid_dataset))
    if args.guidance is not None:
        sampling = replace(preset.evaluation.sampling, guidance_scale=args.guidance)
        preset = replace(preset, evaluation=replace(preset.evaluation, sampling=sampling))
    command = "python -m automl_diff.bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    rows = [name.strip() for name in args.rows.split(",") if name.strip()] if args.rows else None
    try:
        preset = replace(
            preset,
            pool={**preset.pool, **_options("--pool-option", args.pool_option)},
            dipgo={**preset.dipgo, **_options("--dipgo-option", args.dipgo_option)},
        )
        if rows is not None and args.out:
            raise UserError("--rows: a partial run does not rewrite the preset's section of --out; drop one of them")
        _check_options(preset)
        for option, path in (("--out", args.out), ("--json", args.json)):  # fail now, not after an hour
            if path and not Path(path).resolve().parent.is_dir():
                raise UserError(f"{option}: the folder of {path} does not exist")
        from automl_diff.bench.report import markdown, write_section
        from automl_diff.bench.run import run_bench
        from automl_diff.bench.session import BenchResult

        if args.render:  # a saved run, written again: no measuring
            data = _read_json(args.render)
            command = data.get("command", command)
            seeds = data["eval_seeds"]
            evaluation = replace(preset.evaluation, fid_samples=data["fid_samples"])
            result = BenchResult.from_dict(data, replace(preset, eval_seed=seeds[0], fid_sets=len(seeds), evaluation=evaluation))
        else:
            result = run_bench(preset, rows=rows, log=lambda line: print(line, flush=True))
        text = markdown(result, command=command.strip())
        if args.render:
            text += f"\nThe section was written again from that run's `--json` with `python -m automl_diff.bench --render {args.render}`.\n"
        print("\n" + text)
        if args.json:
            Path(args.json).write_text(json.dumps({**result.to_dict(), "command": command.strip()}, indent=1, default=str))
            print(f"wrote {args.json}")
        if args.out:
            print(f"wrote {write_section(args.out, preset.name, text)}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def _options(flag: str, pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs, each value read as YAML (``false``, ``0.3``, ``[1.5, 3]``)."""
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} {pair}: expected KEY=VALUE")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"{flag} {pair}: the value is not valid YAML") from None
    return options


def _check_options(preset: Any) -> None:
    """The pool's and DiP-GO's options, checked before anything runs (one line on a bad one)."""
    from automl_diff.config.options import DiPGOOptions, DKDMOptions, read_options

    read_options(DKDMOptions, {"pool_size": preset.pool_size, "pool_steps": preset.pool_steps, **preset.pool}, file="--pool-option")
    read_options(DiPGOOptions, preset.dipgo, file="--dipgo-option")


def _read_json(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--render: cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or "rows" not in data:
        raise UserError(f"--render: {path} is not a run saved with --json")
    if "eval_seeds" not in data:
        raise UserError(f"--render: {path} was saved before FID was measured on several sample sets; run the benchmark again")
    return data


if __name__ == "__main__":
    sys.exit(main())
