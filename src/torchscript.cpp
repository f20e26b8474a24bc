// TorchScriptModel. See syncbatch/torch/torchscript.hpp.
#include "syncbatch/torch/torchscript.hpp"

#include <c10/core/InferenceMode.h>
#include <torch/csrc/jit/python/update_graph_executor_opt.h>
#include <torch/csrc/jit/serialization/import.h>

#include <utility>

#include "syncbatch/error.hpp"

namespace syncbatch {

struct TorchScriptModel::Impl {
  mutable torch::jit::Module module;  // forward() is not const in LibTorch; it changes nothing
  TorchScriptOptions options;
};

namespace {

// Sets the calling thread's graph-optimizer flag for one call, and restores it.
class OptimizerSetting {
 public:
  explicit OptimizerSetting(bool on) : before_(torch::jit::getGraphExecutorOptimize()) {
    if (on != before_) torch::jit::setGraphExecutorOptimize(on);
  }
  ~OptimizerSetting() {
    if (torch::jit::getGraphExecutorOptimize() != before_)
      torch::jit::setGraphExecutorOptimize(before_);
  }
  OptimizerSetting(const OptimizerSetting&) = delete;
  OptimizerSetting& operator=(const OptimizerSetting&) = delete;

 private:
  bool before_;
};

Error not_tensors(const c10::IValue& v) {
  return Error(ErrorCode::kBadRequest,
               "TorchScriptModel: expected the module to return a tensor or a tuple or list of "
               "tensors, got " +
                   v.tagKind());
}

}  // namespace

TorchScriptModel::TorchScriptModel(const std::string& path, TorchScriptOptions options) {
  auto impl = std::make_shared<Impl>();
  try {
    // c10::optional is its own type before LibTorch 2.4 and std::optional after.
    c10::optional<c10::Device> where;
    if (options.device) where = *options.device;
    impl->module = torch::jit::load(path, where);
  } catch (const std::exception& e) {
    throw Error(ErrorCode::kInvalidArgument,
                "TorchScriptModel: cannot load '" + path + "': " + e.what());
  }
  impl->module.eval();
  impl->options = std::move(options);
  impl_ = std::move(impl);
}

at::Tensor TorchScriptModel::operator()(const at::Tensor& x) const {
  c10::InferenceMode inference;
  OptimizerSetting optimizer(impl_->options.graph_optimizer);
  c10::IValue out = impl_->module.forward({x});
  if (!out.isTensor()) throw not_tensors(out);
  return std::move(out).toTensor();
}

std::vector<at::Tensor> TorchScriptModel::call(const std::vector<at::Tensor>& inputs) const {
  c10::InferenceMode inference;
  OptimizerSetting optimizer(impl_->options.graph_optimizer);
  std::vector<c10::IValue> args(inputs.begin(), inputs.end());
  c10::IValue out = impl_->module.forward(std::move(args));
  std::vector<at::Tensor> tensors;
  if (out.isTensor()) {
    tensors.push_back(std::move(out).toTensor());
  } else if (out.isTuple()) {
    for (const c10::IValue& e : out.toTupleRef().elements()) {
      if (!e.isTensor()) throw not_tensors(out);
      tensors.push_back(e.toTensor());
    }
  } else if (out.isTensorList()) {
    for (const at::Tensor& t : out.toTensorVector()) tensors.push_back(t);
  } else {
    throw not_tensors(out);
  }
  return tensors;
}

const TorchScriptOptions& TorchScriptModel::options() const noexcept {
  return impl_->options;
}

}  // namespace syncbatch
