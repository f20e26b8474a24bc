// Row buckets: the batch sizes (rows) a model may see, and how a batch of any size is cut into
// runs of those sizes. One idea for eager stacked mode (StackingOptions::batch_buckets) and for
// CUDA graphs (one graph per bucket): a model that sees a handful of shapes keeps its kernels,
// its JIT specializations and its graphs warm.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "syncbatch/error.hpp"

namespace syncbatch {

/// How a batch whose row count is not an allowed size is run.
enum class BucketPolicy {
  /// Pad up: runs of the largest size while more rows remain than it holds, then the rest
  /// padded up to the smallest size that holds it. Fewest forwards.
  kPadUp,
  /// Batch down: runs of the largest size that the remaining rows fill, so only a last run
  /// smaller than the smallest size is padded. Least padding per forward, more forwards.
  kBatchDown,
  /// The split with the fewest padded rows overall, and of those the fewest forwards.
  kLeastPadding,
};

/// One forward of a batch cut into buckets: `rows` real rows run padded to `bucket` rows.
struct BucketRun {
  int64_t rows = 0;
  int64_t bucket = 0;
  bool operator==(const BucketRun&) const = default;
};

/// The allowed batch sizes, ascending and distinct; empty means any size (no buckets).
/// A plain value; thread-safe to share once made.
class RowBuckets {
 public:
  RowBuckets() = default;
  /// Errors: Error(kInvalidArgument) naming `what` for a size < 1.
  explicit RowBuckets(std::vector<int64_t> sizes, std::string_view what = "buckets")
      : sizes_(std::move(sizes)) {
    for (int64_t s : sizes_)
      if (s < 1)
        throw Error(ErrorCode::kInvalidArgument,
                    std::string(what) + ": expected row counts >= 1, got " + std::to_string(s));
    std::sort(sizes_.begin(), sizes_.end());
    sizes_.erase(std::unique(sizes_.begin(), sizes_.end()), sizes_.end());
  }

  /// 1, 2, 4, ... below `max`, and `max` itself. Errors: Error(kInvalidArgument) if max < 1.
  static RowBuckets powers_of_two(int64_t max, std::string_view what = "max_rows") {
    if (max < 1)
      throw Error(ErrorCode::kInvalidArgument,
                  std::string(what) + ": expected at least 1, got " + std::to_string(max));
    std::vector<int64_t> sizes;
    for (int64_t b = 1; b < max; b *= 2) sizes.push_back(b);
    sizes.push_back(max);
    return RowBuckets(std::move(sizes));
  }

  /// n, 2n, 3n, ... up to `max` (and `max` itself if it is not a multiple): length buckets.
  /// Errors: Error(kInvalidArgument) if n < 1 or max < n.
  static RowBuckets multiples_of(int64_t n, int64_t max, std::string_view what = "buckets") {
    if (n < 1 || max < n)
      throw Error(ErrorCode::kInvalidArgument,
                  std::string(what) + ": expected 1 <= n <= max, got n " + std::to_string(n) +
                      ", max " + std::to_string(max));
    std::vector<int64_t> sizes;
    for (int64_t b = n; b < max; b += n) sizes.push_back(b);
    sizes.push_back(max);
    return RowBuckets(std::move(sizes), what);
  }

  bool empty() const noexcept { return sizes_.empty(); }
  const std::vector<int64_t>& sizes() const noexcept { return sizes_; }
  /// The largest allowed size. Precondition: !empty().
  int64_t largest() const noexcept { return sizes_.back(); }

  /// The smallest allowed size >= rows, or 0 when rows exceeds them all.
  int64_t bucket_for(int64_t rows) const noexcept {
    const auto it = std::lower_bound(sizes_.begin(), sizes_.end(), rows);
    return it == sizes_.end() ? 0 : *it;
  }

  /// How a batch of `rows` rows (>= 1) runs under `policy`: runs in order, their rows adding up
  /// to `rows`. Without buckets, one run of exactly `rows`.
  std::vector<BucketRun> plan(int64_t rows, BucketPolicy policy) const {
    if (empty()) return {{rows, rows}};
    std::vector<BucketRun> runs;
    if (policy == BucketPolicy::kLeastPadding) return least_padding(rows);
    while (rows > 0) {
      int64_t take = 0;
      if (policy == BucketPolicy::kPadUp) {
        take = std::min(rows, largest());
      } else {  // kBatchDown: the largest size the rows fill, else what is left, padded
        const auto it = std::upper_bound(sizes_.begin(), sizes_.end(), rows);
        take = it == sizes_.begin() ? rows : *(it - 1);
      }
      runs.push_back({take, bucket_for(take)});
      rows -= take;
    }
    return runs;
  }

 private:
  // Fewest padded rows, then fewest runs: over the rows still to place, each step runs a bucket
  // b with min(b, left) real rows. O(rows x buckets).
  std::vector<BucketRun> least_padding(int64_t rows) const {
    struct Best {
      int64_t pad = std::numeric_limits<int64_t>::max();
      int64_t runs = 0;
      int64_t bucket = 0;
    };
    std::vector<Best> best(static_cast<std::size_t>(rows) + 1);
    best[0] = {0, 0, 0};
    for (int64_t left = 1; left <= rows; ++left) {
      Best& here = best[static_cast<std::size_t>(left)];
      for (auto it = sizes_.rbegin(); it != sizes_.rend(); ++it) {  // ties: larger runs first
        const int64_t b = *it;
        const int64_t real = std::min(b, left);
        const Best& rest = best[static_cast<std::size_t>(left - real)];
        const Best option{rest.pad + (b - real), rest.runs + 1, b};
        if (option.pad < here.pad || (option.pad == here.pad && option.runs < here.runs))
          here = option;
      }
    }
    std::vector<BucketRun> runs;
    for (int64_t left = rows; left > 0;) {
      const int64_t b = best[static_cast<std::size_t>(left)].bucket;
      const int64_t real = std::min(b, left);
      runs.push_back({real, b});
      left -= real;
    }
    return runs;
  }

  std::vector<int64_t> sizes_;
};

}  // namespace syncbatch
