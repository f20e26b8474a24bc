// GraphedModel: buckets, padding, copies out of the static output, fallbacks, bounds, and the
// submitter integration. On the CPU a stand-in engine "replays" by running the model into the
// same static output tensor, as a CUDA graph writes the same memory each replay, so an output
// that aliased the static buffer would be overwritten and caught. On CUDA devices the same
// checks run against real graphs.
#include <ATen/ATen.h>

#include <atomic>
#include <bit>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "syncbatch/torch.hpp"
#include "syncbatch/torch/detail/graph_engine.hpp"
#include "torch_test_support.hpp"

namespace syncbatch {
namespace {

using testing::Mlp;

// Padding changes the GEMM's shape, and with it the summation order: equal up to rounding.
bool near(const at::Tensor& a, const at::Tensor& b) {
  return at::allclose(a, b, 1e-4, 1e-5);
}

// The same on a GPU, where a different batch size can also pick another GEMM kernel: rounding
// is relative to the output's scale (summands of tens), not to each element, which may be near
// zero. A wrong row (another request's, or stale) is off by the scale itself.
::testing::AssertionResult matches_eager(const at::Tensor& got, const at::Tensor& want) {
  if (got.sizes() != want.sizes())
    return ::testing::AssertionFailure() << "sizes " << got.sizes() << " vs " << want.sizes();
  const at::Tensor g = got.cpu(), w = want.cpu();
  const double diff = (g - w).abs().max().item<double>();
  const double scale = 1.0 + w.abs().max().item<double>();
  if (diff <= 1e-5 * scale) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "max difference " << diff << " at output scale " << scale;
}

thread_local bool capturing = false;

class FakeGraph final : public detail::CapturedGraph {
 public:
  FakeGraph(GraphedModel::Forward f, at::Tensor in, at::Tensor out)
      : f_(std::move(f)), in_(std::move(in)), out_(std::move(out)) {}
  void replay() override { out_.copy_(f_(in_)); }

 private:
  GraphedModel::Forward f_;
  at::Tensor in_, out_;
};

class FakeEngine final : public detail::GraphEngine {
 public:
  std::string unavailable_reason(c10::Device) const override { return ""; }
  std::unique_ptr<detail::CapturedGraph> capture(const GraphedModel::Forward& forward,
                                                 const at::Tensor& input, at::Tensor& output,
                                                 int warmup_runs) override {
    for (int i = 0; i < warmup_runs; ++i) (void)forward(input);
    capturing = true;
    try {
      output = forward(input);
    } catch (const std::exception& e) {
      capturing = false;
      throw detail::CaptureError(e.what());
    }
    capturing = false;
    ++captures;
    return std::make_unique<FakeGraph>(forward, input, output);
  }
  void copy(const at::Tensor& dst, const at::Tensor& src) const override {
    ++copies;
    GraphEngine::copy(dst, src);
  }
  std::atomic<int> captures{0};
  mutable std::atomic<int> copies{0};  // copies in and out of static buffers
};

struct Fixture {
  Mlp mlp{8, 16, 4};
  std::shared_ptr<FakeEngine> engine = std::make_shared<FakeEngine>();
  std::vector<std::string> logged;
  GraphedModel make(GraphOptions options = {}) {
    options.log = [this](const std::string& s) { logged.push_back(s); };
    return make_graphed_model_with_engine([m = mlp](const at::Tensor& x) { return m(x); },
                                          c10::kCPU, std::move(options), engine);
  }
};

TEST(GraphBuckets, DefaultsArePowersOfTwoUpToMaxRows) {
  EXPECT_EQ(graph_buckets({.max_rows = 64}), (std::vector<int64_t>{1, 2, 4, 8, 16, 32, 64}));
  EXPECT_EQ(graph_buckets({.max_rows = 48}), (std::vector<int64_t>{1, 2, 4, 8, 16, 32, 48}));
  EXPECT_EQ(graph_buckets({.max_rows = 1}), (std::vector<int64_t>{1}));
  EXPECT_EQ(graph_buckets({.buckets = {8, 1, 8, 3}}), (std::vector<int64_t>{1, 3, 8}));
}

TEST(GraphBuckets, BadOptionsNameWhatWasExpected) {
  try {
    graph_buckets({.buckets = {4, 0}});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("expected row counts >= 1, got 0"), std::string::npos);
  }
  EXPECT_THROW(graph_buckets({.max_rows = 0}), Error);
  Fixture f;
  EXPECT_THROW(f.make({.warmup_runs = 0}), Error);
  EXPECT_THROW(f.make({.max_graphs = 0}), Error);
  try {
    f.make({.max_fused_calls = 0});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("max_fused_calls: expected at least 1, got 0"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(make_graphed_model_with_engine({}, c10::kCPU, {}, f.engine), Error);
}

TEST(GraphBuckets, SmallestBucketThatFits) {
  const std::vector<int64_t> b{1, 2, 4, 8, 64};
  EXPECT_EQ(bucket_for(1, b), 1);
  EXPECT_EQ(bucket_for(3, b), 4);
  EXPECT_EQ(bucket_for(8, b), 8);
  EXPECT_EQ(bucket_for(9, b), 64);
  EXPECT_EQ(bucket_for(64, b), 64);
  EXPECT_EQ(bucket_for(65, b), 0);
}

TEST(CaptureErrorSummary, NamesTheErrorTheModelLineAndWhatASyncMeans) {
  // A traced transformers BERT captured with TorchScript's optimizer off (LibTorch 2.11).
  const std::string torchscript =
      "The following operation failed in the TorchScript interpreter.\n"
      "Traceback of TorchScript, serialized code (most recent call last):\n"
      "  File \"code/__torch__.py\", line 11, in forward\n"
      "    _0, _1, = (bert).forward(ids, mask, )\n"
      "               ~~~~~~~~~~~~~ <--- HERE\n"
      "  File \"code/__torch__/transformers/models/bert/modeling_bert.py\", line 74, in forward\n"
      "    _19 = int(seq_length)\n"
      "    _20 = int(torch.add(seq_length, CONSTANTS.c0))\n"
      "          ~~~ <--- HERE\n"
      "    position_ids0 = torch.slice(_21, 1, 0, _20)\n"
      "\n"
      "Traceback of TorchScript, original code (most recent call last):\n"
      "  File \"\", line 0, in forward\n"
      "RuntimeError: CUDA error: operation not permitted when stream is capturing\n";
  const std::string torchscript_summary = detail::capture_error_summary(torchscript);
  EXPECT_EQ(torchscript_summary,
            "The following operation failed in the TorchScript interpreter. RuntimeError: CUDA "
            "error: operation not permitted when stream is capturing, at `_20 = "
            "int(torch.add(seq_length, CONSTANTS.c0))`: the forward waits on the device there "
            "(int(), .item() or a copy to the host of a device tensor, e.g. a length computed on "
            "the device), which a CUDA graph cannot hold");
  // Other errors: their first line, unchanged.
  EXPECT_EQ(detail::capture_error_summary("CUDA error: out of memory\nmore"),
            "CUDA error: out of memory");
  EXPECT_EQ(detail::capture_error_summary(""), "");
  // A TorchScript error without a marked line keeps its error line alone.
  EXPECT_EQ(detail::capture_error_summary(
                "The following operation failed in the TorchScript interpreter.\n"
                "RuntimeError: shape mismatch\n"),
            "The following operation failed in the TorchScript interpreter. RuntimeError: shape "
            "mismatch");
}

TEST(GraphedModel, EveryRowCountMatchesEagerAndOutputsSurviveLaterReplays) {
  Fixture f;
  GraphedModel graphed = f.make({.max_rows = 16});
  std::vector<at::Tensor> inputs, outputs;
  for (int64_t rows = 1; rows <= 16; ++rows) {
    inputs.push_back(at::randn({rows, 8}));
    outputs.push_back(graphed(inputs.back()));
  }
  // Each output is checked only after every later replay has overwritten the static outputs.
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    ASSERT_EQ(outputs[i].sizes(), (std::vector<int64_t>{static_cast<int64_t>(i) + 1, 4}));
    EXPECT_TRUE(near(outputs[i], f.mlp(inputs[i]))) << "rows " << i + 1;
  }
  const GraphStats s = graphed.stats();
  EXPECT_EQ(s.captured, 5u);  // buckets 1, 2, 4, 8, 16
  EXPECT_EQ(s.graphs, 5u);
  EXPECT_EQ(s.replays, 16u);
  EXPECT_EQ(s.eager_runs, 0u);
  // Padding: rows 3 -> 4, 5..7 -> 8, 9..15 -> 16.
  EXPECT_EQ(s.padded_rows, 1u + (3 + 2 + 1) + (7 + 6 + 5 + 4 + 3 + 2 + 1));
  EXPECT_TRUE(s.unavailable_reason.empty());
  EXPECT_TRUE(f.logged.empty());
}

TEST(GraphedModel, SignaturesGetTheirOwnGraphs) {
  Fixture f;
  GraphedModel graphed = make_graphed_model_with_engine([](const at::Tensor& x) { return x * 2; },
                                                        c10::kCPU, {.max_rows = 4}, f.engine);
  const at::Tensor a = at::randn({2, 3}), b = at::randn({2, 5}), c = at::ones({2, 3}, at::kLong);
  EXPECT_TRUE(at::equal(graphed(a), a * 2));
  EXPECT_TRUE(at::equal(graphed(b), b * 2));
  EXPECT_TRUE(at::equal(graphed(c), c * 2));
  EXPECT_EQ(graphed(c).scalar_type(), at::kLong);
  EXPECT_EQ(graphed.stats().captured, 3u);
}

TEST(GraphedModel, MoreRowsThanTheLargestBucketRunEagerly) {
  Fixture f;
  GraphedModel graphed = f.make({.max_rows = 4});
  const at::Tensor x = at::randn({9, 8});
  EXPECT_TRUE(near(graphed(x), f.mlp(x)));
  EXPECT_TRUE(near(graphed(x), f.mlp(x)));
  const GraphStats s = graphed.stats();
  EXPECT_EQ(s.eager_runs, 2u);
  EXPECT_EQ(s.captured, 0u);
  ASSERT_EQ(f.logged.size(), 1u);  // once per reason, not per call
  EXPECT_NE(f.logged[0].find("largest bucket (4)"), std::string::npos) << f.logged[0];
  EXPECT_EQ(s.last_fallback, f.logged[0]);
}

TEST(GraphedModel, ModelThatCannotBeCapturedFallsBackForGood) {
  Fixture f;
  int calls = 0;
  GraphedModel graphed = make_graphed_model_with_engine(
      [&](const at::Tensor& x) {
        ++calls;
        if (capturing) throw std::runtime_error("operation not permitted when stream is capturing");
        return x + 1;
      },
      c10::kCPU, {.log = [&](const std::string& s) { f.logged.push_back(s); }}, f.engine);
  // Three buckets fail (4, 1, 2), none ever captured: the model is taken as not capturable,
  // and the fourth (8) and a second call of the first run eagerly without trying.
  for (int64_t rows : {3, 1, 2, 8, 3}) {
    const at::Tensor x = at::randn({rows, 2});
    EXPECT_TRUE(at::equal(graphed(x), x + 1)) << rows;
  }
  const GraphStats s = graphed.stats();
  EXPECT_EQ(s.capture_failures, 3u);
  EXPECT_EQ(s.captured, 0u);
  EXPECT_EQ(s.graphs, 0u);
  EXPECT_EQ(s.eager_runs, 5u);
  ASSERT_EQ(f.logged.size(), 3u);
  EXPECT_NE(f.logged[0].find("cannot be captured as a CUDA graph for float32 [4, 2] (operation "
                             "not permitted when stream is capturing); calls of that shape run "
                             "eagerly"),
            std::string::npos)
      << f.logged[0];
  EXPECT_NE(f.logged[2].find("for float32 [2, 2] (operation not permitted when stream is "
                             "capturing); calls run eagerly"),
            std::string::npos)
      << f.logged[2];
  // 3 x (2 warm-ups + 1 failed capture) + 5 eager runs.
  EXPECT_EQ(calls, 14);
}

// A model that cannot be captured at one size only (BERT at one row, say) keeps its graphs for
// the others, and calls of that size run eagerly without another capture attempt.
TEST(GraphedModel, ABucketThatCannotBeCapturedRunsEagerlyAndTheOthersReplay) {
  Fixture f;
  int calls = 0;
  GraphedModel graphed = make_graphed_model_with_engine(
      [&](const at::Tensor& x) {
        ++calls;
        if (capturing && x.size(0) == 1) throw std::runtime_error("not at one row");
        return x * 2;
      },
      c10::kCPU,
      {.buckets = {1, 2, 4}, .log = [&](const std::string& s) { f.logged.push_back(s); }},
      f.engine);
  for (int round = 0; round < 3; ++round)
    for (int64_t rows : {1, 2, 3}) {
      const at::Tensor x = at::randn({rows, 2});
      EXPECT_TRUE(at::equal(graphed(x), x * 2)) << rows;
    }
  const GraphStats s = graphed.stats();
  EXPECT_EQ(s.capture_failures, 1u);
  EXPECT_EQ(s.captured, 2u);
  EXPECT_EQ(s.replays, 6u);
  EXPECT_EQ(s.eager_runs, 3u);
  ASSERT_EQ(f.logged.size(), 1u);
  EXPECT_NE(f.logged[0].find("for float32 [1, 2] (not at one row); calls of that shape run "
                             "eagerly"),
            std::string::npos)
      << f.logged[0];
  // warm_up goes past the bucket it cannot capture.
  GraphedModel warmed = make_graphed_model_with_engine(
      [](const at::Tensor& x) {
        if (capturing && x.size(0) == 1) throw std::runtime_error("not at one row");
        return x * 2;
      },
      c10::kCPU, {.buckets = {1, 2, 4}, .capture_on_first_use = false}, f.engine);
  warmed.warm_up(at::randn({1, 2}));
  EXPECT_EQ(warmed.stats().captured, 2u);
}

TEST(GraphedModel, ABadInputFailsItsCallOnlyAndKeepsNoGraph) {
  Fixture f;
  GraphedModel graphed = f.make();
  EXPECT_THROW(graphed(at::randn({2, 7})), c10::Error);  // the MLP wants 8 features
  EXPECT_EQ(graphed.stats().graphs, 0u);
  EXPECT_EQ(graphed.stats().capture_failures, 0u);
  const at::Tensor x = at::randn({2, 8});
  EXPECT_TRUE(near(graphed(x), f.mlp(x)));
  EXPECT_EQ(graphed.stats().replays, 1u);
  EXPECT_TRUE(f.logged.empty());
}

TEST(GraphedModel, ModelWithoutOneOutputRowPerInputRowRunsEagerly) {
  Fixture f;
  GraphedModel graphed = make_graphed_model_with_engine(
      [](const at::Tensor& x) { return x.sum(0, /*keepdim=*/true); }, c10::kCPU,
      {.log = [&](const std::string& s) { f.logged.push_back(s); }}, f.engine);
  const at::Tensor x = at::randn({3, 2});
  EXPECT_TRUE(near(graphed(x), x.sum(0, true)));
  EXPECT_EQ(graphed.stats().graphs, 0u);
  ASSERT_EQ(f.logged.size(), 1u);
  EXPECT_NE(f.logged[0].find("one output row per input row"), std::string::npos) << f.logged[0];
}

TEST(GraphedModel, WithoutCaptureOnFirstUseOnlyWarmUpCaptures) {
  Fixture f;
  GraphedModel graphed = f.make({.max_rows = 8, .capture_on_first_use = false});
  const at::Tensor x = at::randn({3, 8});
  EXPECT_TRUE(near(graphed(x), f.mlp(x)));
  EXPECT_EQ(graphed.stats().eager_runs, 1u);
  EXPECT_EQ(graphed.stats().captured, 0u);
  graphed.warm_up(at::randn({1, 8}));
  EXPECT_EQ(graphed.stats().captured, 4u);  // 1, 2, 4, 8
  graphed.warm_up(at::randn({1, 8}));       // already there: nothing more
  EXPECT_EQ(graphed.stats().captured, 4u);
  EXPECT_TRUE(near(graphed(x), f.mlp(x)));
  EXPECT_EQ(graphed.stats().replays, 1u);
  EXPECT_THROW(graphed.warm_up(at::randn({0, 8})), Error);
}

TEST(GraphedModel, MaxGraphsBoundsWhatIsHeld) {
  Fixture f;
  GraphedModel graphed = f.make({.buckets = {1, 2, 4}, .max_graphs = 2});
  // 1 and 2 capture; 4 frees 1's graph (least recently used); 4 replays; 1 frees 2's.
  for (int64_t rows : {1, 2, 4, 4, 1}) {
    const at::Tensor x = at::randn({rows, 8});
    EXPECT_TRUE(near(graphed(x), f.mlp(x)));
  }
  const GraphStats s = graphed.stats();
  EXPECT_EQ(s.graphs, 2u);
  EXPECT_EQ(s.captured, 4u);
  EXPECT_EQ(s.evictions, 2u);
  EXPECT_EQ(s.replays, 5u);
  EXPECT_EQ(s.eager_runs, 0u);
  EXPECT_TRUE(f.logged.empty());
}

TEST(GraphedModel, ReleaseFreesGraphsAndLaterCallsCaptureAgain) {
  Fixture f;
  GraphedModel graphed = f.make({.max_rows = 4});
  const at::Tensor x = at::randn({4, 8});
  graphed(x);
  EXPECT_EQ(graphed.stats().graphs, 1u);
  graphed.release();
  EXPECT_EQ(graphed.stats().graphs, 0u);
  EXPECT_TRUE(near(graphed(x), f.mlp(x)));
  EXPECT_EQ(graphed.stats().captured, 2u);
  EXPECT_EQ(graphed.stats().graphs, 1u);
}

TEST(GraphedModel, CopiesShareGraphs) {
  Fixture f;
  GraphedModel a = f.make({.max_rows = 2});
  GraphedModel b = a;  // NOLINT(performance-unnecessary-copy-initialization): the point
  a(at::randn({2, 8}));
  b(at::randn({2, 8}));
  EXPECT_EQ(a.stats().captured, 1u);
  EXPECT_EQ(b.stats().replays, 2u);
}

// call_rows: the parts' rows go straight into the static input, so a replay costs one engine
// copy (out) instead of two, and gives what a call on the concatenated rows gives.
TEST(GraphedModel, CallRowsGathersPartsIntoTheStaticInput) {
  Fixture f;
  GraphedModel graphed = f.make({.max_rows = 16});
  std::mt19937 rng(1);
  std::vector<std::vector<at::Tensor>> inputs;
  std::vector<at::Tensor> outputs;
  for (int k = 0; k < 40; ++k) {
    std::vector<at::Tensor> parts;
    const int n = 2 + static_cast<int>(rng() % 5);
    for (int i = 0; i < n; ++i)
      parts.push_back(at::randn({1 + static_cast<int64_t>(rng() % 3), 8}));
    inputs.push_back(parts);
    outputs.push_back(graphed.call_rows(parts));
  }
  // Checked after every later replay has overwritten the static outputs.
  for (std::size_t k = 0; k < inputs.size(); ++k)
    EXPECT_TRUE(near(outputs[k], f.mlp(at::cat(inputs[k], 0)))) << "call " << k;
  EXPECT_EQ(graphed.stats().replays, inputs.size());
  EXPECT_EQ(graphed.stats().eager_runs, 0u);
  // Once every bucket is captured, a call is one copy (out): none for the input.
  graphed.warm_up(at::randn({16, 8}));
  const int before = f.engine->copies.load();
  const std::uint64_t replays = graphed.stats().replays;
  EXPECT_TRUE(near(graphed.call_rows({at::ones({3, 8}), at::zeros({2, 8})}),
                   f.mlp(at::cat({at::ones({3, 8}), at::zeros({2, 8})}, 0))));
  EXPECT_EQ(f.engine->copies.load() - before, 1);
  EXPECT_EQ(graphed.stats().replays, replays + 1);
  EXPECT_EQ(graphed.stats().eager_runs, 0u);
  // One part is a plain call (copy in, copy out).
  EXPECT_TRUE(near(graphed.call_rows({at::ones({3, 8})}), f.mlp(at::ones({3, 8}))));
  EXPECT_EQ(f.engine->copies.load() - before, 3);
}

TEST(GraphedModel, CallRowsRejectsNothingOperatorWouldTake) {
  Fixture f;
  GraphedModel graphed = f.make({.max_rows = 4});
  try {
    graphed.call_rows({});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("expected at least one tensor, got none"),
              std::string::npos);
  }
  // Mismatched parts fail as at::cat fails on them; no graph is kept, later calls work.
  EXPECT_THROW(graphed.call_rows({at::randn({1, 8}), at::randn({1, 5})}), c10::Error);
  // More rows than the largest bucket run eagerly, as operator() runs them.
  const std::vector<at::Tensor> big{at::randn({3, 8}), at::randn({3, 8})};
  EXPECT_TRUE(near(graphed.call_rows(big), f.mlp(at::cat(big, 0))));
  EXPECT_EQ(graphed.stats().eager_runs, 1u);
  const std::vector<at::Tensor> ok{at::randn({1, 8}), at::randn({2, 8})};
  EXPECT_TRUE(near(graphed.call_rows(ok), f.mlp(at::cat(ok, 0))));
  EXPECT_EQ(graphed.stats().replays, 1u);
}

// call_each: every count of calls, split into fused replays by the bits of the count, gives
// each call exactly what it gives alone; outputs survive the later replays.
TEST(GraphedModelCallEach, EveryCountMatchesEachCallAlone) {
  Fixture f;
  GraphedModel graphed = f.make({.max_fused_calls = 8});
  std::vector<std::vector<at::Tensor>> inputs, outputs;
  for (int n = 1; n <= 20; ++n) {
    inputs.emplace_back();
    for (int i = 0; i < n; ++i) inputs.back().push_back(at::randn({1, 8}));
    outputs.push_back(graphed.call_each(inputs.back()));
  }
  std::uint64_t calls = 0, launches = 0;
  for (std::size_t n = 1; n <= inputs.size(); ++n) {
    const auto& in = inputs[n - 1];
    const auto& out = outputs[n - 1];
    ASSERT_EQ(out.size(), n);
    for (std::size_t i = 0; i < n; ++i) {
      ASSERT_EQ(out[i].sizes(), (std::vector<int64_t>{1, 4}));
      EXPECT_TRUE(at::equal(out[i], f.mlp(in[i]))) << n << " calls, call " << i;
    }
    calls += n;
    launches += n / 8 + std::popcount(n % 8);  // 8s, then one replay per set bit of the rest
  }
  const GraphStats s = graphed.stats();
  EXPECT_EQ(s.captured, 4u);  // 1, 2, 4 and 8 calls
  EXPECT_EQ(s.replays, calls);
  EXPECT_EQ(s.fused_replays, launches);
  EXPECT_EQ(s.eager_runs, 0u);
  EXPECT_EQ(s.padded_rows, 0u);
  EXPECT_TRUE(f.logged.empty());
}

TEST(GraphedModelCallEach, ShapesAndDtypesFuseApartAndResultsKeepTheirOrder) {
  Fixture f;
  GraphedModel graphed = make_graphed_model_with_engine([](const at::Tensor& x) { return x * 2; },
                                                        c10::kCPU, {}, f.engine);
  const std::vector<at::Tensor> xs{at::randn({1, 3}), at::randn({2, 3}),
                                   at::randn({1, 3}), at::ones({1, 3}, at::kLong),
                                   at::randn({2, 3}), at::randn({1, 5})};
  const std::vector<at::Tensor> ys = graphed.call_each(xs);
  ASSERT_EQ(ys.size(), xs.size());
  for (std::size_t i = 0; i < xs.size(); ++i) {
    EXPECT_TRUE(at::equal(ys[i], xs[i] * 2)) << i;
    EXPECT_EQ(ys[i].scalar_type(), xs[i].scalar_type()) << i;
  }
  // [1, 3] float x2, [2, 3] float x2, [1, 3] long, [1, 5] float: four graphs, four replays.
  EXPECT_EQ(graphed.stats().captured, 4u);
  EXPECT_EQ(graphed.stats().fused_replays, 4u);
}

// Each call is its own forward, so unlike operator()'s row buckets, call_each() graphs models
// whose outputs have no row per input row.
TEST(GraphedModelCallEach, FusesModelsWithoutOneOutputRowPerInputRow) {
  Fixture f;
  GraphedModel graphed = make_graphed_model_with_engine(
      [](const at::Tensor& x) { return x.sum(); }, c10::kCPU,
      {.log = [&](const std::string& s) { f.logged.push_back(s); }}, f.engine);
  std::vector<at::Tensor> xs;
  for (int i = 0; i < 4; ++i) xs.push_back(at::randn({3, 2}));
  const auto ys = graphed.call_each(xs);
  for (std::size_t i = 0; i < xs.size(); ++i) {
    EXPECT_EQ(ys[i].dim(), 0);
    EXPECT_TRUE(near(ys[i], xs[i].sum())) << i;
  }
  EXPECT_EQ(graphed.stats().fused_replays, 1u);
  EXPECT_TRUE(f.logged.empty());
}

TEST(GraphedModelCallEach, ModelThatCannotBeCapturedRunsCallByCall) {
  Fixture f;
  GraphedModel graphed = make_graphed_model_with_engine(
      [&](const at::Tensor& x) {
        if (capturing) throw std::runtime_error("operation not permitted when stream is capturing");
        return x + 1;
      },
      c10::kCPU, {.log = [&](const std::string& s) { f.logged.push_back(s); }}, f.engine);
  for (int round = 0; round < 2; ++round) {
    const std::vector<at::Tensor> xs{at::randn({1, 2}), at::randn({1, 2}), at::randn({1, 2})};
    const auto ys = graphed.call_each(xs);
    for (std::size_t i = 0; i < xs.size(); ++i) EXPECT_TRUE(at::equal(ys[i], xs[i] + 1));
  }
  const GraphStats s = graphed.stats();
  EXPECT_EQ(s.fused_replays, 0u);
  EXPECT_EQ(s.replays, 0u);
  EXPECT_EQ(s.eager_runs, 6u);
  // The fused capture of 2 calls fails (they run one by one), the row bucket's fails, then the
  // fused capture of 1 call: three failures with none captured, so the model is taken as not
  // capturable; each reason logged once.
  EXPECT_EQ(s.capture_failures, 3u);
  ASSERT_EQ(f.logged.size(), 3u);
  EXPECT_NE(f.logged[0].find("cannot be captured as a CUDA graph for float32 [2, 2]"),
            std::string::npos)
      << f.logged[0];
  EXPECT_NE(f.logged[2].find("; call_each() runs calls one by one"), std::string::npos)
      << f.logged[2];
}

TEST(GraphedModelCallEach, ABadCallThrowsAndKeepsNoGraphForItsShape) {
  Fixture f;
  GraphedModel graphed = f.make();
  const std::vector<at::Tensor> bad{at::randn({1, 8}), at::randn({1, 7})};  // the MLP wants 8
  EXPECT_THROW(graphed.call_each(bad), c10::Error);
  EXPECT_EQ(graphed.stats().capture_failures, 0u);
  const std::vector<at::Tensor> good{at::randn({1, 8}), at::randn({1, 8})};
  const auto ys = graphed.call_each(good);
  EXPECT_TRUE(at::equal(ys[1], f.mlp(good[1])));
  // The bad batch's good call replayed before its bad one threw; now its graph serves again.
  EXPECT_EQ(graphed.stats().fused_replays, 2u);
  EXPECT_EQ(graphed.stats().captured, 2u);  // 1 call and 2 calls of [1, 8]
}

TEST(GraphedModelCallEach, WithoutCaptureOnFirstUseOnlyWarmUpEachCaptures) {
  Fixture f;
  GraphedModel graphed = f.make({.capture_on_first_use = false, .max_fused_calls = 4});
  std::vector<at::Tensor> xs;
  for (int i = 0; i < 6; ++i) xs.push_back(at::randn({1, 8}));
  auto ys = graphed.call_each(xs);
  EXPECT_EQ(graphed.stats().eager_runs, 6u);
  EXPECT_EQ(graphed.stats().captured, 0u);
  graphed.warm_up_each(at::randn({1, 8}));
  EXPECT_EQ(graphed.stats().captured, 3u);  // 1, 2, 4 calls
  ys = graphed.call_each(xs);
  for (std::size_t i = 0; i < xs.size(); ++i) EXPECT_TRUE(at::equal(ys[i], f.mlp(xs[i])));
  EXPECT_EQ(graphed.stats().fused_replays, 2u);  // 4 + 2
  EXPECT_THROW(graphed.warm_up_each(at::Tensor()), Error);
}

// Per-call mode's results through fused replays: many producers, two workers, a bad request
// now and then that must fail alone, and a shutdown with requests still queued.
TEST(GraphedModelCallEach, FusedCallsModelServesASubmitterAndIsolatesBadRequests) {
  Fixture f;
  GraphedModel graphed = f.make({.max_fused_calls = 16});
  std::atomic<int> mismatches{0}, bad_ok{0}, good{0};
  std::vector<Future<at::Tensor>> late;
  std::mutex late_mu;
  {
    testing::TensorSubmitter submitter(make_fused_calls_model(graphed),
                                       {.workers = 2, .policy = EveryN{16}},
                                       TorchBackend(c10::kCPU, {.on_worker_start = [&] {
                                                      graphed.warm_up_each(at::randn({1, 8}));
                                                    }}));
    std::vector<std::thread> producers;
    for (int t = 0; t < 8; ++t)
      producers.emplace_back([&, t] {
        std::mt19937 rng(t);
        std::vector<std::pair<at::Tensor, Future<at::Tensor>>> mine;
        for (int i = 0; i < 200; ++i) {
          const bool bad = rng() % 50 == 0;
          at::Tensor x = at::randn({1, bad ? 7 : 8});
          mine.emplace_back(x, submitter.submit(x));
          if (mine.size() < 8) continue;
          for (auto& [in, fut] : mine) {
            if (in.size(1) == 7) {
              EXPECT_THROW(fut.get(), c10::Error);
              ++bad_ok;
            } else if (at::equal(fut.get(), f.mlp(in))) {
              ++good;
            } else {
              ++mismatches;
            }
          }
          mine.clear();
        }
        std::lock_guard lock(late_mu);
        for (int i = 0; i < 32; ++i) late.push_back(submitter.submit(at::randn({1, 8})));
      });
    for (auto& p : producers) p.join();
  }  // shutdown drains what is still queued
  EXPECT_EQ(mismatches.load(), 0);
  EXPECT_EQ(good.load() + bad_ok.load(), 8 * 200);
  EXPECT_GT(bad_ok.load(), 0);
  for (auto& fut : late) EXPECT_EQ(fut.get().sizes(), (std::vector<int64_t>{1, 4}));
  EXPECT_GT(graphed.stats().fused_replays, 0u);
  EXPECT_EQ(graphed.stats().capture_failures, 0u);
}

// Submitter workers replay concurrently: many producers, random row counts, two workers.
TEST(GraphedModel, ServesBatchedSubmitterInBothModesUnderLoad) {
  Fixture f;
  GraphedModel graphed = f.make({.max_rows = 16});
  using Submitter = BatchedSubmitter<at::Tensor, at::Tensor, TorchBackend>;
  std::atomic<int> warmed{0};
  TorchBackendOptions backend{.on_worker_start = [&] {
    graphed.warm_up(at::randn({1, 8}));
    ++warmed;
  }};
  Submitter per_call([&](at::Tensor& x) { return graphed(x); }, {.workers = 2, .policy = EveryN{8}},
                     TorchBackend(c10::kCPU, backend));
  Submitter stacked(make_stacked_model(graphed), {.workers = 2, .policy = EveryN{16}},
                    TorchBackend(c10::kCPU, backend));
  EXPECT_EQ(warmed.load(), 4);
  std::vector<std::thread> producers;
  std::atomic<int> mismatches{0}, done{0};
  for (int t = 0; t < 8; ++t)
    producers.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < 100; ++i) {
        const at::Tensor x = at::randn({1 + static_cast<int64_t>(rng() % 3), 8});
        auto a = per_call.submit(x);
        auto b = stacked.submit(x);
        const at::Tensor want = f.mlp(x);
        if (!near(a.get(), want) || !near(b.get(), want)) ++mismatches;
        ++done;
      }
    });
  for (auto& p : producers) p.join();
  EXPECT_EQ(mismatches.load(), 0);
  EXPECT_EQ(done.load(), 800);
  const GraphStats s = graphed.stats();
  EXPECT_GT(s.replays, 0u);
  EXPECT_EQ(s.capture_failures, 0u);
  EXPECT_LE(s.graphs, GraphOptions{}.max_graphs);
}

// GraphedMultiModel on the stand-in engine: lists of tensors packed into one static input.
struct MultiFixture {
  testing::TokenModel model;
  std::shared_ptr<FakeEngine> engine = std::make_shared<FakeEngine>();
  std::vector<std::string> logged;
  GraphedMultiModel make(GraphedMultiModel::Forward f = {}, GraphOptions options = {}) {
    options.log = [this](const std::string& s) { logged.push_back(s); };
    if (!f) f = [m = model](const Tensors& in) { return m(in); };
    return make_graphed_multi_model_with_engine(std::move(f), c10::kCPU, std::move(options),
                                                engine);
  }
};

Tensors tokens(int64_t rows, int64_t len, at::ScalarType mask_dtype = at::kLong) {
  return {at::randint(0, 32, {rows, len}, at::kLong), at::ones({rows, len}, mask_dtype)};
}

::testing::AssertionResult same_tensors(const Tensors& got, const Tensors& want) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << got.size() << " tensors, want " << want.size();
  for (std::size_t i = 0; i < got.size(); ++i)
    if (got[i].sizes() != want[i].sizes() || got[i].scalar_type() != want[i].scalar_type() ||
        !at::allclose(got[i], want[i], 1e-5, 1e-6))
      return ::testing::AssertionFailure() << "output " << i << ": " << describe_tensor(got[i])
                                           << " vs " << describe_tensor(want[i]);
  return ::testing::AssertionSuccess();
}

// Rows 1 to 9 at two lengths, with float, int64 and mixed outputs: each call equals the model
// run eagerly, later replays leave earlier results alone, and each (bucket, length) pair
// captures once.
TEST(GraphedMultiModel, EveryRowCountAndLengthMatchesEager) {
  MultiFixture f;
  const GraphedMultiModel graphed = f.make();
  std::vector<Tensors> inputs, outputs;
  for (int64_t len : {3, 8})
    for (int64_t rows = 1; rows <= 9; ++rows) {
      inputs.push_back(tokens(rows, len, len == 3 ? at::kLong : at::kFloat));
      outputs.push_back(graphed(inputs.back()));
    }
  for (std::size_t i = 0; i < inputs.size(); ++i)
    EXPECT_TRUE(same_tensors(outputs[i], f.model(inputs[i]))) << i;
  const GraphStats s = graphed.stats();
  EXPECT_EQ(s.captured, 10u);  // buckets 1, 2, 4, 8, 16 at each length
  EXPECT_EQ(f.engine->captures.load(), 10);
  EXPECT_EQ(s.replays, 18u);
  EXPECT_EQ(s.eager_runs, 0u);
  EXPECT_EQ(s.padded_rows, 2u * (0 + 0 + 1 + 0 + 3 + 2 + 1 + 0 + 7));
  EXPECT_TRUE(f.logged.empty());
}

// Two layouts of the same packed size (float [4] then [8], and [8] then [4]: 48 bytes a row
// each) are different signatures: each gets its own graph and its own results.
TEST(GraphedMultiModel, LayoutsOfEqualSizeGetTheirOwnGraphs) {
  MultiFixture f;
  const auto sums = [](const Tensors& in) {
    return Tensors{in[0].sum(1, true) * 10 + in[1].sum(1, true), in[1] * 2};
  };
  const GraphedMultiModel graphed = f.make(sums);
  const Tensors a{at::randn({2, 4}), at::randn({2, 8})}, b{at::randn({2, 8}), at::randn({2, 4})};
  for (int round = 0; round < 2; ++round) {
    EXPECT_TRUE(same_tensors(graphed(a), sums(a)));
    EXPECT_TRUE(same_tensors(graphed(b), sums(b)));
  }
  EXPECT_EQ(graphed.stats().captured, 2u);
  EXPECT_EQ(graphed.stats().replays, 4u);
}

// A model whose outputs do not have one row per input row cannot be packed: it runs eagerly,
// for good, with the reason logged once.
TEST(GraphedMultiModel, OutputsWithoutOneRowPerInputRowRunEagerly) {
  MultiFixture f;
  const auto total = [](const Tensors& in) { return Tensors{in[0].sum(0, true), in[1]}; };
  const GraphedMultiModel graphed = f.make(total);
  for (int i = 0; i < 3; ++i) {
    const Tensors in{at::randn({4, 2}), at::randn({4, 5})};
    EXPECT_TRUE(same_tensors(graphed(in), total(in)));
  }
  const GraphStats s = graphed.stats();
  EXPECT_EQ(s.replays, 0u);
  EXPECT_EQ(s.captured, 0u);
  EXPECT_GE(s.eager_runs, 3u);
  ASSERT_EQ(f.logged.size(), 1u);
  EXPECT_NE(f.logged[0].find("the model returned float32 [1, 2] as output 0 for inputs of 4 rows; "
                             "graphs need one output row per input row"),
            std::string::npos)
      << f.logged[0];
}

// Inputs that cannot be packed (rows that differ, none, an undefined tensor) go to the model as
// they are: its own error comes back, and warm_up names what it expected.
TEST(GraphedMultiModel, InputsThatCannotBePackedRunEagerly) {
  MultiFixture f;
  const auto add = [](const Tensors& in) {
    if (in.size() != 2) throw std::invalid_argument("two inputs, please");
    return Tensors{in[0] + in[1]};
  };
  const GraphedMultiModel graphed = f.make(add);
  EXPECT_THROW(graphed({at::ones({2, 3}), at::ones({3, 3})}), c10::Error);  // no broadcast
  EXPECT_THROW(graphed({}), std::invalid_argument);
  const Tensors ok{at::ones({2, 1}), at::ones({2, 3})};  // broadcast within rows: graphed
  EXPECT_TRUE(same_tensors(graphed(ok), add(ok)));
  const GraphStats s = graphed.stats();
  EXPECT_EQ(s.eager_runs, 2u);
  EXPECT_EQ(s.replays, 1u);
  try {
    graphed.warm_up({at::ones({2, 3}), at::ones({3, 3})});
    ADD_FAILURE() << "warm_up took rows that differ";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("expected tensors of the same rows (at least one) on "
                                         "cpu, got [float32 [2, 3], float32 [3, 3]]"),
              std::string::npos)
        << e.what();
  }
}

// warm_up captures every bucket for the example's layout; later calls only replay; more graphs
// than max_graphs evict the least recently used.
TEST(GraphedMultiModel, WarmUpCapturesEveryBucketAndMaxGraphsBounds) {
  MultiFixture f;
  const GraphedMultiModel graphed =
      f.make({}, {.buckets = {1, 2, 4}, .capture_on_first_use = false, .max_graphs = 4});
  graphed.warm_up(tokens(1, 5));
  EXPECT_EQ(graphed.stats().captured, 3u);
  for (int64_t rows : {1, 2, 3, 4}) {
    const Tensors in = tokens(rows, 5);
    EXPECT_TRUE(same_tensors(graphed(in), f.model(in)));
  }
  EXPECT_EQ(graphed.stats().replays, 4u);
  const Tensors other = tokens(2, 6);  // not warmed up, and capture_on_first_use is off
  EXPECT_TRUE(same_tensors(graphed(other), f.model(other)));
  EXPECT_EQ(graphed.stats().eager_runs, 1u);
  graphed.warm_up(tokens(1, 7));  // three more: two of the first length give way
  const GraphStats s = graphed.stats();
  EXPECT_EQ(s.captured, 6u);
  EXPECT_EQ(s.graphs, 4u);
  EXPECT_EQ(s.evictions, 2u);
}

// The library's own engine on every device here: real CUDA graphs on CUDA devices, eager with
// the reason on the CPU.
class GraphedModelOnDevice : public ::testing::TestWithParam<c10::Device> {};

TEST_P(GraphedModelOnDevice, EveryBucketAndPartialBatchMatchesEager) {
  const c10::Device device = GetParam();
  c10::InferenceMode inference;
  const Mlp mlp(32, 64, 8, device);
  GraphedModel graphed([&](const at::Tensor& x) { return mlp(x); }, device, {.max_rows = 32});
  std::vector<at::Tensor> inputs, outputs;
  for (int64_t rows = 1; rows <= 32; ++rows) {
    inputs.push_back(at::randn({rows, 32}, at::TensorOptions().device(device)));
    outputs.push_back(graphed(inputs.back()));
  }
  synchronize_device(device);
  for (std::size_t i = 0; i < inputs.size(); ++i)
    EXPECT_TRUE(matches_eager(outputs[i], mlp(inputs[i]))) << "rows " << i + 1;
  const GraphStats s = graphed.stats();
  if (device.is_cuda()) {
    EXPECT_TRUE(s.unavailable_reason.empty()) << s.unavailable_reason;
    EXPECT_EQ(s.captured, 6u);  // 1, 2, 4, 8, 16, 32
    EXPECT_EQ(s.replays, 32u);
    graphed.release();
    EXPECT_EQ(graphed.stats().graphs, 0u);
  } else {
    EXPECT_NE(s.unavailable_reason.find("need a CUDA device"), std::string::npos)
        << s.unavailable_reason;
    EXPECT_EQ(s.eager_runs, 32u);
    EXPECT_EQ(s.replays, 0u);
  }
}

TEST_P(GraphedModelOnDevice, HostSyncInsideTheModelFallsBackToEager) {
  const c10::Device device = GetParam();
  std::vector<std::string> logged;
  GraphedModel graphed(
      [](const at::Tensor& x) {
        // Reading a value back to the host cannot be captured.
        return x * (x.abs().max().item<float>() > -1.0f ? 2.0 : 0.0);
      },
      device, {.log = [&](const std::string& s) { logged.push_back(s); }});
  const at::Tensor x = at::randn({3, 4}, at::TensorOptions().device(device));
  EXPECT_TRUE(near(graphed(x), x * 2));
  EXPECT_TRUE(near(graphed(x), x * 2));
  const GraphStats s = graphed.stats();
  EXPECT_EQ(s.replays, 0u);
  EXPECT_EQ(s.eager_runs, 2u);
  if (device.is_cuda()) {
    EXPECT_EQ(s.capture_failures, 1u);
    ASSERT_EQ(logged.size(), 1u);
    EXPECT_NE(logged[0].find("cannot be captured"), std::string::npos) << logged[0];
    EXPECT_NE(logged[0].find("waits on the device"), std::string::npos) << logged[0];
    // The device is fine afterwards: a capturable model still captures, and random numbers
    // can be drawn (a failed capture once left LibTorch's CUDA RNG in capture mode, and every
    // later random op on the device threw "Offset increment outside graph capture").
    GraphedModel ok([](const at::Tensor& t) { return t * 3; }, device);
    EXPECT_TRUE(near(ok(x), x * 3));
    EXPECT_EQ(ok.stats().replays, 1u);
    EXPECT_NO_THROW(at::randn({4}, at::TensorOptions().device(device)));
    EXPECT_NO_THROW(at::rand({4}, at::TensorOptions().device(device)));
  }
}

TEST_P(GraphedModelOnDevice, SubmitterWithGraphsMatchesEager) {
  const c10::Device device = GetParam();
  const Mlp mlp(32, 64, 8, device);
  GraphedModel graphed([&](const at::Tensor& x) { return mlp(x); }, device, {.max_rows = 16});
  const at::Tensor example = at::randn({1, 32}, at::TensorOptions().device(device));
  using Submitter = BatchedSubmitter<at::Tensor, at::Tensor, TorchBackend>;
  TorchBackendOptions backend{.on_worker_start = [&] { graphed.warm_up(example); }};
  Submitter per_call([&](at::Tensor& x) { return graphed(x); }, {.workers = 2, .policy = EveryN{8}},
                     TorchBackend(device, backend));
  Submitter stacked(make_stacked_model(graphed, {.output_device = c10::Device(c10::kCPU)}),
                    {.workers = 2, .policy = EveryN{16}}, TorchBackend(device, backend));
  const std::uint64_t warmed = graphed.stats().captured;
  std::vector<std::thread> producers;
  std::atomic<int> mismatches{0};
  std::mutex first_mu;
  std::string first;  // the first mismatch, described
  for (int t = 0; t < 8; ++t)
    producers.emplace_back([&, t] {
      c10::InferenceMode inference;
      for (int i = 0; i < 200; ++i) {
        const at::Tensor x = at::randn({1 + (t + i) % 3, 32}, at::TensorOptions().device(device));
        auto a = per_call.submit(x);
        auto b = stacked.submit(x);
        const at::Tensor want = mlp(x).cpu();
        for (const auto& check : {matches_eager(a.get(), want), matches_eager(b.get(), want)}) {
          if (check) continue;
          std::lock_guard lock(first_mu);
          if (mismatches++ == 0) first = check.message();
        }
      }
    });
  for (auto& p : producers) p.join();
  EXPECT_EQ(mismatches.load(), 0) << "first: " << first;
  if (device.is_cuda()) {
    EXPECT_EQ(warmed, 4u * 5u);  // 4 workers with a stream each, buckets 1, 2, 4, 8, 16
    EXPECT_GT(graphed.stats().replays, 0u);
  }
}

TEST_P(GraphedModelOnDevice, FusedCallsMatchEagerCallsForEveryCount) {
  const c10::Device device = GetParam();
  c10::InferenceMode inference;
  const Mlp mlp(32, 64, 8, device);
  GraphedModel graphed([&](const at::Tensor& x) { return mlp(x); }, device,
                       {.max_fused_calls = 16});
  std::vector<std::vector<at::Tensor>> inputs, outputs;
  for (int n = 1; n <= 33; ++n) {
    inputs.emplace_back();
    for (int i = 0; i < n; ++i)
      inputs.back().push_back(at::randn({1 + n % 2, 32}, at::TensorOptions().device(device)));
    outputs.push_back(graphed.call_each(inputs.back()));
  }
  synchronize_device(device);
  for (std::size_t n = 0; n < inputs.size(); ++n)
    for (std::size_t i = 0; i < inputs[n].size(); ++i)
      EXPECT_TRUE(matches_eager(outputs[n][i], mlp(inputs[n][i]))) << n + 1 << " calls, call " << i;
  const GraphStats s = graphed.stats();
  if (device.is_cuda()) {
    // Even counts (1 row each) split into 2, 4, 8 and 16 calls, never 1; odd counts (2 rows
    // each) into 1, 2, 4, 8 and 16.
    EXPECT_EQ(s.captured, 9u);
    EXPECT_EQ(s.replays, 33u * 34u / 2u);
    EXPECT_EQ(s.eager_runs, 0u);
  } else {
    EXPECT_EQ(s.eager_runs, 33u * 34u / 2u);
    EXPECT_EQ(s.fused_replays, 0u);
  }
  // Inputs on the CPU (a CUDA model's callers may send them) run as operator() runs them.
  const std::vector<at::Tensor> host{at::randn({1, 32}), at::randn({1, 32})};
  const auto ys = graphed.call_each(host);
  synchronize_device(device);
  for (std::size_t i = 0; i < host.size(); ++i) {
    EXPECT_EQ(ys[i].device(), device);
    EXPECT_TRUE(matches_eager(ys[i], mlp(host[i].to(device)))) << "host input " << i;
  }
}

// Eight workers, each with its stream, capture their graphs at the same time, serve, and free
// them, three times over. LibTorch keeps each graph in a set of the CUDA generator that it does
// not lock; unserialized captures corrupted it and a later graph destructor aborted.
TEST_P(GraphedModelOnDevice, ManyWorkersCaptureAndFreeConcurrently) {
  const c10::Device device = GetParam();
  const Mlp mlp(32, 64, 8, device);
  const at::Tensor example = at::randn({1, 32}, at::TensorOptions().device(device));
  for (int round = 0; round < 3; ++round) {
    GraphedModel graphed([&](const at::Tensor& x) { return mlp(x); }, device,
                         {.max_rows = 32, .max_graphs = 256});
    {
      using Submitter = BatchedSubmitter<at::Tensor, at::Tensor, TorchBackend>;
      Submitter stacked(
          make_stacked_model(graphed), {.workers = 8, .policy = EveryN{32}},
          TorchBackend(device, {.on_worker_start = [&] { graphed.warm_up(example); }}));
      if (device.is_cuda()) {
        EXPECT_EQ(graphed.stats().captured, 8u * 6u);  // buckets 1..32 on each worker's stream
      }
      std::vector<std::thread> producers;
      std::atomic<int> mismatches{0};
      for (int t = 0; t < 8; ++t)
        producers.emplace_back([&] {
          c10::InferenceMode inference;
          for (int i = 0; i < 50; ++i) {
            const at::Tensor x = at::randn({1 + i % 4, 32}, at::TensorOptions().device(device));
            if (!matches_eager(stacked.submit(x).get(), mlp(x))) ++mismatches;
          }
        });
      for (auto& p : producers) p.join();
      EXPECT_EQ(mismatches.load(), 0) << "round " << round;
    }  // the workers are gone; the last copy of graphed frees its graphs below
  }
}

// "cuda" (no index) is the current device: inputs on "cuda:0" are on the model's device, so
// call_each fuses them and call_rows gathers them (they once fell back, call by call).
TEST_P(GraphedModelOnDevice, ADeviceWithoutIndexIsTheCurrentOne) {
  const c10::Device device = GetParam();
  c10::InferenceMode inference;
  const Mlp mlp(32, 64, 8, device);
  GraphedModel graphed([&](const at::Tensor& x) { return mlp(x); }, c10::Device(device.type()),
                       {.max_rows = 8, .max_fused_calls = 8});
  EXPECT_EQ(graphed.device(), device);
  std::vector<at::Tensor> xs;
  for (int i = 0; i < 8; ++i) xs.push_back(at::randn({1, 32}, at::TensorOptions().device(device)));
  const std::vector<at::Tensor> each = graphed.call_each(xs);
  const at::Tensor rows = graphed.call_rows(xs);
  synchronize_device(device);
  for (std::size_t i = 0; i < xs.size(); ++i) {
    EXPECT_TRUE(matches_eager(each[i], mlp(xs[i]))) << i;
    EXPECT_TRUE(matches_eager(rows.narrow(0, static_cast<int64_t>(i), 1), mlp(xs[i]))) << i;
  }
  const GraphStats s = graphed.stats();
  if (device.is_cuda()) {
    EXPECT_EQ(s.fused_replays, 1u);  // the 8 calls in one replay, not 8 replays of one
    EXPECT_EQ(s.replays, 8u + 1u);   // and the 8 rows in one bucket-8 replay
    EXPECT_EQ(s.eager_runs, 0u);
  }
}

TEST_P(GraphedModelOnDevice, WorksInASyncScopeLoop) {
  const c10::Device device = GetParam();
  c10::InferenceMode inference;
  const Mlp mlp(16, 32, 4, device);
  GraphedModel graphed([&](const at::Tensor& x) { return mlp(x); }, device, {.buckets = {1}});
  std::vector<at::Tensor> inputs, outputs;
  {
    SyncScope scope(EveryN{8}, DeviceSync(device));
    for (int i = 0; i < 40; ++i) {
      inputs.push_back(at::randn({1, 16}, at::TensorOptions().device(device)));
      outputs.push_back(graphed(inputs.back()));
      scope.tick();
    }
    scope.flush();
    for (std::size_t i = 0; i < inputs.size(); ++i)
      EXPECT_TRUE(near(outputs[i], mlp(inputs[i]))) << i;
  }
  EXPECT_EQ(graphed.stats().replays, device.is_cuda() ? 40u : 0u);
}

INSTANTIATE_TEST_SUITE_P(Devices, GraphedModelOnDevice,
                         ::testing::ValuesIn(testing::available_devices()), testing::device_name);

}  // namespace
}  // namespace syncbatch
