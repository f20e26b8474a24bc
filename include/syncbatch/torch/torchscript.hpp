// TorchScriptModel: a module saved with torch.jit.save (or torch::jit::Module::save), loaded for
// inference, as a model for every mode: per-call, stacked (single or several tensors) and
// graphed. This header needs only ATen's Tensor: the JIT stays inside the library.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace syncbatch {

/// Options of TorchScriptModel.
struct TorchScriptOptions {
  /// Where the module's parameters are loaded (map_location). Unset: where they were saved.
  std::optional<c10::Device> device{};
  /// TorchScript's graph optimizer (the profiling executor), set on the calling thread for each
  /// call. On (TorchScript's default): the first calls with each new input shape profile and
  /// re-specialize the graph, which costs time again for every batch size a model has not seen
  /// (stacked mode without batch_buckets sees many). Off: the graph runs as scripted, with no
  /// per-shape warm-up and no fusion, and a value the trace computes on the device and reads
  /// back (e.g. a length as int()) is read back in every call: a sync per forward, and a
  /// forward no CUDA graph can capture (the optimizer folds some of those per shape).
  /// docs/BENCHMARKS.md has what each costs where measured.
  bool graph_optimizer = true;
};

/// A TorchScript module in eval mode, run under c10::InferenceMode. Copies share the module;
/// calls from several threads at once are safe (the module is not changed after loading).
///
///   TorchScriptModel model("resnet50.pt", {.device = c10::Device("cuda")});
///   BatchedSubmitter<at::Tensor, at::Tensor, TorchBackend> s(
///       make_stacked_model(model, {.device = c10::Device("cuda")}), {}, TorchBackend(cuda));
class TorchScriptModel {
 public:
  /// Loads the module at `path` and puts it in eval mode.
  /// Errors: Error(kInvalidArgument) naming the path and LibTorch's reason when it cannot load.
  explicit TorchScriptModel(const std::string& path, TorchScriptOptions options = {});

  /// forward(x) for a module that returns one tensor.
  /// Errors: what the module throws; Error(kBadRequest) naming what came if it returns
  /// something else than a tensor.
  at::Tensor operator()(const at::Tensor& x) const;

  /// forward(inputs...) for a module with several inputs; its output, a tensor or a tuple or
  /// list of tensors, as a list (for make_stacked_model_multi).
  /// Errors: as above, for an output that is not a tensor or a tuple or list of tensors.
  std::vector<at::Tensor> call(const std::vector<at::Tensor>& inputs) const;

  const TorchScriptOptions& options() const noexcept;

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
};

}  // namespace syncbatch
