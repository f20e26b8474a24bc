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
/// Sleeping: a waiter sets a "sleeping" flag and re-checks before it sleeps; a notifier checks
/// the flag after a sequentially consistent fence, and the one notifier that clears it (exchange)
/// takes the mutex and wakes the sleepers: one kernel wake per sleep, however many pushes come
/// while the sleeper wakes up. The fast path of push and pop takes no lock.
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
      const std::uint64_t now = state_.fetch_sub(kOne, std::memory_order_acq_rel) - kOne;
      // A closed queue may be draining: its consumers wait for the count to reach zero, which
      // this reservation held up, even when it found the queue full before close() came (a
      // consumer then slept on a count of one that nothing else would bring to zero).
      if ((now & kClosedBit) != 0) wake_all_consumers();
      return (prev & kClosedBit) != 0 ? PushResult::kClosed : PushResult::kFull;
    }
    // Cannot fail for want of nodes: at most capacity_ items are admitted and the queue holds
    // capacity_ + 1 preallocated nodes.
    queue_.push(item);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    // One producer per sleep wakes the consumers; the others see the flag already cleared.
    if (consumers_sleeping_.load(std::memory_order_relaxed) &&
        consumers_sleeping_.exchange(false, std::memory_order_acq_rel)) {
      std::lock_guard lock(mutex_);
      consumer_cv_.notify_all();
    }
    return PushResult::kOk;
  }

  /// Like try_push, but waits while the queue is full. Returns kOk or kClosed.
  PushResult push_wait(T item) {
    for (;;) {
      const PushResult r = try_push(item);
      if (r != PushResult::kFull) return r;
      std::unique_lock lock(mutex_);
      sleep_until(lock, producer_cv_, producers_sleeping_, kNoDeadline, [&] {
        const std::uint64_t s = state_.load(std::memory_order_acquire);
        return (s & kClosedBit) != 0 || (s >> 1) < capacity_;
      });
    }
  }

  /// Pops one item if there is one; returns nullptr otherwise. Never blocks.
  T try_pop() {
    T item = nullptr;
    if (!queue_.pop(item)) return nullptr;
    // The last item of a closed queue: other consumers may be asleep, having seen the queue
    // empty while this item's count still stood, and must wake to see it drained.
    if (state_.fetch_sub(kOne, std::memory_order_acq_rel) - kOne == kClosedBit)
      wake_all_consumers();
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (producers_sleeping_.load(std::memory_order_relaxed) &&
        producers_sleeping_.exchange(false, std::memory_order_acq_rel)) {
      std::lock_guard lock(mutex_);
      producer_cv_.notify_all();
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
    sleep_until(lock, consumer_cv_, consumers_sleeping_, deadline, done);
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
  static constexpr auto kNoDeadline = std::chrono::steady_clock::time_point::max();

  // Sleeps on `cv` until `done()` or `deadline`. Before each sleep, including a return to sleep
  // after a wake-up that found nothing, it sets `sleeping` and re-checks `done()`: a notifier
  // either sees the flag (and wakes us under the mutex) or made its change before the check.
  // Setting the flag again matters: the notifier that cleared it may have been a stale one,
  // whose change we had already consumed. A waiter never clears the flag itself: another
  // waiter may still sleep behind it.
  template <class Done>
  static void sleep_until(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                          std::atomic<bool>& sleeping,
                          std::chrono::steady_clock::time_point deadline, Done&& done) {
    for (;;) {
      sleeping.store(true, std::memory_order_seq_cst);
      std::atomic_thread_fence(std::memory_order_seq_cst);
      if (done()) return;
      if (deadline == kNoDeadline) {
        cv.wait(lock);
      } else if (cv.wait_until(lock, deadline) == std::cv_status::timeout) {
        return;
      }
    }
  }

  void wake_all_consumers() {
    std::lock_guard lock(mutex_);
    consumer_cv_.notify_all();
  }

  boost::lockfree::queue<T> queue_;
  const std::size_t capacity_;
  std::atomic<std::uint64_t> state_{0};
  std::atomic<bool> consumers_sleeping_{false};  // set by a consumer before it sleeps
  std::atomic<bool> producers_sleeping_{false};  // set by a producer blocked on a full queue
  std::mutex mutex_;  // guards nothing but the sleeping: the condition variables need it
  std::condition_variable consumer_cv_;
  std::condition_variable producer_cv_;
};

}  // namespace syncbatch::detail
