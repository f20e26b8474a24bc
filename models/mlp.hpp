// The benchmark MLP, shared by the benchmarks, the examples (the demo, the HTTP server's
// mlp:LxW model) and the tests: `layers` Linear(width, width) with ReLU between, weights drawn
// from seed 0 and scaled so activations stay near 1.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace syncbatch::bench {

/// y = linear(relu(... linear(x))), `layers` Linear(width, width), on `device`.
class Mlp {
 public:
  Mlp(int layers, int64_t width, c10::Device device) {
    at::manual_seed(0);
    const auto opts = at::TensorOptions().device(device);
    for (int i = 0; i < layers; ++i) {
      weights_.push_back(at::randn({width, width}, opts) / std::sqrt(static_cast<double>(width)));
      biases_.push_back(at::randn({width}, opts) * 0.01);
    }
  }
  at::Tensor operator()(const at::Tensor& x) const {
    at::Tensor y = x;
    for (std::size_t i = 0; i < weights_.size(); ++i) {
      y = at::linear(y, weights_[i], biases_[i]);
      if (i + 1 < weights_.size()) y = at::relu(y);
    }
    return y;
  }

 private:
  std::vector<at::Tensor> weights_, biases_;
};

}  // namespace syncbatch::bench
