// BatchedSubmitter: many threads submit, worker threads run the calls and sync once per batch.
#pragma once

#include <concepts>
#include <cstddef>
#include <exception>
#include <functional>
#include <latch>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "syncbatch/detail/request_queue.hpp"
#include "syncbatch/error.hpp"
#include "syncbatch/future.hpp"
#include "syncbatch/stats.hpp"
#include "syncbatch/sync_policy.hpp"

namespace syncbatch {

/// What submit() does when the queue is full.
enum class OverflowPolicy {
  kBlock,   ///< Wait for room (back-pressure on the producer).
  kReject,  ///< Throw Error(kQueueFull) at once; nothing is enqueued.
};

/// Options of a BatchedSubmitter. Plain values; checked by the constructor.
struct SubmitterOptions {
  /// Requests that may wait in the queue at once. At least 1.
  std::size_t queue_capacity = 1024;
  /// What submit() does when the queue is full.
  OverflowPolicy on_full = OverflowPolicy::kBlock;
  /// Worker threads. Each gets its own backend worker context (on CUDA: its own stream) and its
  /// own copy of the policy. With more than one, the model must be safe to call concurrently.
  std::size_t workers = 1;
  /// When each worker syncs. Whatever the policy, a worker syncs its pending requests once the
  /// queue runs dry (after the policy's hold_until), so no request waits forever.
  SyncPolicy policy = EveryN{64};
};

/// A backend gives each worker thread a context, created on that thread, whose sync() waits
/// until all work the worker issued since the last sync has completed on the device.
template <class B>
concept SubmitterBackend = requires(const B& b, std::size_t worker_index) {
  {b.make_worker(worker_index)};
  requires requires(decltype(b.make_worker(worker_index)) ctx) {
    ctx.sync();
  };
};

/// The backend for work that completes when the call returns (CPU, tests): sync is a no-op.
struct NoSyncBackend {
  struct Worker {
    void sync() noexcept {}
  };
  Worker make_worker(std::size_t) const noexcept { return {}; }
};

namespace detail {

/// One request: its result slot and its input, in one allocation.
template <class In, class Out>
class Request final : public Completion<Out> {
 public:
  Request(In&& input, Clock::time_point arrived) : input_(std::move(input)), arrived_(arrived) {}
  In& input() noexcept { return *input_; }
  void drop_input() noexcept { input_.reset(); }
  Clock::time_point arrived() const noexcept { return arrived_; }

 private:
  std::optional<In> input_;
  Clock::time_point arrived_;
};

inline std::string describe_exception(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    return ex.what();
  } catch (...) {
    return "unknown exception";
  }
}

}  // namespace detail

/// Accepts requests from any number of threads and runs them on worker threads, each of which
/// issues one device sync per batch of requests (as its SyncPolicy says) and then completes
/// every request of the batch. This is per-call mode: each request is its own model call.
///
///   BatchedSubmitter<torch::Tensor, torch::Tensor, TorchBackend> submitter(
///       [&](torch::Tensor& x) { return model->forward(x); }, options, TorchBackend(device));
///   Future<torch::Tensor> y = submitter.submit(x);   // from any thread
///   torch::Tensor out = y.get();                      // ready: its batch's sync has completed
///
/// Guarantees:
/// - Every accepted request completes exactly once: with the model's result, with the model's
///   exception for that request, or with Error(kSyncFailed) if its batch's sync threw.
/// - A request's Future becomes ready only after the sync of its batch has completed.
/// - shutdown() (and the destructor) stops accepting, then drains: every accepted request
///   completes before it returns.
///
/// Thread safety: submit(), stats() and shutdown() are thread-safe. Do not call shutdown() or
/// destroy the submitter from inside the model (a worker thread): it would wait for itself.
template <class In, class Out, SubmitterBackend Backend = NoSyncBackend>
class BatchedSubmitter {
 public:
  using Model = std::function<Out(In&)>;
  using Input = In;
  using Output = Out;

  /// Starts the workers and waits until each has made its backend context.
  /// Errors: throws Error(kInvalidArgument) for a bad option or an empty model; rethrows what
  /// the backend throws while making a worker context (no worker is left running then).
  BatchedSubmitter(Model model, SubmitterOptions options = {}, Backend backend = {})
      : model_(std::move(model)),
        options_(validated(std::move(options))),
        backend_(std::move(backend)),
        queue_(options_.queue_capacity) {
    if (!model_) throw Error(ErrorCode::kInvalidArgument, "BatchedSubmitter: the model is empty");
    std::latch started(static_cast<std::ptrdiff_t>(options_.workers));
    std::vector<std::exception_ptr> startup_errors(options_.workers);
    workers_.reserve(options_.workers);
    for (std::size_t i = 0; i < options_.workers; ++i) {
      workers_.emplace_back(
          [this, i, &started, &startup_errors] { run_worker(i, started, startup_errors[i]); });
    }
    started.wait();
    for (auto& e : startup_errors) {
      if (e) {
        shutdown();
        std::rethrow_exception(e);
      }
    }
  }

  BatchedSubmitter(const BatchedSubmitter&) = delete;
  BatchedSubmitter& operator=(const BatchedSubmitter&) = delete;

  /// Shuts down and drains (see shutdown()).
  ~BatchedSubmitter() { shutdown(); }

  /// Enqueues one request and returns the handle to its result. Thread-safe.
  /// With OverflowPolicy::kBlock, waits while the queue is full.
  /// Errors: throws Error(kShutDown) after shutdown() began, Error(kQueueFull) when the queue is
  /// full and the policy is kReject. The input is consumed either way.
  Future<Out> submit(In input) {
    auto* request = new detail::Request<In, Out>(std::move(input), Clock::now());
    boost::intrusive_ptr<detail::Completion<Out>> handle(request);  // the Future's reference
    intrusive_ptr_add_ref(request);                                 // the queue's reference
    const auto pushed = options_.on_full == OverflowPolicy::kBlock ? queue_.push_wait(request)
                                                                   : queue_.try_push(request);
    if (pushed != detail::RequestQueue<RequestPtr>::PushResult::kOk) {
      intrusive_ptr_release(request);
      stats_.on_rejected();
      if (pushed == detail::RequestQueue<RequestPtr>::PushResult::kClosed)
        throw Error(ErrorCode::kShutDown,
                    "submit() after shutdown(): the request was not accepted");
      throw Error(ErrorCode::kQueueFull, "the queue holds " + std::to_string(queue_.capacity()) +
                                             " requests already; the request was not accepted");
    }
    stats_.on_submitted();
    return Future<Out>(std::move(handle));
  }

  /// Stops accepting requests, completes every accepted one, and joins the workers. Idempotent
  /// and thread-safe; concurrent callers all return after the drain.
  void shutdown() {
    std::lock_guard lock(shutdown_mutex_);
    queue_.close();
    for (auto& w : workers_)
      if (w.joinable()) w.join();
  }

  /// A snapshot of the counters. Thread-safe; exact once shutdown() has returned.
  SubmitterStats stats() const noexcept { return stats_.snapshot(queue_.size()); }

  const SubmitterOptions& options() const noexcept { return options_; }

 private:
  using RequestT = detail::Request<In, Out>;
  using RequestPtr = RequestT*;

  static SubmitterOptions validated(SubmitterOptions o) {
    if (o.queue_capacity == 0)
      throw Error(ErrorCode::kInvalidArgument,
                  "SubmitterOptions.queue_capacity: expected >= 1, got 0");
    if (o.workers == 0)
      throw Error(ErrorCode::kInvalidArgument, "SubmitterOptions.workers: expected >= 1, got 0");
    o.policy.validate();
    return o;
  }

  void run_worker(std::size_t index, std::latch& started, std::exception_ptr& startup_error) {
    bool reported = false;
    try {
      auto ctx = backend_.make_worker(index);
      reported = true;
      started.count_down();
      worker_loop(ctx);
    } catch (...) {
      // Only the backend's make_worker can throw: the loop catches per request.
      if (!reported) {
        startup_error = std::current_exception();
        started.count_down();
      }
    }
  }

  template <class Ctx>
  void worker_loop(Ctx& ctx) {
    SyncPolicy policy = options_.policy;
    std::vector<RequestPtr> batch;
    batch.reserve(std::min<std::size_t>(policy.batch_limit(), 1024));
    PendingWork work;
    for (;;) {
      RequestPtr request = queue_.try_pop();
      if (request == nullptr) {
        if (!batch.empty()) {
          const auto hold = policy.hold_until(work);
          if (!queue_.closed() && Clock::now() < hold) {
            queue_.wait(hold, /*return_on_close=*/true);
            continue;
          }
          finish_batch(ctx, policy, batch, work);
          continue;
        }
        if (queue_.drained()) return;
        queue_.wait(Clock::time_point::max(), /*return_on_close=*/false);
        continue;
      }
      if (!run_request(*request)) continue;
      if (batch.empty()) work.oldest = request->arrived();
      batch.push_back(request);
      work.ops = batch.size();
      if (policy.should_sync(work, policy.uses_clock() ? Clock::now() : Clock::time_point{}))
        finish_batch(ctx, policy, batch, work);
    }
  }

  // Runs the model on one request. A request the model threw on completes now, with that
  // exception, and returns false; otherwise its output waits for the batch's sync.
  bool run_request(RequestT& request) {
    try {
      request.set_value(model_(request.input()));
      request.drop_input();
      return true;
    } catch (...) {
      request.drop_input();
      request.set_error(std::current_exception());
      request.publish();
      intrusive_ptr_release(&request);
      stats_.on_unbatched_failure();
      return false;
    }
  }

  template <class Ctx>
  void finish_batch(Ctx& ctx, SyncPolicy& policy, std::vector<RequestPtr>& batch,
                    PendingWork& work) {
    const auto before = Clock::now();
    std::exception_ptr sync_error;
    try {
      ctx.sync();
    } catch (...) {
      sync_error = std::make_exception_ptr(
          Error(ErrorCode::kSyncFailed,
                "device sync failed: " + detail::describe_exception(std::current_exception())));
    }
    const auto after = Clock::now();
    const std::size_t size = batch.size();
    for (RequestPtr r : batch) {
      if (sync_error) r->set_error(sync_error);
      r->publish();
      intrusive_ptr_release(r);
    }
    stats_.on_batch(size, sync_error ? size : 0);
    policy.observe(
        BatchObservation{size, after - before, after - work.oldest, after - work.oldest});
    batch.clear();
    work = PendingWork{};
  }

  Model model_;
  const SubmitterOptions options_;
  const Backend backend_;
  detail::RequestQueue<RequestPtr> queue_;
  detail::StatsCounters stats_;
  std::mutex shutdown_mutex_;  // serializes shutdown(); guards joining workers_
  std::vector<std::thread> workers_;
};

}  // namespace syncbatch
