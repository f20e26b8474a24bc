// TorchScriptModel: a module scripted and saved here (torch::jit::Module::define and save), loaded
// by the adapter and served per call, stacked (one and several tensors) and graphed; the graph
// optimizer setting; load and output errors.
#include <gtest/gtest.h>

#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/python/update_graph_executor_opt.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "syncbatch/torch.hpp"
#include "torch_test_support.hpp"

namespace syncbatch {
namespace {

using testing::available_devices;
using testing::device_name;
using testing::TensorSubmitter;
using MultiSubmitter = BatchedSubmitter<Tensors, Tensors, TorchBackend>;

// A module file written for one test and removed after it.
class ScriptFile {
 public:
  ScriptFile(const std::string& name, const at::Tensor& w, const std::string& source)
      : path_((std::filesystem::temp_directory_path() /
               (name + "-" + std::to_string(::getpid()) + ".pt"))
                  .string()) {
    torch::jit::Module m(name);
    if (w.defined()) m.register_parameter("w", w, /*is_buffer=*/false);
    m.define(source);
    m.save(path_);
  }
  ~ScriptFile() { std::filesystem::remove(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

const char* kLinearTanh = R"(
def forward(self, x):
    return torch.tanh(torch.matmul(x, self.w))
)";

class TorchScriptOnEachDevice : public ::testing::TestWithParam<c10::Device> {};

TEST_P(TorchScriptOnEachDevice, ServesPerCallStackedAndGraphed) {
  const c10::Device device = GetParam();
  const at::Tensor w = at::randn({8, 4});
  ScriptFile file("linear_tanh", w, kLinearTanh);
  for (bool optimizer : {true, false}) {
    const TorchScriptModel model(file.path(), {.device = device, .graph_optimizer = optimizer});
    const at::Tensor wd = w.to(device);
    auto expected = [&](const at::Tensor& x) { return at::tanh(at::matmul(x, wd)); };

    TensorSubmitter per_call([model](at::Tensor& x) { return model(x); }, {.policy = EveryN{8}},
                             TorchBackend(device));
    TensorSubmitter stacked(
        make_stacked_model(model, {.batch_buckets = RowBuckets::powers_of_two(8)}),
        {.policy = EveryN{8}}, TorchBackend(device));
    GraphedModel graphed(model, device, {.max_rows = 8});
    TensorSubmitter stacked_graphed(make_stacked_model(graphed), {.policy = EveryN{8}},
                                    TorchBackend(device));
    for (TensorSubmitter* s : {&per_call, &stacked, &stacked_graphed}) {
      std::vector<at::Tensor> inputs;
      std::vector<Future<at::Tensor>> futures;
      for (int i = 0; i < 20; ++i) {
        inputs.push_back(at::randn({1 + i % 3, 8}, device));
        futures.push_back(s->submit(inputs.back()));
      }
      for (std::size_t i = 0; i < inputs.size(); ++i)
        EXPECT_TRUE(at::allclose(futures[i].get(), expected(inputs[i]), 1e-5, 1e-5))
            << "optimizer " << optimizer << ", request " << i;
      s->shutdown();
      EXPECT_EQ(s->stats().failed, 0u);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Devices, TorchScriptOnEachDevice, ::testing::ValuesIn(available_devices()),
                         device_name);

TEST(TorchScript, SeveralInputsAndOutputsInStackedMode) {
  ScriptFile file("sum_product", at::Tensor(), R"(
def forward(self, x, y):
    return x + y, x * y
)");
  const TorchScriptModel model(file.path());
  MultiSubmitter s(make_stacked_model_multi([model](const Tensors& in) { return model.call(in); }),
                   {.policy = EveryN{8}}, TorchBackend(c10::Device(c10::kCPU)));
  std::vector<Tensors> inputs;
  std::vector<Future<Tensors>> futures;
  for (int i = 0; i < 12; ++i) {
    inputs.push_back({at::randn({2, 3}), at::randn({2, 3})});
    futures.push_back(s.submit(inputs.back()));
  }
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    const Tensors got = futures[i].get();
    ASSERT_EQ(got.size(), 2u);
    EXPECT_TRUE(at::equal(got[0], inputs[i][0] + inputs[i][1]));
    EXPECT_TRUE(at::equal(got[1], inputs[i][0] * inputs[i][1]));
  }
}

// The optimizer setting applies to the call and leaves the calling thread's own setting as it
// was.
TEST(TorchScript, TheOptimizerSettingIsPerCall) {
  ScriptFile file("linear_tanh_flag", at::randn({8, 4}), kLinearTanh);
  const TorchScriptModel off(file.path(), {.graph_optimizer = false});
  ASSERT_TRUE(torch::jit::getGraphExecutorOptimize());
  off(at::randn({2, 8}));
  EXPECT_TRUE(torch::jit::getGraphExecutorOptimize());
  torch::jit::setGraphExecutorOptimize(false);
  const TorchScriptModel on(file.path());
  on(at::randn({2, 8}));
  EXPECT_FALSE(torch::jit::getGraphExecutorOptimize());
  torch::jit::setGraphExecutorOptimize(true);
}

TEST(TorchScript, LoadAndOutputErrorsAreClear) {
  try {
    TorchScriptModel("/nonexistent/model.pt");
    ADD_FAILURE() << "loaded a missing file";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("cannot load '/nonexistent/model.pt'"), std::string::npos)
        << e.what();
  }
  ScriptFile file("returns_int", at::Tensor(), R"(
def forward(self, x):
    return 3
)");
  const TorchScriptModel model(file.path());
  // Through a submitter: the request fails alone with the adapter's error.
  TensorSubmitter s([model](at::Tensor& x) { return model(x); }, {}, TorchBackend(c10::kCPU));
  auto f = s.submit(at::ones({1, 2}));
  try {
    f.get();
    ADD_FAILURE() << "a module returning an int gave a tensor";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kBadRequest);
    EXPECT_NE(std::string(e.what()).find("expected the module to return a tensor or a tuple or "
                                         "list of tensors, got Int"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(model.call({at::ones({1, 2})}), Error);
}

}  // namespace
}  // namespace syncbatch
