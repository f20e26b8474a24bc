// BatchedSubmitter in per-call mode against real LibTorch models and real threads.
#include <gtest/gtest.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "syncbatch/torch.hpp"
#include "torch_test_support.hpp"

namespace syncbatch {
namespace {

using testing::available_devices;
using testing::device_name;
using testing::Mlp;
using testing::TensorSubmitter;

class PerCallOnEachDevice : public ::testing::TestWithParam<c10::Device> {};

TEST_P(PerCallOnEachDevice, StressSixteenProducersEveryResultEqualsTheModel) {
  const c10::Device device = GetParam();
  constexpr int kProducers = 16;
  constexpr int kPerProducer = 5000;
  const Mlp mlp(32, 64, 8, device);
  TensorSubmitter submitter([&](at::Tensor& x) { return mlp(x); },
                            {.queue_capacity = 512, .workers = 2, .policy = EveryN{16}},
                            TorchBackend(device));
  std::atomic<int> mismatches{0};
  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p) {
    producers.emplace_back([&, p] {
      c10::InferenceMode guard;
      at::manual_seed(p);
      const auto inputs = at::randn({kPerProducer, 1, 32}).to(device);
      std::vector<Future<at::Tensor>> futures;
      futures.reserve(kPerProducer);
      for (int i = 0; i < kPerProducer; ++i) futures.push_back(submitter.submit(inputs[i]));
      for (int i = 0; i < kPerProducer; ++i) {
        const at::Tensor got = futures[i].get();
        const at::Tensor want = mlp(inputs[i]);
        if (!at::equal(got.cpu(), want.cpu())) mismatches.fetch_add(1);
      }
    });
  }
  for (auto& t : producers) t.join();
  submitter.shutdown();
  EXPECT_EQ(mismatches.load(), 0);
  const auto st = submitter.stats();
  constexpr std::uint64_t kTotal = kProducers * kPerProducer;
  EXPECT_EQ(st.submitted, kTotal);
  EXPECT_EQ(st.completed, kTotal);
  EXPECT_EQ(st.failed, 0u);
  EXPECT_EQ(st.syncs, st.batches);
  EXPECT_GE(st.batches, kTotal / 16);
  for (std::size_t b = 5; b < SubmitterStats::kBuckets; ++b)
    EXPECT_EQ(st.batch_size_histogram[b], 0u) << "a batch exceeded EveryN{16}";
}

TEST_P(PerCallOnEachDevice, ABadInputFailsAloneWithTorchsError) {
  const c10::Device device = GetParam();
  const Mlp mlp(32, 64, 8, device);
  TensorSubmitter submitter([&](at::Tensor& x) { return mlp(x); }, {.policy = EveryN{8}},
                            TorchBackend(device));
  std::vector<Future<at::Tensor>> futures;
  std::vector<at::Tensor> inputs;
  for (int i = 0; i < 64; ++i) {
    // Every 10th input has the wrong width: the model throws on it alone.
    inputs.push_back(at::randn({1, i % 10 == 0 ? 31 : 32}).to(device));
    futures.push_back(submitter.submit(inputs.back()));
  }
  for (int i = 0; i < 64; ++i) {
    if (i % 10 == 0) {
      try {
        futures[i].get();
        ADD_FAILURE() << "input " << i << " has the wrong shape";
      } catch (const c10::Error& e) {
        EXPECT_NE(std::string(e.what()).find("31"), std::string::npos) << e.what();
      }
    } else {
      EXPECT_TRUE(at::equal(futures[i].get().cpu(), mlp(inputs[i]).cpu())) << i;
    }
  }
  submitter.shutdown();
  EXPECT_EQ(submitter.stats().failed, 7u);
  EXPECT_EQ(submitter.stats().completed, 64u);
}

TEST_P(PerCallOnEachDevice, ShutdownMidFlightCompletesEveryAcceptedRequest) {
  const c10::Device device = GetParam();
  const Mlp mlp(32, 64, 8, device);
  auto submitter = std::make_unique<TensorSubmitter>(
      [&](at::Tensor& x) { return mlp(x); },
      SubmitterOptions{.queue_capacity = 128, .workers = 2, .policy = TimeBased{{}, 32}},
      TorchBackend(device));
  std::atomic<std::uint64_t> accepted{0}, shut_out{0};
  std::vector<std::vector<std::pair<at::Tensor, Future<at::Tensor>>>> results(8);
  std::vector<std::thread> producers;
  for (int p = 0; p < 8; ++p) {
    producers.emplace_back([&, p] {
      for (;;) {
        at::Tensor x = at::randn({1, 32}).to(device);
        try {
          results[p].emplace_back(x, submitter->submit(x));
          accepted.fetch_add(1);
        } catch (const Error& e) {
          EXPECT_EQ(e.code(), ErrorCode::kShutDown);
          shut_out.fetch_add(1);
          return;
        }
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  submitter->shutdown();
  for (auto& t : producers) t.join();
  const auto st = submitter->stats();
  submitter.reset();
  EXPECT_EQ(shut_out.load(), 8u);
  EXPECT_EQ(st.submitted, accepted.load());
  EXPECT_EQ(st.completed, accepted.load());
  int mismatches = 0;
  for (auto& per_producer : results) {
    for (auto& [x, f] : per_producer) {
      ASSERT_TRUE(f.ready());
      if (!at::equal(f.get().cpu(), mlp(x).cpu())) ++mismatches;
    }
  }
  EXPECT_EQ(mismatches, 0);
}

INSTANTIATE_TEST_SUITE_P(Devices, PerCallOnEachDevice, ::testing::ValuesIn(available_devices()),
                         device_name);

}  // namespace
}  // namespace syncbatch
