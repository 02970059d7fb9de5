"""The benchmark CLI on a CPU: an end-to-end ``--shapes small`` run on the reference backend, its files,
its argument errors, checks that catch wrong backends, and the FLOP/byte formulas against hand counts."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch

import pyattn
from pyattn.bench import cli, flops, measure, report
from pyattn.bench.flops import BACKWARD, FORWARD, FORWARD_BACKWARD

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_cli(*argv: str) -> int:
    return cli.main(["--device", "cpu", *argv])


def _rows(out) -> list[dict]:
    with open(out / "results.json") as handle:
        return json.load(handle)["results"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    status = run_cli(
        "--shapes", "small", "--out", str(out)
    )  # default backends: reference runs, the GPU ones are skipped
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
    }
    assert {row["backend"] for row in rows} >= {
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
        assert (row["gbps"] is not None) == (row["op"] == "lstm_cell")


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
    assert {"attention_tflops.png", "lstm_time.png"} <= set(results["plots"])
    for name in results["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    table = (out / "table.txt").read_text()
    assert "roofline" in table and "pyattn:reference" in table and "TFLOP/s" in table


@pytest.mark.interpreter
def test_interpreter_rows_are_checked_and_never_timed(tmp_path):
    status = run_cli(
        "lstm",
        "attention",
        "--shapes",
        "small",
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
        "small",
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
        "small",
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
        "small",
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
        "small",
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
    status = run_cli("lstm", "--shapes", "small", "--time-budget", "0.001", "--out", str(tmp_path))
    with open(tmp_path / "results.json") as handle:
        payload = json.load(handle)
    assert status == 0 and payload["results"] == []
    assert payload["not_run"]["count"] > 0 and "time budget" in payload["not_run"]["reason"]


def test_a_call_that_cannot_be_graphed_is_timed_without_a_graph(monkeypatch):
    from pyattn.bench import runner
    from pyattn.bench.suites import lstm_cases

    case = next(case for case in lstm_cases("small", [torch.float32], [FORWARD]) if case.cell)
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
