// Variable-length inputs in stacked mode: requests that differ in a declared dim share a forward,
// padded to the longest or to length buckets; the model may get the lengths or a mask; outputs
// are cut back to each request's length and equal running the request alone.
#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "gate.hpp"
#include "syncbatch/torch.hpp"
#include "torch_test_support.hpp"

namespace syncbatch {
namespace {

using testing::available_devices;
using testing::device_name;
using testing::TensorSubmitter;
using MultiSubmitter = BatchedSubmitter<Tensors, Tensors, TorchBackend>;
using namespace std::chrono_literals;

using Gate = testing::OnceGate;

using testing::code_of;

class VariableLength : public ::testing::TestWithParam<c10::Device> {};

// Lengths 3, 7, 5 and 1 (and two rows in one request) in one batch: one forward padded to 7
// with the pad value, and each output cut back and equal to the request run alone.
TEST_P(VariableLength, PaddedTogetherAndCutBackExactly) {
  const c10::Device device = GetParam();
  Gate gate;
  std::vector<std::vector<int64_t>> shapes;
  std::atomic<bool> pad_seen{false};
  auto model = [&](const at::Tensor& x) {
    gate.pass();
    shapes.push_back(x.sizes().vec());
    if ((x == -7.0).any().item<bool>()) pad_seen = true;
    return at::tanh(x) * 2 + 1;
  };
  TensorSubmitter s(
      make_stacked_model(model,
                         {.expect = {{at::kFloat, {kVaries, 8}, /*pad_value=*/-7.0}},
                          .cut_outputs = {{.output = 0, .dim = 1, .input = 0, .input_dim = 1}}}),
      {.policy = EveryN{16}}, TorchBackend(device));
  auto warm = s.submit(at::randn({1, 2, 8}, device));
  gate.wait_entered();
  const std::vector<std::pair<int64_t, int64_t>> rows_and_lengths = {
      {1, 3}, {1, 7}, {2, 5}, {1, 1}};
  std::vector<at::Tensor> inputs;
  std::vector<Future<at::Tensor>> futures;
  for (auto [rows, len] : rows_and_lengths) {
    inputs.push_back(at::randn({rows, len, 8}, device));
    futures.push_back(s.submit(inputs.back()));
  }
  gate.open = true;
  warm.get();
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    const at::Tensor got = futures[i].get();
    EXPECT_EQ(got.sizes(), inputs[i].sizes()) << i;
    EXPECT_TRUE(at::equal(got, at::tanh(inputs[i]) * 2 + 1)) << i;
  }
  s.shutdown();
  ASSERT_EQ(shapes.size(), 2u);
  EXPECT_EQ(shapes[1], (std::vector<int64_t>{5, 7, 8}));  // 5 rows, all padded to 7
  EXPECT_TRUE(pad_seen.load());
}

// The model gets each row's length (kLengths) or a mask (kMask) and computes a mean over the
// real positions: padding (filled with 1000 here) must not reach the result.
TEST_P(VariableLength, LengthsAndMaskReachTheModel) {
  const c10::Device device = GetParam();
  for (LengthInput how : {LengthInput::kLengths, LengthInput::kMask}) {
    Gate gate;
    std::vector<int64_t> forwards;
    auto model = [&](const Tensors& in) -> Tensors {
      gate.pass();
      forwards.push_back(in[0].size(0));
      EXPECT_EQ(in.size(), 2u);
      const at::Tensor& x = in[0];  // [rows, L]
      if (how == LengthInput::kLengths) {
        EXPECT_EQ(in[1].scalar_type(), at::kLong);
        const at::Tensor mask =
            at::arange(x.size(1), x.options().dtype(at::kLong)).unsqueeze(0) < in[1].unsqueeze(1);
        return {(x * mask).sum(1) / in[1].to(at::kFloat)};
      }
      EXPECT_EQ(in[1].sizes(), x.sizes());
      const at::Tensor mask = in[1].to(at::kFloat);
      return {(x * mask).sum(1) / mask.sum(1)};
    };
    MultiSubmitter s(make_stacked_model_multi(
                         model, {.expect = {{at::kFloat, {kVaries}, 1000.0}}, .length_input = how}),
                     {.policy = EveryN{16}}, TorchBackend(device));
    auto warm = s.submit({at::randn({1, 4}, device)});
    gate.wait_entered();
    std::vector<at::Tensor> inputs;
    std::vector<Future<Tensors>> futures;
    for (int64_t len : {2, 9, 4, 1, 6}) {
      inputs.push_back(at::randn({2, len}, device));
      futures.push_back(s.submit({inputs.back()}));
    }
    gate.open = true;
    warm.get();
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      const Tensors got = futures[i].get();
      ASSERT_EQ(got.size(), 1u);
      EXPECT_TRUE(at::allclose(got[0], inputs[i].mean(1), 1e-5, 1e-5)) << i;
    }
    s.shutdown();
    EXPECT_EQ(forwards, (std::vector<int64_t>{1, 10}));
  }
}

// Which lengths the model sees, table-driven: to the longest, to length buckets, and split by
// max_padding.
TEST(VariableLengthPlan, GroupsAndPaddedLengthsFollowTheOptions) {
  struct Case {
    std::string name;
    std::vector<int64_t> lengths;
    RowBuckets buckets;
    double max_padding;
    std::vector<std::vector<int64_t>> want;  // per forward: {rows, padded length}
  };
  const std::vector<Case> cases = {
      {"to the longest", {3, 9, 5}, {}, 1.0, {{3, 9}}},
      {"powers of two", {3, 9, 5}, RowBuckets::powers_of_two(16), 1.0, {{3, 16}}},
      {"multiples of 4", {3, 9, 5}, RowBuckets::multiples_of(4, 32), 1.0, {{3, 12}}},
      {"a list", {3, 2}, RowBuckets({5, 10}), 1.0, {{2, 5}}},
      // Longest first: 16 (real 16), then 15 joins (1/32 padded), 2 would make 1 - 33/48: new
      // group; 1 joins it (1 - 3/4 = 0.25).
      {"max_padding 0.3", {2, 16, 1, 15}, {}, 0.3, {{2, 16}, {2, 2}}},
      // 8 and 8 share; 4 goes alone (no padding); 3 pads to bucket 4, over 0: alone too.
      {"max_padding 0, buckets",
       {4, 8, 8, 3},
       RowBuckets::multiples_of(4, 8),
       0.0,
       {{2, 8}, {1, 4}, {1, 4}}},
  };
  for (const Case& c : cases) {
    Gate gate;
    std::vector<std::vector<int64_t>> seen;
    TensorSubmitter s(make_stacked_model(
                          [&](const at::Tensor& x) {
                            gate.pass();
                            seen.push_back({x.size(0), x.size(1)});
                            return x * 2;
                          },
                          {.expect = {{at::kFloat, {kVaries}}},
                           .cut_outputs = {{0, 1, 0, 1}},
                           .length_buckets = c.buckets,
                           .max_padding = c.max_padding}),
                      {.policy = EveryN{16}}, TorchBackend(c10::Device(c10::kCPU)));
    auto warm = s.submit(at::ones({1, 1}));
    gate.wait_entered();
    std::vector<at::Tensor> inputs;
    std::vector<Future<at::Tensor>> futures;
    for (int64_t len : c.lengths) {
      inputs.push_back(at::randn({1, len}));
      futures.push_back(s.submit(inputs.back()));
    }
    gate.open = true;
    warm.get();
    for (std::size_t i = 0; i < inputs.size(); ++i)
      EXPECT_TRUE(at::equal(futures[i].get(), inputs[i] * 2)) << c.name << " request " << i;
    s.shutdown();
    seen.erase(seen.begin());  // the warm-up's
    EXPECT_EQ(seen, c.want) << c.name;
  }
}

// A request whose fixed dim breaks the declaration, or that is longer than the largest bucket,
// fails alone with a message naming what was expected and what came; the others run.
TEST(VariableLengthPlan, BadRequestsFailAloneWithClearErrors) {
  Gate gate;
  TensorSubmitter s(make_stacked_model(
                        [&](const at::Tensor& x) {
                          gate.pass();
                          return x + 1;
                        },
                        {.expect = {{at::kFloat, {kVaries, 8}}},
                         .cut_outputs = {{0, 1, 0, 1}},
                         .length_buckets = RowBuckets({4, 8})}),
                    {.policy = EveryN{16}}, TorchBackend(c10::Device(c10::kCPU)));
  auto warm = s.submit(at::ones({1, 1, 8}));
  gate.wait_entered();
  const at::Tensor good = at::randn({1, 3, 8});
  auto ok = s.submit(good);
  auto wrong_width = s.submit(at::randn({1, 3, 9}));
  auto too_long = s.submit(at::randn({1, 9, 8}));
  auto empty_length = s.submit(at::randn({1, 0, 8}));
  gate.open = true;
  warm.get();
  EXPECT_TRUE(at::equal(ok.get(), good + 1));
  std::string what;
  EXPECT_EQ(code_of(wrong_width, &what), ErrorCode::kBadRequest);
  EXPECT_NE(what.find("expected float32 [*, any, 8], got float32 [1, 3, 9]"), std::string::npos)
      << what;
  EXPECT_EQ(code_of(too_long, &what), ErrorCode::kBadRequest);
  EXPECT_NE(what.find("dim 1 is 9 long; expected at most 8 (the largest of "
                      "StackingOptions.length_buckets)"),
            std::string::npos)
      << what;
  EXPECT_EQ(code_of(empty_length, &what), ErrorCode::kBadRequest);
  EXPECT_NE(what.find("got float32 [1, 0, 8]"), std::string::npos) << what;
}

TEST(VariableLengthPlan, BadOptionsAreClearErrors) {
  auto id = [](const at::Tensor& x) { return x; };
  auto message = [&](StackingOptions o) -> std::string {
    try {
      make_stacked_model(id, std::move(o));
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      return e.what();
    }
    return "accepted";
  };
  EXPECT_NE(message({.expect = {{at::kFloat, {4}}}, .length_input = LengthInput::kLengths})
                .find("need a varying dim (kVaries) in expect, got none"),
            std::string::npos);
  // max_padding has a default, which bounds nothing where no dim varies.
  EXPECT_EQ(message({.expect = {{at::kFloat, {4}}}, .max_padding = 0.5}), "accepted");
  EXPECT_NE(message({.expect = {{at::kFloat, {4}}}, .max_padding = 1.5})
                .find("max_padding: expected a share from 0 to 1"),
            std::string::npos);
  EXPECT_NE(message({.expect = {{at::kFloat, {kVaries}}}, .length_input = LengthInput::kMask})
                .find("a single-tensor model takes no second input"),
            std::string::npos);
  EXPECT_NE(message({.expect = {{at::kFloat, {kVaries, 4}}}, .cut_outputs = {{0, 1, 0, 2}}})
                .find("following an input dim declared kVaries, got output 0 dim 1, input 0 dim 2"),
            std::string::npos);
  EXPECT_NE(message({.expect = {{at::kFloat, {kVaries}}}, .max_padding = 1.5})
                .find("max_padding: expected a share from 0 to 1"),
            std::string::npos);
  EXPECT_NE(message({.expect = {{at::kFloat, {-2}}}}).find("expected sizes >= 0 or kVaries"),
            std::string::npos);
  EXPECT_THROW(RowBuckets::multiples_of(0, 8), Error);
  EXPECT_THROW(RowBuckets::multiples_of(8, 4), Error);
  EXPECT_EQ(RowBuckets::multiples_of(4, 10).sizes(), (std::vector<int64_t>{4, 8, 10}));
}

// Four threads of mixed lengths and rows, length buckets and a padding bound: every request
// completes with exactly its own result.
TEST_P(VariableLength, MixedLengthStressLosesNothing) {
  const c10::Device device = GetParam();
  TensorSubmitter s(make_stacked_model([](const at::Tensor& x) { return at::tanh(x) * 2 + 1; },
                                       {.expect = {{at::kFloat, {kVaries, 4}}},
                                        .cut_outputs = {{0, 1, 0, 1}},
                                        .length_buckets = RowBuckets::multiples_of(4, 32),
                                        .max_padding = 0.3}),
                    {.policy = EveryN{32}}, TorchBackend(device));
  std::atomic<int> wrong{0}, right{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      c10::InferenceMode inference;
      std::vector<at::Tensor> inputs;
      std::vector<Future<at::Tensor>> futures;
      for (int i = 0; i < 150; ++i) {
        inputs.push_back(at::randn({1 + (i + t) % 3, 1 + (i * 7 + t) % 32, 4}, device));
        futures.push_back(s.submit(inputs.back()));
      }
      for (std::size_t i = 0; i < inputs.size(); ++i)
        (at::equal(futures[i].get(), at::tanh(inputs[i]) * 2 + 1) ? right : wrong).fetch_add(1);
    });
  for (auto& th : threads) th.join();
  s.shutdown();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(right.load(), 600);
  EXPECT_EQ(s.stats().failed, 0u);
}

// Batches counted in rows: with EveryN{8}, requests of 3 rows go two to a batch (a third would
// make 9); a request of 20 rows with max_batch_rows 8 runs as forwards of 8, 8 and 4 and comes
// back whole and in order; with Oversize::kRefuse it fails alone.
TEST(BatchRows, BatchesCountRowsAndLargeRequestsSplitOrFail) {
  for (Oversize oversize : {Oversize::kSplit, Oversize::kRefuse}) {
    Gate gate;
    std::vector<int64_t> forwards;
    TensorSubmitter s(make_stacked_model(
                          [&](const at::Tensor& x) {
                            gate.pass();
                            forwards.push_back(x.size(0));
                            return x * 3;
                          },
                          {.max_batch_rows = 8, .oversize = oversize}),
                      {.policy = EveryN{8}}, TorchBackend(c10::Device(c10::kCPU)));
    auto warm = s.submit(at::ones({1, 2}));
    gate.wait_entered();
    std::vector<at::Tensor> inputs;
    std::vector<Future<at::Tensor>> futures;
    for (int64_t rows : {3, 3, 3, 20, 2}) {
      inputs.push_back(at::randn({rows, 2}));
      futures.push_back(s.submit(inputs.back()));
    }
    gate.open = true;
    warm.get();
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      if (oversize == Oversize::kRefuse && inputs[i].size(0) == 20) {
        std::string what;
        EXPECT_EQ(code_of(futures[i], &what), ErrorCode::kBadRequest);
        EXPECT_NE(what.find("expected at most 8 rows per request (StackingOptions.max_batch_rows, "
                            "with Oversize::kRefuse), got float32 [20, 2]"),
                  std::string::npos)
            << what;
        continue;
      }
      EXPECT_TRUE(at::equal(futures[i].get(), inputs[i] * 3)) << i;
    }
    s.shutdown();
    // The warm-up; 3+3; 3 (the 20 does not fit); the 20 alone, split (or refused unrun: its
    // batch has no forward); 2.
    const std::vector<int64_t> want = oversize == Oversize::kSplit
                                          ? std::vector<int64_t>{1, 6, 3, 8, 8, 4, 2}
                                          : std::vector<int64_t>{1, 6, 3, 2};
    EXPECT_EQ(forwards, want);
  }
}

// kRowsTimesLength: a row of length 16 counts 16 toward EveryN{32}, one of length 4 counts 4.
TEST(BatchRows, RowsTimesLengthCountsPositions) {
  Gate gate;
  std::vector<int64_t> forwards;
  TensorSubmitter s(make_stacked_model(
                        [&](const at::Tensor& x) {
                          gate.pass();
                          forwards.push_back(x.size(0));
                          return x;
                        },
                        {.expect = {{at::kFloat, {kVaries}}},
                         .batch_cost = BatchCost::kRowsTimesLength,
                         .cut_outputs = {{0, 1, 0, 1}}}),
                    {.policy = EveryN{32}}, TorchBackend(c10::Device(c10::kCPU)));
  auto warm = s.submit(at::ones({1, 1}));
  gate.wait_entered();
  std::vector<Future<at::Tensor>> futures;
  for (int i = 0; i < 3; ++i) futures.push_back(s.submit(at::ones({1, 16})));
  for (int i = 0; i < 8; ++i) futures.push_back(s.submit(at::ones({1, 4})));
  gate.open = true;
  warm.get();
  for (auto& f : futures) f.get();
  s.shutdown();
  // The warm-up; 16 + 16; 16 + 4 x 4 (= 32); the last 4 x 4.
  EXPECT_EQ(forwards, (std::vector<int64_t>{1, 2, 5, 4}));
}

// Graphs over 4 lengths x 4 row buckets (16 pairs) held at most 6 at a time: on CUDA every
// pair captured, least recently used ones evicted, no call eager; elsewhere no replay at all.
void expect_graphs_bounded(const GraphStats& g, c10::Device device) {
  if (device.is_cuda()) {
    EXPECT_LE(g.graphs, 6u);
    EXPECT_GT(g.evictions, 0u);
    EXPECT_EQ(g.eager_runs, 0u) << g.last_fallback;
    EXPECT_GE(g.captured, 16u);
  } else {
    EXPECT_EQ(g.replays, 0u);
  }
}

// Graphs over length buckets x batch buckets: 4 lengths x 4 row counts need 16 graphs, held 6 at
// a time; least recently used graphs give way, no call runs eagerly (on CUDA), and every
// request gets exactly its own result.
TEST_P(VariableLength, GraphsOverLengthAndBatchBucketsStayBounded) {
  const c10::Device device = GetParam();
  GraphedModel graphed([](const at::Tensor& x) { return at::tanh(x) * 2 + 1; }, device,
                       {.buckets = {1, 2, 4, 8}, .max_graphs = 6});
  TensorSubmitter s(
      make_stacked_model(graphed, {.expect = {{at::kFloat, {kVaries, 4}}},
                                   .batch_buckets = RowBuckets({1, 2, 4, 8}),
                                   .cut_outputs = {{0, 1, 0, 1}},
                                   .length_buckets = RowBuckets::multiples_of(8, 32)}),
      {.policy = EveryN{8}}, TorchBackend(device));
  // Inputs are drawn before any capture: LibTorch's CUDA generator is shared by the threads of
  // the device, and a random op on one thread while another captures a graph throws.
  std::vector<at::Tensor> inputs;
  for (int round = 0; round < 3; ++round)
    for (int64_t len : {3, 12, 20, 31})
      for (int64_t rows : {1, 2, 3, 8})
        inputs.push_back(at::randn({rows, len, 4}, at::TensorOptions().device(device)));
  std::vector<Future<at::Tensor>> futures;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    futures.push_back(s.submit(inputs[i]));
    if (i < 16) futures.back().wait();  // the first round one batch each: every pair of buckets
  }
  for (std::size_t i = 0; i < inputs.size(); ++i)
    EXPECT_TRUE(at::allclose(futures[i].get(), at::tanh(inputs[i]) * 2 + 1, 1e-6, 1e-6)) << i;
  s.shutdown();
  expect_graphs_bounded(graphed.stats(), device);
}

// The same for a model of several inputs and outputs (GraphedMultiModel): token ids and the
// mask in; per-token states, their masked mean and its argmax out. Every request gets what it
// gets alone; on CUDA no call runs eagerly and no more than max_graphs are held.
TEST_P(VariableLength, MultiTensorGraphsWithAMaskOverEveryBucket) {
  const c10::Device device = GetParam();
  const testing::TokenModel model(device);
  GraphedMultiModel graphed([&](const Tensors& in) { return model(in); }, device,
                            {.buckets = {1, 2, 4, 8}, .max_graphs = 6});
  MultiSubmitter s(
      make_stacked_model_multi(graphed, {.expect = {{at::kLong, {kVaries}}},
                                         .batch_buckets = RowBuckets({1, 2, 4, 8}),
                                         .cut_outputs = {{0, 1, 0, 1}},
                                         .length_buckets = RowBuckets::multiples_of(8, 32),
                                         .length_input = LengthInput::kMask}),
      {.policy = EveryN{8}}, TorchBackend(device));
  std::vector<at::Tensor> inputs;  // drawn before any capture (see above)
  for (int round = 0; round < 3; ++round)
    for (int64_t len : {3, 12, 20, 31})
      for (int64_t rows : {1, 2, 3, 8})
        inputs.push_back(
            at::randint(0, 32, {rows, len}, at::TensorOptions(at::kLong).device(device)));
  std::vector<Future<Tensors>> futures;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    futures.push_back(s.submit({inputs[i]}));
    if (i < 16) futures.back().wait();  // the first round one batch each: every pair of buckets
  }
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    const Tensors got = futures[i].get();
    const Tensors want = model({inputs[i], at::ones_like(inputs[i])});
    ASSERT_EQ(got.size(), 3u);
    EXPECT_EQ(got[0].sizes(), want[0].sizes()) << i;
    EXPECT_TRUE(at::allclose(got[0], want[0], 1e-5, 1e-5)) << i;
    EXPECT_TRUE(at::allclose(got[1], want[1], 1e-5, 1e-5)) << i;
    EXPECT_TRUE(at::equal(got[2], want[2])) << i;
  }
  s.shutdown();
  expect_graphs_bounded(graphed.stats(), device);
}

INSTANTIATE_TEST_SUITE_P(Devices, VariableLength, ::testing::ValuesIn(available_devices()),
                         device_name);

}  // namespace
}  // namespace syncbatch
