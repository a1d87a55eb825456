// A tiny fork-join parallel_for on std::thread.
//
// Why not OpenMP: PyTorch wheels ship their own libgomp, and a second OpenMP runtime in the same
// process oversubscribes or crashes. Why not a pool: the ops here run for 0.1-10 ms, and spawning
// plus joining one extra thread costs ~20-40 us on the 2-core test machine (measured with the
// harness), so the kernels only split work that is worth at least ~100 us of one core (see
// threads_for) and otherwise run on the caller's thread.
#pragma once

#include <algorithm>
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

// Runs fn(begin, end) on `parts` contiguous, nearly equal slices of [0, n), slice 0 on the calling
// thread. Exceptions thrown by fn are re-thrown on the caller (the first one wins).
template <class F>
void parallel_for(int64_t n, int parts, F&& fn) {
  if (n <= 0) return;
  parts = int(std::max<int64_t>(1, std::min<int64_t>(parts, n)));
  if (parts == 1) {
    fn(int64_t(0), n);
    return;
  }
  std::vector<std::exception_ptr> errors(static_cast<size_t>(parts));
  std::vector<std::thread> workers;
  workers.reserve(size_t(parts - 1));
  auto slice = [&](int p) {
    const int64_t begin = n * p / parts, end = n * (p + 1) / parts;
    try {
      fn(begin, end);
    } catch (...) {
      errors[size_t(p)] = std::current_exception();
    }
  };
  int started = 1;
  try {
    for (; started < parts; ++started) workers.emplace_back(slice, started);
  } catch (...) {
    // Could not start a thread (resource limits): the caller runs the remaining slices itself.
  }
  slice(0);
  for (int p = started; p < parts; ++p) slice(p);
  for (auto& w : workers) w.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace ddpm_fast::cpu
