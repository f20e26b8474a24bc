// adaptive_sweep: Adaptive against fixed EveryN and TimeBased settings, stacked mode, on several
// workloads and loads. For each cell it reports the best fixed setting whose p99 meets the
// target, and Adaptive's throughput relative to it (the bar: within 10%) and its p99.
//   closed-loop: C clients each waiting for its result; open-loop: Poisson arrivals at R req/s.
#include <cstdio>

#include "flags.hpp"
#include "load.hpp"
#include "mlp.hpp"
#include "report.hpp"
#include "timing.hpp"

using namespace syncbatch;
using namespace syncbatch::bench;

namespace {

struct Result {
  double rate = 0;  // requests/s achieved
  double p99_us = 0;
  double submitter_p99_us = 0;  // arrival to completion inside the submitter (recent window)
  double mean_batch = 0;
  double held_share = 0;  // batches whose worker held for more requests, of all batches
};

using Submitter = BatchedSubmitter<at::Tensor, at::Tensor, TorchBackend>;

Result closed(Submitter& s, const at::Tensor& x, int clients, double seconds) {
  const Cell c =
      closed_loop(clients, 0.2, seconds, [&](int) { return [&] { s.submit(x).get(); }; });
  return {c.ops_per_s, c.p99_us};
}

Result open(Submitter& s, const at::Tensor& x, double rate, double seconds) {
  OpenLoop run = open_loop(s, x, rate, seconds, 7);
  return {run.achieved, run.latencies.percentile_us(0.99)};
}

}  // namespace

int main(int argc, char** argv) {
  const Flags flags(argc, argv, "adaptive_sweep: Adaptive vs fixed policies, stacked mode",
                    {{"device", "auto"},
                     {"workloads", "1x256,3x256,3x2048"},
                     {"clients", "1,8,64"},
                     {"rates", "2000,20000"},
                     {"target-us", "2000"},
                     {"fixed", "every:1,every:8,every:64,every:256,time:100us:64,time:500us:256"},
                     {"seconds", "0.5"},
                     {"reps", "1"},
                     {"json", ""}});
  pin_threads();
  const c10::Device device = device_flag(flags);
  const double target_us = flags.num("target-us");
  const int reps = std::max(1, static_cast<int>(flags.num("reps")));
  std::vector<SyncPolicy> fixed;
  for (const std::string& p : flags.list("fixed")) {
    try {
      fixed.push_back(SyncPolicy::parse(p));
    } catch (const Error& e) {
      flags.fail(e.what());
    }
  }
  const SyncPolicy adaptive = Adaptive(std::chrono::microseconds(static_cast<long>(target_us)));
  c10::InferenceMode inference;
  std::printf(
      "adaptive_sweep: stacked mode, %s, LibTorch %s, p99 target %.0f us, %.1f s per cell, "
      "median of %d interleaved runs\n\n"
      "| workload | load | best fixed meeting target | its req/s | adaptive req/s | ratio | "
      "adaptive p99 us | meets target | adaptive p99 inside the submitter us | adaptive mean "
      "batch | adaptive batches held |\n"
      "|---|---|---|--:|--:|--:|--:|---|--:|--:|--:|\n",
      device.str().c_str(), TORCH_VERSION, target_us, flags.num("seconds"), reps);
  JsonRows json;
  for (const std::string& w : flags.list("workloads")) {
    const auto xpos = w.find('x');
    if (xpos == std::string::npos)
      flags.fail("--workloads: expected LAYERSxWIDTH, got '" + w + "'");
    const int layers = std::stoi(w.substr(0, xpos)), width = std::stoi(w.substr(xpos + 1));
    const Mlp mlp(layers, width, device);
    const at::Tensor x = at::randn({1, width}, at::TensorOptions().device(device));
    auto run = [&](const SyncPolicy& policy, const std::string& load, double amount) {
      Submitter s(make_stacked_model([&](const at::Tensor& in) { return mlp(in); }),
                  {.queue_capacity = 1 << 16, .policy = policy}, TorchBackend(device));
      Result r = load == "closed" ? closed(s, x, static_cast<int>(amount), flags.num("seconds"))
                                  : open(s, x, amount, flags.num("seconds"));
      s.shutdown();
      const SubmitterStats st = s.stats();
      r.submitter_p99_us = static_cast<double>(st.recent_latency.p99.count()) / 1e3;
      r.mean_batch = st.mean_batch_size();
      r.held_share = st.batches == 0
                         ? 0.0
                         : static_cast<double>(st.held_batches) / static_cast<double>(st.batches);
      return r;
    };
    std::vector<std::pair<std::string, double>> loads;
    for (int c : flags.ints("clients")) loads.emplace_back("closed", c);
    for (int r : flags.ints("rates")) loads.emplace_back("open", r);
    for (const auto& [kind, amount] : loads) {
      // Every policy --reps times, interleaved (fixed ones and Adaptive take turns, so drift on
      // the machine hits them alike); each policy's result is its median-throughput run.
      std::vector<SyncPolicy> all = fixed;
      all.push_back(adaptive);
      std::vector<std::vector<Result>> runs(all.size());
      for (int rep = 0; rep < reps; ++rep)
        for (std::size_t i = 0; i < all.size(); ++i) runs[i].push_back(run(all[i], kind, amount));
      auto median = [](std::vector<Result> v) {
        std::sort(v.begin(), v.end(),
                  [](const Result& a, const Result& b) { return a.rate < b.rate; });
        return v[v.size() / 2];
      };
      std::string best_name = "none";
      Result best;
      for (std::size_t i = 0; i < fixed.size(); ++i) {
        const Result r = median(runs[i]);
        if (r.p99_us <= target_us && r.rate > best.rate) best = r, best_name = fixed[i].describe();
      }
      const Result a = median(runs.back());
      const std::string load = kind == "closed"
                                   ? std::to_string(static_cast<int>(amount)) + " clients"
                                   : std::to_string(static_cast<int>(amount)) + " req/s";
      const double ratio = best.rate > 0 ? a.rate / best.rate : 0;
      std::printf("| %s | %s | %s | %.0f | %.0f | %.2f | %.0f | %s | %.0f | %.1f | %.3f |\n",
                  w.c_str(), load.c_str(), best_name.c_str(), best.rate, a.rate, ratio, a.p99_us,
                  a.p99_us <= target_us ? "yes" : "no", a.submitter_p99_us, a.mean_batch,
                  a.held_share);
      std::fflush(stdout);
      json.row()
          .set("workload", w)
          .set("load", load)
          .set("best_fixed", best_name)
          .set("best_fixed_rate", best.rate)
          .set("adaptive_rate", a.rate)
          .set("adaptive_p99_us", a.p99_us)
          .set("adaptive_submitter_p99_us", a.submitter_p99_us)
          .set("adaptive_mean_batch", a.mean_batch)
          .set("adaptive_held_share", a.held_share);
    }
  }
  json.write(flags.str("json"), meta_json(device, {{"bench", "adaptive_sweep"}}));
  return 0;
}
