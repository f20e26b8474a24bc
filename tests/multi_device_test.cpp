// MultiDeviceSubmitter: routing and completion across replicas (CPU "devices" here; the same
// code routes across GPUs). Torch-free: runs under TSan and ASan.
#include "syncbatch/multi_device.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

namespace syncbatch {
namespace {

using namespace std::chrono_literals;
using Multi = MultiDeviceSubmitter<int, int>;
using IntReplica = Replica<int, int, NoSyncBackend>;

// Output = input * 10 + replica id, so tests can see where each request ran.
PerCallModel<int, int> tagged(int id, std::chrono::microseconds delay = 0us) {
  return [id, delay](int& x) {
    if (delay > 0us) std::this_thread::sleep_for(delay);
    return x * 10 + id;
  };
}

TEST(MultiDevice, EveryResultIsRightAndEveryReplicaServes) {
  Multi m({IntReplica{tagged(0), {}}, IntReplica{tagged(1), {}}, IntReplica{tagged(2), {}}},
          {.queue_capacity = 256, .policy = EveryN{16}});
  EXPECT_EQ(m.replicas(), 3u);
  std::atomic<int> wrong{0};
  std::vector<std::thread> producers;
  for (int p = 0; p < 16; ++p) {
    producers.emplace_back([&, p] {
      std::vector<Future<int>> futures;
      for (int i = 0; i < 2000; ++i) futures.push_back(m.submit(p * 10000 + i));
      for (int i = 0; i < 2000; ++i) {
        const int y = futures[i].get();
        if (y / 10 != p * 10000 + i || y % 10 > 2) wrong.fetch_add(1);
      }
    });
  }
  for (auto& t : producers) t.join();
  m.shutdown();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(m.stats().completed, 32000u);
  EXPECT_EQ(m.stats().submitted, 32000u);
  for (std::size_t i = 0; i < 3; ++i) EXPECT_GT(m.replica(i).stats().completed, 0u) << i;
}

TEST(MultiDevice, ASlowReplicaReceivesLess) {
  Multi m({IntReplica{tagged(0, 2000us), {}}, IntReplica{tagged(1), {}}, IntReplica{tagged(2), {}}},
          {.policy = EveryN{8}});
  std::vector<std::thread> producers;
  for (int p = 0; p < 4; ++p) {
    producers.emplace_back([&] {
      for (int i = 0; i < 150; ++i) {
        std::vector<Future<int>> window;
        for (int k = 0; k < 4; ++k) window.push_back(m.submit(i));
        for (auto& f : window) f.get();
      }
    });
  }
  for (auto& t : producers) t.join();
  m.shutdown();
  const auto total = m.stats().completed;
  EXPECT_EQ(total, 2400u);
  const auto slow = m.replica(0).stats().completed;
  const auto fast = std::min(m.replica(1).stats().completed, m.replica(2).stats().completed);
  std::printf("slow replica %llu, fastest-but-least fast replica %llu of %llu\n",
              static_cast<unsigned long long>(slow), static_cast<unsigned long long>(fast),
              static_cast<unsigned long long>(total));
  EXPECT_LT(slow * 2, fast) << "the slow replica took more than half a fast one's share";
}

TEST(MultiDevice, StackedAndPerCallReplicasMix) {
  BatchModel<int, int> stacked{[](Batch<int, int>& b) {
    for (std::size_t i = 0; i < b.size(); ++i) b.set_value(i, b.input(i) * 10 + 1);
  }};
  Multi m({IntReplica{tagged(0), {}}, IntReplica{stacked, {}}});
  std::vector<Future<int>> futures;
  for (int i = 0; i < 500; ++i) futures.push_back(m.submit(i));
  for (int i = 0; i < 500; ++i) EXPECT_EQ(futures[i].get() / 10, i);
}

TEST(MultiDevice, ErrorsAreClear) {
  try {
    Multi m({});
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  }
  Multi m({IntReplica{tagged(0), {}}, IntReplica{tagged(1), {}}});
  auto f = m.submit(4);
  m.shutdown();
  EXPECT_EQ(f.get() / 10, 4) << "shutdown drains";
  try {
    m.submit(5);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kShutDown);
  }
}

}  // namespace
}  // namespace syncbatch
