"""Triton LSTM kernels: the fused cell step and the layer recurrence, forward and backward.

Every forward kernel is a GEMM whose epilogue is the LSTM update: a tile of hidden units j computes
the four gate tiles (rows j, H+j, 2H+j, 3H+j of the weights) side by side, so the 4H gate
pre-activations never reach memory. Every backward kernel is the mirror image: the recurrent GEMM
dh_{t-1} = dgates_t · W_hh with the gate-gradient pointwise math in its epilogue.

Layer (sequence) path: the input projection of all steps is one torch GEMM; the recurrence runs
  * stepwise: one launch of ``lstm_sequence_step_forward_kernel`` per time step (any size), or
  * persistent: ``lstm_sequence_forward_persistent_kernel`` loops over time inside one launch; each
    program owns a batch tile and every hidden unit with W_hh held in registers, so programs never
    wait for each other (it runs under the interpreter too). For small hidden sizes.
  * grid: ``lstm_sequence_forward_grid_kernel`` loops over time inside one launch for large hidden
    sizes at small batch; each program owns a tile of hidden units (its rows of W_hh on chip) for
    every batch row, and all programs meet at a global-memory barrier after each step. Valid only
    when every program is resident at once (checked from the compiled kernel's occupancy, launched
    cooperatively); one program under the interpreter.
Backward through time runs persistent, grid (``lstm_sequence_backward_grid_kernel``: W_hh's column slice per
program, a grid barrier per step; after a grid forward where its own occupancy rule admits the call) or stepwise;
dW_ih, dW_hh, dx and the bias gradient are one GEMM
(or sum) each over the stacked gate gradients at the end. The caller chooses the recurrence
(``recurrence=``); the ``*_unsupported_reason`` functions say which can run.
A projection (``weight_hr``, proj_size > 0) runs in the persistent kernels (W_hh and W_hr on chip) and the
stepwise path (a second launch per step for r = m·W_hrᵀ), not in the grid kernel; dW_hr is one GEMM at the end.

Modules: ``common`` (jit helpers), ``cell`` (one step), ``sequence`` (the recurrences), ``configs``
(tiles and limits), ``launch`` (launchers and eligibility), ``aot`` (ahead-of-time compile specs).
"""

from .configs import (  # noqa: F401
    BACKWARD_RECURRENCES,
    FORWARD_RECURRENCES,
    GRID_BLOCK_B,
    GRID_BLOCK_H,
    GRID_BACKWARD_COMPILED,
    GRID_COMPILED,
    GRID_MAX_BATCH,
    GRID_MAX_HIDDEN,
    GRID_MAX_HIDDEN_UNALIGNED,
    PERSISTENT_BLOCK_B,
    PERSISTENT_MAX_HIDDEN,
    PERSISTENT_MAX_HIDDEN_UNALIGNED,
    STEP_CONFIGS,
    hidden_pad,
    step_config,
)
from .launch import (  # noqa: F401
    SmResources,
    backward_after_grid,
    grid_backward_unsupported_reason,
    grid_programs,
    grid_residency_reason,
    grid_unsupported_reason,
    lstm_cell_backward,
    lstm_cell_forward,
    lstm_sequence_backward,
    lstm_sequence_forward,
    persistent_unsupported_reason,
    resident_programs,
)
