// queue_overhead: the cost per request of syncbatch's queue, Future and completion, with a model
// that does nothing, against a baseline written here: std::mutex + std::condition_variable +
// std::promise. 1, 2, 4, 8 producer threads; each keeps a window of 64 requests in flight.
// Prints Google Benchmark's table, then ns/request side by side with the ratio. On a small
// machine single runs are noisy: pass --benchmark_repetitions=5 to compare medians.
#include <benchmark/benchmark.h>

#include <condition_variable>
#include <cstdio>
#include <deque>
#include <future>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "syncbatch/batched_submitter.hpp"

namespace {

constexpr std::size_t kWindow = 64;

syncbatch::BatchedSubmitter<int, int>& submitter() {
  static auto* s = new syncbatch::BatchedSubmitter<int, int>(
      [](int& x) { return x + 1; },
      {.queue_capacity = 8 * kWindow * 2, .policy = syncbatch::EveryN{64}});
  return *s;
}

// The baseline: what a server writes by hand.
class MutexPromiseQueue {
 public:
  MutexPromiseQueue() : worker_([this] { run(); }) {}
  std::future<int> submit(int x) {
    std::promise<int> p;
    auto f = p.get_future();
    {
      std::lock_guard lock(mutex_);
      items_.emplace_back(x, std::move(p));
    }
    cv_.notify_one();
    return f;
  }

 private:
  void run() {
    for (;;) {
      std::unique_lock lock(mutex_);
      cv_.wait(lock, [&] { return !items_.empty(); });
      auto [x, p] = std::move(items_.front());
      items_.pop_front();
      lock.unlock();
      p.set_value(x + 1);
    }
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::pair<int, std::promise<int>>> items_;  // guarded by mutex_
  std::thread worker_;
};

MutexPromiseQueue& baseline() {
  static auto* q = new MutexPromiseQueue();  // leaked: its worker runs until exit
  return *q;
}

// Each iteration submits one request; every kWindow requests the producer waits for them all.
template <class Queue, class Future>
void windowed(benchmark::State& state, Queue& queue) {
  std::vector<Future> window;
  window.reserve(kWindow);
  int i = 0;
  for (auto _ : state) {
    window.push_back(queue.submit(i++));
    if (window.size() == kWindow) {
      for (auto& f : window) benchmark::DoNotOptimize(f.get());
      window.clear();
    }
  }
  for (auto& f : window) f.get();
  state.SetItemsProcessed(state.iterations());
}

void BM_Syncbatch(benchmark::State& state) {
  windowed<syncbatch::BatchedSubmitter<int, int>, syncbatch::Future<int>>(state, submitter());
}

void BM_MutexCondvarPromise(benchmark::State& state) {
  windowed<MutexPromiseQueue, std::future<int>>(state, baseline());
}

BENCHMARK(BM_Syncbatch)->ThreadRange(1, 8)->UseRealTime();
BENCHMARK(BM_MutexCondvarPromise)->ThreadRange(1, 8)->UseRealTime();

// Keeps Google Benchmark's console output and remembers each run's requests per second.
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const auto& run : runs) {
      auto it = run.counters.find("items_per_second");
      if (it == run.counters.end()) continue;
      // With --benchmark_repetitions, use the median; otherwise the single run.
      const bool median = run.run_type == Run::RT_Aggregate && run.aggregate_name == "median";
      if (!median && run.run_type != Run::RT_Iteration) continue;
      if (!median && run.repetitions > 1) continue;
      const std::string name = run.benchmark_name();
      const bool ours = name.rfind("BM_Syncbatch", 0) == 0;
      rates_[run.threads][ours ? 0 : 1] = it->second.value;
    }
  }
  void print_ratios() const {
    std::printf("\n(median of the repetitions when --benchmark_repetitions is given)\n");
    std::printf(
        "\n| producers | syncbatch ns/request | mutex+condvar+promise ns/request | "
        "baseline/syncbatch |\n|--:|--:|--:|--:|\n");
    for (const auto& [threads, r] : rates_) {
      if (r[0] <= 0 || r[1] <= 0) continue;
      std::printf("| %d | %.0f | %.0f | %.2fx |\n", threads, 1e9 / r[0], 1e9 / r[1], r[0] / r[1]);
    }
  }

 private:
  std::map<int, std::array<double, 2>> rates_;
};

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.print_ratios();
  std::fflush(stdout);
  std::_Exit(0);  // the baseline's worker thread never returns
}
