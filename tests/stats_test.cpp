// SubmitterStats and the histograms behind it: percentiles, the recent window, bucket bounds.
// Torch-free: this file also runs under TSan and ASan.
#include "syncbatch/stats.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

#include "syncbatch/batched_submitter.hpp"

namespace syncbatch {
namespace {

using namespace std::chrono_literals;
using IntSubmitter = BatchedSubmitter<int, int>;

TEST(Stats, LatencyPercentilesAreOrderedAndCounted) {
  IntSubmitter s([](int& x) { return x; }, {.policy = EveryN{4}});
  std::vector<Future<int>> f;
  for (int i = 0; i < 1000; ++i) f.push_back(s.submit(i));
  for (auto& x : f) x.get();
  s.shutdown();
  const auto st = s.stats();
  EXPECT_EQ(st.latency.count, 1000u);
  EXPECT_EQ(st.queue_delay.count, 1000u);
  EXPECT_LE(st.latency.p50, st.latency.p99);
  EXPECT_LE(st.latency.p99, st.latency.p999);
  EXPECT_LE(st.latency.p999, st.latency.max);
  EXPECT_GT(st.latency.max.count(), 0);
  EXPECT_EQ(st.batch_limit, 4u);
  // All of them completed within the last second or two: the recent window holds them all.
  EXPECT_EQ(st.recent_latency.count, 1000u);
  EXPECT_LE(st.recent_latency.p99, st.latency.max);
}

TEST(Stats, RecentLatencyCoversTheLastSecondsOnly) {
  detail::RecentLatency recent;
  const auto t0 = std::chrono::steady_clock::time_point{} + 100s;
  EXPECT_EQ(recent.summary(t0).count, 0u);
  recent.record(1ms, t0);
  recent.record(3ms, t0 + 200ms);
  EXPECT_EQ(recent.summary(t0 + 300ms).count, 2u);
  EXPECT_EQ(recent.summary(t0 + 1500ms).count, 2u);  // the previous window still counts
  EXPECT_EQ(recent.summary(t0 + 2500ms).count, 0u);  // two windows later: forgotten
  recent.record(7ms, t0 + 3s);
  const LatencySummary s = recent.summary(t0 + 3s);
  EXPECT_EQ(s.count, 1u);
  EXPECT_GE(s.p99, 7ms);
  EXPECT_LE(s.max, 7ms);
}

TEST(Stats, HistogramBucketsBoundTheirValues) {
  for (std::uint64_t v : {0ull, 1ull, 7ull, 8ull, 9ull, 15ull, 16ull, 17ull, 1000ull, 123456789ull,
                          (1ull << 62) + 12345}) {
    const auto i = detail::LatencyHistogram::index(v);
    EXPECT_GE(detail::LatencyHistogram::upper(i), v) << v;
    EXPECT_LE(detail::LatencyHistogram::upper(i), v + v / 8 + 1) << v;
    if (i > 0) {
      EXPECT_LT(detail::LatencyHistogram::upper(i - 1), v) << v;
    }
  }
}

// A caller that has its result finds its request counted: completed (and failed, cancelled)
// are bumped before the request completes, for batches, for requests that fail alone (a
// deadline passed) and for ones cancelled while queued. Each callback checks from inside.
TEST(Stats, ARequestIsCountedBeforeItsCallerHasItsResult) {
  IntSubmitter s([](int& x) { return x; }, {.policy = EveryN{8}});
  std::atomic<std::uint64_t> done{0}, undercounted{0};
  auto check = [&](std::exception_ptr, int) {
    const std::uint64_t mine = done.fetch_add(1) + 1;  // at least this many completed
    if (s.stats().completed < mine) undercounted.fetch_add(1);
  };
  for (int i = 0; i < 2000; ++i) s.submit_then(i, check);
  // Expired before a worker took them: completed alone, with kDeadlineExceeded.
  for (int i = 0; i < 50; ++i) s.submit_then(i, check, Clock::now() - 1ms);
  for (int i = 0; i < 5000 && done.load() < 2050; ++i) std::this_thread::sleep_for(1ms);
  ASSERT_EQ(done.load(), 2050u);
  EXPECT_EQ(undercounted.load(), 0u);
  EXPECT_GE(s.stats().expired, 1u);

  // Cancelled while queued, behind a request the model holds: counted as cancelled first.
  std::atomic<bool> release{false};
  std::atomic<int> running{0};
  IntSubmitter held(
      [&](int& x) {
        running = 1;
        while (!release.load()) std::this_thread::sleep_for(1ms);
        return x;
      },
      {.policy = EveryN{1}});
  std::atomic<int> first{0};
  held.submit_then(1, [&](std::exception_ptr, int) { first = 1; });
  while (running.load() == 0) std::this_thread::sleep_for(1ms);
  std::uint64_t cancelled_seen = 0;
  const Cancellation<int> c = held.submit_then(
      2, [&](std::exception_ptr, int) { cancelled_seen = held.stats().cancelled; });
  c.cancel();  // queued: completed here, on this thread
  EXPECT_EQ(cancelled_seen, 1u);
  release = true;
  held.shutdown();
  EXPECT_EQ(first.load(), 1);
}

}  // namespace
}  // namespace syncbatch
