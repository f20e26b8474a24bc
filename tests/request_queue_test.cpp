// detail::RequestQueue: the bounded queue's wake-ups and drain, under races that once lost a
// worker. Torch-free: this file also runs under TSan and ASan.
#include "syncbatch/detail/request_queue.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "syncbatch/batched_submitter.hpp"
#include "syncbatch/detail/spin.hpp"

namespace syncbatch {
namespace {

using namespace std::chrono_literals;

// Regression: a producer that won the wake-up flag late (after the worker had already seen its
// item) sent a stale notify; the worker went back to sleep without re-arming the flag, and the
// next pushes did not wake it. Windowed producers with a no-op model hit it within seconds.
// Close while consumers sleep and producers push into a full queue: every consumer must see the
// drain. Two races once left a worker asleep for good: another consumer's pop took the last
// item, or a push that found the queue full held the count up until after close().
TEST(RequestQueue, EveryConsumerSeesTheDrainAfterClose) {
  using Queue = detail::RequestQueue<int*>;
  int item = 0;
  for (int round = 0; round < 1000; ++round) {
    Queue q(2);
    std::atomic<int> pushed{0}, popped{0}, finished{0};
    std::vector<std::thread> threads;
    for (int c = 0; c < 3; ++c)
      threads.emplace_back([&] {
        for (;;) {
          if (q.try_pop() != nullptr) {
            popped.fetch_add(1);
            continue;
          }
          if (q.drained()) break;
          q.wait(std::chrono::steady_clock::time_point::max(), /*return_on_close=*/false);
        }
        finished.fetch_add(1);
      });
    for (int p = 0; p < 2; ++p)
      threads.emplace_back([&] {
        for (int i = 0; i < 20; ++i)
          if (q.try_push(&item) == Queue::PushResult::kOk) pushed.fetch_add(1);
        finished.fetch_add(1);
      });
    for (int spin = 0; spin < round % 64; ++spin) detail::cpu_relax();
    q.close();
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    while (finished.load() < 5 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(100us);
    if (finished.load() < 5) {
      std::fprintf(stderr, "round %d: a consumer slept through the drain\n", round);
      std::abort();  // its thread cannot be joined
    }
    for (auto& t : threads) t.join();
    ASSERT_EQ(popped.load(), pushed.load()) << "round " << round;
  }
}

TEST(RequestQueue, WindowedProducersNeverStall) {
  BatchedSubmitter<int, int> s([](int& x) { return x + 1; },
                               {.queue_capacity = 1024, .policy = EveryN{64}});
  std::atomic<bool> stop{false};
  std::atomic<int> stalls{0};
  std::vector<std::thread> producers;
  for (int p = 0; p < 4; ++p) {
    producers.emplace_back([&] {
      std::vector<Future<int>> window;
      for (int i = 0; !stop.load(); ++i) {
        window.push_back(s.submit(i));
        if (window.size() < 64) continue;
        for (auto& f : window) {
          if (!f.wait_for(std::chrono::seconds(10))) {
            stalls.fetch_add(1);
            stop = true;
            return;
          }
          f.get();
        }
        window.clear();
      }
      for (auto& f : window) f.get();
    });
  }
  std::this_thread::sleep_for(std::chrono::seconds(3));
  stop = true;
  for (auto& t : producers) t.join();
  EXPECT_EQ(stalls.load(), 0) << "a request waited 10 s in the queue: a lost wake-up";
}

}  // namespace
}  // namespace syncbatch
