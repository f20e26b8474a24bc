// libFuzzer target: the Open Inference Protocol codec (oip.hpp): parse_infer with JSON data or
// the binary tensor data extension, then infer_response with the request's own inputs as the
// model's outputs. The first two bytes give the Inference-Header-Content-Length (0xffff: none);
// the rest is the body. Properties beyond "no crash, no sanitizer report": a parsed request
// has the model's inputs with equal rows within the limit, every answer's JSON parses, and
// every refusal is a 4xx whose {"error": ...} body is valid JSON.
#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include <boost/json/parse.hpp>

#include "codecs/oip.hpp"

namespace {

namespace oip = syncbatch::http::oip;
using syncbatch::http::TensorSpec;

const oip::ModelInfo& model() {
  static const oip::ModelInfo m{
      "fuzz",
      {TensorSpec{"a", at::kFloat, {4}}, TensorSpec{"b", at::kLong, {-1}},
       TensorSpec{"c", at::kBool, {2}}, TensorSpec{"d", at::kHalf, {-1, 2}}},
      {TensorSpec{"a", at::kFloat, {4}}, TensorSpec{"b", at::kLong, {-1}},
       TensorSpec{"c", at::kBool, {2}}, TensorSpec{"d", at::kHalf, {-1, 2}}}};
  return m;
}

bool json_ok(std::string_view text) {
  boost::system::error_code ec;
  boost::json::parse(text, ec);
  return !ec;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2) return 0;
  const unsigned length = data[0] | (unsigned{data[1]} << 8);
  const std::string_view body(reinterpret_cast<const char*>(data) + 2, size - 2);
  const std::optional<std::size_t> header_length =
      length == 0xffff ? std::nullopt : std::optional<std::size_t>(length);
  constexpr int64_t kMaxRows = 8;
  try {
    const oip::InferRequest r = oip::parse_infer(body, header_length, model(), kMaxRows);
    if (r.inputs.size() != model().inputs.size() || r.rows < 1 || r.rows > kMaxRows) std::abort();
    for (const at::Tensor& t : r.inputs)
      if (!t.defined() || t.size(0) != r.rows) std::abort();
    try {
      const oip::Encoded e = oip::infer_response(model(), r, r.inputs);
      const std::string_view json =
          e.header_length ? std::string_view(e.body).substr(0, *e.header_length) : e.body;
      if (!json_ok(json)) std::abort();
    } catch (const syncbatch::http::ProtocolError& e) {
      if (e.status != 500 || !json_ok(oip::error_body(e.message))) std::abort();
    }
  } catch (const syncbatch::http::ProtocolError& e) {
    if (e.status < 400 || e.status > 499 || !json_ok(oip::error_body(e.message))) std::abort();
  }
  return 0;
}
