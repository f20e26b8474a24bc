// Shared by the LibTorch tests: a small deterministic MLP and the devices to test on.
#pragma once

#include <ATen/ATen.h>
#include <torch/cuda.h>

#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "syncbatch/batched_submitter.hpp"
#include "syncbatch/torch/device_sync.hpp"

namespace syncbatch::testing {

/// y = W2 relu(W1 x + b1) + b2, weights drawn from a fixed seed.
class Mlp {
 public:
  Mlp(int64_t in, int64_t hidden, int64_t out, c10::Device device = c10::kCPU) {
    at::manual_seed(1234);
    const auto opts = at::TensorOptions().dtype(at::kFloat).device(device);
    w1_ = at::randn({hidden, in}, opts);
    b1_ = at::randn({hidden}, opts);
    w2_ = at::randn({out, hidden}, opts);
    b2_ = at::randn({out}, opts);
  }
  at::Tensor operator()(const at::Tensor& x) const {
    return at::linear(at::relu(at::linear(x, w1_, b1_)), w2_, b2_);
  }

 private:
  at::Tensor w1_, b1_, w2_, b2_;
};

/// A token model computed row by row: ids int64 [rows, L] and a mask [rows, L] in; per-token
/// states float [rows, L, 4], their masked mean float [rows, 4] and its argmax int64 [rows] out.
class TokenModel {
 public:
  explicit TokenModel(c10::Device device = c10::kCPU) {
    at::manual_seed(4321);
    const auto opts = at::TensorOptions().dtype(at::kFloat).device(device);
    emb_ = at::randn({32, 4}, opts);
    w_ = at::randn({4, 4}, opts);
  }
  std::vector<at::Tensor> operator()(const std::vector<at::Tensor>& in) const {
    const at::Tensor h = at::tanh(at::matmul(at::embedding(emb_, in.at(0)), w_));
    const at::Tensor m = in.at(1).unsqueeze(-1).to(at::kFloat);
    const at::Tensor pooled = (h * m).sum(1) / m.sum(1);
    return {h, pooled, pooled.argmax(1)};
  }

 private:
  at::Tensor emb_, w_;
};

/// The submitter the LibTorch tests drive: tensors in and out on a TorchBackend.
using TensorSubmitter = BatchedSubmitter<at::Tensor, at::Tensor, TorchBackend>;

/// The devices this machine can run: the CPU always, each CUDA device when present.
inline std::vector<c10::Device> available_devices() {
  std::vector<c10::Device> devices{c10::Device(c10::kCPU)};
  for (int i = 0; i < static_cast<int>(torch::cuda::device_count()); ++i)
    devices.emplace_back(c10::kCUDA, static_cast<c10::DeviceIndex>(i));
  return devices;
}

/// Test-name suffix for a device parameter: "cpu", "cuda_0".
inline std::string device_name(const ::testing::TestParamInfo<c10::Device>& info) {
  std::string s = info.param.str();
  for (char& c : s)
    if (c == ':') c = '_';
  return s;
}

}  // namespace syncbatch::testing
