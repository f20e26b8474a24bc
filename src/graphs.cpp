// GraphedModel: buckets, static buffers, graph checkout and the fallbacks to eager. The CUDA
// specifics live in cuda_graphs.cpp (built only where LibTorch has CUDA).
#include "syncbatch/torch/graphs.hpp"

#include <ATen/ATen.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <mutex>
#include <optional>
#include <set>
#include <unordered_map>
#include <utility>

#include "syncbatch/error.hpp"
#include "syncbatch/torch/detail/graph_engine.hpp"
#include "syncbatch/torch/device_sync.hpp"
#include "syncbatch/torch/stacked.hpp"

namespace syncbatch {
namespace detail {

at::Tensor GraphEngine::empty(c10::IntArrayRef sizes, const at::TensorOptions& options) const {
  return at::empty(sizes, options);
}

std::string not_a_cuda_device(c10::Device device) {
  if (device.is_cuda()) return "";
  return "CUDA graphs need a CUDA device, got " + device.str() + "; calls run eagerly";
}

namespace {

class NoGraphEngine final : public GraphEngine {
 public:
  std::string unavailable_reason(c10::Device device) const override {
    if (!device.is_cuda()) return not_a_cuda_device(device);
    return "this LibTorch was built without CUDA graphs; calls run eagerly";
  }
  std::unique_ptr<CapturedGraph> capture(const GraphedModel::Forward&, const at::Tensor&,
                                         at::Tensor&, int) override {
    throw CaptureError(unavailable_reason(c10::Device(c10::kCUDA)));
  }
};

}  // namespace

#if SYNCBATCH_WITH_CUDA_GRAPHS
std::shared_ptr<GraphEngine> make_cuda_graph_engine();  // cuda_graphs.cpp
#endif

std::shared_ptr<GraphEngine> default_graph_engine() {
#if SYNCBATCH_WITH_CUDA_GRAPHS
  static const std::shared_ptr<GraphEngine> engine = make_cuda_graph_engine();
#else
  static const std::shared_ptr<GraphEngine> engine = std::make_shared<NoGraphEngine>();
#endif
  return engine;
}

}  // namespace detail

std::vector<int64_t> graph_buckets(const GraphOptions& options) {
  std::vector<int64_t> buckets = options.buckets;
  if (buckets.empty()) {
    if (options.max_rows < 1)
      throw Error(ErrorCode::kInvalidArgument, "GraphOptions.max_rows: expected at least 1, got " +
                                                   std::to_string(options.max_rows));
    for (int64_t b = 1; b < options.max_rows; b *= 2) buckets.push_back(b);
    buckets.push_back(options.max_rows);
  }
  for (int64_t b : buckets)
    if (b < 1)
      throw Error(ErrorCode::kInvalidArgument,
                  "GraphOptions.buckets: expected row counts >= 1, got " + std::to_string(b));
  std::sort(buckets.begin(), buckets.end());
  buckets.erase(std::unique(buckets.begin(), buckets.end()), buckets.end());
  return buckets;
}

namespace {

// The call counts call_each() fuses: 1, 2, 4, ... up to max_fused_calls.
std::vector<int64_t> fused_buckets(const GraphOptions& options) {
  if (options.max_fused_calls < 1)
    throw Error(ErrorCode::kInvalidArgument,
                "GraphOptions.max_fused_calls: expected at least 1, got " +
                    std::to_string(options.max_fused_calls));
  return graph_buckets({.max_rows = options.max_fused_calls});
}

}  // namespace

int64_t bucket_for(int64_t rows, const std::vector<int64_t>& buckets) {
  const auto it = std::lower_bound(buckets.begin(), buckets.end(), rows);
  return it == buckets.end() ? 0 : *it;
}

std::string graphs_unavailable_reason(c10::Device device) {
  return detail::default_graph_engine()->unavailable_reason(device);
}

struct GraphedModel::Impl {
  // One graph with its static buffers; used by one call at a time.
  struct Replica {
    std::unique_ptr<detail::CapturedGraph> graph;
    at::Tensor input, output;
    bool busy = true;
  };
  // The stream a graph replays on, the input signature and the bucket. Graphs are never shared
  // between streams: graphs replayed on one stream run one after another on the device, so
  // workspaces they share (cuBLAS keeps one per stream it ran on) are never used at once.
  // `calls` is 0 for operator()'s graphs (`bucket` rows, padded); call_each()'s graphs hold
  // `calls` forwards of exactly `bucket` rows each.
  struct Key {
    c10::Stream stream;
    at::ScalarType dtype;
    c10::SmallVector<int64_t, 6> trailing;  // no allocation per call for ranks up to 7
    int64_t bucket;
    int64_t calls = 0;
    bool operator==(const Key&) const = default;
  };
  struct KeyHash {
    std::size_t operator()(const Key& k) const noexcept {
      std::size_t h = std::hash<c10::Stream>()(k.stream);
      auto mix = [&](std::size_t v) { h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2); };
      mix(static_cast<std::size_t>(k.dtype));
      mix(static_cast<std::size_t>(k.bucket));
      mix(static_cast<std::size_t>(k.calls));
      for (int64_t d : k.trailing) mix(static_cast<std::size_t>(d));
      return h;
    }
  };

  Impl(Forward m, c10::Device d, GraphOptions o, std::shared_ptr<detail::GraphEngine> e)
      : model(std::move(m)),
        device(detail::with_current_index(d)),  // "cuda": inputs come on "cuda:0"
        options(std::move(o)),
        buckets(graph_buckets(options)),
        call_buckets(fused_buckets(options)),
        engine(std::move(e)),
        unavailable(engine->unavailable_reason(device)),
        oversize_reason("calls with more rows than the largest bucket (" +
                        std::to_string(buckets.back()) + ") run eagerly"),
        full_reason("max_graphs (" + std::to_string(options.max_graphs) +
                    ") graphs are held; calls that need another run eagerly") {
    if (!model) throw Error(ErrorCode::kInvalidArgument, "GraphedModel: the model is empty");
    if (options.warmup_runs < 1)
      throw Error(ErrorCode::kInvalidArgument,
                  "GraphOptions.warmup_runs: expected at least 1, got " +
                      std::to_string(options.warmup_runs));
    if (options.max_graphs < 1)
      throw Error(ErrorCode::kInvalidArgument,
                  "GraphOptions.max_graphs: expected at least 1, got 0");
  }

  ~Impl() {
    try {
      release();
    } catch (...) {  // NOLINT(bugprone-empty-catch): a destructor must not throw
    }
  }

  at::Tensor call(const at::Tensor& x) {
    if (!unavailable.empty() || failed.load(std::memory_order_acquire) || !x.defined() ||
        x.dim() == 0 || x.size(0) == 0)
      return eager(x);
    return run_bucketed(
        x, x.size(0), [&](const at::Tensor& dst) { engine->copy(dst, x); }, [&] { return x; });
  }

  at::Tensor call_rows(c10::ArrayRef<at::Tensor> parts) {
    if (parts.empty())
      throw Error(ErrorCode::kInvalidArgument,
                  "GraphedModel::call_rows: expected at least one tensor, got none");
    if (parts.size() == 1) return call(parts.front());
    const auto whole = [&] { return at::cat(parts, 0); };
    const at::Tensor& first = parts.front();
    if (!unavailable.empty() || failed.load(std::memory_order_acquire)) return eager(whole());
    int64_t rows = 0;
    for (const at::Tensor& p : parts) {
      // What the gather cannot take (no rows, another device, shape or dtype) goes through
      // at::cat, which copies across devices and names a mismatch, as operator() would see it.
      if (!p.defined() || p.dim() == 0 || p.size(0) == 0 || p.device() != device ||
          p.scalar_type() != first.scalar_type() || p.dim() != first.dim() ||
          p.sizes().slice(1) != first.sizes().slice(1))
        return call(whole());
      rows += p.size(0);
    }
    return run_bucketed(
        first, rows, [&](at::Tensor dst) { at::cat_out(dst, parts, 0); }, whole);
  }

  // Runs `rows` rows shaped like `like` through their bucket's graph, `gather(dst)` writing
  // them into the graph's static input; `whole()` gives them as one tensor where a capture or
  // an eager run needs that.
  template <class Gather, class Whole>
  at::Tensor run_bucketed(const at::Tensor& like, int64_t rows, Gather gather, Whole whole) {
    const int64_t bucket = bucket_for(rows, buckets);
    if (bucket == 0) {
      fallback(oversize_reason);
      return eager(whole());
    }
    Key key{current_stream(), like.scalar_type(), trailing_of(like), bucket};
    Replica* replica = checkout(key, options.capture_on_first_use);
    if (replica == nullptr) return eager(whole());
    if (!replica->graph) {
      try {
        // Not capturable: fell back for good.
        if (!capture(*replica, key, whole())) return eager(whole());
      } catch (...) {
        discard(key, replica);  // the model threw in a warm-up run: the call's own error
        throw;
      }
    }
    try {
      at::Tensor out = replay(*replica, gather, rows);
      checkin(replica);
      padded_rows.fetch_add(static_cast<std::uint64_t>(bucket - rows), std::memory_order_relaxed);
      replays.fetch_add(1, std::memory_order_relaxed);
      return out;
    } catch (...) {
      checkin(replica);
      throw;
    }
  }

  std::vector<at::Tensor> call_each(c10::ArrayRef<at::Tensor> xs) {
    std::vector<at::Tensor> out(xs.size());
    // Calls of one shape, in order; the few shapes of a batch are found by a linear search.
    c10::SmallVector<c10::SmallVector<std::size_t, 64>, 2> groups;
    for (std::size_t i = 0; i < xs.size(); ++i) {
      const at::Tensor& x = xs[i];
      // Elsewhere than the model's device (e.g. CPU inputs to a CUDA model), operator() copies
      // the input in: call_each's gather cannot.
      if (!unavailable.empty() || fused_failed.load(std::memory_order_acquire) || !x.defined() ||
          x.dim() == 0 || x.size(0) == 0 || x.device() != device) {
        out[i] = call(x);
        continue;
      }
      auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) {
        const at::Tensor& y = xs[g.front()];
        return y.scalar_type() == x.scalar_type() && y.sizes() == x.sizes();  // device: the model's
      });
      if (it == groups.end()) {
        groups.emplace_back();
        it = groups.end() - 1;
      }
      it->push_back(i);
    }
    for (const auto& group : groups) {
      std::size_t done = 0;
      while (done < group.size()) {
        const auto n = static_cast<int64_t>(group.size() - done);
        const int64_t calls = *(std::upper_bound(call_buckets.begin(), call_buckets.end(), n) - 1);
        const c10::ArrayRef<std::size_t> chunk(group.data() + done,
                                               static_cast<std::size_t>(calls));
        run_fused(xs, chunk, out);
        done += static_cast<std::size_t>(calls);
      }
    }
    return out;
  }

  void warm_up(const at::Tensor& example) {
    if (!unavailable.empty() || failed.load()) return;
    check_example(example, "warm_up");
    const c10::Stream stream = current_stream();
    for (int64_t bucket : buckets)
      if (!warm_up_key({stream, example.scalar_type(), trailing_of(example), bucket},
                       [&] { return example.narrow(0, 0, std::min(bucket, example.size(0))); }))
        return;
  }

  void warm_up_each(const at::Tensor& example) {
    if (!unavailable.empty() || fused_failed.load()) return;
    check_example(example, "warm_up_each");
    const c10::Stream stream = current_stream();
    for (int64_t calls : call_buckets)
      if (!warm_up_key(
              {stream, example.scalar_type(), trailing_of(example), example.size(0), calls},
              [&] { return at::cat(std::vector<at::Tensor>(calls, example), 0); }))
        return;
  }

  void release() {
    std::vector<std::unique_ptr<Replica>> freed;
    std::vector<c10::Stream> streams;
    {
      std::lock_guard lock(mu);
      for (auto& [key, replicas] : graphs) {
        auto keep = std::stable_partition(replicas.begin(), replicas.end(),
                                          [](const auto& r) { return r->busy; });
        if (keep != replicas.end() &&
            std::find(streams.begin(), streams.end(), key.stream) == streams.end())
          streams.push_back(key.stream);
        std::move(keep, replicas.end(), std::back_inserter(freed));
        replicas.erase(keep, replicas.end());
      }
      held -= freed.size();
    }
    // Replays may still be running on the device: wait before their memory goes back.
    for (const c10::Stream& s : streams) s.synchronize();
  }

  GraphStats stats() const {
    GraphStats s;
    s.captured = captured.load();
    s.replays = replays.load();
    s.fused_replays = fused_replays.load();
    s.eager_runs = eager_runs.load();
    s.capture_failures = capture_failures.load();
    s.padded_rows = padded_rows.load();
    s.unavailable_reason = unavailable;
    std::lock_guard lock(mu);
    s.graphs = held;
    s.last_fallback = last_fallback;
    return s;
  }

 private:
  at::Tensor eager(const at::Tensor& x) {
    eager_runs.fetch_add(1, std::memory_order_relaxed);
    return model(x);
  }

  void fallback(const std::string& reason) {
    bool first = false;
    {
      std::lock_guard lock(mu);
      last_fallback = reason;
      first = logged.insert(reason).second;
    }
    if (!first) return;
    if (options.log) {
      options.log(reason);
    } else {
      std::fprintf(stderr, "syncbatch: GraphedModel: %s\n", reason.c_str());
    }
  }

  // A free replica of `key`, marked busy; a new, uncaptured one (graph unset) when none is free
  // and `may_capture` and max_graphs allow; nullptr otherwise.
  Replica* checkout(const Key& key, bool may_capture) {
    {
      std::lock_guard lock(mu);
      auto& replicas = graphs[key];
      for (auto& r : replicas)
        if (!r->busy) {
          r->busy = true;
          return r.get();
        }
      if (may_capture && held < options.max_graphs) {
        ++held;
        replicas.push_back(std::make_unique<Replica>());
        return replicas.back().get();
      }
      if (!may_capture) return nullptr;  // counted as eager; nothing to report per call
    }
    fallback(full_reason);
    return nullptr;
  }

  void checkin(Replica* r) {
    std::lock_guard lock(mu);
    r->busy = false;
  }

  void discard(const Key& key, Replica* r) {
    std::lock_guard lock(mu);
    auto& replicas = graphs[key];
    replicas.erase(std::find_if(replicas.begin(), replicas.end(),
                                [&](const auto& p) { return p.get() == r; }));
    --held;
  }

  static void check_example(const at::Tensor& example, const char* what) {
    if (!example.defined() || example.dim() == 0 || example.size(0) == 0)
      throw Error(ErrorCode::kInvalidArgument,
                  std::string("GraphedModel::") + what +
                      ": expected an example with a batch dimension and at least one row, got " +
                      describe_tensor(example));
  }

  // Captures the graph of `key` unless one is held; `input()` gives the capture's input.
  // Returns false when no more graphs can be captured (max_graphs, or the model not capturable).
  template <class Input>
  bool warm_up_key(const Key& key, Input input) {
    {
      std::lock_guard lock(mu);
      if (!graphs[key].empty()) return true;
    }
    Replica* r = checkout(key, /*may_capture=*/true);
    if (r == nullptr) return false;  // max_graphs reached (reported)
    if (r->graph) {                  // another thread captured it meanwhile
      checkin(r);
      return true;
    }
    try {
      if (!capture(*r, key, input())) return false;
    } catch (...) {
      discard(key, r);
      throw;
    }
    checkin(r);
    return true;
  }

  // Runs the calls `chunk` (indices into xs, one shape, a call bucket's count) as one replay
  // of a fused graph, or one by one where there is none.
  void run_fused(c10::ArrayRef<at::Tensor> xs, c10::ArrayRef<std::size_t> chunk,
                 std::vector<at::Tensor>& out) {
    const at::Tensor& first = xs[chunk.front()];
    const auto calls = static_cast<int64_t>(chunk.size());
    c10::SmallVector<at::Tensor, 64> parts;
    for (std::size_t i : chunk) parts.push_back(xs[i]);
    Key key{current_stream(), first.scalar_type(), trailing_of(first), first.size(0), calls};
    Replica* replica = fused_failed.load(std::memory_order_acquire)
                           ? nullptr
                           : checkout(key, options.capture_on_first_use);
    if (replica != nullptr && !replica->graph) {
      try {
        if (!capture(*replica, key, at::cat(parts, 0))) replica = nullptr;
      } catch (...) {
        discard(key, replica);  // the model threw in a warm-up run: one of the calls' errors
        throw;
      }
    }
    if (replica == nullptr) {  // no graph: as operator() would
      for (std::size_t i : chunk) out[i] = call(xs[i]);
      return;
    }
    try {
      if (calls == 1) {
        engine->copy(replica->input, first);
      } else {
        at::cat_out(replica->input, parts, 0);
      }
      replica->graph->replay();
      const at::Tensor& static_out = replica->output;
      at::Tensor results = engine->empty(static_out.sizes(), static_out.options());
      engine->copy(results, static_out);
      checkin(replica);
      for (std::size_t k = 0; k < chunk.size(); ++k)
        out[chunk[k]] = results.select(0, static_cast<int64_t>(k));
      replays.fetch_add(static_cast<std::uint64_t>(calls), std::memory_order_relaxed);
      fused_replays.fetch_add(1, std::memory_order_relaxed);
    } catch (...) {
      checkin(replica);
      throw;
    }
  }

  // The forward a fused graph captures: `calls` forwards of `rows` rows each, their outputs
  // stacked into one static output (one slot per call).
  GraphedModel::Forward fused_forward(int64_t calls, int64_t rows) const {
    return [model = model, calls, rows](const at::Tensor& in) {
      std::vector<at::Tensor> outs;
      outs.reserve(static_cast<std::size_t>(calls));
      for (int64_t i = 0; i < calls; ++i) outs.push_back(model(in.narrow(0, i * rows, rows)));
      return at::stack(outs, 0);
    };
  }

  // Captures r's graph with `x` (rows <= the static input's) in its static input. Returns false,
  // with graphs of its kind switched off for good, when the model cannot be captured.
  bool capture(Replica& r, const Key& key, const at::Tensor& x) {
    const bool fused = key.calls > 0;
    std::vector<int64_t> sizes{fused ? key.calls * key.bucket : key.bucket};
    sizes.insert(sizes.end(), key.trailing.begin(), key.trailing.end());
    r.input = at::zeros(sizes, at::TensorOptions().dtype(key.dtype).device(device));
    engine->copy(r.input.narrow(0, 0, x.size(0)), x);
    std::string why;
    try {
      r.graph = engine->capture(fused ? fused_forward(key.calls, key.bucket) : model, r.input,
                                r.output, options.warmup_runs);
      if (fused && r.output.device() != r.input.device())
        why = "the model returned " + describe_tensor(r.output) + " for " +
              describe_tensor(r.input) +
              "; graphs need outputs on the input's device, so call_each() runs calls one by one";
      if (!fused && (!r.output.defined() || r.output.dim() == 0 || r.output.size(0) != key.bucket ||
                     r.output.device() != r.input.device()))
        why = "the model returned " + describe_tensor(r.output) + " for " +
              describe_tensor(r.input) +
              "; graphs need one output row per input row on the input's device, so calls run "
              "eagerly";
    } catch (const detail::CaptureError& e) {
      why = std::string("the model cannot be captured as a CUDA graph (") + e.what() +
            (fused ? "); call_each() runs calls one by one" : "); calls run eagerly");
      capture_failures.fetch_add(1, std::memory_order_relaxed);
    }
    if (why.empty()) {
      captured.fetch_add(1, std::memory_order_relaxed);
      return true;
    }
    (fused ? fused_failed : failed).store(true, std::memory_order_release);
    discard(key, &r);
    fallback(why);
    return false;
  }

  static c10::SmallVector<int64_t, 6> trailing_of(const at::Tensor& x) {
    const c10::IntArrayRef t = x.sizes().slice(1);
    return c10::SmallVector<int64_t, 6>(t.begin(), t.end());
  }

  c10::Stream current_stream() const {
    return c10::impl::getDeviceGuardImpl(device.type())->getStream(device);
  }

  template <class Gather>
  at::Tensor replay(Replica& r, Gather& gather, int64_t rows) {
    gather(rows == r.input.size(0) ? r.input : r.input.narrow(0, 0, rows));
    r.graph->replay();
    const at::Tensor rows_out = rows == r.output.size(0) ? r.output : r.output.narrow(0, 0, rows);
    at::Tensor out = engine->empty(rows_out.sizes(), rows_out.options());
    engine->copy(out, rows_out);
    return out;
  }

 public:
  const Forward model;
  const c10::Device device;
  const GraphOptions options;
  const std::vector<int64_t> buckets;
  const std::vector<int64_t> call_buckets;  // call counts call_each() fuses
  const std::shared_ptr<detail::GraphEngine> engine;
  const std::string unavailable;
  // Fallback reasons that calls may hit again and again: made once, not per call.
  const std::string oversize_reason;
  const std::string full_reason;

 private:
  mutable std::mutex mu;
  std::unordered_map<Key, std::vector<std::unique_ptr<Replica>>, KeyHash> graphs;
  std::size_t held = 0;
  std::set<std::string> logged;
  std::string last_fallback;
  std::atomic<bool> failed{false};        // operator()'s graphs cannot be captured
  std::atomic<bool> fused_failed{false};  // call_each()'s graphs cannot be captured
  std::atomic<std::uint64_t> captured{0}, replays{0}, fused_replays{0}, eager_runs{0},
      capture_failures{0}, padded_rows{0};
};

GraphedModel::GraphedModel(Forward model, c10::Device device, GraphOptions options)
    : impl_(std::make_shared<Impl>(std::move(model), device, std::move(options),
                                   detail::default_graph_engine())) {}

GraphedModel make_graphed_model_with_engine(GraphedModel::Forward model, c10::Device device,
                                            GraphOptions options,
                                            std::shared_ptr<detail::GraphEngine> engine) {
  return GraphedModel(
      std::make_shared<GraphedModel::Impl>(std::move(model), device, std::move(options), engine));
}

at::Tensor GraphedModel::operator()(const at::Tensor& x) const {
  return impl_->call(x);
}

at::Tensor GraphedModel::call_rows(c10::ArrayRef<at::Tensor> parts) const {
  return impl_->call_rows(parts);
}

StackedModel<at::Tensor, at::Tensor> make_stacked_model(GraphedModel graphed,
                                                        StackingOptions options) {
  auto gather = [graphed](c10::ArrayRef<at::Tensor> parts) { return graphed.call_rows(parts); };
  return detail::make_stacked_model_gathering(std::move(graphed), std::move(gather),
                                              std::move(options));
}

std::vector<at::Tensor> GraphedModel::call_each(c10::ArrayRef<at::Tensor> xs) const {
  return impl_->call_each(xs);
}

void GraphedModel::warm_up_each(const at::Tensor& example) const {
  impl_->warm_up_each(example);
}

void GraphedModel::warm_up(const at::Tensor& example) const {
  impl_->warm_up(example);
}

void GraphedModel::release() const {
  impl_->release();
}
GraphStats GraphedModel::stats() const {
  return impl_->stats();
}
const std::vector<int64_t>& GraphedModel::buckets() const {
  return impl_->buckets;
}
c10::Device GraphedModel::device() const {
  return impl_->device;
}

StackedModel<at::Tensor, at::Tensor> make_fused_calls_model(GraphedModel graphed) {
  return {[graphed = std::move(graphed)](Batch<at::Tensor, at::Tensor>& batch) {
    std::vector<at::Tensor> inputs;
    inputs.reserve(batch.size());
    for (std::size_t i = 0; i < batch.size(); ++i) inputs.push_back(batch.input(i));
    std::vector<at::Tensor> outputs;
    try {
      outputs = graphed.call_each(inputs);
    } catch (...) {  // NOLINT(bugprone-empty-catch): rerun below, call by call
    }
    if (outputs.size() == inputs.size()) {
      for (std::size_t i = 0; i < inputs.size(); ++i) batch.set_value(i, std::move(outputs[i]));
      return;
    }
    // Some call failed: rerun each alone, so that only the requests it fails on get its error.
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      try {
        batch.set_value(i, graphed(inputs[i]));
      } catch (...) {
        batch.set_error(i, std::current_exception());
      }
    }
  }};
}

}  // namespace syncbatch
