"""LSTM launchers: allocation, grids, the recurrence eligibility rules, and the launches.

The caller (``pyattn`` dispatch) chooses the recurrence kernel and passes it as ``recurrence``; the
eligibility functions below are pure functions of sizes, dtype and the GPU's figures (no device query), so
dispatch can ask them for an assumed GPU. The launchers keep their own safety checks: a grid that could not be
co-resident raises instead of hanging (the grid launcher re-checks with the kernel it compiled).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .. import _aot
from .._launch import on_input_device, on_interpreter
from .cell import lstm_cell_forward_kernel, lstm_step_backward_kernel, lstm_step_projection_backward_kernel
from .configs import (BACKWARD_RECURRENCES, FORWARD_RECURRENCES, GRID_BACKWARD_COMPILED, GRID_BLOCK_B,
                      GRID_BLOCK_H, GRID_COMPILED, GRID_MAX_BATCH, GRID_MAX_HIDDEN_UNALIGNED, PERSISTENT_BLOCK_B,
                      PERSISTENT_MAX_HIDDEN, element_kind, grid_backward_meta, grid_max_hidden, grid_meta, hidden_pad,
                      persistent_max_hidden, persistent_meta, persistent_weight_budget, persistent_weight_elements,
                      step_backward_meta, step_config, step_meta)
from .grid import lstm_sequence_backward_grid_kernel, lstm_sequence_forward_grid_kernel
from .sequence import (lstm_sequence_backward_persistent_kernel, lstm_sequence_forward_persistent_kernel,
                       lstm_sequence_step_forward_kernel, lstm_sequence_step_projection_kernel)

SUPPORTED_DTYPES = tuple(PERSISTENT_MAX_HIDDEN)


def persistent_unsupported_reason(hidden_size: int, dtype: torch.dtype, proj_size: int = 0) -> str | None:
    """Why the persistent recurrence (forward and backward: W_hh, and W_hr when ``proj_size`` > 0, resident in one
    program) cannot run this hidden size, projection size and dtype, or None if it can."""
    if dtype not in PERSISTENT_MAX_HIDDEN:
        return f"dtype {dtype} is not supported (float16, bfloat16 and float32 are)"
    limit = persistent_max_hidden(hidden_size, dtype, proj_size)
    if hidden_pad(hidden_size) > limit:
        if hidden_size % 16 != 0:
            kind = ", for a hidden size that is not a multiple of 16"
        elif proj_size % 16 != 0:
            kind = f", for a proj_size ({proj_size}) that is not a multiple of 16"
        else:
            kind = ""
        return (f"weight_hh: hidden size {hidden_size} (padded {hidden_pad(hidden_size)}) in {dtype} is past the "
                f"persistent recurrence's on-chip W_hh limit (padded {limit}{kind})")
    held, budget = persistent_weight_elements(hidden_size, proj_size), persistent_weight_budget(hidden_size, dtype,
                                                                                               proj_size)
    if held > budget:
        return (f"weight_hr: hidden size {hidden_size} with proj_size {proj_size} (padded {hidden_pad(hidden_size)} "
                f"and {hidden_pad(proj_size)}) in {dtype}: W_hh (4H x P) and W_hr (P x H) together are {held} "
                f"elements, past the persistent recurrence's on-chip budget of {budget}")
    return None


@dataclass(frozen=True)
class SmResources:
    """What a GPU offers programs that must all be resident at once: its SM count and each SM's registers,
    shared memory, warps and blocks (the driver reserves ``shared_reserved_per_block`` of shared memory per block)."""

    capability: int  # 90, 80, ...
    sm_count: int
    registers_per_sm: int
    shared_bytes_per_sm: int
    max_warps_per_sm: int
    max_blocks_per_sm: int
    shared_reserved_per_block: int = _aot.SHARED_MEMORY_RESERVED_PER_BLOCK

    @classmethod
    def for_arch(cls, capability: int, sm_count: int, shared_bytes_per_sm: int | None = None) -> SmResources:
        """An assumed GPU: NVIDIA's per-SM figures for its architecture (``_aot``'s tables: sm_90 for 9.x and
        later, sm_80 for 8.x); ``shared_bytes_per_sm`` overrides the table's (an sm_86 SM has 100 KB, not 164)."""
        table = 90 if capability >= 90 else 80
        return cls(capability, sm_count, _aot.REGISTERS_PER_SM[table],
                   shared_bytes_per_sm or _aot.SHARED_MEMORY_PER_SM[table], _aot.MAX_WARPS_PER_SM[table],
                   _aot.MAX_BLOCKS_PER_SM[table])


def resident_programs(device: SmResources, *, registers: int, shared_bytes: int, num_warps: int) -> int:
    """How many programs of a kernel with these figures the GPU holds at once: SMs × blocks per SM, the least of
    what registers (allocated per warp in units of 256), shared memory, warps and the block limit allow."""
    registers_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    per_sm = min(device.registers_per_sm // (registers_per_warp * num_warps),
                 device.shared_bytes_per_sm // (shared_bytes + device.shared_reserved_per_block),
                 device.max_warps_per_sm // num_warps, device.max_blocks_per_sm)
    return device.sm_count * max(per_sm, 0)


def grid_residency_reason(programs: int, device: SmResources, *, registers: int, shared_bytes: int,
                          num_warps: int) -> str | None:
    """Why ``programs`` programs of a kernel with these compiled figures cannot all be resident on ``device`` at
    once (a grid barrier among them would never complete), or None if they can. The one occupancy rule:
    dispatch applies it to the compile report's figures (``GRID_COMPILED``), the launcher to the kernel it
    compiled."""
    resident = resident_programs(device, registers=registers, shared_bytes=shared_bytes, num_warps=num_warps)
    if programs <= resident:
        return None
    return (f"the grid recurrence needs its {programs} programs resident at once, but sm_{device.capability} with "
            f"{device.sm_count} SMs holds {resident} ({registers} registers × {num_warps} warps and {shared_bytes} "
            f"bytes of shared memory per program): its barrier would never complete")


def grid_programs(hidden_size: int, *, interpreter: bool, steps: int | None = None) -> int:
    """Programs the grid kernel launches: hidden tiles of GRID_BLOCK_H on a GPU, one under the interpreter.

    The interpreter runs programs one after another, so a program spinning at the barrier would wait
    forever for the next; a single program (owning every hidden unit) meets the barrier alone. A one-step
    launch (``steps`` = 1) crosses no barrier, so the interpreter runs it with the GPU's tiling.
    """
    return 1 if interpreter and steps != 1 else triton.cdiv(hidden_size, GRID_BLOCK_H)


def _grid_block_h(hidden_size: int, programs: int) -> int:
    return GRID_BLOCK_H if programs > 1 else hidden_pad(hidden_size)


def grid_unsupported_reason(batch: int, hidden_size: int, dtype: torch.dtype, *,
                            device: SmResources | None) -> str | None:
    """Why the grid-barrier forward cannot run, or None if it can: past these limits it would be slower than the
    stepwise kernels (batch), not launch (W_hh slices past shared memory) or hang (more programs than the GPU
    holds at once, from the compiled kernel's registers and shared memory in ``GRID_COMPILED``).

    ``device``: the GPU (:class:`SmResources`, real or assumed); None for the interpreter, where the kernel
    runs as one program.
    """
    return _grid_reason("grid recurrence", GRID_COMPILED, grid_meta, batch, hidden_size, dtype, device)


def grid_backward_unsupported_reason(batch: int, hidden_size: int, dtype: torch.dtype, *,
                                     device: SmResources | None) -> str | None:
    """Why the grid-barrier backward through time cannot run, or None if it can: the forward's rule
    (:func:`grid_unsupported_reason`) with the backward kernel's compiled figures (``GRID_BACKWARD_COMPILED``)."""
    return _grid_reason("grid backward", GRID_BACKWARD_COMPILED, grid_backward_meta, batch, hidden_size, dtype,
                        device)


def backward_after_grid(batch: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> tuple[str, str | None]:
    """The backward recurrence of a call whose forward ran the grid kernel on ``device`` (the real GPU's figures,
    or the interpreter): ("grid", None) where :func:`grid_backward_unsupported_reason` admits it, else
    ("stepwise", that reason). Decided from the rule before any launch, never from a failed one."""
    reason = grid_backward_unsupported_reason(batch, hidden_size, dtype,
                                              device=None if on_interpreter(device) else _sm_resources(device))
    return ("grid", None) if reason is None else ("stepwise", reason)


def _grid_reason(kernel: str, compiled: dict, meta, batch: int, hidden_size: int, dtype: torch.dtype,
                 device: SmResources | None) -> str | None:
    if dtype not in GRID_MAX_HIDDEN_UNALIGNED:
        return f"dtype {dtype} is not supported (float16, bfloat16 and float32 are)"
    if batch > GRID_MAX_BATCH:
        return (f"input: batch {batch} > {GRID_MAX_BATCH}: the {kernel} runs the batch as {GRID_BLOCK_B}-row tiles "
                f"one after another in each step on ⌈H/{GRID_BLOCK_H}⌉ programs; past "
                f"{GRID_MAX_BATCH // GRID_BLOCK_B} tiles a step is predicted slower than the stepwise kernels', "
                f"which spread the batch over the whole GPU")
    padded, limit = hidden_pad(hidden_size), grid_max_hidden(hidden_size, dtype)
    if padded > limit:
        kind = "" if hidden_size % 16 == 0 else ", for a hidden size that is not a multiple of 16"
        return (f"weight_hh: hidden size {hidden_size} in {dtype} is past the {kernel}'s on-chip W_hh limit "
                f"(padded {limit}{kind})")
    if device is None:
        return None
    programs = grid_programs(hidden_size, interpreter=False)
    figures = compiled.get((90 if device.capability >= 90 else 80, element_kind(dtype), padded))
    if device.capability < 80 or figures is None:
        return (f"weight_hh: no compiled figures of the {kernel} for hidden size {hidden_size} (padded "
                f"{padded}) in {dtype} on sm_{device.capability}, so its occupancy cannot be checked")
    registers, shared_bytes = figures
    num_warps = meta(padded, _grid_block_h(hidden_size, programs), dtype)["num_warps"]
    reason = grid_residency_reason(programs, device, registers=registers, shared_bytes=shared_bytes,
                                   num_warps=num_warps)
    return None if reason is None else f"weight_hh: hidden size {hidden_size}: {reason}"


def _sm_resources(device: torch.device) -> SmResources:
    """The real GPU's figures, from the driver (torch's device properties; the architecture's table where an
    older torch lacks one)."""
    properties = torch.cuda.get_device_properties(device)
    capability = properties.major * 10 + properties.minor
    assumed = SmResources.for_arch(capability, properties.multi_processor_count,
                                   getattr(properties, "shared_memory_per_multiprocessor", None))
    max_threads = getattr(properties, "max_threads_per_multi_processor", None)
    return SmResources(capability, properties.multi_processor_count,
                       getattr(properties, "regs_per_multiprocessor", None) or assumed.registers_per_sm,
                       assumed.shared_bytes_per_sm,
                       max_threads // 32 if max_threads else assumed.max_warps_per_sm, assumed.max_blocks_per_sm)


def _cooperative_launch_supported() -> bool:
    """Whether this Triton launches with ``launch_cooperative_grid`` (CUDAOptions has had it since 3.3; an
    older one would silently ignore the keyword)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_cooperative_grid" in getattr(CUDAOptions, "__dataclass_fields__", {})


def _compiled_registers(compiled, caller: str) -> int:
    """Registers per thread of a compiled kernel (``n_regs``, known once Triton has loaded it on the device)."""
    if getattr(compiled, "n_regs", None) is None and hasattr(compiled, "_init_handles"):
        compiled._init_handles()
    registers = getattr(compiled, "n_regs", None)
    if registers is None:
        raise RuntimeError(f"{caller}: recurrence='grid': this Triton's compiled kernel does not report its "
                           "registers, so the grid's occupancy cannot be checked")
    return registers


class GridResidencyError(RuntimeError):
    """The compiled grid kernel's programs cannot all be resident at once; raised before anything is launched."""


def _launch_grid_kernel(kernel, caller: str, arguments: tuple, meta: dict, programs: int,
                        device: torch.device, refused=None) -> bool:
    """Launch a grid-barrier kernel (forward or backward); on a GPU only after checking that the compiled kernel's
    programs all fit at once (never a launch that could hang), cooperatively where this Triton can (the driver then
    refuses a grid it cannot co-schedule instead of starting part of it). True once launched. Where the compiled
    kernel does not fit: ``refused(reason)`` and False (nothing launched), or without ``refused``
    :class:`GridResidencyError` with the figures."""
    if on_interpreter(device):
        kernel[(programs,)](*arguments, **meta)
        return True
    options = dict(meta)
    if _cooperative_launch_supported():
        options["launch_cooperative_grid"] = True
    compiled = kernel.warmup(*arguments, grid=(programs,), **options)
    reason = grid_residency_reason(programs, _sm_resources(device), registers=_compiled_registers(compiled, caller),
                                   shared_bytes=compiled.metadata.shared, num_warps=compiled.metadata.num_warps)
    if reason is not None:
        reason = f"{caller}: recurrence='grid' cannot launch: {reason}"
        if refused is None:
            raise GridResidencyError(reason)
        refused(reason)
        return False
    kernel[(programs,)](*arguments, **options)
    return True


def _step_grid(batch: int, hidden_size: int, config: tuple[int, int, int, int, int]) -> tuple[int, int]:
    block_b, block_h = config[0], config[1]
    return triton.cdiv(batch, block_b), triton.cdiv(hidden_size, block_h)


def _check_recurrence(caller: str, recurrence, allowed: tuple[str, ...]) -> None:
    if recurrence not in allowed:
        raise ValueError(f"{caller}: recurrence={recurrence!r}: expected one of {list(allowed)}")


@on_input_device
def lstm_cell_forward(input, hx, cx, weight_ih, weight_hh, bias, save_gates: bool):
    """One fused step. ``bias`` is b_ih + b_hh in float32 (4H,) or None.

    Returns (hy, cy, gates): gates are the activated (i, f, g, o) as (B, 4H) when ``save_gates``
    (backward needs them), else an empty tensor.
    """
    batch, input_size = input.shape
    hidden_size = hx.shape[1]
    dtype, device = input.dtype, input.device
    hy = torch.empty((batch, hidden_size), dtype=dtype, device=device)
    cy = torch.empty((batch, hidden_size), dtype=dtype, device=device)
    gates = torch.empty((batch, 4 * hidden_size) if save_gates else (0,), dtype=dtype, device=device)
    config = step_config(batch, dtype)
    lstm_cell_forward_kernel[_step_grid(batch, hidden_size, config)](
        input.contiguous(), hx.contiguous(), cx.contiguous(), weight_ih.contiguous(), weight_hh.contiguous(),
        hy if bias is None else bias, hy, cy, gates if save_gates else hy,
        batch, input_size, hidden_size,
        HAS_BIAS=bias is not None, STORE_FOR_BACKWARD=save_gates, **step_meta(config),
    )
    return hy, cy, gates


@on_input_device
def lstm_cell_backward(grad_hy, grad_cy, input, hx, cx, weight_ih, weight_hh, gates):
    """Gradients of one step from its saved activated gates (either output gradient may be None).

    Returns (grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias).
    """
    batch, hidden_size = hx.shape
    dc = torch.zeros(hx.shape, dtype=torch.float32, device=hx.device) if grad_cy is None else grad_cy.float().contiguous().clone()
    dgates = torch.empty((batch, 4 * hidden_size), dtype=input.dtype, device=input.device)
    config = step_config(batch, input.dtype)
    lstm_step_backward_kernel[_step_grid(batch, hidden_size, config)](
        dgates, dc, weight_hh, weight_hh, dc, dc if grad_hy is None else grad_hy.contiguous(), dc, gates,
        cx.contiguous(), dc,
        0, batch, hidden_size, hidden_size, 1,
        HAS_NEXT=False, HAS_GRAD_OUTPUT=False, HAS_GRAD_H_N=grad_hy is not None, HAS_LENGTHS=False, REVERSE=False,
        PROJECTION=False, **step_backward_meta(config, input.dtype),
    )
    grad_bias = dgates.sum(0, dtype=torch.float32).to(input.dtype)
    return (
        dgates @ weight_ih, dgates @ weight_hh, dc.to(cx.dtype),
        dgates.t() @ input, dgates.t() @ hx, grad_bias,
    )


@on_input_device
def lstm_sequence_forward(
    input, h0, c0, weight_ih, weight_hh, bias, lengths, reverse: bool, save_for_backward: bool, *, recurrence: str,
    weight_hr=None, grid_fallback=None,
):
    """One layer, one direction. ``bias``: b_ih + b_hh in float32 or None; ``lengths``: int64 (B,) or None;
    ``weight_hr``: the projection (P, H) or None. With it the recurrent state is r = (σ(o)·tanh(c))·W_hrᵀ:
    h0, output and h_n are P wide, weight_hh is (4H, P).

    ``recurrence``: the recurrence kernel, "persistent", "grid" or "stepwise" (a call one of them cannot run —
    :func:`persistent_unsupported_reason`, :func:`grid_unsupported_reason`; the grid kernel has no
    projection — raises ``ValueError``). ``grid_fallback``: called with the reason where the compiled grid kernel
    cannot be resident (decided from its own figures before launching); the stepwise kernels then serve the call.
    Without it that raises :class:`GridResidencyError`.
    Returns (output, h_n, c_n, gates, cell_states, hidden_before); the last three are what backward
    needs (empty unless ``save_for_backward``): activated gates per iteration (T, B, 4H), the float32
    cell state before each iteration and after the last (T + 1, B, H), and h (r) before each step in
    time order (T, B, P).
    """
    _check_recurrence("lstm_sequence_forward", recurrence, FORWARD_RECURRENCES)
    steps, batch, input_size = input.shape
    hidden_size = c0.shape[1]
    proj_size = 0 if weight_hr is None else weight_hr.shape[0]
    state_size = proj_size or hidden_size  # the width of h (r with a projection)
    dtype, device = input.dtype, input.device
    if recurrence == "grid" and proj_size:
        reason = "weight_hr: the grid recurrence has no projection (proj_size > 0)"
    elif recurrence == "grid":
        reason = grid_unsupported_reason(batch, hidden_size, dtype,
                                         device=None if on_interpreter(device) else _sm_resources(device))
    elif recurrence == "persistent":
        reason = persistent_unsupported_reason(hidden_size, dtype, proj_size)
    else:
        reason = None
    if reason is not None:
        raise ValueError(f"lstm_sequence_forward: recurrence={recurrence!r} cannot run this call: {reason}")
    # The input projection of every step at once: one GEMM, off the sequential path.
    projection = torch.matmul(input.reshape(steps * batch, input_size), weight_ih.t()).view(steps, batch, 4 * hidden_size)
    weight_hh = weight_hh.contiguous()
    weight_hr_arg = weight_hh if weight_hr is None else weight_hr.contiguous()
    output = torch.empty((steps, batch, state_size), dtype=dtype, device=device)
    h_state = torch.empty((2, batch, state_size), dtype=dtype, device=device)
    h_state[0].copy_(h0)
    c_slots = steps + 1 if save_for_backward else 2
    c_state = torch.empty((c_slots, batch, hidden_size), dtype=torch.float32, device=device)
    c_state[0].copy_(c0)
    if save_for_backward:
        gates = torch.empty((steps, batch, 4 * hidden_size), dtype=dtype, device=device)
        hidden_before = torch.empty((steps, batch, state_size), dtype=dtype, device=device)
    else:
        gates = torch.empty((0,), dtype=dtype, device=device)
        hidden_before = torch.empty((0,), dtype=dtype, device=device)
    flags = dict(
        HAS_BIAS=bias is not None, HAS_LENGTHS=lengths is not None, REVERSE=reverse,
        STORE_FOR_BACKWARD=save_for_backward,
    )
    bias_arg = output if bias is None else bias
    lengths_arg = output if lengths is None else lengths
    gates_arg = gates if save_for_backward else output
    hidden_arg = hidden_before if save_for_backward else output
    if recurrence == "grid":
        programs = grid_programs(hidden_size, interpreter=on_interpreter(device), steps=steps)
        padded = hidden_pad(hidden_size)
        barrier = torch.zeros((1,), dtype=torch.int32, device=device)
        launched = _launch_grid_kernel(
            lstm_sequence_forward_grid_kernel, "lstm_sequence_forward",
            (projection, weight_hh, bias_arg, lengths_arg, h_state, c_state, c_slots,
             output, hidden_arg, gates_arg, barrier, batch, hidden_size, steps),
            dict(**flags, **grid_meta(padded, _grid_block_h(hidden_size, programs), dtype)), programs, device,
            refused=grid_fallback,
        )
        if not launched:
            recurrence = "stepwise"  # nothing ran: the per-step kernels fill the same buffers
    if recurrence == "persistent":
        lstm_sequence_forward_persistent_kernel[(triton.cdiv(batch, PERSISTENT_BLOCK_B),)](
            projection, weight_hh, weight_hr_arg, bias_arg, lengths_arg, h_state, c_state, c_slots,
            output, hidden_arg, gates_arg, batch, hidden_size, state_size, steps,
            **flags, **persistent_meta(hidden_size, dtype, proj_size),
        )
    elif recurrence == "stepwise":
        config = step_config(batch, dtype, projection=proj_size > 0)
        grid = _step_grid(batch, hidden_size, config)
        # With a projection each step is two launches: the gates and m = σ(o)·tanh(c) (into cell_output),
        # then r = m·W_hrᵀ, whose K (= H) spans every program of the first launch.
        cell_output = torch.empty((batch, hidden_size) if proj_size else (0,), dtype=dtype, device=device)
        cell_output_arg = cell_output if proj_size else output
        for step in range(steps):
            lstm_sequence_step_forward_kernel[grid](
                projection, weight_hh, bias_arg, lengths_arg,
                h_state[step % 2], c_state[step % c_slots], h_state[(step + 1) % 2], c_state[(step + 1) % c_slots],
                output, hidden_arg, gates_arg[step] if save_for_backward else gates_arg, cell_output_arg,
                step, batch, hidden_size, state_size, steps,
                **flags, PROJECTION=proj_size > 0, **step_meta(config),
            )
            if proj_size:
                lstm_sequence_step_projection_kernel[_step_grid(batch, proj_size, config)](
                    cell_output, weight_hr_arg, lengths_arg, h_state[step % 2], h_state[(step + 1) % 2], output,
                    hidden_arg, step, batch, hidden_size, proj_size, steps,
                    HAS_LENGTHS=lengths is not None, REVERSE=reverse, STORE_FOR_BACKWARD=save_for_backward,
                    **step_meta(config),
                )
    h_n = h_state[steps % 2].clone()
    c_n = c_state[steps % c_slots].to(dtype, copy=True)
    cell_states = c_state if save_for_backward else torch.empty((0,), dtype=torch.float32, device=device)
    return output, h_n, c_n, gates, cell_states, hidden_before


@on_input_device
def lstm_sequence_backward(
    grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, lengths, reverse: bool,
    gates, cell_states, hidden_before, *, recurrence: str, weight_hr=None, grid_fallback=None,
):
    """Backward through time from the tensors ``lstm_sequence_forward`` saved (output gradients may be None;
    ``weight_hr`` the forward's projection or None).

    ``recurrence``: the recurrence kernel, "persistent" (where :func:`persistent_unsupported_reason` allows;
    else ``ValueError``), "grid" (where :func:`grid_backward_unsupported_reason` allows, no projection; else
    ``ValueError``) or "stepwise". Any forward recurrence's saved tensors serve any of them. ``grid_fallback``: as
    :func:`lstm_sequence_forward`'s, for the grid backward's compiled kernel.
    Returns (grad_input, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr), the last
    an empty tensor without a projection.
    """
    _check_recurrence("lstm_sequence_backward", recurrence, BACKWARD_RECURRENCES)
    steps, batch, input_size = input.shape
    hidden_size = weight_hh.shape[0] // 4
    proj_size = 0 if weight_hr is None else weight_hr.shape[0]
    state_size = proj_size or hidden_size
    dtype, device = input.dtype, input.device
    if recurrence == "persistent":
        reason = persistent_unsupported_reason(hidden_size, dtype, proj_size)
    elif recurrence == "grid" and proj_size:
        reason = "weight_hr: the grid recurrence has no projection (proj_size > 0)"
    elif recurrence == "grid":
        reason = grid_backward_unsupported_reason(batch, hidden_size, dtype,
                                                  device=None if on_interpreter(device) else _sm_resources(device))
    else:
        reason = None
    if reason is not None:
        raise ValueError(f"lstm_sequence_backward: recurrence={recurrence!r} cannot run this call: {reason}")
    weight_hh = weight_hh.contiguous()
    weight_hr_arg = weight_hh if weight_hr is None else weight_hr.contiguous()
    dgates = torch.empty((steps, batch, 4 * hidden_size), dtype=dtype, device=device)
    # With a projection: dr (the gradient reaching r_t = m_t·W_hrᵀ) per iteration, for dW_hr after the loop.
    dr = torch.empty((steps, batch, proj_size) if proj_size else (0,), dtype=dtype, device=device)
    if grad_c_n is None:
        dc = torch.zeros((batch, hidden_size), dtype=torch.float32, device=device)
    else:
        dc = grad_c_n.float().contiguous().clone()
    grad_output_arg = dc if grad_output is None else grad_output.contiguous()
    grad_h_n_arg = dc if grad_h_n is None else grad_h_n.contiguous()
    lengths_arg = dc if lengths is None else lengths
    flags = dict(
        HAS_GRAD_OUTPUT=grad_output is not None, HAS_GRAD_H_N=grad_h_n is not None,
        HAS_LENGTHS=lengths is not None, REVERSE=reverse,
    )
    dr_arg = dr if proj_size else dc
    if recurrence == "grid":
        programs = grid_programs(hidden_size, interpreter=on_interpreter(device), steps=steps)
        barrier = torch.zeros((1,), dtype=torch.int32, device=device)
        meta = grid_backward_meta(hidden_pad(hidden_size), _grid_block_h(hidden_size, programs), dtype)
        launched = _launch_grid_kernel(
            lstm_sequence_backward_grid_kernel, "lstm_sequence_backward",
            (dgates, weight_hh, grad_output_arg, grad_h_n_arg, dc, gates, cell_states, lengths_arg, barrier,
             batch, hidden_size, steps),
            dict(**flags, **meta), programs, device, refused=grid_fallback,
        )
        if not launched:
            recurrence = "stepwise"  # nothing ran: the per-step kernels fill the same buffers
    if recurrence == "persistent":
        lstm_sequence_backward_persistent_kernel[(triton.cdiv(batch, PERSISTENT_BLOCK_B),)](
            dgates, dr_arg, weight_hh, weight_hr_arg, grad_output_arg, grad_h_n_arg, dc, gates, cell_states,
            lengths_arg, batch, hidden_size, state_size, steps,
            **flags, **persistent_meta(hidden_size, dtype, proj_size),
        )
    elif recurrence == "stepwise":
        config = step_config(batch, dtype, projection=proj_size > 0)
        grid = _step_grid(batch, hidden_size, config)
        for step in range(steps - 1, -1, -1):
            if proj_size:
                # dr first (P wide, the output and h_n gradients enter here), then dm = dr·W_hr and the gates.
                lstm_step_projection_backward_kernel[_step_grid(batch, proj_size, config)](
                    dgates, weight_hh, grad_output_arg, grad_h_n_arg, dr[step], lengths_arg,
                    step, batch, hidden_size, proj_size, steps,
                    HAS_NEXT=step < steps - 1, **flags, **step_meta(config),
                )
                # dgates_{step+1} went into dr: one compiled variant serves every step (HAS_NEXT off).
                step_flags = dict(flags, HAS_NEXT=False, HAS_GRAD_OUTPUT=False, HAS_GRAD_H_N=False)
            else:
                step_flags = dict(flags, HAS_NEXT=step < steps - 1)
            lstm_step_backward_kernel[grid](
                dgates, dr[step] if proj_size else dr_arg, weight_hh, weight_hr_arg, grad_output_arg, grad_h_n_arg, dc,
                gates[step], cell_states[step], lengths_arg,
                step, batch, hidden_size, state_size, steps,
                PROJECTION=proj_size > 0, **step_flags, **step_backward_meta(config, dtype),
            )
    # Every weight gradient is one GEMM over all steps of the stacked gate gradients.
    flat_dgates = dgates.view(steps * batch, 4 * hidden_size)
    grad_input = torch.matmul(flat_dgates, weight_ih).view(steps, batch, input_size)
    grad_weight_ih = flat_dgates.t() @ input.reshape(steps * batch, input_size)
    grad_weight_hh = flat_dgates.t() @ hidden_before.view(steps * batch, state_size)
    grad_bias = flat_dgates.sum(0, dtype=torch.float32).to(dtype)
    if proj_size:
        # dW_hr = Σ drᵀ·m over iterations, m = σ(o)·tanh(c) rebuilt from the saved gates and cell states rather
        # than saved (T·B·H fewer saved elements); dr is zero where a row is frozen.
        cell_output = (gates[..., 3 * hidden_size:].float() * torch.tanh(cell_states[1:])).to(dtype)
        grad_weight_hr = dr.view(steps * batch, proj_size).t() @ cell_output.view(steps * batch, hidden_size)
    else:
        grad_weight_hr = torch.empty((0,), dtype=dtype, device=device)
    # h0 fed each row's first iteration: at time 0, or at its own last step when reversed.
    if not reverse:
        first_dgates = dgates[0]
    elif lengths is None:
        first_dgates = dgates[steps - 1]
    else:
        first_time = (lengths - 1).clamp(min=0)
        first_dgates = dgates[first_time, torch.arange(batch, device=device)]
    grad_h0 = first_dgates @ weight_hh
    if grad_h_n is not None and lengths is not None:
        # A row of length 0 never steps: h_n is h0.
        grad_h0 = grad_h0 + torch.where((lengths == 0)[:, None], grad_h_n, torch.zeros_like(grad_h_n))
    return grad_input, grad_h0, dc.to(dtype), grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr
