"""PNG plots of a run (matplotlib, Agg backend): the plots every registered suite declares
(:class:`pyattn.bench.registry.Plot`), one panel per configuration, one line per backend (baselines
dashed), with error bars from each time's min and max, so a reader sees how far a line can be trusted."""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Callable

from pyattn.bench.registry import Plot, suites


def _from_time(row: dict, value: Callable[[float], float]) -> tuple[float, float, float] | None:
    """(value at the median, at the slowest, at the fastest call) of a figure derived from time."""
    time = row.get("time_ms")
    if time is None:
        return None
    return value(time["median"]), value(time["max"]), value(time["min"])


def _metric_tflops(row: dict):
    return _from_time(row, lambda ms: row["flops"] / (ms * 1e-3) / 1e12)


def _metric_tokens(row: dict):
    return _from_time(row, lambda ms: row["tokens_per_s"] * row["time_ms"]["median"] / ms)


def _metric_gbps(row: dict):
    return None if row.get("bytes") is None else _from_time(row, lambda ms: row["bytes"] / (ms * 1e-3) / 1e9)


def _metric_median_ms(row: dict):
    return _from_time(row, lambda ms: ms)


def _metric_peak_mib(row: dict):
    memory = row.get("peak_memory_bytes")
    return None if memory is None else (memory / 2**20,) * 3


# name -> (axis label, row -> (y, one end of its bar, the other end) or None)
METRICS = {
    "tflops": ("TFLOP/s", _metric_tflops),
    "tokens_per_s": ("tokens/s", _metric_tokens),
    "gbps": ("GB/s", _metric_gbps),
    "median_ms": ("median ms", _metric_median_ms),
    "peak_mib": ("peak MiB", _metric_peak_mib),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def series(rows: list[dict], plot: Plot) -> dict:
    """panel title -> backend -> sorted [(x, y, low, high)] over the rows ``plot`` selects that have
    its metric; panels run in their sort keys' order."""
    _, metric = METRICS[plot.metric]
    panels: dict = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if not plot.select(row):
            continue
        figure = metric(row)
        if figure is not None:
            y, one, other = figure
            panels[plot.panel(row)][row["backend"]].append((plot.x(row), y, min(one, other), max(one, other)))
    return {
        title: {backend: sorted(points) for backend, points in lines.items()}
        for (_, title), lines in sorted(panels.items(), key=lambda item: item[0][0])
    }


def _draw(panels: dict, path: str, title: str, plot: Plot) -> str | None:
    if not panels:
        return None
    pyplot = _pyplot()
    ylabel, _ = METRICS[plot.metric]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(5.5 * columns, 3.8 * rows + 0.6), squeeze=False)
    for axis, (panel, lines) in zip(axes.flat, panels.items()):
        for backend, points in lines.items():
            xs, ys, lows, highs = zip(*points)
            errors = [[y - low for y, low in zip(ys, lows)], [high - y for y, high in zip(ys, highs)]]
            axis.errorbar(
                xs,
                ys,
                yerr=errors,
                marker="o",
                capsize=3,
                linestyle="--" if backend.startswith("torch:") else "-",
                label=backend,
            )
        if plot.log_x:
            axis.set_xscale("log", base=2)
        if plot.log_y:
            axis.set_yscale("log")
        axis.set_title(panel, fontsize=9)
        axis.set_xlabel(plot.xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return path


def write_plots(rows: list[dict], out_dir: str, device_label: str, note: str | None = None) -> list[str]:
    """Write every registered suite's plots the rows have data for (in the run's first dtype); returns
    their paths. ``note`` (a CPU run's caveat) goes under each title."""
    if not rows:
        return []
    dtype = rows[0]["dtype"]
    rows = [row for row in rows if row["dtype"] == dtype]
    bars = "bars: min-max of the timed calls"
    written = []
    for suite in suites():
        own = [row for row in rows if row.get("suite") == suite.name]
        for plot in suite.plots:
            title = f"{plot.title}, {dtype}, {device_label}\n" + (f"{note}; {bars}" if note else bars)
            written.append(_draw(series(own, plot), os.path.join(out_dir, plot.file), title, plot))
    return [path for path in written if path is not None]
