"""A simulated timeline of pyattn's ring attention on W GPUs: compute against K/V transfers, per step.

Nothing here is measured. Kernel throughput (TFLOP/s) and link bandwidth/latency are parameters
(defaults: assumptions for H100 SXM, bf16, head dim 128, stated in docs/distributed.md), or the
throughput comes from a pyattn-bench ``results.json`` measured on a GPU (``--results``). The block
structure is the implementation's own (``pyattn.distributed.blocks.plan_step``), so the work each
rank does at each step is exactly what ring_attention would launch.

Model. Ranks are ordered node by node (``--gpus-per-node``); hop r -> r+1 is NVLink inside a node
and InfiniBand between nodes. A transfer starts when both ends have posted it (send and receive
are posted together, as ``batch_isend_irecv`` does) and the link is free (one transfer at a time per
link and direction), and takes latency + bytes / bandwidth. Forward, per step: post the next K/V,
compute this step's blocks, wait for the K/V to arrive (and the own send to leave). Backward:
post the next K/V, compute, wait for the incoming dK/dV partial, post it on, wait for the K/V; dK/dV
travel in fp32 (as implemented). A block costs its visible pairs × 4·D·H·B FLOPs (backward 2.5×)
at the given throughput, plus a fixed launch overhead per call.

    python benchmarks/ring_simulation.py                       # the table in docs/distributed.md
    python benchmarks/ring_simulation.py --kv-heads 32 --ib-gbps 25 --forward-tflops 650
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyattn.distributed.blocks import Block, plan_step, shard_spans  # noqa: E402


@dataclass(frozen=True)
class Hardware:
    forward_tflops: float = 400.0  # assumed attention kernel throughput (bf16, hd128, H100), not measured
    backward_tflops: float = 300.0
    nvlink_gbps: float = 450.0  # per direction, H100 NVLink 4
    ib_gbps: float = 50.0  # per GPU (one 400 Gb/s NIC)
    nvlink_latency_us: float = 5.0
    ib_latency_us: float = 15.0
    launch_us: float = 5.0  # per attention call
    gpus_per_node: int = 8


@dataclass(frozen=True)
class Model:
    batch: int = 1
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    element_bytes: int = 2  # bf16
    causal: bool = True
    sharding: str = "zigzag"


def visible_pairs(block: Block) -> int:
    """Visible (query, key) pairs of one planned call (full, or causal without a left window)."""
    rows, cols = block.rows.stop - block.rows.start, block.cols.stop - block.cols.start
    if block.full:
        return rows * cols
    if block.window != (-1, -1):
        raise ValueError("the simulation counts full and causal blocks; windows are not modelled")
    # bottom-right causal: row i sees min(cols, i + cols - rows + 1) keys, and none while that is <= 0
    if rows <= cols:
        return rows * (cols - rows) + rows * (rows + 1) // 2
    return cols * (cols + 1) // 2


def _hop_link(rank: int, world_size: int, hardware: Hardware) -> str:
    nxt = (rank + 1) % world_size
    return "nvlink" if rank // hardware.gpus_per_node == nxt // hardware.gpus_per_node else "ib"


def _transfer_time(link: str, nbytes: float, hardware: Hardware) -> float:
    if link == "nvlink":
        return hardware.nvlink_latency_us * 1e-6 + nbytes / (hardware.nvlink_gbps * 1e9)
    return hardware.ib_latency_us * 1e-6 + nbytes / (hardware.ib_gbps * 1e9)


def simulate(tokens: int, world_size: int, model: Model = Model(), hardware: Hardware = Hardware()) -> dict:
    """Forward and backward wall time of one ring attention call (one layer), and its compute-only bound."""
    shard = tokens // world_size
    right = 0 if model.causal else -1
    spans = [shard_spans(model.sharding, r, world_size, shard) for r in range(world_size)]
    flops_per_pair = 4 * model.head_dim * model.heads * model.batch
    # compute seconds and calls per (rank, step), from the implementation's own block plan
    work = [[plan_step(spans[r], spans[(r - s) % world_size], -1, right) for s in range(world_size)]
            for r in range(world_size)]
    pairs = [[sum(visible_pairs(b) for b in steps) for steps in row] for row in work]
    calls = [[len(steps) for steps in row] for row in work]
    kv_bytes = 2 * model.batch * shard * model.kv_heads * model.head_dim * model.element_bytes
    dkv_bytes = 2 * model.batch * shard * model.kv_heads * model.head_dim * 4  # fp32 accumulators
    links = [_hop_link(r, world_size, hardware) for r in range(world_size)]

    def compute(r, s, tflops, factor):
        return pairs[r][s] * flops_per_pair * factor / (tflops * 1e12) + calls[r][s] * hardware.launch_us * 1e-6

    def run(backward: bool) -> float:
        tflops, factor = (hardware.backward_tflops, 2.5) if backward else (hardware.forward_tflops, 1.0)
        start = [0.0] * world_size
        link_free = [0.0] * world_size  # hop r -> r+1
        gradient_arrival = [0.0] * world_size  # when the dK/dV partial for this step reaches rank r
        finish = [0.0] * world_size

        def send(r, posted, nbytes):
            begin = max(posted, link_free[r])
            link_free[r] = begin + _transfer_time(links[r], nbytes, hardware)
            return link_free[r]

        for s in range(world_size):
            kv_done = [0.0] * world_size  # arrival of the next K/V at rank r (and own send finished)
            if s + 1 < world_size:
                arrivals = [send(r, max(start[r], start[(r + 1) % world_size]), kv_bytes) for r in range(world_size)]
                kv_done = [max(arrivals[(r - 1) % world_size], arrivals[r]) for r in range(world_size)]
            computed = [start[r] + compute(r, s, tflops, factor) for r in range(world_size)]
            if backward:
                ready = [max(computed[r], gradient_arrival[r] if s > 0 else 0.0) for r in range(world_size)]
                sent = [send(r, max(ready[r], ready[(r + 1) % world_size]), dkv_bytes) for r in range(world_size)]
                gradient_arrival = [sent[(r - 1) % world_size] for r in range(world_size)]
                computed = ready
            finish = computed
            start = [max(computed[r], kv_done[r]) for r in range(world_size)]
        if backward:
            finish = [max(finish[r], gradient_arrival[r]) for r in range(world_size)]
        return max(finish)

    compute_only = {name: sum(max(compute(r, s, *args) for r in range(world_size)) for s in range(world_size))
                    for name, args in (("forward", (hardware.forward_tflops, 1.0)),
                                       ("backward", (hardware.backward_tflops, 2.5)))}
    slowest = "ib" if "ib" in links else "nvlink"
    step_compute = max(compute(r, 1 % world_size, hardware.forward_tflops, 1.0) for r in range(world_size))
    forward, backward = run(False), run(True)
    return dict(tokens=tokens, gpus=world_size, tokens_per_gpu=shard, slowest_hop=slowest,
                kv_bytes_per_hop=kv_bytes, step_compute_ms=step_compute * 1e3,
                step_transfer_ms=_transfer_time(slowest, kv_bytes, hardware) * 1e3,
                forward_ms=forward * 1e3, backward_ms=backward * 1e3,
                compute_only_ms=(compute_only["forward"] + compute_only["backward"]) * 1e3,
                efficiency=(compute_only["forward"] + compute_only["backward"]) / (forward + backward))


def throughput_from_results(path: str) -> tuple[float, float]:
    """The best measured bf16 attention TFLOP/s (forward, backward) of a pyattn-bench results.json from a GPU."""
    data = json.loads(Path(path).read_text())
    if data.get("environment", {}).get("device_type") != "cuda":
        raise SystemExit(f"{path}: not a GPU run; its times say nothing about a GPU's kernels")
    best = {"forward": 0.0, "backward": 0.0}
    for row in data.get("results", []):
        if (row.get("op") == "attention" and row.get("status") == "ok" and row.get("dtype") == "bf16"
                and row.get("mode") in best and row.get("tflops") and str(row.get("backend", "")).startswith("pyattn")):
            best[row["mode"]] = max(best[row["mode"]], float(row["tflops"]))
    if not all(best.values()):
        raise SystemExit(f"{path}: no bf16 pyattn attention forward and backward rows with tflops")
    return best["forward"], best["backward"]


def _table(rows: list[dict]) -> str:
    header = (f"{'tokens':>7} {'GPUs':>4} {'tok/GPU':>8} {'hop':>6} {'K/V MB/hop':>10} {'step fwd ms':>11} "
              f"{'hop ms':>7} {'fwd ms':>8} {'bwd ms':>8} {'compute-only ms':>15} {'efficiency':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['tokens'] // 1024:>6}k {r['gpus']:>4} {r['tokens_per_gpu']:>8} {r['slowest_hop']:>6} "
                     f"{r['kv_bytes_per_hop'] / 1e6:>10.1f} {r['step_compute_ms']:>11.3f} "
                     f"{r['step_transfer_ms']:>7.3f} {r['forward_ms']:>8.2f} {r['backward_ms']:>8.2f} "
                     f"{r['compute_only_ms']:>15.2f} {r['efficiency']:>9.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="131072,262144,524288,1048576", help="whole sequence lengths")
    parser.add_argument("--gpus", default="8,16,32,64", help="ring sizes")
    parser.add_argument("--heads", type=int, default=Model.heads)
    parser.add_argument("--kv-heads", type=int, default=Model.kv_heads)
    parser.add_argument("--head-dim", type=int, default=Model.head_dim)
    parser.add_argument("--batch", type=int, default=Model.batch)
    parser.add_argument("--non-causal", action="store_true")
    parser.add_argument("--sharding", default="zigzag", choices=("zigzag", "contiguous"))
    parser.add_argument("--forward-tflops", type=float, default=Hardware.forward_tflops, help="assumed, not measured")
    parser.add_argument("--backward-tflops", type=float, default=Hardware.backward_tflops)
    parser.add_argument("--results", help="take the TFLOP/s from a pyattn-bench results.json measured on a GPU")
    parser.add_argument("--nvlink-gbps", type=float, default=Hardware.nvlink_gbps)
    parser.add_argument("--ib-gbps", type=float, default=Hardware.ib_gbps)
    parser.add_argument("--nvlink-latency-us", type=float, default=Hardware.nvlink_latency_us)
    parser.add_argument("--ib-latency-us", type=float, default=Hardware.ib_latency_us)
    parser.add_argument("--launch-us", type=float, default=Hardware.launch_us)
    parser.add_argument("--gpus-per-node", type=int, default=Hardware.gpus_per_node)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    forward, backward, source = args.forward_tflops, args.backward_tflops, "ASSUMED (parameters)"
    if args.results:
        forward, backward = throughput_from_results(args.results)
        source = f"measured, from {args.results}"
    hardware = Hardware(forward, backward, args.nvlink_gbps, args.ib_gbps, args.nvlink_latency_us,
                        args.ib_latency_us, args.launch_us, args.gpus_per_node)
    model = Model(args.batch, args.heads, args.kv_heads, args.head_dim, 2, not args.non_causal, args.sharding)
    rows = [simulate(int(t), int(w), model, hardware) for t in args.tokens.split(",") for w in args.gpus.split(",")]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"SIMULATED, not measured. Attention {forward:g}/{backward:g} TFLOP/s fwd/bwd: {source}. "
          f"Links: NVLink {hardware.nvlink_gbps:g} GB/s + {hardware.nvlink_latency_us:g} us, IB {hardware.ib_gbps:g} "
          f"GB/s + {hardware.ib_latency_us:g} us, {hardware.gpus_per_node} GPUs/node; {hardware.launch_us:g} us/call.")
    print(f"One layer: batch {model.batch}, {model.heads} heads ({model.kv_heads} K/V), head dim {model.head_dim}, "
          f"bf16, {'causal' if model.causal else 'non-causal'}, {model.sharding} shards; dK/dV hop in fp32.")
    print(_table(rows))


if __name__ == "__main__":
    main()
