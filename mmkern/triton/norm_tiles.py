"""Tiles of the Triton norm kernels (mmkern/triton/norm_kernels.py): the column block a row takes, its warps,
the backward's grid, the (x, residual-stream) dtype pairs compiled, and every configuration for the
ahead-of-time compile check (mmkern/triton/aot.py).
"""
from __future__ import annotations

import torch
import triton

from mmkern.triton._common import TRITON_POINTER
from mmkern.triton.norm_kernels import BACKWARD_FLAGS, FORWARD_FLAGS, norm_backward_kernel, norm_forward_kernel

MAX_N = 65536          # widest row the kernels take
# Column blocks held in registers; a row takes the smallest that covers it, wider rows loop over
# the largest (WIDE). Few sizes keep the compiled set small (a block up to 4x wider than the row
# only masks lanes: no extra memory traffic). The backward keeps more (N,)-vectors live per row, so
# its largest block is half the forward's (ptxas -v, sm_90, 16 warps: forward 8192 uses 64
# registers, backward 4096 uses 120, neither spills).
FORWARD_BLOCKS = (256, 1024, 2048, 4096, 8192)
BACKWARD_BLOCKS = (256, 1024, 2048, 4096)
# (x dtype, residual-stream dtype) pairs the kernels are compiled for
DTYPE_PAIRS = ((torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32),
               (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32))


def block_size(N: int, blocks: tuple[int, ...]) -> tuple[int, bool]:
    """(BLOCK_N, WIDE) for rows of N columns."""
    for block in blocks:
        if N <= block:
            return block, False
    return blocks[-1], True


def num_warps_for(block: int) -> int:
    return min(max(block // 256, 1), 16)


def programs_per_sample(rows_per_sample: int, batch: int, device: torch.device) -> tuple[int, int]:
    """(programs per sample, rows per program) of the backward grid: two programs per SM on a GPU
    (flash-attn's and Liger's layer norms take one; each program adds one (N,) float32 partial row
    per reduced gradient, written and read again by the final sum: at 4096 x 768 two per SM cost
    ~6% of the backward's traffic), few under the interpreter (it runs programs one by one)."""
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    programs = min(rows_per_sample, max(1, triton.cdiv(target, batch)))
    rows_per_program = triton.cdiv(rows_per_sample, programs)
    return triton.cdiv(rows_per_sample, rows_per_program), rows_per_program


def aot_configs():
    """Every (dtype pair, block size) the launchers can dispatch, for the ahead-of-time compile check.
    Integer arguments are declared i32 (seed i64): larger values compile the same code with i64."""
    def blocks(sizes):
        return [(b, False) for b in sizes] + [(sizes[-1], True)]

    flags = {name: "i32" for name in BACKWARD_FLAGS}
    for x_dtype, stream_dtype in DTYPE_PAIRS:
        xp, sp = TRITON_POINTER[x_dtype], TRITON_POINTER[stream_dtype]
        for block, wide in blocks(FORWARD_BLOCKS):
            constexprs = dict(BLOCK_N=block, WIDE=wide, ROUND_BF16=False)
            forward = {"x_ptr": xp, "residual_ptr": sp, "weight_ptr": "*fp32", "bias_ptr": "*fp32",
                       "shift_ptr": "*fp32", "scale_ptr": "*fp32", "out_ptr": xp, "pre_ptr": sp, "mean_ptr": "*fp32",
                       "rstd_ptr": "*fp32", "N": "i32", "rows_per_sample": "i32", "x_row_stride": "i32",
                       "residual_row_stride": "i32", "eps": "fp32", "dropout_p": "fp32", "dropout_scale": "fp32",
                       "seed": "i64", **{name: "i32" for name in FORWARD_FLAGS}}
            yield norm_forward_kernel, forward, constexprs, num_warps_for(block), 1
        for block, wide in blocks(BACKWARD_BLOCKS):
            constexprs = dict(BLOCK_N=block, WIDE=wide, ROUND_BF16=False)
            backward = {"dout_ptr": xp, "dpre_ptr": sp, "pre_ptr": sp, "weight_ptr": "*fp32", "bias_ptr": "*fp32",
                        "scale_ptr": "*fp32", "dx_ptr": xp,
                        "dresidual_ptr": sp, "dweight_part_ptr": "*fp32", "dbias_part_ptr": "*fp32",
                        "dshift_part_ptr": "*fp32", "dscale_part_ptr": "*fp32", "row_stats_ptr": "*fp32", "N": "i32",
                        "rows_per_sample": "i32", "rows_per_program": "i32", "programs_per_sample": "i32",
                        "dout_row_stride": "i32", "dpre_row_stride": "i32", "eps": "fp32", "dropout_p": "fp32",
                        "dropout_scale": "fp32", "seed": "i64", **flags}
            yield norm_backward_kernel, backward, constexprs, num_warps_for(block), 1
