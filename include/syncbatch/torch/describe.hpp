// How error messages name tensors and dtypes: "float32 [2, 32]", "int64 [1, 31] on cuda:0".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>

namespace syncbatch {

/// "float32 [2, 32]" (and " on cuda:0" off the CPU); "undefined" for an undefined tensor.
std::string describe_tensor(const at::Tensor& t);

/// "[float32 [2, 32], int64 [2, 16]]": each tensor of a list, as describe_tensor names it.
std::string describe_tensors(c10::ArrayRef<at::Tensor> ts);

/// PyTorch's user-facing dtype name (float32, int64, bfloat16, ...), not c10's enum name.
std::string dtype_name(at::ScalarType t);

/// "[2, 32]"; with `star_first`, "[*, 32]" (any number of rows).
std::string shape_string(c10::IntArrayRef sizes, bool star_first = false);

}  // namespace syncbatch
