// How GraphedModel captures and replays: the CUDA engine in the library, a stand-in in the CPU
// tests (which replays by running the model into the same static output, as a graph would).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <memory>
#include <stdexcept>
#include <string>

#include "syncbatch/torch/graphs.hpp"

namespace syncbatch::detail {

/// One captured forward: replay() reruns it on the current stream, reading the static input
/// it was captured with and writing its static output.
class CapturedGraph {
 public:
  virtual ~CapturedGraph() = default;
  virtual void replay() = 0;
};

/// Thrown by GraphEngine::capture when the capture itself fails (the model is not capturable),
/// as opposed to the model throwing in a warm-up run (the input is bad).
class CaptureError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class GraphEngine {
 public:
  virtual ~GraphEngine() = default;
  /// "" when graphs can run on `device`, else why not.
  virtual std::string unavailable_reason(c10::Device device) const = 0;
  /// Runs `forward(input)` `warmup_runs` times, then captures one run of it; sets `output` to
  /// the static output the graph writes. Orders the capture after the current stream's work
  /// and the current stream after the capture. Errors: what the model throws in a warm-up
  /// run; CaptureError when capturing fails. The engine is left usable either way.
  virtual std::unique_ptr<CapturedGraph> capture(const GraphedModel::Forward& forward,
                                                 const at::Tensor& input, at::Tensor& output,
                                                 int warmup_runs) = 0;
  /// Copies `src` into `dst` (same shape and dtype) on the current stream, asynchronously
  /// where the devices allow it.
  virtual void copy(const at::Tensor& dst, const at::Tensor& src) const {
    dst.copy_(src, /*non_blocking=*/true);
  }
  /// An uninitialized tensor for a call's output (at::empty unless the engine has a cheaper way).
  virtual at::Tensor empty(c10::IntArrayRef sizes, const at::TensorOptions& options) const;
};

/// A capture's error in one line for GraphStats::last_fallback: the first line of `what`; for
/// TorchScript's, whose first line only says that an operation failed, also the last line that
/// names an error and the innermost line of the model's code marked as failing; and where CUDA
/// refused an operation during the capture, what such an operation usually is.
std::string capture_error_summary(const std::string& what);

/// Why graphs cannot run on a device that is not CUDA ("" for a CUDA device).
std::string not_a_cuda_device(c10::Device device);

/// The engine of this build: CUDA graphs where LibTorch has CUDA, else one that says why not.
std::shared_ptr<GraphEngine> default_graph_engine();

}  // namespace syncbatch::detail

namespace syncbatch {
/// A GraphedModel on a given engine (tests).
GraphedModel make_graphed_model_with_engine(GraphedModel::Forward model, c10::Device device,
                                            GraphOptions options,
                                            std::shared_ptr<detail::GraphEngine> engine);
/// A GraphedMultiModel on a given engine (tests).
GraphedMultiModel make_graphed_multi_model_with_engine(GraphedMultiModel::Forward model,
                                                       c10::Device device, GraphOptions options,
                                                       std::shared_ptr<detail::GraphEngine> engine);
}  // namespace syncbatch
