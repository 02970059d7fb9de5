"""One ``pyattn-bench`` run: what runs on this device (and why the rest does not), the loop over
cases with a progress bar, and the files it writes as it goes."""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch

import pyattn
from pyattn.bench import plots, report
from pyattn.bench.measure import measure_roofline
from pyattn.bench.runner import (
    CORRECTNESS_ONLY,
    ERROR,
    Result,
    case_data,
    empty_result,
    fill_speedups,
    first_line,
    run_case,
)
from pyattn.bench.suites import DTYPES, PYATTN_BACKENDS, SUITE_BASELINES, SUITES, baselines_for, build_cases, dtype_name

GPU_ONLY = {
    "sdpa-efficient": "torch's memory-efficient SDPA kernel runs on CUDA only",
    "sdpa-cudnn": "torch's cuDNN SDPA kernel runs on CUDA only",
    "flex": "FlexAttention is benchmarked on a GPU (on a CPU it compiles for minutes per shape); ask with --baselines",
}
FLEX_LEFT_OUT = (
    "FlexAttention compiles for every shape (minutes in all): it runs with --shapes full or --baselines ...,flex"
)


class Session:
    def __init__(self, args: argparse.Namespace, device: torch.device, argv: list[str]):
        self.args, self.device, self.argv = args, device, argv
        self.shapes = args.shapes or ("default" if device.type == "cuda" else "small")
        if args.dtype:
            self.dtypes = [DTYPES[name] for name in args.dtype]
        elif device.type == "cuda":
            self.dtypes = [torch.bfloat16, torch.float16] if self.shapes == "full" else [torch.bfloat16]
        else:
            self.dtypes = [torch.float32]
        self.suites = list(dict.fromkeys(args.suites)) or list(SUITES)
        self.skipped: list[dict] = []
        self.backends = self._pyattn_backends()
        self.baselines = self._baselines()
        self.results: list[Result] = []
        self.not_run: dict | None = None
        self.plots: list[str] = []
        self.roofline: dict | None = None
        self.environment: dict = {}

    # -- what runs here ---------------------------------------------------------------------------

    def _skip(self, name: str, reason: str) -> None:
        self.skipped.append({"suite": name, "reason": reason})

    def _pyattn_backends(self) -> list[str]:
        try:
            status = pyattn.backend_status()
        except Exception as error:  # noqa: BLE001  (pyattn's ops failed to import: report, run baselines)
            status = {name: f"pyattn's backends failed to load: {first_line(error)}" for name in PYATTN_BACKENDS}
        chosen = []
        for name in self.args.backends:
            if self.device.type == "cpu" and name == "cuda":
                self._skip("pyattn:cuda", "runs CUDA tensors; this run is on the CPU")
            elif self.device.type == "cpu" and name == "triton" and not self.args.interpret:
                self._skip(
                    "pyattn:triton",
                    "needs a GPU; on a CPU, --interpret checks it under the Triton interpreter (untimed)",
                )
            elif status[name] != "available":
                self._skip(f"pyattn:{name}", status[name])
            else:
                chosen.append(f"pyattn:{name}")
        return chosen

    def _baselines(self) -> list[str]:
        relevant = [name for suite in self.suites for name in SUITE_BASELINES[suite]]
        if self.args.baselines is not None:
            names = self.args.baselines
        elif self.device.type == "cpu":
            names = [name for name in relevant if name not in GPU_ONLY]
            for name in (name for name in relevant if name in GPU_ONLY):
                self._skip(f"torch:{name}", GPU_ONLY[name])
        elif self.shapes != "full" and "flex" in relevant:
            self._skip("torch:flex", FLEX_LEFT_OUT)
            names = [name for name in relevant if name != "flex"]
        else:
            names = relevant
        return [f"torch:{name}" for name in dict.fromkeys(names)]

    def _tasks(self) -> list[tuple]:
        """(case, backends): every backend of a case runs on the same inputs, one after another. The
        suites take turns case by case, so a run cut short by --time-budget still covers each."""
        per_suite = []
        for suite in self.suites:
            tasks = []
            for case in build_cases(suite, self.shapes, self.dtypes, self.args.modes):
                applicable = set(baselines_for(case))
                backends = self.backends + [b for b in self.baselines if b.split(":", 1)[1] in applicable]
                if backends:
                    tasks.append((case, backends))
            per_suite.append(tasks)
        return [task for turn in itertools.zip_longest(*per_suite) for task in turn if task is not None]

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> int:
        start = time.monotonic()
        os.makedirs(self.args.out, exist_ok=True)
        tasks = self._tasks()
        runs = sum(len(backends) for _, backends in tasks)
        self._print_header(runs)
        self.roofline = measure_roofline(self.device)
        print(report.format_roofline(self.roofline), flush=True)
        self.environment = report.environment(self.device)
        self._write()
        progress = _progress(runs)
        for index, (case, backends) in enumerate(tasks):
            if self.args.time_budget is not None and time.monotonic() - start > self.args.time_budget:
                left = sum(len(b) for _, b in tasks[index:])
                self.not_run = {"count": left, "reason": f"the time budget of {self.args.time_budget:g} s was spent"}
                progress.write(f"time budget spent: {left} runs not started")
                break
            self._run_case(case, backends, progress)
            self._write()
        progress.close()
        self.results.sort(key=lambda result: result.op)  # stable: each op's rows in run order
        fill_speedups(self.results)
        rows = [result.as_dict() for result in self.results]
        label = self.environment["device"] if self.device.type == "cuda" else f"CPU ({self.environment['device']})"
        try:
            self.plots = plots.write_plots(rows, self.args.out, label)
        except Exception as error:  # noqa: BLE001  (the figures are saved already; say why plots are not)
            self._skip("plots", first_line(error))
        self._write()
        table = report.format_table(rows)
        with open(os.path.join(self.args.out, "table.txt"), "w") as handle:
            handle.write(report.format_roofline(self.roofline) + "\n\n" + table + "\n")
        print(table)
        return self._summarize(time.monotonic() - start)

    def _run_case(self, case, backends: list[str], progress) -> None:
        try:
            data = case_data(case, self.device)
        except Exception as error:  # noqa: BLE001  (no inputs, no runs: one error row per backend)
            data, failure = None, first_line(error)
        for backend in backends:
            if data is None:
                result = empty_result(case, backend)
                result.status, result.reason = ERROR, f"making the inputs failed: {failure}"
            else:
                result = run_case(
                    case,
                    backend,
                    self.device,
                    data=data,
                    check=self.args.check,
                    roofline=self.roofline,
                    interpret=self.args.interpret,
                )
            self.results.append(result)
            progress.update(1)
            if progress.disable:  # no terminal (a log file): one line per run instead of a bar
                print(f"[{len(self.results)}/{progress.total}] {_one_line(result)}", file=sys.stderr, flush=True)
        del data
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _print_header(self, runs: int) -> None:
        dtypes = ",".join(dtype_name(d) for d in self.dtypes)
        backends, baselines = ", ".join(self.backends) or "none", ", ".join(self.baselines) or "none"
        print(
            f"pyattn-bench on {self.device.type}: suites {','.join(self.suites)}, shapes {self.shapes}, "
            f"dtypes {dtypes}, {runs} runs; backends {backends}; baselines {baselines}",
            flush=True,
        )
        if self.device.type == "cpu":
            print("no GPU: CPU figures (perf_counter medians; memory not measured). GPU suites skipped:", flush=True)
        for skip in self.skipped:
            print(f"  skipped {skip['suite']}: {skip['reason']}", flush=True)

    def _payload(self) -> dict:
        return {
            "schema_version": report.SCHEMA_VERSION,
            "created": report.now(),
            "command": "pyattn-bench " + " ".join(self.argv),
            "environment": self.environment,
            "settings": {
                "device": self.device.type,
                "suites": self.suites,
                "shapes": self.shapes,
                "dtypes": [dtype_name(d) for d in self.dtypes],
                "modes": self.args.modes,
                "backends": self.backends,
                "baselines": self.baselines,
                "check": self.args.check,
                "interpret": self.args.interpret,
                "time_budget_s": self.args.time_budget,
                "memory": "torch.cuda.max_memory_allocated over the call, minus what was allocated before it"
                if self.device.type == "cuda"
                else "not measured on a CPU (null)",
            },
            "roofline": self.roofline,
            "skipped_suites": self.skipped,
            "not_run": self.not_run,
            "results": [result.as_dict() for result in self.results],
            "plots": [os.path.basename(path) for path in self.plots],
        }

    def _write(self) -> None:
        report.write_json(os.path.join(self.args.out, "results.json"), self._payload())

    def _summarize(self, seconds: float) -> int:
        ours = [r for r in self.results if not r.is_baseline]
        failed = [r for r in ours if r.status == ERROR or (r.check is not None and not r.check["passed"])]
        counts = {}
        for result in self.results:
            counts[result.status] = counts.get(result.status, 0) + 1
        checked = [r for r in self.results if r.check is not None]
        passed = sum(r.check["passed"] for r in checked)
        print(
            f"\n{len(self.results)} runs in {seconds:.0f} s"
            + "".join(f", {n} {status}" for status, n in sorted(counts.items()))
            + f"; checks passed {passed}/{len(checked)}"
            + (f"; {self.not_run['count']} not run ({self.not_run['reason']})" if self.not_run else "")
        )
        if any(r.status == CORRECTNESS_ONLY for r in self.results):
            print("interpreter rows are correctness runs: their time is no speed figure and is not recorded")
        print(
            f"wrote {os.path.join(self.args.out, 'results.json')}, table.txt"
            + "".join(f", {os.path.basename(p)}" for p in self.plots)
        )
        if failed:
            print(f"{len(failed)} pyattn runs failed (errors or checks): exit status 1", file=sys.stderr)
        return 1 if failed else 0


def _one_line(result: Result) -> str:
    head = f"{result.op} {result.shape} {result.dtype} {result.mode} {result.backend}"
    if result.median_ms is not None:
        check = "" if result.check is None else (" check pass" if result.check["passed"] else " check FAIL")
        return f"{head}: {result.median_ms:.4g} ms{check}"
    return f"{head}: {result.status}" + (f" ({result.reason})" if result.reason else "")


class _LinesOnly:
    """Progress without tqdm (an optional dependency): one line per run, as tqdm does off a terminal."""

    disable = True

    def __init__(self, total: int):
        self.total = total

    def update(self, count: int) -> None:
        pass

    def write(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return _LinesOnly(total)
    return tqdm(total=total, disable=None, file=sys.stderr, unit="run", dynamic_ncols=True)
