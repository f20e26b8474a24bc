// syncbatch::Future: the handle to one request's result.
#pragma once

#include <algorithm>
#include <chrono>
#include <thread>

#include <boost/smart_ptr/intrusive_ptr.hpp>

#include "syncbatch/detail/request.hpp"

namespace syncbatch {

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

  /// Asks for the request to be cancelled; it completes exactly once either way, with
  /// Error(kCancelled) or, if it was already past the point of no return, its value (see
  /// BatchedSubmitter's class comment for each stage). Precondition: valid(). Thread-safe with
  /// the worker; never blocks.
  void cancel() const noexcept { state_->cancel(); }

  /// Waits, then returns the result and invalidates this Future. Precondition: valid().
  /// Errors: rethrows the model's exception for this request, or a syncbatch::Error
  /// (kSyncFailed, kDeadlineExceeded, kBadRequest, kCancelled) that says why it failed.
  Out get() {
    state_->wait();
    auto state = std::move(state_);
    return state->take();
  }

 private:
  boost::intrusive_ptr<detail::Completion<Out>> state_;
};

/// Cancels one request submitted with submit_then() (async_submit connects it to the handler's
/// Asio cancellation slot). A copyable handle that keeps the request's state alive; an empty
/// one (a refused request) cancels nothing. Thread-safe.
template <class Out>
class Cancellation {
 public:
  Cancellation() = default;
  explicit Cancellation(boost::intrusive_ptr<detail::Completion<Out>> state) noexcept
      : state_(std::move(state)) {}
  /// As Future::cancel(); nothing for an empty handle.
  void cancel() const noexcept {
    if (state_) state_->cancel();
  }
  explicit operator bool() const noexcept { return state_ != nullptr; }

 private:
  boost::intrusive_ptr<detail::Completion<Out>> state_;
};

}  // namespace syncbatch
