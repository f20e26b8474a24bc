// Cancelling requests at every stage (queued, forming a batch, running), racing completion, and
// mixed into a many-producer stress: every request completes exactly once, with its value or
// Error(kCancelled), and the stats count it. Torch-free: this file also runs under TSan and ASan.
#include "syncbatch/batched_submitter.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gate.hpp"

namespace syncbatch {
namespace {

using namespace std::chrono_literals;
using IntSubmitter = BatchedSubmitter<int, int>;

using testing::Gate;

// The value, or -1 for kCancelled; any other outcome fails the test.
int outcome(Future<int>& f) {
  try {
    return f.get();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kCancelled) << e.what();
    return -1;
  }
}

TEST(Cancellation, AQueuedRequestCompletesAtOnceAndIsNeverRun) {
  Gate gate;
  std::vector<int> ran;  // written by the worker, read after shutdown()
  IntSubmitter s(
      [&](int& x) {
        if (x == 0) gate.pass();
        ran.push_back(x);
        return x * 10;
      },
      {.policy = EveryN{1}});
  auto blocker = s.submit(0);
  gate.wait_entered(1);  // the worker is inside the model; the next requests stay queued
  auto cancelled = s.submit(1);
  auto kept = s.submit(2);
  cancelled.cancel();
  EXPECT_TRUE(cancelled.ready()) << "a queued request completes on the cancelling thread";
  try {
    cancelled.get();
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kCancelled);
    EXPECT_NE(std::string(e.what()).find("while it was queued"), std::string::npos) << e.what();
  }
  gate.open = true;
  EXPECT_EQ(blocker.get(), 0);
  EXPECT_EQ(kept.get(), 20);
  s.shutdown();
  EXPECT_EQ(ran, (std::vector<int>{0, 2})) << "the cancelled request ran";
  const SubmitterStats st = s.stats();
  EXPECT_EQ(st.cancelled, 1u);
  EXPECT_EQ(st.completed, 3u);
  EXPECT_EQ(st.failed, 1u);
}

// Batch mode: a request the worker has taken, held in a forming batch (TimeBased{1s}), is
// left out of the model call when cancelled.
TEST(Cancellation, ARequestInAFormingBatchIsLeftOutOfTheModelCall) {
  auto seen = std::make_shared<std::vector<int>>();
  IntSubmitter s(BatchModel<int, int>{[seen](Batch<int, int>& b) {
                   for (std::size_t i = 0; i < b.size(); ++i) {
                     seen->push_back(b.input(i));
                     b.set_value(i, b.input(i) * 10);
                   }
                 }},
                 {.policy = TimeBased{1s, 64}});
  auto cancelled = s.submit(1);
  auto kept = s.submit(2);
  while (s.stats().queued != 0) std::this_thread::sleep_for(100us);  // both taken, held
  cancelled.cancel();
  EXPECT_FALSE(cancelled.ready()) << "a taken request completes at its batch, not at once";
  try {
    cancelled.get();
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kCancelled);
    EXPECT_NE(std::string(e.what()).find("before its batch ran"), std::string::npos) << e.what();
  }
  EXPECT_EQ(kept.get(), 20);
  s.shutdown();
  EXPECT_EQ(*seen, std::vector<int>{2});
  EXPECT_EQ(s.stats().cancelled, 1u);
}

// A running request cancelled before its batch completes gets kCancelled, its result dropped;
// one cancelled after it completed keeps its value.
TEST(Cancellation, ARunningRequestCompletesCancelledUnlessItFinishedFirst) {
  Gate gate;
  IntSubmitter s(BatchModel<int, int>{[&](Batch<int, int>& b) {
                   gate.pass();
                   for (std::size_t i = 0; i < b.size(); ++i) b.set_value(i, b.input(i) * 10);
                 }},
                 {.policy = EveryN{8}});
  auto running = s.submit(1);
  gate.wait_entered(1);  // its batch is inside the model
  running.cancel();
  gate.open = true;
  try {
    running.get();
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kCancelled);
    EXPECT_NE(std::string(e.what()).find("while its batch ran"), std::string::npos) << e.what();
  }
  auto done = s.submit(2);
  done.wait();
  done.cancel();  // too late: completed
  EXPECT_EQ(done.get(), 20);
  s.shutdown();
  EXPECT_EQ(s.stats().cancelled, 1u);
  EXPECT_EQ(s.stats().failed, 1u);
}

TEST(Cancellation, SubmitThenReturnsAHandleAndCallsBackOnce) {
  Gate gate;
  IntSubmitter s(
      [&](int& x) {
        if (x == 0) gate.pass();
        return x;
      },
      {.policy = EveryN{1}});
  std::atomic<int> calls{0}, cancelled{0};
  auto on_done = [&](std::exception_ptr e, int) {
    calls.fetch_add(1);
    if (e) cancelled.fetch_add(1);
  };
  const Cancellation<int> blocker = s.submit_then(0, on_done);
  gate.wait_entered(1);
  const Cancellation<int> queued = s.submit_then(1, on_done);
  ASSERT_TRUE(queued);
  queued.cancel();
  queued.cancel();  // twice: still one completion
  EXPECT_EQ(calls.load(), 1) << "a queued request's callback runs at the cancel";
  gate.open = true;
  s.shutdown();
  const Cancellation<int> refused = s.submit_then(2, on_done);  // refused: empty handle
  EXPECT_FALSE(refused);
  refused.cancel();
  EXPECT_EQ(calls.load(), 3);
  EXPECT_EQ(cancelled.load(), 2);  // the cancelled one, and the refused one's kShutDown
  (void)blocker;
}

// Cancel racing completion, round after round: each request completes exactly once, with its
// value or kCancelled, in both modes, and the stats agree.
TEST(Cancellation, CancelRacingCompletionCompletesEachRequestExactlyOnce) {
  for (bool batch_mode : {false, true}) {
    auto per_call = [](int& x) { return x + 1; };
    auto batched = BatchModel<int, int>{[](Batch<int, int>& b) {
      for (std::size_t i = 0; i < b.size(); ++i) b.set_value(i, b.input(i) + 1);
    }};
    IntSubmitter s = batch_mode ? IntSubmitter(batched, {.workers = 2, .policy = EveryN{16}})
                                : IntSubmitter(per_call, {.workers = 2, .policy = EveryN{16}});
    constexpr int kRounds = 3000;
    std::mt19937 rng(batch_mode ? 11 : 7);
    int values = 0, cancels = 0;
    for (int round = 0; round < kRounds; ++round) {
      auto f = s.submit(round);
      std::thread canceller([&f, spins = rng() % 64] {
        for (unsigned i = 0; i < spins; ++i) detail::cpu_relax();
        f.cancel();
      });
      canceller.join();
      const int got = outcome(f);
      if (got == -1) {
        ++cancels;
      } else {
        EXPECT_EQ(got, round + 1);
        ++values;
      }
    }
    s.shutdown();
    const SubmitterStats st = s.stats();
    EXPECT_EQ(values + cancels, kRounds);
    EXPECT_EQ(st.completed, static_cast<std::uint64_t>(kRounds));
    EXPECT_EQ(st.cancelled, static_cast<std::uint64_t>(cancels));
    std::printf("%s: %d values, %d cancelled\n", batch_mode ? "batch" : "per-call", values,
                cancels);
  }
}

// The many-producer stress with cancellations mixed in: 32 producers, blocking and callback
// requests, a third cancelled at random moments; nothing lost, nothing completed twice.
TEST(Cancellation, ThirtyTwoProducersWithCancellationsLoseNothing) {
  IntSubmitter s(BatchModel<int, int>{[](Batch<int, int>& b) {
                   for (std::size_t i = 0; i < b.size(); ++i) b.set_value(i, b.input(i) * 2);
                 }},
                 {.queue_capacity = 256, .workers = 2, .policy = EveryN{32}});
  constexpr int kProducers = 32, kEach = 300;
  std::vector<std::unique_ptr<std::atomic<int>>> callbacks;
  for (int i = 0; i < kProducers * kEach; ++i)
    callbacks.push_back(std::make_unique<std::atomic<int>>(0));
  std::atomic<int> wrong{0}, cancelled{0}, values{0};
  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p)
    producers.emplace_back([&, p] {
      std::mt19937 rng(p);
      std::vector<std::pair<int, Future<int>>> futures;
      for (int i = 0; i < kEach; ++i) {
        const int id = p * kEach + i;
        const bool cancel = rng() % 3 == 0;
        if (i % 2 == 0) {
          futures.emplace_back(id, s.submit(id));
          if (cancel) futures.back().second.cancel();
        } else {
          const Cancellation<int> c = s.submit_then(id, [&, id](std::exception_ptr e, int v) {
            callbacks[id]->fetch_add(1);
            if (e) {
              cancelled.fetch_add(1);
            } else {
              values.fetch_add(1);
              if (v != id * 2) wrong.fetch_add(1);
            }
          });
          if (cancel) c.cancel();
        }
      }
      for (auto& [id, f] : futures) {
        const int got = outcome(f);
        if (got == -1) {
          cancelled.fetch_add(1);
        } else {
          values.fetch_add(1);
          if (got != id * 2) wrong.fetch_add(1);
        }
      }
    });
  for (auto& t : producers) t.join();
  s.shutdown();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(values.load() + cancelled.load(), kProducers * kEach);
  for (int id = 1; id < kProducers * kEach; id += 2)
    ASSERT_EQ(callbacks[id]->load(), 1) << "callback of request " << id;
  const SubmitterStats st = s.stats();
  EXPECT_EQ(st.completed, static_cast<std::uint64_t>(kProducers * kEach));
  EXPECT_EQ(st.cancelled, static_cast<std::uint64_t>(cancelled.load()));
  EXPECT_GT(cancelled.load(), 0);
}

}  // namespace
}  // namespace syncbatch
