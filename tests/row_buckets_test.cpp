// RowBuckets: which bucket a row count takes, and how each policy cuts a batch into runs.
// Table-driven; torch-free: this file also runs under TSan and ASan.
#include "syncbatch/row_buckets.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace syncbatch {
namespace {

using Runs = std::vector<BucketRun>;

TEST(RowBuckets, SizesAreSortedDistinctAndChecked) {
  EXPECT_EQ(RowBuckets({8, 1, 8, 3}).sizes(), (std::vector<int64_t>{1, 3, 8}));
  EXPECT_EQ(RowBuckets::powers_of_two(48).sizes(), (std::vector<int64_t>{1, 2, 4, 8, 16, 32, 48}));
  EXPECT_EQ(RowBuckets::powers_of_two(1).sizes(), (std::vector<int64_t>{1}));
  EXPECT_TRUE(RowBuckets().empty());
  try {
    RowBuckets({4, 0}, "StackingOptions.batch_buckets");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find(
                  "StackingOptions.batch_buckets: expected row counts >= 1, got 0"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(RowBuckets::powers_of_two(0), Error);
}

TEST(RowBuckets, SmallestBucketThatHoldsTheRows) {
  const RowBuckets b({1, 2, 4, 8, 64});
  const std::vector<std::pair<int64_t, int64_t>> cases{{1, 1},  {3, 4},   {8, 8},
                                                       {9, 64}, {64, 64}, {65, 0}};
  for (const auto& [rows, bucket] : cases) EXPECT_EQ(b.bucket_for(rows), bucket) << rows;
}

TEST(RowBuckets, EachPolicyCutsABatchIntoRuns) {
  struct Case {
    std::vector<int64_t> sizes;
    int64_t rows;
    BucketPolicy policy;
    Runs want;
  };
  using P = BucketPolicy;
  const std::vector<Case> cases{
      // No buckets: one run as it comes.
      {{}, 13, P::kPadUp, {{13, 13}}},
      {{}, 13, P::kLeastPadding, {{13, 13}}},
      // An allowed size: one unpadded run, whatever the policy.
      {{4, 8, 16}, 8, P::kPadUp, {{8, 8}}},
      {{4, 8, 16}, 8, P::kBatchDown, {{8, 8}}},
      {{4, 8, 16}, 8, P::kLeastPadding, {{8, 8}}},
      // Between sizes: pad up to 16, or cut down to 8 and pad the rest.
      {{4, 8, 16}, 9, P::kPadUp, {{9, 16}}},
      {{4, 8, 16}, 9, P::kBatchDown, {{8, 8}, {1, 4}}},
      {{4, 8, 16}, 9, P::kLeastPadding, {{8, 8}, {1, 4}}},  // 3 padded rows, not 7
      {{4, 8, 16}, 13, P::kBatchDown, {{8, 8}, {4, 4}, {1, 4}}},
      {{4, 8, 16}, 13, P::kLeastPadding, {{13, 16}}},        // 3 padded rows in one run
      {{4, 8, 16}, 12, P::kLeastPadding, {{8, 8}, {4, 4}}},  // no padding in two runs
      // More than the largest: full runs of it first.
      {{4, 8, 16}, 37, P::kPadUp, {{16, 16}, {16, 16}, {5, 8}}},
      {{4, 8, 16}, 37, P::kBatchDown, {{16, 16}, {16, 16}, {4, 4}, {1, 4}}},
      {{4, 8, 16}, 37, P::kLeastPadding, {{16, 16}, {16, 16}, {5, 8}}},
      // Fewer rows than the smallest size: padded up to it.
      {{4, 8}, 3, P::kBatchDown, {{3, 4}}},
      {{64}, 10, P::kPadUp, {{10, 64}}},
  };
  for (const Case& c : cases) {
    const Runs got = RowBuckets(c.sizes).plan(c.rows, c.policy);
    EXPECT_EQ(got, c.want) << c.rows << " rows, policy " << static_cast<int>(c.policy);
    int64_t rows = 0;
    for (const BucketRun& r : got) {
      rows += r.rows;
      EXPECT_LE(r.rows, r.bucket);
    }
    EXPECT_EQ(rows, c.rows) << "the runs do not add up to the batch";
  }
}

// kLeastPadding never pads more than the other two policies.
TEST(RowBuckets, LeastPaddingIsNeverWorse) {
  const RowBuckets b({3, 8, 12, 32});
  auto padding = [&](int64_t rows, BucketPolicy p) {
    int64_t pad = 0;
    for (const BucketRun& r : b.plan(rows, p)) pad += r.bucket - r.rows;
    return pad;
  };
  for (int64_t rows = 1; rows <= 200; ++rows) {
    EXPECT_LE(padding(rows, BucketPolicy::kLeastPadding), padding(rows, BucketPolicy::kPadUp))
        << rows;
    EXPECT_LE(padding(rows, BucketPolicy::kLeastPadding), padding(rows, BucketPolicy::kBatchDown))
        << rows;
  }
}

}  // namespace
}  // namespace syncbatch
