// The CUDA graph engine of GraphedModel (built only where LibTorch has CUDA).
//
// LibTorch differences, detected rather than version-numbered:
// - CUDAGraph::capture_begin(pool, mode) (2.x) captures in thread-local mode, so other threads
//   (other workers, callers) may keep launching and allocating while one thread captures. Older
//   LibTorch has capture_begin(pool) only (global mode).
//
// Captures and graph destruction are serialized process-wide (graph_lifecycle_mutex): a
// CUDAGraph registers itself with the CUDA generator's state when its capture begins and
// unregisters in its destructor, in a set LibTorch does not lock. Workers capturing at once
// corrupt it, and the process later aborts in ~CUDAGraph ("The graph should be registered to
// the state"); graphs_test's concurrent-capture device test covers it.
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <ATen/cuda/EmptyTensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <optional>

#include "syncbatch/torch/detail/graph_engine.hpp"

namespace syncbatch::detail {
namespace {

template <class Graph>
concept HasCaptureMode = requires(Graph& g, at::cuda::MempoolId_t pool) {
  g.capture_begin(pool, cudaStreamCaptureModeThreadLocal);
};

template <class Graph>
void begin_capture(Graph& graph) {
  if constexpr (HasCaptureMode<Graph>) {
    graph.capture_begin(at::cuda::MempoolId_t{0, 0}, cudaStreamCaptureModeThreadLocal);
  } else {
    graph.capture_begin();
  }
}

// A capture that fails inside capture_end (an invalidated capture: the model synced, say) never
// runs the RNG state's capture epilogue, so LibTorch's CUDA generator of the device stays in
// capture mode and every later random op there throws "Offset increment outside graph capture
// encountered unexpectedly". A capture that completes runs the epilogue and clears it: one of a
// memset (not an empty one, of which LibTorch warns as a mistake).
// Called with graph_lifecycle_mutex held, on the capture stream (not the default stream).
void reset_rng_capture_state() {
  try {
    const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
    const at::TensorBase scratch = at::detail::empty_cuda({1}, at::TensorOptions(stream.device()));
    at::cuda::CUDAGraph graph;
    begin_capture(graph);
    C10_CUDA_CHECK(cudaMemsetAsync(scratch.data_ptr(), 0, scratch.nbytes(), stream.stream()));
    graph.capture_end();
  } catch (...) {  // NOLINT(bugprone-empty-catch): best effort; the capture error is reported
  }
  (void)cudaGetLastError();
}

// Held while a graph is captured or destroyed: see the note at the top.
std::mutex& graph_lifecycle_mutex() {
  static std::mutex mu;
  return mu;
}

class CudaGraph final : public CapturedGraph {
 public:
  CudaGraph() { graph.emplace(); }
  ~CudaGraph() override {
    std::lock_guard lock(graph_lifecycle_mutex());
    graph.reset();
  }
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;
  void replay() override { graph->replay(); }
  std::optional<at::cuda::CUDAGraph> graph;
};

class CudaGraphEngine final : public GraphEngine {
 public:
  std::string unavailable_reason(c10::Device device) const override {
    return not_a_cuda_device(device);
  }

  std::unique_ptr<CapturedGraph> capture(const GraphedModel::Forward& forward,
                                         const at::Tensor& input, at::Tensor& output,
                                         int warmup_runs) override {
    const c10::DeviceIndex index = input.device().index();
    c10::cuda::CUDAGuard device_guard(index);
    const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream(index);
    // CUDA cannot capture the default stream: callers on it capture on a side stream of ours
    // (one per device, so graphs made for the default stream share its cuBLAS workspace only
    // with each other, and those replay one after another).
    const bool on_default = caller == c10::cuda::getDefaultCUDAStream(index);
    const c10::cuda::CUDAStream stream = on_default ? side_stream(index) : caller;
    if (on_default) order(caller, stream);
    auto graph = std::make_unique<CudaGraph>();
    {
      // One capture at a time in the process (and so on the side stream too).
      std::lock_guard lifecycle(graph_lifecycle_mutex());
      c10::cuda::CUDAStreamGuard stream_guard(stream);
      for (int i = 0; i < warmup_runs; ++i) (void)forward(input);
      bool capturing = false;
      try {
        begin_capture(*graph->graph);
        capturing = true;
        output = forward(input);
        capturing = false;
        graph->graph->capture_end();
      } catch (const std::exception& e) {
        if (capturing) {
          try {
            graph->graph->capture_end();  // leaves capture mode; fails for an invalidated capture
          } catch (...) {  // NOLINT(bugprone-empty-catch): the first error is the one reported
          }
        }
        (void)cudaGetLastError();  // capture errors are not sticky; clear the last-error slot
        graph->graph.reset();      // unregisters it from the RNG state (the lock is held)
        reset_rng_capture_state();
        output = at::Tensor();
        throw CaptureError(capture_error_summary(e.what()));
      }
    }
    if (on_default) order(stream, caller);
    return graph;
  }

  void copy(const at::Tensor& dst, const at::Tensor& src) const override {
    // A plain cudaMemcpyAsync where it is one: the dispatcher's copy_ costs several times more
    // host time than the copy itself, which matters when a replay is a few microseconds.
    if (dst.is_cuda() && dst.is_contiguous() && src.is_contiguous() &&
        dst.scalar_type() == src.scalar_type() && dst.sizes() == src.sizes() &&
        (src.is_cpu() || src.device() == dst.device())) {
      C10_CUDA_CHECK(cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), dst.nbytes(),
                                     cudaMemcpyDefault,
                                     c10::cuda::getCurrentCUDAStream(dst.device().index())));
      return;
    }
    dst.copy_(src, /*non_blocking=*/true);
  }

  // Straight to the CUDA allocator, not through the dispatcher: one less hop per call.
  at::Tensor empty(c10::IntArrayRef sizes, const at::TensorOptions& options) const override {
    if (options.device().is_cuda()) return at::Tensor(at::detail::empty_cuda(sizes, options));
    return GraphEngine::empty(sizes, options);
  }

 private:
  static void order(const c10::cuda::CUDAStream& before, const c10::cuda::CUDAStream& after) {
    at::cuda::CUDAEvent event;
    event.record(before);
    event.block(after);
  }

  c10::cuda::CUDAStream side_stream(c10::DeviceIndex index) {
    std::lock_guard lock(mu_);
    auto it = side_streams_.find(index);
    if (it == side_streams_.end()) {
      cudaStream_t raw = nullptr;
      C10_CUDA_CHECK(cudaStreamCreateWithFlags(&raw, cudaStreamNonBlocking));
      it = side_streams_.emplace(index, c10::cuda::getStreamFromExternal(raw, index)).first;
    }
    return it->second;
  }

  std::mutex mu_;
  std::map<c10::DeviceIndex, c10::cuda::CUDAStream> side_streams_;  // live for the process
};

}  // namespace

std::shared_ptr<GraphEngine> make_cuda_graph_engine() {
  return std::make_shared<CudaGraphEngine>();
}

}  // namespace syncbatch::detail
