// Device synchronization over LibTorch's device-generic c10 interfaces: CPU, CUDA, MPS (and any
// backend that registers a c10 DeviceGuardImpl). Only c10 headers here: no ATen, no torch.h.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include <c10/core/Device.h>
#include <c10/core/Event.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>

namespace syncbatch {

/// How to wait for the device.
enum class SyncMode {
  /// Wait for all work on the whole device (cudaDeviceSynchronize; torch::mps::synchronize).
  kDevice,
  /// Record an event on the stream that ran the work and wait for that event only. Other
  /// streams' work is not waited for. Where LibTorch's c10::Event has no synchronize() (before
  /// 2.4), waits for the stream instead, which is the same for a stream owned by one worker.
  kEvent,
};

/// "device" or "event".
std::string to_string(SyncMode mode);

/// Waits for the work issued on `device`, as `mode` says. A callable: pass it to SyncScope.
/// On the CPU it does nothing (CPU ops complete when they return).
///
/// Event sync can fall back to device sync: if recording or waiting on the event throws (MPS
/// events have had bugs), and `fallback_to_device` is set, it syncs the device instead from then
/// on; fell_back() tells whether that happened.
///
/// Thread safety: not thread-safe; one DeviceSync per thread (it holds one reusable event).
class DeviceSync {
 public:
  /// `stream`: the stream whose work kEvent waits for; by default the device's current stream
  /// of the calling thread at the time of each sync.
  /// Errors: throws Error(kInvalidArgument) if LibTorch has no support for `device`'s type.
  explicit DeviceSync(c10::Device device, SyncMode mode = SyncMode::kEvent,
                      std::optional<c10::Stream> stream = std::nullopt,
                      bool fallback_to_device = false);
  DeviceSync(DeviceSync&&) noexcept;
  DeviceSync& operator=(DeviceSync&&) noexcept;
  ~DeviceSync();

  /// Waits. Errors: rethrows what LibTorch throws (a device error surfaces here).
  void operator()();

  c10::Device device() const noexcept { return device_; }
  SyncMode mode() const noexcept { return mode_; }
  bool fell_back() const noexcept { return fell_back_; }

 private:
  struct EventHolder;
  c10::Device device_;
  SyncMode mode_;
  std::optional<c10::Stream> stream_;
  bool fallback_to_device_;
  bool fell_back_ = false;
  std::unique_ptr<EventHolder> event_;
};

namespace detail {
/// `device` with the calling thread's current index where it has none ("cuda" -> "cuda:0"):
/// tensors are always on an indexed device. Unchanged for the CPU, and for a device type this
/// LibTorch does not support.
c10::Device with_current_index(c10::Device device);
}  // namespace detail

/// Waits for all work on `device` (kDevice above). A free function for one-off use.
void synchronize_device(c10::Device device);

/// Options of TorchBackend.
struct TorchBackendOptions {
  SyncMode mode = SyncMode::kEvent;
  /// Give each worker its own stream from LibTorch's pool (CUDA). Where the backend has no
  /// stream pool (MPS, CPU), workers use the device's current stream.
  bool stream_per_worker = true;
  /// Run the model under c10::InferenceMode on the worker threads (no autograd bookkeeping).
  bool inference_mode = true;
  /// See DeviceSync: fall back from event to device sync if events throw.
  bool fallback_to_device = false;
  /// When a worker has a stream of its own: before running requests, make that stream wait for
  /// the work already enqueued on the device's default stream, where callers that set no stream
  /// produced their input tensors. One event per burst of requests, not per request. Inputs
  /// produced on other streams must be complete (or on the CPU) when they are submitted.
  bool wait_for_default_stream = true;
  /// Called on each worker thread once its context is set up (its stream current, inference
  /// mode on), before it takes any request: e.g. to capture graphs (GraphedModel::warm_up) or
  /// load per-worker state. The submitter's constructor rethrows what it throws.
  std::function<void()> on_worker_start{};
};

/// The BatchedSubmitter backend for a LibTorch device. Each worker thread gets a context that
/// makes the worker's stream and device current on that thread for its lifetime (so the model's
/// ops go to that stream), enters inference mode if asked, orders its stream after the default
/// stream's work before running requests (where it has a stream of its own), and syncs as the
/// mode says.
///
/// Outputs are allocated on the worker's stream and complete when the Future is ready. A caller
/// that uses an output on a stream of its own and frees it before that work completes should
/// call recordStream on it, as with any tensor crossing streams.
///
/// MPS: several threads encoding MPS work at once have crashed LibTorch; keep one worker per
/// MPS device (SubmitterOptions::workers = 1, the default). make_worker does not enforce this.
///
/// Thread safety: make_worker() is thread-safe; each Worker belongs to the thread that made it.
class TorchBackend {
 public:
  /// Errors: throws Error(kInvalidArgument) if LibTorch has no support for `device`'s type.
  explicit TorchBackend(c10::Device device, TorchBackendOptions options = {});

  class Worker {
   public:
    Worker(c10::Device device, c10::Stream stream, const TorchBackendOptions& options);
    Worker(const Worker&) = delete;
    Worker& operator=(const Worker&) = delete;
    void sync() { sync_(); }
    /// Orders this worker's stream after the default stream's work enqueued before requests
    /// that arrived at `arrived` (see TorchBackendOptions::wait_for_default_stream).
    void before_run(std::chrono::steady_clock::time_point arrived);
    c10::Stream stream() const noexcept { return stream_; }

   private:
    c10::Stream stream_;
    c10::StreamGuard stream_guard_;
    std::optional<c10::InferenceMode> inference_mode_;
    DeviceSync sync_;
    std::optional<c10::Event> inputs_ready_;  // set when the stream is not the default stream
    std::chrono::steady_clock::time_point covered_until_{};  // arrivals before it are ordered
  };

  /// Makes the context of worker `index`; call it on the worker thread.
  Worker make_worker(std::size_t index) const;

  c10::Device device() const noexcept { return device_; }
  const TorchBackendOptions& options() const noexcept { return options_; }

 private:
  c10::Device device_;
  TorchBackendOptions options_;
};

/// The best device LibTorch offers here: "cuda" if CUDA is available, else "mps" if MPS is,
/// else "cpu".
c10::Device default_device();

/// Parses "cpu", "cuda", "cuda:1", "mps"; "auto" gives default_device().
/// Errors: throws Error(kInvalidArgument) naming the expected forms and what came.
c10::Device parse_device(const std::string& spec);

}  // namespace syncbatch
