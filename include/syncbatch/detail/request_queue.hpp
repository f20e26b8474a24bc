// RequestQueue: a bounded multi-producer multi-consumer queue of pointers, in priority lanes,
// with admission control, close-and-drain, and sleeping (not spinning) consumers and blocked
// producers.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include <boost/lockfree/queue.hpp>

#include "syncbatch/detail/spin.hpp"

namespace syncbatch::detail {

/// Thread safety: every member is thread-safe.
///
/// Lanes: one per priority level (lane 0 first), each with its own capacity, plus by option an
/// unbounded last lane for requests moved there by push_delayed(). try_pop() takes from the first
/// non-empty lane; try_pop(lane) from one lane.
///
/// Admission and shutdown share one atomic word: bit 0 is "closed", the rest counts admitted
/// items not yet popped, over all lanes (including items whose push is still under way). A
/// producer reserves a slot with one fetch_add, so close() followed by "count reached zero" means
/// that every item admitted before close() has been pushed and popped: nothing admitted is ever
/// lost. With one lane that count is also the lane's occupancy; with several, each lane counts
/// its own for its capacity.
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

  /// One lane of `capacity`.
  explicit RequestQueue(std::size_t capacity) : RequestQueue(std::vector{capacity}, false) {}

  /// One lane per entry of `capacities` (each at least 1), and a delayed lane if `delayed_lane`.
  RequestQueue(const std::vector<std::size_t>& capacities, bool delayed_lane)
      : lanes_(capacities.size() + (delayed_lane ? 1 : 0)),
        lane_(std::make_unique<Lane[]>(lanes_)) {
    std::size_t total = 0;
    for (std::size_t i = 0; i < capacities.size(); ++i) {
      lane_[i].queue = std::make_unique<boost::lockfree::queue<T>>(capacities[i]);
      lane_[i].capacity = capacities[i];
      total += capacities[i];
    }
    if (delayed_lane) {  // holds only items admitted to the other lanes: never more than them
      lane_[lanes_ - 1].queue = std::make_unique<boost::lockfree::queue<T>>(total);
      lane_[lanes_ - 1].capacity = total;
    }
  }

  /// Lanes, the delayed one included.
  std::size_t lanes() const noexcept { return lanes_; }
  std::size_t capacity(std::size_t lane = 0) const noexcept { return lane_[lane].capacity; }

  /// Admits and enqueues `item` in `lane`, or returns kFull / kClosed at once without taking it.
  PushResult try_push(T item, std::size_t lane = 0) {
    Lane& l = lane_[lane];
    const std::uint64_t prev = state_.fetch_add(kOne, std::memory_order_acq_rel);
    bool full = false;
    if ((prev & kClosedBit) == 0) {
      full = lanes_ == 1 ? (prev >> 1) >= l.capacity
                         : l.count.fetch_add(1, std::memory_order_acq_rel) >= l.capacity;
      if (full && lanes_ != 1) l.count.fetch_sub(1, std::memory_order_acq_rel);
    }
    if ((prev & kClosedBit) != 0 || full) {
      const std::uint64_t now = state_.fetch_sub(kOne, std::memory_order_acq_rel) - kOne;
      // A closed queue may be draining: its consumers wait for the count to reach zero, which
      // this reservation held up, even when it found the queue full before close() came (a
      // consumer then slept on a count of one that nothing else would bring to zero).
      if ((now & kClosedBit) != 0) wake_all_consumers();
      return (prev & kClosedBit) != 0 ? PushResult::kClosed : PushResult::kFull;
    }
    // Cannot fail for want of nodes: at most capacity items are admitted to a lane and its queue
    // holds capacity + 1 preallocated nodes.
    l.queue->push(item);
    wake_consumers();
    return PushResult::kOk;
  }

  /// Like try_push, but waits while the lane is full. Returns kOk or kClosed.
  PushResult push_wait(T item, std::size_t lane = 0) {
    for (;;) {
      const PushResult r = try_push(item, lane);
      if (r != PushResult::kFull) return r;
      std::unique_lock lock(mutex_);
      sleep_until(lock, producer_cv_, producers_sleeping_, kNoDeadline, [&] {
        const std::uint64_t s = state_.load(std::memory_order_acquire);
        return (s & kClosedBit) != 0 || occupancy(lane, s) < lane_[lane].capacity;
      });
    }
  }

  /// Moves an item the caller popped (admitted before) to the delayed lane, behind everything
  /// else. Never refused, not even after close(): the item was admitted already.
  void push_delayed(T item) {
    Lane& l = lane_[lanes_ - 1];
    state_.fetch_add(kOne, std::memory_order_acq_rel);
    l.count.fetch_add(1, std::memory_order_acq_rel);
    l.queue->push(item);
    wake_consumers();
  }

  /// Pops one item from the first non-empty lane; returns nullptr if there is none. Never
  /// blocks.
  T try_pop() {
    for (std::size_t i = 0; i < lanes_; ++i)
      if (T item = try_pop(i)) return item;
    return nullptr;
  }

  /// Pops one item from `lane` if it has one; returns nullptr otherwise. Never blocks.
  T try_pop(std::size_t lane) {
    T item = nullptr;
    if (!lane_[lane].queue->pop(item)) return nullptr;
    if (lanes_ != 1) lane_[lane].count.fetch_sub(1, std::memory_order_acq_rel);
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

  /// Whether `lane` looked empty (a snapshot).
  bool empty(std::size_t lane) const { return lane_[lane].queue->empty(); }

  /// Blocks until an item may be available, `deadline` passes, the queue is drained (closed and
  /// empty), or, if `return_on_close`, the queue is closed. May return spuriously.
  void wait(std::chrono::steady_clock::time_point deadline, bool return_on_close) {
    auto done = [&] {
      const std::uint64_t s = state_.load(std::memory_order_acquire);
      return !all_empty() || ((s & kClosedBit) != 0 && (return_on_close || (s >> 1) == 0));
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

  /// Admitted items not yet popped, over all lanes (a snapshot).
  std::size_t size() const noexcept {
    return static_cast<std::size_t>(state_.load(std::memory_order_relaxed) >> 1);
  }

  /// Admitted items not yet popped in lanes 0 to `lane` (a snapshot).
  std::size_t size_through(std::size_t lane) const noexcept {
    if (lanes_ == 1) return size();
    std::size_t n = 0;
    for (std::size_t i = 0; i <= lane; ++i)
      n += static_cast<std::size_t>(lane_[i].count.load(std::memory_order_relaxed));
    return n;
  }

 private:
  static constexpr std::uint64_t kClosedBit = 1;
  static constexpr std::uint64_t kOne = 2;
  static constexpr auto kNoDeadline = std::chrono::steady_clock::time_point::max();

  struct Lane {
    std::unique_ptr<boost::lockfree::queue<T>> queue;
    std::size_t capacity = 0;
    std::atomic<std::uint64_t> count{0};  // used with more than one lane
  };

  std::size_t occupancy(std::size_t lane, std::uint64_t state) const noexcept {
    return static_cast<std::size_t>(
        lanes_ == 1 ? state >> 1 : lane_[lane].count.load(std::memory_order_acquire));
  }

  bool all_empty() const {
    for (std::size_t i = 0; i < lanes_; ++i)
      if (!lane_[i].queue->empty()) return false;
    return true;
  }

  // After a push: one producer per sleep wakes the consumers; the others see the flag cleared.
  void wake_consumers() {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (consumers_sleeping_.load(std::memory_order_relaxed) &&
        consumers_sleeping_.exchange(false, std::memory_order_acq_rel)) {
      std::lock_guard lock(mutex_);
      consumer_cv_.notify_all();
    }
  }

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

  const std::size_t lanes_;
  const std::unique_ptr<Lane[]> lane_;
  std::atomic<std::uint64_t> state_{0};
  std::atomic<bool> consumers_sleeping_{false};  // set by a consumer before it sleeps
  std::atomic<bool> producers_sleeping_{false};  // set by a producer blocked on a full lane
  std::mutex mutex_;  // guards nothing but the sleeping: the condition variables need it
  std::condition_variable consumer_cv_;
  std::condition_variable producer_cv_;
};

}  // namespace syncbatch::detail
