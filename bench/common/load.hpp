// Load generators and what they measure: closed loops of client threads or of callbacks, open
// loops of Poisson arrivals, and latency percentiles.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "syncbatch/torch.hpp"

namespace syncbatch::bench {

using Clock = std::chrono::steady_clock;

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
Cell callback_loop(Submitter& submitter, const std::vector<typename Submitter::Input>& inputs,
                   int chains, double warmup, double seconds) {
  using In = typename Submitter::Input;
  using Out = typename Submitter::Output;
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
    submitter.submit_then(In(inputs[c]), [&, c](std::exception_ptr error, Out) {
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
