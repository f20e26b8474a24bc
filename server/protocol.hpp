// The HTTP server's protocol layer: requests in, responses out, through the models'
// submitters; the Open Inference Protocol, /v1/infer, /metrics and /stats. No sockets: the
// transport (server.hpp) reads requests and writes what this answers, and tests drive it
// directly.
#pragma once

#include <c10/core/Device.h>

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include <boost/beast/http/message.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/vector_body.hpp>

#include "model.hpp"
#include "syncbatch/future.hpp"

namespace syncbatch::http {

/// An allocator whose new elements are left uninitialized (default-initialized): Beast's body
/// reader resizes a body before copying the socket's bytes into it, and with std::allocator that
/// resize first zeroes every byte of every body.
template <class T>
struct UninitializedAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = UninitializedAllocator<U>;
  };
  UninitializedAllocator() = default;
  template <class U>
  UninitializedAllocator(const UninitializedAllocator<U>&) noexcept {}  // NOLINT: as allocators are
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    if constexpr (sizeof...(Args) == 0) {
      ::new (static_cast<void*>(p)) U;
    } else {
      ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
    }
  }
};

/// A request body: its bytes, as they came.
using Body = boost::beast::http::vector_body<char, UninitializedAllocator<char>>;
using Request = boost::beast::http::request<Body>;
/// Bodies are built as strings and moved in.
using Response = boost::beast::http::response<boost::beast::http::string_body>;

/// Answers the server's HTTP requests, with no sockets of its own. Endpoints:
///   Open Inference Protocol v2 (REST; JSON tensor data and the binary tensor data extension):
///   GET  /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}[/versions/{v}],
///        /v2/models/{name}[/versions/{v}]/ready
///   POST /v2/models/{name}[/versions/{v}]/infer   the model's inputs by name, each with its
///                    datatype (BOOL, UINT8, INT8, INT16, INT32, INT64, FP16, BF16, FP32, FP64)
///                    and shape [rows, ...], data flat or nested, or binary (parameters
///                    .binary_data_size, after a JSON header of Inference-Header-Content-Length
///                    bytes); answered with the outputs asked for (all by default), as JSON or
///                    binary (parameters.binary_data per output, binary_data_output for all);
///                    parameters.timeout (microseconds) and parameters.priority (Triton's
///                    schedule policy: 1 the highest, 0 the default) control the request; a
///                    body may be gzip or deflate (Content-Encoding); errors are
///                    {"error": "..."} with the statuses below.
///   GET  /v2/models/{name}/config   Triton's model configuration of the model
///   GET  /v2/models[/{name}]/stats  Triton's statistics extension
///   POST /v2/repository/index, /v2/repository/models/{name}/load and /unload   Triton's model
///                    repository extension, explicit mode (a load swaps the model under load)
///   (Every GET route answers HEAD; query strings are ignored.)
///   GET  /metrics    Prometheus text format (syncbatch_* metrics, labelled with the model)
///   POST /v1/infer   (the first model, when it takes one float32 [rows, width] input)
///                    application/json: [x, ...] (one row) or [[x, ...], ...] (rows), answered
///                    in the same shape; application/octet-stream: rows of float32, little
///                    endian, answered likewise with an X-Output-Shape: rows,cols header.
///   GET  /healthz    200 "ok"
///   GET  /stats      the submitters' counters as JSON, by model
/// Input numbers must be finite and within their datatype's range (JSON and binary alike), and
/// JSON data flat or nested exactly as its shape says. JSON has no inf or nan, so a JSON answer
/// whose output holds one is a 500 naming the element (binary answers carry every value as it
/// is): a 200 body is always valid in its content type.
/// A request whose client hangs up while it is queued is cancelled (the transport cancels its
/// Call, then answers gone()). GET routes answer HEAD alike (the transport leaves out the body).
/// Errors are answered, never crash the server, each in its protocol's format ({"error": ...}
/// for /v2, text/plain otherwise), quoting at most 80 bytes of what came as valid UTF-8: 400
/// malformed body, wrong length or a number out of range (the message names what was expected
/// and what came), 404, 405, 413 rows over the limit, 415 other content types, 503 with
/// Retry-After when the queue is full, the request is shed (kOverloaded) or the server is
/// stopping, 504 when the request was not started within its timeout, 500 when the model throws
/// or gives a non-finite JSON output: its message names the model, the request (its id, or the
/// failure's number) and the error's first line, and the whole text (a LibTorch backtrace, say)
/// goes to stderr only.
/// A text/plain answer: `message` and a newline.
Response text_response(boost::beast::http::status status, const std::string& message,
                       unsigned version);

class Protocol {
 public:
  /// Serves `models` (at least one; names unique, without '/'), each through a submitter of its
  /// own (per-op models run on the caller of begin()).
  /// A request body with a Content-Encoding (gzip, deflate) is decoded to at most
  /// `max_body_bytes` (more: 413).
  /// Errors: std::invalid_argument naming the bad option or model.
  explicit Protocol(std::vector<ServedModel> models, std::size_t max_body_bytes = 1 << 20);
  ~Protocol();
  Protocol(const Protocol&) = delete;
  Protocol& operator=(const Protocol&) = delete;

  class Call;

  /// What a request comes to: its answer (everything but an inference for a model served through
  /// a submitter; a per-op model runs here, on the calling thread), or a Call for the transport
  /// to submit and to answer with finish() or gone(). The path with no coroutine of the
  /// protocol's between a socket and the submitter. Never throws for a request's content.
  /// Thread safety: begin(), finish() and gone() from any number of threads at once.
  std::variant<Response, Call> begin(const Request& request);
  /// The answer to `call`, once its submission completed with `error` or `outputs`.
  Response finish(Call call, std::exception_ptr error, std::vector<at::Tensor> outputs);
  /// The answer to `call` whose client hung up (499, counted in /metrics, never read); first
  /// cancel it and wait for its submission to complete.
  Response gone(Call call);

  /// From now on the readiness endpoints answer 400 (not ready): a load balancer or orchestrator
  /// stops sending. Requests are still answered.
  void set_stopping();
  bool stopping() const;
  /// Drains every submitter: queued requests complete first; later ones answer 503.
  void shutdown();
  /// The submitters' stats as JSON, by model name ("{}" for a model served per-op).
  std::string stats_json() const;
  /// The CUDA devices of the models served per-op: a thread that calls begin() should set a
  /// stream of its own on each (per-op benchmark clients do).
  std::vector<c10::Device> per_op_cuda_devices() const;
  /// Each model's name and submitter workers (0 per-op), as they were resolved.
  std::vector<std::pair<std::string, std::size_t>> workers() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// An inference request that Protocol::begin() decoded, counted in flight until its answer.
/// Move-only; answer it once, with Protocol::finish() or Protocol::gone().
class Protocol::Call {
 public:
  Call(Call&&) noexcept;
  Call& operator=(Call&&) noexcept;
  ~Call();
  /// Submits the request to its model's submitter, once. `done` runs exactly once: on a worker
  /// thread, or on the calling thread (a request refused, or cancelled while queued), possibly
  /// inside this call. The returned handle cancels it (BatchedSubmitter's cancellation).
  Cancellation<std::vector<at::Tensor>> submit(
      std::function<void(std::exception_ptr, std::vector<at::Tensor>)> done);

 private:
  friend class Protocol;
  friend struct Impl;
  struct State;
  explicit Call(std::unique_ptr<State> s) noexcept;
  std::unique_ptr<State> s_;
};

}  // namespace syncbatch::http
