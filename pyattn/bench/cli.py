"""``pyattn-bench`` (also ``python -m pyattn.bench``): pyattn's backends against PyTorch's own kernels.

    pyattn-bench                                  # every suite, default shapes (small on a CPU)
    pyattn-bench attention --dtype bf16,fp16 --shapes full --out bench-out
    pyattn-bench lstm --backends auto,triton --baselines lstm --no-check
    pyattn-bench --device cpu --interpret         # Triton kernels under the interpreter: correctness only

Suites, their baselines and their plots come from :mod:`pyattn.bench.registry`; pyattn's backends
from ``pyattn.backend_status()`` at run time. Writes ``OUT/results.json``, ``OUT/table.txt`` and PNG
plots; prints the roofline, the drop-in summary (pyattn:auto against the PyTorch call it replaces)
and the table.
Exits 1 when a pyattn backend errs or fails its check (baselines' failures are reported, not fatal).
See docs/benchmarking.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import os
import sys

from pyattn.bench.flops import MODES
from pyattn.bench.registry import DTYPES, SHAPE_SETS, all_baselines, suite_names


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
    if text not in suite_names():
        raise argparse.ArgumentTypeError(f"unknown suite {text!r}; expected one of {', '.join(suite_names())}")
    return text


def _backend_names() -> tuple[str, ...]:
    from pyattn.bench.session import pyattn_backend_status

    return ("auto", *pyattn_backend_status())


def _backends(text: str) -> list[str]:
    """argparse type: "auto", pyattn backends ("triton") or variants ("triton/tma"), or none."""
    values = [value.strip() for value in text.split(",") if value.strip()]
    if values == ["none"]:
        return []
    known = _backend_names()
    unknown = [value for value in values if value.split("/", 1)[0] not in known or value.endswith("/")]
    if unknown or not values:
        raise argparse.ArgumentTypeError(
            f"unknown {', '.join(map(repr, unknown)) or 'empty list'}; expected a comma-separated list of "
            f"{', '.join(known)}, a variant such as triton/pointer, or none"
        )
    return list(dict.fromkeys(values))


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a thread count >= 0 (0: torch's default), got {text!r}")
    return value


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
    add("suites", nargs="*", type=_suite, metavar="SUITE", help=f"of {', '.join(suite_names())} (default: all)")
    add(
        "--dtype",
        type=_list_of(tuple(DTYPES)),
        help="comma-separated, of fp32, fp16, bf16 "
        "(default: bf16 on a GPU, bf16,fp16 with --shapes full; fp32 on a CPU)",
    )
    add(
        "--shapes",
        choices=SHAPE_SETS,
        help="tiny: structure only (tests, seconds); small: each drop-in at one realistic shape beside "
        "PyTorch (the CPU set, minutes); default: ~5 min on an H100; full: the whole grid "
        "(default: default on a GPU, small on a CPU)",
    )
    add(
        "--modes",
        type=_list_of(MODES),
        default=list(MODES),
        help=f"comma-separated, of {', '.join(MODES)} (default: all; the LSTM has no backward-only figure)",
    )
    add(
        "--backends",
        type=_backends,
        help="pyattn's, comma-separated: auto (what a user gets), a backend (cuda, triton, torch, reference: "
        "whichever this pyattn has), a variant (triton/tma), or none (default: auto and every backend "
        "available here, and on a GPU the variants auto passes over until timed, such as triton/ws)",
    )
    add(
        "--baselines",
        type=_list_of(all_baselines(), allow_none=True),
        help=f"PyTorch's, of {', '.join(all_baselines())}, or "
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
        "--threads",
        type=_threads,
        help="CPU runs: torch's intra-op threads (default 1: on a shared machine a parallel op waits for "
        "preempted worker threads, which swamps the figures; 0: torch's default)",
    )
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
