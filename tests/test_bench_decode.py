"""The decode bench suite on a CPU: it registers, its shape sets are the documented grids, its FLOP/byte model
matches hand counts, a ``--shapes tiny`` run gives checked rows with the expected figures beside SDPA, and the
check fails a wrong result. Structure only: nothing here depends on how fast this machine is."""

from __future__ import annotations

import json

import pytest
import torch

from pyattn.bench import cli, registry, runner
from pyattn.bench.decode import FREE_MEMORY_MARGIN, DecodeCase, DecodeData, cache_fits, decode_cases, decode_function
from pyattn.bench.flops import BACKWARD, FORWARD, FORWARD_BACKWARD
from pyattn.bench.workload import Unsupported

CPU = torch.device("cpu")


def test_the_suite_registers_as_a_builtin():
    assert "pyattn.bench.decode" in registry.BUILTIN_SUITES
    suite = registry.get_suite("decode")
    assert registry.suite_for_op("decode") is suite and "decode" in registry.suite_names()
    assert suite.throughput == "tokens_per_s" and suite.all_baselines == ("sdpa", "flex")
    assert set(suite.opt_in) == set(suite.gpu_only) == {"flex"}
    dropin = suite.dropin(decode_cases("tiny", [torch.float32], [FORWARD])[0])
    assert (dropin.pyattn, dropin.torch, dropin.baseline) == (
        "pyattn.flash_attention_with_kvcache", "torch.nn.functional.scaled_dot_product_attention", "sdpa")


def test_shape_sets_are_the_documented_grids():
    modes = [FORWARD, BACKWARD, FORWARD_BACKWARD]
    default = decode_cases("default", [torch.bfloat16], modes)
    assert {(c.batch, c.cache_len) for c in default} == {(b, s) for b in (1, 16, 64) for s in (8192, 32768)}
    full = decode_cases("full", [torch.bfloat16], modes)
    assert len(full) == 4 * 4 * 2 * 2
    assert {c.cache_len for c in full} == {1024, 8192, 32768, 131072} and {c.batch for c in full} == {1, 16, 64, 256}
    for case in default + full:
        assert case.mode == FORWARD and case.heads_q == 32 and case.head_dim == 128
        assert case.heads_k in (32, 4) and case.block_size in (None, 256)
    assert len(default) == 3 * 2 * 2 * 2
    assert decode_cases("default", [torch.bfloat16], [BACKWARD]) == []  # a decode step has no backward
    tiny = decode_cases("tiny", [torch.float32], [FORWARD])
    assert {c.block_size is None for c in tiny} == {True, False} and {c.group for c in tiny} == {1, 2}


def test_work_model_matches_hand_counts():
    case = DecodeCase(16, 8192, 32, 4, 128, 256, torch.bfloat16)
    kv_bytes = 2 * 16 * 8192 * 4 * 128 * 2  # K and V, B·S·Hk·D elements each, 2 bytes
    assert case.bytes() == kv_bytes == 268435456  # docs/decode.md's table: 268 MB
    assert case.flops() == 4 * 16 * 32 * 8192 * 128
    assert case.flops() / case.bytes() == case.group == 8  # arithmetic intensity = the GQA group
    assert case.tokens() == 16
    assert case.shape == "B16 S8192 Hq32 Hk4 D128 paged256"
    assert case.as_dict()["layout"] == "paged256" and case.as_dict()["dtype"] == "bf16"
    assert DecodeCase(1, 1024, 32, 32, 128, None, torch.float32).bytes() == 2 * 1024 * 32 * 128 * 4


def test_a_cache_that_does_not_fit_is_skipped_with_the_reason():
    assert cache_fits(FREE_MEMORY_MARGIN * 100, 100) and not cache_fits(90, 100)
    case = DecodeCase(2, 64, 4, 2, 16, 16, torch.float32)
    data = DecodeData(case, CPU)
    assert data.skip_reason is None and data.block_table.shape == (2, 4)
    data.skip_reason = "its K/V cache needs 137.4 GiB, 139.0 GiB is free"
    with pytest.raises(Unsupported, match="137.4 GiB"):
        runner.prepare(case, "pyattn:auto", data)


def test_every_backend_computes_the_same_step_and_a_wrong_one_fails_the_check():
    case = DecodeCase(2, 64, 4, 2, 16, 16, torch.float32)
    data = DecodeData(case, CPU)
    bounds = data.bounds()
    for backend in ("pyattn:auto", "pyattn:torch", "pyattn:reference", "torch:sdpa"):
        errors, finite = data.check(decode_function(backend, data))
        assert finite and errors["output"] <= bounds["output"], backend
    sdpa = decode_function("torch:sdpa", data)
    errors, _ = data.check(lambda: sdpa() * 1.01)
    assert errors["output"] > bounds["output"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-decode")
    status = cli.main(["decode", "--device", "cpu", "--shapes", "tiny", "--out", str(out)])
    with open(out / "results.json") as handle:
        return status, json.load(handle), out


def test_tiny_cpu_run_gives_checked_rows_beside_sdpa(tiny_run):
    status, results, out = tiny_run
    assert status == 0
    rows = results["results"]
    cases = decode_cases("tiny", [torch.float32], [FORWARD])
    assert {row["shape"] for row in rows} == {case.shape for case in cases}
    assert {row["backend"] for row in rows} >= {"pyattn:auto", "pyattn:torch", "pyattn:reference", "torch:sdpa"}
    skipped = {entry["suite"]: entry["reason"] for entry in results["skipped_suites"]}
    assert "FlexAttention" in skipped["torch:flex"] and "pyattn:triton" in skipped
    for row in rows:
        assert row["suite"] == "decode" and row["op"] == "decode" and row["mode"] == FORWARD
        assert row["status"] == "ok" and row["check"]["passed"] and row["check"]["finite"], row
        seconds = row["time_ms"]["median"] * 1e-3
        case = row["case"]
        assert row["bytes"] == 2 * case["batch"] * case["cache_len"] * case["heads_k"] * case["head_dim"] * 4
        assert row["gbps"] == pytest.approx(row["bytes"] / seconds / 1e9)
        assert row["tokens_per_s"] == pytest.approx(case["batch"] / seconds)
        assert row["roofline_fraction"] is not None and row["dropin_baseline"] == "torch:sdpa"
        assert row["dropin"]["pyattn"] == "pyattn.flash_attention_with_kvcache"
        assert row["dropin_ratio"] is not None or row["backend"] == "torch:sdpa"
    autos = [row for row in rows if row["backend"] == "pyattn:auto"]
    assert len(autos) == len(cases) and all(row["served_by"] == "torch" for row in autos)
    assert {"decode_bandwidth.png", "decode_time.png"} <= set(results["plots"])
    table = (out / "table.txt").read_text()
    assert "pyattn.flash_attention_with_kvcache" in table and "tok/s" in table
