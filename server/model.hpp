// The models the HTTP server serves: a model's tensors and forward function, how it is served
// (mode, policy, device, queue, buckets), the built-in loaders and the configuration file.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "spec.hpp"
#include "syncbatch/sync_policy.hpp"
#include "syncbatch/torch/stacked.hpp"

namespace syncbatch::http {

/// A model: its inputs, in the order `forward` takes them, and its outputs, in the order it
/// returns them; every tensor has the batch dim first. Runs on the device of its ModelOptions.
struct Model {
  using Forward = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;
  Model() = default;
  Model(Forward f, std::vector<TensorSpec> in, std::vector<TensorSpec> out, std::string what = "");
  /// A model of one float32 input "input" [rows, input_width] and one float32 output "output".
  Model(std::function<at::Tensor(const at::Tensor&)> f, int64_t input_width, std::string what = "");

  Forward forward;
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;
  std::string description;
};

/// "mlp:LAYERSxWIDTH" (the benchmark MLP, input width WIDTH), the path of a TorchScript file, or
/// of an AOTInductor package (".pt2"; where the LibTorch has the loader). A file's inputs and
/// outputs are `inputs` and `outputs`; with none, one float32 input "input" [rows,
/// `input_width`] and one output "output". Errors: std::invalid_argument naming the expected
/// forms and what came; syncbatch::Error for a file the adapter cannot load.
Model load_model(const std::string& spec, int64_t input_width, c10::Device device,
                 std::vector<TensorSpec> inputs = {}, std::vector<TensorSpec> outputs = {});

enum class Mode { kPerOp, kPerCall, kStacked };

/// "per-op", "per-call", "stacked". Errors: std::invalid_argument.
Mode parse_mode(const std::string& s);
std::string to_string(Mode mode);

/// How one model is served.
struct ModelOptions {
  Mode mode = Mode::kStacked;
  SyncPolicy policy = Adaptive{std::chrono::milliseconds(2)};
  c10::Device device = c10::Device(c10::kCPU);
  int64_t max_rows = 256;             ///< More rows in one request get 413.
  std::size_t queue_capacity = 4096;  ///< A full queue answers 503 with Retry-After.
  /// Submitter workers (per-call and stacked). 0: from the machine (default_layout, cpus.hpp):
  /// 2 for a model on CUDA, 1 otherwise.
  std::size_t workers = 0;
  /// Queue timeout (SubmitterOptions::default_timeout): a request not started within it is
  /// answered 504. Zero: none.
  std::chrono::milliseconds timeout{0};
  /// Refuse at once, with 503 and Retry-After, a request that by the measured batch time cannot
  /// start within `timeout` (SubmitterOptions::shed_late). Needs a timeout.
  bool shed_late = false;
  /// The model's name in the Open Inference Protocol paths (/v2/models/{name}/...).
  std::string name = "model";
  /// Priority levels of the submitter (SubmitterOptions::priority_levels); an infer request
  /// picks one with parameters.priority as Triton's schedule policy says: 1 the highest, this
  /// many the lowest, 0 (or none) the default, which is the lowest.
  std::size_t priority_levels = 2;
  /// Stacked mode: the batch sizes the model sees (StackingOptions::batch_buckets; empty: any).
  std::vector<int64_t> batch_buckets{};
  /// Stacked mode: lengths the varying dims are padded to (StackingOptions::length_buckets;
  /// empty: the longest of the batch).
  std::vector<int64_t> length_buckets{};
  /// Stacked mode, varying dims: the largest share of padding in a forward's inputs
  /// (StackingOptions::max_padding): requests of very different lengths run as separate
  /// forwards, so that no request makes a batch compute or hold more than 1 / (1 - max_padding)
  /// times what its requests brought (4x by default).
  double max_padding = StackingOptions{}.max_padding;
  /// Stacked mode: replay the model as CUDA graphs (GraphedMultiModel), one per batch bucket
  /// (`batch_buckets`, or 1, 2, 4, ... 256) and length bucket, every one captured on each
  /// worker before the server answers; a batch of more rows than the largest bucket runs
  /// eagerly. Inputs with varying dims need `length_buckets`. Where graphs cannot run (CPU,
  /// MPS) or the model cannot be captured, it runs eagerly, and the server logs why once.
  bool graphs = false;
  /// Per-call and stacked modes: serve on several devices through MultiDeviceSubmitter, one
  /// replica of the model on each (ServedModel::replicas), each request to the least-loaded.
  /// Empty: `device` alone.
  std::vector<c10::Device> devices{};
};

/// A model and how it is served.
struct ServedModel {
  Model model;
  ModelOptions options{};
  /// With options.devices: the model on each of those devices, in their order (`model` then
  /// gives the inputs and outputs; its forward is not used).
  std::vector<Model> replicas{};
  /// Loads it again from where it came (load_served sets it: a file is read anew), for the
  /// repository's load without a configuration. Unset (a model made in-process): served again
  /// as it is.
  std::function<ServedModel()> reload{};
};

/// The model `spec` (as load_model takes it) served with `options`: loaded on options.device,
/// or, with options.devices, once on each of them (ServedModel::replicas; options.device is
/// then the first). Errors: as load_model.
ServedModel load_served(const std::string& spec, int64_t input_width, ModelOptions options,
                        const std::vector<TensorSpec>& inputs = {},
                        const std::vector<TensorSpec>& outputs = {});

/// The models of a JSON configuration file's text (the README has an example):
/// {"models": [{"name", "model", "mode", "policy", "device" (or "devices": a list, one replica
/// each), "workers" (0 or none: from the machine), "queue", "timeout_ms",
/// "shed", "priority_levels", "max_rows", "batch_buckets", "length_buckets", "max_padding",
/// "graphs",
/// "inputs": [{"name", "datatype", "shape", "pad"}], "outputs": [{"name", "datatype"}]}]};
/// only "name" and "model" (as load_model takes it) are required, the rest default as
/// ModelOptions does ("device": "auto"). Shapes are written as the protocol does, -1 first for
/// the rows. The MLP's inputs and outputs are its own: "inputs" and "outputs" are for files.
/// Errors: std::invalid_argument naming the model, the key, what was expected and what came.
std::vector<ServedModel> load_config(std::string_view json_text);

}  // namespace syncbatch::http
