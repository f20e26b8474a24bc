#include "syncbatch/sync_scope.hpp"

#include <gtest/gtest.h>

#include <chrono>
#include <stdexcept>
#include <thread>

namespace syncbatch {
namespace {

using namespace std::chrono_literals;

TEST(SyncScope, EveryNSyncsExactlyEveryN) {
  for (std::size_t n : {1u, 2u, 3u, 8u, 64u}) {
    int device_syncs = 0;
    {
      SyncScope scope(EveryN{n}, [&] { ++device_syncs; });
      std::size_t synced_ticks = 0;
      for (std::size_t i = 1; i <= 1000; ++i) synced_ticks += scope.tick() ? 1 : 0;
      EXPECT_EQ(synced_ticks, 1000 / n) << "n=" << n;
      EXPECT_EQ(scope.pending(), 1000 % n);
      scope.flush();
      EXPECT_EQ(scope.pending(), 0u);
      EXPECT_EQ(scope.ops(), 1000u);
      EXPECT_EQ(scope.syncs(), (1000 + n - 1) / n);
      EXPECT_EQ(static_cast<std::size_t>(device_syncs), scope.syncs());
      scope.flush();  // nothing pending: no sync
      EXPECT_EQ(static_cast<std::size_t>(device_syncs), scope.syncs());
    }
  }
}

TEST(SyncScope, DestructorFlushes) {
  int device_syncs = 0;
  {
    SyncScope scope(EveryN{10}, [&] { ++device_syncs; });
    for (int i = 0; i < 15; ++i) scope.tick();
    EXPECT_EQ(device_syncs, 1);
  }
  EXPECT_EQ(device_syncs, 2);
}

TEST(SyncScope, TimeBasedSyncsOnAge) {
  int device_syncs = 0;
  SyncScope scope(TimeBased{2ms, 1000}, [&] { ++device_syncs; });
  EXPECT_FALSE(scope.tick());
  std::this_thread::sleep_for(3ms);
  EXPECT_TRUE(scope.tick()) << "the oldest op is older than max_delay";
  EXPECT_EQ(device_syncs, 1);
}

TEST(SyncScope, RuntimePolicyAndSyncErrorsPropagate) {
  SyncScope scope(SyncPolicy::parse("every:2"), [] { throw std::runtime_error("device lost"); });
  EXPECT_FALSE(scope.tick());
  EXPECT_THROW(scope.tick(), std::runtime_error);
  EXPECT_EQ(scope.pending(), 0u) << "the failed sync still closes the batch";
}

TEST(SyncScope, AdaptiveLearnsFromSyncs) {
  SyncScope scope(Adaptive(1s, 1, 16), [] {});
  for (int i = 0; i < 200; ++i) scope.tick();
  EXPECT_EQ(scope.policy().batch_limit(), 16u) << "fast syncs, full batches: grows to max";
}

TEST(SyncScope, InvalidPolicyThrows) {
  EXPECT_THROW((SyncScope(EveryN{0}, [] {})), Error);
}

}  // namespace
}  // namespace syncbatch
