"""Every Triton kernel compiles for real GPUs (sm_90, sm_80), not only in the interpreter, and the configs
autotuning and dispatch may choose neither spill nor overflow shared memory.

The interpreter accepts code the compiler rejects; this compiles each AOT spec (``pyattn.kernels._aot``:
every kernel × dtype × head dim or hidden size × option set × config × alignment variant a launch can
produce, each carrying the JIT's specialisation of that launch) with ``triton.compile`` for a GPUTarget, on
this GPU-less machine. The compiles run once per (spec, arch) in a process pool before the first test, with
progress on the terminal (a cold run takes minutes), and their figures are kept under Triton's cache
directory, where ``python -m pyattn.kernels.report`` finds them too; each parametrised test then checks
its own result.
"""

from __future__ import annotations

import pytest

from tests.conftest import INTERPRET

triton = pytest.importorskip("triton", reason="triton is not installed")

pytestmark = pytest.mark.skipif(INTERPRET, reason="compiles for GPU targets; the interpreter run skips it")

OPS = ["attention", "lstm"]
CAPABILITIES = [90, 80]
# The only spills allowed in configs that may be picked, each bounded (bytes per thread) so that a regression
# still fails: (kernel name prefix, case prefix, variant, config substring, arch) -> bound. An entry here needs its
# reason in docs/attention.md ("Head dims that are not powers of two"): the two left are odd-shaped d192
# backwards at sm_80 (192 padded to 256 with masked columns, on the smallest tiles); at sm_90 nothing spills.
KNOWN_SPILLS: dict[tuple[str, str, str, str, int], int] = {
    ("attention_backward_dkdv_fused_dq", "bf16,d192,", "unaligned", "BM16,BN16,w8,s1,", 80): 16,
    ("attention_backward_dq", "fp32-ieee,d192,", "unaligned", "BM16,BN16,w4,s2,", 80): 16,
}


def _allowed_spill(spec, capability) -> int:
    for (kernel_name, case, variant, config, arch), bound in KNOWN_SPILLS.items():
        if (spec.kernel_name.startswith(kernel_name) and spec.case.startswith(case) and variant == spec.variant
                and config in spec.config + "," and arch == capability):
            return bound
    return 0


def _specs():
    if INTERPRET:  # under the interpreter there are no JIT functions to specialise
        return []
    from pyattn.kernels import _aot

    return [spec for op in OPS for spec in _aot.specs(op).values()]


SPECS = _specs()


@pytest.fixture(scope="module")
def compiled_results(pytestconfig):
    """Every (spec, arch) compiled once, before the first check; progress goes to the terminal (pytest's
    capture is suspended for it, as a cold run takes minutes)."""
    import sys

    from pyattn.kernels import _aot

    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        return _aot.compile_results(_aot.all_jobs(OPS, CAPABILITIES), progress=sys.stderr)


@pytest.mark.parametrize("capability", CAPABILITIES, ids=[f"sm{c}" for c in CAPABILITIES])
@pytest.mark.parametrize("spec", SPECS, ids=[spec.name for spec in SPECS])
def test_kernel_compiles_for_gpu(spec, capability, compiled_results):
    from pyattn.kernels._aot import SHARED_MEMORY_LIMIT

    if capability < spec.min_capability:
        pytest.skip(f"{spec.name} targets sm_{spec.min_capability}+")
    result = compiled_results[(spec.op, spec.name, capability)]
    assert result["error"] is None, f"{spec.name} does not compile for sm_{capability}: {result['error']}"
    assert result["has_cubin"], f"{spec.name}: no cubin for sm_{capability}"
    assert result["shared_bytes"] <= SHARED_MEMORY_LIMIT[capability], (
        f"{spec.name}: {result['shared_bytes']} bytes of shared memory > sm_{capability} limit "
        f"{SHARED_MEMORY_LIMIT[capability]}"
    )
    if spec.auto_may_pick:
        assert result["spill_bytes"] is not None, f"{spec.name}: no register figures (is cuobjdump missing?)"
        allowed = _allowed_spill(spec, capability)
        assert result["spill_bytes"] <= allowed, (
            f"{spec.name}: autotuning may pick this config, but it spills {result['spill_bytes']} bytes per thread "
            f"on sm_{capability} ({result['registers']} registers; allowed {allowed})"
        )


def test_specs_model_distinct_launches():
    """No two specs compile the same kernel (the same specialisation under two names)."""
    from pyattn.kernels import _aot

    keys = {}
    for spec in SPECS:
        key = _aot.spec_key(spec, 90)
        assert key not in keys, f"{spec.name} and {keys[key]} compile the same kernel"
        keys[key] = spec.name


def test_hopper_forward_uses_wgmma(compiled_results):
    """The sm_90 half-precision attention forward must use Hopper's warpgroup MMA, not only mma.sync."""
    # The bf16 d128 forwards of aligned plain calls: the main training path (their tiles give each warpgroup
    # wgmma's 64 rows; 32-row tiles, as odd-shaped or d256 calls take, fall back to mma.sync).
    forwards = [spec for spec in SPECS if spec.kernel_name in ("attention_forward", "attention_forward_tma")
                and spec.case == "bf16,d128,plain" and spec.variant == "aligned"]
    assert forwards
    for spec in forwards:
        assert compiled_results[(spec.op, spec.name, 90)]["wgmma"], f"{spec.name}: no wgmma in the sm_90 PTX"
    for spec in (spec for spec in forwards if spec.kernel_name == "attention_forward_tma"):
        assert compiled_results[(spec.op, spec.name, 90)]["tma"], f"{spec.name}: no cp.async.bulk.tensor"


def test_warp_specialized_forward_is_specialised_at_every_config(compiled_results):
    """Every config of the warp-specialised forward compiles at sm_90 into partitions (setmaxnreg: Triton's
    Hopper pass ran, rather than silently leaving one warp group), with wgmma and TMA; and every config of its
    table is compiled, aligned and with odd lengths."""
    from pyattn.kernels.attention import configs

    specs = [spec for spec in SPECS if spec.kernel_name == "attention_forward_ws"]
    for spec in specs:
        result = compiled_results[(spec.op, spec.name, 90)]
        for figure in ("warp_specialized", "wgmma", "tma"):
            assert result[figure], f"{spec.name}: no {figure} in the sm_90 PTX"
    covered = {spec.table_entry for spec in specs}
    for key, entries in configs.FORWARD_WS_CONFIGS.items():
        for variant in ("aligned", "unaligned"):
            for config in entries:
                assert ("forward_ws", key, variant, config) in covered, (key, variant, config)


def test_hopper_backward_uses_wgmma_on_64_row_tiles(compiled_results):
    """Where the tables give the sm_90 16-bit backward 64-row tiles (dQ kernel: BLOCK_M; dK/dV: BLOCK_N, the M of
    its products but the fused dQ), those kernels must use wgmma (docs/attention.md, "Schedule v3")."""
    import re

    checked = 0
    for spec in SPECS:
        if not spec.kernel_name.startswith("attention_backward_d") or spec.case.startswith("fp32"):
            continue
        block_m, block_n = (int(x) for x in re.match(r"BM(\d+),BN(\d+)", spec.config).groups())
        rows = block_m if spec.kernel_name == "attention_backward_dq" else block_n
        if rows % 64 == 0:
            checked += 1
            assert compiled_results[(spec.op, spec.name, 90)]["wgmma"], f"{spec.name}: no wgmma in the sm_90 PTX"
    assert checked


def _grid_specs():
    """The grid-barrier LSTM kernels' specs, forward and backward."""
    return [spec for spec in SPECS if spec.kernel_name in ("lstm_sequence_forward_grid", "lstm_sequence_backward_grid")]


def _grid_spec_key(spec) -> tuple[str, int]:
    """(element kind, padded H) of a grid-kernel spec, from its case ("fp16,B16,H1024") and config ("...HIDDEN1024,")."""
    import re

    kind = "fp32" if spec.case.startswith("fp32") else "16-bit"
    return kind, int(re.search(r"HIDDEN(\d+),", spec.config + ",").group(1))


@pytest.mark.parametrize("capability", CAPABILITIES, ids=[f"sm{c}" for c in CAPABILITIES])
def test_lstm_grid_table_bounds_the_compiled_kernel(capability, compiled_results):
    """Dispatch checks the grid kernels' occupancy from GRID_COMPILED (forward) and GRID_BACKWARD_COMPILED
    (backward): each entry must be at least what the compiler reports (registers, shared memory) for every spec of
    that size, or dispatch could choose a grid the launcher then refuses."""
    from pyattn.kernels.lstm import configs

    assert {spec.kernel_name for spec in _grid_specs()} == {"lstm_sequence_forward_grid", "lstm_sequence_backward_grid"}
    for spec in _grid_specs():
        kind, padded = _grid_spec_key(spec)
        result = compiled_results[(spec.op, spec.name, capability)]
        backward = spec.kernel_name == "lstm_sequence_backward_grid"
        table_name = "GRID_BACKWARD_COMPILED" if backward else "GRID_COMPILED"
        registers, shared_bytes = getattr(configs, table_name)[(capability, kind, padded)]
        assert result["registers"] <= registers and result["shared_bytes"] <= shared_bytes, (
            f"{spec.name} on sm_{capability}: {result['registers']} registers, {result['shared_bytes']} bytes of "
            f"shared memory; {table_name} says {registers}, {shared_bytes}")


def test_lstm_grid_kernel_computes_each_product_once(compiled_results):
    """No warp repeats another's tensor-core work: per warp and step (and batch tile) the 16-bit grid forward issues
    exactly its share of the (16 × H_pad) · (H_pad × 4·BLOCK_H) product, m16n8k16 instructions over (N / 8) ·
    (K slice / 16); the grid backward its share of the (16 × 4·H_pad) · (4·H_pad × BLOCK_H) product, four gates of
    (BLOCK_H / 8) · (K slice / 16)."""
    for spec in (spec for spec in _grid_specs() if _grid_spec_key(spec)[0] == "16-bit"):
        named = {spec.kernel.arg_names[path[0]]: value for path, value in spec.constexprs.items()}
        k_slice = named["HIDDEN"] // named["K_SPLIT"]
        assert named["K_SPLIT"] == spec.num_warps, f"{spec.name}: K slices != warps (warps would repeat a slice)"
        # Forward: N = 4·BLOCK_H, one K slice of H_pad; backward: N = BLOCK_H, one K slice of each gate's H_pad.
        expected = (4 * named["BLOCK_H"] // 8) * (k_slice // 16) * (named["BLOCK_B"] // 16)
        for capability in CAPABILITIES:
            result = compiled_results[(spec.op, spec.name, capability)]
            assert result.get("mma_instructions") == expected, (
                f"{spec.name} on sm_{capability}: {result.get('mma_instructions')} mma per warp, expected {expected}")


def test_register_caps_reach_the_specs():
    """A register cap in a table (attention: an entry's fifth element; LSTM: the step backward's per element kind)
    is compiled into every spec of that config, and only there: the report's figures are the capped kernel's."""
    from pyattn.kernels.lstm import configs as lstm_configs

    attention = [spec for spec in SPECS if spec.op == "attention" and spec.table_entry is not None]
    for spec in attention:
        entry = spec.table_entry[-1]
        expected = entry[4] if len(entry) > 4 else None
        assert spec.maxnreg == expected and (f",r{expected}" in spec.config) == bool(expected), spec.name
    assert any(spec.maxnreg for spec in attention)
    step_backward = [spec for spec in SPECS if spec.kernel_name == "lstm_step_backward"]
    for spec in step_backward:
        kind = "fp32" if spec.case.startswith("fp32,") else "16-bit"
        expected = lstm_configs.STEP_BACKWARD_MAXNREG.get(kind)
        assert spec.maxnreg == expected and (f",r{expected}" in spec.config) == bool(expected), spec.name
    assert any(spec.maxnreg for spec in step_backward)
    assert all(spec.maxnreg is None for spec in SPECS if spec.op == "lstm" and spec.kernel_name != "lstm_step_backward")


def test_specs_carry_the_jit_specialisation():
    """The aligned forward's pointers and strides carry tt.divisibility=16 and its unit strides are constants, as
    a launch with contiguous tensors compiles them; the unaligned one carries no divisibility hint."""
    aligned = next(spec for spec in SPECS if spec.kernel_name == "attention_forward"
                   and spec.case == "bf16,d128,plain" and spec.variant == "aligned")
    names = aligned.kernel.arg_names
    hinted = {names[path[0]] for path, attrs in aligned.attrs.items() if attrs}
    assert {"Q", "K", "V", "Out", "Lse", "stride_qm", "stride_kn", "seqlen_q", "seqlen_k"} <= hinted
    constants = {names[path[0]]: value for path, value in aligned.constexprs.items()}
    assert constants["stride_qd"] == 1 and constants["group_size"] == 1
    unaligned = next(spec for spec in SPECS if spec.kernel_name == "attention_forward"
                     and spec.case == "fp16,d128,plain" and spec.variant == "unaligned")
    names = unaligned.kernel.arg_names
    hinted = {names[path[0]] for path, attrs in unaligned.attrs.items() if attrs}
    assert not hinted & {"Q", "K", "V", "stride_qm", "stride_qh", "stride_kn", "seqlen_q", "seqlen_k", "group_size"}


def test_every_attention_config_autotuning_may_pick_is_compiled():
    """Each (table, entry, alignment, config) the attention autotuner can choose is compiled by some spec of each
    kernel that reads that table (the TMA forward: the aligned 16-bit forward entries)."""
    from pyattn.kernels.attention import configs

    covered = {(spec.kernel_name, *spec.table_entry) for spec in SPECS if spec.table_entry is not None}
    readers = {"forward": ["attention_forward"], "dq": ["attention_backward_dq"],
               "dkdv": ["attention_backward_dkdv", "attention_backward_dkdv_fused_dq"]}
    for table_name, (aligned_table, unaligned_table) in configs.TABLES.items():
        for key, entries in aligned_table.items():
            for alignment, listed in (("aligned", entries), ("unaligned", unaligned_table.get(key, entries))):
                kernels = readers[table_name] + (["attention_forward_tma"] if table_name == "forward" and
                                                  alignment == "aligned" and key[0] == "16-bit" else [])
                for kernel_name in kernels:
                    for config in listed:
                        assert (kernel_name, table_name, key, alignment, config) in covered, (
                            f"{kernel_name}: {table_name} entry {key} ({alignment}) config {config} is never compiled")
