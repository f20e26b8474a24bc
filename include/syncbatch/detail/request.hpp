// One request's allocation: its result slot (Completion, read through a Future) and its input
// and deadline (Request, run by a worker). Internal to BatchedSubmitter and Future.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include <boost/smart_ptr/intrusive_ref_counter.hpp>

#include "syncbatch/clock.hpp"
#include "syncbatch/detail/spin.hpp"
#include "syncbatch/error.hpp"
#include "syncbatch/stats.hpp"

namespace syncbatch::detail {

/// The shared state of one request's result: written once by a worker, read by the Future.
/// One allocation per request holds this and the request's input (see Request below). Reference
/// counted: the Future holds one reference, the worker one.
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

  /// Caller side: asks for the request to be cancelled (see BatchedSubmitter's class comment
  /// for what happens at each stage). A state that cannot be cancelled ignores it.
  virtual void cancel() noexcept {}

  /// Worker side: delivers the result. By default it makes the result visible to the Future:
  /// everything written before happens-before any read by a waiter that observed ready(). A
  /// waiter that sleeps is woken by the next wake_all() on the shared word. Requests completed
  /// through a callback override this (see BatchedSubmitter::submit_then).
  virtual void complete() noexcept { ready_.store(true, std::memory_order_release); }

  /// Worker side, optional, before complete(): does the work of delivering the result that
  /// need not be in complete() itself, so that a batch's complete() calls follow each other
  /// closely (its callbacks' posts then find their io threads awake, rather than waking one
  /// per request). Requests completed through a callback make their result here. Returns
  /// whether the request completes with an error.
  virtual bool prepare() noexcept { return has_error(); }

  /// Worker side: wakes every sleeping waiter of the submitter, after complete() of a batch.
  static void wake_all(std::atomic<std::uint32_t>& wakeups) noexcept {
    wakeups.fetch_add(1, std::memory_order_acq_rel);
    wakeups.notify_all();
  }

  bool ready() const noexcept { return ready_.load(std::memory_order_acquire); }
  std::atomic<std::uint32_t>* wakeups() const noexcept { return wakeups_; }
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

inline std::exception_ptr cancelled_error(const char* when) {
  return std::make_exception_ptr(
      Error(ErrorCode::kCancelled, std::string("the request was cancelled ") + when));
}

/// One request: its result slot, its input and its deadline, in one allocation; and who
/// completes it. A request is completed exactly once: by the worker, or by cancel() while it is
/// still queued. Its stage decides which, by one compare-and-swap:
///   kQueued --worker takes it--> kTaken --worker completes it--> (done)
///   kQueued --cancel()---------> kCancelled (completed by cancel(); the worker drops it)
/// cancel() on a taken request only sets cancel_requested, which the worker reads before the
/// model call and again when it completes the batch.
template <class In, class Out>
class Request : public Completion<Out> {
 public:
  Request(std::atomic<std::uint32_t>* wakeups, StatsCounters* stats, In&& input,
          Clock::time_point arrived, Clock::time_point deadline)
      : Completion<Out>(wakeups),
        stats_(stats),
        input_(std::move(input)),
        arrived_(arrived),
        deadline_(deadline) {}
  In& input() noexcept { return *input_; }
  void drop_input() noexcept { input_.reset(); }
  Clock::time_point arrived() const noexcept { return arrived_; }
  Clock::time_point deadline() const noexcept { return deadline_; }

  /// TimeoutAction::kDelay: when the request, still queued, is moved behind fresh work (max:
  /// never), and whether it was. Read and written by the worker that holds it, popped.
  Clock::time_point delay_at() const noexcept {
    return delayed_ ? Clock::time_point::max() : delay_at_;
  }
  void set_delay_at(Clock::time_point t) noexcept { delay_at_ = t; }
  void mark_delayed() noexcept { delayed_ = true; }
  /// The priority level it was queued at.
  std::size_t priority() const noexcept { return priority_; }
  void set_priority(std::size_t level) noexcept { priority_ = level; }

  /// Worker side: claims a request just popped from the queue. False: it was cancelled while
  /// queued (and completed then); the worker drops it.
  bool take() noexcept {
    Stage expected = Stage::kQueued;
    return stage_.compare_exchange_strong(expected, Stage::kTaken, std::memory_order_acq_rel);
  }
  /// Worker side, after take(): whether cancel() was called since.
  bool cancel_requested() const noexcept {
    return cancel_requested_.load(std::memory_order_acquire);
  }

  void cancel() noexcept override {
    cancel_requested_.store(true, std::memory_order_release);
    Stage expected = Stage::kQueued;
    if (!stage_.compare_exchange_strong(expected, Stage::kCancelled, std::memory_order_acq_rel))
      return;  // taken: the worker completes it
    // Still queued: completed here and now; the worker that later pops it drops it. The input
    // is never read again.
    drop_input();
    this->set_error(cancelled_error("while it was queued"));
    const auto now = stats_->now();
    stats_->record_latency(now - arrived_, now);  // counted before completed (StatsCounters)
    stats_->on_unbatched_failure(/*expired=*/false);
    stats_->on_cancelled(1);
    this->complete();
    Completion<Out>::wake_all(*this->wakeups());
  }

 private:
  enum class Stage : std::uint8_t { kQueued, kTaken, kCancelled };
  StatsCounters* stats_;
  std::atomic<Stage> stage_{Stage::kQueued};
  std::atomic<bool> cancel_requested_{false};
  std::optional<In> input_;
  Clock::time_point arrived_;
  Clock::time_point deadline_;
  Clock::time_point delay_at_ = Clock::time_point::max();
  std::size_t priority_ = 0;
  bool delayed_ = false;
};

/// A request completed by calling `F(std::exception_ptr, Out)` on the worker thread.
template <class In, class Out, class F>
class CallbackRequest final : public Request<In, Out> {
 public:
  CallbackRequest(std::atomic<std::uint32_t>* wakeups, StatsCounters* stats, In&& input,
                  Clock::time_point arrived, Clock::time_point deadline, F&& f)
      : Request<In, Out>(wakeups, stats, std::move(input), arrived, deadline), f_(std::move(f)) {}
  /// Makes the result (the caller's rows of a shared batch output); a failure to make it is
  /// the request's error.
  bool prepare() noexcept override {
    if (!result_) {
      try {
        result_.emplace(this->take_pair());
      } catch (...) {
        result_.emplace(std::current_exception(), Out{});
      }
    }
    return result_->first != nullptr;
  }
  void complete() noexcept override {
    prepare();
    auto [error, value] = std::move(*result_);
    result_.reset();
    try {
      f_(std::move(error), std::move(value));
    } catch (...) {  // NOLINT(bugprone-empty-catch): documented: callbacks must not throw
    }
  }

 private:
  F f_;
  std::optional<std::pair<std::exception_ptr, Out>> result_;  // made by prepare()
};

}  // namespace syncbatch::detail
