// GraphedModel: buckets, static buffers, graph checkout and the fallbacks to eager. The CUDA
// specifics live in cuda_graphs.cpp (built only where LibTorch has CUDA).
#include "syncbatch/torch/graphs.hpp"

#include <ATen/ATen.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/SmallVector.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string_view>
#include <utility>
#include <vector>

#include "graph_pool.hpp"
#include "syncbatch/error.hpp"
#include "syncbatch/torch/describe.hpp"
#include "syncbatch/torch/detail/graph_engine.hpp"
#include "syncbatch/torch/device_sync.hpp"

namespace syncbatch {
namespace detail {

at::Tensor GraphEngine::empty(c10::IntArrayRef sizes, const at::TensorOptions& options) const {
  return at::empty(sizes, options);
}

std::string capture_error_summary(const std::string& what) {
  std::vector<std::string_view> lines;
  for (std::size_t at = 0; at <= what.size();) {
    const std::size_t end = std::min(what.find('\n', at), what.size());
    lines.emplace_back(std::string_view(what).substr(at, end - at));
    at = end + 1;
  }
  std::string summary(lines.front());
  if (summary.find("TorchScript interpreter") != std::string::npos) {
    std::string_view named, code;
    for (std::size_t i = 0; i < lines.size(); ++i) {
      if (lines[i].find("Error: ") != std::string_view::npos) named = lines[i];
      // The serialized code's frames mark the failing call on the line under it.
      if (i > 0 && lines[i].find("<--- HERE") != std::string_view::npos &&
          lines[i].find_first_not_of(" ~") == lines[i].find("<--- HERE"))
        code = lines[i - 1];
    }
    if (!named.empty()) summary += " " + std::string(named);
    const std::size_t indent = code.find_first_not_of(' ');
    if (indent != std::string_view::npos)
      summary += ", at `" + std::string(code.substr(indent)) + "`";
  }
  if (what.find("operation not permitted when stream is capturing") != std::string::npos)
    summary +=
        ": the forward waits on the device there (int(), .item() or a copy to the host of a "
        "device tensor, e.g. a length computed on the device), which a CUDA graph cannot hold";
  return summary;
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
  if (!options.buckets.empty()) return RowBuckets(options.buckets, "GraphOptions.buckets").sizes();
  return RowBuckets::powers_of_two(options.max_rows, "GraphOptions.max_rows").sizes();
}

namespace {

// The call counts call_each() fuses: 1, 2, 4, ... up to max_fused_calls.
std::vector<int64_t> fused_buckets(const GraphOptions& options) {
  return RowBuckets::powers_of_two(options.max_fused_calls, "GraphOptions.max_fused_calls").sizes();
}

}  // namespace

int64_t bucket_for(int64_t rows, const std::vector<int64_t>& buckets) {
  return RowBuckets(buckets).bucket_for(rows);
}

std::string graphs_unavailable_reason(c10::Device device) {
  return detail::default_graph_engine()->unavailable_reason(device);
}

namespace {

using detail::GraphKey;
using detail::GraphSlot;
using detail::Replays;

// What both replay strategies share: the model and where it runs, the engine, the graph pool
// and the counters. Its members are thread-safe or immutable.
struct GraphContext {
  GraphContext(GraphedModel::Forward m, c10::Device d, const GraphOptions& o,
               std::shared_ptr<detail::GraphEngine> e)
      : model(std::move(m)),
        device(detail::with_current_index(d)),  // "cuda": inputs come on "cuda:0"
        options(o),
        engine(std::move(e)),
        unavailable(engine->unavailable_reason(device)),
        pool(o.max_graphs, o.log) {}

  at::Tensor eager(const at::Tensor& x) {
    eager_runs.fetch_add(1, std::memory_order_relaxed);
    return model(x);
  }

  c10::Stream current_stream() const {
    return c10::impl::getDeviceGuardImpl(device.type())->getStream(device);
  }

  // Captures `forward` into `slot` (checked out for `key`) with `x` (rows <= the static input's)
  // in its static input. `problem(slot)` names what the capture's output breaks ("" if
  // nothing). Returns false, with the slot discarded, when the model cannot be captured so:
  // for an output problem, or after kFailuresBeforeGivingUp failed captures with none
  // succeeding, `disabled` is set for good; otherwise only `key` runs eagerly from then on (some
  // models capture at every size but one). `eager_note` ends the logged reason.
  template <class Problem>
  bool capture(GraphSlot& slot, const GraphKey& key, const at::Tensor& x,
               const GraphedModel::Forward& forward, Problem problem, std::atomic<bool>& disabled,
               const char* eager_note) {
    slot.input = at::zeros(key.input_sizes(), at::TensorOptions().dtype(key.dtype).device(device));
    engine->copy(slot.input.narrow(0, 0, x.size(0)), x);
    std::string why;
    bool for_good = false;
    try {
      slot.graph = engine->capture(forward, slot.input, slot.output, options.warmup_runs);
      why = problem(slot);
      for_good = !why.empty();
    } catch (const detail::CaptureError& e) {
      const std::uint64_t failures = capture_failures.fetch_add(1, std::memory_order_relaxed) + 1;
      for_good = failures >= kFailuresBeforeGivingUp && captured.load() == 0;
      why = "the model cannot be captured as a CUDA graph for " + describe_tensor(slot.input) +
            " (" + e.what() + "); " +
            (for_good ? std::string(eager_note) : "calls of that shape run eagerly");
    }
    if (why.empty()) {
      captured.fetch_add(1, std::memory_order_relaxed);
      return true;
    }
    if (for_good) disabled.store(true, std::memory_order_release);
    pool.discard(key, &slot);
    if (!for_good) pool.mark_failed(key);
    pool.fallback(why);
    return false;
  }

  // Failed captures, none succeeding, after which a model is taken as not capturable at all.
  static constexpr std::uint64_t kFailuresBeforeGivingUp = 3;

  // Captures the graph of `key` unless one is held; `input()` gives the capture's input and
  // `capture_slot(slot, x)` captures it. Returns false when no more graphs can be captured
  // (max_graphs held, all in use); a key that cannot be captured is left for the next.
  template <class Input, class Capture>
  bool warm_up_key(const GraphKey& key, Input input, Capture capture_slot) {
    if (pool.holds(key)) return true;
    GraphSlot* slot = pool.checkout(key, /*may_create=*/true);
    if (slot == nullptr) return false;  // max_graphs reached (reported)
    if (slot->graph) {                  // another thread captured it meanwhile
      pool.checkin(slot);
      return true;
    }
    try {
      if (!capture_slot(*slot, input())) return true;  // discarded; calls of it run eagerly
    } catch (...) {
      pool.discard(key, slot);
      throw;
    }
    pool.checkin(slot);
    return true;
  }

  static void check_example(const at::Tensor& example, const char* what) {
    if (!example.defined() || example.dim() == 0 || example.size(0) == 0)
      throw Error(ErrorCode::kInvalidArgument,
                  std::string("GraphedModel::") + what +
                      ": expected an example with a batch dimension and at least one row, got " +
                      describe_tensor(example));
  }

  const GraphedModel::Forward model;
  const c10::Device device;
  const GraphOptions options;
  const std::shared_ptr<detail::GraphEngine> engine;
  const std::string unavailable;  // why graphs cannot run here ("" when they can)
  detail::GraphPool pool;
  std::atomic<std::uint64_t> captured{0}, replays{0}, fused_replays{0}, eager_runs{0},
      capture_failures{0}, padded_rows{0};
};

// Bucketed rows (operator(), call_rows, warm_up): a call of r rows replays the graph of the
// smallest bucket >= r, its rows copied in, the padding's outputs dropped.
class RowReplay {
 public:
  RowReplay(GraphContext& g, RowBuckets buckets)
      : g_(g),
        buckets_(std::move(buckets)),
        oversize_reason_("calls with more rows than the largest bucket (" +
                         std::to_string(buckets_.largest()) + ") run eagerly") {}

  const std::vector<int64_t>& buckets() const { return buckets_.sizes(); }

  at::Tensor call(const at::Tensor& x) {
    if (!usable() || !x.defined() || x.dim() == 0 || x.size(0) == 0) return g_.eager(x);
    return run(
        key_like(x), x.size(0), [&](const at::Tensor& dst) { g_.engine->copy(dst, x); },
        [&] { return x; });
  }

  // A call of `rows` rows keyed by `key` (its rows set here), `gather(dst)` writing them into
  // the static input and `whole()` giving them as one tensor: GraphedMultiModel's packed calls.
  template <class Gather, class Whole>
  at::Tensor call_gathered(GraphKey key, int64_t rows, Gather gather, Whole whole) {
    if (!usable()) return g_.eager(whole());
    return run(std::move(key), rows, gather, whole);
  }

  // The key of a call shaped like `x` on the current stream (rows set by run), with `layout`.
  GraphKey key_like(const at::Tensor& x, const c10::SmallVector<int64_t, 8>& layout = {}) const {
    GraphKey key = GraphKey::like(x, g_.current_stream(), Replays::kRows, 0);
    key.layout = layout;
    return key;
  }

  at::Tensor call_rows(c10::ArrayRef<at::Tensor> parts) {
    if (parts.empty())
      throw Error(ErrorCode::kInvalidArgument,
                  "GraphedModel::call_rows: expected at least one tensor, got none");
    if (parts.size() == 1) return call(parts.front());
    const auto whole = [&] { return at::cat(parts, 0); };
    const at::Tensor& first = parts.front();
    if (!usable()) return g_.eager(whole());
    int64_t rows = 0;
    for (const at::Tensor& p : parts) {
      // What the gather cannot take (no rows, another device, shape or dtype) goes through
      // at::cat, which copies across devices and names a mismatch, as operator() would see it.
      if (!p.defined() || p.dim() == 0 || p.size(0) == 0 || p.device() != g_.device ||
          p.scalar_type() != first.scalar_type() || p.dim() != first.dim() ||
          p.sizes().slice(1) != first.sizes().slice(1))
        return call(whole());
      rows += p.size(0);
    }
    return run(
        key_like(first), rows, [&](at::Tensor dst) { at::cat_out(dst, parts, 0); }, whole);
  }

  void warm_up(const at::Tensor& example, const c10::SmallVector<int64_t, 8>& layout = {}) {
    if (!usable()) return;
    GraphContext::check_example(example, "warm_up");
    for (int64_t bucket : buckets_.sizes()) {
      GraphKey key = key_like(example, layout);
      key.rows = bucket;
      const auto input = [&] { return example.narrow(0, 0, std::min(bucket, example.size(0))); };
      const auto capture = [&](GraphSlot& slot, const at::Tensor& x) {
        return capture_slot(slot, key, x);
      };
      if (!g_.warm_up_key(key, input, capture) || !usable()) return;
    }
  }

 private:
  bool usable() const { return g_.unavailable.empty() && !failed_.load(std::memory_order_acquire); }

  // Runs `rows` rows keyed by `key` through their bucket's graph, `gather(dst)` writing
  // them into the graph's static input; `whole()` gives them as one tensor where a capture or
  // an eager run needs that.
  template <class Gather, class Whole>
  at::Tensor run(GraphKey key, int64_t rows, Gather gather, Whole whole) {
    const int64_t bucket = buckets_.bucket_for(rows);
    if (bucket == 0) {
      g_.pool.fallback(oversize_reason_);
      return g_.eager(whole());
    }
    key.rows = bucket;
    GraphSlot* slot = g_.pool.checkout(key, g_.options.capture_on_first_use);
    if (slot == nullptr) return g_.eager(whole());
    if (!slot->graph) {
      try {
        if (!capture_slot(*slot, key, whole())) return g_.eager(whole());  // not capturable
      } catch (...) {
        g_.pool.discard(key, slot);  // the model threw in a warm-up run: the call's own error
        throw;
      }
    }
    try {
      gather(rows == slot->input.size(0) ? slot->input : slot->input.narrow(0, 0, rows));
      slot->graph->replay();
      const at::Tensor& all = slot->output;
      const at::Tensor mine = rows == all.size(0) ? all : all.narrow(0, 0, rows);
      at::Tensor out = g_.engine->empty(mine.sizes(), mine.options());
      g_.engine->copy(out, mine);
      g_.pool.checkin(slot);
      g_.padded_rows.fetch_add(static_cast<std::uint64_t>(bucket - rows),
                               std::memory_order_relaxed);
      g_.replays.fetch_add(1, std::memory_order_relaxed);
      return out;
    } catch (...) {
      g_.pool.checkin(slot);
      throw;
    }
  }

  bool capture_slot(GraphSlot& slot, const GraphKey& key, const at::Tensor& x) {
    const auto problem = [&](const GraphSlot& s) -> std::string {
      if (s.output.defined() && s.output.dim() > 0 && s.output.size(0) == key.rows &&
          s.output.device() == s.input.device())
        return "";
      return "the model returned " + describe_tensor(s.output) + " for " +
             describe_tensor(s.input) +
             "; graphs need one output row per input row on the input's device, so calls run "
             "eagerly";
    };
    return g_.capture(slot, key, x, g_.model, problem, failed_, "calls run eagerly");
  }

  GraphContext& g_;
  const RowBuckets buckets_;
  const std::string oversize_reason_;  // made once: calls may hit it again and again
  std::atomic<bool> failed_{false};    // the model cannot be captured: eager for good
};

// Fused calls (call_each, warm_up_each): n same-shaped calls replay as graphs of 1, 2, 4 ...
// max_fused_calls separate forwards, gathered in with one copy and copied out with one.
class FusedReplay {
 public:
  FusedReplay(GraphContext& g, RowReplay& rows, std::vector<int64_t> call_buckets)
      : g_(g), rows_(rows), call_buckets_(std::move(call_buckets)) {}

  std::vector<at::Tensor> call_each(c10::ArrayRef<at::Tensor> xs) {
    std::vector<at::Tensor> out(xs.size());
    // Calls of one shape, in order; the few shapes of a batch are found by a linear search.
    c10::SmallVector<c10::SmallVector<std::size_t, 64>, 2> groups;
    for (std::size_t i = 0; i < xs.size(); ++i) {
      const at::Tensor& x = xs[i];
      // Elsewhere than the model's device (e.g. CPU inputs to a CUDA model), operator() copies
      // the input in: call_each's gather cannot.
      if (!usable() || !x.defined() || x.dim() == 0 || x.size(0) == 0 || x.device() != g_.device) {
        out[i] = rows_.call(x);
        continue;
      }
      auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& group) {
        const at::Tensor& y = xs[group.front()];
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
        const int64_t calls =
            *(std::upper_bound(call_buckets_.begin(), call_buckets_.end(), n) - 1);
        run(xs, c10::ArrayRef<std::size_t>(group.data() + done, static_cast<std::size_t>(calls)),
            out);
        done += static_cast<std::size_t>(calls);
      }
    }
    return out;
  }

  void warm_up_each(const at::Tensor& example) {
    if (!usable()) return;
    GraphContext::check_example(example, "warm_up_each");
    const c10::Stream stream = g_.current_stream();
    for (int64_t calls : call_buckets_) {
      const GraphKey key =
          GraphKey::like(example, stream, Replays::kFusedCalls, example.size(0), calls);
      const auto input = [&] { return at::cat(std::vector<at::Tensor>(calls, example), 0); };
      const auto capture = [&](GraphSlot& slot, const at::Tensor& x) {
        return capture_slot(slot, key, x);
      };
      if (!g_.warm_up_key(key, input, capture) || !usable()) return;
    }
  }

 private:
  bool usable() const { return g_.unavailable.empty() && !failed_.load(std::memory_order_acquire); }

  // Runs the calls `chunk` (indices into xs, one shape, a call bucket's count) as one replay
  // of a fused graph, or one by one where there is none.
  void run(c10::ArrayRef<at::Tensor> xs, c10::ArrayRef<std::size_t> chunk,
           std::vector<at::Tensor>& out) {
    const at::Tensor& first = xs[chunk.front()];
    const auto calls = static_cast<int64_t>(chunk.size());
    c10::SmallVector<at::Tensor, 64> parts;
    for (std::size_t i : chunk) parts.push_back(xs[i]);
    const GraphKey key =
        GraphKey::like(first, g_.current_stream(), Replays::kFusedCalls, first.size(0), calls);
    GraphSlot* slot = usable() ? g_.pool.checkout(key, g_.options.capture_on_first_use) : nullptr;
    if (slot != nullptr && !slot->graph) {
      try {
        if (!capture_slot(*slot, key, at::cat(parts, 0))) slot = nullptr;
      } catch (...) {
        g_.pool.discard(key, slot);  // the model threw in a warm-up run: one of the calls' errors
        throw;
      }
    }
    if (slot == nullptr) {  // no graph: as operator() would
      for (std::size_t i : chunk) out[i] = rows_.call(xs[i]);
      return;
    }
    try {
      if (calls == 1) {
        g_.engine->copy(slot->input, first);
      } else {
        at::cat_out(slot->input, parts, 0);
      }
      slot->graph->replay();
      const at::Tensor& static_out = slot->output;
      at::Tensor results = g_.engine->empty(static_out.sizes(), static_out.options());
      g_.engine->copy(results, static_out);
      g_.pool.checkin(slot);
      for (std::size_t k = 0; k < chunk.size(); ++k)
        out[chunk[k]] = results.select(0, static_cast<int64_t>(k));
      g_.replays.fetch_add(static_cast<std::uint64_t>(calls), std::memory_order_relaxed);
      g_.fused_replays.fetch_add(1, std::memory_order_relaxed);
    } catch (...) {
      g_.pool.checkin(slot);
      throw;
    }
  }

  bool capture_slot(GraphSlot& slot, const GraphKey& key, const at::Tensor& x) {
    const auto problem = [](const GraphSlot& s) -> std::string {
      if (s.output.device() == s.input.device()) return "";
      return "the model returned " + describe_tensor(s.output) + " for " +
             describe_tensor(s.input) +
             "; graphs need outputs on the input's device, so call_each() runs calls one by one";
    };
    return g_.capture(slot, key, x, fused_forward(key.calls, key.rows), problem, failed_,
                      "call_each() runs calls one by one");
  }

  // The forward a fused graph captures: `calls` forwards of `rows` rows each, their outputs
  // stacked into one static output (one slot per call).
  GraphedModel::Forward fused_forward(int64_t calls, int64_t rows) const {
    return [model = g_.model, calls, rows](const at::Tensor& in) {
      std::vector<at::Tensor> outs;
      outs.reserve(static_cast<std::size_t>(calls));
      for (int64_t i = 0; i < calls; ++i) outs.push_back(model(in.narrow(0, i * rows, rows)));
      return at::stack(outs, 0);
    };
  }

  GraphContext& g_;
  RowReplay& rows_;                          // where calls it cannot fuse go
  const std::vector<int64_t> call_buckets_;  // call counts it fuses
  std::atomic<bool> failed_{false};          // fused forwards cannot be captured: one by one
};

void check_graph_options(const GraphedModel::Forward& model, const GraphOptions& options) {
  if (!model) throw Error(ErrorCode::kInvalidArgument, "GraphedModel: the model is empty");
  if (options.warmup_runs < 1)
    throw Error(ErrorCode::kInvalidArgument, "GraphOptions.warmup_runs: expected at least 1, got " +
                                                 std::to_string(options.warmup_runs));
  if (options.max_graphs < 1)
    throw Error(ErrorCode::kInvalidArgument, "GraphOptions.max_graphs: expected at least 1, got 0");
}

}  // namespace

// A GraphedModel's state: the shared context and the two replay strategies over it.
struct GraphedModel::Impl {
  Impl(Forward m, c10::Device d, GraphOptions o, std::shared_ptr<detail::GraphEngine> e)
      : ctx((check_graph_options(m, o), std::move(m)), d, o, std::move(e)),
        rows(ctx, RowBuckets(graph_buckets(o))),
        fused(ctx, rows, fused_buckets(o)) {}

  ~Impl() {
    try {
      ctx.pool.release();
    } catch (...) {  // NOLINT(bugprone-empty-catch): a destructor must not throw
    }
  }

  GraphStats stats() const {
    GraphStats s;
    s.captured = ctx.captured.load();
    s.replays = ctx.replays.load();
    s.fused_replays = ctx.fused_replays.load();
    s.eager_runs = ctx.eager_runs.load();
    s.capture_failures = ctx.capture_failures.load();
    s.padded_rows = ctx.padded_rows.load();
    s.unavailable_reason = ctx.unavailable;
    s.graphs = ctx.pool.held();
    s.evictions = ctx.pool.evictions();
    s.last_fallback = ctx.pool.last_fallback();
    s.fallback_reasons = ctx.pool.fallback_reasons();
    return s;
  }

  GraphContext ctx;
  RowReplay rows;
  FusedReplay fused;
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
  return impl_->rows.call(x);
}

at::Tensor GraphedModel::call_rows(c10::ArrayRef<at::Tensor> parts) const {
  return impl_->rows.call_rows(parts);
}

std::vector<at::Tensor> GraphedModel::call_each(c10::ArrayRef<at::Tensor> xs) const {
  return impl_->fused.call_each(xs);
}

void GraphedModel::warm_up_each(const at::Tensor& example) const {
  impl_->fused.warm_up_each(example);
}

void GraphedModel::warm_up(const at::Tensor& example) const {
  impl_->rows.warm_up(example);
}

void GraphedModel::release() const {
  impl_->ctx.pool.release();
}
GraphStats GraphedModel::stats() const {
  return impl_->stats();
}
const std::vector<int64_t>& GraphedModel::buckets() const {
  return impl_->rows.buckets();
}
c10::Device GraphedModel::device() const {
  return impl_->ctx.device;
}

// GraphedMultiModel: a call's inputs packed as the bytes of each row side by side in one
// [rows, bytes] tensor, run through a GraphedModel's row replay whose model unpacks them, runs
// the model and packs its outputs the same way; the caller gets views into the packed output.
namespace {

// Segments start at multiples of this, so each reads back as its dtype without a copy.
constexpr int64_t kSegmentAlign = 16;

struct Segment {
  at::ScalarType dtype;
  c10::SmallVector<int64_t, 4> trailing;  // shape after dim 0
  int64_t offset = 0;                     // within a packed row, in bytes
  int64_t bytes = 0;
};

struct Packing {
  std::vector<Segment> segments;
  int64_t row_bytes = 0;
};

Packing packing_of(c10::ArrayRef<at::Tensor> ts) {
  Packing p;
  for (const at::Tensor& t : ts) {
    const c10::IntArrayRef trailing = t.sizes().slice(1);
    Segment s{t.scalar_type(), {trailing.begin(), trailing.end()}};
    s.bytes = static_cast<int64_t>(t.element_size()) * c10::multiply_integers(trailing);
    s.offset = p.row_bytes;
    p.row_bytes += (s.bytes + kSegmentAlign - 1) / kSegmentAlign * kSegmentAlign;
    p.segments.push_back(std::move(s));
  }
  return p;
}

// What a packing holds, as GraphKey::layout: per tensor its dtype, rank and trailing sizes.
using Layout = c10::SmallVector<int64_t, 8>;

Layout layout_of(const Packing& p) {
  Layout layout;
  for (const Segment& s : p.segments) {
    layout.push_back(static_cast<int64_t>(s.dtype));
    layout.push_back(static_cast<int64_t>(s.trailing.size()));
    layout.append(s.trailing.begin(), s.trailing.end());
  }
  return layout;
}

// Segment `s` of packed rows [rows, row_bytes]: a view as its dtype and shape.
at::Tensor segment_view(const at::Tensor& packed, const Segment& s) {
  c10::SmallVector<int64_t, 5> shape{packed.size(0)};
  shape.append(s.trailing.begin(), s.trailing.end());
  return packed.narrow(1, s.offset, s.bytes).view(s.dtype).view(shape);
}

// A call's inputs as packed, and the layout that keys their graphs and their outputs' packing.
struct PackedInputs {
  explicit PackedInputs(c10::ArrayRef<at::Tensor> xs)
      : packing(packing_of(xs)), layout(layout_of(packing)) {}
  Packing packing;
  Layout layout;
};

// The inputs of the packed call running on this thread (set around each call and warm-up):
// the packed model reads them, in eager runs and in captures alike, which run on the caller's
// thread.
thread_local const PackedInputs* current_inputs = nullptr;

class ScopedInputs {
 public:
  explicit ScopedInputs(const PackedInputs* p) : previous_(current_inputs) { current_inputs = p; }
  ~ScopedInputs() { current_inputs = previous_; }
  ScopedInputs(const ScopedInputs&) = delete;
  ScopedInputs& operator=(const ScopedInputs&) = delete;

 private:
  const PackedInputs* previous_;
};

// Thrown by the packed model for outputs it cannot pack: the call then runs the model eagerly.
class NotRowWise : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace

struct GraphedMultiModel::State {
  State(Forward m, c10::Device d, GraphOptions o, std::shared_ptr<detail::GraphEngine> e)
      : model((check_model(m), std::move(m))),
        impl(std::make_shared<GraphedModel::Impl>(
            [this](const at::Tensor& packed) { return run_packed(packed); }, d, std::move(o),
            std::move(e))) {}

  static void check_model(const Forward& m) {
    if (!m) throw Error(ErrorCode::kInvalidArgument, "GraphedMultiModel: the model is empty");
  }

  // Whether `xs` can be packed: the same rows (>= 1) each, on the model's device.
  bool packable(const std::vector<at::Tensor>& xs) const {
    if (xs.empty()) return false;
    for (const at::Tensor& x : xs)
      if (!x.defined() || x.dim() == 0 || x.size(0) == 0 || x.size(0) != xs.front().size(0) ||
          x.device() != impl->ctx.device)
        return false;
    return true;
  }

  // The packed model: unpack the inputs, run the model, pack its outputs (and note how).
  at::Tensor run_packed(const at::Tensor& packed) {
    const PackedInputs& in = *current_inputs;
    std::vector<at::Tensor> xs;
    xs.reserve(in.packing.segments.size());
    for (const Segment& s : in.packing.segments) xs.push_back(segment_view(packed, s).contiguous());
    const std::vector<at::Tensor> ys = model(xs);
    const int64_t rows = packed.size(0);
    for (std::size_t i = 0; i < ys.size(); ++i)
      if (!ys[i].defined() || ys[i].dim() == 0 || ys[i].size(0) != rows)
        throw NotRowWise("the model returned " + describe_tensor(ys[i]) + " as output " +
                         std::to_string(i) + " for inputs of " + std::to_string(rows) +
                         " rows; graphs need one output row per input row, so calls run eagerly");
    if (ys.empty())
      throw NotRowWise(
          "the model returned no outputs; graphs need at least one, so calls run "
          "eagerly");
    Packing out = packing_of(ys);
    at::Tensor result = at::empty({rows, out.row_bytes}, packed.options());
    for (std::size_t i = 0; i < ys.size(); ++i) segment_view(result, out.segments[i]).copy_(ys[i]);
    std::lock_guard lock(mu);
    outputs.try_emplace(in.layout, std::move(out));
    return result;
  }

  // Writes `xs` into packed rows `dst` on the current stream.
  void gather(const at::Tensor& dst, const PackedInputs& in, const std::vector<at::Tensor>& xs) {
    for (std::size_t i = 0; i < xs.size(); ++i)
      impl->ctx.engine->copy(segment_view(dst, in.packing.segments[i]), xs[i]);
  }

  at::Tensor packed_copy(const PackedInputs& in, const std::vector<at::Tensor>& xs) {
    at::Tensor packed = impl->ctx.engine->empty({xs.front().size(0), in.packing.row_bytes},
                                                xs.front().options().dtype(at::kByte));
    gather(packed, in, xs);
    return packed;
  }

  std::vector<at::Tensor> call(const std::vector<at::Tensor>& xs) {
    GraphContext& g = impl->ctx;
    if (not_row_wise.load(std::memory_order_acquire) || !packable(xs)) {
      g.eager_runs.fetch_add(1, std::memory_order_relaxed);
      return model(xs);
    }
    const PackedInputs in(xs);
    const ScopedInputs scope(&in);
    at::Tensor out;
    try {
      GraphKey key{g.current_stream(), at::kByte, {in.packing.row_bytes}, Replays::kRows, 0};
      key.layout = in.layout;
      out = impl->rows.call_gathered(
          std::move(key), xs.front().size(0), [&](const at::Tensor& dst) { gather(dst, in, xs); },
          [&] { return packed_copy(in, xs); });
    } catch (const NotRowWise& e) {
      not_row_wise.store(true, std::memory_order_release);
      g.pool.fallback(e.what());
      g.eager_runs.fetch_add(1, std::memory_order_relaxed);
      return model(xs);
    }
    std::vector<at::Tensor> result;
    std::lock_guard lock(mu);
    const Packing& packing = outputs.at(in.layout);
    result.reserve(packing.segments.size());
    for (const Segment& s : packing.segments) result.push_back(segment_view(out, s));
    return result;
  }

  void warm_up(const std::vector<at::Tensor>& example) {
    if (!packable(example))
      throw Error(
          ErrorCode::kInvalidArgument,
          "GraphedMultiModel::warm_up: expected tensors of the same rows (at least one) on " +
              impl->ctx.device.str() + ", got " + describe_tensors(example));
    if (not_row_wise.load(std::memory_order_acquire)) return;
    const PackedInputs in(example);
    const ScopedInputs scope(&in);
    try {
      impl->rows.warm_up(packed_copy(in, example), in.layout);
    } catch (const NotRowWise& e) {
      not_row_wise.store(true, std::memory_order_release);
      impl->ctx.pool.fallback(e.what());
    }
  }

  const Forward model;
  std::mutex mu;
  // How the model's outputs are packed, by the layout of the inputs (guarded by mu).
  std::map<Layout, Packing> outputs;
  std::atomic<bool> not_row_wise{false};  // outputs cannot be packed: eager for good
  // Last: its model refers to this state.
  std::shared_ptr<GraphedModel::Impl> impl;
};

GraphedMultiModel::GraphedMultiModel(Forward model, c10::Device device, GraphOptions options)
    : state_(std::make_shared<State>(std::move(model), device, std::move(options),
                                     detail::default_graph_engine())) {}

GraphedMultiModel make_graphed_multi_model_with_engine(
    GraphedMultiModel::Forward model, c10::Device device, GraphOptions options,
    std::shared_ptr<detail::GraphEngine> engine) {
  return GraphedMultiModel(std::make_shared<GraphedMultiModel::State>(
      std::move(model), device, std::move(options), std::move(engine)));
}

std::vector<at::Tensor> GraphedMultiModel::operator()(const std::vector<at::Tensor>& inputs) const {
  return state_->call(inputs);
}
void GraphedMultiModel::warm_up(const std::vector<at::Tensor>& example) const {
  state_->warm_up(example);
}
void GraphedMultiModel::release() const {
  state_->impl->ctx.pool.release();
}
GraphStats GraphedMultiModel::stats() const {
  return state_->impl->stats();
}
const std::vector<int64_t>& GraphedMultiModel::buckets() const {
  return state_->impl->rows.buckets();
}
c10::Device GraphedMultiModel::device() const {
  return state_->impl->ctx.device;
}

}  // namespace syncbatch
