// Work split over XLA's intra-op thread pool for the FFI kernels of this directory (no threads of our own).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace internlm_native {

// Chunks [0, total) claimed from a shared counter by the caller and by pool tasks. A task that starts after
// every chunk is claimed only touches the shared counters (kept alive by its shared_ptr), so the caller may
// return once the claimed chunks are done: nothing waits for a pool thread that is busy elsewhere.
struct Chunks {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0;
  std::function<void(int64_t)> body;

  void Run() {
    for (int64_t i = next.fetch_add(1); i < total; i = next.fetch_add(1)) {
      body(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t total, std::function<void(int64_t)> body) {
  int64_t threads = std::min<int64_t>(pool.num_threads(), total);
  if (threads <= 1) {
    for (int64_t i = 0; i < total; ++i) body(i);
    return;
  }
  auto chunks = std::make_shared<Chunks>();
  chunks->total = total;
  chunks->body = std::move(body);
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([chunks] { chunks->Run(); });
  chunks->Run();
  while (chunks->done.load(std::memory_order_acquire) < total) _mm_pause();
}

inline __mmask16 Mask16(int64_t n) {
  return n >= 16 ? 0xFFFF : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

// Whether this CPU runs the instructions the kernels use (the libraries are built with -march=native, but a
// cached build may be loaded on another machine of a shared home).
inline int Supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

}  // namespace internlm_native
