// Priority levels, the starvation bound, per-level capacity, both queue-timeout actions and
// shedding, on a fake clock where time matters. Torch-free: this file also runs under TSan and
// ASan.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/use_future.hpp>

#include "gate.hpp"
#include "syncbatch/asio.hpp"
#include "syncbatch/batched_submitter.hpp"
#include "syncbatch/multi_device.hpp"

namespace syncbatch {
namespace {

using namespace std::chrono_literals;
using IntSubmitter = BatchedSubmitter<int, int>;
using testing::Gate;

// A clock that moves only when a test (or a model standing for a batch time) moves it.
std::atomic<std::int64_t> g_fake_ns{1'000'000'000'000};
Clock::time_point fake_now() noexcept {
  return Clock::time_point(std::chrono::nanoseconds(g_fake_ns.load()));
}
void advance(Clock::duration d) {
  g_fake_ns.fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(d).count());
}

using testing::code_of;

// A per-call model that records the order of its calls and holds input 0 at a gate.
struct Recorder {
  Gate gate;
  std::mutex mutex;
  std::vector<int> order;
  PerCallModel<int, int> model() {
    return [this](int& x) {
      if (x == 0) gate.pass();
      std::lock_guard lock(mutex);
      order.push_back(x);
      return x;
    };
  }
};

// Inputs 1xx are low priority (level 1), 2xx high (level 0): the model's order shows which
// level each call came from.
std::string levels(const std::vector<int>& order) {
  std::string s;
  for (int x : order)
    if (x != 0) s += x >= 200 ? 'H' : 'L';
  return s;
}

TEST(Priority, AWorkerTakesTheHighestNonEmptyLevelFirst) {
  Recorder r;
  IntSubmitter s(r.model(), {.policy = EveryN{1}, .priority_levels = 2, .default_priority = 1});
  auto blocker = s.submit(0);
  r.gate.wait_entered(1);
  std::vector<Future<int>> fs;
  for (int i = 0; i < 4; ++i) fs.push_back(s.submit(100 + i));  // default level: 1
  for (int i = 0; i < 4; ++i) fs.push_back(s.submit(200 + i, RequestOptions{.priority = 0}));
  r.gate.open = true;
  for (auto& f : fs) f.get();
  blocker.get();
  EXPECT_EQ(levels(r.order), "HHHHLLLL");
  EXPECT_EQ(r.order[1], 200);  // first in, first out within a level
  EXPECT_EQ(r.order[8], 103);
}

// Batch mode: the batch formed after the gate holds the high-priority requests.
TEST(Priority, BatchesFillFromTheHighestLevel) {
  testing::BatchRecorder r;
  IntSubmitter s(r.model(), {.policy = EveryN{3}, .priority_levels = 2});
  auto blocker = s.submit(0, RequestOptions{.priority = 1});
  r.gate.wait_entered(1);
  std::vector<Future<int>> fs;
  for (int i = 0; i < 3; ++i) fs.push_back(s.submit(100 + i, RequestOptions{.priority = 1}));
  for (int i = 0; i < 3; ++i) fs.push_back(s.submit(200 + i, RequestOptions{.priority = 0}));
  r.gate.open = true;
  for (auto& f : fs) f.get();
  blocker.get();
  ASSERT_EQ(r.batches.size(), 3u);
  EXPECT_EQ(r.batches[1], (std::vector<int>{200, 201, 202}));
  EXPECT_EQ(r.batches[2], (std::vector<int>{100, 101, 102}));
}

// starvation_limit 2: a waiting low level gets one take in every three; 0 is strict priority.
TEST(Priority, TheStarvationLimitBoundsHowLongALowerLevelWaits) {
  for (std::size_t limit : {0, 2}) {
    Recorder r;
    IntSubmitter s(r.model(),
                   {.policy = EveryN{1}, .priority_levels = 2, .starvation_limit = limit});
    auto blocker = s.submit(0);
    r.gate.wait_entered(1);
    std::vector<Future<int>> fs;
    for (int i = 0; i < 3; ++i) fs.push_back(s.submit(100 + i, RequestOptions{.priority = 1}));
    for (int i = 0; i < 8; ++i) fs.push_back(s.submit(200 + i, RequestOptions{.priority = 0}));
    r.gate.open = true;
    for (auto& f : fs) f.get();
    blocker.get();
    EXPECT_EQ(levels(r.order), limit == 0 ? "HHHHHHHHLLL" : "HHLHHLHHLHH") << "limit " << limit;
  }
}

// Three levels, limit 1: each waiting lower level gets its turn after one take above it.
TEST(Priority, TheStarvationLimitServesEveryWaitingLevel) {
  Recorder r;
  IntSubmitter s(r.model(), {.policy = EveryN{1}, .priority_levels = 3, .starvation_limit = 1});
  auto blocker = s.submit(0);
  r.gate.wait_entered(1);
  std::vector<Future<int>> fs;
  for (int level = 2; level >= 0; --level)
    for (int i = 0; i < 3; ++i)
      fs.push_back(s.submit(100 * (3 - level) + i,
                            RequestOptions{.priority = static_cast<std::size_t>(level)}));
  r.gate.open = true;
  for (auto& f : fs) f.get();
  blocker.get();
  std::string seen;
  for (int x : r.order)
    if (x != 0) seen += static_cast<char>('0' + (3 - x / 100));  // the level
  // After a take from level 0, both lower levels were passed once: level 1 goes first, then
  // level 2 (still passed), then level 0 again.
  EXPECT_EQ(seen, "012012012");
}

TEST(Priority, EachLevelHasItsOwnCapacity) {
  Recorder r;
  IntSubmitter s(r.model(), {.on_full = OverflowPolicy::kReject,
                             .policy = EveryN{1},
                             .priority_levels = 2,
                             .level_capacity = {1, 3}});
  auto blocker = s.submit(0);
  r.gate.wait_entered(1);
  std::vector<Future<int>> fs;
  fs.push_back(s.submit(200, RequestOptions{.priority = 0}));
  try {
    s.submit(201, RequestOptions{.priority = 0});
    ADD_FAILURE() << "level 0 took a second request past its capacity of 1";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kQueueFull);
    EXPECT_NE(std::string(e.what()).find("priority level 0 holds 1 requests"), std::string::npos)
        << e.what();
  }
  for (int i = 0; i < 3; ++i) fs.push_back(s.submit(100 + i, RequestOptions{.priority = 1}));
  EXPECT_THROW(s.submit(103, RequestOptions{.priority = 1}), Error);
  r.gate.open = true;
  for (auto& f : fs) f.get();
  blocker.get();
  s.shutdown();
  EXPECT_EQ(s.stats().rejected, 2u);
  EXPECT_EQ(s.stats().completed, 5u);
}

TEST(Priority, BadLevelsAreClearErrors) {
  auto id = [](int& x) { return x; };
  auto message = [&](SubmitterOptions o) -> std::string {
    try {
      IntSubmitter s(id, std::move(o));
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      return e.what();
    }
    return "accepted";
  };
  EXPECT_NE(message({.priority_levels = 0}).find("priority_levels: expected >= 1, got 0"),
            std::string::npos);
  EXPECT_NE(message({.priority_levels = 2, .default_priority = 2})
                .find("default_priority: expected a level below priority_levels (2), got 2"),
            std::string::npos);
  EXPECT_NE(message({.priority_levels = 2, .level_capacity = {4}})
                .find("level_capacity: expected one entry per level (2) or none, got 1"),
            std::string::npos);
  EXPECT_NE(message({.priority_levels = 2, .level_capacity = {4, 0}})
                .find("level_capacity[1]: expected >= 1, got 0"),
            std::string::npos);
  EXPECT_NE(message({.clock = nullptr}).find("clock: expected a function, got nullptr"),
            std::string::npos);

  IntSubmitter s(id, {.priority_levels = 2});
  try {
    s.submit(1, RequestOptions{.priority = 2});
    ADD_FAILURE() << "level 2 of 2 accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("expected a level below 2 (0 the highest), got 2"),
              std::string::npos)
        << e.what();
  }
  std::atomic<int> calls{0};
  const auto handle = s.submit_then(
      1,
      [&](std::exception_ptr e, int) {
        try {
          if (e) std::rethrow_exception(e);
        } catch (const Error& err) {
          if (err.code() == ErrorCode::kInvalidArgument) calls.fetch_add(1);
        }
      },
      RequestOptions{.priority = 7});
  EXPECT_FALSE(handle);
  EXPECT_EQ(calls.load(), 1);
  EXPECT_EQ(s.submit(5, RequestOptions{.priority = 1}).get(), 5);
}

// REJECT on a fake clock: a request without a deadline, still queued when its timeout passes,
// fails unrun; one that still has time runs.
TEST(QueueTimeout, RejectFailsWhatWaitedTooLong) {
  Recorder r;
  IntSubmitter s(r.model(), {.policy = EveryN{1}, .default_timeout = 10ms, .clock = &fake_now});
  auto blocker = s.submit(0, fake_now() + 1h);
  r.gate.wait_entered(1);
  auto old = s.submit(1);
  advance(6ms);
  auto young = s.submit(2);
  advance(5ms);  // old: 11 ms queued; young: 5 ms
  r.gate.open = true;
  EXPECT_EQ(code_of(old), ErrorCode::kDeadlineExceeded);
  EXPECT_EQ(young.get(), 2);
  blocker.get();
  s.shutdown();
  EXPECT_EQ(r.order, (std::vector<int>{0, 2}));  // the expired request never ran
  EXPECT_EQ(s.stats().expired, 1u);
  EXPECT_EQ(s.stats().delayed, 0u);
}

// DELAY on a fake clock: the request whose timeout passed runs after the fresh ones, with its
// value; a request with its own deadline is not delayed.
TEST(QueueTimeout, DelayMovesWhatWaitedTooLongBehindFreshWork) {
  Recorder r;
  IntSubmitter s(r.model(), {.policy = EveryN{1},
                             .default_timeout = 10ms,
                             .on_timeout = TimeoutAction::kDelay,
                             .clock = &fake_now});
  auto blocker = s.submit(0);
  r.gate.wait_entered(1);
  auto old = s.submit(1);
  auto own_deadline = s.submit(2, fake_now() + 1h);
  advance(11ms);
  auto fresh_a = s.submit(3);
  auto fresh_b = s.submit(4);
  r.gate.open = true;
  EXPECT_EQ(old.get(), 1);
  EXPECT_EQ(own_deadline.get(), 2);
  EXPECT_EQ(fresh_a.get(), 3);
  EXPECT_EQ(fresh_b.get(), 4);
  blocker.get();
  s.shutdown();
  EXPECT_EQ(r.order, (std::vector<int>{0, 2, 3, 4, 1}));
  EXPECT_EQ(s.stats().delayed, 1u);
  EXPECT_EQ(s.stats().expired, 0u);
}

// A delayed request still completes on shutdown's drain, and a cancel while it is delayed
// completes it at once, unrun.
TEST(QueueTimeout, DelayedRequestsDrainAndCancel) {
  Gate first, second;
  std::mutex mutex;
  std::vector<int> order;
  IntSubmitter s(
      [&](int& x) {
        if (x == 0) first.pass();
        if (x == 300) second.pass();
        std::lock_guard lock(mutex);
        order.push_back(x);
        return x;
      },
      {.policy = EveryN{1},
       .default_timeout = 10ms,
       .on_timeout = TimeoutAction::kDelay,
       .priority_levels = 2,
       .clock = &fake_now});
  auto blocker = s.submit(0);
  first.wait_entered(1);
  auto kept = s.submit(1);
  auto cancelled = s.submit(2);
  advance(11ms);
  auto fresh = s.submit(300, RequestOptions{.priority = 1});
  first.open = true;
  second.wait_entered(1);  // both old requests were moved to the delayed lane before it
  EXPECT_EQ(s.stats().delayed, 2u);
  cancelled.cancel();
  EXPECT_EQ(code_of(cancelled), ErrorCode::kCancelled);
  second.open = true;
  s.shutdown();
  EXPECT_EQ(kept.get(), 1);
  EXPECT_EQ(fresh.get(), 300);
  blocker.get();
  EXPECT_EQ(order, (std::vector<int>{0, 300, 1}));
  EXPECT_EQ(s.stats().completed, 4u);
  EXPECT_EQ(s.stats().cancelled, 1u);
}

// Shedding on a fake clock with a model that takes exactly 10 ms a batch: with 4 requests
// queued and one running, a request needs 50 ms to start; its level counts only what is ahead
// of it.
TEST(QueuePolicy, ShedLatePredictsFromTheQueueAheadAndTheBatchTime) {
  Gate gate;
  IntSubmitter s(
      [&](int& x) {
        if (x == 0) gate.pass();
        advance(10ms);
        return x;
      },
      {.policy = EveryN{1}, .shed_late = true, .priority_levels = 2, .clock = &fake_now});
  for (int i = 1; i <= 3; ++i) s.submit(i).get();  // the mean batch time: 10 ms
  auto blocker = s.submit(0);
  gate.wait_entered(1);
  std::vector<Future<int>> queued;
  for (int i = 0; i < 4; ++i) queued.push_back(s.submit(100 + i, RequestOptions{.priority = 1}));
  auto refused = [&](Clock::duration left, std::size_t level) {
    try {
      queued.push_back(
          s.submit(1, RequestOptions{.deadline = fake_now() + left, .priority = level}));
      return false;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kOverloaded);
      return true;
    }
  };
  EXPECT_TRUE(refused(9ms, 0));    // level 0: only the running batch is ahead, 10 ms
  EXPECT_FALSE(refused(11ms, 0));  // accepted: now ahead of every level-1 request
  EXPECT_TRUE(refused(59ms, 1));   // level 1: 5 queued + 1 running, 60 ms
  EXPECT_FALSE(refused(61ms, 1));
  gate.open = true;
  for (auto& f : queued) f.get();
  blocker.get();
  s.shutdown();
  EXPECT_EQ(s.stats().shed, 2u);
}

// MultiDeviceSubmitter passes the level through to the replica, and the Asio front end too.
TEST(Priority, MultiDeviceAndAsyncSubmitPassTheLevelThrough) {
  Recorder r;
  std::vector<Replica<int, int, NoSyncBackend>> replicas;
  replicas.push_back({r.model(), {}});
  MultiDeviceSubmitter<int, int> m(std::move(replicas),
                                   {.policy = EveryN{1}, .priority_levels = 2});
  auto blocker = m.submit(0);
  r.gate.wait_entered(1);
  std::vector<Future<int>> fs;
  for (int i = 0; i < 2; ++i) fs.push_back(m.submit(100 + i, RequestOptions{.priority = 1}));
  std::atomic<int> got{0};
  m.submit_then(
      200, [&](std::exception_ptr e, int v) { got = e ? -1 : v; }, RequestOptions{.priority = 0});
  auto via_asio = async_submit(m, 201, boost::asio::use_future, RequestOptions{.priority = 0});
  r.gate.open = true;
  for (auto& f : fs) f.get();
  EXPECT_EQ(via_asio.get(), 201);
  blocker.get();
  m.shutdown();
  EXPECT_EQ(got.load(), 200);
  EXPECT_EQ(levels(r.order), "HHLL");
  EXPECT_THROW(m.submit(1, RequestOptions{.priority = 2}), Error);
}

// 32 producers on three levels, with cancellations, queue timeouts (DELAY), a starvation limit
// and the Adaptive policy: every request completes exactly once, with its value or kCancelled,
// and the counters add up.
TEST(Priority, StressWithEveryFeatureLosesNothing) {
  std::atomic<int> ran{0};
  BatchedSubmitter<int, int> s(BatchModel<int, int>{[&](Batch<int, int>& b) {
                                 for (std::size_t i = 0; i < b.size(); ++i) {
                                   b.set_value(i, b.input(i) * 2);
                                   ran.fetch_add(1);
                                 }
                               }},
                               {.queue_capacity = 64,
                                .workers = 2,
                                .policy = Adaptive(2ms, 1, 64),
                                .default_timeout = 200us,
                                .on_timeout = TimeoutAction::kDelay,
                                .priority_levels = 3,
                                .starvation_limit = 4});
  constexpr int kProducers = 32, kEach = 300;
  std::atomic<int> values{0}, cancels{0}, wrong{0};
  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p)
    producers.emplace_back([&, p] {
      std::vector<Future<int>> fs;
      for (int i = 0; i < kEach; ++i) {
        const int x = p * kEach + i;
        fs.push_back(s.submit(x, RequestOptions{.priority = static_cast<std::size_t>(x % 3)}));
        if (i % 7 == 3) fs.back().cancel();
      }
      for (int i = 0; i < kEach; ++i) {
        try {
          if (fs[i].get() == 2 * (p * kEach + i)) {
            values.fetch_add(1);
          } else {
            wrong.fetch_add(1);
          }
        } catch (const Error& e) {
          (e.code() == ErrorCode::kCancelled ? cancels : wrong).fetch_add(1);
        }
      }
    });
  for (auto& t : producers) t.join();
  s.shutdown();
  const auto st = s.stats();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(values.load() + cancels.load(), kProducers * kEach);
  EXPECT_LE(values.load(), ran.load());  // a request cancelled while it ran ran too
  EXPECT_EQ(st.submitted, static_cast<std::uint64_t>(kProducers * kEach));
  EXPECT_EQ(st.completed, st.submitted);
  EXPECT_EQ(st.cancelled, static_cast<std::uint64_t>(cancels.load()));
  EXPECT_GT(cancels.load(), 0);
}

}  // namespace
}  // namespace syncbatch
