"""`mmkern info` and `mmkern verify` run as a user would run them, in a fresh process."""
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "mmkern", *args], capture_output=True, text=True, timeout=600)


def test_info_lists_versions_and_every_backend_with_its_state():
    from mmkern import dispatch

    out = run("info")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for expected in ("mmkern 0.1.0", "python ", "torch ", "triton "):
        assert any(line.startswith(expected) for line in lines), (expected, out.stdout)
    # the backends block: every registered backend, in priority order, with the state and the ops this process's
    # registry gives it (the child inherits conftest's TRITON_INTERPRET, so both see the same environment)
    block = lines[lines.index("backends:") + 1:]
    names = [line.split()[0] for line in block if line[2:3] != " "]
    assert names == list(dispatch.backends()) == list(dispatch.PRIORITY), out.stdout
    for name, backend in dispatch.backends().items():
        reasons = dispatch.environment_reasons(name)
        state = "unavailable: " + "; ".join(reasons) if reasons else "usable" if backend.kernels else "no kernels yet"
        assert f"  {name:<10} {state}" in lines, (name, state, out.stdout)
        if backend.kernels:
            assert f"  {'':<10} ops: {', '.join(sorted(backend.kernels))}" in lines, (name, out.stdout)
    assert "  reference  usable" in lines, out.stdout


def test_verify_prints_a_passing_table():
    out = run("verify")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["op", "backend", "dtype", "shape"]
    for op in ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "scaled_dot_product_attention",
               "layer_norm_residual", "rms_norm_residual", "diffusion.add_noise", "diffusion.get_velocity"):
        assert any(line.startswith(op) for line in lines), op
    assert "reference vs torch" in out.stdout
    assert " 0 failed" in lines[-1] and "FAIL" not in out.stdout


def test_verify_json_for_one_backend():
    import json
    out = run("verify", "--backend", "reference", "--json")
    rows = json.loads(out.stdout)
    assert rows and all(r["backend"] == "reference" and r["error"] <= r["tolerance"] for r in rows)
