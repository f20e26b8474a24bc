// The HTTP inference server: Boost.Beast over Boost.Asio coroutines, Boost.JSON for bodies.
#include "server.hpp"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <bit>
#include <charconv>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string_view>
#include <thread>
#include <tuple>
#include <vector>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/json/src.hpp>  // Boost.JSON header-only: no compiled library to link

#include "metrics.hpp"
#include "oip.hpp"
#include "syncbatch/asio.hpp"
#include "syncbatch/torch.hpp"
#include "syncbatch/version.hpp"
#include "text.hpp"

namespace syncbatch::http {
namespace net = boost::asio;
namespace beast = boost::beast;
namespace bh = boost::beast::http;
using tcp = net::ip::tcp;
using Request = bh::request<bh::vector_body<char>>;
using Response = bh::response<bh::vector_body<char>>;

Mode parse_mode(const std::string& s) {
  if (s == "per-op") return Mode::kPerOp;
  if (s == "per-call") return Mode::kPerCall;
  if (s == "stacked") return Mode::kStacked;
  throw std::invalid_argument("mode: expected per-op, per-call or stacked, got '" + s + "'");
}

std::string to_string(Mode mode) {
  switch (mode) {
    case Mode::kPerOp:
      return "per-op";
    case Mode::kPerCall:
      return "per-call";
    case Mode::kStacked:
      return "stacked";
  }
  return "?";
}

namespace {

std::string version_string() {
  return std::to_string(SYNCBATCH_VERSION_MAJOR) + "." + std::to_string(SYNCBATCH_VERSION_MINOR) +
         "." + std::to_string(SYNCBATCH_VERSION_PATCH);
}

// Thrown where the client hung up while its request waited (the request was cancelled).
struct ClientGone {};

// A client error: its HTTP status and the message the body carries.
struct HttpError {
  bh::status status;
  std::string message;
};

enum class Encoding { kJson, kRaw };

// The request body, decoded: rows of input_width floats, and how to answer.
struct Decoded {
  std::vector<float> values;
  int64_t rows = 0;
  Encoding encoding = Encoding::kJson;
  bool nested = false;  // JSON: [[...], ...] rather than [...]
};

std::string plural(int64_t n, const char* what) {
  return std::to_string(n) + " " + what + (n == 1 ? "" : "s");
}

std::string element(int64_t row, std::size_t j) {
  return "row " + std::to_string(row) + ", element " + std::to_string(j);
}

void append_row(const boost::json::array& row, int64_t width, int64_t index,
                std::vector<float>& out) {
  if (static_cast<int64_t>(row.size()) != width)
    throw HttpError{bh::status::bad_request,
                    "row " + std::to_string(index) + ": expected " + plural(width, "number") +
                        ", got " + plural(static_cast<int64_t>(row.size()), "element")};
  for (std::size_t j = 0; j < row.size(); ++j) {
    if (!row[j].is_number())
      throw HttpError{bh::status::bad_request,
                      element(index, j) + ": expected a number, got " + excerpt(row[j])};
    // A number JSON can write but float32 cannot hold is refused rather than run as inf.
    const double d = row[j].to_number<double>();
    if (!fits_float32(d))
      throw HttpError{
          bh::status::bad_request,
          element(index, j) + ": expected a finite number in float32 range (magnitude at most " +
              number_text(std::numeric_limits<float>::max()) + "), got " + number_text(d)};
    out.push_back(static_cast<float>(d));
  }
}

// The request's row limit, whatever its encoding.
void check_rows(int64_t rows, int64_t max_rows) {
  if (rows > max_rows)
    throw HttpError{bh::status::payload_too_large, "expected at most " + plural(max_rows, "row") +
                                                       ", got " + std::to_string(rows)};
}

Decoded decode_json(std::string_view body, int64_t width, int64_t max_rows) {
  boost::system::error_code ec;
  boost::json::value v = boost::json::parse(body, ec);
  if (ec)
    throw HttpError{bh::status::bad_request, "malformed JSON body: " + ec.message() +
                                                 " (expected [x, ...] or [[x, ...], ...])"};
  if (!v.is_array() || v.as_array().empty())
    throw HttpError{bh::status::bad_request,
                    "expected a non-empty JSON array of numbers, or of rows, got " +
                        (v.is_array() ? std::string("an empty array") : excerpt(v))};
  const boost::json::array& a = v.as_array();
  Decoded d;
  d.encoding = Encoding::kJson;
  d.nested = a.front().is_array();
  if (!d.nested) {
    d.rows = 1;
    append_row(a, width, 0, d.values);
    return d;
  }
  d.rows = static_cast<int64_t>(a.size());
  check_rows(d.rows, max_rows);
  d.values.reserve(static_cast<std::size_t>(d.rows * width));
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!a[i].is_array())
      throw HttpError{
          bh::status::bad_request,
          "row " + std::to_string(i) + ": expected an array of numbers, got " + excerpt(a[i])};
    append_row(a[i].as_array(), width, static_cast<int64_t>(i), d.values);
  }
  return d;
}

Decoded decode_raw(const std::vector<char>& body, int64_t width, int64_t max_rows) {
  const std::size_t row_bytes = static_cast<std::size_t>(width) * sizeof(float);
  if (body.empty() || body.size() % row_bytes != 0)
    throw HttpError{bh::status::bad_request,
                    "expected a non-empty multiple of " + std::to_string(row_bytes) + " bytes (" +
                        std::to_string(width) + " little-endian float32 per row), got " +
                        plural(static_cast<int64_t>(body.size()), "byte")};
  Decoded d;
  d.encoding = Encoding::kRaw;
  d.rows = static_cast<int64_t>(body.size() / row_bytes);
  check_rows(d.rows, max_rows);
  d.values.resize(body.size() / sizeof(float));
  std::memcpy(d.values.data(), body.data(), body.size());
  if constexpr (std::endian::native == std::endian::big)
    for (float& f : d.values)
      f = std::bit_cast<float>(__builtin_bswap32(std::bit_cast<uint32_t>(f)));
  for (std::size_t i = 0; i < d.values.size(); ++i)
    if (!std::isfinite(d.values[i]))
      throw HttpError{
          bh::status::bad_request,
          element(static_cast<int64_t>(i) / width, i % static_cast<std::size_t>(width)) +
              ": expected a finite float32, got " + number_text(d.values[i])};
  return d;
}

void append_float(std::string& s, float f) {
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof buf, f);
  s.append(buf, r.ptr);
}

// Encodes a [rows, cols] float32 CPU tensor as the request came.
void encode(const at::Tensor& y, const Decoded& d, Response& res) {
  const at::Tensor out = y.to(at::kFloat).contiguous().view({y.size(0), -1});
  const int64_t rows = out.size(0), cols = out.size(1);
  const float* p = out.data_ptr<float>();
  std::vector<char>& body = res.body();
  if (d.encoding == Encoding::kRaw) {
    res.set(bh::field::content_type, "application/octet-stream");
    res.set("X-Output-Shape", std::to_string(rows) + "," + std::to_string(cols));
    body.resize(static_cast<std::size_t>(rows * cols) * sizeof(float));
    std::memcpy(body.data(), p, body.size());
    return;
  }
  // JSON has no inf or nan: an output that is not finite is an error naming it, never a body
  // no parser accepts. Raw float32 answers above keep every value as the model made it.
  for (int64_t i = 0; i < rows * cols; ++i)
    if (!std::isfinite(p[i]))
      throw HttpError{bh::status::internal_server_error,
                      "output " + element(i / cols, static_cast<std::size_t>(i % cols)) + " is " +
                          number_text(p[i]) +
                          ", which JSON cannot carry; send the request as "
                          "application/octet-stream to get the raw float32 values"};
  std::string s;
  s.reserve(static_cast<std::size_t>(rows * cols) * 12 + 8);
  if (d.nested) s += '[';
  for (int64_t i = 0; i < rows; ++i) {
    if (i > 0) s += ',';
    s += '[';
    for (int64_t j = 0; j < cols; ++j) {
      if (j > 0) s += ',';
      append_float(s, p[i * cols + j]);
    }
    s += ']';
  }
  if (d.nested) s += ']';
  res.set(bh::field::content_type, "application/json");
  body.assign(s.begin(), s.end());
}

// The first transfer coding of a request other than chunked (the only one this server decodes),
// if any.
template <class Fields>
std::optional<std::string> unsupported_transfer_coding(const bh::request_header<Fields>& req) {
  const auto range = req.equal_range(bh::field::transfer_encoding);
  for (auto it = range.first; it != range.second; ++it)
    for (const auto& token : bh::token_list(it->value()))
      if (!beast::iequals(token, "chunked")) return std::string(token);
  return std::nullopt;
}

Response text_response(bh::status status, const std::string& message, unsigned version) {
  Response res(status, version);
  res.set(bh::field::content_type, "text/plain; charset=utf-8");
  const std::string text = message + "\n";
  res.body().assign(text.begin(), text.end());
  return res;
}

at::Tensor to_host_async(const at::Tensor& y) {
  if (y.device().is_cpu()) return y;
  at::Tensor host = at::empty(y.sizes(), y.options().device(c10::kCPU).pinned_memory(y.is_cuda()));
  host.copy_(y, /*non_blocking=*/true);  // complete when the batch's sync is
  return host;
}

std::string stats_to_json(const SubmitterStats& s) {
  boost::json::object o;
  o["submitted"] = s.submitted;
  o["rejected"] = s.rejected;
  o["completed"] = s.completed;
  o["failed"] = s.failed;
  o["batches"] = s.batches;
  o["syncs"] = s.syncs;
  o["queued"] = s.queued;
  o["batch_limit"] = s.batch_limit;
  o["mean_batch_size"] = s.mean_batch_size();
  o["latency_p50_us"] = static_cast<double>(s.latency.p50.count()) / 1e3;
  o["latency_p99_us"] = static_cast<double>(s.latency.p99.count()) / 1e3;
  o["recent_latency_p99_us"] = static_cast<double>(s.recent_latency.p99.count()) / 1e3;
  return boost::json::serialize(o);
}

}  // namespace

struct Server::Impl {
  using Submitter = BatchedSubmitter<at::Tensor, at::Tensor, TorchBackend>;

  Impl(Model m, ServerOptions o) : model(std::move(m)), options(std::move(o)), acceptor(ioc) {
    if (!model.forward || model.input_width < 1)
      throw std::invalid_argument("Server: expected a model with an input width >= 1");
    if (options.model_name.empty() || options.model_name.find('/') != std::string::npos)
      throw std::invalid_argument("Server: expected a model name without '/', got '" +
                                  options.model_name + "'");
    if (options.priority_levels < 1)
      throw std::invalid_argument("Server: expected at least 1 priority level, got 0");
    info.name = options.model_name;
    info.input_width = model.input_width;
    if (options.threads < 1)
      throw std::invalid_argument("Server: expected at least 1 thread, got " +
                                  std::to_string(options.threads));
    if (options.timeout.count() < 0)
      throw std::invalid_argument("Server: expected a timeout >= 0 ms, got " +
                                  std::to_string(options.timeout.count()));
    if (options.shed_late && options.timeout.count() == 0)
      throw std::invalid_argument("Server: shedding needs a timeout to predict against, got none");
    const SubmitterOptions sopts{.queue_capacity = options.queue_capacity,
                                 .on_full = OverflowPolicy::kReject,
                                 .workers = options.workers,
                                 .policy = options.policy,
                                 .default_timeout = options.timeout,
                                 .shed_late = options.shed_late,
                                 .priority_levels = options.priority_levels,
                                 .default_priority = options.priority_levels - 1};
    const c10::Device device = options.device;
    if (options.mode == Mode::kPerCall) {
      submitter.emplace(
          [f = model.forward, device](at::Tensor& x) {
            return to_host_async(f(x.to(device, /*non_blocking=*/true)));
          },
          sopts, TorchBackend(device));
    } else if (options.mode == Mode::kStacked) {
      submitter.emplace(
          make_stacked_model(model.forward,
                             {.device = device,
                              .output_device = c10::Device(c10::kCPU),
                              .expect = {InputSpec{at::kFloat, {model.input_width}}}}),
          sopts, TorchBackend(device));
    }
    const tcp::endpoint endpoint(net::ip::make_address(options.address), options.port);
    acceptor.open(endpoint.protocol());
    acceptor.set_option(net::socket_base::reuse_address(true));
    acceptor.bind(endpoint);
    acceptor.listen();
    port = acceptor.local_endpoint().port();
    net::co_spawn(ioc, accept_loop(), net::detached);
    for (int i = 0; i < options.threads; ++i) threads.emplace_back([this] { run_thread(); });
  }

  ~Impl() { stop(); }

  void run_thread() {
    // Per-op mode runs the model here: on CUDA each thread forwards on a stream of its own (as
    // the per-op benchmark clients do) and waits for it per request.
    std::optional<c10::StreamGuard> stream;
    const c10::Device device = options.device;
    if (options.mode == Mode::kPerOp && device.is_cuda())
      stream.emplace(c10::impl::getDeviceGuardImpl(device.type())
                         ->getStreamFromGlobalPool(device, /*isHighPriority=*/false));
    c10::InferenceMode inference;
    ioc.run();
  }

  void stop() {
    std::call_once(stopped, [this] {
      stopping.store(true);
      net::post(ioc, [this] {
        boost::system::error_code ignored;
        acceptor.close(ignored);
      });
      if (submitter) submitter->shutdown();  // drains: pending requests complete first
      // Their answers are written by the io threads: give them time to go out (bounded, for a
      // client that stops reading) before the io_context stops.
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      while (unanswered.load() > 0 && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      ioc.stop();
      for (auto& t : threads)
        if (t.joinable() && t.get_id() != std::this_thread::get_id()) t.join();
      std::lock_guard lock(done_mu);
      done = true;
      done_cv.notify_all();
    });
  }

  net::awaitable<void> accept_loop() {
    for (;;) {
      // Each connection runs on a strand of its own: its coroutine, the socket's operations and
      // the request's completion never run on two io threads at once, which racing a request
      // against the client's hang-up (||, in infer) needs.
      auto [ec, socket] =
          co_await acceptor.async_accept(net::make_strand(ioc), net::as_tuple(net::use_awaitable));
      if (ec == net::error::operation_aborted || !acceptor.is_open()) co_return;
      if (ec) {  // e.g. too many open files: keep serving the others, retry in a moment
        net::steady_timer pause(acceptor.get_executor(), std::chrono::milliseconds(10));
        co_await pause.async_wait(net::as_tuple(net::use_awaitable));
        continue;
      }
      socket.set_option(tcp::no_delay(true), ec);
      auto strand = socket.get_executor();
      net::co_spawn(strand, session(beast::tcp_stream(std::move(socket))), net::detached);
    }
  }

  net::awaitable<void> session(beast::tcp_stream stream) {
    beast::flat_buffer buffer;
    for (;;) {
      bh::request_parser<bh::vector_body<char>> parser;
      parser.body_limit(options.max_body_bytes);
      parser.header_limit(16 * 1024);
      stream.expires_after(std::chrono::seconds(60));
      auto [ec, n] =
          co_await bh::async_read_header(stream, buffer, parser, net::as_tuple(net::use_awaitable));
      if (!ec) {
        if (auto coding = unsupported_transfer_coding(parser.get())) {
          // RFC 9112 6.1: a transfer coding the server does not understand is answered 501,
          // and the body it wraps cannot be read, so the connection closes.
          Response res =
              text_response(bh::status::not_implemented,
                            "Transfer-Encoding: expected chunked alone, got '" + excerpt(*coding) +
                                "', which this server does not decode",
                            parser.get().version());
          res.keep_alive(false);
          res.prepare_payload();
          co_await bh::async_write(stream, res, net::as_tuple(net::use_awaitable));
          break;
        }
        std::tie(ec, n) =
            co_await bh::async_read(stream, buffer, parser, net::as_tuple(net::use_awaitable));
      }
      if (ec == bh::error::end_of_stream || ec == net::error::eof || ec == beast::error::timeout ||
          ec == net::error::connection_reset || ec == net::error::operation_aborted)
        break;
      if (ec) {
        // Malformed HTTP or a body over the limit: answer, then close (the stream is unusable).
        const bool too_big = ec == bh::error::body_limit;
        Response res = text_response(
            too_big ? bh::status::payload_too_large : bh::status::bad_request,
            too_big
                ? "expected a body of at most " + std::to_string(options.max_body_bytes) + " bytes"
                : "malformed HTTP request: " + ec.message(),
            11);
        res.keep_alive(false);
        res.prepare_payload();
        co_await bh::async_write(stream, res, net::as_tuple(net::use_awaitable));
        break;
      }
      Request req = parser.release();
      unanswered.fetch_add(1);  // until its answer is written: stop() waits for it
      Response res = co_await handle(req, stream.socket());
      res.version(req.version());
      res.keep_alive(req.keep_alive() && !stopping.load());  // a stopping server closes
      res.prepare_payload();
      auto [wec, wn] = co_await bh::async_write(stream, res, net::as_tuple(net::use_awaitable));
      unanswered.fetch_sub(1);
      if (wec || !res.keep_alive()) break;
    }
    boost::system::error_code ignored;
    stream.socket().shutdown(tcp::socket::shutdown_send, ignored);
  }

  // Inference requests are timed and counted for /metrics; the rest are answered as they come.
  net::awaitable<Response> handle(const Request& req, tcp::socket& client) {
    const std::string_view target(req.target().data(), req.target().size());
    const bool inference =
        req.method() == bh::verb::post && (target == "/v1/infer" || target.ends_with("/infer"));
    if (!inference) co_return co_await route(req, client);
    const auto start = std::chrono::steady_clock::now();
    metrics.begin();
    Response res = co_await route(req, client);
    metrics.end();
    metrics.record(res.result_int(), std::chrono::steady_clock::now() - start);
    co_return res;
  }

  net::awaitable<Response> route(const Request& req, tcp::socket& client) {
    const std::string_view target(req.target().data(), req.target().size());
    const unsigned v = req.version();
    if (target == "/v2" || target.starts_with("/v2/"))
      co_return co_await handle_v2(req, target, client);
    if (target == "/metrics") {
      if (req.method() != bh::verb::get) co_return method_not_allowed("GET", v);
      Response res(bh::status::ok, v);
      res.set(bh::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
      const std::string text = metrics.prometheus(
          options.model_name,
          submitter ? std::optional<SubmitterStats>(submitter->stats()) : std::nullopt);
      res.body().assign(text.begin(), text.end());
      co_return res;
    }
    if (target == "/healthz" || target == "/stats") {
      if (req.method() != bh::verb::get) co_return method_not_allowed("GET", v);
      if (target == "/healthz") co_return text_response(bh::status::ok, "ok", v);
      Response res(bh::status::ok, v);
      res.set(bh::field::content_type, "application/json");
      const std::string s = stats_json();
      res.body().assign(s.begin(), s.end());
      co_return res;
    }
    if (target != "/v1/infer")
      co_return text_response(bh::status::not_found,
                              "no such endpoint: expected /v2/..., POST /v1/infer, GET /healthz, "
                              "GET /metrics or GET /stats, got " +
                                  std::string(target),
                              v);
    if (req.method() != bh::verb::post) co_return method_not_allowed("POST", v);
    try {
      const Decoded d = decode(req);
      at::Tensor x = at::from_blob(const_cast<float*>(d.values.data()), {d.rows, model.input_width},
                                   at::kFloat)
                         .clone();
      at::Tensor y = co_await infer(std::move(x), {}, &client);
      Response res(bh::status::ok, v);
      encode(y, d, res);
      co_return res;
    } catch (const ClientGone&) {
      co_return gone(v);
    } catch (const HttpError& e) {
      co_return text_response(e.status, e.message, v);
    } catch (const Error& e) {
      // /v1 requests have no deadline of their own: only the queue timeout can pass.
      const auto [status, message] =
          status_of(e, "not started within the queue timeout of " +
                           std::to_string(options.timeout.count()) + " ms");
      Response res = text_response(status, message, v);
      if (status == bh::status::service_unavailable) res.set(bh::field::retry_after, "1");
      co_return res;
    } catch (const std::exception& e) {
      co_return text_response(bh::status::internal_server_error,
                              std::string("inference failed: ") + e.what(), v);
    }
  }

  static Response json_response(bh::status status, const std::string& body, unsigned v) {
    Response res(status, v);
    res.set(bh::field::content_type, "application/json");
    res.body().assign(body.begin(), body.end());
    return res;
  }

  static Response oip_error(int status, const std::string& message, unsigned v) {
    return json_response(static_cast<bh::status>(status), oip::error_body(message), v);
  }

  // The Open Inference Protocol's endpoints (see server.hpp).
  net::awaitable<Response> handle_v2(const Request& req, std::string_view target,
                                     tcp::socket& client) {
    const unsigned v = req.version();
    const bool get = req.method() == bh::verb::get;
    auto need_get = [&]() -> std::optional<Response> {
      if (get) return std::nullopt;
      Response res = oip_error(405, "expected method GET", v);
      res.set(bh::field::allow, "GET");
      return res;
    };
    if (target == "/v2") {
      if (auto r = need_get()) co_return *r;
      co_return json_response(bh::status::ok, oip::server_metadata(version_string()), v);
    }
    if (target == "/v2/health/live" || target == "/v2/health/ready") {
      if (auto r = need_get()) co_return *r;
      // Ready while accepting: a stopping server is live but not ready (4xx, as the protocol
      // says, so that balancers take it out).
      const bool ready = target.ends_with("live") || !stopping.load();
      co_return json_response(ready ? bh::status::ok : bh::status::bad_request, "", v);
    }
    constexpr std::string_view kModels = "/v2/models/";
    if (!target.starts_with(kModels))
      co_return oip_error(404, "no such endpoint: " + std::string(target), v);
    std::string_view rest = target.substr(kModels.size());
    const std::string_view name = rest.substr(0, rest.find('/'));
    const std::string_view action = rest.substr(name.size());
    if (name != options.model_name)
      co_return oip_error(404,
                          "unknown model '" + std::string(name) + "': this server serves '" +
                              options.model_name + "'",
                          v);
    if (action.empty()) {
      if (auto r = need_get()) co_return *r;
      co_return json_response(bh::status::ok, oip::model_metadata(info), v);
    }
    if (action == "/ready") {
      if (auto r = need_get()) co_return *r;
      co_return json_response(stopping.load() ? bh::status::bad_request : bh::status::ok, "", v);
    }
    if (action != "/infer")
      co_return oip_error(404,
                          "no such endpoint: expected /v2/models/" + options.model_name +
                              ", its /ready or its /infer, got " + std::string(target),
                          v);
    if (req.method() != bh::verb::post) {
      Response res = oip_error(405, "expected method POST", v);
      res.set(bh::field::allow, "POST");
      co_return res;
    }
    try {
      const auto ct = req[bh::field::content_type];
      const std::string_view type(ct.data(), ct.size());
      if (!type.empty() && type.substr(0, type.find(';')) != "application/json")
        throw oip::ProtocolError{
            415, "expected Content-Type application/json, got '" + std::string(type) + "'"};
      oip::InferRequest r = oip::parse_infer(std::string_view(req.body().data(), req.body().size()),
                                             info, options.max_rows);
      if (r.priority && *r.priority >= options.priority_levels)
        throw oip::ProtocolError{400, "parameters.priority: expected a level below " +
                                          std::to_string(options.priority_levels) +
                                          " (0 the highest), got " + std::to_string(*r.priority)};
      RequestOptions control;
      if (r.timeout) control.deadline = Clock::now() + *r.timeout;
      control.priority = r.priority;
      at::Tensor x =
          at::from_blob(r.values.data(), {r.rows, model.input_width}, at::kFloat).clone();
      at::Tensor y = co_await infer(std::move(x), control, &client);
      co_return json_response(bh::status::ok, oip::infer_response(info, r.id, y), v);
    } catch (const ClientGone&) {
      co_return gone(v);
    } catch (const oip::ProtocolError& e) {
      co_return oip_error(e.status, e.message, v);
    } catch (const Error& e) {
      const auto [status, message] = status_of(e, std::string("not started in time: ") + e.what());
      Response res = oip_error(static_cast<int>(status), message, v);
      if (status == bh::status::service_unavailable) res.set(bh::field::retry_after, "1");
      co_return res;
    } catch (const std::exception& e) {
      co_return oip_error(500, std::string("inference failed: ") + e.what(), v);
    }
  }

  // The HTTP status and message of a request the library failed or refused; `expired` is the
  // message for one whose deadline passed before it started (each protocol words its own).
  static std::pair<bh::status, std::string> status_of(const Error& e, std::string expired) {
    switch (e.code()) {
      case ErrorCode::kQueueFull:
        return {bh::status::service_unavailable, "the inference queue is full; retry shortly"};
      case ErrorCode::kOverloaded:
        return {bh::status::service_unavailable, std::string("overloaded: ") + e.what()};
      case ErrorCode::kShutDown:
        return {bh::status::service_unavailable, "the server is shutting down"};
      case ErrorCode::kDeadlineExceeded:
        return {bh::status::gateway_timeout, std::move(expired)};
      case ErrorCode::kBadRequest:
        return {bh::status::bad_request, e.what()};
      default:
        return {bh::status::internal_server_error, std::string("inference failed: ") + e.what()};
    }
  }

  Decoded decode(const Request& req) const {
    const auto ct = req[bh::field::content_type];
    const std::string_view type(ct.data(), ct.size());
    const std::string_view base = type.substr(0, type.find(';'));
    if (base == "application/json")
      return decode_json(std::string_view(req.body().data(), req.body().size()), model.input_width,
                         options.max_rows);
    if (base == "application/octet-stream")
      return decode_raw(req.body(), model.input_width, options.max_rows);
    throw HttpError{bh::status::unsupported_media_type,
                    "expected Content-Type application/json or application/octet-stream, got " +
                        (type.empty() ? std::string("none") : "'" + std::string(type) + "'")};
  }

  // Runs the model on x. With a submitter, a client that hangs up while its request waits
  // cancels it (async_submit's cancellation: a queued request is never run) and ClientGone is
  // thrown; `client` is watched for that while the request is in the submitter.
  net::awaitable<at::Tensor> infer(at::Tensor x, RequestOptions control = {},
                                   tcp::socket* client = nullptr) {
    if (submitter) {
      if (client == nullptr)
        co_return co_await async_submit(*submitter, std::move(x), net::use_awaitable, control);
      // `||` waits for the first to succeed: the request's outcome comes as a tuple, never as
      // an exception, so that a failed request is answered at once rather than waiting for the
      // client to go.
      using namespace net::experimental::awaitable_operators;
      auto first = co_await (
          async_submit(*submitter, std::move(x), net::as_tuple(net::use_awaitable), control) ||
          hangup(*client));
      if (first.index() == 1) throw ClientGone{};
      auto [error, y] = std::get<0>(std::move(first));
      if (error) std::rethrow_exception(error);
      co_return std::move(y);
    }
    // Per-op: forward here and wait for it (the copy to the host syncs this thread's stream).
    co_return model.forward(x.to(options.device)).to(c10::kCPU);
  }

  // Completes when the client hangs up (end of stream or an error on its socket). A client that
  // sends more (a pipelined request) is there: this then waits until it is cancelled (the
  // request finished first), as it does when cancelled while waiting.
  static net::awaitable<void> hangup(tcp::socket& client) {
    for (;;) {
      auto [ec] =
          co_await client.async_wait(tcp::socket::wait_read, net::as_tuple(net::use_awaitable));
      if (ec == net::error::operation_aborted) co_return;
      if (ec) co_return;  // the socket failed: the client is gone
      // Readable: end of stream, an error, or bytes. A peek that must not block (a readiness
      // can be spurious, and a blocking read here would hold an io thread).
      char byte = 0;
      client.non_blocking(true, ec);
      const std::size_t n = client.receive(net::buffer(&byte, 1), tcp::socket::message_peek, ec);
      if (ec == net::error::would_block || ec == net::error::try_again) continue;
      if (ec || n == 0) co_return;  // reset, or end of stream
      net::steady_timer never(client.get_executor(), net::steady_timer::time_point::max());
      co_await never.async_wait(net::as_tuple(net::use_awaitable));
      co_return;
    }
  }

  // The answer to a client that hung up: never read, but counted in /metrics as 499 (nginx's
  // "client closed request").
  static Response gone(unsigned v) {
    Response res(static_cast<bh::status>(499), v);
    res.keep_alive(false);
    return res;
  }

  static Response method_not_allowed(const char* allowed, unsigned v) {
    Response res =
        text_response(bh::status::method_not_allowed, std::string("expected method ") + allowed, v);
    res.set(bh::field::allow, allowed);
    return res;
  }

  std::string stats_json() const { return submitter ? stats_to_json(submitter->stats()) : "{}"; }

  Model model;
  ServerOptions options;
  oip::ModelInfo info;
  Metrics metrics;
  std::atomic<bool> stopping{false};
  std::atomic<int> unanswered{0};  // requests read whose answer is not written yet
  net::io_context ioc;
  tcp::acceptor acceptor;
  unsigned short port = 0;
  std::optional<Submitter> submitter;
  std::vector<std::thread> threads;
  std::once_flag stopped;
  std::mutex done_mu;
  std::condition_variable done_cv;
  bool done = false;
};

Server::Server(Model model, ServerOptions options)
    : impl_(std::make_unique<Impl>(std::move(model), std::move(options))) {}
Server::~Server() = default;
unsigned short Server::port() const {
  return impl_->port;
}
void Server::stop() {
  impl_->stop();
}
void Server::wait() {
  std::unique_lock lock(impl_->done_mu);
  impl_->done_cv.wait(lock, [&] { return impl_->done; });
}
std::string Server::stats_json() const {
  return impl_->stats_json();
}

}  // namespace syncbatch::http
