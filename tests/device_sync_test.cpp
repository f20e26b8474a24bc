#include "syncbatch/torch/device_sync.hpp"

#include <gtest/gtest.h>

#include <string>

#include "syncbatch/sync_scope.hpp"
#include "torch_test_support.hpp"

namespace syncbatch {
namespace {

using testing::available_devices;
using testing::device_name;
using testing::Mlp;

TEST(ParseDevice, AcceptsTorchNamesAndRejectsOthersClearly) {
  EXPECT_EQ(parse_device("cpu"), c10::Device(c10::kCPU));
  EXPECT_EQ(parse_device("cuda:1"), c10::Device(c10::kCUDA, 1));
  EXPECT_EQ(parse_device("mps"), c10::Device(c10::kMPS));
  EXPECT_EQ(parse_device("auto"), default_device());
  try {
    parse_device("gpu0");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("got 'gpu0'"), std::string::npos);
  }
}

TEST(DefaultDevice, IsCudaExactlyWhenCudaIsAvailable) {
  EXPECT_EQ(default_device().is_cuda(), torch::cuda::is_available());
}

TEST(DeviceSync, StreamOnAnotherDeviceTypeIsRejected) {
  const c10::Stream cpu_stream(c10::Stream::DEFAULT, c10::Device(c10::kCPU));
  if (torch::cuda::is_available()) {
    EXPECT_THROW(DeviceSync(c10::Device(c10::kCUDA, 0), SyncMode::kEvent, cpu_stream), Error);
  }
  EXPECT_NO_THROW(DeviceSync(c10::Device(c10::kCPU), SyncMode::kEvent, cpu_stream));
}

class OnEachDevice : public ::testing::TestWithParam<c10::Device> {};

// Results computed with a sync every N ops equal those computed op by op with a sync after each,
// for both sync modes; after the final flush every op has completed on the device.
TEST_P(OnEachDevice, SyncScopeKeepsResultsAndCompletesWork) {
  const c10::Device device = GetParam();
  const Mlp mlp(64, 128, 16, device);
  const auto inputs = at::randn({40, 1, 64}).to(device);
  std::vector<at::Tensor> reference;
  for (int64_t i = 0; i < inputs.size(0); ++i) {
    reference.push_back(mlp(inputs[i]));
    synchronize_device(device);
  }
  for (SyncMode mode : {SyncMode::kDevice, SyncMode::kEvent}) {
    std::vector<at::Tensor> outputs;
    SyncScope scope(EveryN{8}, DeviceSync(device, mode));
    for (int64_t i = 0; i < inputs.size(0); ++i) {
      outputs.push_back(mlp(inputs[i]));
      scope.tick();
    }
    scope.flush();
    EXPECT_EQ(scope.syncs(), 5u);
    const auto* impl = c10::impl::getDeviceGuardImpl(device.type());
    EXPECT_TRUE(impl->queryStream(impl->getStream(device))) << "work pending after flush";
    for (size_t i = 0; i < outputs.size(); ++i)
      EXPECT_TRUE(at::equal(outputs[i], reference[i])) << to_string(mode) << " op " << i;
  }
}

// A worker context makes its stream current on its thread for its lifetime, and its sync
// waits for that stream's work.
TEST_P(OnEachDevice, TorchBackendWorkerOwnsItsStream) {
  const c10::Device device = GetParam();
  const TorchBackend backend(device);
  const auto* impl = c10::impl::getDeviceGuardImpl(device.type());
  const c10::Stream before = impl->getStream(device);
  {
    auto worker = backend.make_worker(0);
    EXPECT_EQ(impl->getStream(device), worker.stream());
    if (device.is_cuda()) {
      EXPECT_NE(worker.stream(), before) << "CUDA workers get a pool stream";
    }
    EXPECT_TRUE(c10::InferenceMode::is_enabled());
    const auto big = at::randn({2048, 2048}, at::TensorOptions().device(device));
    at::Tensor y = big;
    for (int i = 0; i < 8; ++i) y = at::matmul(y, big).tanh_();
    worker.sync();
    EXPECT_TRUE(impl->queryStream(worker.stream()));
  }
  EXPECT_EQ(impl->getStream(device), before) << "the stream is restored when the worker ends";
  EXPECT_FALSE(c10::InferenceMode::is_enabled());
}

INSTANTIATE_TEST_SUITE_P(Devices, OnEachDevice, ::testing::ValuesIn(available_devices()),
                         device_name);

}  // namespace
}  // namespace syncbatch
