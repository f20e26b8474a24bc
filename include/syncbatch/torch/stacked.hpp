// Batch models for tensors: stacked mode (concatenate compatible requests into one forward,
// split the output back, isolate the requests a batch fails on) and fused per-call mode (each
// request its own call, a batch's calls replayed together by a model that can, such as
// GraphedModel). Models are recognized by what they can do (RowGatheringModel,
// FusedCallsModel), so this room needs nothing of the models' own headers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "syncbatch/batched_submitter.hpp"
#include "syncbatch/row_buckets.hpp"
#include "syncbatch/torch/describe.hpp"

namespace syncbatch {

using Tensors = std::vector<at::Tensor>;

/// In InputSpec::trailing_shape: a dim whose size may differ between requests (a sequence
/// length, say). Requests are padded to a common size within a batch (see StackingOptions).
inline constexpr int64_t kVaries = -1;

/// What one input tensor of a request must look like: its dtype and its shape after the batch
/// dimension (dim 0, the rows, which may be any number >= 1).
struct InputSpec {
  at::ScalarType dtype = at::kFloat;
  /// Sizes of dims 1, 2, ...; kVaries for a dim that may vary (any size >= 1).
  std::vector<int64_t> trailing_shape{};
  /// What padding fills this input's varying dims with (e.g. the pad token's id).
  double pad_value = 0;
};

/// What the model receives after its inputs about each row's length: the size of the first
/// varying dim of the first input that has one (make_stacked_model_multi only).
enum class LengthInput {
  kNone,     ///< Nothing.
  kLengths,  ///< One more input: int64 [rows], each row's length.
  kMask,     ///< One more input: [rows, padded length] of mask_dtype, 1 before the length, else 0.
};

/// An output dim that follows an input's varying dim (a per-token output follows the tokens):
/// each caller gets it cut back to its own request's size of that input dim.
struct OutputCut {
  std::size_t output = 0;  ///< Which output (0 for a single-tensor model).
  int64_t dim = 1;         ///< Its dim, >= 1.
  std::size_t input = 0;   ///< The input whose varying dim it follows.
  int64_t input_dim = 1;   ///< That input's dim, >= 1, declared kVaries in `expect`.
};

/// What one request counts toward the policy's batch limit in stacked mode.
enum class BatchCost {
  kRequests,         ///< 1 per request.
  kRows,             ///< Its rows (dim 0).
  kRowsTimesLength,  ///< Its rows times its length (the first varying dim; rows without one).
};

/// What stacked mode does with a request of more rows than a forward may take
/// (StackingOptions::max_batch_rows, or the largest of batch_buckets).
enum class Oversize {
  kSplit,   ///< Run it as several forwards and join its output rows back in order.
  kRefuse,  ///< Fail it alone with Error(kBadRequest).
};

/// Stacked mode copies host inputs of at least this many bytes that are already pinned to a
/// CUDA device one copy each (see StackingOptions::device): a server that parses large inputs
/// (images) into pinned memory saves its worker the gathering copy.
inline constexpr std::size_t kDirectStagingBytes = 64 * 1024;

/// Options of make_stacked_model.
struct StackingOptions {
  /// Where the model runs. Inputs elsewhere (typically on the CPU) are concatenated there and
  /// staged with one copy per batch, through pinned memory when this is a CUDA device; inputs of
  /// kDirectStagingBytes or more that are already pinned (an image a server parsed into pinned
  /// memory) are copied to a CUDA device one copy each, with no gathering on the host. Unset:
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
  /// The batch sizes (rows) the model may see. Empty (the default): each group runs as it
  /// comes, whatever its rows. Otherwise a group of r rows runs as the runs of
  /// batch_buckets.plan(r, bucket_policy): each padded up to its bucket with copies of its last
  /// real row, the padding's outputs dropped, and every request's rows joined back in order
  /// (a request may span two runs). Outputs are those of the model on the padded rows, so use
  /// buckets with models whose output rows follow their own input rows only.
  RowBuckets batch_buckets{};
  /// How a group whose rows are not an allowed size is cut (see BucketPolicy).
  BucketPolicy bucket_policy = BucketPolicy::kPadUp;
  /// What a request counts toward the policy's batch limit (EveryN{64} then means 64 rows).
  BatchCost batch_cost = BatchCost::kRows;
  /// The most rows one forward takes (0: no bound; with batch_buckets, the largest bucket is
  /// the bound and this stays 0). A group with more runs as several forwards.
  int64_t max_batch_rows = 0;
  /// A single request over that bound: split across forwards, or refused.
  Oversize oversize = Oversize::kSplit;

  /// Variable-length inputs (dims declared kVaries in `expect`): requests that differ only in
  /// those dims share a forward, each varying dim padded (with its input's pad_value) to the
  /// longest of the group, or, if length_buckets is not empty, to the smallest bucket that
  /// holds it; a request longer than the largest bucket fails alone with Error(kBadRequest).
  ///
  /// cut_outputs: the output dims cut back to each request's own length (see OutputCut); each
  /// must come back with the padded size of the input dim it follows.
  std::vector<OutputCut> cut_outputs{};
  /// Length buckets: RowBuckets({...}), RowBuckets::powers_of_two(max) or
  /// RowBuckets::multiples_of(n, max). Empty: pad to the group's longest.
  RowBuckets length_buckets{};
  /// What the model gets about each row's length (see LengthInput).
  LengthInput length_input = LengthInput::kNone;
  /// The dtype of LengthInput::kMask.
  at::ScalarType mask_dtype = at::kLong;
  /// The largest share of padding in a forward's inputs, from 0 to 1: requests are grouped by
  /// length (longest first) so that the padded elements of every varying dim of every input
  /// stay at or under it, at the price of more forwards. The default, 0.75, lets no batch
  /// compute or hold more than 4x what its requests brought (one request of [1, 65536] among
  /// [255, 1]: two forwards, not one of [256, 65536]); typical spreads of lengths (16 to 128
  /// with length buckets) stay one forward. 1: one group, padded to its longest, whatever that
  /// costs.
  double max_padding = 0.75;
};

/// A single-tensor model for stacked mode, as the two ways it can run one group of requests:
/// `forward(x)` on their rows concatenated along dim 0 (required), and, if set,
/// `forward_rows(parts)` on the rows as parts that it stacks itself (GraphedModel gathers them
/// straight into a CUDA graph's static input), used for groups of more than one request whose
/// rows need no staging on another device.
struct RowsModel {
  std::function<at::Tensor(const at::Tensor&)> forward;
  std::function<at::Tensor(c10::ArrayRef<at::Tensor>)> forward_rows{};
};

/// A stacked-mode model from a batched tensor model `model(x) -> y`, where x stacks the
/// requests' rows along dim 0 and y has as many rows as x. Each caller gets exactly the rows of
/// y that came from its rows of x (a view into the batch output).
///
/// Errors (per request, through its Future): Error(kBadRequest) for an undefined tensor, a
/// tensor without a batch dimension, or one that does not match `options.expect`; the model's
/// own exception when it throws on that request; Error(kBadRequest) when the model returns a
/// different number of rows than it was given.
/// Errors here: Error(kInvalidArgument) for an empty model or a bad option.
BatchModel<at::Tensor, at::Tensor> make_stacked_model(RowsModel model,
                                                      StackingOptions options = {});

/// As above, for a model with only a forward.
BatchModel<at::Tensor, at::Tensor> make_stacked_model(
    std::function<at::Tensor(const at::Tensor&)> model, StackingOptions options = {});

/// A model that can also take a group's rows as parts and stack them itself (`call_rows`), as
/// GraphedModel does.
template <class M>
concept RowGatheringModel = requires(const M& m, const at::Tensor& x,
                                     c10::ArrayRef<at::Tensor> parts) {
  { m(x) } -> std::convertible_to<at::Tensor>;
  { m.call_rows(parts) } -> std::convertible_to<at::Tensor>;
};

/// Stacked mode over a RowGatheringModel: each group's rows, when they are already on the
/// model's device, go to `model.call_rows` (no concatenation first); otherwise as above.
/// Chosen over the std::function overload whenever such a model (a GraphedModel) is passed.
template <RowGatheringModel M>
BatchModel<at::Tensor, at::Tensor> make_stacked_model(M model, StackingOptions options = {}) {
  auto rows = [model](c10::ArrayRef<at::Tensor> parts) { return model.call_rows(parts); };
  return make_stacked_model(RowsModel{std::move(model), std::move(rows)}, std::move(options));
}

/// As above for models with several inputs and outputs: each request is a list of tensors
/// (stacked position by position), the model returns a list of tensors, each split by rows.
/// Every input of a request must have the same number of rows (row i of the request is row i of
/// each input); a request whose inputs differ fails alone with Error(kBadRequest) naming each
/// input's rows. Every output must have one row per input row of the batch. With
/// StackingOptions::length_input the model gets one more input after the request's.
BatchModel<Tensors, Tensors> make_stacked_model_multi(std::function<Tensors(const Tensors&)> model,
                                                      StackingOptions options = {});

/// A model that can run several separate calls together (`call_each(xs)` returns what each
/// `m(xs[i])` would), as GraphedModel does by replaying them as one CUDA graph.
template <class M>
concept FusedCallsModel = requires(const M& m, const at::Tensor& x, c10::ArrayRef<at::Tensor> xs) {
  { m(x) } -> std::convertible_to<at::Tensor>;
  { m.call_each(xs) } -> std::same_as<std::vector<at::Tensor>>;
};

/// Per-call results with fused runs, for BatchedSubmitter: each request still runs the model
/// alone on its own input, with the result per-call mode would give it; the worker hands a
/// batch's requests over together so that call_each() runs them as a few fused replays instead
/// of one each. A request the model fails on gets that error alone (the batch is rerun call by
/// call to find it).
///
///   GraphedModel graphed(forward, device, {.max_fused_calls = 64});
///   BatchedSubmitter<at::Tensor, at::Tensor, TorchBackend> submitter(
///       make_fused_calls_model(graphed), {.policy = EveryN{64}},
///       TorchBackend(device, {.on_worker_start = [&] { graphed.warm_up_each(example); }}));
template <FusedCallsModel M>
BatchModel<at::Tensor, at::Tensor> make_fused_calls_model(M model) {
  return {[model = std::move(model)](Batch<at::Tensor, at::Tensor>& batch) {
    std::vector<at::Tensor> inputs;
    inputs.reserve(batch.size());
    for (std::size_t i = 0; i < batch.size(); ++i) inputs.push_back(batch.input(i));
    std::vector<at::Tensor> outputs;
    try {
      outputs = model.call_each(inputs);
    } catch (...) {  // NOLINT(bugprone-empty-catch): rerun below, call by call
    }
    if (outputs.size() == inputs.size()) {
      for (std::size_t i = 0; i < inputs.size(); ++i) batch.set_value(i, std::move(outputs[i]));
      return;
    }
    // Some call failed: rerun each alone, so that only the requests it fails on get its error.
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      try {
        batch.set_value(i, model(inputs[i]));
      } catch (...) {
        batch.set_error(i, std::current_exception());
      }
    }
  }};
}

}  // namespace syncbatch
