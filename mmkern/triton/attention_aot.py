"""The ahead-of-time view of the Triton attention kernels: every configuration the launchers can pick
(`aot_configs`) and the Triton signature of each kernel (`_signature`), which mmkern/triton/aot.py compiles
for sm_80/sm_86/sm_90 without a GPU and checks against each architecture's shared memory."""
from __future__ import annotations

import torch

from mmkern.triton.attention import ROWWISE_BLOCK_D, ROWWISE_BLOCK_R
from mmkern.triton.attention_backward import attention_dkdv_kernel, attention_dq_kernel, backward_delta_kernel
from mmkern.triton.attention_decode import attention_decode_split_kernel, merge_attention_splits_kernel
from mmkern.triton.attention_forward import attention_forward_kernel
from mmkern.triton.attention_tiles import (_BACKWARD_ALTERNATIVES, _BACKWARD_TILES, _DECODE_TILES, _FORWARD_TILES,
                                           candidates, decode_tiles, forward_candidates)


def aot_configs():
    """Every tile configuration the launchers can pick (the tables and the autotune alternatives),
    per architecture family and dtype, compiled with every feature on (the largest code; features
    change the code, not the tiles, except the mask: the forward compiles the table's tiles without one
    and masked_tiles with one): yields (kernel, signature, constexprs, warps, stages, archs)."""
    archs = {"sm80": (80,), "sm86": (86,), "sm90": (90,)}     # sm_89 shares sm_86's table and limit
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    for family in archs:
        for bd in _FORWARD_TILES[family]:
            for name, dtype in dtypes.items():
                for masked in (False, True):     # without a mask: every other feature on; with one: all on
                    for tiles in forward_candidates(family, bd, dtype, masked):
                        yield (attention_forward_kernel, _signature(attention_forward_kernel, name),
                               dict(_constexprs(bd, tiles, name), MASK_KIND=2 if masked else 0), tiles.num_warps,
                               tiles.num_stages, archs[family])
                for tiles in candidates(_BACKWARD_TILES, _BACKWARD_ALTERNATIVES, family, bd, dtype):
                    constexprs = _constexprs(bd, tiles, name)
                    yield (attention_dq_kernel, _signature(attention_dq_kernel, name), constexprs,
                           tiles.num_warps, tiles.num_stages, archs[family])
                    yield (attention_dkdv_kernel, _signature(attention_dkdv_kernel, name),
                           dict(constexprs, MASK_GRAD=True), tiles.num_warps, tiles.num_stages, archs[family])
    # split-KV decode: sm_80 and sm_86 share a table (compiled for both limits), sm_90 its own
    for family, family_archs in (("sm80", (80, 86)), ("sm90", (90,))):
        for bd in _DECODE_TILES[family]:
            for name, dtype in dtypes.items():
                tiles = decode_tiles(family, bd, dtype)
                yield (attention_decode_split_kernel, _signature(attention_decode_split_kernel, name),
                       dict(GROUP=2, IS_VARLEN=False, HAS_SEQUSED=True, SOFTCAP=True, ALIBI=True,
                            FP32_DOT=name == "fp32", PAGED=True, HAS_LEFTPAD=True, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=bd),
                       tiles.num_warps, tiles.num_stages, family_archs)
    # the row-wise kernels: one compile per dtype serves every head dim and architecture table
    for name in dtypes:
        rowwise = dict(BLOCK_R=ROWWISE_BLOCK_R, BLOCK_D=ROWWISE_BLOCK_D)
        yield (merge_attention_splits_kernel, _signature(merge_attention_splits_kernel, name), rowwise, 4, 1,
               (80, 90))
        yield (backward_delta_kernel, _signature(backward_delta_kernel, name), dict(rowwise, HAS_DLSE=True), 4, 1,
               (80, 90))


def _constexprs(bd, tiles, dtype):
    return dict(GROUP=2, IS_VARLEN=False, HAS_SEQUSED=False, SOFTCAP=True, ALIBI=True, MASK_KIND=2, DROPOUT=True,
                FP32_DOT=dtype == "fp32",
                BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=bd)


_SCALARS = {"seqlen_q": "i32", "seqlen_k": "i32", "max_seqlen_q": "i32", "max_seqlen_k": "i32", "num_heads": "i32",
            "num_kv_heads": "i32", "head_dim": "i32", "scale": "fp32", "softcap": "fp32", "window_left": "i32",
            "window_right": "i32", "bottom_right": "i32", "dropout_p": "fp32", "seed": "i64", "split_len": "i32",
            "rows_per_batch": "i32", "total": "i32", "num_splits": "i32",
            "page_size": "i32", "num_blocks": "i32", "max_blocks": "i32"}
_FP32_POINTERS = ("Lse", "Delta", "Alibi", "OutPart", "LsePart", "DLse")
_INT_POINTERS = ("CuSeqlensQ", "CuSeqlensK", "SequsedK", "BlockTable", "LeftpadK")


def _signature(kernel, dtype: str) -> dict:
    """Triton signature of a kernel for `dtype` data: pointers, i32 strides and the runtime scalars
    (constexprs are left to aot.compile_config)."""
    constexprs = {kernel.arg_names[i] for i in kernel.constexprs}
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            continue
        if name in _SCALARS:
            sig[name] = _SCALARS[name]
        elif name.startswith("stride_"):
            sig[name] = "i32"
        elif name in _FP32_POINTERS:
            sig[name] = "*fp32"
        elif name in _INT_POINTERS:
            sig[name] = "*i32"
        else:
            sig[name] = f"*{dtype}"          # Q, K, V, Out, DO, DQ, DK, DV, Mask, DMask
    return sig
