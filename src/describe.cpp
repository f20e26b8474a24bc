// How error messages name tensors. See syncbatch/torch/describe.hpp.
#include "syncbatch/torch/describe.hpp"

#include <sstream>

namespace syncbatch {

std::string shape_string(c10::IntArrayRef sizes, bool star_first) {
  std::ostringstream s;
  s << '[';
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) s << ", ";
    if (i == 0 && star_first) {
      s << '*';
    } else {
      s << sizes[i];
    }
  }
  s << ']';
  return s.str();
}

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "float32";
    case at::kDouble:
      return "float64";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kLong:
      return "int64";
    case at::kInt:
      return "int32";
    case at::kShort:
      return "int16";
    case at::kChar:
      return "int8";
    case at::kByte:
      return "uint8";
    case at::kBool:
      return "bool";
    default:
      return c10::toString(t);
  }
}

std::string describe_tensor(const at::Tensor& t) {
  if (!t.defined()) return "undefined";
  return dtype_name(t.scalar_type()) + " " + shape_string(t.sizes(), false) +
         (t.device().is_cpu() ? "" : " on " + t.device().str());
}

std::string describe_tensors(c10::ArrayRef<at::Tensor> ts) {
  std::string s = "[";
  for (const at::Tensor& t : ts) {
    if (s.size() > 1) s += ", ";
    s += describe_tensor(t);
  }
  return s + "]";
}

}  // namespace syncbatch
