"""The compiled extension mmkern._C: it builds (CPU kernels, and CUDA kernels for sm_80 and sm_90 where
nvcc and a CUDA build of torch are present, as in CI), loads, registers its ops, has no register spills
in any CUDA kernel (ptxas report for sm_90), and a missing, stale or broken build never breaks
`import mmkern`.

The fixture builds with mmkern.build.ensure_built(): the first run compiles (minutes, on 2 cores), later
runs reuse the build while its stamp matches (torch version, sources, flags).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import mmkern
from mmkern import build, native

CUDA_OPTED_OUT = os.environ.get("MMKERN_BUILD_CUDA") == "0"


@pytest.fixture(scope="module")
def extension():
    return build.ensure_built()


@pytest.fixture(scope="module")
def stamp(extension):
    found = native.find_build()
    assert found is not None
    return build.read_stamp(found[0])


def test_it_loads_as_mmkern_C_and_registers_its_ops(extension):
    assert extension is sys.modules["mmkern._C"] and extension.__name__ == "mmkern._C"
    assert not native.extension_reasons()
    assert {"norm_forward", "norm_backward", "dropout_keep_mask"} <= set(native.op_names())
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mmkern_C::norm_forward", "CPU")
    assert native.cpp_op("norm_forward") is torch.ops.mmkern_C.norm_forward
    assert "cpu" in mmkern.available_backends()


def test_the_stamp_says_what_was_built(stamp):
    assert stamp["torch"] == torch.__version__ and build.stale_reason(stamp) is None
    assert stamp["build_seconds"] > 0 and stamp["source_hash"] == build.configuration()["source_hash"]


@pytest.mark.skipif(CUDA_OPTED_OUT, reason="MMKERN_BUILD_CUDA=0: a CPU-only build was asked for")
def test_cuda_kernels_are_compiled_for_sm80_and_sm90(stamp):
    reason = build.cuda_unavailable_reason()
    assert reason is None, f"CI builds the CUDA kernels; here they cannot be built: {reason}"
    assert stamp["with_cuda"] and stamp["cuda_archs"] == build.cuda_archs()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mmkern_C::norm_forward", "CUDA")
    # the SASS in the .so's fat binaries (what `cuobjdump --list-elf` lists; read from the fatbin headers,
    # since a minimal CUDA toolkit has no cuobjdump)
    code = build.embedded_cuda_code(native.find_build()[1])
    sass = {arch for kind, arch in code if kind == "sass"}
    assert {int(a) for a in build.cuda_archs() if a.isdigit()} <= sass, code


@pytest.mark.skipif(CUDA_OPTED_OUT, reason="MMKERN_BUILD_CUDA=0: a CPU-only build was asked for")
def test_no_cuda_kernel_spills_registers_on_sm90(stamp):
    """The build log's `ptxas -v` report, per kernel and architecture (mmkern build keeps it in the stamp)."""
    records = [r for r in stamp["ptxas"] if r["arch"] == "sm_90"]
    assert records, "the build log has no ptxas report for sm_90"
    names = " ".join(r["kernel"] for r in records)
    assert "norm_forward_kernel" in names and "norm_backward_kernel" in names
    spills = [r for r in records if r["spill_stores"] or r["spill_loads"]]
    assert not spills, json.dumps(spills, indent=1)
    assert all(r["registers"] is not None and r["registers"] <= 255 for r in records)


def test_ptxas_report_parser():
    log = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z3fooPf\n"
           "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 384 bytes cmem[0]\n")
    assert build.parse_ptxas(log) == [{"kernel": "_Z3fooPf", "arch": "sm_90", "registers": 40, "stack": 8,
                                       "spill_stores": 4, "spill_loads": 4}]


def test_cuda_archs_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MMKERN_CUDA_ARCHS", "sm_80, 9.0;100a")
    assert build.cuda_archs() == ["80", "90", "100a"]
    monkeypatch.setenv("MMKERN_CUDA_ARCHS", "ampere")
    with pytest.raises(ValueError, match="MMKERN_CUDA_ARCHS"):
        build.cuda_archs()


def test_a_stale_stamp_is_a_reason_not_an_error():
    assert "no build stamp" in build.stale_reason(None)
    assert "built for torch 0.0.1" in build.stale_reason({"torch": "0.0.1"})
    fresh = dict(build.configuration(), torch=torch.__version__)
    assert build.stale_reason(dict(fresh, source_hash="0" * 64)) == "csrc/ or the build settings changed since it " \
                                                                      "was built"


def test_a_build_asked_for_without_cuda_is_current_for_the_cpu_kernels(monkeypatch):
    """`mmkern build --cpu-only` (README's first command) on a machine that could compile CUDA too: the cpu backend
    uses it; ensure_built and `mmkern build --if-stale` (accept_cpu_only=False) still want the CUDA kernels."""
    monkeypatch.delenv("MMKERN_BUILD_CUDA", raising=False)
    cpu_only = build.configuration(cpu_only=True)
    assert cpu_only["with_cuda"] is False and cpu_only["no_cuda_reason"] == "MMKERN_BUILD_CUDA=0"
    assert build.stale_reason(cpu_only) is None
    if build.cuda_unavailable_reason() is None:          # nvcc and a CUDA torch: the full build differs
        assert build.stale_reason(cpu_only, accept_cpu_only=False) is not None
    # a build that lacks CUDA for another reason (no toolkit then) is judged as this machine would build it
    other = dict(cpu_only, no_cuda_reason="no CUDA toolkit")
    assert build.stale_reason(other) == build.stale_reason(other, accept_cpu_only=False)


def _info(env_dir):
    env = dict(os.environ, MMKERN_BUILD_DIR=str(env_dir))
    return subprocess.run([sys.executable, "-m", "mmkern", "info"], env=env, capture_output=True, text=True,
                          check=True).stdout


def test_missing_or_broken_builds_leave_import_mmkern_working(tmp_path):
    assert "cpu        unavailable: the compiled extension mmkern._C is not built" in _info(tmp_path)
    (tmp_path / build.so_name()).write_bytes(b"not a shared library")
    (tmp_path / build.STAMP_NAME).write_text(json.dumps(dict(build.configuration())))
    out = _info(tmp_path)
    assert "mmkern._C" in out and "failed to load" in out and "reference  usable" in out
    (tmp_path / build.STAMP_NAME).write_text(json.dumps({"torch": "0.0.1"}))
    assert "is stale: it was built for torch 0.0.1" in _info(tmp_path)


def test_missing_ops_are_reasons(extension):
    assert native.missing_op_reasons("norm_forward", device="cpu") == []
    assert native.missing_op_reasons("no_such_op") == ["mmkern._C was built without mmkern_C::no_such_op; run "
                                                      "`mmkern build`"]


def test_plain_setup_py_compiles_nothing():
    """`pip install` runs setup.py without build_ext: nothing may compile (or import torch's build tools)."""
    code = ("import runpy, sys; sys.argv = ['setup.py', '--name']; runpy.run_path('setup.py');"
            "print('torch.utils.cpp_extension' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=build.REPO_DIR, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
