// MultiDeviceSubmitter: one submitter over several devices (or model replicas), routing each
// request to the least-loaded one.
#pragma once

#include <atomic>
#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "syncbatch/batched_submitter.hpp"

namespace syncbatch {

/// One device's share of a MultiDeviceSubmitter: its own model replica (per-call or batch)
/// and its own backend (on CUDA: TorchBackend(cuda:i), whose workers own streams of that device).
template <class In, class Out, class Backend>
struct Replica {
  SubmitterModel<In, Out> model;
  Backend backend;
};

/// Spans several devices: one BatchedSubmitter (worker group, streams, model replica) per
/// device, each syncing once per batch on its own device. Each request goes to the replica
/// with the fewest outstanding requests, queued or running (ties broken round-robin), so a slow
/// or busy device receives less. With one replica it behaves as that replica's BatchedSubmitter.
///
/// Inputs must be usable by whichever replica runs them: CPU tensors with stacked mode staging
/// them to the device (StackingOptions::device), or plain values.
///
/// Thread safety: submit(), submit_then(), stats() and shutdown() are thread-safe.
template <class In, class Out, SubmitterBackend Backend = NoSyncBackend>
class MultiDeviceSubmitter {
 public:
  using Input = In;
  using Output = Out;
  using Submitter = BatchedSubmitter<In, Out, Backend>;

  /// Starts every replica with `options` (each gets its own queue of options.queue_capacity).
  /// Errors: Error(kInvalidArgument) for no replicas; otherwise what BatchedSubmitter's
  /// constructor throws for any replica (replicas already started are shut down).
  MultiDeviceSubmitter(std::vector<Replica<In, Out, Backend>> replicas,
                       SubmitterOptions options = {}) {
    if (replicas.empty())
      throw Error(ErrorCode::kInvalidArgument,
                  "MultiDeviceSubmitter: expected at least one replica, got none");
    submitters_.reserve(replicas.size());
    for (auto& r : replicas)
      submitters_.push_back(
          std::make_unique<Submitter>(std::move(r.model), options, std::move(r.backend)));
  }

  /// Routes one request (see the class comment) and returns its Future. Its deadline and
  /// priority apply on the replica that gets it (each replica has every priority level).
  /// Errors: as BatchedSubmitter::submit() of the chosen replica.
  Future<Out> submit(In input, const RequestOptions& request_options) {
    return pick().submit(std::move(input), request_options);
  }
  Future<Out> submit(In input, Clock::time_point deadline = Clock::time_point::max()) {
    return pick().submit(std::move(input), deadline);
  }

  /// As BatchedSubmitter::submit_then(), on the chosen replica.
  template <class F>
  Cancellation<Out> submit_then(In input, F on_done, const RequestOptions& request_options) {
    return pick().submit_then(std::move(input), std::move(on_done), request_options);
  }
  template <class F>
  Cancellation<Out> submit_then(In input, F on_done,
                                Clock::time_point deadline = Clock::time_point::max()) {
    return pick().submit_then(std::move(input), std::move(on_done), deadline);
  }

  /// Shuts every replica down, draining each. Idempotent.
  void shutdown() {
    for (auto& s : submitters_) s->shutdown();
  }

  std::size_t replicas() const noexcept { return submitters_.size(); }
  /// One replica's submitter (for its stats, or to reach one device directly).
  Submitter& replica(std::size_t i) { return *submitters_.at(i); }
  const Submitter& replica(std::size_t i) const { return *submitters_.at(i); }

  /// The replicas' counters and batch-size histograms added up (SubmitterStats::operator+=).
  /// Latency summaries and batch_limit stay zero here, since percentiles cannot be added: read
  /// each replica's with replica(i).stats().
  SubmitterStats stats() const noexcept {
    SubmitterStats total;
    for (const auto& s : submitters_) total += s->stats();
    return total;
  }

 private:
  // Fewest outstanding requests wins, scanning from a rotating start so ties spread evenly.
  Submitter& pick() noexcept {
    const std::size_t n = submitters_.size();
    const std::size_t start = next_.fetch_add(1, std::memory_order_relaxed) % n;
    std::size_t best = start;
    std::size_t best_depth = submitters_[start]->outstanding();
    for (std::size_t k = 1; k < n && best_depth != 0; ++k) {
      const std::size_t i = (start + k) % n;
      const std::size_t d = submitters_[i]->outstanding();
      if (d < best_depth) {
        best = i;
        best_depth = d;
      }
    }
    return *submitters_[best];
  }

  std::vector<std::unique_ptr<Submitter>> submitters_;
  std::atomic<std::size_t> next_{0};
};

}  // namespace syncbatch
