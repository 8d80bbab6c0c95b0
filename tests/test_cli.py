"""`mmkern info` and `mmkern verify` run as a user would run them, in a fresh process."""
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "mmkern", *args], capture_output=True, text=True, timeout=600)


def test_info_lists_versions_and_every_backend_with_its_state():
    out = run("info")
    assert out.returncode == 0, out.stderr
    for expected in ("mmkern 0.1.0", "torch ", "triton ", "reference  usable", "cuda ", "triton ", "cpu "):
        assert expected in out.stdout
    assert "unavailable:" in out.stdout or "usable" in out.stdout


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
