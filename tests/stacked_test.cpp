// Stacked mode against real LibTorch models: results equal one-at-a-time calls, shapes are
// grouped, bad requests fail alone, deadlines, several inputs and outputs.
#include <gtest/gtest.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "gate.hpp"
#include "syncbatch/asio.hpp"
#include "syncbatch/torch.hpp"
#include "torch_test_support.hpp"

#include <boost/asio/use_future.hpp>

namespace syncbatch {
namespace {

using testing::available_devices;
using testing::device_name;
using testing::Mlp;
using testing::TensorSubmitter;
using namespace std::chrono_literals;

using Gate = testing::OnceGate;

class StackedOnEachDevice : public ::testing::TestWithParam<c10::Device> {};

TEST_P(StackedOnEachDevice, EveryBatchSizeMatchesOneAtATime) {
  const c10::Device device = GetParam();
  const Mlp mlp(32, 64, 8, device);
  constexpr std::size_t kMax = 16;
  for (std::size_t n : {1u, 2u, 3u, 7u, 15u, 16u}) {
    Gate gate;
    std::vector<int64_t> batch_rows;
    TensorSubmitter s(make_stacked_model([&](const at::Tensor& x) {
                        gate.pass();
                        batch_rows.push_back(x.size(0));
                        return mlp(x);
                      }),
                      {.policy = EveryN{kMax}}, TorchBackend(device));
    auto warm = s.submit(at::randn({1, 32}, device));
    gate.wait_entered();
    std::vector<at::Tensor> inputs;
    std::vector<Future<at::Tensor>> futures;
    for (std::size_t i = 0; i < n; ++i) {
      inputs.push_back(at::randn({1, 32}, device));
      futures.push_back(s.submit(inputs.back()));
    }
    gate.open = true;
    warm.get();
    for (std::size_t i = 0; i < n; ++i) {
      const at::Tensor got = futures[i].get();
      ASSERT_EQ(got.sizes(), (std::vector<int64_t>{1, 8}));
      // One row of a batched GEMM may differ from the batch-1 GEMM in the last bits.
      EXPECT_TRUE(at::allclose(got, mlp(inputs[i]), /*rtol=*/1e-5, /*atol=*/1e-5)) << "n=" << n;
    }
    s.shutdown();
    EXPECT_EQ(batch_rows, (std::vector<int64_t>{1, static_cast<int64_t>(n)})) << "n=" << n;
  }
}

TEST_P(StackedOnEachDevice, ElementwiseModelsMatchExactly) {
  const c10::Device device = GetParam();
  auto model = [](const at::Tensor& x) { return at::tanh(x) * 3 + 1; };
  TensorSubmitter s(make_stacked_model(model), {.policy = EveryN{32}}, TorchBackend(device));
  std::vector<at::Tensor> inputs;
  std::vector<Future<at::Tensor>> futures;
  for (int i = 0; i < 100; ++i) {
    inputs.push_back(at::randn({1 + i % 3, 5}, device));
    futures.push_back(s.submit(inputs.back()));
  }
  for (int i = 0; i < 100; ++i) {
    const at::Tensor got = futures[i].get();
    EXPECT_EQ(got.size(0), 1 + i % 3) << "each caller gets exactly its rows";
    EXPECT_TRUE(at::equal(got, model(inputs[i]))) << i;
  }
}

TEST_P(StackedOnEachDevice, MixedShapesInOneBurstAreGroupedNotRejected) {
  const c10::Device device = GetParam();
  Gate gate;
  std::vector<std::vector<int64_t>> forwards;  // shapes the model saw
  TensorSubmitter s(make_stacked_model([&](const at::Tensor& x) {
                      gate.pass();
                      forwards.push_back(x.sizes().vec());
                      return x.sum(-1, /*keepdim=*/true);
                    }),
                    {.policy = EveryN{64}}, TorchBackend(device));
  auto warm = s.submit(at::ones({1, 1}, device));
  gate.wait_entered();
  std::vector<std::pair<at::Tensor, Future<at::Tensor>>> reqs;
  for (int i = 0; i < 30; ++i) {
    const int64_t width = (i % 3 == 0) ? 4 : (i % 3 == 1) ? 8 : 16;
    auto x = at::randn({1, width}, device);
    reqs.emplace_back(x, s.submit(x));
  }
  auto as_double = at::randn({2, 4}, at::TensorOptions().dtype(at::kDouble).device(device));
  reqs.emplace_back(as_double, s.submit(as_double));
  gate.open = true;
  warm.get();
  for (auto& [x, f] : reqs) EXPECT_TRUE(at::allclose(f.get(), x.sum(-1, true)));
  s.shutdown();
  // One batch after the warm-up one, with four groups: widths 4, 8, 16 (float) and 4 (double).
  ASSERT_EQ(forwards.size(), 5u);
  EXPECT_EQ(s.stats().batches, 2u);
  EXPECT_EQ(forwards[1], (std::vector<int64_t>{10, 4}));
  EXPECT_EQ(forwards[2], (std::vector<int64_t>{10, 8}));
  EXPECT_EQ(forwards[3], (std::vector<int64_t>{10, 16}));
  EXPECT_EQ(forwards[4], (std::vector<int64_t>{2, 4}));
}

TEST_P(StackedOnEachDevice, OnePoisonedRequestInABatchOf32FailsAlone) {
  const c10::Device device = GetParam();
  const Mlp mlp(8, 16, 4, device);
  Gate gate;
  std::atomic<int> forwards{0};
  TensorSubmitter s(make_stacked_model([&](const at::Tensor& x) {
                      gate.pass();
                      forwards.fetch_add(1);
                      if (at::isnan(x).any().item<bool>())
                        throw std::invalid_argument("NaN in the batch input");
                      return mlp(x);
                    }),
                    {.policy = EveryN{32}}, TorchBackend(device));
  auto warm = s.submit(at::randn({1, 8}, device));
  gate.wait_entered();
  std::vector<at::Tensor> inputs;
  std::vector<Future<at::Tensor>> futures;
  for (int i = 0; i < 32; ++i) {
    inputs.push_back(i == 13 ? at::full({1, 8}, NAN, device) : at::randn({1, 8}, device));
    futures.push_back(s.submit(inputs.back()));
  }
  gate.open = true;
  warm.get();
  for (int i = 0; i < 32; ++i) {
    if (i == 13) {
      try {
        futures[i].get();
        ADD_FAILURE() << "the poisoned request succeeded";
      } catch (const std::invalid_argument& e) {
        EXPECT_EQ(std::string(e.what()), "NaN in the batch input");
      }
    } else {
      EXPECT_TRUE(at::allclose(futures[i].get(), mlp(inputs[i]), 1e-5, 1e-5)) << i;
    }
  }
  s.shutdown();
  // Bisection: 1 full try, then 2 halves, ... down to the single bad request: 2*log2(32) + 1.
  EXPECT_EQ(forwards.load(), 1 + 1 + 2 * 5);
  EXPECT_EQ(s.stats().failed, 1u);
}

TEST_P(StackedOnEachDevice, RequestsThatCannotBeStackedFailWithWhatWasExpected) {
  const c10::Device device = GetParam();
  const Mlp mlp(32, 64, 8, device);
  TensorSubmitter s(make_stacked_model([&](const at::Tensor& x) { return mlp(x); },
                                       {.expect = {InputSpec{at::kFloat, {32}}}}),
                    {.policy = EveryN{8}}, TorchBackend(device));
  auto good = s.submit(at::randn({2, 32}, device));
  auto wrong_width = s.submit(at::randn({1, 31}, device));
  auto wrong_dtype =
      s.submit(at::ones({1, 32}, at::TensorOptions().dtype(at::kLong).device(device)));
  auto scalar = s.submit(at::scalar_tensor(1.0, device));
  auto undefined = s.submit(at::Tensor());
  auto message = [](Future<at::Tensor>& f) {
    try {
      f.get();
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kBadRequest);
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_EQ(good.get().size(0), 2);
  EXPECT_NE(message(wrong_width).find("input 0: expected float32 [*, 32], got float32 [1, 31]"),
            std::string::npos);
  EXPECT_NE(message(wrong_dtype).find("input 0: expected float32 [*, 32], got int64 [1, 32]"),
            std::string::npos);
  EXPECT_NE(message(scalar).find("rank >= 1"), std::string::npos);
  EXPECT_NE(message(undefined).find("undefined"), std::string::npos);
}

TEST_P(StackedOnEachDevice, AModelReturningTheWrongRowCountIsCaught) {
  const c10::Device device = GetParam();
  TensorSubmitter s(make_stacked_model([](const at::Tensor& x) { return x.sum(0, true); }),
                    {.policy = EveryN{8}}, TorchBackend(device));
  try {
    s.submit(at::randn({3, 2}, device)).get();
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kBadRequest);
    EXPECT_NE(std::string(e.what()).find("for 3 input rows"), std::string::npos) << e.what();
  }
}

TEST_P(StackedOnEachDevice, SeveralInputsAndOutputs) {
  const c10::Device device = GetParam();
  BatchedSubmitter<Tensors, Tensors, TorchBackend> s(
      make_stacked_model_multi([](const Tensors& in) -> Tensors {
        return {in[0] + in[1], (in[0] * in[1]).sum(-1)};
      }),
      {.policy = EveryN{16}}, TorchBackend(device));
  std::vector<Tensors> inputs;
  std::vector<Future<Tensors>> futures;
  for (int i = 0; i < 40; ++i) {
    inputs.push_back({at::randn({1 + i % 2, 3}, device), at::randn({1 + i % 2, 3}, device)});
    futures.push_back(s.submit(inputs.back()));
  }
  for (int i = 0; i < 40; ++i) {
    const Tensors out = futures[i].get();
    ASSERT_EQ(out.size(), 2u);
    EXPECT_TRUE(at::equal(out[0], inputs[i][0] + inputs[i][1]));
    EXPECT_TRUE(at::allclose(out[1], (inputs[i][0] * inputs[i][1]).sum(-1)));
  }
}

// Regression: rows were counted from input 0 only, so a request with 1 row in input 0 and 2 in
// input 1, batched with one of 2 and 1, made totals that matched, and each got rows of the
// other's input 1. Such requests now fail alone, naming each input's rows; every good request
// of the same batch gets exactly what the model gives it alone.
TEST_P(StackedOnEachDevice, InputsWithDifferentRowCountsFailAloneAndMixNoRows) {
  const c10::Device device = GetParam();
  auto model = [](const Tensors& in) -> Tensors { return {in[0] * 10 + in[1], in[1] - in[0]}; };
  Gate gate;
  BatchedSubmitter<Tensors, Tensors, TorchBackend> s(
      make_stacked_model_multi([&](const Tensors& in) {
        gate.pass();
        return model(in);
      }),
      {.policy = EveryN{16}}, TorchBackend(device));
  auto warm = s.submit({at::randn({1, 3}, device), at::randn({1, 3}, device)});
  gate.wait_entered();  // the next submissions form one batch
  std::vector<Tensors> good;
  std::vector<Future<Tensors>> good_futures;
  auto submit_good = [&](int64_t rows) {
    good.push_back({at::randn({rows, 3}, device), at::randn({rows, 3}, device)});
    good_futures.push_back(s.submit(good.back()));
  };
  submit_good(1);
  auto one_two = s.submit({at::randn({1, 3}, device), at::randn({2, 3}, device)});
  submit_good(2);
  auto two_one = s.submit({at::randn({2, 3}, device), at::randn({1, 3}, device)});
  submit_good(3);
  submit_good(1);
  gate.open = true;
  warm.get();
  for (auto* f : {&one_two, &two_one}) {
    try {
      f->get();
      ADD_FAILURE() << "a request with unequal row counts was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kBadRequest);
      const std::string m = e.what();
      EXPECT_NE(m.find("input 0"), std::string::npos) << m;
      EXPECT_NE(m.find("input 1"), std::string::npos) << m;
      EXPECT_NE(m.find("1 row"), std::string::npos) << m;
      EXPECT_NE(m.find("2 rows"), std::string::npos) << m;
    }
  }
  for (std::size_t i = 0; i < good.size(); ++i) {
    const Tensors got = good_futures[i].get();
    const Tensors want = model(good[i]);
    ASSERT_EQ(got.size(), 2u);
    EXPECT_TRUE(at::equal(got[0], want[0])) << "good request " << i;
    EXPECT_TRUE(at::equal(got[1], want[1])) << "good request " << i;
  }
  s.shutdown();
  EXPECT_EQ(s.stats().failed, 2u);
}

// A model whose outputs have different row counts fails with a message naming the output,
// instead of each caller being cut rows by output 0's count.
TEST_P(StackedOnEachDevice, OutputsWithDifferentRowCountsAreAClearError) {
  const c10::Device device = GetParam();
  BatchedSubmitter<Tensors, Tensors, TorchBackend> s(
      make_stacked_model_multi([](const Tensors& in) -> Tensors {
        return {in[0] * 2, at::cat({in[0], in[0].narrow(0, 0, 1)}, 0)};
      }),
      {.policy = EveryN{8}}, TorchBackend(device));
  try {
    s.submit({at::randn({2, 3}, device)}).get();
    ADD_FAILURE() << "outputs with unequal rows were cut and returned";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kBadRequest);
    const std::string m = e.what();
    EXPECT_NE(m.find("output 1"), std::string::npos) << m;
    EXPECT_NE(m.find("[3, 3]"), std::string::npos) << m;
    EXPECT_NE(m.find("for 2 input rows"), std::string::npos) << m;
  }
}

// Batch buckets in eager stacked mode: the model sees only allowed batch sizes; padding rows'
// outputs never reach a caller; every request gets exactly what the model gives its rows alone,
// also a request whose rows span two runs.
TEST_P(StackedOnEachDevice, BatchBucketsPadAndCutBackExactly) {
  const c10::Device device = GetParam();
  auto model = [](const at::Tensor& x) { return x * 3 + 1; };
  struct Case {
    BucketPolicy policy;
    std::vector<int64_t> second_batch;  // the sizes the model sees for 13 rows
  };
  const std::vector<Case> cases{{BucketPolicy::kPadUp, {8, 8}},
                                {BucketPolicy::kBatchDown, {8, 4, 4}},
                                {BucketPolicy::kLeastPadding, {8, 8}}};
  for (const Case& c : cases) {
    Gate gate;
    std::vector<int64_t> seen;  // written by the worker, read after shutdown()
    TensorSubmitter s(make_stacked_model(
                          [&](const at::Tensor& x) {
                            gate.pass();
                            seen.push_back(x.size(0));
                            return model(x);
                          },
                          {.batch_buckets = RowBuckets({4, 8}), .bucket_policy = c.policy}),
                      {.policy = EveryN{64}}, TorchBackend(device));
    auto warm = s.submit(at::randn({1, 5}, device));
    gate.wait_entered();
    std::vector<at::Tensor> inputs;
    std::vector<Future<at::Tensor>> futures;
    for (int64_t rows : {1, 2, 3, 1, 6}) {  // 13 rows: the 6-row request spans two runs
      inputs.push_back(at::randn({rows, 5}, device));
      futures.push_back(s.submit(inputs.back()));
    }
    gate.open = true;
    EXPECT_EQ(warm.get().size(0), 1) << "a padded request got the padding's rows";
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      const at::Tensor got = futures[i].get();
      EXPECT_EQ(got.sizes(), inputs[i].sizes());
      EXPECT_TRUE(at::equal(got, model(inputs[i]))) << "request " << i;
    }
    s.shutdown();
    std::vector<int64_t> want{4};
    want.insert(want.end(), c.second_batch.begin(), c.second_batch.end());
    EXPECT_EQ(seen, want) << "policy " << static_cast<int>(c.policy);
  }
}

// The same with several inputs and outputs: every position padded and cut alike.
TEST_P(StackedOnEachDevice, BatchBucketsWithSeveralInputsAndOutputs) {
  const c10::Device device = GetParam();
  auto model = [](const Tensors& in) -> Tensors { return {in[0] - in[1], (in[0] * in[1]).sum(1)}; };
  std::vector<int64_t> seen;
  BatchedSubmitter<Tensors, Tensors, TorchBackend> s(make_stacked_model_multi(
                                                         [&](const Tensors& in) {
                                                           seen.push_back(in[0].size(0));
                                                           EXPECT_EQ(in[1].size(0), in[0].size(0));
                                                           return model(in);
                                                         },
                                                         {.batch_buckets = RowBuckets({2, 4})}),
                                                     {.policy = EveryN{1}}, TorchBackend(device));
  for (int64_t rows : {1, 3, 5}) {
    const Tensors in{at::randn({rows, 3}, device), at::randn({rows, 3}, device)};
    const Tensors got = s.submit(in).get();
    const Tensors want = model(in);
    ASSERT_EQ(got.size(), 2u);
    EXPECT_TRUE(at::equal(got[0], want[0])) << rows;
    EXPECT_TRUE(at::allclose(got[1], want[1])) << rows;
  }
  s.shutdown();
  EXPECT_EQ(seen, (std::vector<int64_t>{2, 4, 4, 2}));  // 5 rows: a run of 4, then 1 padded to 2
}

TEST_P(StackedOnEachDevice, CpuInputsAreStagedAndOutputsReturnedWhereAsked) {
  const c10::Device device = GetParam();
  const Mlp mlp(16, 16, 4, device);
  std::atomic<bool> ran_on_device{true};
  TensorSubmitter s(make_stacked_model(
                        [&](const at::Tensor& x) {
                          if (x.device() != device) ran_on_device = false;
                          return mlp(x);
                        },
                        {.device = device, .output_device = c10::Device(c10::kCPU)}),
                    {.policy = EveryN{8}}, TorchBackend(device));
  std::vector<at::Tensor> inputs;
  std::vector<Future<at::Tensor>> futures;
  for (int i = 0; i < 20; ++i) {
    inputs.push_back(at::randn({1, 16}));  // on the CPU
    futures.push_back(s.submit(inputs.back()));
  }
  for (int i = 0; i < 20; ++i) {
    const at::Tensor got = futures[i].get();
    EXPECT_TRUE(got.device().is_cpu());
    EXPECT_TRUE(at::allclose(got, mlp(inputs[i].to(device)).cpu(), 1e-5, 1e-5)) << i;
  }
  EXPECT_TRUE(ran_on_device.load());
}

// Large host inputs (images), pinned where the device is CUDA as a server parses them there:
// each row lands where the batch needs it, whichever way it was staged, mixed with small and
// unpinned ones in the same batches.
TEST_P(StackedOnEachDevice, LargePinnedHostInputsAreStagedExactly) {
  const c10::Device device = GetParam();
  auto model = [](const at::Tensor& x) { return x.sum({1, 2, 3}, /*keepdim=*/false) * 2 + 1; };
  TensorSubmitter s(
      make_stacked_model(model, {.device = device, .output_device = c10::Device(c10::kCPU)}),
      {.policy = EveryN{8}}, TorchBackend(device));
  std::vector<at::Tensor> inputs;
  std::vector<Future<at::Tensor>> futures;
  for (int i = 0; i < 40; ++i) {
    // The first 16 [2, 3, 64, 64] float (96 KiB, over the direct-staging bound), pinned where
    // the device is CUDA; then 48 and 96 KiB by turns, every fourth unpinned.
    const int64_t rows = i < 16 || i % 2 == 1 ? 2 : 1;
    const bool pin = device.is_cuda() && (i < 16 || i % 4 != 3);
    const at::Tensor x =
        at::arange(3 * 64 * 64 * rows, at::kFloat).view({rows, 3, 64, 64}) / (1000.0 * (i + 1));
    inputs.push_back(pin ? x.pin_memory() : x);
    ASSERT_EQ(inputs.back().is_pinned(), pin) << i;
  }
  for (const at::Tensor& x : inputs) futures.push_back(s.submit(x));  // a burst: batches of 8
  for (int i = 0; i < 40; ++i) {
    const at::Tensor got = futures[i].get();
    EXPECT_TRUE(at::allclose(got, model(inputs[i]), 1e-4, 1e-3)) << i;
  }
}

TEST_P(StackedOnEachDevice, StressThirtyTwoProducersMixingSyncAndAsync) {
  const c10::Device device = GetParam();
  const Mlp mlp(16, 32, 4, device);
  TensorSubmitter s(make_stacked_model([&](const at::Tensor& x) { return mlp(x); }),
                    {.queue_capacity = 256, .workers = 2, .policy = EveryN{32}},
                    TorchBackend(device));
  std::atomic<int> wrong{0}, done{0};
  std::vector<std::thread> producers;
  for (int p = 0; p < 32; ++p) {
    producers.emplace_back([&, p] {
      c10::InferenceMode guard;
      std::vector<std::pair<at::Tensor, std::future<at::Tensor>>> async_results;
      for (int i = 0; i < 300; ++i) {
        at::Tensor x = at::randn({1, 16}, device);
        if ((i + p) % 2 == 0) {
          async_results.emplace_back(x, async_submit(s, x, boost::asio::use_future));
        } else {
          if (!at::allclose(s.submit(x).get(), mlp(x), 1e-5, 1e-5)) wrong.fetch_add(1);
          done.fetch_add(1);
        }
      }
      for (auto& [x, f] : async_results) {
        if (!at::allclose(f.get(), mlp(x), 1e-5, 1e-5)) wrong.fetch_add(1);
        done.fetch_add(1);
      }
    });
  }
  for (auto& t : producers) t.join();
  s.shutdown();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(done.load(), 32 * 300);
  EXPECT_EQ(s.stats().completed, 32u * 300u);
  EXPECT_GT(s.stats().mean_batch_size(), 1.0) << "32 producers should fill batches";
}

INSTANTIATE_TEST_SUITE_P(Devices, StackedOnEachDevice, ::testing::ValuesIn(available_devices()),
                         device_name);

}  // namespace
}  // namespace syncbatch
