// A tiny fork-join parallel_for on std::thread with dynamic chunk claiming.
//
// Why not OpenMP: PyTorch wheels ship their own libgomp, and a second OpenMP runtime in the same
// process oversubscribes or crashes. Why not a pool: the ops here run for 0.1-10 ms, and spawning
// plus joining one extra thread costs ~20-40 us on the 2-core test machine (measured with the
// harness), so the kernels only split work that is worth at least ~100 us of one core (see
// threads_for) and otherwise run on the caller's thread.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace ddpm_fast::cpu {

// num_threads <= 0 means "all hardware threads".
inline int resolve_threads(int num_threads) {
  if (num_threads > 0) return num_threads;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? int(hw) : 1;
}

// How many threads to use for `work` units when each thread should get at least `grain` units
// (grain ~ the work one core does in ~100 us, so thread start-up stays under ~25 % overhead).
inline int threads_for(int64_t work, int64_t grain, int num_threads) {
  const int64_t by_work = grain > 0 ? std::max<int64_t>(1, work / grain) : 1;
  return int(std::min<int64_t>(resolve_threads(num_threads), by_work));
}

// Runs fn(begin, end) over [0, n) on `parts` threads (the calling thread is one of them), each claiming
// the next chunk of ~n / (8 * parts) items from a shared counter until none are left. Claiming rather
// than fixed slices: a core that another process slows down, or items of unequal cost (noiseless t = 0
// samples in a step), no longer hold the whole call back; measured on the shared 2-core machine, fixed
// halves left one thread idle for up to a third of a q_sample call. fn must depend only on the items it
// is given (every kernel here writes per-item results). Exceptions are re-thrown on the caller.
template <class F>
void parallel_for(int64_t n, int parts, F&& fn) {
  if (n <= 0) return;
  parts = int(std::max<int64_t>(1, std::min<int64_t>(parts, n)));
  if (parts == 1) {
    fn(int64_t(0), n);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, n / (int64_t(parts) * 8));
  std::atomic<int64_t> next{0};
  std::vector<std::exception_ptr> errors(static_cast<size_t>(parts));
  auto work = [&](int p) {
    try {
      for (int64_t begin; (begin = next.fetch_add(chunk, std::memory_order_relaxed)) < n;)
        fn(begin, std::min(n, begin + chunk));
    } catch (...) {
      errors[size_t(p)] = std::current_exception();
      next.store(n, std::memory_order_relaxed);  // stop the others early
    }
  };
  std::vector<std::thread> workers;
  workers.reserve(size_t(parts - 1));
  try {
    for (int p = 1; p < parts; ++p) workers.emplace_back(work, p);
  } catch (...) {
    // Could not start a thread (resource limits): the threads that did start, and this one, share the work.
  }
  work(0);
  for (auto& w : workers) w.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace ddpm_fast::cpu
