// real_models: TorchScript models served as a new user would, batch-1 closed-loop clients at
// each --clients count (blocking threads, and callbacks where each completion sends its client's
// next request): per-op sync (each client runs its own forward and syncs), stacked eager,
// stacked with batch (and length) buckets, stacked with CUDA graphs over the same buckets
// (GraphedModel for images, GraphedMultiModel for tokens, captured before serving), and the
// ideal: one client running pre-stacked batches of `clients` rows (padded to the longest for
// variable lengths). Ratios are printed from this one run.
//
// Models: --model FILE.pt, or FILE.pt2 for an AOTInductor package where the build has AotiModel
// (scripts/export_models writes resnet50.pt, bert.pt and resnet50_DEVICE.pt2) with --kind
// image (input [1, C, H, W] float, --shape C,H,W) or tokens (ids [1, L] int64 and a mask as the
// second input; outputs: per-token states first), or the built-in tiny-cnn / tiny-bert, scripted
// here, for quick runs. Tokens: --lengths L for a fixed length, or MIN:MAX for lengths uniform in
// [MIN, MAX].
#include <torch/csrc/jit/api/module.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "common/flags.hpp"
#include "common/load.hpp"
#include "common/report.hpp"
#include "common/timing.hpp"
#include "syncbatch/torch.hpp"
#ifdef SYNCBATCH_WITH_AOTI
#include "syncbatch/torch/aoti.hpp"
#endif

namespace {

using namespace syncbatch;
using namespace syncbatch::bench;

// A small module scripted and saved here, so that the benchmark runs without any export.
std::string script_builtin(const std::string& name) {
  const std::string path =
      (std::filesystem::temp_directory_path() / (name + "-" + std::to_string(::getpid()) + ".pt"))
          .string();
  torch::jit::Module m(name == "tiny-cnn" ? "TinyCnn" : "TinyBert");
  if (name == "tiny-cnn") {
    m.register_parameter("w", at::randn({16, 3, 3, 3}) * 0.1, false);
    m.register_parameter("fc", at::randn({16, 10}) * 0.1, false);
    m.define(R"(
def forward(self, x):
    h = torch.relu(torch.conv2d(x, self.w, None, [1, 1], [1, 1]))
    return torch.matmul(h.mean([2, 3]), self.fc)
)");
  } else {
    m.register_parameter("emb", at::randn({1000, 64}) * 0.1, false);
    m.register_parameter("w", at::randn({64, 64}) * 0.1, false);
    m.define(R"(
def forward(self, ids, mask):
    h = torch.tanh(torch.matmul(torch.embedding(self.emb, ids), self.w))
    m = mask.unsqueeze(-1).to(h.dtype)
    return h * m, (h * m).sum(1) / m.sum(1)
)");
  }
  m.save(path);
  return path;
}

// Runs `cell` on submitter `s` and prints where its workers' time went, per batch: the requests
// it held, launching (the model call), waiting for the device (sync), handing results over
// (complete), and the rest (taking requests and waiting for them to come).
template <class S, class F>
Cell profiled(S& s, const char* what, std::size_t workers, F&& cell) {
  const SubmitterStats a = s.stats();
  const auto start = std::chrono::steady_clock::now();
  Cell c = cell();
  const double worker_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() *
      static_cast<double>(workers);
  const SubmitterStats b = s.stats();
  const double batches = static_cast<double>(std::max<std::uint64_t>(1, b.batches - a.batches));
  const auto ms = [&](auto x, auto y) {
    return std::chrono::duration<double, std::milli>(x - y).count() / batches;
  };
  const double run = ms(b.run_time, a.run_time), sync = ms(b.sync_time, a.sync_time),
               complete = ms(b.complete_time, a.complete_time);
  std::printf(
      "  (%s: %.1f requests a batch; a worker's time per batch: run %.2f ms, sync %.2f, complete "
      "%.2f, other %.2f)\n",
      what, static_cast<double>(b.completed - a.completed) / batches, run, sync, complete,
      worker_ms / batches - run - sync - complete);
  return c;
}

struct Spec {
  bool tokens = false;
  std::vector<int64_t> shape;  // image: C, H, W
  int64_t min_len = 128, max_len = 128;
};

}  // namespace

int main(int argc, char** argv) {
  Flags flags(argc, argv,
              "real_models [--model tiny-cnn|tiny-bert|FILE.pt] [--kind image|tokens]\n"
              "  [--shape 3,224,224] [--lengths 128|16:128] [--device auto] [--clients 1,16,64]\n"
              "  [--seconds 2] [--warmup 0.5] [--graphs auto] [--optimizer off] [--max-padding 1]\n"
              "  [--workers 1] [--policy every:64] [--json PATH]",
              {{"model", "tiny-cnn"},
               {"kind", ""},
               {"shape", "3,224,224"},
               {"lengths", "128"},
               {"device", "auto"},
               {"clients", "1,16,64"},
               {"seconds", "2"},
               {"warmup", "0.5"},
               {"graphs", "auto"},
               {"optimizer", "off"},
               {"max-padding", "1"},
               {"workers", "1"},
               {"policy", "every:64"},
               {"json", ""}});
  pin_threads();
  const c10::Device device = device_flag(flags);
  const std::string name = flags.str("model");
  const bool builtin = name == "tiny-cnn" || name == "tiny-bert";
  Spec spec;
  spec.tokens = flags.str("kind").empty() ? name == "tiny-bert" : flags.str("kind") == "tokens";
  if (name == "tiny-cnn") {
    spec.shape = {3, 32, 32};
  } else {
    for (int v : flags.ints("shape")) spec.shape.push_back(v);
  }
  {
    const std::string l = flags.str("lengths");
    const auto colon = l.find(':');
    spec.min_len = std::stoll(l.substr(0, colon));
    spec.max_len = colon == std::string::npos ? spec.min_len : std::stoll(l.substr(colon + 1));
    if (spec.min_len < 1 || spec.max_len < spec.min_len)
      flags.fail("--lengths: expected L or MIN:MAX with 1 <= MIN <= MAX, got '" + l + "'");
  }
  const std::string path = builtin ? script_builtin(name) : name;
  // The model as two calls: one tensor in and out, and a list (tokens: ids and mask).
  std::function<at::Tensor(const at::Tensor&)> single;
  std::function<Tensors(const Tensors&)> multi;
  if (path.size() > 4 && path.compare(path.size() - 4, 4, ".pt2") == 0) {
#ifdef SYNCBATCH_WITH_AOTI
    const AotiModel aoti(path, {.num_runners = 1, .device = device});
    single = aoti;
    multi = [aoti](const Tensors& in) { return aoti.call(in); };
#else
    flags.fail("--model " + path + ": this LibTorch has no AOTInductor loader (AotiModel)");
#endif
  } else {
    const TorchScriptModel ts(
        path, {.device = device, .graph_optimizer = flags.str("optimizer") == "on"});
    single = ts;
    multi = [ts](const Tensors& in) { return ts.call(in); };
  }
  if (builtin) std::filesystem::remove(path);
  const bool graphs = graphs_flag(flags, device);
  const double seconds = flags.num("seconds"), warmup = flags.num("warmup");
  const double max_padding = flags.num("max-padding");
  const double workers_flag = flags.num("workers");
  if (workers_flag < 1 || workers_flag != std::floor(workers_flag))
    flags.fail("--workers: expected a whole number of at least 1, got " + flags.str("workers"));
  const auto workers = static_cast<std::size_t>(workers_flag);
  SyncPolicy policy = EveryN{64};
  try {
    policy = SyncPolicy::parse(flags.str("policy"));
  } catch (const Error& e) {
    flags.fail(std::string("--policy: ") + e.what());
  }
  const auto opts = at::TensorOptions().device(device);

  // Each client's request: an image, or token ids of its length.
  std::mt19937 rng(1);
  auto request = [&](int) {
    if (!spec.tokens) {
      std::vector<int64_t> shape{1};
      shape.insert(shape.end(), spec.shape.begin(), spec.shape.end());
      return Tensors{at::randn(shape, opts)};
    }
    const int64_t len = std::uniform_int_distribution<int64_t>(spec.min_len, spec.max_len)(rng);
    return Tensors{at::randint(1, 1000, {1, len}, opts.dtype(at::kLong))};
  };
  // The model on a request list, tokens getting their all-ones mask.
  auto run = [&](const Tensors& in) {
    if (!spec.tokens) return Tensors{single(in[0])};
    return multi({in[0], at::ones_like(in[0])});
  };

  std::printf(
      "real_models: %s (%s) on %s, graph optimizer %s%s, max_padding %.2f, %s worker(s), %s\n\n",
      name.c_str(), spec.tokens ? "tokens" : "image", device.str().c_str(),
      flags.str("optimizer").c_str(),
      spec.tokens ? (", lengths " + flags.str("lengths")).c_str() : "", max_padding,
      flags.str("workers").c_str(), policy.describe().c_str());
  std::printf(
      "| clients | per-op sync | stacked | stacked + buckets | buckets, callbacks | stacked + "
      "graphs | graphs, callbacks | ideal | buckets / per-op | buckets / ideal | graphs / ideal "
      "|\n|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
  JsonRows json;
  const RowBuckets batch_buckets = RowBuckets::powers_of_two(64);
  // Length buckets for variable lengths (multiples of 16); none for a fixed length.
  const RowBuckets length_buckets =
      spec.tokens && spec.min_len != spec.max_len
          ? RowBuckets::multiples_of(16, std::max<int64_t>(16, spec.max_len))
          : RowBuckets();
  using Stacked = BatchedSubmitter<Tensors, Tensors, TorchBackend>;
  // Workers > 1: one batch forms and launches while another runs (each worker on its stream).
  // The policy's batch limit should match the largest batch bucket (64).
  const SubmitterOptions submitter_options{
      .queue_capacity = 4096, .workers = workers, .policy = policy};
  // Graphs are per stream: every worker's buckets (and length buckets) held at once.
  const std::size_t max_graphs = workers * batch_buckets.sizes().size() *
                                 std::max<std::size_t>(1, length_buckets.sizes().size());
  // Options of stacked mode over the multi-tensor seam (one input for images).
  auto stacking = [&](StackingOptions options) {
    options.device = device;
    if (spec.tokens) {
      options.expect = {{at::kLong, {kVaries}}};
      options.cut_outputs = {{.output = 0, .dim = 1, .input = 0, .input_dim = 1}};
      options.length_input = LengthInput::kMask;
      options.max_padding = max_padding;
    }
    return options;
  };
  const StackingOptions bucketed_options{.batch_buckets = batch_buckets,
                                         .length_buckets = length_buckets};
  for (int clients : flags.ints("clients")) {
    std::vector<Tensors> inputs;
    for (int c = 0; c < clients; ++c) inputs.push_back(request(c));
    const Cell per_op = closed_loop(clients, warmup, seconds, [&](int t) {
      return [&, t, stream = std::make_shared<OwnStream>(device),
              sync = std::make_shared<DeviceSync>(device)] {
        run(inputs[t]);
        (*sync)();
      };
    });
    // Blocking client threads, or callbacks (each completion sends its client's next request).
    auto threads_cell = [&](auto& s) {
      return closed_loop(clients, warmup, seconds, [&](int t) {
        return [&, t] { s.submit(typename std::decay_t<decltype(s)>::Input(inputs[t])).get(); };
      });
    };
    auto eager_model = [&](const Tensors& in) { return spec.tokens ? multi(in) : run(in); };
    Cell stacked, bucketed, bucketed_cb;
    {
      Stacked s(make_stacked_model_multi(eager_model, stacking({})), submitter_options,
                TorchBackend(device));
      stacked = threads_cell(s);
    }
    {
      Stacked s(make_stacked_model_multi(eager_model, stacking(bucketed_options)),
                submitter_options, TorchBackend(device));
      bucketed = profiled(s, "buckets", workers, [&] { return threads_cell(s); });
      bucketed_cb = profiled(s, "buckets, callbacks", workers,
                             [&] { return callback_loop(s, inputs, clients, warmup, seconds); });
    }
    // Graphs: every bucket (and length bucket) captured before serving. Images through
    // GraphedModel, which gathers the rows straight into its static input; tokens through
    // GraphedMultiModel (ids and mask in, both outputs out).
    Cell graphed, graphed_cb;
    std::string graph_note;
    if (graphs && !spec.tokens) {
      GraphedModel model(single, device,
                         {.max_rows = 64, .capture_on_first_use = false, .max_graphs = max_graphs});
      const at::Tensor example = inputs.front()[0];
      BatchedSubmitter<at::Tensor, at::Tensor, TorchBackend> s(
          make_stacked_model(model, {.device = device}), submitter_options,
          TorchBackend(device, {.on_worker_start = [&] { model.warm_up(example); }}));
      std::vector<at::Tensor> images;
      for (const auto& in : inputs) images.push_back(in[0]);
      graphed = profiled(s, "graphs", workers, [&] {
        return closed_loop(clients, warmup, seconds, [&](int t) {
          return [&, t] { s.submit(at::Tensor(images[t])).get(); };
        });
      });
      graphed_cb = profiled(s, "graphs, callbacks", workers,
                            [&] { return callback_loop(s, images, clients, warmup, seconds); });
      graph_note = model.stats().last_fallback;
    } else if (graphs) {
      GraphedMultiModel model(
          multi, device, {.max_rows = 64, .capture_on_first_use = false, .max_graphs = max_graphs});
      std::vector<int64_t> lengths = length_buckets.sizes();
      if (lengths.empty()) lengths = {spec.max_len};
      Stacked s(make_stacked_model_multi(model, stacking(bucketed_options)), submitter_options,
                TorchBackend(device, {.on_worker_start = [&] {
                               for (int64_t len : lengths) {
                                 const at::Tensor ids = at::ones({1, len}, opts.dtype(at::kLong));
                                 model.warm_up({ids, ids});
                               }
                             }}));
      graphed = profiled(s, "graphs", workers, [&] { return threads_cell(s); });
      graphed_cb = profiled(s, "graphs, callbacks", workers,
                            [&] { return callback_loop(s, inputs, clients, warmup, seconds); });
      const GraphStats g = model.stats();
      graph_note = g.last_fallback;
      std::printf("  (graphs: %llu captured, %llu held, %llu evicted, %llu eager runs)\n",
                  static_cast<unsigned long long>(g.captured),
                  static_cast<unsigned long long>(g.graphs),
                  static_cast<unsigned long long>(g.evictions),
                  static_cast<unsigned long long>(g.eager_runs));
    }
    if (!graph_note.empty()) std::printf("  (graphs fell back: %s)\n", graph_note.c_str());
    // Ideal: one thread, the clients' requests pre-stacked (padded to the longest), one sync.
    std::vector<at::Tensor> rows;
    int64_t longest = 0;
    for (const auto& in : inputs) longest = std::max(longest, in[0].dim() > 1 ? in[0].size(1) : 0);
    for (const auto& in : inputs)
      rows.push_back(spec.tokens ? at::constant_pad_nd(in[0], {0, longest - in[0].size(1)}, 0)
                                 : in[0]);
    const Tensors batch{at::cat(rows, 0)};
    const Cell ideal = closed_loop(
        1, warmup, seconds,
        [&](int) {
          return [&, sync = std::make_shared<DeviceSync>(device)] {
            run(batch);
            (*sync)();
          };
        },
        clients);
    const auto rate = [](const Cell& c) { return std::to_string(std::lround(c.ops_per_s)); };
    const double best_graphs = std::max(graphed.ops_per_s, graphed_cb.ops_per_s);
    std::printf("| %d | %.0f | %.0f | %.0f | %.0f | %s | %s | %.0f | %.2fx | %.2f | %s |\n",
                clients, per_op.ops_per_s, stacked.ops_per_s, bucketed.ops_per_s,
                bucketed_cb.ops_per_s, graphs ? rate(graphed).c_str() : "-",
                graphs ? rate(graphed_cb).c_str() : "-", ideal.ops_per_s,
                bucketed.ops_per_s / per_op.ops_per_s, bucketed.ops_per_s / ideal.ops_per_s,
                graphs ? std::to_string(best_graphs / ideal.ops_per_s).substr(0, 4).c_str() : "-");
    std::fflush(stdout);
    json.row()
        .set("clients", clients)
        .set("per_op", per_op.ops_per_s)
        .set("stacked", stacked.ops_per_s)
        .set("stacked_buckets", bucketed.ops_per_s)
        .set("stacked_buckets_callbacks", bucketed_cb.ops_per_s)
        .set("stacked_graphs", graphed.ops_per_s)
        .set("stacked_graphs_callbacks", graphed_cb.ops_per_s)
        .set("ideal", ideal.ops_per_s)
        .set("stacked_p99_us", stacked.p99_us)
        .set("buckets_p99_us", bucketed.p99_us);
  }
  json.write(flags.str("json"), meta_json(device, {{"model", name},
                                                   {"kind", spec.tokens ? "tokens" : "image"},
                                                   {"lengths", flags.str("lengths")},
                                                   {"optimizer", flags.str("optimizer")},
                                                   {"workers", flags.str("workers")},
                                                   {"policy", policy.describe()},
                                                   {"max_padding", flags.str("max-padding")}}));
  return 0;
}
