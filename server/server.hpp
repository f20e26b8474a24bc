// An HTTP inference server on Boost.Beast that serves tensor models through syncbatch: the
// Open Inference Protocol (and /v1/infer), Prometheus metrics, several models from a config.
// Three ways to run a model, for comparison: per-op sync (the model runs on the connection's
// thread and syncs per request), and BatchedSubmitter per-call or stacked mode, awaited from the
// connection's coroutine with async_submit. The transport is here; what it answers is the
// protocol's (protocol.hpp), the models' options are in model.hpp.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "model.hpp"

namespace syncbatch::http {

struct ServerOptions {
  std::string address = "127.0.0.1";
  unsigned short port = 0;  ///< 0: an ephemeral port (see Server::port()).
  /// io threads, an io_context each (per-op models run on them too). 0: from the CPUs the
  /// process may use (default_layout, cpus.hpp: half of them, 1 to 8).
  int threads = 0;
  std::size_t max_body_bytes = 1 << 20;  ///< Larger bodies get 413 (a chunked body's data).
  /// The request line and header fields together (more: 431). A connection's read buffer holds
  /// at most this and 64 KiB, and each chunk-size line (with its extensions) and a chunked
  /// body's trailer section must fit in it (more: 400).
  std::size_t max_header_bytes = 16 * 1024;
  /// Connections open at once; past it the server stops accepting (the kernel's backlog holds
  /// the next) until one closes. Each may hold one request: max_body_bytes, its tensors and its
  /// answer, and a read buffer of max_header_bytes + 64 KiB.
  std::size_t max_connections = 4096;
  /// A client that hangs up while its request is queued cancels it (499 in /metrics). The
  /// watch costs each request a peeking receive on its socket and a coroutine; off, a request
  /// runs to its answer whether or not anyone reads it.
  bool cancel_on_hangup = true;
  /// A connection that waits this long for a client (for its next request, for the rest of
  /// one, or for the client to read an answer) is closed; the wait for a model's answer does
  /// not count. Checked by one sweep per io thread, a few times per timeout (at most once a
  /// second), so a connection goes between this and a second later. At least 1 ms.
  std::chrono::milliseconds idle_timeout{60'000};
};

/// Listens on construction, serves until stop() or destruction: the endpoints and answers of
/// Protocol (protocol.hpp) over HTTP/1.1 with keep-alive, `threads` io threads each running an
/// io_context of its own (a connection stays on one). HEAD is answered as GET without the body.
/// `Expect: 100-continue` gets "100 Continue" before the body is read. Its own answers
/// (text/plain), each closing the connection: 400 malformed HTTP or framing RFC 9112 refuses (no
/// or two Host fields in HTTP/1.1, Transfer-Encoding beside Content-Length or in HTTP/1.0, an
/// empty or repeated coding, a chunk-size line or trailer over the read buffer), 413 a body
/// over max_body_bytes, 417 an expectation other than 100-continue, 431 a header over
/// max_header_bytes, 501 a transfer coding other than chunked. A client that hangs up while its
/// request is queued cancels it (cancel_on_hangup); one that keeps the connection waiting is closed
/// (idle_timeout). stop() (SIGTERM in main) stops accepting, answers every request already read,
/// then returns.
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
  /// The thread layout it runs: "4 io threads; workers: 'm' 2, 'n' 1".
  std::string layout() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace syncbatch::http
