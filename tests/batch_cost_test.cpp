// Batches counted in cost (BatchModel::cost: rows, say) rather than requests: a batch never goes
// over the limit with a request that can wait for the next, and a request over the limit alone
// runs as its own batch. Torch-free: this file also runs under TSan and ASan.
#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <thread>
#include <vector>

#include "gate.hpp"
#include "syncbatch/batched_submitter.hpp"

namespace syncbatch {
namespace {

using testing::Gate;

// Each input is its own cost; the model records each batch's inputs. Input 0 holds the gate.
struct Recorder : testing::BatchRecorder {
  BatchModel<int, int> model() {
    BatchModel<int, int> m = BatchRecorder::model();
    m.cost = [](const int& x) { return static_cast<std::size_t>(x); };
    return m;
  }
};

TEST(BatchCost, ABatchNeverGoesOverTheLimitWithARequestThatCanWait) {
  Recorder r;
  BatchedSubmitter<int, int> s(r.model(), {.policy = EveryN{10}});
  auto blocker = s.submit(0);
  r.gate.wait_entered(1);
  std::vector<Future<int>> fs;
  for (int cost : {4, 4, 4, 12, 3, 7, 1, 2}) fs.push_back(s.submit(cost));
  r.gate.open = true;
  for (auto& f : fs) f.get();
  blocker.get();
  s.shutdown();
  // 4+4 (a third 4 would make 12), 4 (12 does not fit), 12 alone (over the limit), 3+7 (= 10:
  // the limit syncs it), 1+2.
  EXPECT_EQ(r.batches, (std::vector<std::vector<int>>{{0}, {4, 4}, {4}, {12}, {3, 7}, {1, 2}}));
}

// Without a cost every request counts 1, as before.
TEST(BatchCost, WithoutACostEachRequestCountsOne) {
  testing::BatchRecorder r;  // no cost
  BatchedSubmitter<int, int> s(r.model(), {.policy = EveryN{3}});
  auto blocker = s.submit(0);
  r.gate.wait_entered(1);
  std::vector<Future<int>> fs;
  for (int x : {40, 50, 60, 70}) fs.push_back(s.submit(x));
  r.gate.open = true;
  for (auto& f : fs) f.get();
  blocker.get();
  s.shutdown();
  EXPECT_EQ(r.batches, (std::vector<std::vector<int>>{{0}, {40, 50, 60}, {70}}));
}

// Adaptive learns its limit in cost units; under load from 8 threads with costs 1 to 8, no batch
// holding more than one request goes over the limit, and nothing is lost.
TEST(BatchCost, AdaptiveCountsCostUnderLoad) {
  std::atomic<int> over{0};
  std::atomic<long> total{0};
  BatchedSubmitter<int, int> s(
      BatchModel<int, int>{[&](Batch<int, int>& b) {
                             std::size_t cost = 0;
                             for (std::size_t i = 0; i < b.size(); ++i) {
                               cost += static_cast<std::size_t>(b.input(i));
                               b.set_value(i, b.input(i));
                             }
                             if (b.size() > 1 && cost > 32) over.fetch_add(1);
                           },
                           [](const int& x) { return static_cast<std::size_t>(x); }},
      {.policy = Adaptive(std::chrono::milliseconds(2), 1, 32)});
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 500; ++i) total += s.submit(1 + (i + t) % 8).get();
    });
  for (auto& th : threads) th.join();
  s.shutdown();
  EXPECT_EQ(over.load(), 0);
  long want = 0;
  for (int t = 0; t < 8; ++t)
    for (int i = 0; i < 500; ++i) want += 1 + (i + t) % 8;
  EXPECT_EQ(total.load(), want);
  EXPECT_EQ(s.stats().completed, 4000u);
}

}  // namespace
}  // namespace syncbatch
