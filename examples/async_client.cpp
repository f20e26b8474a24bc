// async_client: Boost.Asio coroutines awaiting a stacked-mode BatchedSubmitter.
//
// An io_context thread runs C coroutine clients (a server would run one per connection); each
// awaits its result with `co_await async_submit(..., use_awaitable)` without blocking a thread.
// The submitter stacks concurrent requests into one forward per batch. Prints what happened.
//
// Usage: async_client [clients] [requests-per-client]
#include <torch/torch.h>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "syncbatch/asio.hpp"
#include "syncbatch/torch.hpp"

namespace asio = boost::asio;

int main(int argc, char** argv) {
  const int clients = argc > 1 ? std::atoi(argv[1]) : 32;
  const int per_client = argc > 2 ? std::atoi(argv[2]) : 100;
  if (clients <= 0 || per_client <= 0) {
    std::fprintf(stderr, "usage: async_client [clients > 0] [requests-per-client > 0]\n");
    return 2;
  }
  const c10::Device device = syncbatch::default_device();
  torch::NoGradGuard no_grad;
  torch::nn::Sequential model(torch::nn::Linear(64, 128), torch::nn::ReLU(),
                              torch::nn::Linear(128, 8));
  model->to(device);

  syncbatch::BatchedSubmitter<torch::Tensor, torch::Tensor, syncbatch::TorchBackend> submitter(
      syncbatch::make_stacked_model([&](const torch::Tensor& x) { return model->forward(x); },
                                    {.device = device, .output_device = torch::kCPU}),
      {.policy = syncbatch::TimeBased{std::chrono::microseconds(200), 64}},
      syncbatch::TorchBackend(device));

  asio::io_context io;
  int ok = 0, failed = 0;  // touched only on the io_context thread
  auto client = [&](int id) -> asio::awaitable<void> {
    for (int i = 0; i < per_client; ++i) {
      const torch::Tensor x = torch::randn({1, 64});  // arrives on the CPU, like a request body
      try {
        // Completes on this coroutine's executor: the io_context thread, never a worker.
        const torch::Tensor y = co_await syncbatch::async_submit(submitter, x, asio::use_awaitable);
        ok += (y.size(0) == 1 && y.size(1) == 8) ? 1 : 0;
      } catch (const std::exception& e) {
        ++failed;
        std::fprintf(stderr, "client %d: %s\n", id, e.what());
      }
    }
  };
  // `deferred` works too: the operation starts when launched with a token. Here with a deadline
  // already passed, to show a request that fails alone with a clear error.
  auto late = [&]() -> asio::awaitable<void> {
    auto op = syncbatch::async_submit(submitter, torch::randn({1, 64}), asio::deferred,
                                      syncbatch::Clock::now() - std::chrono::seconds(1));
    try {
      co_await std::move(op)(asio::use_awaitable);
    } catch (const syncbatch::Error& e) {
      std::printf("a request past its deadline: %s\n", e.what());
    }
  };

  const auto start = std::chrono::steady_clock::now();
  for (int c = 0; c < clients; ++c) asio::co_spawn(io, client(c), asio::detached);
  asio::co_spawn(io, late(), asio::detached);
  io.run();  // one thread serves every client
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  submitter.shutdown();
  const auto st = submitter.stats();
  std::printf(
      "%d coroutine clients on one thread, device %s: %d ok, %d failed, %.0f req/s, "
      "mean batch %.1f, p50 %.0f us, p99 %.0f us\n",
      clients, device.str().c_str(), ok, failed, ok / seconds, st.mean_batch_size(),
      st.latency.p50.count() / 1e3, st.latency.p99.count() / 1e3);
  return ok == clients * per_client && failed == 0 ? 0 : 1;
}
