// async_submit with each kind of Asio completion token. Torch-free: runs under TSan and ASan.
#include "syncbatch/asio.hpp"
#include "syncbatch/multi_device.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>
#include <thread>
#include <vector>

namespace syncbatch {
namespace {

namespace asio = boost::asio;
using IntSubmitter = BatchedSubmitter<int, int>;

IntSubmitter make_submitter(std::size_t workers = 1) {
  return IntSubmitter(BatchModel<int, int>{[](Batch<int, int>& b) {
                        for (std::size_t i = 0; i < b.size(); ++i) {
                          if (b.input(i) < 0)
                            b.set_error(i, std::make_exception_ptr(std::domain_error("negative")));
                          else
                            b.set_value(i, b.input(i) * 2);
                        }
                      }},
                      {.workers = workers, .policy = EveryN{8}});
}

TEST(AsyncSubmit, UseFuture) {
  auto s = make_submitter();
  std::future<int> f = async_submit(s, 21, asio::use_future);
  EXPECT_EQ(f.get(), 42);
  std::future<int> bad = async_submit(s, -1, asio::use_future);
  EXPECT_THROW(bad.get(), std::domain_error);
}

// async_submit takes any Submitter: MultiDeviceSubmitter too, with a coroutine as the token.
TEST(AsyncSubmit, AcceptsAMultiDeviceSubmitter) {
  static_assert(Submitter<IntSubmitter>);
  static_assert(Submitter<MultiDeviceSubmitter<int, int>>);
  static_assert(!Submitter<int>);
  std::vector<Replica<int, int, NoSyncBackend>> replicas;
  for (int r = 0; r < 2; ++r)
    replicas.push_back({PerCallModel<int, int>([r](int& x) { return x * 10 + r; }), {}});
  MultiDeviceSubmitter<int, int> s(std::move(replicas), {.policy = EveryN{4}});
  EXPECT_EQ(async_submit(s, 4, asio::use_future).get() / 10, 4);
  asio::io_context io;
  std::vector<int> got;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        for (int i = 0; i < 20; ++i)
          got.push_back(co_await async_submit(s, i, asio::use_awaitable));
      },
      asio::detached);
  io.run();
  ASSERT_EQ(got.size(), 20u);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(got[i] / 10, i) << "replica " << got[i] % 10;
}

// A submitter whose model holds request 0 until `open`, so later requests stay queued.
struct HeldSubmitter {
  std::atomic<bool> open{false};
  std::atomic<bool> entered{false};
  std::vector<int> ran;  // written by the worker, read after shutdown()
  IntSubmitter s{[this](int& x) {
                   if (x == 0) {
                     entered = true;
                     while (!open.load())
                       std::this_thread::sleep_for(std::chrono::microseconds(100));
                   }
                   ran.push_back(x);
                   return x * 2;
                 },
                 {.policy = EveryN{1}}};
  void hold() {
    s.submit_then(0, [](std::exception_ptr, int) {});
    while (!entered.load()) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
};

bool is_cancelled(const std::exception_ptr& e) {
  try {
    if (e) std::rethrow_exception(e);
  } catch (const Error& err) {
    return err.code() == ErrorCode::kCancelled;
  } catch (...) {
  }
  return false;
}

TEST(AsyncSubmit, ABoundCancellationSignalCancelsTheRequest) {
  HeldSubmitter h;
  h.hold();
  asio::io_context io;
  asio::cancellation_signal signal;
  std::exception_ptr error;
  int calls = 0;
  async_submit(h.s, 5,
               asio::bind_cancellation_slot(signal.slot(),
                                            asio::bind_executor(io, [&](std::exception_ptr e, int) {
                                              ++calls;
                                              error = e;
                                            })));
  asio::post(io, [&] { signal.emit(asio::cancellation_type::terminal); });
  io.run();  // returns once the handler ran: outstanding work is tracked
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE(is_cancelled(error));
  h.open = true;
  h.s.shutdown();
  EXPECT_EQ(h.ran, std::vector<int>{0}) << "the cancelled request ran";
  EXPECT_EQ(h.s.stats().cancelled, 1u);
}

// The || awaitable operator with a timer: the timer wins, the request is cancelled and never
// runs; the other way round, the request wins and the timer is cancelled.
TEST(AsyncSubmit, OrWithATimerCancelsTheLoser) {
  using namespace asio::experimental::awaitable_operators;
  HeldSubmitter h;
  h.hold();
  asio::io_context io;
  std::size_t winner = 99;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        asio::steady_timer timer(co_await asio::this_coro::executor, std::chrono::milliseconds(20));
        auto r = co_await (async_submit(h.s, 5, asio::use_awaitable) ||
                           timer.async_wait(asio::use_awaitable));
        winner = r.index();
      },
      asio::detached);
  io.run();
  EXPECT_EQ(winner, 1u) << "the timer should win while the request is held in the queue";
  h.open = true;
  int value = 0;
  asio::io_context io2;
  asio::co_spawn(
      io2,
      [&]() -> asio::awaitable<void> {
        asio::steady_timer timer(co_await asio::this_coro::executor, std::chrono::seconds(30));
        auto r = co_await (async_submit(h.s, 7, asio::use_awaitable) ||
                           timer.async_wait(asio::use_awaitable));
        winner = r.index();
        if (r.index() == 0) value = std::get<0>(r);
      },
      asio::detached);
  io2.run();
  EXPECT_EQ(winner, 0u);
  EXPECT_EQ(value, 14);
  h.s.shutdown();
  EXPECT_EQ(h.ran, (std::vector<int>{0, 7}));
  EXPECT_EQ(h.s.stats().cancelled, 1u);
}

TEST(AsyncSubmit, CallbackRunsOnItsExecutorNotTheWorker) {
  auto s = make_submitter();
  asio::io_context io;
  const auto io_thread = std::this_thread::get_id();
  std::vector<int> got;
  for (int i = 0; i < 50; ++i) {
    async_submit(s, i, asio::bind_executor(io, [&](std::exception_ptr e, int v) {
                   EXPECT_FALSE(e);
                   EXPECT_EQ(std::this_thread::get_id(), io_thread);
                   got.push_back(v);
                 }));
  }
  io.run();  // returns only when every completion ran: outstanding work is tracked
  ASSERT_EQ(got.size(), 50u);
  std::sort(got.begin(), got.end());
  for (int i = 0; i < 50; ++i) EXPECT_EQ(got[i], 2 * i);
}

TEST(AsyncSubmit, CoroutinesWithUseAwaitable) {
  auto s = make_submitter(2);
  asio::io_context io;
  std::atomic<int> ok{0}, errors{0};
  auto client = [&](int base) -> asio::awaitable<void> {
    for (int i = 0; i < 100; ++i) {
      const int x = (i % 10 == 9) ? -1 : base + i;
      try {
        const int y = co_await async_submit(s, x, asio::use_awaitable);
        if (y == 2 * x) ok.fetch_add(1);
      } catch (const std::domain_error&) {
        errors.fetch_add(1);
      }
    }
  };
  for (int c = 0; c < 16; ++c) asio::co_spawn(io, client(c * 1000), asio::detached);
  io.run();
  EXPECT_EQ(ok.load(), 16 * 90);
  EXPECT_EQ(errors.load(), 16 * 10);
}

TEST(AsyncSubmit, RefusedRequestsCompleteWithTheErrorThroughTheToken) {
  auto s = make_submitter();
  s.shutdown();
  std::future<int> f = async_submit(s, 1, asio::use_future);
  try {
    f.get();
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kShutDown);
  }
}

// 32 producers mixing submit(), submit_then() and async_submit() under load: nothing lost.
// The || operator on a multi-threaded io_context, as a server runs it: each coroutine on a
// strand of its own (the operator's two branches and the cancellation it emits to the loser
// must not run on two threads at once), a short timer racing each request. Every race ends
// once, with the request's value or the timer, and the submitter's counters add up.
TEST(AsyncSubmit, StressOrWithTimersOnAMultiThreadedIoContext) {
  using namespace asio::experimental::awaitable_operators;
  // Batches take 50 us or more, so that the timers (0 to 199 us) win some races and lose others
  // on any machine.
  IntSubmitter s(BatchModel<int, int>{[](Batch<int, int>& b) {
                   std::this_thread::sleep_for(std::chrono::microseconds(50));
                   for (std::size_t i = 0; i < b.size(); ++i) b.set_value(i, b.input(i) * 2);
                 }},
                 {.workers = 2, .policy = EveryN{8}});
  asio::io_context io;
  constexpr int kCoroutines = 64, kRounds = 200;
  std::atomic<int> values{0}, timeouts{0}, wrong{0}, finished{0};
  for (int c = 0; c < kCoroutines; ++c) {
    asio::co_spawn(
        asio::make_strand(io),
        [&, c]() -> asio::awaitable<void> {
          auto ex = co_await asio::this_coro::executor;
          for (int i = 0; i < kRounds; ++i) {
            const int x = c * 10000 + i;
            asio::steady_timer timer(ex, std::chrono::microseconds((x * 37) % 200));
            auto r = co_await (async_submit(s, x, asio::use_awaitable) ||
                               timer.async_wait(asio::use_awaitable));
            if (r.index() == 0) {
              values.fetch_add(1);
              if (std::get<0>(r) != 2 * x) wrong.fetch_add(1);
            } else {
              timeouts.fetch_add(1);
            }
          }
          finished.fetch_add(1);
        },
        [](std::exception_ptr e) {
          if (e) std::rethrow_exception(e);
        });
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back([&] { io.run(); });
  for (auto& t : threads) t.join();
  s.shutdown();
  EXPECT_EQ(finished.load(), kCoroutines);
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(values.load() + timeouts.load(), kCoroutines * kRounds);
  EXPECT_GT(values.load(), 0) << "no request beat its timer: the race was not run";
  EXPECT_GT(timeouts.load(), 0) << "no timer beat its request: the race was not run";
  const SubmitterStats st = s.stats();
  EXPECT_EQ(st.submitted, static_cast<std::uint64_t>(kCoroutines * kRounds));
  EXPECT_EQ(st.completed, st.submitted);
  // A timer that won may have lost the race to cancel a request already running: that request
  // completed with its value, unseen here.
  EXPECT_LE(st.cancelled, static_cast<std::uint64_t>(timeouts.load()));
}

TEST(AsyncSubmit, StressMixedSyncAndAsyncProducers) {
  auto s = make_submitter(2);
  asio::thread_pool pool(2);
  std::atomic<int> done{0}, wrong{0};
  std::vector<std::thread> producers;
  for (int p = 0; p < 32; ++p) {
    producers.emplace_back([&, p] {
      std::vector<std::future<int>> futures;
      for (int i = 0; i < 500; ++i) {
        const int x = p * 1000 + i;
        if (i % 2 == 0) {
          futures.push_back(async_submit(s, x, asio::bind_executor(pool, asio::use_future)));
        } else {
          if (s.submit(x).get() != 2 * x) wrong.fetch_add(1);
          done.fetch_add(1);
        }
      }
      for (int i = 0; i < 250; ++i) {
        if (futures[i].get() != 2 * (p * 1000 + 2 * i)) wrong.fetch_add(1);
        done.fetch_add(1);
      }
    });
  }
  for (auto& t : producers) t.join();
  pool.join();
  s.shutdown();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(done.load(), 32 * 500);
  EXPECT_EQ(s.stats().completed, 32u * 500u);
}

}  // namespace
}  // namespace syncbatch
