// Bounded spinning before blocking: a wake-up through the kernel costs tens of microseconds on
// virtual machines, more than many model calls take, so waiters first poll for a short while.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>

namespace syncbatch::detail {

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

/// How many threads of the process may spin at once: half the hardware threads. Past that,
/// spinning waiters would take the CPU from the threads they wait for (a server's worker), so
/// further waiters block at once.
inline std::atomic<int>& spinners() noexcept {
  static std::atomic<int> count{0};
  return count;
}
inline int max_spinners() noexcept {
  static const int max = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / 2);
  return max;
}

/// Polls `done()` for up to `budget` (if fewer than max_spinners() threads spin already),
/// yielding the CPU now and then. Returns done().
template <class Done>
bool spin_until(Done&& done, std::chrono::nanoseconds budget) noexcept(noexcept(done())) {
  if (done()) return true;
  if (spinners().fetch_add(1, std::memory_order_relaxed) >= max_spinners()) {
    spinners().fetch_sub(1, std::memory_order_relaxed);
    return done();
  }
  const auto start = std::chrono::steady_clock::now();
  bool result = false;
  for (unsigned i = 1;; ++i) {
    if (done()) {
      result = true;
      break;
    }
    if ((i & 63) == 0) {
      if (std::chrono::steady_clock::now() - start > budget) {
        result = done();
        break;
      }
      std::this_thread::yield();
    } else {
      cpu_relax();
    }
  }
  spinners().fetch_sub(1, std::memory_order_relaxed);
  return result;
}

/// How long waiters spin before they block.
inline constexpr std::chrono::microseconds kSpinBudget{20};

}  // namespace syncbatch::detail
