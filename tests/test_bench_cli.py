"""The benchmark CLI on a CPU: an end-to-end ``--shapes tiny`` run, its files, its argument errors,
checks that catch wrong backends, the suite registry (a dummy suite runs without touching the runner),
the drop-in ratio, spreads, the above-ceiling flag, the CPU caveat, the plots, the Makefile's build
progress, and the FLOP/byte formulas against hand counts. Structure only: nothing here depends on how
fast this machine is."""

from __future__ import annotations

import collections
import itertools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass

import pytest
import torch

import pyattn
from pyattn.bench import cli, flops, measure, plots, registry, report, runner
from pyattn.bench.flops import BACKWARD, FORWARD, FORWARD_BACKWARD
from pyattn.bench.workload import Workload

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_cli(*argv: str) -> int:
    return cli.main(["--device", "cpu", *argv])


def _rows(out) -> list[dict]:
    with open(out / "results.json") as handle:
        return json.load(handle)["results"]


@pytest.fixture(scope="module", autouse=True)
def brief_cpu_timing():
    """These tests check what the bench does, not how precisely it times: CPU cases stop at the old
    minimum of timed seconds (the bench's own is longer, for steady ratios)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(measure, "CPU_MIN_SECONDS", 0.02)
        yield


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # Default backends: auto and every available one; the GPU ones are skipped with the reason.
    status = run_cli("--shapes", "tiny", "--out", str(out))
    with open(out / "results.json") as handle:
        return status, json.load(handle), out


# --- the end-to-end run ------------------------------------------------------------------------------


def test_small_run_passes_and_writes_documented_keys(small_run):
    status, results, _ = small_run
    assert status == 0
    assert set(report.RESULT_KEYS) <= set(results)
    environment = results["environment"]
    for key in ("device", "sm_count", "driver", "torch", "triton", "cuda", "git_commit", "backend_status"):
        assert key in environment
    assert environment["cpu_heap"].startswith(("kept", "unchanged"))  # a CPU run says what it did to the heap
    assert environment["torch"] == torch.__version__
    assert results["roofline"]["matmul_tflops"] > 0 and results["roofline"]["copy_gbps"] > 0
    assert results["settings"]["memory"].startswith("not measured")
    skipped = {entry["suite"] for entry in results["skipped_suites"]}
    assert {"pyattn:cuda", "pyattn:triton", "torch:sdpa-efficient", "torch:sdpa-cudnn"} <= skipped


def test_small_run_covers_every_op_mode_and_backend_with_passing_checks(small_run):
    _, results, _ = small_run
    rows = results["results"]
    ours = [row for row in rows if row["backend"] == "pyattn:reference"]
    assert {(row["op"], row["mode"]) for row in ours} == {
        ("attention", FORWARD),
        ("attention", BACKWARD),
        ("attention", FORWARD_BACKWARD),
        ("lstm", FORWARD),
        ("lstm", FORWARD_BACKWARD),
        ("lstm_cell", FORWARD),
        ("lstm_cell", FORWARD_BACKWARD),
        ("mha", FORWARD),
        ("mha", FORWARD_BACKWARD),
        ("decode", FORWARD),
    }
    assert {row["backend"] for row in rows} >= {
        "pyattn:auto",
        "torch:sdpa",
        "torch:mha",
        "torch:sdpa-math",
        "torch:lstm",
        "torch:lstmcell-loop",
        "torch:lstmcell",
    }
    for row in rows:
        assert row["status"] == "ok", row
        assert row["check"]["passed"] and row["check"]["finite"], row
        if row["mode"] != FORWARD:
            assert any(name.startswith("grad_") for name in row["check"]["errors"]), row
        timing = row["time_ms"]
        assert 0 < timing["min"] <= timing["median"] <= timing["max"]
        assert row["peak_memory_bytes"] is None  # not measured on a CPU
        assert row["tflops"] == pytest.approx(row["flops"] / (timing["median"] * 1e-3) / 1e12)
        assert (row["gbps"] is not None) == (row["op"] in ("lstm_cell", "decode"))


def test_speedups_are_relative_to_the_fastest_baseline(small_run):
    _, results, _ = small_run
    groups: dict = {}
    for row in results["results"]:
        groups.setdefault((row["op"], row["shape"], row["dtype"], row["mode"]), []).append(row)
    for rows in groups.values():
        baselines = [row for row in rows if row["backend"].startswith("torch:")]
        fastest = min(row["time_ms"]["median"] for row in baselines)
        for row in rows:
            assert row["speedup"] == pytest.approx(fastest / row["time_ms"]["median"])
        assert max(row["speedup"] for row in baselines) == pytest.approx(1.0)


def test_small_run_writes_png_plots_and_table(small_run):
    _, results, out = small_run
    assert {"attention_tflops.png", "attention_tflops_masked.png", "mha_time.png", "lstm_time.png"} <= set(
        results["plots"]
    )
    for name in results["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    table = (out / "table.txt").read_text()
    assert "roofline" in table and "pyattn:reference" in table and "TFLOP/s" in table


def test_every_row_carries_its_spread_and_the_table_shows_it(small_run):
    _, results, out = small_run
    timed = [row for row in results["results"] if row["time_ms"] is not None]
    assert timed
    for row in timed:
        timing = row["time_ms"]
        assert set(timing) >= {"min", "median", "max", "method", "samples"}
        assert timing["min"] <= timing["median"] <= timing["max"]
        assert timing["samples"] >= measure.CPU_MIN_REPEATS and "interleaved" in timing["method"]
    table = (out / "table.txt").read_text()
    assert "ms median [min-max]" in table
    sample = timed[0]["time_ms"]
    assert report.format_ms(sample) in table


def test_cpu_report_says_its_times_are_for_checking(small_run):
    _, results, out = small_run
    assert "not for speed claims" in results["caveat"].lower()
    assert results["settings"]["cpu_threads"] >= 1
    assert "load_average" in results["environment"] and "load_average_end" in results["environment"]
    first_paragraph = (out / "table.txt").read_text().split("\n\n")[0]
    assert first_paragraph.startswith("CPU RUN") and "not for speed claims" in first_paragraph.lower()
    assert report.caveat("cuda", {}, None) is None


def test_auto_is_compared_side_by_side_with_the_call_it_replaces(small_run):
    _, results, out = small_run
    rows = results["results"]
    expected = {"attention": "torch:sdpa", "mha": "torch:mha", "lstm": "torch:lstm", "lstm_cell": "torch:lstmcell",
                "decode": "torch:sdpa"}
    autos = [row for row in rows if row["backend"] == "pyattn:auto"]
    assert {row["op"] for row in autos} == set(expected)
    for row in autos:
        assert row["dropin_baseline"] == expected[row["op"]]
        assert row["dropin"]["pyattn"].startswith("pyattn.") and row["dropin"]["torch"].startswith("torch.")
        low, high = row["dropin_ratio_quartiles"]
        assert row["dropin_ratio"] > 0 and low <= row["dropin_ratio"] <= high
        twin = next(
            other
            for other in rows
            if other["backend"] == row["dropin_baseline"] and (other["op"], other["shape"], other["mode"])
            == (row["op"], row["shape"], row["mode"])
        )
        assert twin["time_ms"]["samples"] == row["time_ms"]["samples"]  # timed in the same rounds
    for row in rows:
        if row["backend"].startswith("pyattn:") and row["time_ms"] is not None:
            assert row["dropin_ratio"] is not None, row
    table = (out / "table.txt").read_text()
    assert "vs drop-in" in table and "baseline" in table
    summary = report.format_dropins(rows)
    assert summary is not None and "pyattn.nn.LSTM" in summary and "torch.nn.MultiheadAttention" in summary
    assert "ratio" in summary and re.search(r"\d\.\d\dx \[", summary)
    assert summary.splitlines()[0] in table


def test_masked_attention_has_its_own_plot(small_run):
    _, results, _ = small_run
    attention = [row for row in results["results"] if row["suite"] == "attention"]
    masked = {row["case"]["masked"] for row in attention}
    assert masked == {False, True}
    plot_specs = {plot.file: plot for plot in registry.get_suite("attention").plots}
    unmasked, with_mask = plot_specs["attention_tflops.png"], plot_specs["attention_tflops_masked.png"]
    assert "no mask" in unmasked.title and "mask" in with_mask.title and "no mask" not in with_mask.title
    masked_series = plots.series(attention, with_mask)
    assert masked_series and all(len(points[0]) == 4 for lines in masked_series.values() for points in lines.values())
    assert "attention_tflops_masked.png" in results["plots"]


def test_auto_row_says_what_serves_it(small_run):
    _, results, _ = small_run
    for row in (row for row in results["results"] if row["backend"] == "pyattn:auto"):
        assert row["served_by"] is None or isinstance(row["served_by"], str)
    assert any(row["served_by"] for row in results["results"] if row["backend"] == "pyattn:auto")


@pytest.mark.interpreter
def test_interpreter_rows_are_checked_and_never_timed(tmp_path):
    status = run_cli(
        "lstm",
        "attention",
        "--shapes",
        "tiny",
        "--interpret",
        "--backends",
        "triton",
        "--baselines",
        "none",
        "--modes",
        "forward",
        "--out",
        str(tmp_path),
    )
    rows = _rows(tmp_path)
    assert status == 0 and {row["op"] for row in rows} == {"attention", "lstm", "lstm_cell"}
    for row in rows:
        assert row["status"] == "correctness-only" and "interpreter" in row["reason"]
        assert row["check"]["passed"], row
        assert row["time_ms"] is None and row["tflops"] is None and row["speedup"] is None


def test_microbenchmarks_collect_and_skip_cleanly_without_a_gpu():
    """benchmarks/ imports what pyattn.bench offers; without a GPU every benchmark skips with the reason."""
    if torch.cuda.is_available():
        argv = ["--collect-only"]  # on a GPU they would run: minutes
    else:
        pytest.importorskip("pytest_benchmark")
        argv = ["--benchmark-only"]
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "passed" not in completed.stdout and "torch sees no CUDA device" in completed.stdout


# --- argument errors ---------------------------------------------------------------------------------


def test_unknown_flag_exits_nonzero_naming_it():
    completed = subprocess.run(
        [sys.executable, "-m", "pyattn.bench", "--no-such-flag"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 2
    assert "--no-such-flag" in completed.stderr


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--shapes", "huge"], "--shapes"),
        (["--dtype", "fp8"], "--dtype"),
        (["--backends", "tpu"], "--backends"),
        (["--baselines", "sdpa-magic"], "--baselines"),
        (["--modes", "sideways"], "--modes"),
        (["--time-budget", "-3"], "--time-budget"),
        (["convolution"], "SUITE"),
    ],
)
def test_bad_value_exits_2_naming_the_argument(argv, named, capsys):
    with pytest.raises(SystemExit) as raised:
        run_cli(*argv)
    assert raised.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU where there is none")
def test_asking_for_a_missing_gpu_exits_2_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["--device", "cuda"])
    assert raised.value.code == 2
    assert "--device cuda" in capsys.readouterr().err


# --- the check catches wrong backends ----------------------------------------------------------------


def test_check_fails_a_slightly_wrong_attention_output(tmp_path, monkeypatch):
    def off_by_a_percent(query, key, value, attn_mask=None, is_causal=False, **kwargs):
        return (
            torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=attn_mask, is_causal=is_causal
            )
            * 1.01
        )

    monkeypatch.setattr(pyattn.functional, "scaled_dot_product_attention", off_by_a_percent)
    status = run_cli(
        "attention",
        "--shapes",
        "tiny",
        "--backends",
        "reference",
        "--baselines",
        "none",
        "--modes",
        "forward",
        "--out",
        str(tmp_path),
    )
    assert status == 1
    rows = _rows(tmp_path)
    assert rows and all(not row["check"]["passed"] and row["check"]["errors"]["output"] > 5e-3 for row in rows)
    assert "FAIL: output" in (tmp_path / "table.txt").read_text()


def test_check_fails_unwritten_output_elements(tmp_path, monkeypatch):
    def forgets_the_last_query(query, key, value, attn_mask=None, is_causal=False, **kwargs):
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, is_causal=is_causal
        )
        out[:, :, -1] = float("nan")  # what a poisoned buffer looks like where a kernel wrote nothing
        return out

    monkeypatch.setattr(pyattn.functional, "scaled_dot_product_attention", forgets_the_last_query)
    run_cli(
        "attention",
        "--shapes",
        "tiny",
        "--backends",
        "reference",
        "--baselines",
        "none",
        "--modes",
        "forward",
        "--out",
        str(tmp_path),
    )
    assert all(not row["check"]["finite"] and not row["check"]["passed"] for row in _rows(tmp_path))


class _LSTMWithWrongInputGradient(torch.nn.LSTM):
    def forward(self, input, hx=None):
        if input.requires_grad:
            input.register_hook(lambda grad: grad * 1.5)
        return super().forward(input, hx)


def test_check_fails_a_wrong_gradient(tmp_path, monkeypatch):
    monkeypatch.setattr(pyattn.nn, "LSTM", _LSTMWithWrongInputGradient)
    status = run_cli(
        "lstm",
        "--shapes",
        "tiny",
        "--backends",
        "reference",
        "--baselines",
        "none",
        "--modes",
        "forward+backward",
        "--out",
        str(tmp_path),
    )
    assert status == 1
    for row in (row for row in _rows(tmp_path) if row["op"] == "lstm"):
        check = row["check"]
        assert not check["passed"] and check["errors"]["grad_input"] > 0.1
        assert check["errors"]["output"] <= check["bounds"]["output"]  # the forward is right
        assert check["errors"]["grad_weight_ih"] <= check["bounds"]["grad_weight_ih"]


def test_a_failing_backend_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(pyattn.functional, "scaled_dot_product_attention", broken)
    status = run_cli(
        "attention",
        "--shapes",
        "tiny",
        "--backends",
        "reference",
        "--baselines",
        "sdpa-math,sdpa-efficient",
        "--modes",
        "forward",
        "--no-check",
        "--out",
        str(tmp_path),
    )
    assert status == 1
    rows = _rows(tmp_path)
    statuses = {row["backend"]: row["status"] for row in rows}
    assert statuses == {"pyattn:reference": "error", "torch:sdpa-math": "ok", "torch:sdpa-efficient": "skipped"}
    assert all("kernel exploded" in row["reason"] for row in rows if row["backend"] == "pyattn:reference")
    assert all(row["reason"] for row in rows if row["status"] == "skipped")
    assert all(row["check"] is None for row in rows)  # --no-check


def test_time_budget_stops_starting_cases_and_says_so(tmp_path):
    status = run_cli("lstm", "--shapes", "tiny", "--time-budget", "0.001", "--out", str(tmp_path))
    with open(tmp_path / "results.json") as handle:
        payload = json.load(handle)
    assert status == 0 and payload["results"] == []
    assert payload["not_run"]["count"] > 0 and "time budget" in payload["not_run"]["reason"]


def test_a_call_that_cannot_be_graphed_is_timed_without_a_graph(monkeypatch):
    from pyattn.bench.lstm import lstm_cases

    case = next(case for case in lstm_cases("tiny", [torch.float32], [FORWARD]) if case.cell)
    workload = runner.prepare(case, "torch:lstmcell", runner.case_data(case, torch.device("cpu")))
    workload.cuda_graph = True  # as on a GPU; capturing it fails below, as a synchronising backend would
    real_time_call = runner.time_call

    def time_call(fn, device, grad_to_none=(), cuda_graph=False):
        if cuda_graph:
            raise RuntimeError("operation not permitted when stream is capturing")
        return real_time_call(fn, device, grad_to_none)

    monkeypatch.setattr(runner, "time_call", time_call)
    result = runner.evaluate(workload)
    assert result.status == "ok" and result.check["passed"] and result.time_ms["median"] > 0
    assert any("CUDA graph capture failed" in note for note in result.notes)


# --- the registry: a suite is told, not asked --------------------------------------------------------


@dataclass(frozen=True)
class _DummyCase:
    size: int
    dtype: torch.dtype
    mode: str
    op: str = "dummy_matmul"

    @property
    def shape(self) -> str:
        return f"N{self.size}"

    def flops(self) -> float:
        return 2.0 * self.size**3

    def bytes(self) -> float | None:
        return None

    def tokens(self) -> int:
        return self.size

    def as_dict(self) -> dict:
        return {**asdict(self), "dtype": "fp32"}


class _DummyData:
    def __init__(self, case, device, seed=0):
        generator = torch.Generator(device=device).manual_seed(seed)
        self.a, self.b = (torch.randn(case.size, case.size, generator=generator, device=device) for _ in range(2))
        self.reference = {"output": self.a.double() @ self.b.double()}


def _dummy_prepare(case, backend, data):
    kind, name = backend.split(":", 1)
    if kind == "torch" and name != "mm":
        raise runner.Unsupported(f"{backend} does not run {case.op}")

    def call():
        return torch.mm(data.a, data.b)

    def check():
        errors = {"output": float((call().double() - data.reference["output"]).norm() / data.reference["output"].norm())}
        return errors, True

    return Workload(case, backend, data.a.device, call, check, lambda: {"output": 1e-4})


@pytest.fixture
def dummy_suite():
    suite = registry.Suite(
        name="dummy",
        ops=("dummy_matmul",),
        cases=lambda shapes, dtypes, modes: [_DummyCase(size, torch.float32, FORWARD) for size in (8, 16)],
        data=_DummyData,
        prepare=_dummy_prepare,
        baselines=lambda case: ("mm",),
        all_baselines=("mm",),
        dropin=lambda case: registry.DropIn("pyattn.dummy", "torch.mm", "mm"),
        plots=(
            registry.Plot(
                "dummy_time.png", "Dummy", lambda row: True, lambda row: ((0,), "all"), lambda row: row["case"]["size"],
                "size", "median_ms",
            ),
        ),
    )
    registry.register_suite(suite)
    yield suite
    registry.unregister_suite("dummy")


def test_a_registered_suite_runs_without_touching_runner_report_plots_or_cli(dummy_suite, tmp_path):
    status = run_cli("dummy", "--shapes", "tiny", "--backends", "auto,reference", "--out", str(tmp_path))
    payload = json.loads((tmp_path / "results.json").read_text())
    rows = payload["results"]
    assert status == 0 and {row["suite"] for row in rows} == {"dummy"}
    assert {row["backend"] for row in rows} == {"pyattn:auto", "pyattn:reference", "torch:mm"}
    assert all(row["status"] == "ok" and row["check"]["passed"] for row in rows)
    assert all(row["dropin_ratio"] is not None for row in rows if row["backend"] != "torch:mm")
    assert "dummy_time.png" in payload["plots"] and (tmp_path / "dummy_time.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "pyattn.dummy" in (tmp_path / "table.txt").read_text()
    assert "mm" in registry.all_baselines()


def test_the_generic_modules_never_ask_which_op_a_case_is():
    bench = ROOT / "pyattn" / "bench"
    for name in ("runner.py", "report.py", "plots.py", "cli.py", "session.py", "measure.py"):
        text = (bench / name).read_text()
        assert "isinstance(case" not in text, name
        for case_type in ("AttentionCase", "LSTMCase", "MHACase"):
            assert case_type not in text, (name, case_type)
        assert not re.search(r"""op"?\]? == ["'](attention|lstm|lstm_cell|mha)["']""", text), name


def test_registering_a_name_or_op_twice_is_an_error(dummy_suite):
    with pytest.raises(ValueError, match="registered already"):
        registry.register_suite(registry.Suite(**{**dummy_suite.__dict__, "prepare": None}))
    clash = {**dummy_suite.__dict__, "name": "dummy2"}
    with pytest.raises(ValueError, match="belongs to suite 'dummy'"):
        registry.register_suite(registry.Suite(**clash))


# --- figures above their ceiling, interleaving, the backends a run takes ---------------------------------


def test_a_figure_above_its_ceiling_is_flagged_not_shown_as_a_fraction():
    case = next(iter(registry.get_suite("lstm").cases("tiny", [torch.float32], [FORWARD])))
    workload = runner.prepare(case, "torch:lstm", runner.case_data(case, torch.device("cpu")))
    result = runner.evaluate(workload, roofline={"matmul_tflops": 1e-12, "copy_gbps": 1e-9})
    assert result.roofline_fraction > 1 and result.above_ceiling
    assert any("above the measured ceiling" in note for note in result.notes)
    row = {**result.as_dict(), "roofline_fraction": 1.05}
    assert "105% (above ceiling: noise or a wrong model)" in report.format_table([row])
    assert "(above ceiling" not in report.format_table([{**row, "roofline_fraction": 0.5, "above_ceiling": False}])


def test_interleaved_timing_alternates_the_calls_and_rotates_their_order(monkeypatch):
    monkeypatch.setattr(measure, "CPU_REWARM_BELOW_MS", 0.0)  # every call "long": one timed call a round
    order: list[str] = []
    calls = [(lambda name=name: order.append(name), [], False) for name in "abc"]
    timings = measure.time_interleaved(calls, torch.device("cpu"))
    warmup, timed = order[:3], order[3:]
    assert warmup == ["a", "b", "c"] and len(timed) % 3 == 0
    rounds = [timed[i : i + 3] for i in range(0, len(timed), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # each round calls each once
    assert rounds[0] != rounds[1]  # and the order rotates
    assert len({len(t.samples) for t in timings}) == 1 and len(timings[0].samples) == len(rounds)


@pytest.mark.parametrize("count", range(1, 8))
def test_round_order_lets_every_call_follow_every_other_equally_often(count):
    # Rotated orders made each call always follow the same one: with three backends the first was always timed
    # after the third, a bias of 7-9% between two identical torch kernels (docs/benchmarking.md).
    cycle = count if count % 2 == 0 else 2 * count
    rounds = [measure.round_order(count, r) for r in range(cycle)]
    assert all(sorted(order) == list(range(count)) for order in rounds)
    followers = collections.Counter((order[i], order[i + 1]) for order in rounds for i in range(count - 1))
    assert len(followers) == count * (count - 1) and len(set(followers.values())) <= 1
    positions = collections.Counter((i, call) for order in rounds for i, call in enumerate(order))
    assert len(positions) == count * count and len(set(positions.values())) == 1


def test_a_short_call_is_timed_right_after_itself():
    # Otherwise it is timed warm or cold by whichever backend ran just before it (always the same one).
    order: list[str] = []
    calls = [(lambda name=name: order.append(name), [], False) for name in "ab"]
    measure.time_interleaved(calls, torch.device("cpu"))
    timed = order[2:]  # after the two warm-up calls: an untimed call, then a timed batch, of the same backend
    runs = [len(list(group)) for _, group in itertools.groupby(timed)]  # rotation joins b's of two rounds
    assert timed[:1] == ["a"] and all(run >= 2 for run in runs) and max(runs) <= 2 * (1 + measure.CPU_MAX_BATCH)


def test_short_calls_get_rounds_until_they_fill_the_minimum_time():
    # A no-op never fills CPU_MIN_SECONDS in CPU_MIN_REPEATS calls: it must get more rounds than that.
    (timing,) = measure.time_interleaved([(lambda: None, [], False)], torch.device("cpu"))
    assert len(timing.samples) > measure.CPU_MIN_REPEATS


def _session(*argv):
    from pyattn.bench.session import Session

    return Session(cli.build_parser().parse_args(["--device", "cpu", *argv]), torch.device("cpu"), list(argv))


def test_the_backends_come_from_pyattn_at_run_time(monkeypatch):
    monkeypatch.setattr(pyattn, "backend_status", lambda: {"cuda": "not built", "triton": "no GPU", "reference": "available"})
    assert _session().backends == ["pyattn:auto", "pyattn:reference"]  # no "torch" backend: none asked for
    status = {"cuda": "not built", "triton": "no GPU", "torch": "available", "reference": "available"}
    monkeypatch.setattr(pyattn, "backend_status", lambda: status)
    session = _session()
    assert session.backends == ["pyattn:auto", "pyattn:torch", "pyattn:reference"]
    assert {"pyattn:cuda", "pyattn:triton"} <= {skip["suite"] for skip in session.skipped}
    assert _session("--backends", "auto,torch/sdpa").backends == ["pyattn:auto", "pyattn:torch/sdpa"]
    case, backends = _session("lstm")._tasks()[0]
    assert backends[:2] == ["pyattn:auto", "torch:lstm"]  # the pair the ratio compares, side by side


def test_cpu_runs_default_to_one_thread_and_restore_torchs_count():
    assert _session().threads == 1
    assert _session("--threads", "0").threads == torch.get_num_threads()
    with pytest.raises(SystemExit):
        run_cli("--threads", "-1")


# --- the build's progress (Makefile) -------------------------------------------------------------------

FAKE_PYTHON = """#!/bin/sh
# What pip -v shows of a build (indented), setup.py's lines twice (metadata, then the build).
if [ "$2" = pip ]; then
    echo "Running setup.py develop for pyattn"
    echo "  pyattn setup: 3 sources (1 .cu) with ninja" >&2
    echo "  pyattn setup: 3 sources (1 .cu) with ninja" >&2
    echo "  [1/2] /usr/local/cuda/bin/nvcc -I/x/csrc -O3 -c /x/csrc/attention/fwd_hdim64_bf16.cu -o /x/build/fwd.o -gencode=arch=compute_90a,code=sm_90a"
    echo "  [2/2] c++ -MMD -MF /x/build/api.o.d -O3 -c /x/csrc/attention/attention_api.cpp -o /x/build/api.o"
    echo "  g++ -O3 -Wall -shared /x/build/fwd.o /x/build/api.o -L/x/lib -o build/lib/pyattn/_C.cpython-311-x86_64-linux-gnu.so"
    exit "${FAKE_STATUS:-0}"
fi
exit 0
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("fake_status", [0, 3])
def test_make_build_prints_progress_keeps_the_log_and_the_exit_status(tmp_path, fake_status):
    venv = tmp_path / "venv"
    venv.mkdir()
    fake = venv / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    (venv / ".installed").touch()  # newer than pyproject.toml: the venv step is up to date
    completed = subprocess.run(
        ["make", "--no-print-directory", f"VENV={venv}", f"PY={fake}", "EXTENSION_SOURCES=", f"{venv}/.built"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FAKE_STATUS": str(fake_status), "SHELL": "/bin/sh"},
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert "[1/2] compiling fwd_hdim64_bf16.cu" in output
    assert "[2/2] compiling attention_api.cpp" in output
    assert "linking _C.cpython-311-x86_64-linux-gnu.so" in output
    if fake_status == 0:  # (a failed build also prints the log's tail)
        assert output.count("pyattn setup: 3 sources") == 1  # once, though setup.py runs twice
    log = (venv / "build.log").read_text()
    assert "-gencode=arch=compute_90a" in log and "Running setup.py develop" in log  # the full log is kept
    assert (completed.returncode == 0) == (fake_status == 0), output
    assert (venv / ".built").exists() == (fake_status == 0)


# --- work counts -------------------------------------------------------------------------------------


def test_attention_flops_match_hand_counts():
    # B=2, H=3, L=S=4, D=8: 4·B·H·L·S·D = 4·2·3·4·4·8.
    assert flops.attention_flops(2, 3, 4, 4, 8) == 3072
    # Causal, L=S=4: 1+2+3+4 = 10 visible pairs; 2·B·H·pairs·(D+Dv) = 2·2·3·10·16.
    assert flops.attention_flops(2, 3, 4, 4, 8, causal=True) == 1920
    # D=8 for QKᵀ, Dv=16 for PV: 2·2·3·16·(8+16).
    assert flops.attention_flops(2, 3, 4, 4, 8, head_dim_v=16) == 4608
    assert flops.attention_flops(2, 3, 4, 4, 8, mode=BACKWARD) == 2.5 * 3072
    assert flops.attention_flops(2, 3, 4, 4, 8, mode=FORWARD_BACKWARD) == 3.5 * 3072


@pytest.mark.parametrize(
    "q_len, kv_len, offset, pairs",
    [
        (3, 5, 0, 1 + 2 + 3),  # top-left (torch's is_causal)
        (3, 5, 2, 3 + 4 + 5),  # bottom-right (flash-attention's)
        (5, 3, 0, 1 + 2 + 3 + 3 + 3),
        (5, 3, -2, 0 + 0 + 1 + 2 + 3),
        (4, 4, -10, 0),
        (2, 6, 10, 12),
    ],
)
def test_causal_pairs_match_hand_counts(q_len, kv_len, offset, pairs):
    assert flops.attention_visible_pairs(q_len, kv_len, causal=True, diagonal_offset=offset) == pairs


def test_causal_pairs_match_a_counted_mask():
    for q_len in range(9):
        for kv_len in range(9):
            for offset in range(-10, 11):
                i = torch.arange(q_len)[:, None]
                j = torch.arange(kv_len)[None, :]
                expected = int((j <= i + offset).sum())
                assert flops.attention_visible_pairs(q_len, kv_len, True, offset) == expected, (q_len, kv_len, offset)


def test_lstm_flops_and_cell_bytes_match_hand_counts():
    # 8·B·T·H·(I+H) with B=2, T=3, I=4, H=5.
    assert flops.lstm_flops(2, 3, 4, 5) == 2160
    assert flops.lstm_flops(2, 3, 4, 5, FORWARD_BACKWARD) == 3 * 2160
    # B=2, I=3, H=4, 2-byte elements. Forward reads W (4H·(I+H) = 112), biases (32), x/h/c (2·11 = 22)
    # and writes h', c' (16): 182 elements.
    assert flops.lstm_cell_bytes(2, 3, 4, 2) == 182 * 2
    # Backward reads W (112), x/h/c (22), gates (32), dh'/dc' (16); writes dW (112), db (16), dx/dh/dc (22).
    assert flops.lstm_cell_bytes(2, 3, 4, 2, BACKWARD) == 332 * 2
    assert flops.lstm_cell_bytes(2, 3, 4, 2, FORWARD_BACKWARD) == (182 + 332) * 2


def test_roofline_fraction_takes_the_lower_roof():
    roofline = {"matmul_tflops": 100.0, "copy_gbps": 1000.0}  # ridge at 100 FLOP/byte
    # Compute-bound (no bytes, or 1000 FLOP/byte): 50 TFLOP in 1 s is half of 100 TFLOP/s.
    assert measure.attainable_fraction(50e12, None, 1.0, roofline) == pytest.approx(0.5)
    assert measure.attainable_fraction(50e12, 50e9, 1.0, roofline) == pytest.approx(0.5)
    # Memory-bound, 1 FLOP/byte: the roof is 1000 GB/s × 1 FLOP/byte = 1 TFLOP/s; 0.25 TFLOP/s is a quarter.
    assert measure.attainable_fraction(0.25e12, 0.25e12, 1.0, roofline) == pytest.approx(0.25)
    assert measure.attainable_fraction(1e12, None, 1.0, None) is None


def test_work_counts_reject_unknown_modes():
    with pytest.raises(ValueError, match="mode"):
        flops.attention_flops(1, 1, 4, 4, 8, mode="sideways")
    with pytest.raises(ValueError, match="mode"):
        flops.lstm_cell_bytes(1, 4, 4, 2, mode="sideways")
