// RequestQueue: a bounded multi-producer multi-consumer queue of pointers with admission control,
// close-and-drain, and sleeping (not spinning) consumers and blocked producers.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <type_traits>

#include <boost/lockfree/queue.hpp>

#include "syncbatch/detail/spin.hpp"

namespace syncbatch::detail {

/// Thread safety: every member is thread-safe.
///
/// Admission and shutdown share one atomic word: bit 0 is "closed", the rest counts admitted
/// items not yet popped (including items whose push is still under way). A producer reserves a
/// slot with one fetch_add, so close() followed by "count reached zero" means that every item
/// admitted before close() has been pushed and popped: nothing admitted is ever lost.
///
/// Sleeping uses an eventcount: a waiter announces itself in `*_waiters_` and re-checks before
/// it sleeps; a notifier checks the waiter count after a sequentially consistent fence and takes
/// the mutex only when someone sleeps. The fast path of push and pop takes no lock.
template <class T>
class RequestQueue {
  static_assert(std::is_pointer_v<T>,
                "RequestQueue holds pointers: Boost.Lockfree needs a trivial T");

 public:
  enum class PushResult { kOk, kFull, kClosed };

  explicit RequestQueue(std::size_t capacity) : queue_(capacity), capacity_(capacity) {}

  std::size_t capacity() const noexcept { return capacity_; }

  /// Admits and enqueues `item`, or returns kFull / kClosed at once without taking it.
  PushResult try_push(T item) {
    const std::uint64_t prev = state_.fetch_add(kOne, std::memory_order_acq_rel);
    if ((prev & kClosedBit) != 0 || (prev >> 1) >= capacity_) {
      state_.fetch_sub(kOne, std::memory_order_acq_rel);
      // A closed queue may be draining: its consumers wait for the count to reach zero.
      if ((prev & kClosedBit) != 0) {
        wake_all_consumers();
        return PushResult::kClosed;
      }
      return PushResult::kFull;
    }
    // Cannot fail for want of nodes: at most capacity_ items are admitted and the queue holds
    // capacity_ + 1 preallocated nodes.
    queue_.push(item);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (consumer_waiters_.load(std::memory_order_relaxed) != 0) {
      std::lock_guard lock(mutex_);
      consumer_cv_.notify_one();
    }
    return PushResult::kOk;
  }

  /// Like try_push, but waits while the queue is full. Returns kOk or kClosed.
  PushResult push_wait(T item) {
    for (;;) {
      const PushResult r = try_push(item);
      if (r != PushResult::kFull) return r;
      std::unique_lock lock(mutex_);
      producer_waiters_.fetch_add(1, std::memory_order_seq_cst);
      std::atomic_thread_fence(std::memory_order_seq_cst);
      producer_cv_.wait(lock, [&] {
        const std::uint64_t s = state_.load(std::memory_order_acquire);
        return (s & kClosedBit) != 0 || (s >> 1) < capacity_;
      });
      producer_waiters_.fetch_sub(1, std::memory_order_relaxed);
    }
  }

  /// Pops one item if there is one; returns nullptr otherwise. Never blocks.
  T try_pop() {
    T item = nullptr;
    if (!queue_.pop(item)) return nullptr;
    state_.fetch_sub(kOne, std::memory_order_acq_rel);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (producer_waiters_.load(std::memory_order_relaxed) != 0) {
      std::lock_guard lock(mutex_);
      producer_cv_.notify_one();
    }
    return item;
  }

  /// Blocks until an item may be available, `deadline` passes, the queue is drained (closed and
  /// empty), or, if `return_on_close`, the queue is closed. May return spuriously.
  void wait(std::chrono::steady_clock::time_point deadline, bool return_on_close) {
    auto done = [&] {
      const std::uint64_t s = state_.load(std::memory_order_acquire);
      return !queue_.empty() || ((s & kClosedBit) != 0 && (return_on_close || (s >> 1) == 0));
    };
    if (spin_until(done, kSpinBudget)) return;
    std::unique_lock lock(mutex_);
    consumer_waiters_.fetch_add(1, std::memory_order_seq_cst);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (deadline == std::chrono::steady_clock::time_point::max()) {
      consumer_cv_.wait(lock, done);
    } else {
      consumer_cv_.wait_until(lock, deadline, done);
    }
    consumer_waiters_.fetch_sub(1, std::memory_order_relaxed);
  }

  /// Refuses every later push; items already admitted stay and are popped as usual.
  void close() {
    state_.fetch_or(kClosedBit, std::memory_order_acq_rel);
    std::lock_guard lock(mutex_);
    consumer_cv_.notify_all();
    producer_cv_.notify_all();
  }

  bool closed() const noexcept {
    return (state_.load(std::memory_order_acquire) & kClosedBit) != 0;
  }

  /// Closed and every admitted item popped: consumers may exit.
  bool drained() const noexcept { return state_.load(std::memory_order_acquire) == kClosedBit; }

  /// Admitted items not yet popped (a snapshot).
  std::size_t size() const noexcept {
    return static_cast<std::size_t>(state_.load(std::memory_order_relaxed) >> 1);
  }

 private:
  static constexpr std::uint64_t kClosedBit = 1;
  static constexpr std::uint64_t kOne = 2;
  void wake_all_consumers() {
    std::lock_guard lock(mutex_);
    consumer_cv_.notify_all();
  }

  boost::lockfree::queue<T> queue_;
  const std::size_t capacity_;
  std::atomic<std::uint64_t> state_{0};
  std::atomic<std::uint32_t> consumer_waiters_{0};
  std::atomic<std::uint32_t> producer_waiters_{0};
  std::mutex mutex_;  // guards nothing but the sleeping: the condition variables need it
  std::condition_variable consumer_cv_;
  std::condition_variable producer_cv_;
};

}  // namespace syncbatch::detail
