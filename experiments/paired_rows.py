"""Two rows of benchmark runs saved with ``--json``, compared set by set (paired: the same noise
seeds), as the benchmark compares rows of one run: FID difference and ratio, and the difference in
alignment, each with its 95% interval. For ablations run as separate benchmark commands.

    python experiments/paired_rows.py /tmp/a.json "DKDM student" /tmp/b.json "DKDM student"
"""

from __future__ import annotations

import argparse
import json
import sys

from automl_diff.metrics.intervals import across_sets, paired_across_sets


def _row(path: str, name: str) -> tuple[dict, list[int]]:
    with open(path) as f:
        data = json.load(f)
    rows = {row["name"]: row for row in data["rows"]}
    if name not in rows:
        sys.exit(f"error: {path}: no row {name!r} (rows: {', '.join(rows)})")
    return rows[name], data["eval_seeds"]


def _text(interval) -> str:
    return f"{interval.value:.3g} [{interval.low:.3g}, {interval.high:.3g}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first_json")
    parser.add_argument("first_row")
    parser.add_argument("second_json")
    parser.add_argument("second_row")
    args = parser.parse_args()
    a, seeds_a = _row(args.first_json, args.first_row)
    b, seeds_b = _row(args.second_json, args.second_row)
    if seeds_a != seeds_b:
        sys.exit(f"error: the runs' evaluation seeds differ ({seeds_a} and {seeds_b}): not paired")
    for label, row in (("first", a), ("second", b)):
        line = f"{label}: {row['name']}, {row['trajectory_macs'] / 1e6:.1f}M trajectory MACs, FID {_text(across_sets(row['fid_sets']))}"
        if row.get("alignment_sets"):
            line += f", alignment {_text(across_sets(row['alignment_sets']))}"
        print(line)
    difference, ratio = paired_across_sets(a["fid_sets"], b["fid_sets"])
    print(f"FID first - second: {_text(difference)}; first / second: {_text(ratio)} (seeds {seeds_a})")
    if a.get("alignment_sets") and b.get("alignment_sets"):
        gap, _ = paired_across_sets(a["alignment_sets"], b["alignment_sets"])
        print(f"alignment first - second: {_text(gap)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
