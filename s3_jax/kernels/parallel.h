// Work split over XLA's intra-op thread pool for the CPU kernels (an FFI custom call's `ffi::ThreadPool`).
#ifndef S3_JAX_KERNELS_PARALLEL_H_
#define S3_JAX_KERNELS_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace s3 {

// fn(i) for i in [0, count), items taken in order by the pool's threads and the calling thread; returns when
// every item is done.
template <typename Fn>
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t count, Fn fn) {
  struct Counters {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
  };
  auto counters = std::make_shared<Counters>();
  auto drain = [counters, count, &fn]() {
    for (int64_t i = counters->next.fetch_add(1); i < count; i = counters->next.fetch_add(1)) {
      fn(i);
      counters->finished.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count - 1);
  for (int64_t h = 0; h < helpers; ++h) {
    // A helper may start after this call returned: it then finds no work and never calls fn.
    pool.Schedule([counters, count, fnp = &fn]() {
      for (int64_t i = counters->next.fetch_add(1); i < count; i = counters->next.fetch_add(1)) {
        (*fnp)(i);
        counters->finished.fetch_add(1, std::memory_order_release);
      }
    });
  }
  drain();
  while (counters->finished.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

}  // namespace s3

#endif  // S3_JAX_KERNELS_PARALLEL_H_
