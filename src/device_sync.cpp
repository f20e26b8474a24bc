// Device synchronization through c10's device-generic interfaces.
//
// LibTorch versions differ here; rather than guess which release added a member, the code asks
// the compiler whether it exists (C++20 requires-expressions in templates):
// - DeviceGuardImplInterface::synchronizeDevice (2.x): used for SyncMode::kDevice when present;
//   otherwise CUDA uses torch::cuda::synchronize(index), MPS torch::mps::synchronize() where
//   torch/mps.h exists, and other backends synchronize the current stream.
// - c10::Event::synchronize (2.4+): used for SyncMode::kEvent when present; otherwise the stream
//   the event would be recorded on is synchronized, which waits for the same work.
#include "syncbatch/torch/device_sync.hpp"

#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <torch/cuda.h>

#if __has_include(<torch/mps.h>)
#include <torch/mps.h>
#define SYNCBATCH_HAS_TORCH_MPS_H 1
#else
#include <ATen/Context.h>
#define SYNCBATCH_HAS_TORCH_MPS_H 0
#endif

#include "syncbatch/error.hpp"

namespace syncbatch {
namespace {

template <class Impl>
concept HasSynchronizeDevice = requires(const Impl& impl, c10::DeviceIndex index) {
  impl.synchronizeDevice(index);
};

template <class Event>
concept HasEventSynchronize = requires(const Event& event) {
  event.synchronize();
};

const c10::impl::DeviceGuardImplInterface* guard_impl(c10::DeviceType type) {
  if (!c10::impl::hasDeviceGuardImpl(type))
    throw Error(ErrorCode::kInvalidArgument,
                "this LibTorch has no support for " + c10::DeviceTypeName(type, true) +
                    " devices (expected cpu, or a device type it was built with)");
  return c10::impl::getDeviceGuardImpl(type);
}

// Gives a device without an index (e.g. "cuda") the calling thread's current index.
// Errors: Error(kInvalidArgument) for a device type this LibTorch does not support.
c10::Device normalized(c10::Device device) {
  guard_impl(device.type());
  return detail::with_current_index(device);
}

template <class Impl>
void synchronize_device_with(const Impl* impl, c10::Device device) {
  if constexpr (HasSynchronizeDevice<Impl>) {
    impl->synchronizeDevice(device.index());
  } else if (device.is_cuda()) {
    torch::cuda::synchronize(device.index());
  } else {
#if SYNCBATCH_HAS_TORCH_MPS_H
    if (device.is_mps()) {
      torch::mps::synchronize();
      return;
    }
#endif
    impl->synchronizeStream(impl->getStream(device));
  }
}

template <class Event>
void synchronize_event(Event& event, const c10::Stream& stream) {
  if constexpr (HasEventSynchronize<Event>) {
    event.record(stream);
    event.synchronize();
  } else {
    stream.synchronize();
  }
}

}  // namespace

c10::Device detail::with_current_index(c10::Device device) {
  if (device.is_cpu() || device.has_index() || !c10::impl::hasDeviceGuardImpl(device.type()))
    return device;
  return c10::Device(device.type(),
                     c10::impl::getDeviceGuardImpl(device.type())->getDevice().index());
}

std::string to_string(SyncMode mode) {
  return mode == SyncMode::kDevice ? "device" : "event";
}

void synchronize_device(c10::Device device) {
  if (device.is_cpu()) return;
  device = normalized(device);
  synchronize_device_with(guard_impl(device.type()), device);
}

struct DeviceSync::EventHolder {
  explicit EventHolder(c10::DeviceType type) : event(type) {}
  c10::Event event;
};

DeviceSync::DeviceSync(c10::Device device, SyncMode mode, std::optional<c10::Stream> stream,
                       bool fallback_to_device)
    : device_(normalized(device)),
      mode_(mode),
      stream_(stream),
      fallback_to_device_(fallback_to_device) {
  if (stream_ && stream_->device_type() != device_.type())
    throw Error(ErrorCode::kInvalidArgument, "DeviceSync: expected a stream on a " +
                                                 c10::DeviceTypeName(device_.type(), true) +
                                                 " device, got one on " + stream_->device().str());
  if (mode_ == SyncMode::kEvent && !device_.is_cpu())
    event_ = std::make_unique<EventHolder>(device_.type());
}

DeviceSync::DeviceSync(DeviceSync&&) noexcept = default;
DeviceSync& DeviceSync::operator=(DeviceSync&&) noexcept = default;
DeviceSync::~DeviceSync() = default;

void DeviceSync::operator()() {
  if (device_.is_cpu()) return;  // CPU ops have completed when they return
  const auto* impl = c10::impl::getDeviceGuardImpl(device_.type());
  if (mode_ == SyncMode::kDevice || fell_back_) {
    synchronize_device_with(impl, device_);
    return;
  }
  const c10::Stream stream = stream_ ? *stream_ : impl->getStream(device_);
  try {
    synchronize_event(event_->event, stream);
  } catch (const c10::Error&) {
    if (!fallback_to_device_) throw;
    fell_back_ = true;
    synchronize_device_with(impl, device_);
  }
}

TorchBackend::TorchBackend(c10::Device device, TorchBackendOptions options)
    : device_(normalized(device)), options_(options) {}

TorchBackend::Worker::Worker(c10::Device device, c10::Stream stream,
                             const TorchBackendOptions& options)
    : stream_(stream),
      stream_guard_(stream),
      sync_(device, options.mode, stream, options.fallback_to_device) {
  if (options.inference_mode) inference_mode_.emplace();
  if (options.wait_for_default_stream && !device.is_cpu() &&
      stream != guard_impl(device.type())->getDefaultStream(device))
    inputs_ready_.emplace(device.type());
  if (options.on_worker_start) options.on_worker_start();
}

void TorchBackend::Worker::before_run(std::chrono::steady_clock::time_point arrived) {
  if (!inputs_ready_ || arrived < covered_until_) return;
  // Everything submitted before now had its inputs enqueued before now.
  covered_until_ = std::chrono::steady_clock::now();
  inputs_ready_->record(guard_impl(stream_.device_type())->getDefaultStream(stream_.device()));
  inputs_ready_->block(stream_);
}

TorchBackend::Worker TorchBackend::make_worker(std::size_t) const {
  const auto* impl = guard_impl(device_.type());
  c10::Stream stream = impl->getStream(device_);
  if (options_.stream_per_worker && device_.is_cuda())
    stream = impl->getStreamFromGlobalPool(device_, /*isHighPriority=*/false);
  return Worker(device_, stream, options_);
}

c10::Device default_device() {
  if (torch::cuda::is_available()) return c10::Device(c10::kCUDA, 0);
#if SYNCBATCH_HAS_TORCH_MPS_H
  if (torch::mps::is_available()) return c10::Device(c10::kMPS, 0);
#else
  if (at::hasMPS()) return c10::Device(c10::kMPS, 0);
#endif
  return c10::Device(c10::kCPU);
}

c10::Device parse_device(const std::string& spec) {
  if (spec == "auto") return default_device();
  try {
    return c10::Device(spec);
  } catch (const c10::Error&) {
    throw Error(ErrorCode::kInvalidArgument,
                "device: expected auto, cpu, cuda, cuda:N or mps, got '" + spec + "'");
  }
}

}  // namespace syncbatch
