"""``python -m automl_diff.study``: run studies, read their results, export and profile models.

Exit status: 0 on success, 2 for a user error (one line on stderr, no traceback), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from automl_diff.cli import commands
from automl_diff.config.study import DEFAULT_STORAGE
from automl_diff.errors import UserError
from automl_diff.zoo import TEACHERS

__all__ = ["build_parser", "main"]


def _study_options(parser: argparse.ArgumentParser, *, storage_default: str | None = DEFAULT_STORAGE) -> None:
    parser.add_argument(
        "--storage", default=storage_default, help=f"Optuna RDB storage URL (default: {storage_default or 'the config files'})"
    )
    parser.add_argument("--study-name", default=None, help="study to use (default: the config's name, or the storage's only study)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer (got {text!r})") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive (got {value})")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, as for every user error
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m automl_diff.study", description="Optuna-driven compression of diffusion UNets.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    _add_run_and_reads(sub)
    _add_outputs(sub)
    _add_profile(sub)
    return parser


def _add_run_and_reads(sub: Any) -> None:
    """``run``, and the commands that read a study: ``status``, ``pareto``, ``trials``."""
    run = sub.add_parser("run", help="create or resume a study and run its trials")
    run.add_argument("config", help="study config (studies/*.yaml)")
    _study_options(run, storage_default=None)
    run.add_argument("--n-trials", type=_positive_int, default=None, help="total finished trials to reach (default: the config's)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="run trials in this process (local, default) or as Ray Tune trials (ray)",
    )
    run.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join with --backend ray (auto: the one ray start started here; default: RAY_ADDRESS, else a new local one)",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="build everything a trial needs, time each stage at the config's shapes, project a trial's and the study's "
        "seconds and peak memory; store nothing",
    )
    run.add_argument("--json", action="store_true", help="with --dry-run: print a JSON object")
    run.add_argument(
        "--compile",
        action="store_true",
        help="with --dry-run: also time the teacher's model call compiled (torch.compile), its warm-up apart",
    )
    run.set_defaults(func=commands.cmd_run)

    status = sub.add_parser("status", help="trials per state and the best values")
    _study_options(status)
    status.add_argument("--json", action="store_true", help="print a JSON object")
    status.set_defaults(func=commands.cmd_status)

    pareto = sub.add_parser("pareto", help="the Pareto-front trials with MACs, params, FID, latency, speedup")
    _study_options(pareto)
    pareto.add_argument("--json", action="store_true", help="print a JSON list")
    pareto.add_argument("--csv", default=None, metavar="FILE", help="also write the front (with parameters) as CSV")
    pareto.set_defaults(func=commands.cmd_pareto)

    trials = sub.add_parser("trials", help="every trial with its state, metrics, parameters and why it was pruned or failed")
    _study_options(trials)
    trials.add_argument("--json", action="store_true", help="print a JSON list")
    trials.add_argument("--csv", default=None, metavar="FILE", help="write all trials (metrics and parameters) as CSV")
    trials.set_defaults(func=commands.cmd_trials)


ARTIFACTS_HELP = "the study's artifact store, a folder or s3://bucket/prefix (default: the one the study recorded)"


def _add_outputs(sub: Any) -> None:
    """What a study produces: ``report``, ``dashboard``, ``export``."""
    report = sub.add_parser("report", help="a self-contained HTML report: figures, Pareto table, samples of the front models")
    _study_options(report)
    report.add_argument("--out", default=None, help="HTML file to write (default: dashboards/<study>.html)")
    report.add_argument(
        "--samples", type=int, default=16, help="sample images per front model without a stored grid (0: no samples at all; default 16)"
    )
    report.add_argument("--artifacts", default=None, help=ARTIFACTS_HELP)
    report.set_defaults(func=commands.cmd_report)

    dashboard = sub.add_parser("dashboard", help="optuna-dashboard on the storage, with the study's sample-grid artifacts")
    _study_options(dashboard)
    dashboard.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    dashboard.add_argument("--port", type=_positive_int, default=8080, help="port (default 8080)")
    dashboard.add_argument("--artifacts", default=None, help=ARTIFACTS_HELP)
    dashboard.set_defaults(func=commands.cmd_dashboard)

    export = sub.add_parser("export", help="export trials as diffusers pipelines with model cards")
    _study_options(export)
    which = export.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int, help="export this trial into --out")
    which.add_argument("--pareto", action="store_true", help="export every front trial into --out/trial_<n>")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--artifacts", default=None, help=ARTIFACTS_HELP)
    export.set_defaults(func=commands.cmd_export)


def _add_profile(sub: Any) -> None:
    """``profile``: params and MACs per block, a schedule's trajectory MACs and latency."""
    profile = sub.add_parser("profile", help="params and MACs per block and in total")
    profile.add_argument(
        "--model",
        required=True,
        help=f"{', '.join(TEACHERS)}, a hub id, a diffusers or exported folder (a text-to-image pipeline too), or a config.json",
    )
    profile.add_argument("--resolution", type=int, default=None, help="input size (default: the config's sample_size)")
    profile.add_argument(
        "--text-length", type=int, default=None, help="text tokens for conditional UNets (default: the pipeline tokenizer's, else 77)"
    )
    profile.add_argument("--prompt", default="a photograph", help="prompt a text-to-image pipeline samples with for --schedule")
    profile.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance for --schedule (default 7.5)")
    profile.add_argument(
        "--schedule",
        default=None,
        metavar="FILE",
        help="a DiP-GO schedule.json: also report trajectory MACs and measured latency against the full sampler",
    )
    profile.add_argument("--steps", type=int, default=None, help="sampling steps for --schedule (default: the schedule's)")
    profile.add_argument("--batch-size", type=int, default=8, help="images per timed batch for --schedule (default 8)")
    profile.add_argument("--repeats", type=int, default=3, help="timed batches per variant for --schedule (default 3)")
    profile.add_argument(
        "--compile",
        action="store_true",
        help="with --schedule: also time both compiled (torch.compile): the whole UNet against the schedule's compiled pieces, "
        "their warm-ups apart",
    )
    profile.add_argument(
        "--plan-graphs",
        type=int,
        default=0,
        metavar="K",
        help="with --compile: K plans get graphs of their own beside the shared one, the first call's and the K-1 that most "
        "later calls share (faster calls, longer warm-up; default 0)",
    )
    profile.add_argument("--json", action="store_true", help="print a JSON object")
    profile.set_defaults(func=commands.cmd_profile)


class _MaskPasswords(logging.Filter):
    """Replaces the password of any storage URL in a log record by ``***``."""

    def filter(self, record: logging.LogRecord) -> bool:
        from automl_diff.runners.storage import mask_url

        message = record.getMessage()
        masked = mask_url(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _MaskPasswords) for f in handler.filters):
            handler.addFilter(_MaskPasswords())
    for noisy in ("fvcore", "iopath", "PIL", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*torch.jit.*")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _configure_logging(args.verbose)
        return int(args.func(args) or 0)
    except UserError as exc:
        commands.print_error(str(exc))
        return UserError.exit_code
    except KeyboardInterrupt:
        commands.print_error("interrupted; finished trials are kept in the storage")
        return 130
