// async_submit with each kind of Asio completion token. Torch-free: runs under TSan and ASan.
#include "syncbatch/asio.hpp"
#include "syncbatch/multi_device.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/strand.hpp>
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
