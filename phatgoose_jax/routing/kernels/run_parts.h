// Shared by the kernels in this folder: run a call's parts on XLA's intra-op thread pool.
#ifndef PHATGOOSE_JAX_KERNELS_RUN_PARTS_H_
#define PHATGOOSE_JAX_KERNELS_RUN_PARTS_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace phatgoose_kernels {

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Runs run(0..parts-1): parts-1 tasks go to the pool, the caller claims parts as well and then
// waits only for parts already claimed by running tasks (so a busy pool cannot deadlock it).
// `run` may reference the caller's stack: every part has finished when RunParts returns, and a
// task that starts later finds no part left and touches only `shared`.
template <typename Run>
void RunParts(xla::ffi::ThreadPool& pool, int64_t parts, Run& run) {
  auto shared = std::make_shared<Shared>();
  auto claim = [&run](Shared* sh, int64_t parts) {
    for (;;) {
      const int64_t p = sh->next.fetch_add(1);
      if (p >= parts) return;
      run(p);
      sh->done.fetch_add(1);
    }
  };
  for (int64_t i = 1; i < parts; ++i) {
    std::function<void()> task = [shared, parts, &run, claim]() { claim(shared.get(), parts); };
    pool.Schedule(std::move(task));
  }
  claim(shared.get(), parts);
  while (shared->done.load() < parts) std::this_thread::yield();
}

}  // namespace phatgoose_kernels

#endif  // PHATGOOSE_JAX_KERNELS_RUN_PARTS_H_
