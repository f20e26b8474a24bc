// An HTTP inference server on Boost.Beast that serves a tensor model through syncbatch: POST a
// row (or rows) of float32 as JSON or as raw little-endian bytes, get the output back in the
// same encoding. Three ways to run the model, for comparison: per-op sync (the model runs on
// the connection's thread and syncs per request), and BatchedSubmitter per-call or stacked
// mode, awaited from the connection's coroutine with async_submit.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "syncbatch/sync_policy.hpp"

namespace syncbatch::http {

/// A model that maps [rows, input_width] float32 to [rows, *] on `device`.
struct Model {
  std::function<at::Tensor(const at::Tensor&)> forward;
  int64_t input_width = 0;
  std::string description;
};

/// "mlp:LAYERSxWIDTH" (the benchmark MLP, input width WIDTH) or the path of a TorchScript file
/// (loaded with torch::jit::load; give its input width). Errors: std::invalid_argument naming
/// the expected forms and what came; what torch::jit::load throws for a bad file.
Model load_model(const std::string& spec, int64_t input_width, c10::Device device);

enum class Mode { kPerOp, kPerCall, kStacked };

/// "per-op", "per-call", "stacked". Errors: std::invalid_argument.
Mode parse_mode(const std::string& s);
std::string to_string(Mode mode);

struct ServerOptions {
  std::string address = "127.0.0.1";
  unsigned short port = 0;  ///< 0: an ephemeral port (see Server::port()).
  int threads = 4;          ///< Threads running the io_context (and, per-op, the model).
  Mode mode = Mode::kStacked;
  SyncPolicy policy = Adaptive{std::chrono::milliseconds(2)};
  c10::Device device = c10::Device(c10::kCPU);
  std::size_t max_body_bytes = 1 << 20;  ///< Larger bodies get 413.
  int64_t max_rows = 256;                ///< More rows in one request get 413.
  std::size_t queue_capacity = 4096;     ///< A full queue answers 503 with Retry-After.
  std::size_t workers = 1;               ///< Submitter workers (per-call and stacked).
  /// Queue timeout (SubmitterOptions::default_timeout): a request not started within it is
  /// answered 504. Zero: none.
  std::chrono::milliseconds timeout{0};
  /// Refuse at once, with 503 and Retry-After, a request that by the measured batch time cannot
  /// start within `timeout` (SubmitterOptions::shed_late). Needs a timeout.
  bool shed_late = false;
  /// The model's name in the Open Inference Protocol paths (/v2/models/{name}/...).
  std::string model_name = "model";
  /// Priority levels of the submitter (SubmitterOptions::priority_levels); an infer request
  /// picks one with parameters.priority (0 the highest; default the lowest).
  std::size_t priority_levels = 2;
};

/// Listens on construction, serves until stop() or destruction. Endpoints:
///   Open Inference Protocol v2 (REST, JSON tensor data):
///   GET  /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}, /v2/models/{name}/ready
///   POST /v2/models/{name}/infer   one FP32 input "input" [rows, width], flat or nested data;
///                    answered with one FP32 output "output" [rows, k]; parameters.timeout
///                    (microseconds) and parameters.priority (a level) control the request;
///                    errors are {"error": "..."} with the statuses below.
///   GET  /metrics    Prometheus text format (syncbatch_* metrics, labelled with the model)
///   POST /v1/infer   application/json: [x, ...] (one row) or [[x, ...], ...] (rows), answered
///                    in the same shape; application/octet-stream: rows of float32, little
///                    endian, answered likewise with an X-Output-Shape: rows,cols header.
///   GET  /healthz    200 "ok"
///   GET  /stats      the submitter's counters as JSON
/// Input numbers must be finite and within float32 range (JSON and raw alike). JSON has no inf
/// or nan, so a JSON answer whose output holds one is a 500 naming the element (raw answers
/// carry every float32 as it is): a 200 body is always valid in its content type.
/// A client that hangs up (or shuts down its sending side, as nginx also takes it) while its
/// request waits in the submitter cancels the request: it is not run if it had not started,
/// and /metrics counts it under code 499. stop() (SIGTERM in main) stops accepting, answers
/// every request already read, then returns.
/// Errors are answered, never crash the server: 400 malformed body, wrong length or a number
/// out of range (the message names what was expected and what came, quoting at most 80
/// characters), 404, 405, 413 body or rows over the limit, 415 other content types, 501 a
/// transfer coding other than chunked (RFC 9112), 503 with Retry-After when the queue is full,
/// the request is shed (kOverloaded) or the server is stopping, 504 when the request was not
/// started within the queue timeout, 500 when the model throws or gives a non-finite JSON
/// output.
class Server {
 public:
  Server(Model model, ServerOptions options);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  unsigned short port() const;
  /// Stops accepting, closes connections, drains the submitter. Idempotent.
  void stop();
  /// Blocks until stop() (from another thread or a signal handler).
  void wait();
  /// The submitter's stats as JSON ("{}" in per-op mode).
  std::string stats_json() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace syncbatch::http
