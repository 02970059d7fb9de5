"""Ahead-of-time compile specs of the LSTM kernels (``tests/test_triton_compile.py`` and
``python -m pyattn.kernels.report`` compile each for sm_90 and sm_80).

Every spec is a launch: the arguments ``launch.py`` passes (``meta`` tensors allocated and sliced as the
launchers allocate and slice them, and their integers) run through the JIT's binder, so the spec carries the
specialisation that launch compiles with. Each kernel × dtype × config (step tiles by batch bucket, the
persistent kernels' padded hidden sizes, the grid kernels') is compiled with every optional feature on
(bias, ragged lengths, reversed, training), in the "aligned" variant (batch and hidden size multiples of 16)
and, for ``UNALIGNED_DTYPES``, the "unaligned" one (odd batch, hidden and input sizes). The stepwise and
persistent layer kernels are compiled again in their packed form (``PACKED``, case suffix ",packed"), as
``packed.py`` launches them: whole packed arrays for gates, cell states and dr, two c slots, the offsets.
"""

from __future__ import annotations

import torch

from .. import _aot
from . import configs
from .cell import lstm_cell_forward_kernel, lstm_step_backward_kernel, lstm_step_projection_backward_kernel
from .grid import lstm_sequence_backward_grid_kernel, lstm_sequence_forward_grid_kernel
from .sequence import (lstm_sequence_backward_persistent_kernel, lstm_sequence_forward_persistent_kernel,
                       lstm_sequence_step_forward_kernel, lstm_sequence_step_projection_kernel)

_DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
UNALIGNED_DTYPES = (torch.float16, torch.float32)
STEPS = 64
FEATURES = dict(HAS_BIAS=True, HAS_LENGTHS=True, REVERSE=True, STORE_FOR_BACKWARD=True)


def _empty(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _sizes(variant: str, batch: int, hidden_size: int) -> tuple[int, int, int]:
    """(batch, hidden size, input size) of the modelled launch: as given, or just below (odd, not multiples of 16)."""
    if variant == "aligned":
        return batch, hidden_size, hidden_size
    return batch - 3, hidden_size - 8 if hidden_size > 16 else hidden_size - 1, hidden_size - 1


def _proj_size(variant: str, hidden_size: int) -> int:
    """The modelled projection size: half of H (aligned), or an odd size below it."""
    return hidden_size // 2 if variant == "aligned" else max(1, hidden_size // 2 - 5)


def _layer_buffers(dtype, steps, batch, hidden_size, proj_size=0):
    """The forward launcher's allocations, training mode (T + 1 cell-state slots, gates, h before each step); h,
    output and h before each step are P wide with a projection, and the stepwise path's m is (B, H)."""
    state_size = proj_size or hidden_size
    return dict(projection=_empty(steps, batch, 4 * hidden_size, dtype=dtype),
                output=_empty(steps, batch, state_size, dtype=dtype),
                h_state=_empty(2, batch, state_size, dtype=dtype),
                c_state=_empty(steps + 1, batch, hidden_size, dtype=torch.float32),
                gates=_empty(steps, batch, 4 * hidden_size, dtype=dtype),
                hidden_before=_empty(steps, batch, state_size, dtype=dtype),
                cell_output=_empty(batch, hidden_size, dtype=dtype),
                dr=_empty(steps, batch, state_size, dtype=dtype),
                bias=_empty(4 * hidden_size, dtype=torch.float32), lengths=_empty(batch, dtype=torch.int64))


def _spec(kernel_name, kernel, case, variant, arguments, num_warps, num_stages, config):
    # A register cap travels in the arguments as the launcher passes it (step_backward_meta): a launch option.
    arguments = dict(arguments)
    maxnreg = arguments.pop("maxnreg", None)
    return _aot.launch_spec("lstm", kernel_name, case, variant, kernel, arguments, config=config,
                            num_warps=num_warps, num_stages=num_stages, auto_may_pick=True, maxnreg=maxnreg)


def _kernel_meta(meta: dict) -> dict:
    """A launcher's meta less its warps and stages, which the spec takes apart (a register cap stays: _spec
    takes it out)."""
    return {key: value for key, value in meta.items() if key not in ("num_warps", "num_stages")}


def _packed_spec(kernel_name, kernel, case, variant, arguments, num_warps, num_stages, config, **packed_arguments):
    """The packed-layout twin of a layer kernel's spec (``packed.py``'s launch): the offsets, PACKED, and the
    arguments that launcher passes differently."""
    arguments = dict(arguments, offsets_ptr=_empty(STEPS + 1, dtype=torch.int64), PACKED=True, **packed_arguments)
    return _spec(kernel_name, kernel, f"{case},packed", variant, arguments, num_warps, num_stages, config)


def _step_specs(dtype, bucket, variant) -> list[_aot.CompileSpec]:
    """Cell forward, stepwise layer forward, step backward (layer: with and without a next step; cell) at the
    tiles of one batch bucket, and the projected layer's step kernels (proj_size > 0) at the same tiles."""
    config = configs.STEP_CONFIGS[(configs.element_kind(dtype), bucket)]
    block_b, block_h, block_k, num_warps, num_stages = config
    meta = configs.step_meta(config)
    num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
    batch, hidden_size, input_size = _sizes(variant, bucket, 1024)
    tiles = f"BB{block_b},BH{block_h},BK{block_k},w{num_warps},s{num_stages}"
    case = f"{_DTYPE_NAME[dtype]},B{batch},H{hidden_size}"
    step = 5
    state = _empty(batch, hidden_size, dtype=dtype)
    cell_forward = dict(x_ptr=_empty(batch, input_size, dtype=dtype), h_ptr=state, c_ptr=state,
                        w_ih_ptr=_empty(4 * hidden_size, input_size, dtype=dtype),
                        w_hh_ptr=_empty(4 * hidden_size, hidden_size, dtype=dtype),
                        bias_ptr=_empty(4 * hidden_size, dtype=torch.float32), h_out_ptr=state, c_out_ptr=state,
                        gates_ptr=_empty(batch, 4 * hidden_size, dtype=dtype), B=batch, I=input_size, H=hidden_size,
                        HAS_BIAS=True, STORE_FOR_BACKWARD=True, **meta)
    specs = [_spec("lstm_cell_forward", lstm_cell_forward_kernel, case, variant, cell_forward, num_warps, num_stages,
                   tiles)]
    dc = _empty(batch, hidden_size, dtype=torch.float32)
    for proj_size in (0, _proj_size(variant, hidden_size)):
        state_size = proj_size or hidden_size
        layer_config = configs.step_config(bucket, dtype, projection=proj_size > 0)
        layer_meta = configs.step_meta(layer_config)
        layer_warps, layer_stages = layer_meta.pop("num_warps"), layer_meta.pop("num_stages")
        backward_meta = _kernel_meta(configs.step_backward_meta(layer_config, dtype))
        layer_tiles = "BB{},BH{},BK{},w{},s{}".format(*layer_config)
        layer_case = case + (f",P{proj_size}" if proj_size else "")
        b = _layer_buffers(dtype, STEPS, batch, hidden_size, proj_size)
        w_hh = _empty(4 * hidden_size, state_size, dtype=dtype)
        w_hr = _empty(proj_size, hidden_size, dtype=dtype) if proj_size else w_hh
        # The launcher passes the output for the unused m buffer without a projection.
        cell_output = b["cell_output"] if proj_size else b["output"]
        layer_forward = dict(projection_ptr=b["projection"], w_hh_ptr=w_hh, bias_ptr=b["bias"],
                             lengths_ptr=b["lengths"], h_in_ptr=b["h_state"][step % 2], c_in_ptr=b["c_state"][step],
                             h_out_ptr=b["h_state"][(step + 1) % 2], c_out_ptr=b["c_state"][step + 1],
                             output_ptr=b["output"], hidden_saved_ptr=b["hidden_before"], gates_ptr=b["gates"][step],
                             cell_output_ptr=cell_output, step=step, B=batch, H=hidden_size, P=state_size, T=STEPS,
                             **FEATURES, PROJECTION=proj_size > 0, **layer_meta)
        specs.append(_spec("lstm_sequence_step_forward", lstm_sequence_step_forward_kernel, layer_case, variant,
                           layer_forward, layer_warps, layer_stages, layer_tiles))
        # Packed: gates and c before the step (cell_saved) are whole (rows, ·) arrays, c ping-pongs in two slots.
        two_slots = _empty(2, batch, hidden_size, dtype=torch.float32)
        cell_saved = _empty(STEPS * batch, hidden_size, dtype=torch.float32)
        specs.append(_packed_spec("lstm_sequence_step_forward", lstm_sequence_step_forward_kernel, layer_case, variant,
                                  layer_forward, layer_warps, layer_stages, layer_tiles, gates_ptr=b["gates"],
                                  c_in_ptr=two_slots[step % 2], c_out_ptr=two_slots[(step + 1) % 2],
                                  cell_saved_ptr=cell_saved))
        if proj_size:
            projection_step = dict(cell_output_ptr=b["cell_output"], w_hr_ptr=w_hr, lengths_ptr=b["lengths"],
                                   h_in_ptr=b["h_state"][step % 2], h_out_ptr=b["h_state"][(step + 1) % 2],
                                   output_ptr=b["output"], hidden_saved_ptr=b["hidden_before"], step=step, B=batch,
                                   H=hidden_size, P=proj_size, T=STEPS, HAS_LENGTHS=True, REVERSE=True,
                                   STORE_FOR_BACKWARD=True, **layer_meta)
            specs.append(_spec("lstm_sequence_step_projection", lstm_sequence_step_projection_kernel, layer_case,
                               variant, projection_step, layer_warps, layer_stages, layer_tiles))
            specs.append(_packed_spec("lstm_sequence_step_projection", lstm_sequence_step_projection_kernel,
                                      layer_case, variant, projection_step, layer_warps, layer_stages, layer_tiles))
        dgates = _empty(STEPS, batch, 4 * hidden_size, dtype=dtype)
        grad_h_n = _empty(batch, state_size, dtype=dtype)
        for has_next in (True, False):  # the last step (launched first) has no successor: HAS_NEXT=False
            suffix = f"{layer_case},layer{'' if has_next else ',last-step'}"
            if proj_size:
                projection_backward = dict(dgates_ptr=dgates, w_hh_ptr=w_hh, grad_output_ptr=b["output"],
                                           grad_h_n_ptr=grad_h_n, dr_ptr=b["dr"][step], lengths_ptr=b["lengths"],
                                           step=step, B=batch, H=hidden_size, P=proj_size, T=STEPS,
                                           HAS_NEXT=has_next, HAS_GRAD_OUTPUT=True, HAS_GRAD_H_N=True,
                                           HAS_LENGTHS=True, REVERSE=True, **layer_meta)
                specs.append(_spec("lstm_step_projection_backward", lstm_step_projection_backward_kernel, suffix,
                                   variant, projection_backward, layer_warps, layer_stages, layer_tiles))
                specs.append(_packed_spec("lstm_step_projection_backward", lstm_step_projection_backward_kernel,
                                          suffix, variant, projection_backward, layer_warps, layer_stages,
                                          layer_tiles, dr_ptr=b["dr"]))
                if has_next:  # with a projection the launcher passes HAS_NEXT=False (its product is dr·W_hr)
                    continue
            layer_backward = dict(dgates_ptr=dgates, dr_ptr=b["dr"][step] if proj_size else dc, w_hh_ptr=w_hh,
                                  w_hr_ptr=w_hr, grad_output_ptr=b["output"], grad_h_n_ptr=grad_h_n, dc_ptr=dc,
                                  gates_ptr=b["gates"][step], c_prev_ptr=b["c_state"][step], lengths_ptr=b["lengths"],
                                  step=step, B=batch, H=hidden_size, P=state_size, T=STEPS, HAS_NEXT=has_next,
                                  HAS_GRAD_OUTPUT=not proj_size, HAS_GRAD_H_N=not proj_size, HAS_LENGTHS=True,
                                  REVERSE=True, PROJECTION=proj_size > 0, **backward_meta)
            specs.append(_spec("lstm_step_backward", lstm_step_backward_kernel, suffix, variant, layer_backward,
                               layer_warps, layer_stages, layer_tiles))
            specs.append(_packed_spec("lstm_step_backward", lstm_step_backward_kernel, suffix, variant, layer_backward,
                                      layer_warps, layer_stages, layer_tiles, dr_ptr=b["dr"] if proj_size else dc,
                                      gates_ptr=b["gates"], c_prev_ptr=cell_saved))
    # The cell's backward (lstm_cell_backward): T = 1, c_prev in the input dtype, dc standing in for the absent.
    w_hh = _empty(4 * hidden_size, hidden_size, dtype=dtype)
    cell_backward = dict(dgates_ptr=_empty(batch, 4 * hidden_size, dtype=dtype), dr_ptr=dc, w_hh_ptr=w_hh,
                         w_hr_ptr=w_hh, grad_output_ptr=dc, grad_h_n_ptr=state, dc_ptr=dc,
                         gates_ptr=_empty(batch, 4 * hidden_size, dtype=dtype), c_prev_ptr=state, lengths_ptr=dc,
                         step=0, B=batch, H=hidden_size, P=hidden_size, T=1, HAS_NEXT=False, HAS_GRAD_OUTPUT=False,
                         HAS_GRAD_H_N=True, HAS_LENGTHS=False, REVERSE=False, PROJECTION=False,
                         **_kernel_meta(configs.step_backward_meta(config, dtype)))
    specs.append(_spec("lstm_step_backward", lstm_step_backward_kernel, f"{case},cell", variant, cell_backward,
                       num_warps, num_stages, tiles))
    return specs


def _persistent_specs(dtype, padded, variant, padded_proj=0) -> list[_aot.CompileSpec]:
    """The persistent forward and backward at one padded H (and, for a projected LSTM, padded P)."""
    batch, hidden_size, _ = _sizes(variant, 64, padded)
    proj_size = 0
    if padded_proj:
        # Aligned: P = padded P, or the widest multiple of 16 below H where that is H itself; unaligned: an odd P
        # just below the padded size. Either way a launch the eligibility rule admits (P < H).
        if variant == "aligned":
            proj_size = padded_proj if padded_proj < hidden_size else hidden_size - 16
        else:
            proj_size = min(padded_proj - 3, hidden_size - 1)
        if proj_size <= 0:
            return []  # H = 16 has no aligned P < H: the unaligned variant covers it
        from .launch import persistent_unsupported_reason

        reason = persistent_unsupported_reason(hidden_size, dtype, proj_size)
        assert reason is None, f"AOT spec H={hidden_size}, P={proj_size}: {reason}"
    state_size = proj_size or hidden_size
    meta = configs.persistent_meta(hidden_size, dtype, proj_size)
    num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
    projected = f",PROJ{meta['PROJ']}" if proj_size else ""
    tiles = f"BB{meta['BLOCK_B']},HIDDEN{meta['HIDDEN']}{projected},w{num_warps},s{num_stages}"
    case = f"{_DTYPE_NAME[dtype]},B{batch},H{hidden_size}" + (f",P{proj_size}" if proj_size else "")
    b = _layer_buffers(dtype, STEPS, batch, hidden_size, proj_size)
    w_hh = _empty(4 * hidden_size, state_size, dtype=dtype)
    w_hr = _empty(proj_size, hidden_size, dtype=dtype) if proj_size else w_hh
    dc = _empty(batch, hidden_size, dtype=torch.float32)
    forward = dict(projection_ptr=b["projection"], w_hh_ptr=w_hh, w_hr_ptr=w_hr, bias_ptr=b["bias"],
                   lengths_ptr=b["lengths"], h_state_ptr=b["h_state"], c_state_ptr=b["c_state"], c_slots=STEPS + 1,
                   output_ptr=b["output"], hidden_saved_ptr=b["hidden_before"], gates_ptr=b["gates"], B=batch,
                   H=hidden_size, P=state_size, T=STEPS, **FEATURES, **meta)
    backward = dict(dgates_ptr=_empty(STEPS, batch, 4 * hidden_size, dtype=dtype),
                    dr_ptr=b["dr"] if proj_size else dc, w_hh_ptr=w_hh, w_hr_ptr=w_hr,
                    grad_output_ptr=b["output"], grad_h_n_ptr=_empty(batch, state_size, dtype=dtype),
                    dc_ptr=dc, gates_ptr=b["gates"], c_state_ptr=b["c_state"], lengths_ptr=b["lengths"], B=batch,
                    H=hidden_size, P=state_size, T=STEPS, HAS_GRAD_OUTPUT=True, HAS_GRAD_H_N=True, HAS_LENGTHS=True,
                    REVERSE=True, **meta)
    cell_saved = _empty(STEPS * batch, hidden_size, dtype=torch.float32)
    packed_warps = configs.persistent_meta(hidden_size, dtype, proj_size, packed=True)["num_warps"]
    packed_tiles = tiles.replace(f",w{num_warps},", f",w{packed_warps},")
    return [_spec("lstm_sequence_forward_persistent", lstm_sequence_forward_persistent_kernel, case, variant, forward,
                  num_warps, num_stages, tiles),
            _spec("lstm_sequence_backward_persistent", lstm_sequence_backward_persistent_kernel, case, variant,
                  backward, num_warps, num_stages, tiles),
            _packed_spec("lstm_sequence_forward_persistent", lstm_sequence_forward_persistent_kernel, case, variant,
                         forward, packed_warps, num_stages, packed_tiles,
                         c_state_ptr=_empty(2, batch, hidden_size, dtype=torch.float32), c_slots=2,
                         cell_saved_ptr=cell_saved),
            _packed_spec("lstm_sequence_backward_persistent", lstm_sequence_backward_persistent_kernel, case, variant,
                         backward, packed_warps, num_stages, packed_tiles, c_state_ptr=cell_saved)]


def _grid_specs(dtype, padded, variant) -> list[_aot.CompileSpec]:
    """The grid forward and backward at the GPU's tile of GRID_BLOCK_H units (BLOCK_H = HIDDEN is the interpreter's
    one program), for the largest batch the grid kernels take (GRID_MAX_BATCH; B and T are not specialised, so
    this one compile serves every batch and length)."""
    batch, hidden_size, _ = _sizes(variant, configs.GRID_MAX_BATCH, padded)
    b = _layer_buffers(dtype, STEPS, batch, hidden_size)
    w_hh = _empty(4 * hidden_size, hidden_size, dtype=dtype)
    barrier = _empty(1, dtype=torch.int32)
    case = f"{_DTYPE_NAME[dtype]},B{batch},H{hidden_size}"
    specs = []
    for kernel_name, kernel, meta in (
            ("lstm_sequence_forward_grid", lstm_sequence_forward_grid_kernel,
             configs.grid_meta(padded, configs.GRID_BLOCK_H, dtype)),
            ("lstm_sequence_backward_grid", lstm_sequence_backward_grid_kernel,
             configs.grid_backward_meta(padded, configs.GRID_BLOCK_H, dtype))):
        num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
        tiles = (f"BB{meta['BLOCK_B']},BH{meta['BLOCK_H']},HIDDEN{padded},KS{meta['K_SPLIT']},w{num_warps},"
                 f"s{num_stages}")
        if kernel is lstm_sequence_forward_grid_kernel:
            arguments = dict(projection_ptr=b["projection"], w_hh_ptr=w_hh, bias_ptr=b["bias"],
                             lengths_ptr=b["lengths"], h_state_ptr=b["h_state"], c_state_ptr=b["c_state"],
                             c_slots=STEPS + 1, output_ptr=b["output"], hidden_saved_ptr=b["hidden_before"],
                             gates_ptr=b["gates"], barrier_ptr=barrier, B=batch, H=hidden_size, T=STEPS, **FEATURES,
                             **meta)
        else:
            arguments = dict(dgates_ptr=_empty(STEPS, batch, 4 * hidden_size, dtype=dtype), w_hh_ptr=w_hh,
                             grad_output_ptr=b["output"], grad_h_n_ptr=_empty(batch, hidden_size, dtype=dtype),
                             dc_ptr=_empty(batch, hidden_size, dtype=torch.float32), gates_ptr=b["gates"],
                             c_state_ptr=b["c_state"], lengths_ptr=b["lengths"], barrier_ptr=barrier, B=batch,
                             H=hidden_size, T=STEPS, HAS_GRAD_OUTPUT=True, HAS_GRAD_H_N=True, HAS_LENGTHS=True,
                             REVERSE=True, **meta)
        specs.append(_spec(kernel_name, kernel, case, variant, arguments, num_warps, num_stages, tiles))
    return specs


def aot_specs() -> list[_aot.CompileSpec]:
    """Every LSTM kernel specialisation the compile test and the report compile."""
    specs = []
    for dtype in _DTYPE_NAME:
        variants = ("aligned", "unaligned") if dtype in UNALIGNED_DTYPES else ("aligned",)
        for variant in variants:
            seen = set()
            for bucket in configs.BATCH_BUCKETS:  # buckets sharing a config compile one kernel: once
                config = (configs.step_config(bucket, dtype), configs.step_config(bucket, dtype, projection=True))
                if config not in seen:
                    seen.add(config)
                    specs += _step_specs(dtype, bucket, variant)
            limits = configs.PERSISTENT_MAX_HIDDEN if variant == "aligned" else configs.PERSISTENT_MAX_HIDDEN_UNALIGNED
            for padded in configs.persistent_hidden_sizes(dtype):
                if padded <= limits[dtype]:
                    specs += _persistent_specs(dtype, padded, variant)
            for padded, padded_proj in configs.persistent_projection_sizes(dtype, aligned=variant == "aligned"):
                specs += _persistent_specs(dtype, padded, variant, padded_proj)
            grid_limits = configs.GRID_MAX_HIDDEN if variant == "aligned" else configs.GRID_MAX_HIDDEN_UNALIGNED
            for padded in configs.grid_hidden_sizes(dtype):
                if padded <= grid_limits[dtype]:
                    specs += _grid_specs(dtype, padded, variant)
    return specs
