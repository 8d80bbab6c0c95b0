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
