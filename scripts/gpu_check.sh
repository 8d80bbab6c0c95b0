#!/usr/bin/env bash
# The one command for a GPU machine: build, every GPU test (CUDA backend first, then Triton), the
# benchmark selection, a report and the GPU fuzz profile, in under 10 minutes on an H200. Run from the checkout:
#
#     PYTHONPATH=. scripts/gpu_check.sh [OUT_DIR]        default OUT_DIR: benchmarks/results/<date>-<gpu>/
#     scripts/gpu_check.sh --dry-run [OUT_DIR]           on a CPU machine: everything up to the GPU steps
#
# Every step runs under `timeout` (budgets below: 580 s in all, the wheels step included; a test checks the sum)
# and the script goes on after a failed or timed-out step, so one hang cannot eat the GPU time; the exit
# status is 1 if any step failed.
#
# Wheels the GPU image lacks (diffusers, liger-kernel: scripts/gpu_wheels.sh downloads them into .whl/ on a
# machine with a registry; name .whl in the GPU call's carry) are installed first, when $MMKERN_WHEELS_DIR
# (default .whl) holds any, with `pip install --no-index --no-deps --target` into a folder of their own that
# goes first on PYTHONPATH for every later step; the image's packages stay as they are. The dry run takes
# the same path when the folder is there (.ci/run downloads it first).
#
# OUT_DIR receives at most 6 files (easy to carry back):
#     gpu_check.log   the output of every step
#     summary.txt     the versions seen (python, torch, triton, transformers, diffusers, GPU), then one line per
#                     step: name, status, seconds, and for pytest steps their counts (passed, failed, skipped, ...)
#     bench.json      pytest-benchmark JSON (device, versions, ceilings in machine_info["mmkern"])
#     report.md, tflops.png, gbps.png     `mmkern report bench.json` (the PNGs need matplotlib; without it
#                     the report says so, and `mmkern report OUT_DIR/bench.json --out OUT_DIR` redraws them
#                     on any machine that has it)
#
# Steps (dry run: what it does instead)
#   wheels       pip install --no-index --no-deps --target of $MMKERN_WHEELS_DIR/*.whl, then import each;
#                skipped (no line) without the folder           (the same, with the CPU's python)
#   env          nvidia-smi, mmkern info, tool versions    (tools present: timeout, nvcc, python, torch, triton,
#                                                           pytest, pytest-benchmark, matplotlib; every module
#   build        MMKERN_CUDA_ARCHS=<this GPU> python -m     imported; mmkern info; the build command's options)
#                mmkern build; a failed build is logged, and the Triton steps still run
#   tests_cuda_attention  the CUDA C++ attention's tests: tests/test_cuda_attention*.py, test_native_attention*.py
#   tests_cuda   pytest on the rest of the CUDA backend's tests: tests/test_native_*.py, tests/test_cuda_*.py
#   tests_triton pytest on every other test file (the Triton backend, the ops, modules, GPU-only sync
#                tests), except tests/test_triton_aot.py (a CPU compile job that CI already runs) and
#                the test that runs this script's dry run
#                (dry run: both collected with --collect-only, in one process)
#   bench        MMKERN_BENCH_SIZES=quick pytest benchmarks --benchmark-only, without torch_compile rows
#                (each compile costs 10-40 s; the full suite has them)  (a tiny timed CPU run, which
#                                                                         collects the whole suite first)
#   report       mmkern report bench.json --out OUT_DIR                (the same, on the tiny CPU run)
#   fuzz_gpu     MMKERN_FUZZ_PROFILE=gpu MMKERN_FUZZ_SEED=random pytest tests/test_fuzz_*.py   (collected in tests_collect)
set -uo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Started from inside a pytest-xdist worker (the dry-run test under `pytest -n 2`), the worker's variables would
# reach every pytest below, and pytest-benchmark takes PYTEST_XDIST_WORKER for xdist being on: it then refuses
# --benchmark-only. Each step's pytest is a session of its own.
unset PYTEST_XDIST_WORKER PYTEST_XDIST_WORKER_COUNT PYTEST_XDIST_TESTRUNUID PYTEST_CURRENT_TEST
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || PY=python

if [[ $DRY_RUN == 1 ]]; then
    OUT="${1:-${TMPDIR:-/tmp}/mmkern-gpu-check-dry-run}"
else
    GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9_.-')
    OUT="${1:-benchmarks/results/$(date -u +%Y-%m-%d)-${GPU:-gpu}}"
fi
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
FAILED=0

# step NAME SECONDS COMMAND...: run under timeout (SIGINT first, so pytest still writes its JSON), log it
step() {
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS status
    echo "== $name (limit ${seconds}s): $*" | tee -a "$LOG"
    local step_log
    step_log=$(mktemp)
    timeout -s INT -k 20 "$seconds" "$@" >"$step_log" 2>&1
    local rc=$?
    cat "$step_log" >>"$LOG"
    case $rc in
        0) status=ok ;;
        124|130|137) status="TIMEOUT after ${seconds}s"; FAILED=1 ;;
        *) status="FAILED rc=$rc"; FAILED=1 ;;
    esac
    # pytest's closing counts ("12 passed, 3 skipped, 1 failed in 4.2s"), when the step ran pytest
    local counts
    counts=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed|tests? collected)' \
             "$step_log" | tail -1 | sed -E 's/^=+ //; s/ =+$//; s/ in [0-9.]+s.*$//')
    rm -f "$step_log"
    printf '%-20s %-24s %4ss  %s\n' "$name" "$status" $((SECONDS - start)) "$counts" | tee -a "$SUMMARY"
    echo "== $name: $status" >>"$LOG"
    return 0
}

# The wheels the image lacks, into a folder of their own first on PYTHONPATH (see the header)
WHEELS_DIR="${MMKERN_WHEELS_DIR:-.whl}"
if compgen -G "$WHEELS_DIR/*.whl" >/dev/null; then
    SITE="${TMPDIR:-/tmp}/mmkern-gpu-site"
    rm -rf "$SITE"
    WHEEL_MODULES=$(for w in "$WHEELS_DIR"/*.whl; do basename "$w" | cut -d- -f1; done | tr '\n' ' ')
    step wheels 15 bash -c "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
--target '$SITE' '$WHEELS_DIR'/*.whl && PYTHONPATH='$SITE':\$PYTHONPATH $PY -c 'import importlib, sys
for name in sys.argv[1:]:
    module = importlib.import_module(name)
    print(name, getattr(module, \"__version__\", \"\"), \"from\", module.__file__)' $WHEEL_MODULES"
    grep -q '^wheels  *ok' "$SUMMARY" && export PYTHONPATH="$SITE:$PYTHONPATH"
fi

# The versions every later step sees, in the summary before the steps' lines (after the wheels step's)
"$PY" - >>"$SUMMARY" 2>&1 <<'VERSIONS'
import importlib, importlib.metadata, platform
seen = [f"python {platform.python_version()}"]
for name, module in (("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"),
                     ("diffusers", "diffusers"), ("liger-kernel", "liger_kernel")):
    try:        # the module's own version where it has one (torch's carries its CUDA tag), else the wheel's
        version = getattr(importlib.import_module(module), "__version__", None) or importlib.metadata.version(name)
        seen.append(f"{name} {version}")
    except Exception:
        seen.append(f"{name} -")
try:
    import torch
    seen.append(f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU")
except Exception:
    pass
print("versions: " + ", ".join(seen))
VERSIONS
tail -1 "$SUMMARY"

# The CUDA C++ attention's test files first, then the rest of the CUDA backend's, then every other one
# (Triton and the rest), minus the AOT compile job.
ATTENTION_TESTS=$(ls tests/test_cuda_attention*.py tests/test_native_attention*.py 2>/dev/null | tr '\n' ' ')
CUDA_TESTS=$(ls tests/test_native_*.py tests/test_cuda_*.py 2>/dev/null | grep -v -e '^tests/test_cuda_attention' \
             -e '^tests/test_native_attention' | tr '\n' ' ')
OTHER_TESTS=$(ls tests/test_*.py | grep -v -e '^tests/test_native_' -e '^tests/test_cuda_' \
              -e '^tests/test_triton_aot.py$' | tr '\n' ' ')
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfEs)
# Per-test time limit and parallel workers when the plugins are there (the H200 image has both).
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=120)
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && [[ $DRY_RUN == 0 ]] && XDIST=(-n 8)
# the CPU bandwidth and thread-crossover rows (test_bench_cpu_bandwidth.py, test_bench_cpu_threads.py) measure the
# host's memory and cores, not the GPU: CPU runs take them
BENCH_SELECT=(-k "not torch_compile and not test_cpu_bandwidth and not test_cpu_thread_crossover")
BENCH_OPTS=(--benchmark-only --benchmark-group-by=group --benchmark-max-time=0.1 --benchmark-min-rounds=5
            --benchmark-columns=median,rounds --benchmark-sort=name)

if [[ $DRY_RUN == 1 ]]; then
    echo "gpu_check.sh --dry-run: checking every step short of the GPU ones; output in $OUT" | tee -a "$LOG"
    # tools, versions, every module the GPU run imports, `mmkern info`, and the build command's parser
    step env 90 bash -c "command -v timeout && { command -v nvcc && nvcc --version | tail -1 || echo 'nvcc: not on \
PATH (the build step will say so)'; } && $PY -c 'import sys, argparse, torch, triton, pytest, pytest_benchmark
import mmkern, mmkern.bench, mmkern.bench.report, mmkern.bench.cli, mmkern.triton.aot_report, mmkern.build, mmkern.cli
print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"pytest-benchmark\", pytest_benchmark.__version__)
try:
    import matplotlib; print(\"matplotlib\", matplotlib.__version__)
except ImportError:
    print(\"matplotlib: not installed (the report is written without plots)\")
mmkern.build.add_arguments(argparse.ArgumentParser())
sys.exit(mmkern.cli.main([\"info\"]))'"
    # both test steps' files collected in one pytest process (a GPU run runs them in two)
    step tests_collect 150 "${PYTEST[@]}" --collect-only $ATTENTION_TESTS $CUDA_TESTS $OTHER_TESTS
    # pytest collects every benchmark file before -k deselects, so this also checks the whole suite's
    # collection; the selected rows run for real, at tiny sizes, through the same fixture and JSON
    step bench 180 env MMKERN_BENCH_SIZES=quick "${PYTEST[@]}" benchmarks \
        -k "(device_copy or sdpa_math) and not decode and not bwd and not diffusion" \
        "${BENCH_OPTS[@]}" --benchmark-max-time=0.01 --benchmark-min-rounds=2 --benchmark-json="$OUT/bench.json"
    step report 120 "$PY" -m mmkern report "$OUT/bench.json" --out "$OUT"
else
    step env 20 bash -c "nvidia-smi && $PY -m mmkern info && $PY -c 'import torch; assert torch.cuda.is_available(), \
\"torch sees no GPU\"; print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())'"
    ARCH=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>/dev/null)
    if [[ -z "$ARCH" ]]; then
        echo "gpu_check.sh: torch sees no CUDA GPU here; on a CPU machine run scripts/gpu_check.sh --dry-run" | tee -a "$LOG"
        exit 2
    fi
    # exported for every later step too: the native tests' and benchmarks' ensure_built() compare the
    # build against MMKERN_CUDA_ARCHS, and would rebuild for the default "80;90" without it
    export MMKERN_CUDA_ARCHS="$ARCH"
    step build 150 "$PY" -m mmkern build
    step tests_cuda_attention 90 "${PYTEST[@]}" "${XDIST[@]}" $ATTENTION_TESTS
    if [[ -n "$CUDA_TESTS" ]]; then
        step tests_cuda 40 "${PYTEST[@]}" "${XDIST[@]}" $CUDA_TESTS
    else
        echo "== tests_cuda: no CUDA-backend test files (tests/test_native_*.py, tests/test_cuda_*.py)" | tee -a "$LOG"
    fi
    # (the dry-run test would run this script's CPU rehearsal inside the GPU run: left to CI)
    step tests_triton 120 "${PYTEST[@]}" "${XDIST[@]}" $OTHER_TESTS \
        --deselect tests/test_bench_tools.py::test_gpu_check_dry_run_goes_start_to_end_on_a_cpu
    step bench 95 env MMKERN_BENCH_SIZES=quick "${PYTEST[@]}" benchmarks "${BENCH_SELECT[@]}" "${BENCH_OPTS[@]}" \
        --benchmark-json="$OUT/bench.json"
    step report 20 "$PY" -m mmkern report "$OUT/bench.json" --out "$OUT"
    # last (expendable when time is short): the fuzz suites with the GPU profile's example counts
    step fuzz_gpu 30 env MMKERN_FUZZ_PROFILE=gpu MMKERN_FUZZ_SEED=random "${PYTEST[@]}" tests/test_fuzz_attention.py tests/test_fuzz_norm.py \
        tests/test_fuzz_diffusion.py
fi

echo "files in $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
cat "$SUMMARY"
exit $FAILED
