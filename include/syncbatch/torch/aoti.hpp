// AotiModel: an AOTInductor package (a .pt2 file from torch._inductor.aoti_compile_and_package
// on a torch.export program) run from C++ by LibTorch's AOTIModelPackageLoader, as a model for
// every mode: per-call, stacked and graphed. Built where the LibTorch has the loader with
// concurrent runners (found at configure time: SYNCBATCH_WITH_AOTI); LibTorch 1.13 has none.
#pragma once

#if !defined(SYNCBATCH_WITH_AOTI)
#error \
    "syncbatch was built without AOTInductor: its LibTorch has no AOTIModelPackageLoader \
with num_runners (torch/csrc/inductor/aoti_package/model_package_loader.h)"
#endif

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace syncbatch {

/// Options of AotiModel.
struct AotiOptions {
  /// The model's name inside the package.
  std::string model_name = "model";
  /// Runs the package can make at once: set it to SubmitterOptions::workers (each worker runs
  /// on a runner of its own). At least 1.
  std::size_t num_runners = 1;
  /// The device whose index the package loads on (its device type is fixed at export). Unset:
  /// the current one.
  std::optional<c10::Device> device{};
};

/// An AOTInductor package. Each call runs on the calling thread's current stream of the
/// package's device (a TorchBackend worker's own stream), so its work is ordered and synced
/// like any other model's. Copies share the loaded package; calls from up to num_runners
/// threads run at once.
///
///   AotiModel mlp("mlp.pt2", {.num_runners = 2, .device = c10::Device("cuda")});
///   BatchedSubmitter<at::Tensor, at::Tensor, TorchBackend> s(
///       make_stacked_model(mlp), {.workers = 2}, TorchBackend(c10::Device("cuda")));
class AotiModel {
 public:
  /// Loads the package.
  /// Errors: Error(kInvalidArgument) for num_runners 0, or naming the path and LibTorch's
  /// reason when the package cannot load.
  explicit AotiModel(const std::string& package_path, AotiOptions options = {});

  /// run({x}) for a package with one input and one output.
  /// Errors: what the package throws; Error(kBadRequest) when it returns other than one tensor.
  at::Tensor operator()(const at::Tensor& x) const;

  /// run(inputs): every output, in order.
  std::vector<at::Tensor> call(const std::vector<at::Tensor>& inputs) const;

  const AotiOptions& options() const noexcept;

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace syncbatch
