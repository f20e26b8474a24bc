// BatchedSubmitter: many threads submit, worker threads run the calls and sync once per batch.
#pragma once

#include <algorithm>
#include <atomic>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <latch>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "syncbatch/detail/request.hpp"
#include "syncbatch/detail/request_queue.hpp"
#include "syncbatch/error.hpp"
#include "syncbatch/future.hpp"
#include "syncbatch/stats.hpp"
#include "syncbatch/sync_policy.hpp"
#include "syncbatch/thread_name.hpp"

namespace syncbatch {

/// What submit() does when the queue is full.
enum class OverflowPolicy {
  kBlock,   ///< Wait for room (back-pressure on the producer).
  kReject,  ///< Throw Error(kQueueFull) at once; nothing is enqueued.
};

/// What happens to a request whose queue timeout (SubmitterOptions::default_timeout) passes
/// before a worker takes it.
enum class TimeoutAction {
  kReject,  ///< It completes with Error(kDeadlineExceeded), unrun.
  kDelay,   ///< It is moved behind all other queued work, and runs when nothing else waits.
};

/// Options of a BatchedSubmitter. Plain values; checked by the constructor.
struct SubmitterOptions {
  /// Requests that may wait in the queue at once, per priority level (see level_capacity).
  /// At least 1.
  std::size_t queue_capacity = 1024;
  /// What submit() does when the queue is full.
  OverflowPolicy on_full = OverflowPolicy::kBlock;
  /// Worker threads. Each gets its own backend worker context (on CUDA: its own stream) and its
  /// own copy of the policy. With more than one, the model must be safe to call concurrently.
  std::size_t workers = 1;
  /// When each worker syncs, and (its batch_limit) how many requests one batch holds at most.
  /// Whatever the policy, a worker syncs its pending requests once the queue runs dry (after
  /// the policy's hold_until), so no request waits forever.
  SyncPolicy policy = EveryN{64};
  /// Who wakes the threads asleep in Future::get() once their batch completes. false: the
  /// worker, right after the batch's sync. true: a helper thread of the submitter, for batches
  /// of kDelegatedWakeMin requests or more, so the worker goes on to the next batch while the
  /// kernel wakes the callers one after another. For many blocking callers on many cores, where
  /// waking them takes a large share of the worker's time (SubmitterStats::complete_time shows
  /// it; docs/BENCHMARKS.md has measurements). Callbacks (submit_then, async_submit) and callers
  /// that find the result ready are not affected. Costs one thread, asleep while there is
  /// nothing to wake.
  bool waker_thread = false;
  /// The queue timeout of requests submitted without a deadline: they get arrival + this as
  /// their deadline, so one not started by then completes with Error(kDeadlineExceeded), unrun
  /// (Triton's default queue timeout with REJECT). Zero (the default): no deadline. At least 0.
  Clock::duration default_timeout = Clock::duration::zero();
  /// What a passed default_timeout does: kReject (above) or kDelay (the request keeps no
  /// deadline; a worker that finds its timeout passed moves it behind all queued work, of every
  /// level, where it runs once nothing else waits or the starvation limit picks it; counted in
  /// SubmitterStats::delayed). Triton's REJECT and DELAY.
  TimeoutAction on_timeout = TimeoutAction::kReject;
  /// Load shedding: submit() refuses at once, with Error(kOverloaded), a request with a deadline
  /// that cannot start by it: the batches ahead of it (its queue position over the batch limit,
  /// plus a batch running now, shared among the workers) times the measured mean batch time
  /// would pass the deadline. Requests without a deadline are never shed. Off by default.
  bool shed_late = false;
  /// Priority levels, 0 the highest. Each level has its own queue; a worker takes each request
  /// of a batch from the highest non-empty level (a batch may mix levels). At least 1.
  std::size_t priority_levels = 1;
  /// The level of requests submitted without one. Below priority_levels.
  std::size_t default_priority = 0;
  /// Each level's queue capacity, one entry per level, each at least 1. Empty (the default):
  /// queue_capacity for every level. A full level refuses or blocks (on_full) on its own.
  std::vector<std::size_t> level_capacity{};
  /// The starvation bound. 0 (the default): strict priority, a lower level waits while a higher
  /// one has requests. N > 0: a worker that has taken N requests from higher levels while a
  /// lower level (or a delayed request, TimeoutAction::kDelay) waited takes its next request
  /// from that level; so each waiting level gets at least one of every N + 1 takes of a worker,
  /// and a request waits behind at most N higher-level requests per one taken ahead of it in
  /// its own level.
  std::size_t starvation_limit = 0;
  /// Where arrivals, deadlines, timeouts, shedding and statistics read the time: a test's fake
  /// clock, or Clock::now. A policy's hold (waiting for more requests) still sleeps on Clock.
  ClockFn clock = &Clock::now;
};

/// What one request asks of the submitter beside its input.
struct RequestOptions {
  /// Its model call (stacked: its batch's forward) must start by then, or it completes with
  /// Error(kDeadlineExceeded), unrun. max: none (then SubmitterOptions::default_timeout
  /// applies).
  Clock::time_point deadline = Clock::time_point::max();
  /// Its priority level, 0 the highest; unset: SubmitterOptions::default_priority.
  std::optional<std::size_t> priority{};
};

/// The smallest batch whose wake-ups SubmitterOptions::waker_thread hands to the helper thread:
/// below it, the worker's own wake-ups cost less than the hand-off.
inline constexpr std::size_t kDelegatedWakeMin = 8;

/// A backend gives each worker thread a context, created on that thread, with two members:
/// - `sync()`: waits until all work the worker issued since the last sync has completed on the
///   device;
/// - `before_run(Clock::time_point arrived)`: called before a request (per-call mode) or a batch
///   (batch mode) whose latest arrival was `arrived` runs, so that the worker can order its
///   stream after the work that produced the inputs (TorchBackend makes its stream wait for the
///   device's default stream). A backend with nothing to order defines it empty.
/// Both are required: a context that misses one, or misspells it, fails this concept.
template <class B>
concept SubmitterBackend = requires(const B& b, std::size_t worker_index) {
  {b.make_worker(worker_index)};
  requires requires(decltype(b.make_worker(worker_index)) ctx, Clock::time_point arrived) {
    ctx.sync();
    ctx.before_run(arrived);
  };
};

/// The backend for work that completes when the call returns (CPU, tests): sync is a no-op.
struct NoSyncBackend {
  struct Worker {
    void sync() noexcept {}
    void before_run(Clock::time_point) noexcept {}
  };
  Worker make_worker(std::size_t) const noexcept { return {}; }
};

namespace detail {

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

/// The requests of one batch, as a BatchModel sees them. The model must give each
/// request a value or an error; one it leaves without either fails with Error(kBadRequest).
///
/// Thread safety: used by one worker thread, inside the model call.
template <class In, class Out>
class Batch {
 public:
  std::size_t size() const noexcept { return requests_.size(); }
  In& input(std::size_t i) noexcept { return requests_[i]->input(); }
  void set_value(std::size_t i, Out value) { requests_[i]->set_value(std::move(value)); }
  /// Gives request i the value `Make(*shared, index)`, made later on the thread that reads the
  /// result (Future::get) rather than here on the worker: for results cut from one batch output.
  template <class Shared, Out (*Make)(const Shared&, std::size_t)>
  void set_shared(std::size_t i, std::shared_ptr<const Shared> shared, std::size_t index) {
    requests_[i]->template set_shared<Shared, Make>(std::move(shared), index);
  }
  void set_error(std::size_t i, std::exception_ptr error) noexcept {
    requests_[i]->set_error(std::move(error));
  }
  bool has_error(std::size_t i) const noexcept { return requests_[i]->has_error(); }

  /// The batch is only ever made by BatchedSubmitter.
  explicit Batch(std::vector<detail::Request<In, Out>*>& requests) noexcept : requests_(requests) {}

 private:
  std::vector<detail::Request<In, Out>*>& requests_;
};

/// Per-call mode: the model runs once per request, as it arrives at a worker.
template <class In, class Out>
using PerCallModel = std::function<Out(In&)>;

/// Batch mode: the model runs once per batch and gives each of its requests a value or an
/// error. syncbatch::make_stacked_model builds one that concatenates tensor requests into one
/// forward (dynamic batching); make_fused_calls_model one that keeps per-call results but
/// replays a batch's calls together.
template <class In, class Out>
struct BatchModel {
  std::function<void(Batch<In, Out>&)> run;
  /// What one request counts toward the policy's batch limit (its rows, say: make_stacked_model
  /// sets it so); unset: 1 per request. Called on the worker thread; must not throw; 0 counts
  /// as 1. A worker never lets a batch go over the limit with a request it can leave for the
  /// next batch: it runs what it has first. A request that alone costs more than the limit runs
  /// as a batch of its own (stacked mode then splits it into forwards, or refuses it, by
  /// StackingOptions).
  std::function<std::size_t(const In&)> cost{};
};

/// The former name of BatchModel.
template <class In, class Out>
using StackedModel [[deprecated("renamed BatchModel")]] = BatchModel<In, Out>;

/// The model of a BatchedSubmitter: one call per request, or one per batch.
template <class In, class Out>
using SubmitterModel = std::variant<PerCallModel<In, Out>, BatchModel<In, Out>>;

/// Accepts requests from any number of threads and runs them on worker threads, each of which
/// issues one device sync per batch of requests (as its SyncPolicy says) and then completes
/// every request of the batch.
///
/// Two modes, chosen by the model passed in:
/// - per-call (`PerCallModel`): each request is its own model call, run as soon as a worker
///   takes it; what is batched is the sync.
/// - batch (`BatchModel`, e.g. stacked): the worker gathers a batch, then calls the model once
///   with all of it (dynamic batching).
///
///   BatchedSubmitter<torch::Tensor, torch::Tensor, TorchBackend> submitter(
///       [&](torch::Tensor& x) { return model->forward(x); }, options, TorchBackend(device));
///   Future<torch::Tensor> y = submitter.submit(x);   // from any thread
///   torch::Tensor out = y.get();                      // ready: its batch's sync has completed
///
/// Guarantees:
/// - Every accepted request completes exactly once: with the model's result, with the model's
///   error for that request, with Error(kDeadlineExceeded) if its deadline passed before it
///   started (below), with Error(kCancelled) if it was cancelled (below), or with
///   Error(kSyncFailed) if its batch's sync threw.
/// - Cancellation (Future::cancel(), the Cancellation that submit_then returns, an Asio
///   cancellation slot through async_submit), by the stage the request is in:
///   queued: it completes with kCancelled at once, on the cancelling thread, and is never run
///   (it keeps its queue slot until a worker pops and drops it);
///   taken, forming a batch (or about to start its per-call model call): it is left out of the
///   model call and completes with kCancelled then;
///   running (its model call started): it completes with kCancelled when its batch completes,
///   its result dropped, unless that completion began before the cancel, in which case it
///   completes with its value. Cancelling a completed request does nothing.
/// - Deadlines: a request starts when the model call that computes it starts. Per-call mode:
///   its own call, made as soon as a worker takes it from the queue. Batch mode: its batch's
///   model call, made once the batch has formed (a policy may hold a forming batch for more
///   requests). A request whose deadline is earlier than that moment completes with
///   Error(kDeadlineExceeded) and is not run (batch mode: it is left out of the batch, and a
///   batch left empty is neither run nor synced). A request that started is completed as usual,
///   whenever its batch's sync ends.
/// - Priorities: a worker takes each request from the highest non-empty level, first in first
///   out within a level, unless SubmitterOptions::starvation_limit picks a lower level that
///   waited; a request moved behind fresh work (TimeoutAction::kDelay) comes after every level.
/// - A request completes only after the sync of its batch has completed.
/// - shutdown() (and the destructor) stops accepting, then drains: every accepted request
///   completes before it returns.
///
/// Thread safety: submit(), submit_then(), stats() and shutdown() are thread-safe. Do not call
/// shutdown() or destroy the submitter from inside the model (a worker thread): it would wait
/// for itself.
template <class In, class Out, SubmitterBackend Backend = NoSyncBackend>
class BatchedSubmitter {
 public:
  using Input = In;
  using Output = Out;
  using Model = SubmitterModel<In, Out>;

  /// Per-call mode for a PerCallModel (or any callable `Out(In&)`), batch mode for a
  /// BatchModel. Starts the workers and waits until each has made its backend context.
  /// Errors: throws Error(kInvalidArgument) for a bad option or an empty model; rethrows what
  /// the backend throws while making a worker context (no worker is left running then).
  BatchedSubmitter(Model model, SubmitterOptions options = {}, Backend backend = {})
      : model_(std::move(model)),
        options_(validated(std::move(options))),
        backend_(std::move(backend)),
        cost_(cost_of(model_)),
        queue_(lane_capacities(options_), delays(options_)),
        stats_(options_.clock) {
    if (!std::visit([](const auto& m) { return static_cast<bool>(callable(m)); }, model_))
      throw Error(ErrorCode::kInvalidArgument, "BatchedSubmitter: the model is empty");
    start();
  }

  BatchedSubmitter(const BatchedSubmitter&) = delete;
  BatchedSubmitter& operator=(const BatchedSubmitter&) = delete;

  /// Shuts down and drains (see shutdown()).
  ~BatchedSubmitter() { shutdown(); }

  /// Enqueues one request and returns the handle to its result. Thread-safe.
  /// A request whose model call (stacked: its batch's forward) has not started by `deadline`
  /// completes with Error(kDeadlineExceeded), unrun (see the class comment).
  /// With OverflowPolicy::kBlock, waits while the queue is full.
  /// Errors: throws Error(kShutDown) after shutdown() began, Error(kQueueFull) when the queue is
  /// full and the policy is kReject. The input is consumed either way.
  Future<Out> submit(In input, Clock::time_point deadline = Clock::time_point::max()) {
    return submit(std::move(input), RequestOptions{.deadline = deadline});
  }

  /// As above, with a deadline and a priority level.
  /// Errors: as above, and Error(kInvalidArgument) for a level not below priority_levels.
  Future<Out> submit(In input, const RequestOptions& request_options) {
    const auto now = options_.clock();
    const std::size_t level = level_of(request_options);
    const auto deadline = effective_deadline(now, request_options.deadline);
    refuse_if_late(now, deadline, level);
    auto* request =
        new detail::Request<In, Out>(&wakeups_, &stats_, std::move(input), now, deadline);
    boost::intrusive_ptr<detail::Completion<Out>> handle(request);  // the Future's reference
    prepare(*request, now, request_options.deadline, level);
    enqueue(request);
    return Future<Out>(std::move(handle));
  }

  /// Enqueues one request whose result is delivered by calling `on_done(std::exception_ptr
  /// error, Out value)` exactly once (value default-constructed when error is set): on the worker
  /// thread once the request's batch has synced, or at once on the calling thread with the
  /// Error(kShutDown / kQueueFull) if the request is not accepted. `on_done` must be quick and
  /// must not throw (what it throws is dropped). async_submit (syncbatch/asio.hpp) builds on it.
  /// Returns the handle that cancels the request (see Cancellation; empty for a refused one).
  /// Errors: none thrown for a refused request; they go to `on_done`.
  template <class F>
  requires std::invocable<F&, std::exception_ptr, Out> Cancellation<Out> submit_then(
      In input, F on_done, Clock::time_point deadline = Clock::time_point::max()) {
    return submit_then(std::move(input), std::move(on_done), RequestOptions{.deadline = deadline});
  }

  /// As above, with a deadline and a priority level. A level not below priority_levels goes to
  /// `on_done` as Error(kInvalidArgument).
  template <class F>
  requires std::invocable<F&, std::exception_ptr, Out> Cancellation<Out> submit_then(
      In input, F on_done, const RequestOptions& request_options) {
    const auto now = options_.clock();
    const auto deadline = effective_deadline(now, request_options.deadline);
    auto* request = new detail::CallbackRequest<In, Out, std::decay_t<F>>(
        &wakeups_, &stats_, std::move(input), now, deadline, std::move(on_done));
    boost::intrusive_ptr<detail::Completion<Out>> guard(request);
    std::exception_ptr refused;
    try {
      const std::size_t level = level_of(request_options);
      refuse_if_late(now, deadline, level);
      prepare(*request, now, request_options.deadline, level);
      enqueue(request);
      return Cancellation<Out>(std::move(guard));
    } catch (const Error&) {
      refused = std::current_exception();
    }
    // Completed after the catch block, never inside it: see detail::Completion. Taken first, so
    // nothing can cancel (and complete) it a second time.
    request->take();
    request->set_error(std::move(refused));
    request->complete();
    return {};
  }

  /// Stops accepting requests, completes every accepted one, and joins the workers. Idempotent
  /// and thread-safe; concurrent callers all return after the drain.
  void shutdown() {
    std::lock_guard lock(shutdown_mutex_);
    queue_.close();
    for (auto& w : workers_)
      if (w.joinable()) w.join();
    if (waker_.joinable()) {  // after the workers: it delivers their last wake-ups, then stops
      waker_stop_.store(true, std::memory_order_release);
      ask_waker();
      waker_.join();
    }
  }

  /// A snapshot of the counters. Thread-safe; exact once shutdown() has returned.
  SubmitterStats stats() const noexcept { return stats_.snapshot(queue_.size()); }

  /// Requests accepted and not yet completed, queued or running: two relaxed loads, for
  /// routing. Thread-safe.
  std::size_t outstanding() const noexcept {
    return static_cast<std::size_t>(stats_.outstanding());
  }

  const SubmitterOptions& options() const noexcept { return options_; }

  /// True in batch mode (a BatchModel, e.g. stacked).
  bool stacked() const noexcept { return std::holds_alternative<BatchModel<In, Out>>(model_); }

 private:
  using RequestT = detail::Request<In, Out>;
  using RequestPtr = RequestT*;
  using Queue = detail::RequestQueue<RequestPtr>;
  using BatchFn = std::function<void(Batch<In, Out>&)>;
  template <class F>
  static constexpr bool kPerCall = std::is_same_v<F, PerCallModel<In, Out>>;

  // The batch a worker is forming: what its policy sees, and what the worker saw.
  struct Forming {
    PendingWork pending;
    Clock::time_point oldest_arrival{};
    bool held = false;                  // the worker waited for more requests (hold_until)
    std::size_t joined_while_held = 0;  // requests taken after that wait began
  };

  static SubmitterOptions validated(SubmitterOptions o) {
    if (o.queue_capacity == 0)
      throw Error(ErrorCode::kInvalidArgument,
                  "SubmitterOptions.queue_capacity: expected >= 1, got 0");
    if (o.workers == 0)
      throw Error(ErrorCode::kInvalidArgument, "SubmitterOptions.workers: expected >= 1, got 0");
    if (o.default_timeout < Clock::duration::zero())
      throw Error(ErrorCode::kInvalidArgument,
                  "SubmitterOptions.default_timeout: expected >= 0, got " +
                      std::to_string(
                          std::chrono::duration_cast<std::chrono::microseconds>(o.default_timeout)
                              .count()) +
                      " us");
    if (o.priority_levels == 0)
      throw Error(ErrorCode::kInvalidArgument,
                  "SubmitterOptions.priority_levels: expected >= 1, got 0");
    if (o.default_priority >= o.priority_levels)
      throw Error(ErrorCode::kInvalidArgument,
                  "SubmitterOptions.default_priority: expected a level below priority_levels (" +
                      std::to_string(o.priority_levels) + "), got " +
                      std::to_string(o.default_priority));
    if (!o.level_capacity.empty() && o.level_capacity.size() != o.priority_levels)
      throw Error(ErrorCode::kInvalidArgument,
                  "SubmitterOptions.level_capacity: expected one entry per level (" +
                      std::to_string(o.priority_levels) + ") or none, got " +
                      std::to_string(o.level_capacity.size()));
    for (std::size_t i = 0; i < o.level_capacity.size(); ++i)
      if (o.level_capacity[i] == 0)
        throw Error(ErrorCode::kInvalidArgument, "SubmitterOptions.level_capacity[" +
                                                     std::to_string(i) + "]: expected >= 1, got 0");
    if (o.clock == nullptr)
      throw Error(ErrorCode::kInvalidArgument,
                  "SubmitterOptions.clock: expected a function, got nullptr");
    o.policy.validate();
    return o;
  }

  static std::vector<std::size_t> lane_capacities(const SubmitterOptions& o) {
    if (!o.level_capacity.empty()) return o.level_capacity;
    return std::vector<std::size_t>(o.priority_levels, o.queue_capacity);
  }
  static bool delays(const SubmitterOptions& o) {
    return o.on_timeout == TimeoutAction::kDelay && o.default_timeout != Clock::duration::zero();
  }

  std::size_t level_of(const RequestOptions& r) const {
    const std::size_t level = r.priority.value_or(options_.default_priority);
    if (level >= options_.priority_levels)
      throw Error(ErrorCode::kInvalidArgument,
                  "priority: expected a level below " + std::to_string(options_.priority_levels) +
                      " (0 the highest), got " + std::to_string(level));
    return level;
  }

  // Sets what the worker reads besides the deadline: the level, and kDelay's timeout.
  void prepare(RequestT& request, Clock::time_point now, Clock::time_point asked_deadline,
               std::size_t level) const {
    request.set_priority(level);
    if (asked_deadline == Clock::time_point::max() && delays(options_))
      request.set_delay_at(now + options_.default_timeout);
  }

  void start() {
    if (options_.waker_thread)
      waker_ = std::thread([this] {
        name_this_thread("sb-waker");
        waker_loop();
      });
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

  Clock::time_point effective_deadline(Clock::time_point now, Clock::time_point deadline) const {
    if (deadline != Clock::time_point::max() ||
        options_.default_timeout == Clock::duration::zero() ||
        options_.on_timeout != TimeoutAction::kReject)
      return deadline;
    return now + options_.default_timeout;
  }

  // SubmitterOptions::shed_late: throws Error(kOverloaded) for a request predicted to start
  // after its deadline. What is ahead of it: the queued requests of its level and higher ones.
  void refuse_if_late(Clock::time_point now, Clock::time_point deadline, std::size_t level) {
    if (!options_.shed_late || deadline == Clock::time_point::max()) return;
    const auto batch_ns = batch_ns_.load(std::memory_order_relaxed);
    if (batch_ns <= 0) return;  // nothing measured yet
    const std::size_t queued = queue_.size_through(level);
    const std::size_t limit = std::max<std::size_t>(stats_.batch_limit(), 1);
    const bool running = static_cast<std::size_t>(stats_.outstanding()) > queue_.size();
    const double batches = (static_cast<double>(queued / limit) + (running ? 1.0 : 0.0)) /
                           static_cast<double>(options_.workers);
    const auto start = now + std::chrono::nanoseconds(static_cast<int64_t>(batches * batch_ns));
    if (start <= deadline) return;
    stats_.on_rejected();
    stats_.on_shed();
    throw Error(
        ErrorCode::kOverloaded,
        "predicted to start " +
            std::to_string(
                std::chrono::duration_cast<std::chrono::microseconds>(start - deadline).count()) +
            " us after its deadline (" + std::to_string(queued) + " requests queued, mean batch " +
            std::to_string(batch_ns / 1000) + " us); the request was not accepted");
  }

  // Hands one reference of `request` to the queue. The caller holds another.
  void enqueue(RequestPtr request) {
    intrusive_ptr_add_ref(request);
    const std::size_t level = request->priority();
    const auto pushed = options_.on_full == OverflowPolicy::kBlock
                            ? queue_.push_wait(request, level)
                            : queue_.try_push(request, level);
    if (pushed == Queue::PushResult::kOk) {
      stats_.on_submitted();
      return;
    }
    intrusive_ptr_release(request);
    stats_.on_rejected();
    if (pushed == Queue::PushResult::kClosed)
      throw Error(ErrorCode::kShutDown, "submit() after shutdown(): the request was not accepted");
    throw Error(ErrorCode::kQueueFull,
                (options_.priority_levels == 1
                     ? std::string("the queue holds ")
                     : "the queue of priority level " + std::to_string(level) + " holds ") +
                    std::to_string(queue_.capacity(level)) +
                    " requests already; the request was not accepted");
  }

  void run_worker(std::size_t index, std::latch& started, std::exception_ptr& startup_error) {
    bool reported = false;
    name_this_thread("sb-worker-" + std::to_string(index));
    try {
      auto ctx = backend_.make_worker(index);
      reported = true;
      started.count_down();
      // The mode is chosen once per worker: each loop is compiled for its own model type.
      std::visit([&](auto& model) { worker_loop(ctx, callable(model)); }, model_);
    } catch (...) {
      // Only the backend's make_worker can throw: the loop catches per request and per batch.
      if (!reported) {
        startup_error = std::current_exception();
        started.count_down();
      }
    }
  }

  static std::function<std::size_t(const In&)> cost_of(const Model& m) {
    const auto* batch = std::get_if<BatchModel<In, Out>>(&m);
    return batch != nullptr ? batch->cost : nullptr;
  }

  static const PerCallModel<In, Out>& callable(const PerCallModel<In, Out>& m) noexcept {
    return m;
  }
  static const BatchFn& callable(const BatchModel<In, Out>& m) noexcept { return m.run; }

  template <class Ctx, class F>
  void worker_loop(Ctx& ctx, const F& model) {
    SyncPolicy policy = options_.policy;
    std::vector<RequestPtr> batch;
    batch.reserve(std::min<std::size_t>(policy.batch_limit(), 1024));
    Forming work;
    std::vector<std::size_t> passed(queue_.lanes());  // starvation_limit's count, per lane
    for (;;) {
      RequestPtr request = pop_next(passed);
      if (request != nullptr && request->delay_at() != Clock::time_point::max() &&
          options_.clock() >= request->delay_at()) {  // TimeoutAction::kDelay
        request->mark_delayed();
        queue_.push_delayed(request);
        stats_.on_delayed();
        continue;
      }
      if (request != nullptr && !request->take()) {  // cancelled while queued: completed then
        intrusive_ptr_release(request);
        continue;
      }
      if (request == nullptr) {
        if (!batch.empty()) {
          const auto hold = policy.hold_until(work.pending);
          if (!queue_.closed() && options_.clock() < hold) {
            work.held = true;
            queue_.wait(hold, /*return_on_close=*/true);
            continue;
          }
          finish_batch(ctx, model, policy, batch, work);
          continue;
        }
        if (queue_.drained()) return;
        queue_.wait(Clock::time_point::max(), /*return_on_close=*/false);
        continue;
      }
      const auto started = options_.clock();
      if (started > request->deadline()) {
        fail_alone(*request, deadline_error("was not started before its deadline"),
                   /*expired=*/true);
        continue;
      }
      stats_.queue_delay().record(started - request->arrived());
      if constexpr (kPerCall<F>) {
        if (request->cancel_requested()) {
          cancel_alone(*request, "before its call started");
          continue;
        }
        ctx.before_run(request->arrived());
        if (!run_request(model, *request)) continue;
      }
      std::size_t cost = 1;
      if constexpr (!kPerCall<F>) {
        if (cost_) {
          cost = std::max<std::size_t>(1, cost_(request->input()));
          // Room for it in this batch, or this batch runs first.
          if (!batch.empty() && work.pending.ops + cost > policy.batch_limit())
            finish_batch(ctx, model, policy, batch, work);
        }
      }
      // The batch's clock starts when the worker takes its first request, not when that request
      // arrived: under a backlog, requests that already waited must still be batched together
      // (timing from arrival would sync each one alone, and the backlog would only grow).
      if (batch.empty()) {
        work.pending.oldest = started;
        work.oldest_arrival = request->arrived();
      }
      if (work.held) ++work.joined_while_held;
      batch.push_back(request);
      work.pending.ops += cost;
      if (policy.should_sync(work.pending, started)) finish_batch(ctx, model, policy, batch, work);
    }
  }

  // The next request by priority: the first non-empty lane, unless a lane passed over
  // starvation_limit times comes first (see SubmitterOptions::starvation_limit).
  RequestPtr pop_next(std::vector<std::size_t>& passed) {
    const std::size_t lanes = passed.size();
    if (lanes == 1) return queue_.try_pop(0);
    const std::size_t limit = options_.starvation_limit;
    std::size_t first = 0;
    if (limit != 0) {
      for (std::size_t l = 1; l < lanes; ++l)
        if (passed[l] >= limit) {
          first = l;
          break;
        }
    }
    for (std::size_t k = 0; k < lanes; ++k) {
      const std::size_t l = (first + k) % lanes;
      RequestPtr r = queue_.try_pop(l);
      if (r == nullptr) {
        passed[l] = 0;  // nothing waited there
        continue;
      }
      passed[l] = 0;
      for (std::size_t m = l + 1; m < lanes; ++m)
        if (!queue_.empty(m)) ++passed[m];
      return r;
    }
    return nullptr;
  }

  static std::exception_ptr deadline_error(const char* what) {
    return std::make_exception_ptr(
        Error(ErrorCode::kDeadlineExceeded, std::string("the request ") + what));
  }

  // Batch mode: requests cancelled, or whose deadline passed, while their batch formed complete
  // now, with kCancelled or kDeadlineExceeded, and are left out of the model call.
  void drop_unwanted(std::vector<RequestPtr>& batch) {
    const auto now = options_.clock();
    const auto unwanted = [now](RequestPtr r) {
      return r->cancel_requested() || now > r->deadline();
    };
    if (std::none_of(batch.begin(), batch.end(), unwanted)) return;
    std::vector<RequestPtr> kept;
    kept.reserve(batch.size());
    for (RequestPtr r : batch) {
      if (r->cancel_requested()) {
        cancel_alone(*r, "before its batch ran");
      } else if (now > r->deadline()) {
        fail_alone(*r, deadline_error("passed its deadline before its batch ran"),
                   /*expired=*/true);
      } else {
        kept.push_back(r);
      }
    }
    batch.swap(kept);
  }

  // Completes a taken request that was cancelled before its model call, unrun.
  void cancel_alone(RequestT& request, const char* when) {
    stats_.on_cancelled(1);
    fail_alone(request, detail::cancelled_error(when), /*expired=*/false);
  }

  // Per-call mode: runs the model on one request. A request the model threw on completes now,
  // with that exception, and returns false; otherwise its output waits for the batch's sync.
  bool run_request(const PerCallModel<In, Out>& model, RequestT& request) {
    std::exception_ptr error;
    try {
      request.set_value(model(request.input()));
      return true;  // the input lives until the batch's sync: the device may still read it
    } catch (...) {
      error = std::current_exception();
    }
    // Completed after the catch block, never inside it: see detail::Completion.
    fail_alone(request, std::move(error), /*expired=*/false);
    return false;
  }

  // Completes a request that never joined a batch. Its input stays with the request (the model
  // may have issued device work that reads it before throwing).
  // Counted before completed, as a batch's requests are.
  void fail_alone(RequestT& request, std::exception_ptr error, bool expired) {
    request.set_error(std::move(error));
    const auto now = options_.clock();
    stats_.record_latency(now - request.arrived(), now);
    stats_.on_unbatched_failure(expired);
    request.complete();
    detail::Completion<Out>::wake_all(wakeups_);
    intrusive_ptr_release(&request);
  }

  template <class Ctx, class F>
  void finish_batch(Ctx& ctx, const F& model, SyncPolicy& policy, std::vector<RequestPtr>& batch,
                    Forming& work) {
    const Clock::time_point oldest_arrival = work.oldest_arrival;
    if constexpr (!kPerCall<F>) {
      drop_unwanted(batch);
      if (batch.empty()) {  // every request expired or was cancelled: nothing to run or sync
        work = Forming{};
        return;
      }
      Clock::time_point latest = oldest_arrival;
      for (RequestPtr r : batch) latest = std::max(latest, r->arrived());
      ctx.before_run(latest);
      const auto run_start = options_.clock();
      run_batch(model, batch);
      stats_.on_run_time(options_.clock() - run_start);
    }
    const auto before = options_.clock();
    std::optional<std::string> sync_error;
    try {
      ctx.sync();
    } catch (...) {
      sync_error = "device sync failed: " + detail::describe_exception(std::current_exception());
    }
    const auto after = options_.clock();
    stats_.on_sync_time(after - before);
    const std::size_t size = batch.size();
    std::size_t failures = 0, cancelled = 0;
    for (RequestPtr r : batch) {
      r->drop_input();
      // One exception object per request, not one shared: see detail::Completion.
      if (sync_error) {
        r->set_error(std::make_exception_ptr(Error(ErrorCode::kSyncFailed, *sync_error)));
      } else if (r->cancel_requested()) {  // cancelled while its batch ran: the result is dropped
        r->set_error(detail::cancelled_error("while its batch ran"));
        ++cancelled;
      }
      stats_.record_latency(after - r->arrived(), after);
      failures += r->prepare() ? 1 : 0;  // a result that cannot be made fails its request too
    }
    // max_latency counts from the oldest request's arrival: the queueing it includes is what
    // tells Adaptive that the worker is falling behind.
    // In the policy's units: the requests' costs when the model counts them.
    const std::size_t ops = cost_ ? work.pending.ops : size;
    policy.observe(BatchObservation{ops, after - before, after - work.pending.oldest,
                                    after - oldest_arrival, work.held, work.joined_while_held});
    // Counted before delivered: a caller that has its result finds it in stats().
    stats_.on_cancelled(cancelled);
    stats_.on_batch(size, failures, policy.batch_limit(), work.held);
    // Then delivered together: callbacks that post to io threads reach them in one burst.
    for (RequestPtr r : batch) {
      r->complete();
      intrusive_ptr_release(r);
    }
    if (options_.waker_thread && size >= kDelegatedWakeMin) {
      ask_waker();
    } else {
      detail::Completion<Out>::wake_all(wakeups_);
    }
    stats_.on_complete_time(options_.clock() - after);
    if (options_.shed_late) {
      // The mean batch time shedding predicts with: the batch time the policy was just given
      // (first take to the end of the sync), as a moving average written by any worker.
      const auto took =
          std::chrono::duration_cast<std::chrono::nanoseconds>(after - work.pending.oldest).count();
      const auto mean = batch_ns_.load(std::memory_order_relaxed);
      batch_ns_.store(mean == 0 ? took : (mean * 7 + took) / 8, std::memory_order_relaxed);
    }
    batch.clear();
    work = Forming{};
  }

  void ask_waker() noexcept {
    wake_requests_.fetch_add(1, std::memory_order_release);
    wake_requests_.notify_one();
  }

  // The helper thread of SubmitterOptions::waker_thread: one wake_all() for however many
  // batches completed since the last, until shutdown() stops it (after a last wake_all()).
  void waker_loop() noexcept {
    std::uint64_t served = 0;
    for (;;) {
      const std::uint64_t asked = wake_requests_.load(std::memory_order_acquire);
      if (asked != served) {
        served = asked;
        detail::Completion<Out>::wake_all(wakeups_);
        continue;
      }
      if (waker_stop_.load(std::memory_order_acquire)) return;
      wake_requests_.wait(asked, std::memory_order_acquire);
    }
  }

  // Batch mode: one model call for the whole batch; whatever it leaves unanswered fails.
  void run_batch(const BatchFn& model, std::vector<RequestPtr>& batch) {
    try {
      Batch<In, Out> view(batch);
      model(view);
    } catch (...) {
      const auto error = std::current_exception();
      for (RequestPtr r : batch)
        if (!r->has_value() && !r->has_error()) r->set_error(error);
    }
    for (RequestPtr r : batch) {
      if (!r->has_value() && !r->has_error())
        r->set_error(std::make_exception_ptr(
            Error(ErrorCode::kBadRequest, "the batch model gave this request no result")));
    }
  }

  const Model model_;
  const SubmitterOptions options_;
  const Backend backend_;
  const std::function<std::size_t(const In&)> cost_;  // BatchModel::cost, or empty
  Queue queue_;
  std::atomic<std::uint32_t> wakeups_{0};        // sleeping Futures wait here; bumped per batch
  std::atomic<std::int64_t> batch_ns_{0};        // mean batch time, for shed_late
  std::atomic<std::uint64_t> wake_requests_{0};  // batches whose wake-ups the waker owes
  std::atomic<bool> waker_stop_{false};
  std::thread waker_;  // SubmitterOptions::waker_thread
  detail::StatsCounters stats_;
  std::mutex shutdown_mutex_;  // serializes shutdown(); guards joining workers_
  std::vector<std::thread> workers_;
};

}  // namespace syncbatch
