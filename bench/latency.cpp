// latency: open-loop arrivals (Poisson, at fixed rates) into BatchedSubmitter, for each policy.
// Latency is measured from each request's scheduled arrival to its completion, so a submitter
// that falls behind is charged for the backlog (no coordinated omission). Prints p50/p99/p999,
// the achieved throughput and the mean batch size.
#include <cstdio>

#include "flags.hpp"
#include "load.hpp"
#include "mlp.hpp"
#include "report.hpp"
#include "timing.hpp"

using namespace syncbatch;
using namespace syncbatch::bench;

int main(int argc, char** argv) {
  const Flags flags(
      argc, argv, "latency: open-loop Poisson arrivals, each policy",
      {{"device", "auto"},
       {"rates", "1000,10000,50000"},
       {"seconds", "1"},
       {"policies", "every:1,every:16,every:256,time:200us:256,time:1ms:256,adaptive:2ms"},
       {"mode", "stacked"},
       {"layers", "3"},
       {"width", "256"},
       {"sync", "event"},
       {"json", ""}});
  pin_threads();
  const c10::Device device = device_flag(flags);
  const SyncMode mode = sync_flag(flags.str("sync"));
  const int width = static_cast<int>(flags.num("width"));
  const bool stacked = flags.str("mode") == "stacked";
  if (!stacked && flags.str("mode") != "per-call")
    flags.fail("--mode: expected stacked or per-call, got '" + flags.str("mode") + "'");
  std::vector<SyncPolicy> policies;
  for (const std::string& p : flags.list("policies")) {
    try {
      policies.push_back(SyncPolicy::parse(p));
    } catch (const Error& e) {
      flags.fail(e.what());
    }
  }
  c10::InferenceMode inference;
  const Mlp mlp(static_cast<int>(flags.num("layers")), width, device);
  const at::Tensor x = at::randn({1, width}, at::TensorOptions().device(device));
  std::printf(
      "latency: open-loop Poisson arrivals, %d-layer MLP width %d, %s mode, %s, %s sync, "
      "LibTorch %s, %.1f s per cell\n\n",
      static_cast<int>(flags.num("layers")), width, flags.str("mode").c_str(), device.str().c_str(),
      flags.str("sync").c_str(), TORCH_VERSION, flags.num("seconds"));
  std::printf(
      "| policy | offered req/s | achieved req/s | p50 us | p99 us | p999 us | mean batch |\n"
      "|---|--:|--:|--:|--:|--:|--:|\n");
  JsonRows json;
  for (const SyncPolicy& policy : policies) {
    using Submitter = BatchedSubmitter<at::Tensor, at::Tensor, TorchBackend>;
    const SubmitterOptions options{.queue_capacity = 1 << 16, .policy = policy};
    auto submitter =
        stacked ? std::make_unique<Submitter>(
                      make_stacked_model([&](const at::Tensor& in) { return mlp(in); }), options,
                      TorchBackend(device, {.mode = mode}))
                : std::make_unique<Submitter>([&](at::Tensor& in) { return mlp(in); }, options,
                                              TorchBackend(device, {.mode = mode}));
    for (int i = 0; i < 200; ++i) submitter->submit(x).get();  // warm-up
    for (int rate : flags.ints("rates")) {
      const auto before = submitter->stats();
      OpenLoop run = open_loop(*submitter, x, rate, flags.num("seconds"), 42);
      if (run.errors != 0) {
        std::fprintf(stderr, "error: %zu requests failed at %d req/s\n", run.errors, rate);
        return 1;
      }
      const auto after = submitter->stats();
      Samples& lat = run.latencies;
      const double achieved = run.achieved;
      const double mean_batch = static_cast<double>(after.completed - before.completed) /
                                std::max<std::uint64_t>(1, after.batches - before.batches);
      const double p50 = lat.percentile_us(0.5), p99 = lat.percentile_us(0.99),
                   p999 = lat.percentile_us(0.999);
      std::printf("| %s | %d | %.0f | %.0f | %.0f | %.0f | %.1f |\n", policy.describe().c_str(),
                  rate, achieved, p50, p99, p999, mean_batch);
      std::fflush(stdout);
      json.row()
          .set("policy", policy.describe())
          .set("offered", rate)
          .set("achieved", achieved)
          .set("p50_us", p50)
          .set("p99_us", p99)
          .set("p999_us", p999)
          .set("mean_batch", mean_batch);
    }
  }
  json.write(flags.str("json"),
             meta_json(device, {{"bench", "latency"}, {"mode", flags.str("mode")}}));
  return 0;
}
