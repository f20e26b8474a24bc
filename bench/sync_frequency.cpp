// sync_frequency: the seed table (ops/s when syncing every N ops) for the 1-layer and 3-layer
// MLP, device and event sync, measured three ways side by side: a hand-written loop, SyncScope,
// and BatchedSubmitter in per-call mode; where CUDA graphs run, also per-call mode replaying a
// graph per request (GraphedModel) and replaying each batch's calls fused into a few graphs
// (make_fused_calls_model), against the GPU's own limit (64 forwards in one graph).
// Each cell is the median of --reps interleaved runs.
#include <cstdio>
#include <optional>

#include "flags.hpp"
#include "load.hpp"
#include "mlp.hpp"
#include "report.hpp"
#include "timing.hpp"

using namespace syncbatch;
using namespace syncbatch::bench;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const Flags flags(argc, argv,
                    "sync_frequency: ops/s syncing every N ops: raw loop vs SyncScope vs "
                    "BatchedSubmitter (per-call)",
                    {{"device", "auto"},
                     {"every", "1,2,4,8,16,32,64,128,256"},
                     {"layers", "1,3"},
                     {"sync", "device,event"},
                     {"ops", "4096"},
                     {"reps", "3"},
                     {"width", "256"},
                     {"graphs", "auto"},
                     {"json", ""}});
  pin_threads();
  const c10::Device device = device_flag(flags);
  const int ops = static_cast<int>(flags.num("ops"));
  const int reps = std::max(1, static_cast<int>(flags.num("reps")));
  const int width = static_cast<int>(flags.num("width"));
  const std::vector<std::string> modes = flags.list("sync");
  const bool graphs = graphs_flag(flags, device);
  c10::InferenceMode inference;
  JsonRows json;
  std::printf(
      "sync_frequency: MLP width %d, batch 1, %d ops per run, median of %d, %s, LibTorch %s\n",
      width, ops, reps, device.str().c_str(), TORCH_VERSION);
  for (int layers : flags.ints("layers")) {
    const Mlp mlp(layers, width, device);
    const at::Tensor x = at::randn({1, width}, at::TensorOptions().device(device));
    const GraphedModel graphed([&](const at::Tensor& in) { return mlp(in); }, device,
                               {.buckets = {1}, .max_fused_calls = 64});
    const double limit = graphs ? graph_limit(mlp, width, device, 1.0) : 0.0;
    if (graphs)
      std::printf("\n%d-layer: GPU limit, 64 batch-1 forwards in one graph: %.0f ops/s\n", layers,
                  limit);
    for (const std::string& mode_name : modes) {
      const SyncMode mode = sync_flag(mode_name);
      BatchedSubmitter<at::Tensor, at::Tensor, TorchBackend>* submitter = nullptr;
      auto time_ops = [&](auto&& body) {
        const auto start = Clock::now();
        body();
        return ops / std::chrono::duration<double>(Clock::now() - start).count();
      };
      auto raw = [&](std::size_t n) {
        DeviceSync sync(device, mode);
        return time_ops([&] {
          for (int i = 0; i < ops; ++i) {
            mlp(x);
            if ((i + 1) % n == 0) sync();
          }
          sync();
        });
      };
      // `op` in a loop, SyncScope deciding the syncs.
      auto scope_loop = [&](std::size_t n, auto&& op) {
        return time_ops([&] {
          SyncScope s(EveryN{n}, DeviceSync(device, mode));
          for (int i = 0; i < ops; ++i) {
            op();
            s.tick();
          }
          s.flush();
        });
      };
      auto scope = [&](std::size_t n) { return scope_loop(n, [&] { mlp(x); }); };
      auto submit = [&](std::size_t) {
        std::vector<Future<at::Tensor>> futures;
        futures.reserve(ops);
        return time_ops([&] {
          for (int i = 0; i < ops; ++i) futures.push_back(submitter->submit(x));
          for (auto& f : futures) f.get();
        });
      };
      std::printf("\n%d-layer, %s sync\n\n", layers, mode_name.c_str());
      std::printf(
          "| sync every | raw ops/s | speedup | SyncScope ops/s | scope/raw | submitter ops/s "
          "| submitter/raw |%s\n|--:|--:|--:|--:|--:|--:|--:|%s\n",
          graphs ? " graph ops/s | graph/submitter | fused graphs ops/s | fused/submitter | "
                   "fused/limit |"
                 : "",
          graphs ? "--:|--:|--:|--:|--:|" : "");
      double base = 0;
      for (int n : flags.ints("every")) {
        const auto every = static_cast<std::size_t>(n);
        BatchedSubmitter<at::Tensor, at::Tensor, TorchBackend> s(
            [&](at::Tensor& in) { return mlp(in); },
            {.queue_capacity = static_cast<std::size_t>(ops), .policy = EveryN{every}},
            TorchBackend(device, {.mode = mode}));
        // Per-call mode with graphs, two ways: one replay per request (operator()), and the
        // worker's batch of up to N calls fused into a few replays (call_each()).
        std::optional<BatchedSubmitter<at::Tensor, at::Tensor, TorchBackend>> g, fused;
        const SubmitterOptions graph_options{.queue_capacity = static_cast<std::size_t>(ops),
                                             .policy = EveryN{every}};
        if (graphs) {
          g.emplace(
              [&](at::Tensor& in) { return graphed(in); }, graph_options,
              TorchBackend(device, {.mode = mode, .on_worker_start = [&] { graphed.warm_up(x); }}));
          fused.emplace(make_fused_calls_model(graphed), graph_options,
                        TorchBackend(device, {.mode = mode, .on_worker_start = [&] {
                                                graphed.warm_up_each(x);
                                              }}));
        }
        submitter = &s;
        raw(every), scope(every), submit(every);  // warm-up
        std::vector<double> r, sc, su, gr, fu;
        for (int k = 0; k < reps; ++k) {
          r.push_back(raw(every));
          sc.push_back(scope(every));
          submitter = &s;
          su.push_back(submit(every));
          if (g) {
            submitter = &*g;
            gr.push_back(submit(every));
            submitter = &*fused;
            fu.push_back(submit(every));
          }
        }
        const double raw_ops = median(r), scope_ops = median(sc), sub_ops = median(su);
        const double graph_ops = g ? median(gr) : 0.0, fused_ops = g ? median(fu) : 0.0;
        if (base == 0) base = raw_ops;
        std::printf("| %d | %.0f | %.2fx | %.0f | %.3f | %.0f | %.3f |", n, raw_ops, raw_ops / base,
                    scope_ops, scope_ops / raw_ops, sub_ops, sub_ops / raw_ops);
        if (g)
          std::printf(" %.0f | %.2fx | %.0f | %.2fx | %.2f |", graph_ops, graph_ops / sub_ops,
                      fused_ops, fused_ops / sub_ops, fused_ops / limit);
        std::printf("\n");
        std::fflush(stdout);
        json.row()
            .set("layers", layers)
            .set("sync", mode_name)
            .set("every", n)
            .set("raw_ops", raw_ops)
            .set("scope_ops", scope_ops)
            .set("submitter_ops", sub_ops)
            .set("graph_ops", graph_ops)
            .set("fused_graph_ops", fused_ops)
            .set("graph_limit_ops", limit);
      }
    }
  }
  json.write(flags.str("json"),
             meta_json(device, {{"bench", "sync_frequency"}, {"width", flags.num("width")}}));
  return 0;
}
