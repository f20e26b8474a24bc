// Stacked mode for tensor models: concatenate compatible requests into one forward, split the
// output back, and isolate the requests a batch fails on.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "syncbatch/batched_submitter.hpp"

namespace syncbatch {

using Tensors = std::vector<at::Tensor>;

/// What one input tensor of a request must look like: its dtype and its shape after the batch
/// dimension (dim 0, the rows, which may be any number >= 1).
struct InputSpec {
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> trailing_shape{};
};

/// Options of make_stacked_model.
struct StackingOptions {
  /// Where the model runs. Inputs elsewhere (typically on the CPU) are concatenated there and
  /// staged with one copy per batch, through pinned memory when this is a CUDA device. Unset:
  /// the model runs wherever the inputs are.
  std::optional<c10::Device> device{};
  /// Where callers receive their outputs (e.g. kCPU), with one copy per batch that the batch's
  /// sync covers. Unset: where the model put them.
  std::optional<c10::Device> output_device{};
  /// If not empty: the inputs every request must have, checked before batching; a request that
  /// differs fails alone with Error(kBadRequest) naming what was expected and what came. Empty:
  /// any request with a batch dimension is accepted, and requests of different shapes, dtypes or
  /// devices are run as separate groups of the same batch.
  std::vector<InputSpec> expect{};
  /// When the model throws on a group, run each half again (recursively) so that only the
  /// requests it really fails on get the error. Off: the whole group gets it.
  bool isolate_failures = true;
};

/// A stacked-mode model from a batched tensor model `model(x) -> y`, where x stacks the
/// requests' rows along dim 0 and y has as many rows as x. Each caller gets exactly the rows of
/// y that came from its rows of x (a view into the batch output).
///
/// Errors (per request, through its Future): Error(kBadRequest) for an undefined tensor, a
/// tensor without a batch dimension, or one that does not match `options.expect`; the model's
/// own exception when it throws on that request; Error(kBadRequest) when the model returns a
/// different number of rows than it was given.
StackedModel<at::Tensor, at::Tensor> make_stacked_model(
    std::function<at::Tensor(const at::Tensor&)> model, StackingOptions options = {});

/// As above for models with several inputs and outputs: each request is a list of tensors
/// (stacked position by position), the model returns a list of tensors, each split by rows.
/// Every input of a request must have the same number of rows (row i of the request is row i of
/// each input); a request whose inputs differ fails alone with Error(kBadRequest) naming each
/// input's rows. Every output must have one row per input row of the batch.
StackedModel<Tensors, Tensors> make_stacked_model_multi(
    std::function<Tensors(const Tensors&)> model, StackingOptions options = {});

namespace detail {
/// make_stacked_model for a model that can also take a group's rows as parts and stack them
/// itself (GraphedModel::call_rows): used for groups of one input whose rows need no staging.
StackedModel<at::Tensor, at::Tensor> make_stacked_model_gathering(
    std::function<at::Tensor(const at::Tensor&)> model,
    std::function<at::Tensor(c10::ArrayRef<at::Tensor>)> gather, StackingOptions options);
}  // namespace detail

/// "float32 [2, 32]" (and " on cuda:0" off the CPU): how error messages name a tensor.
std::string describe_tensor(const at::Tensor& t);

}  // namespace syncbatch
