"""Compile report: every kernel specialisation with its registers, spills, shared memory and occupancy.

    python -m pyattn.kernels.report [--op attention|lstm|decode] [--arch sm_90|sm_80] [--json]

One row per (kernel, case, variant, config, arch) of the AOT specs (``pyattn.kernels._aot``), compiled as the
JIT compiles the launch each models, plus the CUDA kernels of the C++ extension ``pyattn._C`` (variant
"cuda", op from their namespace: the LSTM's and the attention's) read from its library with ``cuobjdump``. Columns: registers per thread, spill (stack and
local) bytes per thread, shared memory per block, blocks (CTAs) resident per SM from registers, shared
memory and warps on that arch, the static count of tensor-core MMA instructions (``mma.sync`` and ``wgmma`` in
the PTX; per warp and step for the LSTM grid kernel, whose time loop holds them all), whether the PTX (SASS for
the extension) has ``wgmma``, TMA bulk tensor
copies (``cp.async.bulk.tensor``) and Ampere ``cp.async``, and ``auto_may_pick``: whether autotuning or
dispatch can choose that config (from the config tables the launchers use).

Compiles share the compile test's cache (under Triton's cache directory): a warm report takes seconds,
a cold one minutes, with progress on stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys

from . import _aot

ARCHS = {"sm_90": 90, "sm_80": 80}
COLUMNS = ["op", "kernel", "case", "variant", "config", "arch", "registers", "spill_bytes", "shared_bytes",
           "ctas_per_sm", "mma_instructions", "wgmma", "tma", "cp_async", "warp_specialized", "auto_may_pick"]
# Every CUDA kernel of the extension runs 128 threads per block (csrc/lstm: 4 warps everywhere).
CUDA_WARPS = 4


def triton_rows(ops, capabilities, *, progress=None) -> list[dict]:
    jobs = _aot.all_jobs(ops, capabilities)
    results = _aot.compile_results(jobs, progress=progress)
    rows = []
    for op, name, capability in jobs:
        spec = _aot.specs(op)[name]
        result = results[(op, name, capability)]
        row = dict(op=op, kernel=spec.kernel_name, case=spec.case, variant=spec.variant, config=spec.config,
                   arch=f"sm_{capability}", auto_may_pick=spec.auto_may_pick, error=result.get("error"))
        for key in ("registers", "spill_bytes", "shared_bytes", "ctas_per_sm", "mma_instructions", "wgmma", "tma",
                    "cp_async", "warp_specialized"):
            row[key] = result.get(key)
        rows.append(row)
    return rows


def extension_library() -> str | None:
    """The built ``pyattn._C`` library (``make build``), found without importing it; None if it is not built."""
    try:
        spec = importlib.util.find_spec("pyattn._C")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and spec.origin.endswith(".so") else None


def _demangle(names: list[str]) -> dict[str, str]:
    try:
        text = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {name: name for name in names}
    return dict(zip(names, text.splitlines()))


def _sass_features(library: str) -> dict[tuple[str, str], dict]:
    """(arch, mangled function) -> whether its SASS has HGMMA (wgmma), UTMALDG (TMA) and LDGSTS (cp.async), and its
    static count of HMMA/HGMMA instructions."""
    tool = _aot.cuobjdump_path()
    text = subprocess.run([tool, "-sass", library], capture_output=True, text=True, check=True).stdout
    features, arch, function, body = {}, None, None, []

    def close():
        if function is not None:
            joined = "\n".join(body)
            features[(arch, function)] = dict(wgmma="HGMMA" in joined, tma="UTMALDG" in joined,
                                              cp_async="LDGSTS" in joined,
                                              mma_instructions=len(re.findall(r"\bH(?:G)?MMA\.", joined)))

    for line in text.splitlines():
        arch_match = re.match(r"\s*arch = sm_(\w+)", line)
        function_match = re.match(r"\s*Function : (\S+)", line)
        if arch_match or function_match:
            close()
            body = []
            if arch_match:
                arch, function = arch_match.group(1), None
            else:
                function = function_match.group(1)
        else:
            body.append(line)
    close()
    return features


def cuda_rows(ops, capabilities) -> tuple[list[dict], str | None]:
    """Rows of the extension's kernels, and a note when the extension (or cuobjdump) is missing."""
    library = extension_library()
    if library is None:
        return [], "pyattn._C is not built (make build): its CUDA kernels are not in this report"
    if _aot.cuobjdump_path() is None:
        return [], "no cuobjdump found: the CUDA kernels of pyattn._C are not in this report"
    usage = _aot.resource_usage(library)
    features = _sass_features(library)
    names = _demangle(sorted({row["function"] for row in usage}))
    rows = []
    for entry in usage:
        capability = int(re.sub(r"\D", "", entry["arch"]))
        if capability not in capabilities:
            continue
        readable = names.get(entry["function"], entry["function"])
        # "void pyattn::<op>::<kernel><template arguments>(parameters)"
        match = re.match(r"(?:void )?(?:pyattn::(\w+)::)?(?:[\w:]*::)?(\w+)(?:<(.*)>)?\(", readable)
        op, kernel, config = (match.group(1) or "lstm", match.group(2), match.group(3) or "") if match else (
            "lstm", readable, "")
        if op not in ops:
            continue
        config = re.sub(r"pyattn::\w+::", "", config)
        flags = features.get((entry["arch"], entry["function"]), {})
        rows.append(dict(op=op, kernel=kernel, case="", variant="cuda", config=config.replace(" ", ""),
                         arch=f"sm_{entry['arch']}", registers=entry["registers"],
                         spill_bytes=entry["stack_bytes"] + entry["local_bytes"],
                         shared_bytes=None,  # dynamic, sized by the launcher
                         ctas_per_sm=_aot.blocks_per_sm(capability, entry["registers"], None, CUDA_WARPS),
                         mma_instructions=flags.get("mma_instructions"), wgmma=flags.get("wgmma"),
                         tma=flags.get("tma"), cp_async=flags.get("cp_async"), warp_specialized=False,
                         auto_may_pick=True, error=None))  # every instantiated template is reachable
    return rows, None


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def format_table(rows: list[dict]) -> str:
    headers = ["op", "kernel", "case", "variant", "config", "arch", "regs", "spill", "shared", "ctas/SM", "mma",
               "wgmma", "tma", "cp.async", "ws", "auto"]
    keys = ["op", "kernel", "case", "variant", "config", "arch", "registers", "spill_bytes", "shared_bytes",
            "ctas_per_sm", "mma_instructions", "wgmma", "tma", "cp_async", "warp_specialized", "auto_may_pick"]
    table = [headers] + [[_cell(row[key]) if not row.get("error") or key in keys[:6] else "ERROR" for key in keys]
                         for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyattn.kernels.report", description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=["attention", "lstm", "decode"], help="only this op's kernels (default: all)")
    parser.add_argument("--arch", choices=sorted(ARCHS), help="only this target (default: sm_90 and sm_80)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of row objects")
    args = parser.parse_args(argv)
    ops = [args.op] if args.op else ["attention", "lstm", "decode"]
    capabilities = [ARCHS[args.arch]] if args.arch else [90, 80]
    rows = triton_rows(ops, capabilities, progress=sys.stderr)
    extension, note = cuda_rows(ops, capabilities)
    rows += extension
    if note:
        print(f"[pyattn report] {note}", file=sys.stderr)
    try:
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            print(format_table(rows))
            if note:
                print(f"\nnote: {note}")
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into head: the reader has what it wanted
        sys.stdout = None
    return 1 if any(row.get("error") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
