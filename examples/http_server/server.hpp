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
#include <string_view>
#include <vector>

#include "spec.hpp"
#include "syncbatch/sync_policy.hpp"

namespace syncbatch::http {

/// A model: its inputs, in the order `forward` takes them, and its outputs, in the order it
/// returns them; every tensor has the batch dim first. Runs on the device of its ModelOptions.
struct Model {
  using Forward = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;
  Model() = default;
  Model(Forward f, std::vector<TensorSpec> in, std::vector<TensorSpec> out, std::string what = "");
  /// A model of one float32 input "input" [rows, input_width] and one float32 output "output".
  Model(std::function<at::Tensor(const at::Tensor&)> f, int64_t input_width, std::string what = "");

  Forward forward;
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;
  std::string description;
};

/// "mlp:LAYERSxWIDTH" (the benchmark MLP, input width WIDTH), the path of a TorchScript file, or
/// of an AOTInductor package (".pt2"; where the LibTorch has the loader). A file's inputs and
/// outputs are `inputs` and `outputs`; with none, one float32 input "input" [rows,
/// `input_width`] and one output "output". Errors: std::invalid_argument naming the expected
/// forms and what came; syncbatch::Error for a file the adapter cannot load.
Model load_model(const std::string& spec, int64_t input_width, c10::Device device,
                 std::vector<TensorSpec> inputs = {}, std::vector<TensorSpec> outputs = {});

enum class Mode { kPerOp, kPerCall, kStacked };

/// "per-op", "per-call", "stacked". Errors: std::invalid_argument.
Mode parse_mode(const std::string& s);
std::string to_string(Mode mode);

/// How one model is served.
struct ModelOptions {
  Mode mode = Mode::kStacked;
  SyncPolicy policy = Adaptive{std::chrono::milliseconds(2)};
  c10::Device device = c10::Device(c10::kCPU);
  int64_t max_rows = 256;             ///< More rows in one request get 413.
  std::size_t queue_capacity = 4096;  ///< A full queue answers 503 with Retry-After.
  std::size_t workers = 1;            ///< Submitter workers (per-call and stacked).
  /// Queue timeout (SubmitterOptions::default_timeout): a request not started within it is
  /// answered 504. Zero: none.
  std::chrono::milliseconds timeout{0};
  /// Refuse at once, with 503 and Retry-After, a request that by the measured batch time cannot
  /// start within `timeout` (SubmitterOptions::shed_late). Needs a timeout.
  bool shed_late = false;
  /// The model's name in the Open Inference Protocol paths (/v2/models/{name}/...).
  std::string name = "model";
  /// Priority levels of the submitter (SubmitterOptions::priority_levels); an infer request
  /// picks one with parameters.priority (0 the highest; default the lowest).
  std::size_t priority_levels = 2;
  /// Stacked mode: the batch sizes the model sees (StackingOptions::batch_buckets; empty: any).
  std::vector<int64_t> batch_buckets{};
  /// Stacked mode: lengths the varying dims are padded to (StackingOptions::length_buckets;
  /// empty: the longest of the batch).
  std::vector<int64_t> length_buckets{};
};

struct ServerOptions {
  std::string address = "127.0.0.1";
  unsigned short port = 0;  ///< 0: an ephemeral port (see Server::port()).
  int threads = 4;          ///< Threads running the io_context (and, per-op, the models).
  std::size_t max_body_bytes = 1 << 20;  ///< Larger bodies get 413.
  /// A client that hangs up while its request is queued cancels it (499 in /metrics). The
  /// watch costs each request a wait on its socket and two coroutines; off, a request runs to
  /// its answer whether or not anyone reads it.
  bool cancel_on_hangup = true;
};

/// A model and how it is served.
struct ServedModel {
  Model model;
  ModelOptions options{};
};

/// The models of a JSON configuration file's text (the README has an example):
/// {"models": [{"name", "model", "mode", "policy", "device", "workers", "queue", "timeout_ms",
/// "shed", "priority_levels", "max_rows", "batch_buckets", "length_buckets",
/// "inputs": [{"name", "datatype", "shape", "pad"}], "outputs": [{"name", "datatype"}]}]};
/// only "name" and "model" (as load_model takes it) are required, the rest default as
/// ModelOptions does ("device": "auto"). Shapes are written as the protocol does, -1 first for
/// the rows. The MLP's inputs and outputs are its own: "inputs" and "outputs" are for files.
/// Errors: std::invalid_argument naming the model, the key, what was expected and what came.
std::vector<ServedModel> load_config(std::string_view json_text);

/// Listens on construction, serves until stop() or destruction. Endpoints:
///   Open Inference Protocol v2 (REST; JSON tensor data and the binary tensor data extension):
///   GET  /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}[/versions/{v}],
///        /v2/models/{name}[/versions/{v}]/ready
///   POST /v2/models/{name}[/versions/{v}]/infer   the model's inputs by name, each with its
///                    datatype (BOOL, UINT8, INT8, INT16, INT32, INT64, FP16, BF16, FP32, FP64)
///                    and shape [rows, ...], data flat or nested, or binary (parameters
///                    .binary_data_size, after a JSON header of Inference-Header-Content-Length
///                    bytes); answered with the outputs asked for (all by default), as JSON or
///                    binary (parameters.binary_data per output, binary_data_output for all);
///                    parameters.timeout (microseconds) and parameters.priority (a level)
///                    control the request; errors are {"error": "..."} with the statuses below.
///   GET  /metrics    Prometheus text format (syncbatch_* metrics, labelled with the model)
///   POST /v1/infer   (the first model, when it takes one float32 [rows, width] input)
///                    application/json: [x, ...] (one row) or [[x, ...], ...] (rows), answered
///                    in the same shape; application/octet-stream: rows of float32, little
///                    endian, answered likewise with an X-Output-Shape: rows,cols header.
///   GET  /healthz    200 "ok"
///   GET  /stats      the submitters' counters as JSON, by model
/// Input numbers must be finite and within their datatype's range (JSON and binary alike). JSON
/// has no inf or nan, so a JSON answer whose output holds one is a 500 naming the element
/// (binary answers carry every value as it is): a 200 body is always valid in its content type.
/// A client that hangs up while its request is queued cancels it (ServerOptions::cancel_on_hangup).
/// stop() (SIGTERM in main) stops accepting, answers every request already read, then
/// returns.
/// Errors are answered, never crash the server: 400 malformed body, wrong length or a number
/// out of range (the message names what was expected and what came, quoting at most 80
/// characters), 404, 405, 413 body or rows over the limit, 415 other content types, 501 a
/// transfer coding other than chunked (RFC 9112), 503 with Retry-After when the queue is full,
/// the request is shed (kOverloaded) or the server is stopping, 504 when the request was not
/// started within its timeout, 500 when the model throws or gives a non-finite JSON output.
class Server {
 public:
  /// Serves `models` (at least one; names unique, without '/').
  /// Errors: std::invalid_argument naming the bad option or model.
  Server(std::vector<ServedModel> models, ServerOptions options);
  /// Serves one model.
  Server(Model model, ServerOptions options, ModelOptions model_options = {});
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  unsigned short port() const;
  /// Stops accepting, closes connections, drains the submitter. Idempotent.
  void stop();
  /// Blocks until stop() (from another thread or a signal handler).
  void wait();
  /// The submitters' stats as JSON, by model name ("{}" for a model served per-op).
  std::string stats_json() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace syncbatch::http
