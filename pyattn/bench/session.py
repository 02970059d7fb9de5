"""One ``pyattn-bench`` run: what runs on this device (and why the rest does not), the loop over
cases with a progress bar, and the files it writes as it goes."""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import textwrap
import time

import torch

import pyattn
from pyattn.bench import plots, report
from pyattn.bench.measure import keep_cpu_heap, measure_roofline
from pyattn.bench.registry import DTYPES, dtype_name, get_suite, suites
from pyattn.bench.runner import AUTO, CORRECTNESS_ONLY, ERROR, Result, fill_speedups, first_line, run_group

# pyattn's backends when pyattn cannot say (its ops failed to import): the rows then say why.
FALLBACK_BACKENDS = ("cuda", "triton", "torch", "reference")


def pyattn_backend_status() -> dict[str, str]:
    """Every pyattn backend by name: "available" or why not (asked at run time: the set may grow)."""
    try:
        return dict(pyattn.backend_status())
    except Exception as error:  # noqa: BLE001  (pyattn's ops failed to import: report, run baselines)
        return {name: f"pyattn's backends failed to load: {first_line(error)}" for name in FALLBACK_BACKENDS}


def forced_only_variants() -> list[str]:
    """Variants served only when forced by name (``Support.forced_only``): ``auto`` passes them over until a GPU
    run has timed them, so the default GPU bench forces each."""
    try:
        from pyattn import _registry

        return sorted({variant.qualified_name for op in _registry.registered_ops() for variant in
                       _registry.variants(op) if variant.support.forced_only is not None})
    except Exception:  # noqa: BLE001  (pyattn's ops failed to import: pyattn_backend_status reports it)
        return []


def pyattn_rows() -> list[str]:
    """``pyattn:auto`` (what a user gets) and ``pyattn:<name>`` for every backend this pyattn has."""
    return [AUTO] + [f"pyattn:{name}" for name in pyattn_backend_status()]


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
        self.suites = list(dict.fromkeys(args.suites)) or [suite.name for suite in suites()]
        self.threads = self._threads()
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

    def _threads(self) -> int | None:
        """torch's intra-op threads on a CPU: 1 by default (see docs/benchmarking.md), 0 = torch's own."""
        if self.device.type != "cpu":
            return None
        wanted = 1 if self.args.threads is None else self.args.threads
        return wanted if wanted > 0 else torch.get_num_threads()

    def _pyattn_backends(self) -> list[str]:
        """``pyattn:auto`` (what a user gets) and every forced backend that can run here, in
        pyattn's priority order; or those of ``--backends``. The rest are skipped with the reason."""
        status = pyattn_backend_status()
        names = self.args.backends
        if names is None:  # on a GPU also the variants auto passes over until timed (the run that times them)
            names = ["auto", *status, *(forced_only_variants() if self.device.type == "cuda" else [])]
        chosen = []
        for name in names:
            backend = name.split("/", 1)[0]
            if name == "auto":
                chosen.append(AUTO)
            elif self.device.type == "cpu" and backend == "cuda":
                self._skip(f"pyattn:{name}", "runs CUDA tensors; this run is on the CPU")
            elif self.device.type == "cpu" and backend == "triton" and not self.args.interpret:
                self._skip(
                    f"pyattn:{name}",
                    "needs a GPU; on a CPU, --interpret checks it under the Triton interpreter (untimed)",
                )
            elif status.get(backend, "available") != "available":
                self._skip(f"pyattn:{name}", status[backend])
            else:
                chosen.append(f"pyattn:{name}")
        return chosen

    def _baselines(self) -> list[str]:
        chosen = []
        for suite in map(get_suite, self.suites):
            for name in suite.all_baselines:
                if self.args.baselines is not None:
                    if name in self.args.baselines:
                        chosen.append(name)
                elif self.device.type == "cpu" and name in suite.gpu_only:
                    self._skip(f"torch:{name}", suite.gpu_only[name])
                elif self.device.type == "cuda" and name in suite.opt_in and self.shapes != "full":
                    self._skip(f"torch:{name}", suite.opt_in[name])
                else:
                    chosen.append(name)
        return [f"torch:{name}" for name in dict.fromkeys(chosen)]

    def _tasks(self) -> list[tuple]:
        """(case, backends): every backend of a case runs on the same inputs, timed interleaved;
        pyattn:auto and the drop-in's torch counterpart come first. The suites take turns case by
        case, so a run cut short by --time-budget still covers each."""
        per_suite = []
        for suite in map(get_suite, self.suites):
            tasks = []
            for case in suite.cases(self.shapes, self.dtypes, self.args.modes):
                applicable = set(suite.baselines(case))
                baselines = [b for b in self.baselines if b.split(":", 1)[1] in applicable]
                counterpart = "torch:" + suite.dropin(case).baseline if suite.dropin is not None else None
                first = [b for b in (AUTO, counterpart) if b in self.backends or b in baselines]
                rest = [b for b in self.backends + baselines if b not in first]
                if first or rest:
                    tasks.append((case, first + rest))
            per_suite.append(tasks)
        return [task for turn in itertools.zip_longest(*per_suite) for task in turn if task is not None]

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> int:
        """The whole run; torch's thread count is set for it and restored after."""
        threads = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> int:
        start = time.monotonic()
        os.makedirs(self.args.out, exist_ok=True)
        tasks = self._tasks()
        runs = sum(len(backends) for _, backends in tasks)
        self.environment = report.environment(self.device)
        if self.device.type == "cpu":
            self.environment["cpu_heap"] = keep_cpu_heap()
        self._print_header(runs)
        self.roofline = measure_roofline(self.device)
        print(report.format_roofline(self.roofline), flush=True)
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
        self.environment["load_average_end"] = report.load_average()
        order = {name: index for index, name in enumerate(self.suites)}
        self.results.sort(key=lambda result: (order.get(result.suite, len(order)), result.op))  # stable
        fill_speedups(self.results)
        rows = [result.as_dict() for result in self.results]
        label = self.environment["device"] if self.device.type == "cuda" else f"CPU ({self.environment['device']})"
        try:
            note = "CPU times are for checking, not for speed claims" if self.device.type == "cpu" else None
            self.plots = plots.write_plots(rows, self.args.out, label, note)
        except Exception as error:  # noqa: BLE001  (the figures are saved already; say why plots are not)
            self._skip("plots", first_line(error))
        self._write()
        text = report.format_report(rows, self.roofline, self._caveat())
        with open(os.path.join(self.args.out, "table.txt"), "w") as handle:
            handle.write(text + "\n")
        print("\n" + text)
        return self._summarize(time.monotonic() - start)

    def _caveat(self) -> str | None:
        return report.caveat(self.device.type, self.environment, self.threads)

    def _run_case(self, case, backends: list[str], progress) -> None:
        results = run_group(
            case,
            backends,
            self.device,
            check=self.args.check,
            roofline=self.roofline,
            interpret=self.args.interpret,
        )
        for result in results:
            self.results.append(result)
            progress.update(1)
            if progress.disable:  # no terminal (a log file): one line per run instead of a bar
                print(f"[{len(self.results)}/{progress.total}] {_one_line(result)}", file=sys.stderr, flush=True)
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
        caveat = self._caveat()
        if caveat:
            print(textwrap.fill(caveat, 110), flush=True)
        if self.skipped:
            print("left out of this run:", flush=True)
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
                "cpu_threads": self.threads,
                "interpret": self.args.interpret,
                "time_budget_s": self.args.time_budget,
                "memory": "torch.cuda.max_memory_allocated over the call, minus what was allocated before it"
                if self.device.type == "cuda"
                else "not measured on a CPU (null)",
            },
            "caveat": self._caveat(),
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
        ratio = "" if result.dropin_ratio is None else f", {result.dropin_ratio:.2f}x {result.dropin_baseline}"
        return f"{head}: {report.format_ms(result.time_ms)} ms{ratio}{check}"
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
