// Shared by the benchmark programs: flags, the MLP workloads, timing, percentiles, JSON.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "syncbatch/torch.hpp"

namespace syncbatch::bench {

using Clock = std::chrono::steady_clock;

/// --name value flags with defaults; unknown flags and bad values exit with a usage message.
class Flags {
 public:
  Flags(int argc, char** argv, std::string usage, std::map<std::string, std::string> defaults)
      : usage_(std::move(usage)), values_(std::move(defaults)) {
    for (int i = 1; i < argc; ++i) {
      std::string flag = argv[i];
      if (flag == "--help" || flag == "-h") fail("");
      if (flag.rfind("--", 0) != 0 || i + 1 >= argc)
        fail("expected --name value, got '" + flag + "'");
      flag = flag.substr(2);
      if (!values_.count(flag)) fail("unknown flag --" + flag);
      values_[flag] = argv[++i];
    }
  }
  std::string str(const std::string& name) const { return values_.at(name); }
  double num(const std::string& name) const {
    const std::string& v = values_.at(name);
    char* end = nullptr;
    const double d = std::strtod(v.c_str(), &end);
    if (v.empty() || *end != '\0' || d < 0)
      fail("--" + name + ": expected a number >= 0, got '" + v + "'");
    return d;
  }
  /// A comma-separated flag, split ("a,b,c" -> {"a", "b", "c"}).
  std::vector<std::string> list(const std::string& name) const {
    std::vector<std::string> out;
    std::stringstream s(values_.at(name));
    for (std::string part; std::getline(s, part, ',');) out.push_back(part);
    return out;
  }
  std::vector<int> ints(const std::string& name) const {
    std::vector<int> out;
    for (const std::string& part : list(name)) {
      char* end = nullptr;
      const long v = std::strtol(part.c_str(), &end, 10);
      if (part.empty() || *end != '\0' || v <= 0)
        fail("--" + name + ": expected positive integers separated by commas, got '" +
             values_.at(name) + "'");
      out.push_back(static_cast<int>(v));
    }
    return out;
  }
  [[noreturn]] void fail(const std::string& problem) const {
    if (!problem.empty()) std::fprintf(stderr, "error: %s\n", problem.c_str());
    std::fprintf(stderr, "%s\nflags (default):\n", usage_.c_str());
    for (const auto& [k, v] : values_) std::fprintf(stderr, "  --%s (%s)\n", k.c_str(), v.c_str());
    std::exit(problem.empty() ? 0 : 2);
  }

 private:
  std::string usage_;
  std::map<std::string, std::string> values_;
};

/// The benchmark workload: `layers` Linear(width, width) with ReLU between, weights from seed 0.
class Mlp {
 public:
  Mlp(int layers, int64_t width, c10::Device device) {
    at::manual_seed(0);
    const auto opts = at::TensorOptions().device(device);
    for (int i = 0; i < layers; ++i) {
      weights_.push_back(at::randn({width, width}, opts) / std::sqrt(static_cast<double>(width)));
      biases_.push_back(at::randn({width}, opts) * 0.01);
    }
  }
  at::Tensor operator()(const at::Tensor& x) const {
    at::Tensor y = x;
    for (std::size_t i = 0; i < weights_.size(); ++i) {
      y = at::linear(y, weights_[i], biases_[i]);
      if (i + 1 < weights_.size()) y = at::relu(y);
    }
    return y;
  }

 private:
  std::vector<at::Tensor> weights_, biases_;
};

/// Parses --device (auto|cpu|cuda|cuda:N|mps), exiting with the library's message on error.
inline c10::Device device_flag(const Flags& flags) {
  try {
    return parse_device(flags.str("device"));
  } catch (const Error& e) {
    flags.fail(e.what());
  }
}

inline SyncMode sync_flag(const std::string& s) {
  if (s == "device") return SyncMode::kDevice;
  if (s == "event") return SyncMode::kEvent;
  std::fprintf(stderr, "error: expected sync mode device or event, got '%s'\n", s.c_str());
  std::exit(2);
}

/// A stream of its own for a client thread on CUDA (the thread's current stream from then on).
class OwnStream {
 public:
  explicit OwnStream(c10::Device device)
      : guard_(device.is_cuda() ? c10::impl::getDeviceGuardImpl(device.type())
                                      ->getStreamFromGlobalPool(device, false)
                                : c10::impl::getDeviceGuardImpl(device.type())->getStream(device)) {
  }

 private:
  c10::StreamGuard guard_;
};

/// Whether graph columns are measured: --graphs auto (where CUDA graphs can run), on, off.
inline bool graphs_flag(const Flags& flags, c10::Device device) {
  const std::string v = flags.str("graphs");
  if (v == "on") return true;
  if (v == "off") return false;
  if (v != "auto") flags.fail("--graphs: expected auto, on or off, got '" + v + "'");
  return graphs_unavailable_reason(device).empty();
}

/// The GPU's own limit for batch-1 forwards: `per_graph` forwards captured in one graph and
/// replayed, one sync per replay; returns forwards per second. (Inputs go in and outputs come out
/// with one copy each per replay, amortized over the forwards.)
inline double graph_limit(const Mlp& mlp, int64_t width, c10::Device device, double seconds,
                          int per_graph = 64) {
  GraphedModel many(
      [&](const at::Tensor& x) {
        std::vector<at::Tensor> outs;
        outs.reserve(static_cast<std::size_t>(per_graph));
        for (int64_t i = 0; i < per_graph; ++i) outs.push_back(mlp(x.narrow(0, i, 1)));
        return at::cat(outs, 0);
      },
      device, {.buckets = {per_graph}});
  const at::Tensor x = at::randn({per_graph, width}, at::TensorOptions().device(device));
  OwnStream stream(device);
  DeviceSync sync(device);
  for (int i = 0; i < 3; ++i) many(x), sync();
  long replays = 0;
  const auto start = Clock::now();
  const auto end =
      start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  while (Clock::now() < end) {
    many(x);
    sync();
    ++replays;
  }
  const double wall = std::chrono::duration<double>(Clock::now() - start).count();
  return static_cast<double>(replays) * per_graph / wall;
}

/// Where a stacked submitter's worker spends its time: inside the model call (gathering and
/// stacking inputs, launching the forward, splitting the output) and inside the sync (waiting
/// for the device). What is left of the wall time is the queue, the policy and the completions.
struct WorkerClock {
  std::atomic<std::int64_t> model_ns{0};
  std::atomic<std::int64_t> sync_ns{0};
};

/// `model`, adding the time the worker spends in it to `clock`.
template <class In, class Out>
StackedModel<In, Out> timed(StackedModel<In, Out> model, WorkerClock& clock) {
  return {[run = std::move(model.run), &clock](Batch<In, Out>& b) {
    const auto t0 = Clock::now();
    run(b);
    clock.model_ns +=
        std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
  }};
}

/// TorchBackend whose workers add the time they spend syncing to a WorkerClock.
struct TimedTorchBackend {
  TorchBackend inner;
  WorkerClock* clock;
  struct Worker {
    TorchBackend::Worker worker;
    WorkerClock* clock;
    void sync() {
      const auto t0 = Clock::now();
      worker.sync();
      clock->sync_ns +=
          std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
    }
    void before_run(Clock::time_point arrived) { worker.before_run(arrived); }
  };
  Worker make_worker(std::size_t index) const { return Worker{inner.make_worker(index), clock}; }
};

/// Latency samples of one run; percentiles by sorting (benchmarks only, not the library).
class Samples {
 public:
  void add(Clock::duration d) {
    ns_.push_back(std::chrono::duration<double, std::nano>(d).count());
  }
  void merge(const Samples& other) { ns_.insert(ns_.end(), other.ns_.begin(), other.ns_.end()); }
  double percentile_us(double q) {
    if (ns_.empty()) return 0;
    std::sort(ns_.begin(), ns_.end());
    const auto i = static_cast<std::size_t>(q * static_cast<double>(ns_.size() - 1));
    return ns_[i] / 1000.0;
  }
  std::size_t size() const { return ns_.size(); }

 private:
  std::vector<double> ns_;
};

/// Collects result rows and writes them as a JSON array of flat objects.
class JsonRows {
 public:
  JsonRows& row() {
    rows_.emplace_back();
    return *this;
  }
  JsonRows& set(const std::string& k, const std::string& v) {
    rows_.back() += (rows_.back().empty() ? "" : ", ") + quote(k) + ": " + quote(v);
    return *this;
  }
  JsonRows& set(const std::string& k, double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.6g", v);
    rows_.back() += (rows_.back().empty() ? "" : ", ") + quote(k) + ": " + buf;
    return *this;
  }
  void write(const std::string& path, const std::string& meta) const {
    if (path.empty()) return;
    std::ofstream out(path);
    out << "{\"meta\": {" << meta << "},\n \"rows\": [\n";
    for (std::size_t i = 0; i < rows_.size(); ++i)
      out << "  {" << rows_[i] << "}" << (i + 1 < rows_.size() ? ",\n" : "\n");
    out << "]}\n";
    if (!out) {
      std::fprintf(stderr, "error: could not write %s\n", path.c_str());
      std::exit(1);
    }
  }
  static std::string quote(const std::string& s) { return "\"" + s + "\""; }

 private:
  std::vector<std::string> rows_;
};

/// "device": ..., "torch": ..., "date": ... for the JSON meta block and the table header.
inline std::string meta_json(c10::Device device, const std::string& extra) {
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%MZ", std::gmtime(&now));
  return "\"device\": \"" + device.str() + "\", \"torch\": \"" TORCH_VERSION "\", \"date\": \"" +
         date + "\"" + (extra.empty() ? "" : ", " + extra);
}

/// Pins LibTorch to one intra-op thread, and warns when OpenBLAS may use more.
inline void pin_threads() {
  at::set_num_threads(1);
  const char* ob = std::getenv("OPENBLAS_NUM_THREADS");
  if (ob == nullptr || std::string(ob) != "1")
    std::fprintf(stderr, "note: set OPENBLAS_NUM_THREADS=1 for comparable CPU numbers\n");
}

/// Runs `fn` on `threads` threads that start together; returns wall seconds.
template <class Fn>
double run_threads(int threads, Fn fn) {
  std::vector<std::thread> pool;
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  Clock::time_point start;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load()) std::this_thread::yield();
      fn(t);
    });
  while (ready.load() < threads) std::this_thread::yield();
  start = Clock::now();
  go = true;
  for (auto& th : pool) th.join();
  return std::chrono::duration<double>(Clock::now() - start).count();
}

struct Cell {
  double ops_per_s = 0;
  double p50_us = 0;
  double p99_us = 0;
  double mean_batch = 0;
};

// Runs a closed loop on `threads` threads for `seconds` (after a warm-up of `warmup` seconds):
// each thread makes its client with `make_client(thread)` (on that thread) and calls it once per
// request (for the ideal row, once per `rows_per_op` requests).
template <class MakeClient>
Cell closed_loop(int threads, double warmup, double seconds, MakeClient make_client,
                 int rows_per_op = 1) {
  auto loop = [&](double duration, bool record) {
    std::vector<Samples> samples(threads);
    std::vector<long> counts(threads, 0);
    const double wall = run_threads(threads, [&](int t) {
      c10::InferenceMode inference;
      auto client = make_client(t);
      const auto end = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                          std::chrono::duration<double>(duration));
      for (auto now = Clock::now(); now < end;) {
        client();
        const auto after = Clock::now();
        if (record) samples[t].add(after - now);
        ++counts[t];
        now = after;
      }
    });
    Cell c;
    long total = 0;
    for (long n : counts) total += n;
    c.ops_per_s = static_cast<double>(total) * rows_per_op / wall;
    Samples all;
    for (auto& s : samples) all.merge(s);
    c.p50_us = all.percentile_us(0.50);
    c.p99_us = all.percentile_us(0.99);
    return c;
  };
  loop(warmup, false);
  return loop(seconds, true);
}

/// Closed loop without client threads: `chains` requests in flight, each completion (on the
/// worker, through submit_then) sending its chain's next request at once, as a server driven by
/// an event loop does. Measures `seconds` after `warmup`; latency is submit to callback. The
/// queue must hold `chains` requests, or a worker would block on its own submit.
template <class Submitter>
Cell callback_loop(Submitter& submitter, const std::vector<at::Tensor>& inputs, int chains,
                   double warmup, double seconds) {
  // A chain's callbacks run one at a time (each sends the next), so its slot needs no lock.
  struct Chain {
    Clock::time_point sent;
    Samples samples;
    long count = 0;
  };
  std::vector<Chain> chain(static_cast<std::size_t>(chains));
  std::atomic<bool> record{false}, stop{false};
  std::atomic<int> in_flight{0};
  std::function<void(int)> send = [&](int c) {
    chain[c].sent = Clock::now();
    // submit_then throws nothing: a refused request (queue full, shut down) calls back with the
    // error, and its chain ends there.
    submitter.submit_then(at::Tensor(inputs[c]), [&, c](std::exception_ptr error, at::Tensor) {
      const auto now = Clock::now();
      if (record.load(std::memory_order_relaxed) && !error) {
        chain[c].samples.add(now - chain[c].sent);
        ++chain[c].count;
      }
      if (error || stop.load(std::memory_order_relaxed)) {
        in_flight.fetch_sub(1, std::memory_order_release);
      } else {
        send(c);
      }
    });
  };
  const auto sleep = [](double s) {
    std::this_thread::sleep_for(std::chrono::duration<double>(s));
  };
  const auto before = submitter.stats();
  in_flight.store(chains);
  for (int c = 0; c < chains; ++c) send(c);
  sleep(warmup);
  record.store(true);
  const auto start = Clock::now();
  sleep(seconds);
  record.store(false);
  const double wall = std::chrono::duration<double>(Clock::now() - start).count();
  stop.store(true);
  while (in_flight.load(std::memory_order_acquire) > 0) std::this_thread::yield();
  const auto after = submitter.stats();
  Cell cell;
  Samples all;
  long total = 0;
  for (auto& c : chain) {
    all.merge(c.samples);
    total += c.count;
  }
  cell.ops_per_s = static_cast<double>(total) / wall;
  cell.p50_us = all.percentile_us(0.50);
  cell.p99_us = all.percentile_us(0.99);
  cell.mean_batch = static_cast<double>(after.completed - before.completed) /
                    static_cast<double>(std::max<std::uint64_t>(1, after.batches - before.batches));
  return cell;
}

/// What an open-loop run measured.
struct OpenLoop {
  double achieved = 0;     ///< requests/s, from the first arrival to the last completion
  Samples latencies;       ///< scheduled arrival to completion
  std::size_t errors = 0;  ///< requests that completed with an error
};

/// Sends `rate * seconds` copies of `x` to `submitter` at Poisson arrival times (seeded), each
/// at its scheduled time whether or not earlier ones are done, and measures from the scheduled
/// arrival to completion, so a submitter that falls behind is charged for the backlog (no
/// coordinated omission).
template <class Submitter>
OpenLoop open_loop(Submitter& submitter, const at::Tensor& x, double rate, double seconds,
                   std::uint64_t seed) {
  const auto n = static_cast<std::size_t>(rate * seconds);
  OpenLoop result;
  if (n == 0) return result;
  std::vector<Clock::time_point> scheduled(n), finished(n);
  std::atomic<std::size_t> done{0}, errors{0};
  std::mt19937_64 rng(seed);
  std::exponential_distribution<double> gap(rate);
  auto t = Clock::now();
  for (std::size_t i = 0; i < n; ++i) {
    t += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(gap(rng)));
    scheduled[i] = t;
    while (Clock::now() < t) {
    }
    submitter.submit_then(at::Tensor(x), [&, i](std::exception_ptr e, at::Tensor) {
      if (e) errors.fetch_add(1, std::memory_order_relaxed);
      finished[i] = Clock::now();
      done.fetch_add(1, std::memory_order_release);
    });
  }
  while (done.load(std::memory_order_acquire) < n) std::this_thread::yield();
  for (std::size_t i = 0; i < n; ++i) result.latencies.add(finished[i] - scheduled[i]);
  result.achieved = static_cast<double>(n) /
                    std::chrono::duration<double>(
                        *std::max_element(finished.begin(), finished.end()) - scheduled.front())
                        .count();
  result.errors = errors.load();
  return result;
}

}  // namespace syncbatch::bench
