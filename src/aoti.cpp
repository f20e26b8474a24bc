// AotiModel. See syncbatch/torch/aoti.hpp.
#include "syncbatch/torch/aoti.hpp"

#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <utility>

#include "syncbatch/error.hpp"

namespace syncbatch {

struct AotiModel::Impl {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  AotiOptions options;
};

AotiModel::AotiModel(const std::string& package_path, AotiOptions options) {
  if (options.num_runners == 0)
    throw Error(ErrorCode::kInvalidArgument, "AotiOptions.num_runners: expected >= 1, got 0");
  auto impl = std::make_shared<Impl>();
  const c10::DeviceIndex index =
      options.device && options.device->has_index() ? options.device->index() : -1;
  try {
    impl->loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
        package_path, options.model_name, /*run_single_threaded=*/false, options.num_runners,
        index);
  } catch (const std::exception& e) {
    throw Error(ErrorCode::kInvalidArgument,
                "AotiModel: cannot load '" + package_path + "': " + e.what());
  }
  impl->options = std::move(options);
  impl_ = std::move(impl);
}

std::vector<at::Tensor> AotiModel::call(const std::vector<at::Tensor>& inputs) const {
  // The calling thread's current stream on the inputs' device: a worker's own stream.
  void* stream = nullptr;
  if (!inputs.empty() && inputs.front().defined() && !inputs.front().device().is_cpu()) {
    const c10::Device device = inputs.front().device();
    stream = c10::impl::getDeviceGuardImpl(device.type())->getStream(device).native_handle();
  }
  return impl_->loader->run(inputs, stream);
}

at::Tensor AotiModel::operator()(const at::Tensor& x) const {
  std::vector<at::Tensor> out = call({x});
  if (out.size() != 1)
    throw Error(
        ErrorCode::kBadRequest,
        "AotiModel: expected the package to return one tensor, got " + std::to_string(out.size()));
  return std::move(out.front());
}

const AotiOptions& AotiModel::options() const noexcept {
  return impl_->options;
}

}  // namespace syncbatch
