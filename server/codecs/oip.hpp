// The Open Inference Protocol (KServe v2) REST codec: metadata, infer requests with JSON tensor
// data or the binary tensor data extension, infer responses and error bodies. No sockets here:
// the server routes, this reads and writes bodies.
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "protocol_error.hpp"
#include "spec.hpp"

namespace syncbatch::http::oip {

/// The protocol's name of a dtype ("FP32", "INT64", "BOOL", ...).
/// Errors: std::invalid_argument for a dtype the protocol has no name for.
std::string datatype_name(at::ScalarType dtype);

/// The dtype of a protocol datatype name; none for an unknown or unsupported one (BYTES, and the
/// unsigned types wider than 8 bits, which LibTorch 1.13 lacks).
std::optional<at::ScalarType> datatype_dtype(std::string_view name);

/// What the metadata endpoints describe.
struct ModelInfo {
  std::string name;
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;
  std::string platform = "syncbatch";
};

/// GET /v2: {"name", "version", "extensions"}.
std::string server_metadata(std::string_view version);

/// GET /v2/models/{name}: inputs and outputs with -1 for the batch and the varying dims.
std::string model_metadata(const ModelInfo& model);

/// A decoded infer request.
struct InferRequest {
  std::optional<std::string> id;
  /// The model's inputs in its order, each a CPU tensor of its datatype [rows, ...].
  std::vector<at::Tensor> inputs;
  int64_t rows = 0;
  /// The outputs to answer with (indices into the model's outputs, in the request's order; all,
  /// in the model's order, when the request names none), and whether each goes as binary data.
  std::vector<std::size_t> outputs;
  std::vector<bool> binary;
  /// parameters.timeout (microseconds, as Triton): the request must start within it. A value
  /// past int64 reads as microseconds::max() (no practical limit).
  std::optional<std::chrono::microseconds> timeout;
  /// parameters.priority as sent, Triton's schedule policy: 0 the model's default level, 1 the
  /// highest, 2 the next (the protocol checks it against the model's levels).
  std::optional<std::size_t> priority;
};

/// Decodes POST /v2/models/{name}/infer. `header_length` is the Inference-Header-Content-Length
/// of a request that uses the binary tensor data extension: the JSON header is the body's first
/// `header_length` bytes, and the inputs with parameters.binary_data_size take their bytes from
/// the rest, in order (little-endian, row-major).
/// Errors: ProtocolError 400 naming what was expected and what came (malformed JSON, a missing,
/// unknown or repeated input, a datatype or shape other than the model's, a shape whose size
/// the body cannot hold (checked without overflow), inputs of different rows, data that is
/// neither flat nor nested as the shape says, a number that its datatype cannot hold (non-finite
/// floats included), binary sizes that do not add up to the bytes sent, an unknown output, a
/// bad parameter, a parameter that would change the answer and that this server does not do:
/// an output's classification, shared-memory regions, a sequence on a stateless model), 413 for
/// more than `max_rows` rows.
/// `pin_from_bytes` (0: none): inputs of that many bytes or more are allocated in pinned memory
/// (LibTorch's caching host allocator; a CUDA build only), so that stacked mode copies each
/// straight to a CUDA device rather than first gathering them on its worker (pass
/// kDirectStagingBytes).
InferRequest parse_infer(std::string_view body, std::optional<std::size_t> header_length,
                         const ModelInfo& model, int64_t max_rows, std::size_t pin_from_bytes = 0);

/// An encoded infer answer: the body, and the length of its JSON header when binary output data
/// follows it (the Inference-Header-Content-Length to send).
struct Encoded {
  std::string body;
  std::optional<std::size_t> header_length;
};

/// The answer to `request` with the model's outputs `y` (CPU tensors, [rows, ...] each).
/// Errors: ProtocolError 500 naming the output and element when a JSON output holds inf or nan
/// (JSON cannot carry it; binary data can).
Encoded infer_response(const ModelInfo& model, const InferRequest& request,
                       const std::vector<at::Tensor>& y);

/// {"error": message}.
std::string error_body(std::string_view message);

}  // namespace syncbatch::http::oip
