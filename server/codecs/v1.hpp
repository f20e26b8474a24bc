// The /v1/infer codec: rows of float32 as JSON ([x, ...] or [[x, ...], ...]) or as raw
// little-endian bytes, answered in the encoding they came in. Torch-free: the protocol turns
// the rows into a tensor, and the answer's rows back into a body here.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace syncbatch::http::v1 {

enum class Encoding { kJson, kRaw };

/// A decoded /v1 request: `rows` rows of the model's input width, row-major, and how to answer.
struct Decoded {
  std::vector<float> values;
  int64_t rows = 0;
  Encoding encoding = Encoding::kJson;
  bool nested = false;  ///< JSON: [[...], ...] rather than [...]
};

/// Decodes a body of Content-Type `content_type` (application/json or application/octet-stream,
/// matched as media types are: case-insensitive, parameters allowed) for a model of input
/// `width`. Errors: ProtocolError 400 naming what was expected and what came (malformed JSON,
/// rows of another width, a number that float32 cannot hold, a raw length that is not whole
/// rows, a non-finite raw float), 413 for more than `max_rows` rows, 415 another content type.
Decoded decode(std::string_view content_type, std::string_view body, int64_t width,
               int64_t max_rows);

/// An encoded /v1 answer.
struct Answer {
  std::string content_type;
  std::string body;
  std::string shape;  ///< raw answers: "rows,cols" (the X-Output-Shape header); else empty
};

/// The answer to `request`: `rows` x `cols` float32 values at `p`, row-major, in the request's
/// encoding. Errors: ProtocolError 500 naming the element when a JSON answer would hold inf or
/// nan (JSON cannot carry it; raw answers carry every value as it is).
Answer encode(const float* p, int64_t rows, int64_t cols, const Decoded& request);

}  // namespace syncbatch::http::v1
