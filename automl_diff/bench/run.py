"""One benchmark run: the rows of a preset on one teacher, measured the same way in one process."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence

import torch

from automl_diff.bench.presets import BenchPreset
from automl_diff.bench.rows import ROWS, plan
from automl_diff.bench.session import Bench, BenchResult, Row, machine_info

__all__ = ["Bench", "BenchResult", "Row", "machine_info", "run_bench"]


def run_bench(preset: BenchPreset, *, rows: Sequence[str] | None = None, log: Callable[[str], None] = print) -> BenchResult:
    """Run the rows of ``preset`` (default: all of them, in the order of
    :data:`~automl_diff.bench.rows.ROWS`; a subset also runs the rows it builds on, and the
    teacher) in this process and measure them side by side.

    Raises:
        UserError: an unknown row, a missing peer package, search space or teacher.
    """
    order = plan(rows, preset)
    for name in order:
        ROWS[name].check(preset)
    if preset.compiled is not None:  # compiled warm-ups as a user's first run meets them: into an empty cache
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="automl_diff-inductor-"))
    bench = Bench(preset, log=log)
    for name in order:
        torch.manual_seed(preset.seed)  # each row as it would run alone
        ROWS[name].run(bench)
    bench.time_rows()
    return bench.result()
