// The Open Inference Protocol (KServe v2) REST codec for the server's model: metadata, infer
// requests with JSON tensor data, infer responses and error bodies. No sockets here: the server
// routes, this reads and writes bodies.
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace syncbatch::http::oip {

/// A request or answer the protocol refuses: the HTTP status and the message of its
/// {"error": "..."} body.
struct ProtocolError {
  int status;
  std::string message;
};

/// What the metadata endpoints describe: one FP32 input [-1, width] named "input", one FP32
/// output [-1, -1] named "output".
struct ModelInfo {
  std::string name;
  int64_t input_width = 0;
  std::string platform = "syncbatch";
};

/// GET /v2: {"name", "version", "extensions"}.
std::string server_metadata(std::string_view version);

/// GET /v2/models/{name}.
std::string model_metadata(const ModelInfo& model);

/// A decoded infer request: `rows` rows of `input_width` floats, and its control parameters.
struct InferRequest {
  std::optional<std::string> id;
  std::vector<float> values;
  int64_t rows = 0;
  /// parameters.timeout (microseconds, as Triton): the request must start within it.
  std::optional<std::chrono::microseconds> timeout;
  /// parameters.priority: the submitter's priority level (0 the highest).
  std::optional<std::size_t> priority;
};

/// Decodes POST /v2/models/{name}/infer with JSON tensor data (flat or nested, row-major).
/// Errors: ProtocolError 400 naming what was expected and what came (malformed JSON, not one
/// input named "input", a datatype other than FP32, a shape other than [rows, width], a data
/// length that does not match the shape, a number that is not finite float32, a requested
/// output other than "output", a bad parameter), 413 for more than `max_rows` rows.
InferRequest parse_infer(std::string_view body, const ModelInfo& model, int64_t max_rows);

/// The infer answer for output `y` ([rows, k] float32 on the CPU).
/// Errors: ProtocolError 500 naming the element when y holds inf or nan (JSON cannot carry it).
std::string infer_response(const ModelInfo& model, const std::optional<std::string>& id,
                           const at::Tensor& y);

/// {"error": message}.
std::string error_body(std::string_view message);

}  // namespace syncbatch::http::oip
