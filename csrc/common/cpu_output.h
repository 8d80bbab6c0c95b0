// Output tensors of the C++ CPU kernels: buffers recycled through a bounded process-wide cache, and
// transparent huge pages asked for large ones.
//
// Why a cache: a fresh CPU buffer costs a page fault and a page clear per 4 KiB on first touch. glibc serves
// large blocks with a fresh mmap (and trims freed memory at the top of the heap back to the kernel), so an op
// whose outputs are freed before the next call pays that every call: measured on a 2-core VM, residual +
// LayerNorm on 256 x 1024 fp32 (two 1 MiB outputs) took 1.8 ms per call against 0.13 ms with the outputs
// recycled, and at 256 MiB per tensor the faults were half the time. So an output buffer of at least
// kCachedOutputMin bytes comes from here: a freed buffer goes back to a free list by its (rounded) size, up to
// a total of MMKERN_CPU_OUTPUT_CACHE_MIB (default 1024; 0 turns the cache off), and the next output of that
// size reuses it, already mapped. What the cache holds is only ever memory the process freed; release it
// with mmkern.native.release_cpu_output_cache() (torch.ops.mmkern_C.cpu_output_cache(True)).
//
// Huge pages: a buffer of at least kHugePageOutputMin bytes is 2 MiB aligned and advised MADV_HUGEPAGE before
// anything touches it (512 faults per 2 MiB become one). torch does the same for every CPU allocation when the
// process runs with THP_MEM_ALLOC_ENABLE=1. The advice is a hint: with THP off it changes nothing. Linux only.
//
// MMKERN_CPU_OUTPUT_POISON=1 (for tests) fills every output buffer with 0xFF bytes before the kernel gets it
// (NaN in every float dtype), fresh or recycled and of any size, so an element a kernel forgets to write shows.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace mmkern {

constexpr int64_t kCachedOutputMin = int64_t{64} << 10;    // smaller buffers: malloc's heap serves them well
constexpr int64_t kHugePageBytes = int64_t{2} << 20;
constexpr int64_t kHugePageOutputMin = int64_t{8} << 20;

// at::empty(sizes, options) (contiguous) for an output the kernel writes in full (see above).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// {bytes held free, buffers held free, reuses, fresh allocations since the process started, limit in MiB}.
// limit_mib >= 0 sets the limit first (0: no caching); release = true (or a limit below what is held) frees what
// is held.
std::vector<int64_t> cpu_output_cache(bool release, int64_t limit_mib);

}  // namespace mmkern
