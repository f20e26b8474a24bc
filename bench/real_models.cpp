// real_models: TorchScript models served as a new user would, batch-1 closed-loop client threads
// at each --clients count: per-op sync (each client runs its own forward and syncs), stacked
// eager, stacked with batch (and length) buckets, stacked with CUDA graphs (image models), and
// the ideal: one client running pre-stacked batches of `clients` rows (padded to the longest for
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
              "  [--seconds 2] [--warmup 0.5] [--graphs auto] [--optimizer off] [--json PATH]",
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
  const bool graphs = !spec.tokens && graphs_flag(flags, device);
  const double seconds = flags.num("seconds"), warmup = flags.num("warmup");
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

  std::printf("real_models: %s (%s) on %s, graph optimizer %s%s\n\n", name.c_str(),
              spec.tokens ? "tokens" : "image", device.str().c_str(),
              flags.str("optimizer").c_str(),
              spec.tokens ? (", lengths " + flags.str("lengths")).c_str() : "");
  std::printf(
      "| clients | per-op sync | stacked | stacked + buckets | stacked + graphs | ideal | "
      "stacked / per-op | buckets / per-op | buckets / ideal | graphs / ideal |\n"
      "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
  JsonRows json;
  const RowBuckets batch_buckets = RowBuckets::powers_of_two(64);
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
    // Stacked submitters over the multi-tensor seam (one input for images).
    auto stacked_cell = [&](StackingOptions options) {
      options.device = device;
      if (spec.tokens) {
        options.expect = {{at::kLong, {kVaries}}};
        options.cut_outputs = {{.output = 0, .dim = 1, .input = 0, .input_dim = 1}};
        options.length_input = LengthInput::kMask;
      }
      BatchedSubmitter<Tensors, Tensors, TorchBackend> s(
          make_stacked_model_multi(
              [&](const Tensors& in) { return spec.tokens ? multi(in) : run(in); },
              std::move(options)),
          {.queue_capacity = 4096, .policy = EveryN{64}}, TorchBackend(device));
      return closed_loop(clients, warmup, seconds,
                         [&](int t) { return [&, t] { s.submit(Tensors(inputs[t])).get(); }; });
    };
    const Cell stacked = stacked_cell({});
    StackingOptions with_buckets{.batch_buckets = batch_buckets};
    if (spec.tokens && spec.min_len != spec.max_len)
      with_buckets.length_buckets =
          RowBuckets::multiples_of(16, std::max<int64_t>(16, spec.max_len));
    const Cell bucketed = stacked_cell(with_buckets);
    Cell graphed_cell;
    if (graphs) {
      GraphedModel graphed(single, device, {.max_rows = 64});
      BatchedSubmitter<at::Tensor, at::Tensor, TorchBackend> s(
          make_stacked_model(graphed, {.device = device}),
          {.queue_capacity = 4096, .policy = EveryN{64}}, TorchBackend(device));
      graphed_cell = closed_loop(clients, warmup, seconds, [&](int t) {
        return [&, t] { s.submit(at::Tensor(inputs[t][0])).get(); };
      });
    }
    // Ideal: one thread, the clients' requests pre-stacked (padded to the longest), one sync.
    Tensors batch;
    if (spec.tokens) {
      int64_t longest = 0;
      for (const auto& in : inputs) longest = std::max(longest, in[0].size(1));
      std::vector<at::Tensor> rows;
      for (const auto& in : inputs)
        rows.push_back(at::constant_pad_nd(in[0], {0, longest - in[0].size(1)}, 0));
      batch = {at::cat(rows, 0)};
    } else {
      std::vector<at::Tensor> rows;
      for (const auto& in : inputs) rows.push_back(in[0]);
      batch = {at::cat(rows, 0)};
    }
    const Cell ideal = closed_loop(
        1, warmup, seconds,
        [&](int) {
          return [&, sync = std::make_shared<DeviceSync>(device)] {
            run(batch);
            (*sync)();
          };
        },
        clients);
    std::printf("| %d | %.0f | %.0f | %.0f | %s | %.0f | %.2fx | %.2fx | %.2f | %s |\n", clients,
                per_op.ops_per_s, stacked.ops_per_s, bucketed.ops_per_s,
                graphs ? std::to_string(static_cast<long>(graphed_cell.ops_per_s)).c_str() : "-",
                ideal.ops_per_s, stacked.ops_per_s / per_op.ops_per_s,
                bucketed.ops_per_s / per_op.ops_per_s, bucketed.ops_per_s / ideal.ops_per_s,
                graphs
                    ? std::to_string(graphed_cell.ops_per_s / ideal.ops_per_s).substr(0, 4).c_str()
                    : "-");
    std::fflush(stdout);
    json.row()
        .set("clients", clients)
        .set("per_op", per_op.ops_per_s)
        .set("stacked", stacked.ops_per_s)
        .set("stacked_buckets", bucketed.ops_per_s)
        .set("stacked_graphs", graphed_cell.ops_per_s)
        .set("ideal", ideal.ops_per_s)
        .set("stacked_p99_us", stacked.p99_us)
        .set("buckets_p99_us", bucketed.p99_us);
  }
  json.write(flags.str("json"), meta_json(device, {{"model", name},
                                                   {"kind", spec.tokens ? "tokens" : "image"},
                                                   {"lengths", flags.str("lengths")},
                                                   {"optimizer", flags.str("optimizer")}}));
  return 0;
}
