"""``pyattn-bench`` (also ``python -m pyattn.bench``): pyattn's backends against PyTorch's own kernels.

    pyattn-bench                                  # every suite, default shapes (small on a CPU)
    pyattn-bench attention --dtype bf16,fp16 --shapes full --out bench-out
    pyattn-bench lstm --backends triton --baselines lstm --no-check
    pyattn-bench --device cpu --interpret         # Triton kernels under the interpreter: correctness only

Writes ``OUT/results.json``, ``OUT/table.txt`` and PNG plots; prints the roofline and the table.
Exits 1 when a pyattn backend errs or fails its check (baselines' failures are reported, not fatal).
See docs/benchmarking.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import os
import sys

from pyattn.bench.flops import MODES
from pyattn.bench.suites import BASELINES, DTYPES, PYATTN_BACKENDS, SHAPE_SETS, SUITES


def _list_of(choices, allow_none: bool = False):
    """argparse type: a comma-separated subset of ``choices`` (argparse names the flag in its error)."""

    def parse(text: str) -> list[str]:
        values = [value.strip() for value in text.split(",") if value.strip()]
        if allow_none and values == ["none"]:
            return []
        unknown = [value for value in values if value not in choices]
        if unknown or not values:
            expected = ", ".join(choices) + (", or none" if allow_none else "")
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, unknown)) or 'empty list'}; expected a comma-separated list of {expected}"
            )
        return list(dict.fromkeys(values))

    return parse


def _suite(text: str) -> str:
    # A type check rather than ``choices``: argparse checks an empty ``nargs="*"`` against choices too.
    if text not in SUITES:
        raise argparse.ArgumentTypeError(f"unknown suite {text!r}; expected one of {', '.join(SUITES)}")
    return text


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyattn-bench",
        description="Benchmark pyattn's backends against PyTorch's own kernels (see docs/benchmarking.md).",
    )
    add = parser.add_argument
    add("suites", nargs="*", type=_suite, metavar="SUITE", help=f"of {', '.join(SUITES)} (default: all)")
    add(
        "--dtype",
        type=_list_of(tuple(DTYPES)),
        help="comma-separated, of fp32, fp16, bf16 "
        "(default: bf16 on a GPU, bf16,fp16 with --shapes full; fp32 on a CPU)",
    )
    add(
        "--shapes",
        choices=SHAPE_SETS,
        help="small: tiny, < 1 min on a CPU; default: ~5 min on an H100; full: "
        "the whole grid (default: default on a GPU, small on a CPU)",
    )
    add(
        "--modes",
        type=_list_of(MODES),
        default=list(MODES),
        help=f"comma-separated, of {', '.join(MODES)} (default: all; the LSTM has no backward-only figure)",
    )
    add(
        "--backends",
        type=_list_of(PYATTN_BACKENDS, allow_none=True),
        default=list(PYATTN_BACKENDS),
        help=f"pyattn backends, of {', '.join(PYATTN_BACKENDS)}, or none (default: all that are available)",
    )
    add(
        "--baselines",
        type=_list_of(BASELINES, allow_none=True),
        help=f"PyTorch's, of {', '.join(BASELINES)}, or "
        "none (default: all that run on the device; flex only with --shapes full)",
    )
    add("--out", default="bench-out", help="folder for results.json, table.txt and the plots (default: bench-out)")
    add(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="verify each result against a float64 reference before timing it (default: on)",
    )
    add("--device", choices=("cuda", "cpu"), help="(default: cuda when torch sees a GPU, else cpu)")
    add(
        "--interpret",
        action="store_true",
        help="on a CPU, run the Triton backend under the Triton interpreter: checked, never timed",
    )
    add(
        "--time-budget",
        type=_positive_seconds,
        metavar="SECONDS",
        help="start no new case after this long; the rest is recorded as not run",
    )
    return parser


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device on this machine")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if args.interpret:
        if device.type == "cuda":
            parser.error("--interpret runs Triton kernels on CPU tensors: add --device cpu")
        if not _interpreter_on():
            if "triton" in sys.modules:  # the interpreter is chosen when triton is imported
                if argv is None:  # the real command line: start again with the variable set
                    os.execve(
                        sys.executable,
                        [sys.executable, "-m", "pyattn.bench", *sys.argv[1:]],
                        {**os.environ, "TRITON_INTERPRET": "1"},
                    )
                parser.error(
                    "--interpret: triton is already imported in this process; set TRITON_INTERPRET=1 before starting it"
                )
            os.environ["TRITON_INTERPRET"] = "1"
    from pyattn.bench.session import Session

    session = Session(args, device, argv if argv is not None else sys.argv[1:])
    return session.run()


if __name__ == "__main__":
    raise SystemExit(main())
