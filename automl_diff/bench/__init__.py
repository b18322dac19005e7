"""``python -m automl_diff.bench``: every method and peer on one teacher, measured side by side.

Presets (:mod:`automl_diff.bench.presets`) fix the teacher, sampler, FID setup and every budget;
:func:`~automl_diff.bench.run.run_bench` runs the rows in one process;
:mod:`automl_diff.bench.report` writes the table into ``BENCHMARKS.md``.
"""

from automl_diff.bench.presets import PRESETS, BenchPreset

__all__ = ["PRESETS", "BenchPreset"]
