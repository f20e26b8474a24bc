// Counters and latency histograms a BatchedSubmitter keeps, and the snapshot it hands out.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "syncbatch/clock.hpp"

namespace syncbatch {

/// Percentiles of a latency distribution, from a log-linear histogram: each value is reported
/// as the upper edge of its bucket, at most 12.5% above the true value.
struct LatencySummary {
  std::uint64_t count = 0;
  std::chrono::nanoseconds mean{0};
  std::chrono::nanoseconds p50{0};
  std::chrono::nanoseconds p99{0};
  std::chrono::nanoseconds p999{0};
  std::chrono::nanoseconds max{0};  ///< Exact.
};

/// A snapshot of a submitter's counters. Counters are read one by one while workers run, so a
/// snapshot taken mid-flight may be off by a batch between fields; after shutdown() it is exact.
struct SubmitterStats {
  /// Batch-size histogram buckets: bucket i counts batches of size in [2^i, 2^(i+1)).
  static constexpr std::size_t kBuckets = 17;

  std::uint64_t submitted = 0;  ///< Requests accepted by submit().
  std::uint64_t rejected = 0;   ///< Requests refused by submit() (queue full, shut down, shed).
  std::uint64_t shed = 0;       ///< Of `rejected`, those refused with kOverloaded (shed_late).
  /// Requests completed, with a value or an error. A request is counted (here and in failed,
  /// expired, cancelled; or in rejected) before its caller gets its result.
  std::uint64_t completed = 0;
  std::uint64_t failed = 0;     ///< Of those, completed with an error.
  std::uint64_t expired = 0;    ///< Of `failed`, those not started by their deadline.
  std::uint64_t cancelled = 0;  ///< Of `failed`, those completed with Error(kCancelled).
  /// Requests whose queue timeout passed and that were moved behind fresh work
  /// (TimeoutAction::kDelay); they complete as usual later.
  std::uint64_t delayed = 0;
  std::uint64_t batches = 0;  ///< Batches run: requests completed by one sync.
  /// Device syncs issued: one per batch, so equal to `batches` (a batch whose requests all
  /// expired before it ran is neither run nor synced, and counts in neither). SyncScope's
  /// syncs() is where syncs and ops differ.
  std::uint64_t syncs = 0;
  std::uint64_t queued = 0;       ///< Requests waiting in the queue when the snapshot was taken.
  std::uint64_t batch_limit = 0;  ///< The policy's batch limit after the latest batch.
  /// Of `batches`, those whose worker waited for more requests before running them (the
  /// policy's hold_until).
  std::uint64_t held_batches = 0;

  std::uint64_t unbatched_failed = 0;  ///< Of `failed`, those that never joined a batch.
  /// Worker time (all workers together) spent after each batch's sync completing its requests:
  /// storing results, waking the threads that wait for them, counting. Next to wall time, it
  /// says how much of a worker the callers' wake-ups take.
  std::chrono::nanoseconds complete_time{0};
  /// Worker time (all workers together) in batch models' calls: on a device, mostly launching
  /// the batch's work. Per-call models' calls, made as each request is taken, are not timed.
  std::chrono::nanoseconds run_time{0};
  /// Worker time (all workers together) blocked in each batch's sync: waiting for the device.
  /// With run_time and complete_time, next to wall time, it says where a worker's time goes;
  /// the rest is taking requests and waiting for them.
  std::chrono::nanoseconds sync_time{0};
  std::array<std::uint64_t, kBuckets> batch_size_histogram{};

  LatencySummary queue_delay;  ///< Arrival to the start of the request's run.
  LatencySummary latency;      ///< Arrival to completion (end to end inside the submitter).
  /// As `latency`, for the requests completed in the last one to two seconds only: what the
  /// submitter does now (e.g. its recent p99 next to batch_limit, the adaptive policy's state).
  /// Approximate: a request completing exactly as its one-second window turns over may be left
  /// out.
  LatencySummary recent_latency;

  /// Adds another submitter's counters and batch-size histogram (MultiDeviceSubmitter's
  /// totals). Latency summaries and batch_limit are per submitter and are left as they are.
  SubmitterStats& operator+=(const SubmitterStats& o) noexcept {
    submitted += o.submitted;
    rejected += o.rejected;
    shed += o.shed;
    delayed += o.delayed;
    completed += o.completed;
    failed += o.failed;
    expired += o.expired;
    cancelled += o.cancelled;
    batches += o.batches;
    held_batches += o.held_batches;
    syncs += o.syncs;
    queued += o.queued;
    unbatched_failed += o.unbatched_failed;
    complete_time += o.complete_time;
    run_time += o.run_time;
    sync_time += o.sync_time;
    for (std::size_t b = 0; b < kBuckets; ++b) batch_size_histogram[b] += o.batch_size_histogram[b];
    return *this;
  }

  /// Mean requests per batch, 0 when no batch ran.
  double mean_batch_size() const noexcept {
    return batches == 0 ? 0.0 : static_cast<double>(completed - unbatched_failed) / batches;
  }
};

namespace detail {

/// A concurrent log-linear histogram of durations in nanoseconds: 8 buckets per power of two.
/// Thread safety: every member is thread-safe (relaxed atomics); record() is wait-free.
class LatencyHistogram {
 public:
  void record(std::chrono::nanoseconds d) noexcept {
    const std::uint64_t v = d.count() < 0 ? 0 : static_cast<std::uint64_t>(d.count());
    buckets_[index(v)].fetch_add(1, std::memory_order_relaxed);
    sum_.fetch_add(v, std::memory_order_relaxed);
    std::uint64_t prev = max_.load(std::memory_order_relaxed);
    while (v > prev && !max_.compare_exchange_weak(prev, v, std::memory_order_relaxed)) {
    }
  }

  LatencySummary summary() const noexcept { return merged_summary({this}); }

  /// The summary of several histograms' values together (e.g. consecutive windows).
  static LatencySummary merged_summary(
      std::initializer_list<const LatencyHistogram*> parts) noexcept {
    std::array<std::uint64_t, kCount> counts{};
    std::uint64_t total = 0, sum = 0, max = 0;
    for (const LatencyHistogram* h : parts) {
      for (std::size_t i = 0; i < kCount; ++i) {
        const std::uint64_t c = h->buckets_[i].load(std::memory_order_relaxed);
        counts[i] += c;
        total += c;
      }
      sum += h->sum_.load(std::memory_order_relaxed);
      max = std::max(max, h->max_.load(std::memory_order_relaxed));
    }
    LatencySummary s;
    s.count = total;
    if (total == 0) return s;
    s.mean = std::chrono::nanoseconds(sum / total);
    s.max = std::chrono::nanoseconds(max);
    auto at = [&](double q) {
      const auto rank = static_cast<std::uint64_t>(q * static_cast<double>(total - 1));
      std::uint64_t seen = 0;
      for (std::size_t i = 0; i < kCount; ++i) {
        seen += counts[i];
        if (seen > rank) return std::min(std::chrono::nanoseconds(upper(i)), s.max);
      }
      return s.max;
    };
    s.p50 = at(0.50);
    s.p99 = at(0.99);
    s.p999 = at(0.999);
    return s;
  }

  /// Forgets every value. Concurrent record()s may land before or after the reset.
  void reset() noexcept {
    for (auto& b : buckets_) b.store(0, std::memory_order_relaxed);
    sum_.store(0, std::memory_order_relaxed);
    max_.store(0, std::memory_order_relaxed);
  }

  /// Bucket of a value: exact below 8; above, 8 linear sub-buckets per power of two.
  static std::size_t index(std::uint64_t v) noexcept {
    if (v < kSub) return static_cast<std::size_t>(v);
    const unsigned exp = static_cast<unsigned>(std::bit_width(v)) - 1;  // >= 3
    const std::uint64_t sub = (v >> (exp - 3)) & (kSub - 1);
    return static_cast<std::size_t>((exp - 2) * kSub + sub);
  }
  /// The largest value in bucket i.
  static std::uint64_t upper(std::size_t i) noexcept {
    if (i < kSub) return i;
    const unsigned exp = static_cast<unsigned>(i / kSub) + 2;
    const std::uint64_t sub = i % kSub;
    return ((kSub + sub + 1) << (exp - 3)) - 1;
  }

 private:
  static constexpr std::uint64_t kSub = 8;
  static constexpr std::size_t kCount = (64 - 2) * kSub;
  std::array<std::atomic<std::uint64_t>, kCount> buckets_{};
  std::atomic<std::uint64_t> sum_{0};
  std::atomic<std::uint64_t> max_{0};
};

/// Latencies of the last one to two seconds: two histograms for alternate one-second windows;
/// the first record() of a new window clears the histogram that window reuses.
/// Thread safety: every member is thread-safe (relaxed atomics).
class RecentLatency {
 public:
  static constexpr Clock::duration kWindow = std::chrono::seconds(1);

  void record(std::chrono::nanoseconds d, Clock::time_point now) noexcept {
    const std::uint64_t w = window_of(now);
    const std::size_t slot = w & 1;
    std::uint64_t seen = window_[slot].load(std::memory_order_relaxed);
    if (seen != w && window_[slot].compare_exchange_strong(seen, w, std::memory_order_relaxed))
      slots_[slot].reset();
    slots_[slot].record(d);
  }

  /// The current and the previous window together, as of `now`.
  LatencySummary summary(Clock::time_point now) const noexcept {
    const std::uint64_t w = window_of(now);
    static const LatencyHistogram empty;
    const LatencyHistogram* parts[2];
    for (std::size_t slot = 0; slot < 2; ++slot) {
      const std::uint64_t seen = window_[slot].load(std::memory_order_relaxed);
      parts[slot] = (seen == w || seen + 1 == w) ? &slots_[slot] : &empty;
    }
    return LatencyHistogram::merged_summary({parts[0], parts[1]});
  }

 private:
  static std::uint64_t window_of(Clock::time_point t) noexcept {
    // +2 keeps window numbers above the initial 0 and 1, so fresh slots never look recent.
    return static_cast<std::uint64_t>(t.time_since_epoch() / kWindow) + 2;
  }
  std::array<LatencyHistogram, 2> slots_;
  std::array<std::atomic<std::uint64_t>, 2> window_{};
};

/// The live counters. Thread safety: every member is thread-safe (relaxed atomics).
class StatsCounters {
 public:
  /// `clock`: where latencies and the recent window read the time (SubmitterOptions::clock).
  explicit StatsCounters(ClockFn clock = &Clock::now) noexcept : clock_(clock) {}
  Clock::time_point now() const noexcept { return clock_(); }

  void on_submitted() noexcept { submitted_.fetch_add(1, std::memory_order_relaxed); }
  void on_rejected() noexcept { rejected_.fetch_add(1, std::memory_order_relaxed); }
  void on_shed() noexcept { shed_.fetch_add(1, std::memory_order_relaxed); }
  void on_delayed() noexcept { delayed_.fetch_add(1, std::memory_order_relaxed); }
  /// The policy's batch limit after the latest batch (0 before the first).
  std::size_t batch_limit() const noexcept {
    return static_cast<std::size_t>(batch_limit_.load(std::memory_order_relaxed));
  }
  /// A request that completed before joining a batch (the model threw on it, or it expired).
  void on_unbatched_failure(bool expired) noexcept {
    completed_.fetch_add(1, std::memory_order_relaxed);
    failed_.fetch_add(1, std::memory_order_relaxed);
    unbatched_failed_.fetch_add(1, std::memory_order_relaxed);
    if (expired) expired_.fetch_add(1, std::memory_order_relaxed);
  }
  /// Requests completed with Error(kCancelled), counted as failures by on_batch or
  /// on_unbatched_failure.
  void on_cancelled(std::size_t n) noexcept {
    if (n != 0) cancelled_.fetch_add(n, std::memory_order_relaxed);
  }
  void on_complete_time(std::chrono::nanoseconds d) noexcept {
    complete_ns_.fetch_add(static_cast<std::uint64_t>(d.count()), std::memory_order_relaxed);
  }
  void on_run_time(std::chrono::nanoseconds d) noexcept {
    run_ns_.fetch_add(static_cast<std::uint64_t>(d.count()), std::memory_order_relaxed);
  }
  void on_sync_time(std::chrono::nanoseconds d) noexcept {
    sync_ns_.fetch_add(static_cast<std::uint64_t>(d.count()), std::memory_order_relaxed);
  }
  void on_batch(std::size_t size, std::size_t failures, std::size_t limit, bool held) noexcept {
    completed_.fetch_add(size, std::memory_order_relaxed);
    if (held) held_batches_.fetch_add(1, std::memory_order_relaxed);
    if (failures != 0) failed_.fetch_add(failures, std::memory_order_relaxed);
    batches_.fetch_add(1, std::memory_order_relaxed);
    syncs_.fetch_add(1, std::memory_order_relaxed);
    histogram_[bucket(size)].fetch_add(1, std::memory_order_relaxed);
    batch_limit_.store(limit, std::memory_order_relaxed);
  }
  /// Accepted and not yet completed (queued or running). A completion can be counted just
  /// before its submission is, so the difference is clamped at zero.
  std::uint64_t outstanding() const noexcept {
    const std::uint64_t completed = completed_.load(std::memory_order_relaxed);
    const std::uint64_t submitted = submitted_.load(std::memory_order_relaxed);
    return submitted > completed ? submitted - completed : 0;
  }
  LatencyHistogram& queue_delay() noexcept { return queue_delay_; }
  /// A request's arrival-to-completion time, completed at `now`.
  void record_latency(std::chrono::nanoseconds d,
                      std::chrono::steady_clock::time_point now) noexcept {
    latency_.record(d);
    recent_.record(d, now);
  }

  SubmitterStats snapshot(std::size_t queued) const noexcept {
    SubmitterStats s;
    s.submitted = submitted_.load(std::memory_order_relaxed);
    s.rejected = rejected_.load(std::memory_order_relaxed);
    s.shed = shed_.load(std::memory_order_relaxed);
    s.delayed = delayed_.load(std::memory_order_relaxed);
    s.completed = completed_.load(std::memory_order_relaxed);
    s.failed = failed_.load(std::memory_order_relaxed);
    s.expired = expired_.load(std::memory_order_relaxed);
    s.cancelled = cancelled_.load(std::memory_order_relaxed);
    s.unbatched_failed = unbatched_failed_.load(std::memory_order_relaxed);
    s.batches = batches_.load(std::memory_order_relaxed);
    s.held_batches = held_batches_.load(std::memory_order_relaxed);
    s.syncs = syncs_.load(std::memory_order_relaxed);
    s.batch_limit = batch_limit_.load(std::memory_order_relaxed);
    s.queued = queued;
    s.complete_time = std::chrono::nanoseconds(complete_ns_.load(std::memory_order_relaxed));
    s.run_time = std::chrono::nanoseconds(run_ns_.load(std::memory_order_relaxed));
    s.sync_time = std::chrono::nanoseconds(sync_ns_.load(std::memory_order_relaxed));
    for (std::size_t i = 0; i < SubmitterStats::kBuckets; ++i)
      s.batch_size_histogram[i] = histogram_[i].load(std::memory_order_relaxed);
    s.queue_delay = queue_delay_.summary();
    s.latency = latency_.summary();
    s.recent_latency = recent_.summary(clock_());
    return s;
  }

  static std::size_t bucket(std::size_t size) noexcept {
    const std::size_t b = size == 0 ? 0 : static_cast<std::size_t>(std::bit_width(size)) - 1;
    return b < SubmitterStats::kBuckets ? b : SubmitterStats::kBuckets - 1;
  }

 private:
  std::atomic<std::uint64_t> submitted_{0};
  std::atomic<std::uint64_t> rejected_{0};
  ClockFn clock_;
  std::atomic<std::uint64_t> shed_{0};
  std::atomic<std::uint64_t> delayed_{0};
  std::atomic<std::uint64_t> completed_{0};
  std::atomic<std::uint64_t> failed_{0};
  std::atomic<std::uint64_t> expired_{0};
  std::atomic<std::uint64_t> cancelled_{0};
  std::atomic<std::uint64_t> unbatched_failed_{0};
  std::atomic<std::uint64_t> batches_{0};
  std::atomic<std::uint64_t> held_batches_{0};
  std::atomic<std::uint64_t> syncs_{0};
  std::atomic<std::uint64_t> batch_limit_{0};
  std::atomic<std::uint64_t> complete_ns_{0};
  std::atomic<std::uint64_t> run_ns_{0};
  std::atomic<std::uint64_t> sync_ns_{0};
  std::array<std::atomic<std::uint64_t>, SubmitterStats::kBuckets> histogram_{};
  LatencyHistogram queue_delay_;
  LatencyHistogram latency_;
  RecentLatency recent_;
};

}  // namespace detail
}  // namespace syncbatch
