// The HTTP server's transport: Boost.Beast over Boost.Asio coroutines, an io_context per
// thread. What it answers is the protocol's (protocol.cpp).
#include "server.hpp"

#include <c10/core/InferenceMode.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <variant>
#include <vector>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "cpus.hpp"
#include "http1.hpp"
#include "protocol.hpp"
#include "syncbatch/thread_name.hpp"
#include "text.hpp"

namespace syncbatch::http {
namespace net = boost::asio;
namespace beast = boost::beast;
namespace bh = boost::beast::http;
using tcp = net::ip::tcp;

namespace {

using Tensors = std::vector<at::Tensor>;

// How a submitted request ended: the submitter's outcome, or its client gone first.
struct Outcome {
  std::exception_ptr error;
  Tensors outputs;
  bool gone = false;
};

// Submits `call` and completes `token` with its Outcome on the socket's executor. With `watch`,
// races the request against its client's hang-up, which cancels it (it then completes gone once
// its submission completes: at once for a queued request). Callbacks, not coroutines (`||` costs
// a request two more coroutine frames, a parallel group and its cancellation signals): one
// allocation for the state the two share.
// The watch is a receive that peeks rather than a wait for readability: a receive is a
// speculative operation, queued on the socket's existing registration, where a wait changes the
// socket's epoll registration, one system call per request. A client that sends more (a
// pipelined request) is there: the watch then ends without cancelling.
template <class Token>
auto async_run(Protocol::Call& call, tcp::socket& client, bool watch, Token&& token) {
  return net::async_initiate<Token, void(Outcome)>(
      [&call, &client, watch](auto handler) {
        using Handler = decltype(handler);
        struct Race {
          explicit Race(Handler h, tcp::socket& c) : handler(std::move(h)), client(c) {}
          Handler handler;
          tcp::socket& client;  // touched only while `watching`
          Outcome outcome;
          Cancellation<Tensors> cancel;
          bool watching = false;
          char byte = 0;

          void result(std::exception_ptr error, Tensors y) {
            outcome.error = std::move(error);
            outcome.outputs = std::move(y);
            if (watching) {  // its completion (operation_aborted) only drops the state
              watching = false;
              boost::system::error_code ignored;
              client.cancel(ignored);
            }
            std::move(handler)(std::move(outcome));
          }
          void peeked(const boost::system::error_code& ec, std::size_t n) {
            if (!watching) return;  // answered first
            watching = false;
            if (!ec && n > 0) return;  // a pipelined request: not a hang-up
            outcome.gone = true;
            cancel.cancel();  // its completion follows (at once when queued)
          }
        };
        auto race = std::make_shared<Race>(std::move(handler), client);
        auto ex = client.get_executor();
        race->cancel = call.submit([race, ex](std::exception_ptr error, Tensors y) mutable {
          net::post(ex,
                    [race = std::move(race), error = std::move(error), y = std::move(y)]() mutable {
                      race->result(std::move(error), std::move(y));
                    });
        });
        if (!watch) return;  // (the outcome is posted: it cannot have come yet)
        race->watching = true;
        client.async_receive(
            net::buffer(&race->byte, 1), tcp::socket::message_peek,
            [race](const boost::system::error_code& ec, std::size_t n) { race->peeked(ec, n); });
      },
      token);
}

// `res` (its payload prepared) as HTTP/1.x puts it on the wire: its status line and fields,
// written into `head` (a connection's, reused), then its body, for one gather write. The head is
// written by hand: Beast's serializer spends more instructions walking its buffer views than the
// rest of a request's path through the server.
// `res`'s body gzipped where the client accepts gzip, the body is large enough to gain and
// gzip makes it smaller (binary tensors rarely shrink).
void compress_if_accepted(const Request& req, Response& res) {
  if (res.body().size() < kCompressFrom || res.count(bh::field::content_encoding) > 0) return;
  const auto accept = req[bh::field::accept_encoding];
  if (accept.empty() || !accepts_gzip(std::string_view(accept.data(), accept.size()))) return;
  res.set(bh::field::vary, "Accept-Encoding");
  std::string zipped = gzip(res.body());
  if (zipped.size() >= res.body().size()) return;
  res.body() = std::move(zipped);
  res.set(bh::field::content_encoding, "gzip");
}

// A HEAD request's answer goes without its body (its Content-Length still that of GET's).
std::array<net::const_buffer, 2> wire(const Response& res, std::string& head,
                                      bool head_only = false) {
  head.clear();
  head += res.version() == 10 ? "HTTP/1.0 " : "HTTP/1.1 ";
  char status[8];
  head.append(status, std::to_chars(status, status + sizeof status, res.result_int()).ptr);
  head += ' ';
  head += res.reason();
  head += "\r\n";
  for (const auto& field : res) {
    head += field.name_string();
    head += ": ";
    head += field.value();
    head += "\r\n";
  }
  head += "\r\n";
  return {net::buffer(head), head_only ? net::const_buffer() : net::buffer(res.body())};
}

std::vector<ServedModel> check(const ServerOptions& options, std::vector<ServedModel> models) {
  if (options.threads < 0)
    throw std::invalid_argument("Server: expected threads >= 0 (0: from the machine), got " +
                                std::to_string(options.threads));
  if (options.max_connections < 1)
    throw std::invalid_argument("Server: expected max_connections of at least 1, got 0");
  if (options.max_header_bytes < 1024)
    throw std::invalid_argument("Server: expected max_header_bytes of at least 1024, got " +
                                std::to_string(options.max_header_bytes));
  if (options.idle_timeout < std::chrono::milliseconds(1))
    throw std::invalid_argument("Server: expected an idle_timeout of at least 1 ms, got " +
                                std::to_string(options.idle_timeout.count()) + " ms");
  return models;
}

// `options` with its io threads resolved: from the machine where it sets none.
ServerOptions resolved(ServerOptions options) {
  if (options.threads == 0)
    options.threads = default_layout(cpu_budget().usable(), /*cuda=*/false).io_threads;
  return options;
}

using Clock = std::chrono::steady_clock;

// A connection as its io thread's idle sweep sees it: since when it waits for its client
// (Clock::time_point::max() while its request runs, which does not count).
struct Connection {
  tcp::socket* socket;
  Clock::time_point waiting_since;
};

// The connections of one io_context, touched by its thread only. A sweep instead of a timer per
// read and write (Beast's tcp_stream timeouts): those cost each request several timer-queue
// operations, where this costs it two clock reads.
struct Connections {
  std::list<Connection> list;

  // Registers a connection for as long as the returned guard lives.
  auto enter(tcp::socket& socket) {
    const auto it = list.insert(list.end(), {&socket, Clock::now()});
    struct Leave {
      Leave(std::list<Connection>& l, std::list<Connection>::iterator i) : list(l), it(i) {}
      std::list<Connection>& list;
      std::list<Connection>::iterator it;
      Leave(const Leave&) = delete;
      Leave& operator=(const Leave&) = delete;
      ~Leave() { list.erase(it); }
    };
    return std::make_unique<Leave>(list, it);
  }

  // Cancels what the connections that waited longer than `timeout` wait for (they then close).
  void sweep(std::chrono::milliseconds timeout) {
    const auto now = Clock::now();
    for (Connection& c : list)
      if (c.waiting_since != Clock::time_point::max() && now - c.waiting_since > timeout) {
        c.waiting_since = Clock::time_point::max();  // once
        boost::system::error_code ignored;
        c.socket->cancel(ignored);
      }
  }
};

}  // namespace

struct Server::Impl {
  Impl(std::vector<ServedModel> models, ServerOptions o)
      : options(resolved(std::move(o))),
        protocol(check(options, std::move(models)), options.max_body_bytes) {
    // One io_context per thread, each run by its thread alone: a connection lives on one of
    // them (round robin), so its coroutine, its socket's operations and its request's
    // completion never run on two threads at once (which racing a request against the
    // client's hang-up, `||` in infer, needs) without a strand, and the threads share no
    // scheduler lock.
    for (int i = 0; i < options.threads; ++i) {
      connections.push_back(std::make_unique<Connections>());
      contexts.push_back(std::make_unique<net::io_context>(1));
      work.push_back(net::make_work_guard(*contexts.back()));
      net::co_spawn(*contexts.back(), sweep(*connections.back()), net::detached);
    }
    acceptor.emplace(*contexts.front());
    const tcp::endpoint endpoint(net::ip::make_address(options.address), options.port);
    acceptor->open(endpoint.protocol());
    acceptor->set_option(net::socket_base::reuse_address(true));
    acceptor->bind(endpoint);
    acceptor->listen();
    port = acceptor->local_endpoint().port();
    net::co_spawn(*contexts.front(), accept_loop(), net::detached);
    for (std::size_t i = 0; i < contexts.size(); ++i)
      threads.emplace_back([this, i] {
        name_this_thread("sb-io-" + std::to_string(i));
        run_thread(*contexts[i]);
      });
  }

  ~Impl() { stop(); }

  void run_thread(net::io_context& ioc) {
    // Per-op models run here: on CUDA each thread forwards on a stream of its own (as the
    // per-op benchmark clients do) and waits for it per request.
    std::vector<std::unique_ptr<c10::StreamGuard>> streams;
    for (const c10::Device device : protocol.per_op_cuda_devices())
      streams.push_back(std::make_unique<c10::StreamGuard>(
          c10::impl::getDeviceGuardImpl(device.type())
              ->getStreamFromGlobalPool(device, /*isHighPriority=*/false)));
    c10::InferenceMode inference;
    ioc.run();
  }

  void stop() {
    std::call_once(stopped, [this] {
      protocol.set_stopping();
      net::post(*contexts.front(), [this] {
        boost::system::error_code ignored;
        acceptor->close(ignored);
      });
      protocol.shutdown();  // drains: pending requests complete first
      // Their answers are written by the io threads: give them time to go out (bounded, for a
      // client that stops reading) before the io_contexts stop.
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      while (unanswered.load() > 0 && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      for (auto& c : contexts) c->stop();
      for (auto& t : threads)
        if (t.joinable() && t.get_id() != std::this_thread::get_id()) t.join();
      std::lock_guard lock(done_mu);
      done = true;
      done_cv.notify_all();
    });
  }

  // Every few parts of idle_timeout (at most a second), closes what waited longer.
  net::awaitable<void> sweep(Connections& connections) {
    const auto period = std::clamp(options.idle_timeout / 4, std::chrono::milliseconds(1),
                                   std::chrono::milliseconds(1000));
    net::steady_timer timer(co_await net::this_coro::executor);
    for (;;) {
      timer.expires_after(period);
      auto [ec] = co_await timer.async_wait(net::as_tuple(net::use_awaitable));
      if (ec) co_return;
      connections.sweep(options.idle_timeout);
    }
  }

  net::awaitable<void> accept_loop() {
    for (std::size_t next = 0;; ++next) {
      // At the connection limit: accept nothing (the kernel's backlog holds the next) until a
      // connection closes, checked each millisecond.
      while (open.load(std::memory_order_relaxed) >= options.max_connections) {
        net::steady_timer pause(acceptor->get_executor(), std::chrono::milliseconds(1));
        co_await pause.async_wait(net::as_tuple(net::use_awaitable));
        if (!acceptor->is_open()) co_return;
      }
      const std::size_t i = next % contexts.size();
      net::io_context& home = *contexts[i];
      auto [ec, socket] = co_await acceptor->async_accept(home, net::as_tuple(net::use_awaitable));
      if (ec == net::error::operation_aborted || !acceptor->is_open()) co_return;
      if (ec) {  // e.g. too many open files: keep serving the others, retry in a moment
        net::steady_timer pause(acceptor->get_executor(), std::chrono::milliseconds(10));
        co_await pause.async_wait(net::as_tuple(net::use_awaitable));
        continue;
      }
      socket.set_option(tcp::no_delay(true), ec);
      open.fetch_add(1, std::memory_order_relaxed);
      net::co_spawn(home, session(std::move(socket), *connections[i]),
                    [this](std::exception_ptr) { open.fetch_sub(1, std::memory_order_relaxed); });
    }
  }

  // One connection's requests, in turn. A plain socket: Beast's tcp_stream adds its timers and
  // rate limits to each read and write, where the idle sweep keeps time here.
  // Answers `error` on `client` and says the connection must close: the transport's own
  // refusals, whose request cannot be read on (the stream is unusable).
  net::awaitable<void> refuse(tcp::socket& client, const ProtocolError& error, unsigned version,
                              std::string& head) {
    Response res = text_response(static_cast<bh::status>(error.status), error.message,
                                 version == 10 ? 10 : 11);
    res.keep_alive(false);
    res.prepare_payload();
    auto [ec, n] =
        co_await net::async_write(client, wire(res, head), net::as_tuple(net::use_awaitable));
    if (ec) co_return;
    // A lingering close (as nginx's): the client may still be sending what this refuses, and
    // closing with its bytes unread would reset the connection, losing the answer on the way.
    // So stop sending, and read and drop what comes for a while, bounded in bytes and time.
    client.shutdown(tcp::socket::shutdown_send, ec);
    net::steady_timer linger(client.get_executor(), std::chrono::seconds(1));
    linger.async_wait([&client](const boost::system::error_code& e) {
      if (!e) client.cancel();
    });
    std::array<char, 4096> drop;
    for (std::size_t dropped = 0; dropped < 256 * 1024; dropped += n) {
      std::tie(ec, n) =
          co_await client.async_read_some(net::buffer(drop), net::as_tuple(net::use_awaitable));
      if (ec) break;
    }
    linger.cancel();
  }

  net::awaitable<void> session(tcp::socket client, Connections& connections) {
    const auto registered = connections.enter(client);
    Connection& self = *registered->it;
    const RequestLimits limits{.max_header_bytes = options.max_header_bytes,
                               .max_body_bytes = options.max_body_bytes};
    // Bounded: what the parser needs whole (a header, a chunk-size line, a trailer section)
    // must fit, or the read fails with buffer_overflow rather than growing it.
    beast::flat_buffer buffer(limits.read_buffer_bytes());
    std::string head;  // each answer's status line and fields (wire())
    for (;;) {
      bh::request_parser<Body> parser;
      set_limits(parser, limits);
      self.waiting_since = Clock::now();  // for a request (the answer's write counts too)
      auto [ec, n] =
          co_await bh::async_read_header(client, buffer, parser, net::as_tuple(net::use_awaitable));
      if (!ec) {
        const HeaderCheck check =
            check_header(parser.get(), parser.chunked() || parser.content_length().value_or(0) > 0);
        if (check.refuse) {
          co_await refuse(client, *check.refuse, parser.get().version(), head);
          break;
        }
        if (check.send_continue) {
          static constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
          auto [cec, cn] = co_await net::async_write(client, net::buffer(kContinue),
                                                     net::as_tuple(net::use_awaitable));
          if (cec) break;
        }
        // Beast reads as much as the buffer has room for, at least 512 bytes: a body of 600 KB
        // (an image) would take a system call per kilobyte or so. Room for reads of up to 64 KiB
        // where the body is that large; the buffer keeps it for the connection's next request.
        if (const auto length = parser.content_length();
            length && *length > buffer.capacity() - buffer.size())
          buffer.reserve(std::min(buffer.max_size(),
                                  buffer.size() + static_cast<std::size_t>(std::min<std::uint64_t>(
                                                      *length, std::uint64_t{64} * 1024))));
        std::tie(ec, n) =
            co_await bh::async_read(client, buffer, parser, net::as_tuple(net::use_awaitable));
      }
      if (ec) {
        // Malformed HTTP or over a limit: answer, then close (the stream is unusable).
        if (auto error = read_error(ec, limits)) co_await refuse(client, *error, 11, head);
        break;
      }
      Request req = parser.release();
      self.waiting_since = Clock::time_point::max();  // the model's time does not count
      unanswered.fetch_add(1);  // until its answer is written: stop() waits for it
      std::variant<Response, Protocol::Call> step = protocol.begin(req);
      if (auto* call = std::get_if<Protocol::Call>(&step)) {
        Outcome outcome =
            co_await async_run(*call, client, options.cancel_on_hangup, net::use_awaitable);
        step = outcome.gone ? protocol.gone(std::move(*call))
                            : protocol.finish(std::move(*call), std::move(outcome.error),
                                              std::move(outcome.outputs));
      }
      Response& res = std::get<Response>(step);
      res.version(req.version());
      res.keep_alive(req.keep_alive() && !protocol.stopping());  // a stopping server closes
      compress_if_accepted(req, res);
      res.prepare_payload();
      self.waiting_since = Clock::now();  // for the client to read it
      auto [wec, wn] =
          co_await net::async_write(client, wire(res, head, req.method() == bh::verb::head),
                                    net::as_tuple(net::use_awaitable));
      unanswered.fetch_sub(1);
      if (wec || !res.keep_alive()) break;
    }
    boost::system::error_code ignored;
    client.shutdown(tcp::socket::shutdown_send, ignored);
  }

  ServerOptions options;
  Protocol protocol;
  std::atomic<int> unanswered{0};    // requests read whose answer is not written yet
  std::atomic<std::size_t> open{0};  // connections, until their session ends
  // One per thread, before contexts: their sessions leave these as the contexts go.
  std::vector<std::unique_ptr<Connections>> connections;
  std::vector<std::unique_ptr<net::io_context>> contexts;  // one per thread
  std::vector<net::executor_work_guard<net::io_context::executor_type>> work;
  std::optional<tcp::acceptor> acceptor;  // on contexts.front()
  unsigned short port = 0;
  std::vector<std::thread> threads;
  std::once_flag stopped;
  std::mutex done_mu;
  std::condition_variable done_cv;
  bool done = false;
};

Server::Server(std::vector<ServedModel> models, ServerOptions options)
    : impl_(std::make_unique<Impl>(std::move(models), std::move(options))) {}
Server::Server(Model model, ServerOptions options, ModelOptions model_options)
    : Server(
          [&] {
            std::vector<ServedModel> one;
            one.push_back({std::move(model), std::move(model_options)});
            return one;
          }(),
          std::move(options)) {}
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
  return impl_->protocol.stats_json();
}
std::string Server::layout() const {
  std::string out = std::to_string(impl_->options.threads) +
                    (impl_->options.threads == 1 ? " io thread" : " io threads") + "; workers:";
  for (const auto& [model, workers] : impl_->protocol.workers())
    out += " '" + model + "' " + (workers == 0 ? std::string("per-op") : std::to_string(workers));
  return out;
}

}  // namespace syncbatch::http
