"""The benchmark tools (mmkern/bench, scripts/gpu_check.sh, mmkern aot-report), without a GPU:
the clocks and the measuring loop, the FLOP/byte counts and rates, the report from a saved JSON
(Markdown and PNG plots), `mmkern bench`, the GPU script's dry run, and aot-report on one config."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmkern.bench import counts, report, timing
from mmkern.bench.ceilings import Ceilings

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_clock_and_measuring_loop_time_a_known_sleep():
    assert timing.clock_for("cpu") is time.perf_counter
    calls = []

    def nap(seconds):
        calls.append(seconds)
        time.sleep(seconds)
    estimate = timing.warm_up(nap, (0.005,), min_calls=3, min_seconds=0.0)
    assert len(calls) == 4 and estimate >= 0.005           # the first (compiling) call is not timed
    times = timing.time_function(nap, (0.005,), "cpu", max_time=0.02, min_rounds=4)
    assert len(times) >= 4 and all(t >= 0.005 for t in times)
    assert 0.005 <= timing.median(times) < 0.5


def test_warm_up_with_setup_gives_each_call_fresh_arguments():
    made, seen = [], []

    def setup():
        made.append(torch.randn(3))
        return (made[-1],)
    timing.warm_up(lambda x: seen.append(x), setup=setup, min_calls=2, min_seconds=0.0)
    assert len(made) == len(seen) == 3 and all(a is b for a, b in zip(made, seen))


def test_choose_rounds_fits_the_time_and_keeps_the_minimum():
    assert timing.choose_rounds(0.01, max_time=1.0, min_rounds=5) == 100
    assert timing.choose_rounds(10.0, max_time=1.0, min_rounds=5) == 5
    assert timing.choose_rounds(0.0, max_rounds=7) == 7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events need a GPU")
def test_cuda_event_clock_measures_device_time_not_the_launch():
    clock = timing.CudaEventClock()
    a = torch.randn(4096, 4096, device="cuda")
    a @ a
    start = clock()
    for _ in range(20):
        a @ a                                        # queued asynchronously
    elapsed = clock() - start
    host = time.perf_counter()
    a @ a
    launch = time.perf_counter() - host
    assert elapsed > 5 * launch                      # the clock waited for the kernels


def test_attention_flops_follow_the_issue_convention():
    b, h, l, d = 2, 3, 128, 64
    forward = 4 * b * h * l * l * d
    assert counts.attention_flops(b, h, l, l, d) == forward
    assert counts.attention_flops(b, h, l, l, d, causal=True) == forward / 2
    assert counts.attention_flops(b, h, l, l, d, pass_="bwd") == 2.5 * forward
    assert counts.attention_flops(b, h, l, l, d, causal=True, pass_="fwd+bwd") == 3.5 * forward / 2
    assert counts.attention_flops(1, 1, 1, 4096, 128) == 4 * 4096 * 128          # decode: Lq != Lk
    with pytest.raises(ValueError, match="pass_"):
        counts.attention_flops(b, h, l, l, d, pass_="backward")


def test_attention_bytes_count_each_tensor_once():
    # forward: q, k, v read, out written; bf16 (2 bytes)
    assert counts.attention_bytes(1, 2, 16, 32, 8, 2) == (2 * 2 * 16 * 8 + 2 * 2 * 32 * 8) * 2
    # decode against a GQA cache: k and v caches (kv heads) + q and out (query heads)
    assert counts.attention_decode_bytes(4, 32, 8, 1, 4096, 128, 2) == (2 * 4 * 8 * 4096 * 128 + 2 * 4 * 32 * 128) * 2


def test_rates_and_fractions_of_the_ceilings():
    ceilings = Ceilings("test device", copy_gbps=1000.0, matmul_tflops=500.0, matmul_dtype="bfloat16")
    info = counts.rates(0.002, flops=2e12, bytes_moved=1e9, ceilings=ceilings)
    assert info["TFLOP/s"] == 1000.0 and info["fraction_of_matmul"] == 2.0
    assert info["GB/s"] == 500.0 and info["fraction_of_copy"] == 0.5
    assert info["ceiling_copy_GB/s"] == 1000.0 and info["ceiling_matmul_TFLOP/s"] == 500.0
    assert "TFLOP/s" not in counts.rates(0.001, bytes_moved=1e6)
    assert counts.rates(0.0, flops=1.0) == {}


def _saved_json(path: Path) -> Path:
    """A small pytest-benchmark JSON as the suites write it (two implementations, two seqlens, a norm)."""
    benchmarks = []
    for impl, tflops in (("mmkern_triton", 400.0), ("sdpa_cudnn", 500.0)):
        for seqlen in (1024, 4096):
            seconds = 4 * seqlen * seqlen * 128 * 16 / (tflops * 1e12)
            benchmarks.append(dict(
                group=f"attention fwd bf16 d128 causal L{seqlen}", name=f"test_attention[{impl}-L{seqlen}]",
                params={"impl": impl}, stats=dict(median=seconds, min=seconds, rounds=10),
                extra_info={"impl": impl, "series": "attention fwd bf16 d128 causal", "x": seqlen,
                            "x_label": "sequence length", "TFLOP/s": tflops, "fraction_of_matmul": tflops / 790,
                            "shape": f"B1 H16 L{seqlen} D128"}))
    for impl, gbps in (("device_copy", 4300.0), ("torch_eager", 1200.0)):
        benchmarks.append(dict(group="layer_norm_residual forward 4096x768", name=f"test_norm[{impl}]",
                               params={"impl": impl}, stats=dict(median=1e-5, min=1e-5, rounds=100),
                               extra_info={"impl": impl, "series": "layer_norm_residual forward bfloat16",
                                           "x": 768, "x_label": "hidden size", "GB/s": gbps,
                                           "fraction_of_copy": gbps / 4300}))
    benchmarks.append(dict(group="disabled", name="test_disabled", stats=None, extra_info={}))   # skipped row
    data = dict(datetime="2026-11-29T00:00:00", commit_info={"id": "abc123"}, benchmarks=benchmarks,
                machine_info={"mmkern": {"device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0",
                                         "mmkern": "0.1.0", "ceilings": {"device": "NVIDIA H200", "copy_gbps": 4300.0,
                                                                         "matmul_tflops": 790.0,
                                                                         "matmul_dtype": "bfloat16"}}})
    path.write_text(json.dumps(data))
    return path


def test_report_markdown_from_a_saved_json(tmp_path):
    headers, rows = report.load([str(_saved_json(tmp_path / "run.json"))])
    assert len(rows) == 6 and headers[0]["device"] == "NVIDIA H200"
    text = report.markdown(headers, rows, [])
    assert "NVIDIA H200" in text and "torch 2.11.0" in text and "triton 3.6.0" in text
    assert "790 TFLOP/s" in text and "4300 GB/s" in text                     # the measured ceilings
    table = text[text.index("### attention fwd bf16 d128 causal L4096"):]
    first, second = [l for l in table.splitlines() if l.startswith("| sdpa") or l.startswith("| mmkern")][:2]
    assert first.startswith("| sdpa_cudnn") and first.endswith("1.00x |")    # fastest first
    assert second.startswith("| mmkern_triton") and second.endswith("1.25x |")


def test_report_writes_markdown_and_png_plots(tmp_path):
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (pip install matplotlib)")
    md, plots, note = report.write_report([str(_saved_json(tmp_path / "run.json"))], tmp_path / "out")
    assert note == "" and sorted(p.name for p in plots) == ["gbps.png", "tflops.png"]
    for p in plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert "![tflops.png](tflops.png)" in md.read_text()


def test_report_without_matplotlib_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib -> ImportError
    md, plots, note = report.write_report([str(_saved_json(tmp_path / "run.json"))], tmp_path / "out")
    assert plots == [] and "matplotlib is not installed" in md.read_text()
    assert not list((tmp_path / "out").glob("*.png"))


def test_report_rejects_a_file_that_is_not_benchmark_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not pytest-benchmark JSON"):
        report.load([str(bad)])


def _run(*args, env=None, timeout=600):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_mmkern_bench_prints_a_table_and_writes_json_the_report_reads(tmp_path):
    out = _run(sys.executable, "-m", "mmkern", "bench", "--only", "diffusion", "--max-time", "0.01",
               "--json", str(tmp_path / "quick.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "device_copy" in out.stdout and "torch_eager" in out.stdout and "GB/s" in out.stdout
    headers, rows = report.load([str(tmp_path / "quick.json")])
    assert {r.impl for r in rows} >= {"device_copy", "torch_eager"}
    assert headers[0]["ceilings"]["copy_gbps"] > 0 and all(r.info["GB/s"] > 0 for r in rows)


def test_gpu_check_dry_run_goes_start_to_end_on_a_cpu(tmp_path):
    """The GPU script's rehearsal. With MMKERN_WHEELS_DIR set (.ci/run's second environment sets it to what
    scripts/gpu_wheels.sh downloaded), it also installs and imports the wheels a GPU run carries."""
    wheels_dir = Path(os.environ.get("MMKERN_WHEELS_DIR", ROOT / ".whl"))
    carries_wheels = any(wheels_dir.glob("*.whl"))
    out = _run("bash", "scripts/gpu_check.sh", "--dry-run", str(tmp_path / "out"), timeout=900,
               env={**os.environ, "PYTHON": sys.executable})
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert out.returncode == 0, summary + out.stdout[-4000:] + (tmp_path / "out" / "gpu_check.log").read_text()[-6000:]
    lines = summary.splitlines()
    versions = [line for line in lines if line.startswith("versions: ")]
    steps = [line.split() for line in lines if not line.startswith("versions: ")]
    assert [s[0] for s in steps] == ["wheels"] * carries_wheels + ["env", "tests_collect", "bench", "report"]
    assert all(s[1] == "ok" for s in steps), summary
    # the versions every step saw, and pytest's counts on the pytest steps' lines
    assert len(versions) == 1 and f"torch {torch.__version__}" in versions[0] and "triton " in versions[0]
    if carries_wheels:
        assert "diffusers -" not in versions[0], summary       # the carried diffusers is what the steps import
    collect, bench = (" ".join(next(s for s in steps if s[0] == name)) for name in ("tests_collect", "bench"))
    assert " tests collected" in collect and " passed" in bench, summary
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert {"gpu_check.log", "summary.txt", "bench.json", "report.md"} <= set(files) and len(files) < 8
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["benchmarks"]     # timed rows, not disabled
    assert "# mmkern benchmark report" in (tmp_path / "out" / "report.md").read_text()


def test_gpu_check_budgets_fit_one_device_call():
    """The GPU run's step budgets (the wheels step, then the GPU branch) add up to at most 580 s: one device call
    may run 600 s, and the script itself needs a few seconds around its steps."""
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    gpu_branch = script.split("\nelse\n    step env ", 1)[1].split("\nfi\n", 1)[0]
    budgets = dict(re.findall(r"^\s*step (\w+) (\d+) ", script.split("# The versions every later step sees")[0],
                              re.M))           # the wheels step, before both branches
    budgets.update(env=gpu_branch.split()[0])
    budgets.update(re.findall(r"^\s*step (\w+) (\d+) ", gpu_branch, re.M))
    assert list(budgets) == ["wheels", "env", "build", "tests_cuda_attention", "tests_cuda", "tests_triton", "bench",
                             "report", "fuzz_gpu"]
    assert sum(int(seconds) for seconds in budgets.values()) <= 580, budgets


def test_aot_report_on_one_filtered_configuration(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = _run(sys.executable, "-m", "mmkern", "aot-report", "--filter", "_euler_add_noise_kernel", "--filter", "fp32",
               "--arch", "90", "--limit", "1", "--json", str(tmp_path / "aot.json"), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    [row] = json.loads((tmp_path / "aot.json").read_text())
    assert row["kernel"] == "_euler_add_noise_kernel" and row["arch"] == "sm_90" and row["ok"]
    assert 0 < row["registers"] <= 255 and row["spill_stores"] == 0 and row["spill_loads"] == 0
    assert row["shared"] <= row["shared_limit"] and row["matrix_units"] == "-"
    assert "| _euler_add_noise_kernel | fp32 | sm_90 |" in out.stdout and "1 compiled, 0 failed" in out.stdout


def test_aot_report_refuses_the_interpreter(monkeypatch):
    import argparse

    from mmkern.triton import aot_report
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    parser = argparse.ArgumentParser()
    aot_report.add_arguments(parser)
    assert aot_report.main(parser.parse_args(["--list"])) == 2      # the interpreter replaces the compiler
