// Where the time goes: a client thread's own stream, the GPU's graph-replay limit, and the
// stacked worker's profile (time in the model and in the sync).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "mlp.hpp"
#include "syncbatch/torch.hpp"

namespace syncbatch::bench {

using Clock = std::chrono::steady_clock;

/// A stream of its own for a client thread on CUDA (the thread's current stream from then on).
class OwnStream {
 public:
  explicit OwnStream(c10::Device device)
      : guard_(device.is_cuda() ? c10::impl::getDeviceGuardImpl(device.type())
                                      ->getStreamFromGlobalPool(device, false)
                                : c10::impl::getDeviceGuardImpl(device.type())->getStream(device)) {
  }

 private:
  c10::StreamGuard guard_;
};

/// The GPU's own limit for batch-1 forwards: `per_graph` forwards captured in one graph and
/// replayed, one sync per replay; returns forwards per second. (Inputs go in and outputs come out
/// with one copy each per replay, amortized over the forwards.)
inline double graph_limit(const Mlp& mlp, int64_t width, c10::Device device, double seconds,
                          int per_graph = 64) {
  GraphedModel many(
      [&](const at::Tensor& x) {
        std::vector<at::Tensor> outs;
        outs.reserve(static_cast<std::size_t>(per_graph));
        for (int64_t i = 0; i < per_graph; ++i) outs.push_back(mlp(x.narrow(0, i, 1)));
        return at::cat(outs, 0);
      },
      device, {.buckets = {per_graph}});
  const at::Tensor x = at::randn({per_graph, width}, at::TensorOptions().device(device));
  OwnStream stream(device);
  DeviceSync sync(device);
  for (int i = 0; i < 3; ++i) many(x), sync();
  long replays = 0;
  const auto start = Clock::now();
  const auto end =
      start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  while (Clock::now() < end) {
    many(x);
    sync();
    ++replays;
  }
  const double wall = std::chrono::duration<double>(Clock::now() - start).count();
  return static_cast<double>(replays) * per_graph / wall;
}

/// Where a stacked submitter's worker spends its time: inside the model call (gathering and
/// stacking inputs, launching the forward, splitting the output) and inside the sync (waiting
/// for the device). What is left of the wall time is the queue, the policy and the completions.
struct WorkerClock {
  std::atomic<std::int64_t> model_ns{0};
  std::atomic<std::int64_t> sync_ns{0};
};

/// `model`, adding the time the worker spends in it to `clock`.
template <class In, class Out>
BatchModel<In, Out> timed(BatchModel<In, Out> model, WorkerClock& clock) {
  return {[run = std::move(model.run), &clock](Batch<In, Out>& b) {
    const auto t0 = Clock::now();
    run(b);
    clock.model_ns +=
        std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
  }};
}

/// TorchBackend whose workers add the time they spend syncing to a WorkerClock.
struct TimedTorchBackend {
  TorchBackend inner;
  WorkerClock* clock;
  struct Worker {
    TorchBackend::Worker worker;
    WorkerClock* clock;
    void sync() {
      const auto t0 = Clock::now();
      worker.sync();
      clock->sync_ns +=
          std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
    }
    void before_run(Clock::time_point arrived) { worker.before_run(arrived); }
  };
  Worker make_worker(std::size_t index) const { return Worker{inner.make_worker(index), clock}; }
};

}  // namespace syncbatch::bench
