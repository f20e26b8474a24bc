// syncbatch::Future: the handle to one request's result.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <thread>
#include <utility>

#include <boost/smart_ptr/intrusive_ptr.hpp>
#include <boost/smart_ptr/intrusive_ref_counter.hpp>

#include "syncbatch/detail/spin.hpp"
#include "syncbatch/error.hpp"

namespace syncbatch {

namespace detail {

/// The shared state of one request's result: written once by a worker, read by the Future.
/// One allocation per request holds this and the request's input (see Request in
/// batched_submitter.hpp). Reference counted: the Future holds one reference, the worker one.
///
/// Errors and the thread that frees them: an exception object is freed by whichever thread
/// drops its last reference, and that count lives inside libstdc++, where ThreadSanitizer cannot
/// see it order a reader's what() before another thread's free. So a worker never completes a
/// request from inside a catch block (leaving the block drops a reference, possibly the last,
/// after the reader is done), and take() moves the error out, so the reader holds the last one.
template <class Out>
class Completion
    : public boost::intrusive_ref_counter<Completion<Out>, boost::thread_safe_counter> {
 public:
  /// `wakeups`: the word sleeping waiters wait on, shared by every request of one submitter and
  /// bumped once per completed batch (one kernel wake per batch, not per request). It must
  /// outlive every wait() that finds the request not ready: the submitter that completes it.
  explicit Completion(std::atomic<std::uint32_t>* wakeups) noexcept : wakeups_(wakeups) {}
  virtual ~Completion() = default;

  /// Worker side: stores the value. Must be followed by complete().
  void set_value(Out&& v) { value_.emplace(std::move(v)); }
  /// Worker side: stores a value to be made on the reader's thread, by `make(*shared, index)`,
  /// from a result several requests share (a batch output each reader takes its rows of).
  template <class Shared, Out (*Make)(const Shared&, std::size_t)>
  void set_shared(std::shared_ptr<const Shared> shared, std::size_t index) {
    shared_.emplace(SharedValue{std::move(shared), index, &make_from<Shared, Make>});
  }
  /// Worker side: stores the error (it wins over a value). Must be followed by complete().
  void set_error(std::exception_ptr e) noexcept { error_ = std::move(e); }
  bool has_error() const noexcept { return error_ != nullptr; }
  bool has_value() const noexcept { return value_.has_value() || shared_.has_value(); }

  /// Worker side: delivers the result. By default it makes the result visible to the Future:
  /// everything written before happens-before any read by a waiter that observed ready(). A
  /// waiter that sleeps is woken by the next wake_all() on the shared word. Requests completed
  /// through a callback override this (see BatchedSubmitter::submit_then).
  virtual void complete() noexcept { ready_.store(true, std::memory_order_release); }

  /// Worker side: wakes every sleeping waiter of the submitter, after complete() of a batch.
  static void wake_all(std::atomic<std::uint32_t>& wakeups) noexcept {
    wakeups.fetch_add(1, std::memory_order_acq_rel);
    wakeups.notify_all();
  }

  bool ready() const noexcept { return ready_.load(std::memory_order_acquire); }
  void wait() const noexcept {
    if (spin_until([this] { return ready(); }, kSpinBudget)) return;
    for (;;) {
      // Read the word before checking: a completion after the check bumps it, so the wait
      // below returns at once instead of missing the wake-up.
      const std::uint32_t seen = wakeups_->load(std::memory_order_acquire);
      if (ready()) return;
      wakeups_->wait(seen, std::memory_order_acquire);
    }
  }
  Out take() {
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
    return take_value();
  }
  /// Moves the result out as (error, value); value is default-constructed on error.
  std::pair<std::exception_ptr, Out> take_pair() {
    if (error_) return {std::exchange(error_, nullptr), Out{}};
    return {nullptr, take_value()};
  }

 private:
  struct SharedValue {
    std::shared_ptr<const void> shared;
    std::size_t index;
    Out (*make)(const void*, std::size_t);
  };
  template <class Shared, Out (*Make)(const Shared&, std::size_t)>
  static Out make_from(const void* shared, std::size_t index) {
    return Make(*static_cast<const Shared*>(shared), index);
  }
  Out take_value() {
    if (!shared_) return std::move(*value_);
    Out v = shared_->make(shared_->shared.get(), shared_->index);
    shared_.reset();
    return v;
  }

  std::atomic<bool> ready_{false};
  std::atomic<std::uint32_t>* wakeups_;
  std::optional<Out> value_;           // written by the worker before complete()
  std::optional<SharedValue> shared_;  // or this, written by the worker before complete()
  std::exception_ptr error_;           // written by the worker before complete()
};

}  // namespace detail

/// The result of one submitted request: a value or an error, ready once the worker has run the
/// request and the device sync of its batch has completed.
///
/// Thread safety: a Future is a move-only handle owned by one thread at a time; it may be
/// waited on from a thread other than the one that submitted. Completion happens on a worker
/// thread and is published with release/acquire ordering: once ready() is true, the value and
/// all device work of its batch are complete.
template <class Out>
class Future {
 public:
  Future() = default;
  explicit Future(boost::intrusive_ptr<detail::Completion<Out>> state) noexcept
      : state_(std::move(state)) {}

  /// True until get() consumed the result (or for a default-constructed Future: false).
  bool valid() const noexcept { return state_ != nullptr; }

  /// True when the result is available. Precondition: valid(). Never blocks.
  bool ready() const noexcept { return state_->ready(); }

  /// Blocks until the result is available. Precondition: valid().
  void wait() const noexcept { state_->wait(); }

  /// Waits up to `timeout`; returns ready(). Precondition: valid(). Polls with a backoff that
  /// grows from 1 us to 1 ms, so it may return up to about 1 ms after the result came.
  template <class Rep, class Period>
  bool wait_for(std::chrono::duration<Rep, Period> timeout) const {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    auto pause = std::chrono::microseconds(1);
    while (!state_->ready()) {
      const auto now = std::chrono::steady_clock::now();
      if (now >= deadline) return false;
      std::this_thread::sleep_for(
          std::min<std::chrono::steady_clock::duration>(pause, deadline - now));
      pause = std::min(pause * 2, std::chrono::microseconds(1000));
    }
    return true;
  }

  /// Waits, then returns the result and invalidates this Future. Precondition: valid().
  /// Errors: rethrows the model's exception for this request, or a syncbatch::Error
  /// (kSyncFailed, kDeadlineExceeded, kBadRequest) that says why the library failed it.
  Out get() {
    state_->wait();
    auto state = std::move(state_);
    return state->take();
  }

 private:
  boost::intrusive_ptr<detail::Completion<Out>> state_;
};

}  // namespace syncbatch
