"""CUDA-graph replay of a launcher call whose work is many small launches (the stepwise LSTM loops).

A per-step recurrence pays one launch (and, for Triton, one trip through its Python launcher) per step for
nanoseconds of math at small batch. :func:`run` captures the whole call once into a CUDA graph and replays it
after, so a call costs one graph launch plus the copies in and out, whatever T is.

* **When eager.** Not a CUDA tensor (the Triton interpreter runs on CPU), while ``torch.compile`` traces, while
  the current stream is itself being captured (the caller's own graph, torch.compile's cudagraphs: the launches
  then belong to that graph), in inference mode, or with a tensor that is not a plain tensor (a functorch or
  other wrapper subclass). The first call of a key runs eagerly on the caller's tensors (a shape seen once
  costs no capture and no memory); the second copies its inputs into the static buffers, runs eagerly on those
  (so every specialisation the capture will launch is compiled, autotuned and loaded, and cuBLAS is set up,
  outside any capture; this call's result is that run's), then captures; later ones replay.
* **The key** is everything the captured work depends on: the call's name and option flags; every tensor
  argument's shape, strides, dtype and device; the weights' addresses (they are read where they live, not
  copied: an optimizer's in-place step is seen by the next replay, a new tensor is a new key); the values of
  any CPU tensor (a 16-byte hash: host data such as a PackedSequence's batch_sizes steers launch grids, which
  a graph fixes); the current stream (each stream its own static buffers, so
  two streams never race on them); and the global switches that change which kernels torch picks (TF32,
  reduced-precision reductions, deterministic algorithms).
* **Buffers.** The other tensor arguments are copied into static buffers before each replay; the outputs are
  cloned out of the graph's static outputs, so neither autograd nor the caller ever holds memory a later replay
  overwrites.
* **Memory.** An entry holds its static inputs plus the graph's private pool: every tensor the call allocates
  (outputs and intermediates alike), so about one eager call's footprint plus a copy of its inputs. At most
  :data:`CACHE_SIZE` entries live at once, holding at most :data:`CACHE_MEMORY_FRACTION` of the device's
  memory together (least recently used evicted first, after its last replay finished): a model whose sequence
  length varies makes a graph per length, and 32 graphs of a long sequence's activations would otherwise hold
  many eager calls' memory. A key whose inputs and outputs alone exceed that share is not captured (it runs
  eagerly, with a note). :func:`clear` drops them all.

Capture failures do not raise: the key stays eager (while it is among the last ``4 * CACHE_SIZE`` such keys) and
the reason is kept in :func:`notes` (``pyattn.explain`` prints them). Tests swap :data:`backend` for a fake to run this on CPU.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from pyattn import _registry

CACHE_SIZE = 32  # captured graphs kept per process (each about one eager call's memory: see the module doc)
CACHE_MEMORY_FRACTION = 0.1  # of the device's memory, for every captured graph's inputs and pool together
_SEEN_SIZE = 4 * CACHE_SIZE  # keys called once (eager) and waiting for their second call


class CudaGraphs:
    """The real thing: capture on a side stream into a private memory pool, replay on the current stream."""

    def applies(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def capturing(self, device: torch.device) -> bool:
        return torch.cuda.is_current_stream_capturing()

    def stream(self, device: torch.device) -> int:
        return torch.cuda.current_stream(device).cuda_stream

    def capture(self, device: torch.device, function: Callable[[], tuple]) -> tuple[CapturedGraph, tuple]:
        graph = torch.cuda.CUDAGraph()
        caller = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(caller)  # the static inputs were written on the caller's stream
        with torch.cuda.stream(side):
            # thread_local: another thread's CUDA calls (a data loader's pinned copies) do not void this capture.
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                outputs = function()
            except BaseException:
                try:
                    graph.capture_end()
                except Exception:  # noqa: BLE001  (the capture's own error is the one to report)
                    pass
                raise
            graph.capture_end()
        caller.wait_stream(side)
        return CapturedGraph(graph, device), outputs

    def pool_bytes(self, device: torch.device) -> int:
        """Memory the caching allocator holds on ``device``: its growth across a capture is the graph's pool."""
        return torch.cuda.memory_reserved(device)

    def total_memory(self, device: torch.device) -> int:
        return torch.cuda.get_device_properties(device).total_memory


class CapturedGraph:
    def __init__(self, graph, device: torch.device):
        self.graph, self.device = graph, device
        self.done = torch.cuda.Event()

    def replay(self) -> None:
        self.graph.replay()
        self.done.record(torch.cuda.current_stream(self.device))

    def release(self) -> None:
        self.done.synchronize()  # never free a pool a replay in flight still writes
        self.graph = None


backend = CudaGraphs()


@dataclass
class _Entry:
    graph: object
    static_inputs: tuple
    static_outputs: tuple
    bytes: int  # its static inputs and its graph's pool
    replays: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)  # copy in, replay, clone out: one call at a time


@dataclass
class _State:
    graphs: collections.OrderedDict = field(default_factory=collections.OrderedDict)  # key -> _Entry
    seen: collections.OrderedDict = field(default_factory=collections.OrderedDict)  # key -> None (one eager call)
    # keys whose capture failed or that asked to stay eager (bounded: a forgotten key is just tried again)
    eager: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)


_state = _State()


def _remember_eager(key) -> None:
    """(Under the state lock.)"""
    _state.seen.pop(key, None)
    _state.eager[key] = None
    _state.eager.move_to_end(key)
    while len(_state.eager) > _SEEN_SIZE:
        _state.eager.popitem(last=False)


def _keep_eager(key, name: str, why: str) -> None:
    """The key runs eagerly from now on; ``why`` goes to the notes ``pyattn.explain`` prints."""
    with _state.lock:
        _remember_eager(key)
    _registry.record_note("graphs", f"{name}: {why}")


def _over_budget(what: str, size: int, budget: int) -> str:
    return (f"{what} ({size / 2**20:.0f} MiB) exceeds the graph cache's budget ({budget / 2**20:.0f} MiB, "
            f"{CACHE_MEMORY_FRACTION:.0%} of the device)")


def clear() -> None:
    """Drop every captured graph (and its memory) and forget which keys were seen."""
    with _state.lock:
        for entry in _state.graphs.values():
            entry.graph.release()
        _state.graphs.clear()
        _state.seen.clear()
        _state.eager.clear()


def cached_graphs() -> int:
    return len(_state.graphs)


def cached_bytes() -> int:
    """Memory the captured graphs hold (their static inputs and pools), as accounted against the budget."""
    with _state.lock:
        return sum(entry.bytes for entry in _state.graphs.values())


def _tensor_bytes(tensors: Sequence) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def notes() -> list[str]:
    """What this process's graph runner could not capture, and why (also in ``pyattn.explain``)."""
    return _registry.notes("graphs")


def _plain(tensor: torch.Tensor) -> bool:
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return False
    functorch = getattr(torch._C, "_functorch", None)
    return functorch is None or not functorch.is_functorch_wrapped_tensor(tensor)


def _device_of(tensors: Sequence) -> torch.device | None:
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor) and t.device.type != "cpu"}
    if len(devices) > 1:
        return None
    if devices:
        return devices.pop()
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    return None if first is None else first.device


def applies(tensors: Sequence) -> bool:
    """Whether :func:`run` would graph a call on these tensors (else it runs the call as it is)."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return False
    if not all(_plain(t) for t in tensors if isinstance(t, torch.Tensor)):
        return False
    device = _device_of(tensors)
    return device is not None and backend.applies(device) and not backend.capturing(device)


def _describe(tensor, device: torch.device, by_address: bool):
    if tensor is None:
        return None
    if not isinstance(tensor, torch.Tensor):
        return ("value", tensor)
    described = (tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device)
    if by_address:
        return described + (tensor.data_ptr(),)
    if tensor.device.type == "cpu" and device.type != "cpu":  # host data can steer launches: key by value
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return described + (hashlib.blake2b(data, digest_size=16).digest(),)
    return described


def _global_switches() -> tuple:
    matmul = torch.backends.cuda.matmul
    return (torch.get_float32_matmul_precision(), getattr(matmul, "allow_tf32", None),
            getattr(matmul, "allow_fp16_reduced_precision_reduction", None),
            getattr(matmul, "allow_bf16_reduced_precision_reduction", None), torch.backends.cudnn.allow_tf32,
            torch.are_deterministic_algorithms_enabled())


def _static_copy(tensor):
    if not isinstance(tensor, torch.Tensor):
        return tensor
    static = torch.empty_like(tensor, memory_format=torch.preserve_format)
    static.copy_(tensor)
    return static


def run(name: str, function: Callable[..., tuple], inputs: Sequence, weights: Sequence = (), options: tuple = (),
        *, stay_eager: Callable[[], bool] | None = None) -> tuple:
    """``function(*inputs, *weights)``, through a CUDA graph where :func:`applies` (see the module doc).

    ``function`` must depend only on the key: ``name``, ``options`` (hashable: flags, sizes it closes over) and
    its arguments. ``inputs`` (tensors or None) are copied into static buffers; ``weights`` (tensors or None)
    are read at their address. Returns ``function``'s tuple of tensors, freshly allocated (clones of the graph's
    outputs when replayed). ``stay_eager``: asked after a key's first (eager) call; True keeps that key eager
    (a call that turned out to be one launch anyway).
    """
    arguments = (*inputs, *weights)
    if not applies(arguments):
        return function(*arguments)
    device = _device_of(arguments)
    key = (name, options, tuple(_describe(t, device, False) for t in inputs),
           tuple(_describe(t, device, True) for t in weights), device, backend.stream(device), _global_switches())
    with _state.lock:
        entry = _state.graphs.get(key)
        if entry is not None:
            _state.graphs.move_to_end(key)
        eager = key in _state.eager
        first_call = entry is None and not eager and key not in _state.seen
        if first_call:
            _state.seen[key] = None
            while len(_state.seen) > _SEEN_SIZE:
                _state.seen.popitem(last=False)
    if eager:
        return function(*arguments)
    if first_call:
        outputs = function(*arguments)
        if stay_eager is not None and stay_eager():
            with _state.lock:
                _remember_eager(key)
        return outputs
    if entry is None:
        return _capture(name, key, function, inputs, weights, device)
    with entry.lock:
        for static, tensor in zip(entry.static_inputs, inputs):
            if isinstance(static, torch.Tensor):
                static.copy_(tensor)
        entry.graph.replay()
        entry.replays += 1
        return tuple(output.clone() if isinstance(output, torch.Tensor) else output
                     for output in entry.static_outputs)


def _capture(name: str, key, function, inputs, weights, device) -> tuple:
    """The second call of a key: run eagerly on fresh static copies of the inputs (this call's result, and the
    warm-up of exactly what the capture launches), then capture the same call on them."""
    with torch.no_grad():
        static_inputs = tuple(_static_copy(t) for t in inputs)
    outputs = function(*static_inputs, *weights)
    budget = int(CACHE_MEMORY_FRACTION * backend.total_memory(device))
    least = _tensor_bytes(static_inputs) + _tensor_bytes(outputs)  # a graph holds at least its inputs and outputs
    if least > budget:
        _keep_eager(key, name, "not captured, the call runs eagerly: "
                    + _over_budget("what its inputs and outputs hold", least, budget))
        return outputs
    try:
        reserved = backend.pool_bytes(device)
        with torch.no_grad():
            graph, static_outputs = backend.capture(device, lambda: tuple(function(*static_inputs, *weights)))
        pool = max(backend.pool_bytes(device) - reserved, _tensor_bytes(static_outputs))
    except Exception as error:  # noqa: BLE001  (a capture failure leaves this key eager, with the reason kept)
        _keep_eager(key, name, f"CUDA-graph capture failed, the call runs eagerly: {type(error).__name__}: {error}")
        return outputs
    entry = _Entry(graph, static_inputs, tuple(static_outputs), _tensor_bytes(static_inputs) + pool)
    if entry.bytes > budget:  # its intermediates made it larger than the inputs and outputs promised
        graph.release()
        _keep_eager(key, name, "captured graph released, the call runs eagerly: "
                    + _over_budget("what it holds", entry.bytes, budget))
        return outputs
    evicted = []
    with _state.lock:
        _state.seen.pop(key, None)
        _state.graphs[key] = entry
        held = sum(cached.bytes for cached in _state.graphs.values())
        while len(_state.graphs) > CACHE_SIZE or held > budget:
            evicted.append(_state.graphs.popitem(last=False)[1])
            held -= evicted[-1].bytes
    for old in evicted:
        with old.lock:
            old.graph.release()
    return outputs
