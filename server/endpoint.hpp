// One model as the server serves it: its submitter (per-call or stacked mode, one device or a
// replica on each of several, CUDA graphs), or, per-op, the model run on the caller's thread;
// its metrics and what GET /stats says of it. The protocol (protocol.cpp) routes requests here.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <memory>
#include <optional>
#include <vector>

#include <boost/json/object.hpp>

#include "codecs/oip.hpp"
#include "metrics.hpp"
#include "model.hpp"
#include "syncbatch/multi_device.hpp"
#include "syncbatch/torch.hpp"

namespace syncbatch::http {

using Tensors = std::vector<at::Tensor>;

/// Thread safety: after construction, submit through `submitter` and call the const members
/// from any thread; `metrics` is thread-safe.
struct Endpoint {
  using Submitter = MultiDeviceSubmitter<Tensors, Tensors, TorchBackend>;

  /// Builds the model's submitter (none per-op); with graphs, each worker captures every bucket
  /// before it takes a request.
  /// Errors: std::invalid_argument naming the model and what was expected of its options.
  explicit Endpoint(ServedModel served);

  /// Per-op mode: `inputs` through the model on its device, here, on the calling thread (its
  /// current stream), waited for; the outputs on the CPU. Errors: the model's.
  Tensors run_here(Tensors inputs) const;

  /// One row of each input, filled with its pad value, its varying dims at `length`, on
  /// `device`: what graphs are captured with and a loaded model is warmed up with.
  Tensors example(int64_t length, c10::Device device) const;

  /// The submitter's stats: with one device, its replica's (latency percentiles and batch limit
  /// included); with several, their sum (MultiDeviceSubmitter::stats).
  SubmitterStats stats() const;
  /// What GET /stats shows of this model: its submitter's stats (and each replica's), its
  /// graphs'; empty per-op.
  boost::json::object stats_object() const;
  /// GET /v2/models/{name}/config: the model as Triton's model configuration describes one
  /// (name, backend, max_batch_size, inputs and outputs with data_type and dims after the batch
  /// dim, dynamic_batching with its preferred sizes, queue delay, priority levels and queue
  /// policy, instance_group), as Triton's clients and perf_analyzer read it.
  boost::json::object triton_config() const;
  /// One model_stats entry of Triton's statistics extension: requests answered (success, fail),
  /// queue time, compute time (infer: the workers' run and sync; output: their completion)
  /// and, in stacked mode, the batches by size.
  boost::json::object triton_stats() const;

  Model model;
  ModelOptions options;
  oip::ModelInfo info;
  bool v1 = false;  ///< takes /v1/infer's one float32 [rows, width] input
  Metrics metrics;
  std::optional<Submitter> submitter;     ///< none per-op
  std::vector<GraphedMultiModel> graphs;  ///< with options.graphs: each replica's
  /// Stacked on CUDA: inputs this large are parsed into pinned memory (oip::parse_infer).
  std::size_t pin_from_bytes = 0;
  /// Stacked mode: the batches its model ran, by size.
  std::shared_ptr<BatchSizes> batch_sizes = std::make_shared<BatchSizes>();

 private:
  Replica<Tensors, Tensors, TorchBackend> replica(const Model::Forward& f, c10::Device device);
  SubmitterModel<Tensors, Tensors> replica_model(const Model::Forward& f, c10::Device device) const;
};

}  // namespace syncbatch::http
