// The recycling cache of the C++ CPU kernels' output buffers (the why: cpu_output.h).
//
// A buffer is a Block {ptr, bytes}; bytes is the request rounded up to 64 KiB (2 MiB from kHugePageOutputMin),
// so outputs of nearly the same size share free lists. The DataPtr's context is the Block; its deleter (run
// by whichever thread frees the tensor) hands the Block back under the mutex, or frees it when the cache would
// exceed its limit. Allocation takes the most recently freed Block of that size (warmest in cache).
#include "common/cpu_output.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mmkern {
namespace {

struct Block {
  void* ptr;
  int64_t bytes;
};

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long long parsed = std::strtoll(v, &end, 10);
  return (end != v && parsed >= 0) ? static_cast<int64_t>(parsed) : fallback;
}

void advise_huge_pages(void* ptr, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes >= kHugePageOutputMin) (void)madvise(ptr, static_cast<size_t>(bytes), MADV_HUGEPAGE);
#else
  (void)ptr; (void)bytes;
#endif
}

class OutputCache final : public c10::Allocator {
 public:
  OutputCache()
      : limit_(env_int("MMKERN_CPU_OUTPUT_CACHE_MIB", 1024) << 20),
        poison_(env_int("MMKERN_CPU_OUTPUT_POISON", 0) != 0) {}

  c10::DataPtr allocate(size_t n) override {
    const int64_t bytes = rounded(static_cast<int64_t>(n));
    Block* block = take(bytes);
    if (block == nullptr) {
      const size_t align = bytes >= kHugePageOutputMin ? kHugePageBytes : 64;
      void* ptr = nullptr;
      if (posix_memalign(&ptr, align, static_cast<size_t>(bytes)) != 0 || ptr == nullptr) {
        TORCH_CHECK(false, "mmkern: out of memory allocating a ", bytes, "-byte CPU output");
      }
      advise_huge_pages(ptr, bytes);
      block = new Block{ptr, bytes};
    }
    if (poison_) std::memset(block->ptr, 0xFF, static_cast<size_t>(bytes));
    return {block->ptr, block, &OutputCache::give_back, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  bool poisons() const { return poison_; }

  std::vector<int64_t> stats(bool release, int64_t limit_mib) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (limit_mib >= 0) limit_ = limit_mib << 20;
    if (release || held_bytes_ > limit_) {
      for (auto& [bytes, blocks] : free_) {
        for (Block* b : blocks) destroy(b);
      }
      free_.clear();
      held_bytes_ = held_blocks_ = 0;
    }
    return {held_bytes_, held_blocks_, reuses_, fresh_, limit_ >> 20};
  }

 private:
  static int64_t rounded(int64_t n) {
    return round_up(std::max<int64_t>(n, 1), n >= kHugePageOutputMin ? kHugePageBytes : kCachedOutputMin);
  }

  static void destroy(Block* b) {
    std::free(b->ptr);
    delete b;
  }

  Block* take(int64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it == free_.end() || it->second.empty()) {
      ++fresh_;
      return nullptr;
    }
    Block* b = it->second.back();
    it->second.pop_back();
    held_bytes_ -= bytes;
    --held_blocks_;
    ++reuses_;
    return b;
  }

  static void give_back(void* ctx);

  std::mutex mutex_;
  std::unordered_map<int64_t, std::vector<Block*>> free_;   // rounded bytes -> free blocks, most recent last
  int64_t limit_;                                           // bytes; guarded by mutex_
  const bool poison_;
  int64_t held_bytes_ = 0, held_blocks_ = 0, reuses_ = 0, fresh_ = 0;

  friend OutputCache& cache();
};

OutputCache& cache() {
  static OutputCache* instance = new OutputCache();   // never destroyed: tensors may outlive static teardown
  return *instance;
}

void OutputCache::give_back(void* ctx) {
  auto* b = static_cast<Block*>(ctx);
  OutputCache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex_);
    if (c.held_bytes_ + b->bytes <= c.limit_) {
      c.free_[b->bytes].push_back(b);
      c.held_bytes_ += b->bytes;
      ++c.held_blocks_;
      return;
    }
  }
  destroy(b);
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(
      c10::typeMetaToScalarType(options.dtype())));
  // small outputs: the heap (poisoned too under MMKERN_CPU_OUTPUT_POISON, so tests see every output)
  if (!options.device().is_cpu() || (bytes < kCachedOutputMin && !cache().poisons())) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
}

std::vector<int64_t> cpu_output_cache(bool release, int64_t limit_mib) { return cache().stats(release, limit_mib); }

}  // namespace mmkern

TORCH_LIBRARY_FRAGMENT(mmkern_C, m) {
  m.def("cpu_output_cache(bool release=False, int limit_mib=-1) -> int[]", &mmkern::cpu_output_cache);
}
