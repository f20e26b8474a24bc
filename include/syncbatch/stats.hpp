// Counters a BatchedSubmitter keeps, and the snapshot it hands out.
#pragma once

#include <array>
#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>

namespace syncbatch {

/// A snapshot of a submitter's counters. Counters are read one by one while workers run, so a
/// snapshot taken mid-flight may be off by a batch between fields; after shutdown() it is exact.
struct SubmitterStats {
  /// Batch-size histogram buckets: bucket i counts batches of size in [2^i, 2^(i+1)).
  static constexpr std::size_t kBuckets = 17;

  std::uint64_t submitted = 0;  ///< Requests accepted by submit().
  std::uint64_t rejected = 0;   ///< Requests refused by submit() (queue full or shut down).
  std::uint64_t completed = 0;  ///< Requests completed, with a value or an error.
  std::uint64_t failed = 0;     ///< Of those, completed with an error.
  std::uint64_t batches = 0;    ///< Batches run: requests completed by one sync.
  std::uint64_t syncs = 0;      ///< Device syncs issued.
  std::uint64_t queued = 0;     ///< Requests waiting in the queue when the snapshot was taken.

  std::uint64_t unbatched_failed = 0;  ///< Of `failed`, those that never joined a batch.
  std::array<std::uint64_t, kBuckets> batch_size_histogram{};

  /// Mean requests per batch, 0 when no batch ran.
  double mean_batch_size() const noexcept {
    return batches == 0 ? 0.0 : static_cast<double>(completed - unbatched_failed) / batches;
  }
};

namespace detail {

/// The live counters. Thread safety: every member is thread-safe (relaxed atomics).
class StatsCounters {
 public:
  void on_submitted() noexcept { submitted_.fetch_add(1, std::memory_order_relaxed); }
  void on_rejected() noexcept { rejected_.fetch_add(1, std::memory_order_relaxed); }
  void on_unbatched_failure() noexcept {
    completed_.fetch_add(1, std::memory_order_relaxed);
    failed_.fetch_add(1, std::memory_order_relaxed);
    unbatched_failed_.fetch_add(1, std::memory_order_relaxed);
  }
  void on_batch(std::size_t size, std::size_t failures) noexcept {
    completed_.fetch_add(size, std::memory_order_relaxed);
    if (failures != 0) failed_.fetch_add(failures, std::memory_order_relaxed);
    batches_.fetch_add(1, std::memory_order_relaxed);
    syncs_.fetch_add(1, std::memory_order_relaxed);
    histogram_[bucket(size)].fetch_add(1, std::memory_order_relaxed);
  }

  SubmitterStats snapshot(std::size_t queued) const noexcept {
    SubmitterStats s;
    s.submitted = submitted_.load(std::memory_order_relaxed);
    s.rejected = rejected_.load(std::memory_order_relaxed);
    s.completed = completed_.load(std::memory_order_relaxed);
    s.failed = failed_.load(std::memory_order_relaxed);
    s.unbatched_failed = unbatched_failed_.load(std::memory_order_relaxed);
    s.batches = batches_.load(std::memory_order_relaxed);
    s.syncs = syncs_.load(std::memory_order_relaxed);
    s.queued = queued;
    for (std::size_t i = 0; i < SubmitterStats::kBuckets; ++i)
      s.batch_size_histogram[i] = histogram_[i].load(std::memory_order_relaxed);
    return s;
  }

  static std::size_t bucket(std::size_t size) noexcept {
    const std::size_t b = size == 0 ? 0 : static_cast<std::size_t>(std::bit_width(size)) - 1;
    return b < SubmitterStats::kBuckets ? b : SubmitterStats::kBuckets - 1;
  }

 private:
  std::atomic<std::uint64_t> submitted_{0};
  std::atomic<std::uint64_t> rejected_{0};
  std::atomic<std::uint64_t> completed_{0};
  std::atomic<std::uint64_t> failed_{0};
  std::atomic<std::uint64_t> unbatched_failed_{0};
  std::atomic<std::uint64_t> batches_{0};
  std::atomic<std::uint64_t> syncs_{0};
  std::array<std::atomic<std::uint64_t>, SubmitterStats::kBuckets> histogram_{};
};

}  // namespace detail
}  // namespace syncbatch
