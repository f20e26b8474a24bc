#include "syncbatch/sync_policy.hpp"

#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <vector>

namespace syncbatch {
namespace {

using namespace std::chrono_literals;

// A fake clock: policies take the time as an argument, so tests pass arbitrary time points.
const Clock::time_point kT0 = Clock::time_point{} + 1h;

struct Case {
  std::string name;
  SyncPolicy policy;
  std::size_t ops;
  Clock::duration age;  // now - oldest
  bool expect_sync;
};

TEST(SyncPolicy, DecisionsTable) {
  const std::vector<Case> cases = {
      {"every4: 1 op", EveryN{4}, 1, 0s, false},
      {"every4: 3 ops, old", EveryN{4}, 3, 10s, false},
      {"every4: 4 ops", EveryN{4}, 4, 0s, true},
      {"every4: 5 ops", EveryN{4}, 5, 0s, true},
      {"every1: 1 op", EveryN{1}, 1, 0s, true},
      {"time: 0 ops", TimeBased{100us, 8}, 0, 1s, false},
      {"time: young, few", TimeBased{100us, 8}, 3, 99us, false},
      {"time: exactly max_delay", TimeBased{100us, 8}, 3, 100us, true},
      {"time: old", TimeBased{100us, 8}, 1, 150us, true},
      {"time: max_ops", TimeBased{100us, 8}, 8, 0us, true},
      {"adaptive: starts at min", Adaptive(1ms, 2, 64), 1, 0us, false},
      {"adaptive: reaches min", Adaptive(1ms, 2, 64), 2, 0us, true},
      {"adaptive: target age", Adaptive(1ms, 2, 64), 1, 1ms, true},
  };
  for (const auto& c : cases) {
    PendingWork w{c.ops, kT0};
    EXPECT_EQ(c.policy.should_sync(w, kT0 + c.age), c.expect_sync) << c.name;
  }
}

TEST(SyncPolicy, HoldUntil) {
  const PendingWork w{3, kT0};
  EXPECT_EQ(EveryN{8}.hold_until(w), kT0) << "EveryN syncs as soon as work runs dry";
  EXPECT_EQ((TimeBased{250us, 8}.hold_until(w)), kT0 + 250us);
  EXPECT_EQ(Adaptive(5ms).hold_until(w), kT0) << "nothing observed yet: no hold";
  EXPECT_EQ(SyncPolicy(TimeBased{250us, 8}).hold_until(w), kT0 + 250us);
}

TEST(SyncPolicy, AdaptiveHoldsAnEighthOfTheBatchTimeBoundedByTheTarget) {
  Adaptive a(80ms, 4, 64);                        // limit 4
  a.observe(BatchObservation{4, 1ms, 8ms, 8ms});  // a full batch of 8 ms, under target
  EXPECT_EQ(a.hold_until(PendingWork{1, kT0}), kT0 + 1ms) << "an eighth of 8 ms";
  EXPECT_EQ(a.hold_until(PendingWork{5, kT0}), kT0) << "a full batch does not wait";
  Adaptive tight(4ms, 4, 64);
  tight.observe(BatchObservation{4, 1ms, 3ms, 3ms});
  EXPECT_EQ(tight.hold_until(PendingWork{1, kT0}), kT0 + 375us);
  Adaptive slow(4ms, 4, 64);
  slow.observe(BatchObservation{4, 1ms, 40ms, 40ms});
  EXPECT_EQ(slow.hold_until(PendingWork{1, kT0}), kT0 + 500us) << "at most an eighth of target";
  Adaptive cheap(80ms, 4, 64);
  cheap.observe(BatchObservation{4, 10us, 200us, 200us});
  EXPECT_EQ(cheap.hold_until(PendingWork{1, kT0}), kT0) << "a 25 us hold is not worth a sleep";
}

TEST(SyncPolicy, AdaptiveLearnsHowManyThereAreToGather) {
  // One closed-loop client and a heavy model: batches of one, 8 ms each.
  Adaptive lone(80ms, 1, 64);
  int held = 0;
  for (int i = 0; i < 100; ++i) {
    const PendingWork w{1, kT0};
    const bool waits = lone.hold_until(w) != kT0;
    if (waits) ++held;
    // What the worker reports: whether it held, and that the hold brought nobody.
    lone.observe(BatchObservation{1, 1ms, 8ms, 8ms, waits, 0});
  }
  EXPECT_LE(lone.batch_limit(), 2u);
  EXPECT_LE(held, 25) << "a lone client waited on most of its batches";
  EXPECT_LE(held, 8) << "holds that brought nothing did not back off";
  // Eight clients whose requests come back in two phases of four: holding gathers all eight,
  // and the limit settles on eight.
  Adaptive eight(80ms, 1, 64);
  for (int i = 0; i < 200; ++i) {
    const std::size_t limit = eight.batch_limit();
    const bool waits = eight.hold_until(PendingWork{4, kT0}) != kT0;
    const std::size_t ops = std::min<std::size_t>(limit, waits ? 8 : 4);
    eight.observe(BatchObservation{ops, 1ms, 8ms, 8ms, waits, waits ? ops - 4 : 0});
  }
  EXPECT_GE(eight.batch_limit(), 8u);
  EXPECT_LE(eight.batch_limit(), 9u);
}

// Holds that bring nothing are skipped for 1, 3, 7 ... 63 short batches; a hold that brings a
// request restores holding at once.
TEST(SyncPolicy, AdaptiveBacksOffHoldsThatBringNothing) {
  Adaptive a(80ms, 4, 64);                        // limit 4: batches of 1 are short
  a.observe(BatchObservation{4, 1ms, 8ms, 8ms});  // a full batch: hold an eighth of 8 ms
  const PendingWork w{1, kT0};
  std::vector<int> gaps;  // short batches run unheld between two holds
  int unheld = 0;
  for (int i = 0; i < 200 && gaps.size() < 7; ++i) {
    const bool waits = a.hold_until(w) != kT0;
    if (waits) {
      gaps.push_back(unheld);
      unheld = 0;
    } else {
      ++unheld;
    }
    a.observe(BatchObservation{1, 1ms, 8ms, 8ms, waits, 0});
  }
  EXPECT_EQ(gaps, (std::vector<int>{0, 1, 3, 7, 15, 31, 63}));
  // A hold comes round again and brings a request: every short batch holds again.
  for (int i = 0; i < 63 && a.hold_until(w) == kT0; ++i)
    a.observe(BatchObservation{1, 1ms, 8ms, 8ms, false, 0});
  ASSERT_NE(a.hold_until(w), kT0);
  a.observe(BatchObservation{2, 1ms, 8ms, 8ms, true, 1});
  EXPECT_NE(a.hold_until(w), kT0) << "a hold that brought a request was not kept";
}

TEST(SyncPolicy, BatchLimitAndClockUse) {
  EXPECT_EQ(EveryN{16}.batch_limit(), 16u);
  EXPECT_EQ((TimeBased{1ms, 32}.batch_limit()), 32u);
  EXPECT_FALSE(EveryN{16}.uses_clock());
  EXPECT_TRUE(TimeBased{}.uses_clock());
  EXPECT_TRUE(SyncPolicy(Adaptive(1ms)).uses_clock());
}

TEST(SyncPolicy, AdaptiveGrowsWhileUnderTargetAndBacksOff) {
  Adaptive a(10ms, 1, 8);
  EXPECT_EQ(a.batch_limit(), 1u);
  // Full batches well under target: +1 each, up to max.
  for (std::size_t expect = 2; expect <= 8; ++expect) {
    a.observe({a.batch_limit(), 10us, 100us, 1ms});
    EXPECT_EQ(a.batch_limit(), expect);
  }
  a.observe({8, 10us, 100us, 1ms});
  EXPECT_EQ(a.batch_limit(), 8u) << "never above max";
  // A partial batch does not grow the limit: the load could not fill it.
  a = Adaptive(10ms, 1, 8);
  a.observe({1, 10us, 100us, 1ms});
  a.observe({2, 10us, 100us, 1ms});
  EXPECT_EQ(a.batch_limit(), 3u);
  a.observe({2, 10us, 100us, 1ms});
  EXPECT_EQ(a.batch_limit(), 3u) << "a batch of 2 under a limit of 3 is not full";
  // Latency near the target (within 20%): hold.
  a.observe({3, 10us, 100us, 9ms});
  EXPECT_EQ(a.batch_limit(), 3u);
  // Overshoot by a slow batch: halve, never below min.
  a = Adaptive(10ms, 2, 64);
  for (int i = 0; i < 20; ++i) a.observe({a.batch_limit(), 10us, 100us, 1ms});
  EXPECT_EQ(a.batch_limit(), 22u);
  a.observe({22, 10us, 6ms, 11ms});  // the batch itself took 6 ms: too slow
  EXPECT_EQ(a.batch_limit(), 11u);
  for (int i = 0; i < 10; ++i) a.observe({1, 10us, 100us, 50ms});
  EXPECT_EQ(a.batch_limit(), 2u);
}

TEST(SyncPolicy, AdaptiveSplitsAnOvershootIntoQueueingAndService) {
  Adaptive a(1ms, 1, 256);
  for (int i = 0; i < 15; ++i) a.observe({a.batch_limit(), 10us, 100us, 200us});
  ASSERT_EQ(a.batch_limit(), 16u);
  // Full batch, fast (0.1 ms), but its oldest request queued 1.4 ms: falling behind, batch more.
  a.observe({16, 10us, 100us, 1500us});
  EXPECT_EQ(a.batch_limit(), 32u);
  // Full batch that itself took 0.8 ms (over half the target): too slow, batch less.
  a.observe({32, 10us, 800us, 1200us});
  EXPECT_EQ(a.batch_limit(), 16u);
  // A partial batch over the target is too slow whatever queued: batch less.
  a.observe({4, 10us, 100us, 1500us});
  EXPECT_EQ(a.batch_limit(), 8u);
}

TEST(SyncPolicy, ValidationNamesTheProblem) {
  auto message = [](const SyncPolicy& p) {
    try {
      p.validate();
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message(EveryN{0}).find("expected n >= 1, got 0"), std::string::npos);
  EXPECT_NE(message(TimeBased{1ms, 0}).find("max_ops >= 1"), std::string::npos);
  EXPECT_NE(message(TimeBased{-1ms, 4}).find("max_delay >= 0"), std::string::npos);
  EXPECT_NE(message(Adaptive(0ms)).find("latency_target > 0"), std::string::npos);
  EXPECT_NE(message(Adaptive(1ms, 9, 4)).find("min_batch=9 max_batch=4"), std::string::npos);
  EXPECT_EQ(message(EveryN{3}), "no error");
}

TEST(SyncPolicy, ParseRoundTrips) {
  for (const char* spec : {"every:32", "time:500us:64", "adaptive:2000us:1:128"}) {
    EXPECT_EQ(SyncPolicy::parse(spec).describe(), spec);
  }
  const auto t = std::get<TimeBased>(SyncPolicy::parse("time:2ms").variant());
  EXPECT_EQ(t.max_delay, 2ms);
  EXPECT_EQ(t.max_ops, TimeBased{}.max_ops);
  const auto a = std::get<Adaptive>(SyncPolicy::parse("adaptive:5ms").variant());
  EXPECT_EQ(a.latency_target(), 5ms);
  EXPECT_EQ(a.max_batch(), 256u);
}

TEST(SyncPolicy, ParseRejectsBadSpecsClearly) {
  for (const char* spec : {"", "every", "every:", "every:x", "every:0", "time:5", "time:5h",
                           "time:1ms:2:3", "sometimes:4", "adaptive:1ms:8:4"}) {
    try {
      (void)SyncPolicy::parse(spec);
      ADD_FAILURE() << "accepted '" << spec << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << spec;
      const std::string what = e.what();
      // The parse errors quote the spec; range errors (every:0) name the bound instead.
      EXPECT_TRUE(what.find(std::string("'") + spec + "'") != std::string::npos ||
                  what.find("expected") != std::string::npos)
          << what;
    }
  }
}

}  // namespace
}  // namespace syncbatch
