// latency: open-loop arrivals (Poisson, at fixed rates) into BatchedSubmitter, for each policy.
// Latency is measured from each request's scheduled arrival to its completion, so a submitter
// that falls behind is charged for the backlog (no coordinated omission). Prints p50/p99/p999,
// the achieved throughput and the mean batch size.
#include <cstdio>
#include <random>

#include "bench_common.hpp"

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
  {
    std::stringstream s(flags.str("policies"));
    for (std::string p; std::getline(s, p, ',');) {
      try {
        policies.push_back(SyncPolicy::parse(p));
      } catch (const Error& e) {
        flags.fail(e.what());
      }
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
      const auto n = static_cast<std::size_t>(rate * flags.num("seconds"));
      std::vector<Clock::time_point> scheduled(n), finished(n);
      std::atomic<std::size_t> done{0};
      std::mt19937_64 rng(42);
      std::exponential_distribution<double> gap(rate);
      const auto before = submitter->stats();
      auto t = Clock::now();
      for (std::size_t i = 0; i < n; ++i) {
        t += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(gap(rng)));
        scheduled[i] = t;
        while (Clock::now() < t) {
        }
        submitter->submit_then(at::Tensor(x), [&, i](std::exception_ptr e, at::Tensor) {
          if (e) std::abort();
          finished[i] = Clock::now();
          done.fetch_add(1, std::memory_order_release);
        });
      }
      while (done.load(std::memory_order_acquire) < n) std::this_thread::yield();
      const auto after = submitter->stats();
      Samples lat;
      for (std::size_t i = 0; i < n; ++i) lat.add(finished[i] - scheduled[i]);
      const double span =
          std::chrono::duration<double>(*std::max_element(finished.begin(), finished.end()) -
                                        scheduled.front())
              .count();
      const double mean_batch = static_cast<double>(after.completed - before.completed) /
                                std::max<std::uint64_t>(1, after.batches - before.batches);
      const double p50 = lat.percentile_us(0.5), p99 = lat.percentile_us(0.99),
                   p999 = lat.percentile_us(0.999);
      std::printf("| %s | %d | %.0f | %.0f | %.0f | %.0f | %.1f |\n", policy.describe().c_str(),
                  rate, n / span, p50, p99, p999, mean_batch);
      std::fflush(stdout);
      json.row()
          .set("policy", policy.describe())
          .set("offered", rate)
          .set("achieved", n / span)
          .set("p50_us", p50)
          .set("p99_us", p99)
          .set("p999_us", p999)
          .set("mean_batch", mean_batch);
    }
  }
  json.write(flags.str("json"),
             meta_json(device, "\"bench\": \"latency\", \"mode\": \"" + flags.str("mode") + "\""));
  return 0;
}
