// Graph replay for launch-bound models: capture a model's forward once per input signature and
// row bucket as a CUDA graph, then replay it with each call's data copied into the graph's
// static input. A plain model wrapper: use it wherever a tensor model goes (a per-call model, the
// model of make_stacked_model or make_fused_calls_model in syncbatch/torch/stacked.hpp, a loop
// under SyncScope); for many small calls, call_each() replays up to max_fused_calls of them as
// one graph.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/ArrayRef.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "syncbatch/row_buckets.hpp"

namespace syncbatch {

/// Options of GraphedModel.
struct GraphOptions {
  /// Row counts (dim 0) to capture a graph for (RowBuckets, the idea eager stacked mode's
  /// StackingOptions::batch_buckets shares). A call with r rows replays the graph of the
  /// smallest bucket >= r, its input padded with the rows of the previous call (or zeros) and
  /// the padded rows' outputs dropped; a call with more rows than the largest bucket runs
  /// eagerly (stacked mode with batch_buckets never sends one). Empty: 1, 2, 4, ... up to
  /// max_rows, and max_rows itself.
  std::vector<int64_t> buckets{};
  /// The largest bucket when `buckets` is empty. At least 1.
  int64_t max_rows = 64;
  /// true: the first call that needs a graph captures it (that call pays the capture, about a
  /// millisecond). false: only warm_up() captures, and calls with no graph warmed up run
  /// eagerly, so no request ever waits for a capture.
  bool capture_on_first_use = true;
  /// Eager runs of the model before each capture (lazy initialization such as cuBLAS handles
  /// must not happen inside a capture). At least 1.
  int warmup_runs = 2;
  /// Most calls call_each() replays as one graph: it captures graphs of 1, 2, 4, ... up to
  /// this many calls of one input shape, each call its own forward. At least 1.
  int64_t max_fused_calls = 64;
  /// Most graphs held at once. Each has its own static input and output and its own memory pool
  /// (on CUDA at least one 2 MiB segment). A call that needs another when this many are held
  /// frees the least recently used idle one (after its pending replays) and captures its own
  /// (GraphStats::evictions); it runs eagerly only when every graph held is in use.
  /// While a graph is captured (on first use, or after an eviction), a CUDA random op on the
  /// same device from another thread throws in LibTorch ("Offset increment outside graph
  /// capture"): its generator is shared and in capture mode. Where clients draw random numbers
  /// on the device, capture before serving (warm_up, capture_on_first_use = false) and size
  /// max_graphs so that nothing is evicted.
  std::size_t max_graphs = 64;
  /// Receives each reason for running eagerly, once per distinct reason, on the thread that
  /// met it (e.g. forward it to the server's logger). Unset: nothing is printed; the reasons
  /// are in stats().fallback_reasons either way.
  std::function<void(const std::string&)> log{};
};

/// Counters of a GraphedModel, all callers together.
struct GraphStats {
  std::uint64_t captured = 0;          ///< Graphs captured so far.
  std::uint64_t graphs = 0;            ///< Graphs held now.
  std::uint64_t replays = 0;           ///< Calls served by a graph replay.
  std::uint64_t fused_replays = 0;     ///< Replays by call_each(), each serving one or more calls.
  std::uint64_t eager_runs = 0;        ///< Calls run eagerly (no graph for them, or none here).
  std::uint64_t capture_failures = 0;  ///< Captures that failed (the model then runs eagerly).
  std::uint64_t padded_rows = 0;       ///< Rows of padding replayed and dropped.
  std::uint64_t evictions = 0;  ///< Graphs freed for another (max_graphs), least recently used.
  /// Why graphs cannot run at all here ("" when they can): e.g. not a CUDA device.
  std::string unavailable_reason{};
  /// The latest reason a call ran eagerly although graphs are available ("" if none).
  std::string last_fallback{};
  /// Every distinct reason calls ran eagerly for, in the order they first came.
  std::vector<std::string> fallback_reasons{};
};

namespace detail {
class GraphEngine;
}

/// A model `y = model(x)` (rows of y match rows of x, each row computed from its own row) that
/// replays CUDA graphs instead of launching its kernels one by one.
///
///   GraphedModel graphed([&](const at::Tensor& x) { return module.forward({x}).toTensor(); },
///                        device, {.max_rows = 64});
///   BatchedSubmitter<at::Tensor, at::Tensor, TorchBackend> submitter(
///       make_stacked_model(graphed, {.device = device}),       // or per-call: graphed
///       {.policy = EveryN{64}},
///       TorchBackend(device, {.on_worker_start = [&] { graphed.warm_up(example); }}));
///   // with SyncScope, on the thread's own stream:  y = graphed(x); scope.tick();
///
/// Semantics are eager's: a call enqueues its work on the current stream and returns an output
/// tensor of its own (copied out of the graph's static output, so later replays do not touch
/// it), complete once that stream is synced. One sync per batch stays the caller's business.
///
/// Where graphs cannot run (CPU, MPS, a LibTorch without CUDA) every call runs eagerly and
/// stats().unavailable_reason says why. A model that cannot be captured (e.g. it reads a
/// value back to the host) falls back to eager for good, with the reason logged and counted.
/// Graphs need a model whose output has one row per input row; others run eagerly.
///
/// Streams and threads: graphs belong to the stream they replay on (the caller's current
/// stream), so each submitter worker, with its stream, captures and replays its own; graphs of
/// one stream run one after another on the device and never share a workspace concurrently.
/// Callable from several threads: each graph serves one call at a time, and a concurrent call
/// on the same stream and bucket gets a graph of its own (bounded by max_graphs). Capture
/// happens on the caller's stream, or on a side stream when that is the default stream (which
/// CUDA cannot capture).
///
/// A GraphedModel is a handle: copies share the graphs. They are freed by release() or when
/// the last copy goes (e.g. the BatchedSubmitter that holds it is destroyed).
class GraphedModel {
 public:
  using Forward = std::function<at::Tensor(const at::Tensor&)>;

  /// `device` without an index ("cuda") means the current device of the constructing thread.
  /// Errors: throws Error(kInvalidArgument) for an empty model or a bad option.
  GraphedModel(Forward model, c10::Device device, GraphOptions options = {});

  /// Runs the model on `x`: a graph replay where possible, else eagerly.
  /// Errors: what the model throws on `x` (no graph is kept for a call that fails).
  at::Tensor operator()(const at::Tensor& x) const;

  /// Runs the model on the rows of `parts` stacked along dim 0, as
  /// `(*this)(at::cat(parts, 0))` would, but gathers them straight into the graph's static
  /// input (one copy, where cat and the copy in take two launches and an allocation). Stacked
  /// mode uses it through make_stacked_model(GraphedModel). Parts the gather cannot take
  /// (another device, mismatched shapes) go through at::cat first, with its errors.
  /// Errors: Error(kInvalidArgument) for no parts; what at::cat or the model throws.
  at::Tensor call_rows(c10::ArrayRef<at::Tensor> parts) const;

  /// Runs the model on each of `xs` separately and returns what `(*this)(xs[i])` would: each
  /// call is its own forward on its own input (no rows are stacked, nothing is padded), so the
  /// results are those of per-call mode. What changes is the launching: same-shaped calls are
  /// gathered into one static input (one copy), replayed as one graph holding that many
  /// forwards, and copied out together (one copy), their results views of one output. n calls
  /// of one shape take one replay per set bit of n up to max_fused_calls (64: one; 7: three),
  /// against n replays and 3n copies and allocations through operator(). Calls it cannot fuse
  /// (no batch dimension, an input on another device, graphs unavailable, a model whose fused
  /// forward cannot be captured, max_graphs reached) run as operator() would.
  /// Errors: what the model throws on any call (then no result is returned, and no graph is
  /// kept for the shape it failed on); the caller may rerun the calls one by one to find it.
  std::vector<at::Tensor> call_each(c10::ArrayRef<at::Tensor> xs) const;

  /// Captures, for the calling thread's current stream, call_each()'s graphs of 1, 2, 4, ... up
  /// to max_fused_calls calls shaped exactly like `example`, so no later call_each() on that
  /// stream pays a capture. A no-op where graphs are unavailable.
  /// Errors: Error(kInvalidArgument) for an example without rows; what the model throws.
  void warm_up_each(const at::Tensor& example) const;

  /// Captures, for the calling thread's current stream, the graph of every bucket for inputs
  /// shaped like `example` (its rows do not matter; its first rows are the warm-up data), so no
  /// later call on that stream pays a capture. For a submitter, call it from
  /// TorchBackendOptions::on_worker_start. A no-op where graphs are unavailable.
  /// Errors: Error(kInvalidArgument) for an example without rows; what the model throws.
  void warm_up(const at::Tensor& example) const;

  /// Waits for the graphs' pending replays and frees all graphs not in use by a call right now.
  /// Later calls capture again (or run eagerly, per capture_on_first_use).
  void release() const;

  GraphStats stats() const;
  /// The buckets in use, ascending.
  const std::vector<int64_t>& buckets() const;
  c10::Device device() const;

  struct Impl;

 private:
  friend GraphedModel make_graphed_model_with_engine(Forward, c10::Device, GraphOptions,
                                                     std::shared_ptr<detail::GraphEngine>);
  explicit GraphedModel(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<Impl> impl_;
};

/// Graph replay for a model of several input and output tensors (token ids and a mask in,
/// per-token states and a pooled vector out): GraphedModel for tensor lists. Every input of a
/// call has the same rows (dim 0) and every output one row per input row, each computed from
/// its own input rows. A call replays the graph of its row bucket for its inputs' dtypes and
/// shapes after dim 0, so under stacked mode with batch and length buckets
/// (StackingOptions::batch_buckets, length_buckets) the model sees one graph per pair of
/// buckets, at most max_graphs held at once (the least recently used gives way,
/// GraphStats::evictions).
///
///   GraphedMultiModel graphed([&](const Tensors& in) { return bert.call(in); }, device);
///   make_stacked_model_multi(graphed, {.device = device, .batch_buckets = ...,
///                                      .length_buckets = ..., .length_input = LengthInput::kMask})
///
/// The inputs are copied into one static input (one copy per input; their bytes side by side)
/// and the outputs, packed the same way inside the graph, copied out in one copy: the tensors a
/// call returns are views into that copy. Calls whose inputs cannot be packed (none, rows that
/// differ, undefined, no rows, another device than the model's) run eagerly, as do models
/// whose outputs do not have one row per input row (the reason logged once). Threads, streams,
/// buckets, captures, release() and the other options are GraphedModel's.
class GraphedMultiModel {
 public:
  using Forward = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;

  /// Errors: throws Error(kInvalidArgument) for an empty model or a bad option.
  GraphedMultiModel(Forward model, c10::Device device, GraphOptions options = {});

  /// Runs the model on `inputs`: a graph replay where possible, else eagerly.
  /// Errors: what the model throws on them (no graph is kept for a call that fails).
  std::vector<at::Tensor> operator()(const std::vector<at::Tensor>& inputs) const;

  /// Captures, for the calling thread's current stream, every bucket's graph for inputs shaped
  /// like `example` (its rows do not matter). A no-op where graphs are unavailable.
  /// Errors: Error(kInvalidArgument) for an example that cannot be packed (see above); what
  /// the model throws.
  void warm_up(const std::vector<at::Tensor>& example) const;

  void release() const;
  GraphStats stats() const;
  const std::vector<int64_t>& buckets() const;
  c10::Device device() const;

  struct State;

 private:
  friend GraphedMultiModel make_graphed_multi_model_with_engine(
      Forward, c10::Device, GraphOptions, std::shared_ptr<detail::GraphEngine>);
  explicit GraphedMultiModel(std::shared_ptr<State> state) : state_(std::move(state)) {}
  std::shared_ptr<State> state_;
};

/// The buckets `options` describes, ascending and distinct (RowBuckets of `buckets`, or powers
/// of two up to `max_rows`). Errors: Error(kInvalidArgument).
std::vector<int64_t> graph_buckets(const GraphOptions& options);

/// The smallest bucket >= rows, or 0 when rows exceeds them all: RowBuckets::bucket_for.
int64_t bucket_for(int64_t rows, const std::vector<int64_t>& buckets);

/// "" when this build can capture CUDA graphs on `device`, else why not.
std::string graphs_unavailable_reason(c10::Device device);

}  // namespace syncbatch
