"""What a run writes: ``results.json`` (environment, roofline, every row) and the printed report: the
caveat of a CPU run, the roofline, the drop-in summary (pyattn:auto against the PyTorch it replaces)
and the table of every row. Nothing here knows an op: a row's suite says how to show its throughput."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import textwrap
from importlib import metadata

import torch

from pyattn.bench.registry import get_suite

DROPIN_TARGET = 0.95  # pyattn:auto should be at least this fast relative to the call it replaces
ABOVE_CEILING = "above ceiling: noise or a wrong model"
SCHEMA_VERSION = 2
RESULT_KEYS = (
    "schema_version",
    "created",
    "command",
    "environment",
    "settings",
    "caveat",
    "roofline",
    "skipped_suites",
    "not_run",
    "results",
    "plots",
)


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _run_quietly(command: list[str], cwd: str | None = None) -> str | None:
    try:
        completed = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def _git_state() -> dict:
    """The commit pyattn's source tree is at (None when it is not a git checkout)."""
    import pyattn

    source = os.path.dirname(os.path.dirname(os.path.abspath(pyattn.__file__)))
    commit = _run_quietly(["git", "rev-parse", "HEAD"], cwd=source)
    status = _run_quietly(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source) if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def environment(device: torch.device) -> dict:
    import pyattn

    env = {
        "device_type": device.type,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "pyattn": getattr(pyattn, "__version__", None),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": load_average(),
        "backend_status": pyattn.backend_status(),
        **_git_state(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        env.update(
            device=properties.name,
            sm_count=properties.multi_processor_count,
            compute_capability=f"{properties.major}.{properties.minor}",
            memory_bytes=properties.total_memory,
            driver=_run_quietly(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={device.index or 0}"]
            ),
        )
    else:
        env.update(
            device=_cpu_name(),
            sm_count=None,
            compute_capability=None,
            memory_bytes=None,
            driver=None,
        )
    return env


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the platform has none)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def caveat(device_type: str, environment: dict, threads: int | None) -> str | None:
    """What a CPU run's figures are for; None on a GPU."""
    if device_type != "cpu":
        return None
    load, cores = environment.get("load_average"), environment.get("cpu_count")
    machine = f"load average {load[0]:g} on {cores} cores" if load and cores else "machine load unknown"
    if load and cores and load[0] >= cores:
        machine += " (loaded: expect wide spreads)"
    plural = "s" if threads != 1 else ""
    return (
        "CPU RUN: these times are for checking that every path runs and for the pyattn:auto / PyTorch ratio "
        "measured side by side in this run, NOT for speed claims (pyattn's kernels run on GPUs). "
        f"{machine}; {threads} torch thread{plural}. Each time is median [min-max]; backends of a case are "
        "timed interleaved."
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: str, payload: dict) -> None:
    """Write atomically, so a run stopped mid-write (a step's timeout) leaves the previous file whole."""
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(payload, handle, indent=1, default=str)
    os.replace(temporary, path)


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_ms(time_ms: dict | None) -> str:
    """``median [min-max]`` in milliseconds."""
    if time_ms is None:
        return "-"
    return f"{time_ms['median']:.4g} [{time_ms['min']:.3g}-{time_ms['max']:.3g}]"


def _throughput(row: dict) -> str:
    if row.get("tflops") is None:
        return "-"
    if get_suite(row["suite"]).throughput == "tokens_per_s":
        return _si(row["tokens_per_s"], "tok/s")
    return f"{row['tflops']:.3g} TFLOP/s"


def _roof(row: dict) -> str:
    fraction = row.get("roofline_fraction")
    if fraction is None:
        return "-"
    if not (row.get("above_ceiling") or fraction > 1):
        return f"{100 * fraction:.0f}%"
    text = f"{100 * fraction:.0f}%" if fraction >= 1.005 else f"{100 * fraction:.1f}%"  # never a bare "100%"
    return f"{text} ({ABOVE_CEILING})"


def _ratio(row: dict) -> str:
    if row["backend"] == row.get("dropin_baseline"):
        return "baseline"
    if row.get("dropin_ratio") is None:
        return "-"
    low, high = row["dropin_ratio_quartiles"]
    return f"{row['dropin_ratio']:.2f}x [{low:.2f}-{high:.2f}]"


def _backend(row: dict) -> str:
    served = row.get("served_by")
    return row["backend"] if not served else f"{row['backend']} ({served.split()[0]})"


def _check(row: dict) -> str:
    check = row.get("check")
    if check is None:
        return "-"
    worst = max(check["errors"].items(), key=lambda item: item[1] / check["bounds"][item[0]], default=None)
    if check["passed"]:
        return "pass"
    if not check["finite"]:
        return "FAIL: non-finite"
    return f"FAIL: {worst[0]} {worst[1]:.1e} > {check['bounds'][worst[0]]:.1e}"


def _row_cells(row: dict) -> list[str]:
    status = row["status"]
    head = [row["op"], row["shape"], row["dtype"], row["mode"], _backend(row)]
    if status in ("skipped", "error"):
        return head + [f"{status}: {row['reason']}"]
    memory = row.get("peak_memory_bytes")
    return head + [
        format_ms(row.get("time_ms")),
        _throughput(row),
        "-" if row.get("gbps") is None else f"{row['gbps']:.4g}",
        "-" if memory is None else f"{memory / 2**20:.4g}",
        _roof(row),
        _ratio(row),
        "-" if row.get("speedup") is None else f"{row['speedup']:.2f}x",
        _check(row) if status != "correctness-only" else f"{_check(row)} (interpreter, untimed)",
    ]


HEADER = [
    "op",
    "shape",
    "dtype",
    "mode",
    "backend",
    "ms median [min-max]",
    "throughput",
    "GB/s",
    "peak MiB",
    "of roof",
    "vs drop-in [quartiles]",
    "vs fastest",
    "check",
]
LEGEND = (
    "ms: median [min-max] of the timed calls; on a CPU the spread is the machine's noise.",
    "of roof: achieved / attainable on the roofline measured at the start; above 100% it is flagged "
    "(above ceiling: noise or a wrong model), not a fraction.",
    "vs drop-in: this row's speed relative to the torch call the drop-in replaces (its time / this time), "
    "paired round by round in this run: median [quartiles]; > 1 is faster.",
    "vs fastest: over the fastest torch baseline of the same case (medians).",
)


def _align(lines: list[list[str]], header: list[str], max_reason: int = 100) -> str:
    """Aligned text; a short line (skipped/error) carries its reason to the end of the line."""
    widths = [max(len(line[i]) for line in lines if len(line) == len(header)) for i in range(len(header))]
    text = []
    for line in lines:
        if len(line) < len(header):
            prefix = "  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths))
            text.append(f"{prefix}  {line[-1][:max_reason]}")
        else:
            text.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    return "\n".join(text)


def format_table(rows: list[dict], max_reason: int = 100) -> str:
    """One line per row; skipped/error rows carry their reason in place of figures."""
    return _align([HEADER] + [_row_cells(row) for row in rows], HEADER, max_reason)


DROPIN_HEADER = ["drop-in", "replaces", "shape", "dtype", "mode", "pyattn:auto ms", "torch ms", "ratio [quartiles]",
                 "", "auto serves with"]


def dropin_rows(rows: list[dict]) -> list[dict]:
    """One entry per case that has a drop-in: pyattn:auto's row beside the torch row it replaces."""
    by_case: dict[tuple, dict] = {}
    for row in rows:
        if row.get("dropin_baseline") is None:
            continue
        key = (row["op"], row["shape"], row["dtype"], row["mode"])
        entry = by_case.setdefault(key, {"case": key, "suite": row["suite"], "auto": None, "torch": None})
        if row["backend"] == "pyattn:auto":
            entry["auto"] = row
        elif row["backend"] == row["dropin_baseline"]:
            entry["torch"] = row
    return [entry for entry in by_case.values() if entry["auto"] is not None and entry["torch"] is not None]


def _verdict(auto: dict, torch_row: dict) -> str:
    for name, row in (("pyattn:auto", auto), ("torch", torch_row)):
        if row["status"] != "ok":
            return f"{name} {row['status']}"
    if auto.get("check") and not auto["check"]["passed"]:
        return "pyattn:auto FAILS its check"
    ratio = auto.get("dropin_ratio")
    if ratio is None:
        return "-"
    return f">= {DROPIN_TARGET}" if ratio >= DROPIN_TARGET else f"below {DROPIN_TARGET}"


def format_dropins(rows: list[dict]) -> str | None:
    """The drop-in summary: per case, pyattn:auto and the torch call it replaces, and their ratio."""
    entries = dropin_rows(rows)
    if not entries:
        return None
    lines = [DROPIN_HEADER]
    for entry in entries:
        auto, torch_row = entry["auto"], entry["torch"]
        op, shape, dtype, mode = entry["case"]
        names = auto.get("dropin") or {}
        lines.append([
            names.get("pyattn", op),
            names.get("torch", torch_row["backend"]),
            shape,
            dtype,
            mode,
            format_ms(auto.get("time_ms")),
            format_ms(torch_row.get("time_ms")),
            _ratio(auto),
            _verdict(auto, torch_row),
            auto.get("served_by") or "-",
        ])
    title = (
        f"pyattn drop-ins against the PyTorch they replace: ratio = torch time / pyattn:auto time, paired round by "
        f"round in this run (median [quartiles]); >= 1: pyattn:auto as fast or faster; target >= {DROPIN_TARGET}"
    )
    return title + "\n" + _align(lines, DROPIN_HEADER)


def format_report(rows: list[dict], roofline: dict | None, caveat_text: str | None) -> str:
    """The printed report and table.txt: caveat, roofline, drop-in summary, every row, legend."""
    parts = [textwrap.fill(caveat_text, 110)] if caveat_text else []
    if roofline is not None:
        parts.append(format_roofline(roofline))
    dropins = format_dropins(rows)
    if dropins:
        parts.append(dropins)
    parts.append(format_table(rows))
    parts.append("\n".join(LEGEND))
    return "\n\n".join(parts)
def format_roofline(roofline: dict) -> str:
    label = f" ({roofline['label']})" if roofline.get("label") else ""
    return (
        f"roofline{label}: {roofline['matmul_tflops']:.3g} TFLOP/s ({roofline['matmul']}), "
        f"{roofline['copy_gbps']:.4g} GB/s ({roofline['copy']})"
    )
