// Output tensors of the C++ CPU kernels: at::empty, with transparent huge pages asked for large ones.
//
// Why: a large CPU tensor (glibc serves >= 32 MiB with a fresh mmap) costs a page fault per 4 KiB page on
// first touch: about 9 ms for 32 MiB on a 2-core VM, more than the whole residual + LayerNorm forward at
// 8192 x 1024 fp32 (two such outputs) spends computing. Advising the 2 MiB-aligned interior of the fresh
// buffer with MADV_HUGEPAGE before anything touches it turns 512 faults into one per 2 MiB. torch does the
// same for every CPU allocation when the process runs with THP_MEM_ALLOC_ENABLE=1; here it is done for
// mmkern's outputs only. The advice is a hint: on a kernel with THP off (or "never"), or on memory already
// touched (a reused heap block), nothing changes, and an error is ignored. Linux only.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mmkern {

constexpr int64_t kHugePageBytes = int64_t{2} << 20;
constexpr int64_t kHugePageOutputMin = int64_t{8} << 20;   // smaller buffers come from the heap, already mapped

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = static_cast<int64_t>(t.nbytes());
  if (!t.device().is_cpu() || bytes < kHugePageOutputMin) return;
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (start + kHugePageBytes - 1) & ~static_cast<uintptr_t>(kHugePageBytes - 1);
  const uintptr_t last = (start + bytes) & ~static_cast<uintptr_t>(kHugePageBytes - 1);
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// at::empty(sizes, options) for an output the kernel writes in full (see above).
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  return t;
}

}  // namespace mmkern
