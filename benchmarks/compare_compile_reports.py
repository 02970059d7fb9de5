"""Compare two compile reports (``python -m pyattn.kernels.report --json``), e.g. Triton 3.6 against 3.8.

    python benchmarks/compare_compile_reports.py OLD.json NEW.json [--all]

Rows are matched by (op, kernel, case, variant, config, arch). Printed: rows that fail to compile in either,
configs autotuning may pick that spill or overflow shared memory in either, rows whose registers or shared
memory differ (``--all``: every matched row), rows only one report has, and a count per op. The exit status is
1 when a config autotuning may pick fails, spills or overflows in NEW, else 0.
"""

from __future__ import annotations

import argparse
import json
import sys

SHARED_MEMORY_LIMIT = {"sm_90": 232448, "sm_80": 166912}  # as kernels/_aot.py (this script imports no pyattn)
KEY = ("op", "kernel", "case", "variant", "config", "arch")


def _rows(path: str) -> dict[tuple, dict]:
    with open(path) as handle:
        return {tuple(row[k] for k in KEY): row for row in json.load(handle) if row.get("variant") != "cuda"}


def _problem(row: dict | None) -> str | None:
    if row is None:
        return None
    if row.get("error"):
        return "ERROR " + row["error"].splitlines()[0][:160]
    if row.get("shared_bytes") is not None and row["shared_bytes"] > SHARED_MEMORY_LIMIT.get(row["arch"], 1 << 30):
        return f"shared {row['shared_bytes']} B > {row['arch']} limit"
    if row.get("auto_may_pick") and (row.get("spill_bytes") or 0) > 0:
        return f"spills {row['spill_bytes']} B"
    return None


def _figures(row: dict | None) -> str:
    if row is None:
        return "-"
    if row.get("error"):
        return "error"
    return f"{row['registers']} regs / {row['spill_bytes']} B spill / {row['shared_bytes']} B shared"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--all", action="store_true", help="print every matched row")
    args = parser.parse_args(argv)
    old, new = _rows(args.old), _rows(args.new)
    failing_new = 0
    counts: dict[str, list[int]] = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{key[1]}[{key[2]},{key[3]},{key[4]}] {key[5]}"
        problems = (_problem(a), _problem(b))
        differs = a is not None and b is not None and not a.get("error") and not b.get("error") and (
            a["registers"] != b["registers"] or a["shared_bytes"] != b["shared_bytes"])
        tally = counts.setdefault(key[0], [0, 0, 0])
        tally[0] += 1
        tally[1] += differs
        if problems[1]:
            failing_new += 1
            tally[2] += 1
        if args.all or differs or any(problems) or a is None or b is None:
            note = "; ".join(f"{which}: {p}" for which, p in zip(("old", "new"), problems) if p)
            print(f"{name}: {_figures(a)} -> {_figures(b)}" + (f"  [{note}]" if note else ""))
    for op, (rows, differing, failing) in sorted(counts.items()):
        print(f"{op}: {rows} rows, {differing} with other registers or shared memory, {failing} failing in new")
    return 1 if failing_new else 0


if __name__ == "__main__":
    sys.exit(main())
