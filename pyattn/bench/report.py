"""What a run writes: ``results.json`` (environment, roofline, every row) and the printed table."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata

import torch

SCHEMA_VERSION = 1
RESULT_KEYS = (
    "schema_version",
    "created",
    "command",
    "environment",
    "settings",
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


def _throughput(row: dict) -> str:
    if row.get("tflops") is None:
        return "-"
    if row["op"] == "attention":
        return f"{row['tflops']:.3g} TFLOP/s"
    return _si(row["tokens_per_s"], "tok/s")


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
    time = row.get("time_ms")
    status = row["status"]
    if status in ("skipped", "error"):
        return [row["op"], row["shape"], row["dtype"], row["mode"], row["backend"], f"{status}: {row['reason']}"]
    memory = row.get("peak_memory_bytes")
    return [
        row["op"],
        row["shape"],
        row["dtype"],
        row["mode"],
        row["backend"],
        "-" if time is None else f"{time['median']:.4g}",
        _throughput(row),
        "-" if row.get("gbps") is None else f"{row['gbps']:.4g}",
        "-" if memory is None else f"{memory / 2**20:.4g}",
        "-" if row.get("roofline_fraction") is None else f"{100 * row['roofline_fraction']:.0f}%",
        "-" if row.get("speedup") is None else f"{row['speedup']:.2f}x",
        _check(row) if status != "correctness-only" else f"{_check(row)} (interpreter, untimed)",
    ]


HEADER = [
    "op",
    "shape",
    "dtype",
    "mode",
    "backend",
    "median ms",
    "throughput",
    "GB/s",
    "peak MiB",
    "of roof",
    "vs torch",
    "check",
]


def format_table(rows: list[dict], max_reason: int = 100) -> str:
    """Aligned text: one line per row; skipped/error rows carry their reason in place of figures."""
    lines = [HEADER] + [_row_cells(row) for row in rows]
    widths = [
        max(len(line[i]) for line in lines if len(line) > i and len(line) == len(HEADER)) for i in range(len(HEADER))
    ]
    text = []
    for line in lines:
        if len(line) < len(HEADER):  # skipped/error: the reason runs to the end of the line
            prefix = "  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths))
            text.append(f"{prefix}  {line[-1][:max_reason]}")
        else:
            text.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    return "\n".join(text)


def format_roofline(roofline: dict) -> str:
    label = f" ({roofline['label']})" if roofline.get("label") else ""
    return (
        f"roofline{label}: {roofline['matmul_tflops']:.3g} TFLOP/s ({roofline['matmul']}), "
        f"{roofline['copy_gbps']:.4g} GB/s ({roofline['copy']})"
    )
