// AotiModel on an AOTInductor package exported by scripts/export_models (an MLP, tanh(x @ W)
// with W = linspace(-1, 1, 32 * 16) as [32, 16], dynamic batch dim): per call, stacked at batch
// sizes 1 to 64 including odd ones, graphed, and with two workers on two runners. Registered
// where the build has AotiModel and SYNCBATCH_AOTI_PACKAGE names the package (scripts/gpu_check
// exports one on the GPU machine).
#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <vector>

#include "syncbatch/torch.hpp"
#include "syncbatch/torch/aoti.hpp"
#include "torch_test_support.hpp"

namespace syncbatch {
namespace {

using testing::TensorSubmitter;

const std::string kPackage = SYNCBATCH_AOTI_PACKAGE;

c10::Device package_device() {
  return kPackage.find("_cuda") != std::string::npos ? c10::Device("cuda:0")
                                                     : c10::Device(c10::kCPU);
}

at::Tensor expected(const at::Tensor& x) {
  const at::Tensor w = at::linspace(-1, 1, 32 * 16, x.options()).reshape({32, 16});
  return at::tanh(at::matmul(x, w));
}

TEST(Aoti, EveryModeAndBatchSizeMatchesTheFunction) {
  const c10::Device device = package_device();
  const AotiModel model(kPackage, {.num_runners = 2, .device = device});
  GraphedModel graphed(model, device, {.max_rows = 64});
  TensorSubmitter per_call([model](at::Tensor& x) { return model(x); }, {.policy = EveryN{16}},
                           TorchBackend(device));
  TensorSubmitter stacked(make_stacked_model(model), {.policy = EveryN{64}}, TorchBackend(device));
  TensorSubmitter two_workers(make_stacked_model(model), {.workers = 2, .policy = EveryN{64}},
                              TorchBackend(device));
  TensorSubmitter with_graphs(make_stacked_model(graphed), {.policy = EveryN{64}},
                              TorchBackend(device));
  for (TensorSubmitter* s : {&per_call, &stacked, &two_workers, &with_graphs}) {
    for (int64_t rows : {1, 7, 64}) {
      std::vector<at::Tensor> inputs;
      std::vector<Future<at::Tensor>> futures;
      for (int i = 0; i < 3; ++i) {
        inputs.push_back(at::randn({rows, 32}, at::TensorOptions().device(device)));
        futures.push_back(s->submit(inputs.back()));
      }
      for (std::size_t i = 0; i < inputs.size(); ++i)
        EXPECT_TRUE(at::allclose(futures[i].get(), expected(inputs[i]), 1e-4, 1e-4))
            << "rows " << rows;
    }
  }
  // Many threads at once on the two-worker submitter.
  std::vector<std::thread> threads;
  std::atomic<int> wrong{0};
  for (int t = 0; t < 8; ++t)
    threads.emplace_back([&] {
      c10::InferenceMode inference;
      for (int i = 0; i < 50; ++i) {
        const at::Tensor x = at::randn({1 + i % 5, 32}, at::TensorOptions().device(device));
        if (!at::allclose(two_workers.submit(x).get(), expected(x), 1e-4, 1e-4)) ++wrong;
      }
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(wrong.load(), 0);
  const auto g = graphed.stats();
  std::printf("graphs captured %llu, replays %llu, eager runs %llu\n",
              static_cast<unsigned long long>(g.captured),
              static_cast<unsigned long long>(g.replays),
              static_cast<unsigned long long>(g.eager_runs));
}

TEST(Aoti, LoadErrorsAreClear) {
  try {
    AotiModel("/nonexistent/model.pt2");
    ADD_FAILURE() << "loaded a missing package";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("cannot load '/nonexistent/model.pt2'"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(AotiModel(kPackage, {.num_runners = 0}), Error);
}

}  // namespace
}  // namespace syncbatch
