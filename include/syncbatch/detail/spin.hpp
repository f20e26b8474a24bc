// Bounded spinning before blocking: a wake-up through the kernel costs tens of microseconds on
// virtual machines, more than many model calls take, so waiters first poll for a short while.
#pragma once

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

/// Polls `done()` for up to `budget`, yielding the CPU now and then so that spinning never starves
/// the thread it waits for on an oversubscribed machine. Returns done().
template <class Done>
bool spin_until(Done&& done, std::chrono::nanoseconds budget) noexcept(noexcept(done())) {
  const auto start = std::chrono::steady_clock::now();
  for (unsigned i = 1;; ++i) {
    if (done()) return true;
    if ((i & 63) == 0) {
      if (std::chrono::steady_clock::now() - start > budget) return done();
      std::this_thread::yield();
    } else {
      cpu_relax();
    }
  }
}

/// How long waiters spin before they block.
inline constexpr std::chrono::microseconds kSpinBudget{20};

}  // namespace syncbatch::detail
