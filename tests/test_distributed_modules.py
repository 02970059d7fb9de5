"""pyattn's modules under DDP and FSDP2 (``fully_shard``) on CPU ranks (gloo): training equals one process.

One launch per world size runs every case inside (fresh processes on 127.0.0.1, with a deadline).
Each rank builds the same model from one seed and trains it for a few SGD steps on its slice of
the batch (DDP, FSDP2) or its zigzag shard of the sequence (context parallel); it also trains the
same model in one process on the whole batch, and reports the relative error of the losses and of
every parameter after training (float32 bound 1e-5). The model mixes every module:
``pyattn.nn.LSTM`` → ``pyattn.nn.MultiheadAttention`` → ``pyattn.nn.LSTMCell`` over time → a head.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
from torch import nn

import pyattn
from pyattn.distributed import ContextParallelAttention, shard_sequence
from pyattn.distributed.testing import run_on_local_ranks
from tests.conftest import deadline, RTOL, random_tensor, relative_error

ROOT = str(Path(__file__).resolve().parents[1])
WORKER = "tests.test_distributed_modules"
STEPS, LOCAL_BATCH, LENGTH, FEATURES, HIDDEN, HEADS = 3, 2, 5, 4, 8, 2


class TinyModel(nn.Module):
    """Every pyattn module once: LSTM over the sequence, self-attention, an LSTMCell stepped over time."""

    def __init__(self):
        super().__init__()
        self.lstm = pyattn.nn.LSTM(FEATURES, HIDDEN, batch_first=True)
        self.attention = pyattn.nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)
        self.cell = pyattn.nn.LSTMCell(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        y, _ = self.lstm(x)
        a, _ = self.attention(y, y, y, need_weights=False)
        h = c = a.new_zeros(a.shape[0], HIDDEN)
        for t in range(a.shape[1]):
            h, c = self.cell(a[:, t] + y[:, t], (h, c))
        return self.head(h)


class AttentionBlock(nn.Module):
    """Per-token layers around self-attention: what context parallelism shards along the sequence."""

    def __init__(self, attention, **attention_options):
        super().__init__()
        self.embed = nn.Linear(FEATURES, HIDDEN)
        self.attention = attention
        self.attention_options = attention_options
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        h = self.embed(x)
        a, _ = self.attention(h, h, h, need_weights=False, **self.attention_options)
        return self.head(torch.tanh(a) + h)


def _train(model, batches) -> list[torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    losses = []
    for x, target in batches:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def _full(parameter: torch.Tensor) -> torch.Tensor:
    return parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter


def _compare(losses, expected_losses, model, expected_model, world_size) -> dict[str, float]:
    """Losses: every rank's local loss averaged over ranks (the global mean) vs the single process's."""
    local = torch.stack(losses)
    dist.all_reduce(local)
    errors = {"loss": relative_error(local / world_size, torch.stack(expected_losses))}
    parameters = [relative_error(_full(p).detach(), e.detach())
                  for p, e in zip(model.parameters(), expected_model.parameters(), strict=True)]
    errors["parameters"] = max(parameters)
    return errors


def _data_parallel_batches(rank: int, world_size: int, generator):
    """STEPS global batches; this rank's slice of each, and the whole ones."""
    whole = [(random_tensor(LOCAL_BATCH * world_size, LENGTH, FEATURES, generator=generator),
              random_tensor(LOCAL_BATCH * world_size, 1, generator=generator)) for _ in range(STEPS)]
    mine = [(x[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH], y[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH])
            for x, y in whole]
    return mine, whole


_DDP_WRAPPER_BREAKS = ("DistributedDataParallel._inside_ddp_forward", "set_runtime_stats_and_log")


def _ddp_case(rank, world_size, *, compiler: str | None = None, backend: str = "auto"):
    """DDP training; with ``compiler``, of ``torch.compile(DDP(model), backend=compiler)`` (one DDP bucket, so
    DDP's graph splitting makes one graph), counting Dynamo's graph breaks."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    expected_model = TinyModel()
    model = copy.deepcopy(expected_model)
    mine, whole = _data_parallel_batches(rank, world_size, torch.Generator().manual_seed(1))
    errors = {}
    with pyattn.use_backend(backend):
        expected_losses = _train(expected_model, whole)
        wrapped = DistributedDataParallel(model, bucket_cap_mb=100)
        if compiler is not None:
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            wrapped = torch.compile(wrapped, backend=compiler)
        losses = _train(wrapped, mine)
    if compiler is not None:
        # DDP's own forward breaks the outer frame on purpose (Dynamo skips its wrapper and compiles the
        # module inside, split by bucket); any other break would be in the model, i.e. in pyattn.
        reasons = [reason for reason in torch._dynamo.utils.counters["graph_break"]
                   if not any(marker in reason for marker in _DDP_WRAPPER_BREAKS)]
        errors["graph_breaks"] = float(len(reasons))
        errors["graph_break_reasons"] = reasons
    errors.update(_compare(losses, expected_losses, model, expected_model, world_size))
    return errors


def _fsdp_case(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    expected_model = TinyModel()
    model = copy.deepcopy(expected_model)
    mine, whole = _data_parallel_batches(rank, world_size, torch.Generator().manual_seed(2))
    with pyattn.use_backend("reference"):  # pyattn's own implementations, not torch's, behind every module
        expected_losses = _train(expected_model, whole)
        mesh = init_device_mesh("cpu", (world_size,))
        for module in (model.lstm, model.attention, model.cell):
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        losses = _train(model, mine)
    return _compare(losses, expected_losses, model, expected_model, world_size)


def _context_parallel_case(rank, world_size, *, wrapper: str):
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    attention = pyattn.nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)
    length = 4 * world_size
    causal_mask = torch.ones(length, length, dtype=torch.bool).triu(1)  # torch MHA: True = may not attend
    expected_model = AttentionBlock(attention, attn_mask=causal_mask, is_causal=True)
    ring_group = dist.new_group(list(range(world_size)))  # the ring's own group, apart from DDP/FSDP's
    model = AttentionBlock(ContextParallelAttention(copy.deepcopy(attention), ring_group, causal=True,
                                                    sharding="zigzag"))
    model.embed.load_state_dict(expected_model.embed.state_dict())
    model.head.load_state_dict(expected_model.head.state_dict())
    generator = torch.Generator().manual_seed(3)
    whole = [(random_tensor(2, length, FEATURES, generator=generator), random_tensor(2, length, 1, generator=generator))
             for _ in range(STEPS)]
    mine = [tuple(shard_sequence(t, rank, world_size, dim=1, sharding="zigzag") for t in batch) for batch in whole]
    expected_losses = _train(expected_model, whole)
    if wrapper == "ddp":
        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        wrapped = fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    losses = _train(wrapped, mine)
    return _compare(losses, expected_losses, model, expected_model, world_size)


CASES = {
    "ddp": _ddp_case,
    "fsdp2 (reference backend)": _fsdp_case,
    "context parallel + ddp": functools.partial(_context_parallel_case, wrapper="ddp"),
    "context parallel + fsdp2": functools.partial(_context_parallel_case, wrapper="fsdp2"),
    # aot_eager traces through pyattn's dispatch into the reference's plain PyTorch; "eager" keeps the
    # torch backend's _VF.lstm, which AOT autograd cannot trace on CPU (test_compiled_lstm_... below).
    "compiled ddp (aot_eager, reference backend)": functools.partial(_ddp_case, compiler="aot_eager",
                                                                     backend="reference"),
    "compiled ddp (eager, auto backend)": functools.partial(_ddp_case, compiler="eager"),
}
# torch.compile costs most of a launch's time: run it on the smaller ring only.
CASES_AT = {2: list(CASES), 4: [name for name in CASES if "compiled" not in name]}


def modules_worker(rank: int, world_size: int) -> dict:
    return {name: CASES[name](rank, world_size) for name in CASES_AT[world_size]}


# One launch per world size for every test of this file: its result, or its failure (lru_cache would not
# keep an exception, and every parametrised test would relaunch after a timeout).
_LAUNCHES: dict[int, object] = {}


def _results(world_size: int) -> list[dict]:
    if world_size not in _LAUNCHES:
        try:
            _LAUNCHES[world_size] = run_on_local_ranks(f"{WORKER}:modules_worker", world_size, timeout=deadline(180), pythonpath=(ROOT,))
        except Exception as error:  # noqa: BLE001  (re-raised for each test that needs this launch)
            _LAUNCHES[world_size] = error
    if isinstance(_LAUNCHES[world_size], Exception):
        raise _LAUNCHES[world_size]
    return _LAUNCHES[world_size]


@pytest.mark.parametrize("world_size,case", [(w, name) for w, names in CASES_AT.items() for name in names])
def test_training_equals_single_process(case, world_size):
    for rank, result in enumerate(_results(world_size)):
        errors = result[case]
        for name in ("loss", "parameters"):
            assert errors[name] <= RTOL[torch.float32], (
                f"{case}, rank {rank} of {world_size}: {name} relative error {errors[name]:.2e}")
        if "graph_breaks" in errors:
            assert errors["graph_breaks"] == 0, f"graph breaks: {errors['graph_break_reasons']}"


def test_compiled_lstm_under_auto_and_what_a_forced_torch_backend_says():
    """In one process: pyattn.nn.LSTM under torch.compile(backend="aot_eager"). torch 2.14's _VF.lstm does not
    trace with a module's parameters (torch.nn.LSTM graph-breaks there), so under compile the torch variant
    refuses the call with that reason: auto runs the reference, a forced torch raises."""
    torch._dynamo.reset()
    lstm = pyattn.nn.LSTM(FEATURES, HIDDEN, batch_first=True)
    x = random_tensor(2, LENGTH, FEATURES)
    torch.compile(lambda: lstm(x)[0].sum(), backend="aot_eager")().backward()
    torch._dynamo.reset()
    with pyattn.use_backend("torch"), pytest.raises(pyattn.BackendUnavailableError, match="cannot trace _VF.lstm"):
        torch.compile(lambda: lstm(x)[0].sum(), backend="aot_eager")()
