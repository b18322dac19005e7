"""DiP-GO's schedules compiled: teacher compiled against schedule compiled, beside both eager.

Reads the schedules a benchmark run saved (``python -m automl_diff.bench --preset P --rows dipgo
--json FILE``: ``details.schedules``) and times, on the preset's teacher and sampler (guidance and
the VAE's decoding included for a text-to-image teacher), in lockstep rounds at each batch size:
the teacher eager, the teacher compiled (``torch.compile`` of the whole UNet), each schedule eager
(``apply_schedule``) and each schedule compiled (``apply_schedule(..., compile=True)``). Warm-ups
(the first batch: compilation included) are timed apart, before the rounds, with an empty
inductor cache. Speedups are per round (a row against its own teacher: eager against eager,
compiled against compiled); the MACs reduction is the bench's count.

    python experiments/compiled_schedule.py /tmp/digits_dipgo.json --batches 1 8 --repeats 5

``--variant NAME=JSON`` adds, for each schedule, a row compiled with other options (``compile=``
of ``apply_schedule``; its key ``plan_graphs``: that argument), for example
``--variant 'python wrapper={"options": {"cpp_wrapper": false}}'`` or ``--variant 'plans={"plan_graphs": 3}'``;
``--variants-only`` leaves out the row compiled with the defaults, so that a variant's warm-up
starts from an empty inductor cache.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))  # cold warm-ups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench_json", help="a bench run's --json with DiP-GO rows")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON", help="schedules compiled with these options too")
    parser.add_argument("--variants-only", action="store_true", help="no row compiled with the defaults (cold warm-ups of a variant)")
    args = parser.parse_args()

    import numpy as np
    import torch

    from automl_diff.bench.presets import PRESETS
    from automl_diff.bench.session import Bench
    from automl_diff.gating import Schedule, apply_schedule
    from automl_diff.metrics.intervals import spread
    from automl_diff.metrics.latency import first_batch_seconds, sampler_rounds

    data = json.loads(Path(args.bench_json).read_text())
    schedules = {name: Schedule.from_dict(s) for name, s in data["details"]["schedules"].items()}
    macs = {row["name"]: row["trajectory_macs"] for row in data["rows"]}
    teacher_macs = next(row["trajectory_macs"] for row in data["rows"] if row["kind"] == "teacher")
    bench = Bench(replace(PRESETS[data["preset"]], device="cpu"), log=lambda line: print(line, file=sys.stderr))
    unet, sampler = bench.teacher.unet.eval(), bench.sampler
    print(
        f"{data['preset']}: {type(unet).__name__}, {sampler.scheduler} {sampler.steps} steps, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.repeats} lockstep rounds after 1 untimed\n"
    )

    models = {"teacher": unet, "teacher, compiled": torch.compile(copy.deepcopy(unet))}
    contexts = {}
    for name, schedule in schedules.items():
        models[name] = copy.deepcopy(unet)
        contexts[name] = lambda m, s=schedule: apply_schedule(m, s)
        if not args.variants_only:
            models[f"{name}, compiled"] = copy.deepcopy(unet)
            contexts[f"{name}, compiled"] = lambda m, s=schedule: apply_schedule(m, s, compile=True)
        for variant in args.variant:
            label, options = variant.split("=", 1)
            options = json.loads(options)
            plans = options.pop("plan_graphs", 0)
            models[f"{name}, {label}, compiled"] = copy.deepcopy(unet)
            contexts[f"{name}, {label}, compiled"] = lambda m, s=schedule, o=options, k=plans: apply_schedule(
                m, s, compile=o, plan_graphs=k
            )
    compiled = {name: m for name, m in models.items() if name.endswith("compiled")}
    header = "| model | batch | latency per image | speedup [quartiles] | speedup / MACs reduction [quartiles] | warm-up |"
    print(header)
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        warmups = first_batch_seconds(compiled, sampler, contexts=contexts, batch_size=batch)
        with torch.no_grad():
            rounds = sampler_rounds(models, sampler, contexts=contexts, batch_size=batch, repeats=args.repeats)
        for name, times in rounds.items():
            base = "teacher, compiled" if name.endswith("compiled") else "teacher"
            row = next((n for n in schedules if name.startswith(n)), name.removesuffix(", compiled"))
            reduction = teacher_macs / macs.get(row, teacher_macs)
            ratios = np.array(rounds[base]) / np.array(times)
            s, e = spread(ratios), spread(ratios / reduction)
            warm = f"{warmups[name]:.1f} s" if name in warmups else "-"
            print(
                f"| {name} | {batch} | {1e3 * spread(times).median:.1f} ms | {s.median:.2f}x [{s.q1:.2f}-{s.q3:.2f}] | "
                f"{e.median:.2f} [{e.q1:.2f}-{e.q3:.2f}] ({reduction:.2f}x fewer MACs) | {warm} |",
                flush=True,
            )


if __name__ == "__main__":
    begin = time.perf_counter()
    main()
    print(f"\n{time.perf_counter() - begin:.0f} s in all")
