"""PNG plots of a run (matplotlib, Agg backend): attention TFLOP/s and peak memory against sequence
length, LSTM time against batch. One panel per configuration, one line per backend."""

from __future__ import annotations

import os
from collections import defaultdict

from pyattn.bench.flops import MODES


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _series(rows: list[dict], panel_key, x_key, y_key) -> dict:
    """panel title -> backend -> sorted [(x, y)] over rows whose ``y_key`` was measured; ``panel_key``
    gives (sort key, title), so panels run mode by mode."""
    panels: dict = defaultdict(lambda: defaultdict(list))
    for row in rows:
        y = y_key(row)
        if y is not None:
            panels[panel_key(row)][row["backend"]].append((x_key(row), y))
    return {
        title: {backend: sorted(points) for backend, points in lines.items()}
        for (_, title), lines in sorted(panels.items())
    }


def _draw(panels: dict, path: str, title: str, xlabel: str, ylabel: str, log_y: bool = False) -> str | None:
    if not panels:
        return None
    pyplot = _pyplot()
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(5.5 * columns, 3.8 * rows), squeeze=False)
    for axis, (panel, lines) in zip(axes.flat, panels.items()):
        for backend, points in lines.items():
            xs, ys = zip(*points)
            axis.plot(xs, ys, marker="o", linestyle="--" if backend.startswith("torch:") else "-", label=backend)
        axis.set_xscale("log", base=2)
        if log_y:
            axis.set_yscale("log")
        axis.set_title(panel, fontsize=9)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return path


def _attention_panel(row: dict) -> tuple:
    case = row["case"]
    title = f"{row['mode']}, D{case['head_dim']}{', causal' if case['causal'] else ''}"
    return (MODES.index(row["mode"]), case["head_dim"], case["causal"]), title


def write_plots(rows: list[dict], out_dir: str, device_label: str) -> list[str]:
    """Write the plots the rows have data for (in the run's first dtype); returns their paths."""
    if not rows:
        return []
    dtype = rows[0]["dtype"]
    rows = [row for row in rows if row["dtype"] == dtype]
    attention = [row for row in rows if row["op"] == "attention" and not row["case"]["masked"]]
    lstm = [row for row in rows if row["op"] in ("lstm", "lstm_cell")]
    seq_len = lambda row: row["case"]["seq_len"]
    written = [
        _draw(
            _series(attention, _attention_panel, seq_len, lambda row: row.get("tflops")),
            os.path.join(out_dir, "attention_tflops.png"),
            f"Attention throughput, {dtype}, {device_label} (no mask)",
            "sequence length",
            "TFLOP/s",
        ),
        _draw(
            _series(attention, _attention_panel, seq_len, lambda row: _mib(row.get("peak_memory_bytes"))),
            os.path.join(out_dir, "attention_memory.png"),
            f"Attention peak memory over the call, {dtype}, {device_label}",
            "sequence length",
            "peak MiB",
            log_y=True,
        ),
        _draw(
            _series(
                lstm,
                _lstm_panel,
                lambda row: row["case"]["batch"],
                lambda row: (row.get("time_ms") or {}).get("median"),
            ),
            os.path.join(out_dir, "lstm_time.png"),
            f"LSTM time per call, {dtype}, {device_label}",
            "batch",
            "median ms",
            log_y=True,
        ),
    ]
    return [path for path in written if path is not None]


def _lstm_panel(row: dict) -> tuple:
    case = row["case"]
    kind = "cell step" if case["cell"] else f"T{case['steps']}"
    title = f"{kind}, H{case['hidden_size']}, {row['mode']}"
    return (MODES.index(row["mode"]), case["cell"], case["steps"], case["hidden_size"]), title


def _mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20
