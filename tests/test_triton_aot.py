"""Every dispatchable Triton kernel configuration compiles ahead of time for sm_80 and sm_90
(no GPU needed) and fits the shared memory of each architecture; see mmkern/triton/aot.py."""
import os
import subprocess
import sys


def test_every_triton_configuration_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "mmkern.triton.aot"], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert " 0 failed" in proc.stdout.splitlines()[-1]
    assert "sm_80" in proc.stdout and "sm_90" in proc.stdout
    # Hopper: the 16-bit attention matrix products lower to warpgroup MMA (wgmma); sm_80 to mma.sync
    hopper = [l for l in proc.stdout.splitlines() if l.startswith("sm_90 attention") and "*fp32" not in l]
    ampere = [l for l in proc.stdout.splitlines() if l.startswith("sm_80 attention") and "*fp32" not in l]
    assert hopper and all(" wgmma " in l for l in hopper)
    assert ampere and all(" mma " in l for l in ampere)


REGISTER_CHECK = r"""
import torch
from mmkern.triton import aot, attention_aot as AA, attention_tiles as A
from mmkern.triton.attention_backward import attention_dkdv_kernel
from mmkern.triton.attention_forward import attention_forward_kernel

off = dict(SOFTCAP=False, ALIBI=False, MASK_KIND=0, DROPOUT=False)
cases = [  # (kernel, dtype, head dim, tiles, features): the configurations ptxas gave 32 registers
    (attention_forward_kernel, "bf16", 64, A.forward_candidates("sm80", 64, torch.bfloat16, masked=True)[0],
     dict(MASK_KIND=1)),
    (attention_forward_kernel, "fp32", 128, A.forward_candidates("sm80", 128, torch.float32, masked=False)[0], off),
    (attention_dkdv_kernel, "fp32", 64, A.tiles_for(A._BACKWARD_TILES, "sm80", 64, torch.float32),
     dict(off, MASK_GRAD=False)),
]
for kernel, dtype, bd, tiles, features in cases:
    constexprs = dict(AA._constexprs(bd, tiles, dtype), **features)
    got = aot.compile_config(kernel, AA._signature(kernel, dtype), constexprs, tiles.num_warps, tiles.num_stages, 80,
                             resources=True)
    print(kernel.__name__, dtype, bd, tiles, got.registers, got.spill_stores, got.error)
"""


def test_attention_kernels_are_not_given_32_registers():
    """ptxas gave these configurations 32 registers and 16-21 KB of spills per thread (mmkern/triton/_common.py
    FULL_REGISTER_FILE; attention.py masked_tiles, fp32_forward_tiles). With the options and tiles the
    launchers use, each gets a normal allocation and spills under 4 KB."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", REGISTER_CHECK], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3, proc.stdout
    for line in lines:
        *_, registers, spills, error = line.split()
        assert error == "None" and int(registers) > 128 and int(spills) < 4096, line
