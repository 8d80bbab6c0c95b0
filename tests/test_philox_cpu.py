"""The CPU dropout's vectorised Philox (csrc/common/philox_cpu.h) against the numpy model of tl.rand.

The header is compiled on its own (it needs no torch) into a small program, once with the flags of the AVX2
build and once portable, and run at counters the extension's tests cannot reach: offsets whose low word
wraps inside a group of eight (the carry into the high word), offsets above 2^32, 2^63, large seeds. Every
lane of philox_bits_x8 must equal the scalar philox_bits, and dropout_scale must keep exactly the elements
of the numpy model (tests/philox_model.py: philox_keep) and scale them exactly.
"""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from mmkern import build
from philox_model import philox_keep

DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include "common/philox_cpu.h"

// argv: p, then (seed, offset) pairs. Prints per pair: the 8 vector lanes, the 8 scalar words, and the 19
// values of dropout_scale over a[j] = j + 1 (so 0 marks a dropped element).
int main(int argc, char** argv) {
  const float p = std::strtof(argv[1], nullptr), scale = 1.0f / (1.0f - p);
  for (int i = 2; i + 1 < argc; i += 2) {
    const uint64_t seed = std::strtoull(argv[i], nullptr, 10), offset = std::strtoull(argv[i + 1], nullptr, 10);
    uint32_t bits[mmkern::kPhiloxLanes];
    mmkern::philox_bits_x8(seed, offset, bits);
    for (int l = 0; l < mmkern::kPhiloxLanes; ++l) std::printf("%u ", bits[l]);
    for (int l = 0; l < mmkern::kPhiloxLanes; ++l) std::printf("%u ", mmkern::philox_bits(seed, offset + l));
    float a[19];
    for (int j = 0; j < 19; ++j) a[j] = static_cast<float>(j + 1);
    mmkern::dropout_scale(a, 19, seed, offset, p, scale);
    for (int j = 0; j < 19; ++j) std::printf("%.9g ", a[j]);
    std::printf("\n");
  }
  return 0;
}
"""

CASES = [(0, 0), (12345, 1000), (2**62 - 1, 2**32 - 3), (7, 2**32 - 8), (7, 2**32 - 1), (99, 2**32 + 5),
         (2**64 - 1, 2**63 + 2**32 - 6), (2**61 + 3, 5 * 2**32 - 17), (31337, 2**40 + 123456789)]
P = 0.3


def _flag_sets():
    sets = [("portable", ["-O2"])]
    if build.cpu_isa() == "avx2":
        sets.append(("avx2", ["-O3", "-mavx2", "-mfma", "-mf16c"]))
    return sets


@pytest.fixture(scope="module")
def compiler():
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH (the extension's build needs one too)")
    return cxx


@pytest.mark.parametrize("isa,flags", _flag_sets(), ids=[name for name, _ in _flag_sets()])
def test_vector_philox_matches_the_scalar_stream_and_tl_rand(compiler, tmp_path, isa, flags):
    source = tmp_path / "philox_check.cpp"
    source.write_text(DRIVER)
    exe = tmp_path / "philox_check"
    subprocess.run([compiler, "-std=c++17", *flags, f"-I{build.CSRC_DIR}", str(source), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    args = [str(P)] + [str(v) for case in CASES for v in case]
    lines = subprocess.run([str(exe), *args], check=True, capture_output=True, text=True).stdout.splitlines()
    assert len(lines) == len(CASES)
    for (seed, offset), line in zip(CASES, lines):
        fields = line.split()
        vector, scalar = fields[:8], fields[8:16]
        assert vector == scalar, f"{isa}: seed {seed} offset {offset}: lanes differ from philox_bits"
        values = np.array([float(v) for v in fields[16:]], dtype=np.float32)
        keep = philox_keep(seed, np.arange(offset, offset + 19, dtype=np.uint64), P)
        expected = np.where(keep, np.arange(1, 20, dtype=np.float32) * np.float32(1.0 / (1.0 - P)), 0)
        assert np.array_equal(values != 0, keep), f"{isa}: seed {seed} offset {offset}: mask differs from tl.rand"
        np.testing.assert_allclose(values, expected, rtol=3e-7, atol=0)   # scale: float vs double 1 / (1 - p)
