// priority_load: two priority levels under an open loop near saturation. Each model takes a
// fixed time per batch plus a time per row (a busy wait: the stand-in for a device) and is first
// driven flat out to measure its saturation rate; then Poisson arrivals at --load times that
// rate, a --high share of them high priority, are sent three ways with the same arrival
// sequence: one level (no priorities), two levels with strict priority, and two levels with a
// starvation limit. Prints p50 and p99 per class and the high/low p99 ratio of each run.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/flags.hpp"
#include "common/load.hpp"
#include "common/report.hpp"
#include "syncbatch/batched_submitter.hpp"

namespace {

using namespace syncbatch;
using bench::Samples;
using Submitter = BatchedSubmitter<int, int>;

void busy_wait(std::chrono::nanoseconds d) {
  const auto until = Clock::now() + d;
  while (Clock::now() < until) {
  }
}

BatchModel<int, int> timed_model(std::chrono::nanoseconds per_batch,
                                 std::chrono::nanoseconds per_row) {
  return {[=](Batch<int, int>& b) {
    busy_wait(per_batch + per_row * static_cast<long>(b.size()));
    for (std::size_t i = 0; i < b.size(); ++i) b.set_value(i, b.input(i));
  }};
}

// Requests per second the model completes with the queue never empty.
double saturation(const SubmitterOptions& options, std::chrono::nanoseconds per_batch,
                  std::chrono::nanoseconds per_row, std::size_t n) {
  Submitter s(timed_model(per_batch, per_row), options);
  std::atomic<std::size_t> done{0};
  const auto start = Clock::now();
  for (std::size_t i = 0; i < n; ++i)
    s.submit_then(static_cast<int>(i),
                  [&](std::exception_ptr, int) { done.fetch_add(1, std::memory_order_release); });
  while (done.load(std::memory_order_acquire) < n) std::this_thread::yield();
  return static_cast<double>(n) / std::chrono::duration<double>(Clock::now() - start).count();
}

struct Arrival {
  Clock::duration at;  // from the start of the run
  bool high;
};

struct Result {
  Samples high, low;
  double achieved = 0;
  std::size_t errors = 0;
};

// Sends `arrivals` on their schedule (open loop: each at its time, whatever is still queued) and
// measures each from its scheduled time to its completion.
Result run(const SubmitterOptions& options, std::chrono::nanoseconds per_batch,
           std::chrono::nanoseconds per_row, const std::vector<Arrival>& arrivals,
           bool use_levels) {
  Submitter s(timed_model(per_batch, per_row), options);
  const std::size_t n = arrivals.size();
  std::vector<Clock::time_point> finished(n);
  std::atomic<std::size_t> done{0}, errors{0};
  const auto start = Clock::now() + std::chrono::milliseconds(10);
  for (std::size_t i = 0; i < n; ++i) {
    const auto t = start + arrivals[i].at;
    while (Clock::now() < t) {
    }
    RequestOptions r;
    if (use_levels) r.priority = arrivals[i].high ? 0 : 1;
    s.submit_then(
        static_cast<int>(i),
        [&, i](std::exception_ptr e, int) {
          if (e) errors.fetch_add(1, std::memory_order_relaxed);
          finished[i] = Clock::now();
          done.fetch_add(1, std::memory_order_release);
        },
        r);
  }
  while (done.load(std::memory_order_acquire) < n) std::this_thread::yield();
  Result result;
  for (std::size_t i = 0; i < n; ++i)
    (arrivals[i].high ? result.high : result.low).add(finished[i] - (start + arrivals[i].at));
  result.achieved =
      static_cast<double>(n) /
      std::chrono::duration<double>(*std::max_element(finished.begin(), finished.end()) - start)
          .count();
  result.errors = errors.load();
  return result;
}

// One model: microseconds per batch and per row, and the batch limit ("200:20:16").
struct ModelSpec {
  double batch_us = 0, row_us = 0;
  std::size_t limit = 1;
};

ModelSpec parse_model(const bench::Flags& flags, const std::string& spec) {
  ModelSpec m;
  char extra = 0;
  if (std::sscanf(spec.c_str(), "%lf:%lf:%zu%c", &m.batch_us, &m.row_us, &m.limit, &extra) != 3 ||
      m.limit == 0 || m.batch_us < 0 || m.row_us < 0 || m.batch_us + m.row_us <= 0)
    flags.fail("--models: expected BATCH_US:ROW_US:LIMIT with LIMIT >= 1 and some time, got '" +
               spec + "'");
  return m;
}

}  // namespace

int main(int argc, char** argv) {
  bench::Flags flags(argc, argv,
                     "priority_load [--models 0:50:1,200:20:4,200:20:16,1000:5:64] [--load 0.9]\n"
                     "  [--high 0.2] [--seconds 2] [--starvation 4] [--seed 1] [--json PATH]\n"
                     "  each model: BATCH_US:ROW_US:LIMIT (time per batch, per row; batch limit)",
                     {{"models", "0:50:1,200:20:4,200:20:16,1000:5:64"},
                      {"load", "0.9"},
                      {"high", "0.2"},
                      {"seconds", "2"},
                      {"starvation", "4"},
                      {"seed", "1"},
                      {"json", ""}});
  const double load = flags.num("load"), high_share = flags.num("high");
  const double seconds = flags.num("seconds");
  std::printf(
      "priority_load: open loop of Poisson arrivals at %.2f of each model's saturation, %.0f%% "
      "of them high priority; the same arrivals sent to one level, two strict levels, and two "
      "levels with starvation_limit %s. Latency from scheduled arrival to completion.\n",
      load, high_share * 100, flags.str("starvation").c_str());
  bench::JsonRows json;
  for (const std::string& spec : flags.list("models")) {
    const ModelSpec m = parse_model(flags, spec);
    const auto per_batch = std::chrono::nanoseconds(static_cast<long>(m.batch_us * 1e3));
    const auto per_row = std::chrono::nanoseconds(static_cast<long>(m.row_us * 1e3));
    SubmitterOptions one_level{.queue_capacity = 1 << 16, .policy = EveryN{m.limit}};
    // About half a second of work at the model's nominal rate (full batches back to back).
    const double nominal =
        static_cast<double>(m.limit) * 1e9 /
        static_cast<double>((per_batch + per_row * static_cast<long>(m.limit)).count());
    const double sat =
        saturation(one_level, per_batch, per_row,
                   std::max<std::size_t>(2000, static_cast<std::size_t>(nominal / 2)));
    const double rate = load * sat;

    std::mt19937_64 rng(static_cast<std::uint64_t>(flags.num("seed")));
    std::exponential_distribution<double> gap(rate);
    std::bernoulli_distribution is_high(high_share);
    std::vector<Arrival> arrivals(static_cast<std::size_t>(rate * seconds));
    Clock::duration t{};
    for (auto& a : arrivals) {
      t += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(gap(rng)));
      a = {t, is_high(rng)};
    }

    std::printf(
        "\nmodel %s: %.0f us per batch + %.0f us per row, batch limit %zu; saturation %.0f "
        "requests/s; offered %.0f/s, %zu requests\n\n",
        spec.c_str(), m.batch_us, m.row_us, m.limit, sat, rate, arrivals.size());
    std::printf(
        "| run | achieved req/s | high p50 us | high p99 us | low p50 us | low p99 us | "
        "high p99 / low p99 |\n|---|--:|--:|--:|--:|--:|--:|\n");

    SubmitterOptions two_levels = one_level;
    two_levels.priority_levels = 2;
    SubmitterOptions bounded = two_levels;
    bounded.starvation_limit = static_cast<std::size_t>(flags.num("starvation"));
    struct Case {
      std::string name;
      const SubmitterOptions* options;
      bool levels;
    };
    const std::vector<Case> cases = {
        {"one level (no priorities)", &one_level, false},
        {"two levels, strict", &two_levels, true},
        {"two levels, starvation_limit " + flags.str("starvation"), &bounded, true}};
    for (const auto& c : cases) {
      Result r = run(*c.options, per_batch, per_row, arrivals, c.levels);
      const double hp50 = r.high.percentile_us(0.5), hp99 = r.high.percentile_us(0.99);
      const double lp50 = r.low.percentile_us(0.5), lp99 = r.low.percentile_us(0.99);
      std::printf("| %s | %.0f | %.0f | %.0f | %.0f | %.0f | %.2f |\n", c.name.c_str(), r.achieved,
                  hp50, hp99, lp50, lp99, lp99 > 0 ? hp99 / lp99 : 0.0);
      if (r.errors != 0) std::printf("  (%zu requests failed)\n", r.errors);
      json.row()
          .set("model", spec)
          .set("saturation", sat)
          .set("run", c.name)
          .set("achieved", r.achieved)
          .set("high_p50_us", hp50)
          .set("high_p99_us", hp99)
          .set("low_p50_us", lp50)
          .set("low_p99_us", lp99)
          .set("errors", static_cast<double>(r.errors));
    }
  }
  json.write(flags.str("json"), bench::meta_json(c10::Device(c10::kCPU),
                                                 {{"load", load}, {"high_share", high_share}}));
  return 0;
}
