// The server's metrics in the Prometheus text exposition format (GET /metrics): its own counters
// of answered inference requests and their durations, and the submitter's statistics.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <boost/json/object.hpp>

#include "syncbatch/stats.hpp"

namespace syncbatch::http {

/// Thread safety: every member is thread-safe (relaxed atomics).
class Metrics {
 public:
  /// Upper bounds (seconds) of the request-duration histogram's buckets.
  static constexpr std::array<double, 16> kDurationBounds = {
      0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
      0.05,   0.1,     0.25,   0.5,   1,      2.5,   5,    10};

  /// One inference request answered with `status`, `duration` after its body arrived.
  void record(int status, std::chrono::nanoseconds duration) noexcept;
  void begin() noexcept { in_flight_.fetch_add(1, std::memory_order_relaxed); }
  void end() noexcept { in_flight_.fetch_sub(1, std::memory_order_relaxed); }

  /// One model's metrics to expose: its name, its counters, its submitter's stats if it has one.
  struct Exposed {
    std::string model;
    const Metrics* metrics = nullptr;
    std::optional<SubmitterStats> stats{};
  };

  /// Every metric of every model, each sample labelled model="<name>".
  static std::string prometheus(const std::vector<Exposed>& models);

  /// The answered requests, 2xx and the rest, with their summed durations, and when the latest
  /// was answered (ms since the epoch; 0: none yet): Triton's statistics extension's success,
  /// fail and last_inference.
  struct Totals {
    std::uint64_t success = 0;
    std::chrono::nanoseconds success_time{0};
    std::uint64_t fail = 0;
    std::chrono::nanoseconds fail_time{0};
    std::uint64_t last_ms = 0;
  };
  Totals totals() const noexcept;

 private:
  std::atomic<std::uint64_t> failures_{0};    // answers other than 2xx
  std::atomic<std::uint64_t> failure_ns_{0};  // and their durations
  std::atomic<std::uint64_t> last_ms_{0};
  std::array<std::atomic<std::uint64_t>, 600> by_status_{};
  std::array<std::atomic<std::uint64_t>, kDurationBounds.size() + 1> buckets_{};  // + over all
  std::atomic<std::uint64_t> duration_ns_{0};
  std::atomic<std::int64_t> in_flight_{0};
};

/// The batches a stacked model ran, by size: how many, and the model call's time (on CUDA the
/// launch; the device's time is in the submitter's sync time). Thread-safe: one short lock a
/// batch.
class BatchSizes {
 public:
  struct Entry {
    std::uint64_t count = 0;
    std::chrono::nanoseconds time{0};
  };
  void record(std::size_t size, std::chrono::nanoseconds took);
  std::map<std::size_t, Entry> snapshot() const;

 private:
  mutable std::mutex mu_;
  std::map<std::size_t, Entry> sizes_;
};

/// A submitter's counters, batch sizes, latency and queue-delay percentiles and the workers'
/// seconds by phase, as GET /stats shows them.
boost::json::object submitter_stats_object(const SubmitterStats& s);

}  // namespace syncbatch::http
