// What the server knows of a model's tensors: their names, dtypes and shapes.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <vector>

namespace syncbatch::http {

/// One input or output of a model as the protocol describes it: its name, dtype and shape after
/// the batch dim (dim 0, any rows >= 1), -1 where a size may differ between requests. An
/// output's shape may be left empty (not described: [-1, ...] as the model makes it).
struct TensorSpec {
  std::string name;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> shape{};
  /// Inputs: what padding fills the varying dims with in stacked mode (e.g. a pad token's id).
  double pad_value = 0;
};

}  // namespace syncbatch::http
