// The HTTP server example, driven by a real HTTP client (Boost.Beast) over loopback TCP: good
// and malformed requests in every mode, a full queue, a TorchScript model made and saved here.
#include <ATen/ATen.h>
#include <torch/script.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <latch>
#include <limits>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/json.hpp>

#include "metrics.hpp"
#include "server.hpp"
#include "syncbatch/error.hpp"
#include "syncbatch/torch/device_sync.hpp"
#include "syncbatch/torch/graphs.hpp"

namespace syncbatch::http {
namespace {

namespace bh = boost::beast::http;
using tcp = boost::asio::ip::tcp;

struct Reply {
  unsigned status = 0;
  std::string body;
  std::string content_type;
  std::string retry_after;
  std::string shape;
  std::string header_length;  // Inference-Header-Content-Length
};

// One request on a fresh connection (`raw`: bytes sent as they are, not an HTTP request).
Reply send(unsigned short port, bh::verb method, const std::string& target,
           const std::string& content_type, const std::string& body,
           const std::map<std::string, std::string>& headers = {}) {
  boost::asio::io_context ioc;
  boost::beast::tcp_stream stream(ioc);
  stream.connect(tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), port));
  bh::request<bh::string_body> req(method, target, 11);
  req.set(bh::field::host, "127.0.0.1");
  if (!content_type.empty()) req.set(bh::field::content_type, content_type);
  for (const auto& [k, v] : headers) req.set(k, v);
  req.body() = body;
  req.prepare_payload();
  bh::write(stream, req);
  boost::beast::flat_buffer buffer;
  bh::response_parser<bh::string_body> parser;
  parser.body_limit(64 << 20);
  bh::read(stream, buffer, parser);
  const auto& res = parser.get();
  return {res.result_int(),
          res.body(),
          std::string(res[bh::field::content_type]),
          std::string(res[bh::field::retry_after]),
          std::string(res["X-Output-Shape"]),
          std::string(res["Inference-Header-Content-Length"])};
}

Reply post(unsigned short port, const std::string& content_type, const std::string& body) {
  return send(port, bh::verb::post, "/v1/infer", content_type, body);
}

std::string raw_bytes(const at::Tensor& x) {
  const at::Tensor c = x.contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size());
}

at::Tensor from_raw(const std::string& bytes, int64_t cols) {
  at::Tensor t = at::empty({static_cast<int64_t>(bytes.size() / sizeof(float)) / cols, cols});
  std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
  return t;
}

std::string json_row(const at::Tensor& row) {
  std::string s = "[";
  for (int64_t j = 0; j < row.numel(); ++j) {
    if (j > 0) s += ",";
    s += std::to_string(row[j].item<float>());
  }
  return s + "]";
}

// Parses [a,b,...] or [[...],[...]] of numbers (what the server sends) into a [rows, cols] tensor.
at::Tensor parse_json_numbers(const std::string& s, int64_t cols) {
  std::vector<float> v;
  const char* p = s.c_str();
  while (*p) {
    if ((*p >= '0' && *p <= '9') || *p == '-') {
      char* end = nullptr;
      v.push_back(std::strtof(p, &end));
      p = end;
    } else {
      ++p;
    }
  }
  return at::tensor(v).view({-1, cols});
}

constexpr int64_t kWidth = 8;

// A one-input, one-output model's forward on x.
at::Tensor run(const Model& model, const at::Tensor& x) {
  return model.forward({x}).at(0);
}

Model small_model() {
  at::manual_seed(7);
  const at::Tensor w = at::randn({3, kWidth});
  return {[w](const at::Tensor& x) { return at::relu(at::matmul(x, w.t())) + 1; }, kWidth, "small"};
}

// An OIP infer request body for x (flat or nested data).
std::string oip_infer(const at::Tensor& x, bool nested, const std::string& extra = "") {
  std::string data = "[";
  for (int64_t r = 0; r < x.size(0); ++r) {
    const std::string row = json_row(x[r]);
    data += (r ? "," : "") + (nested ? row : row.substr(1, row.size() - 2));
  }
  data += "]";
  return R"({"id":"req-7","inputs":[{"name":"input","shape":[)" + std::to_string(x.size(0)) + "," +
         std::to_string(x.size(1)) + R"(],"datatype":"FP32","data":)" + data + "}]" + extra + "}";
}

boost::json::object parse_object(const std::string& body) {
  const boost::json::value v = boost::json::parse(body);
  EXPECT_TRUE(v.is_object()) << body;
  return v.is_object() ? v.as_object() : boost::json::object{};
}

class HttpServerModes : public ::testing::TestWithParam<Mode> {};

TEST_P(HttpServerModes, AnswersGoodRequestsInTheirOwnEncoding) {
  const Model model = small_model();
  Server server(model, {.threads = 2}, {.mode = GetParam()});
  const at::Tensor x = at::randn({1, kWidth});
  const at::Tensor want = run(model, x);

  const Reply one = post(server.port(), "application/json", json_row(x[0]));
  ASSERT_EQ(one.status, 200u) << one.body;
  EXPECT_EQ(one.content_type, "application/json");
  EXPECT_EQ(one.body.substr(0, 1), "[");  // a flat row in, a flat row out
  EXPECT_NE(one.body.substr(0, 2), "[[");
  EXPECT_TRUE(at::allclose(parse_json_numbers(one.body, 3), want, 1e-4, 1e-4)) << one.body;

  const at::Tensor xs = at::randn({3, kWidth});
  std::string rows = "[" + json_row(xs[0]) + "," + json_row(xs[1]) + "," + json_row(xs[2]) + "]";
  const Reply many = post(server.port(), "application/json; charset=utf-8", rows);
  ASSERT_EQ(many.status, 200u) << many.body;
  EXPECT_EQ(many.body.substr(0, 2), "[[");  // rows in, rows out
  EXPECT_TRUE(at::allclose(parse_json_numbers(many.body, 3), run(model, xs), 1e-4, 1e-4));

  const Reply raw = post(server.port(), "application/octet-stream", raw_bytes(xs));
  ASSERT_EQ(raw.status, 200u) << raw.body;
  EXPECT_EQ(raw.content_type, "application/octet-stream");
  EXPECT_EQ(raw.shape, "3,3");
  EXPECT_TRUE(at::equal(from_raw(raw.body, 3), run(model, xs)));

  EXPECT_EQ(send(server.port(), bh::verb::get, "/healthz", "", "").status, 200u);
  // The worker counts a batch just after completing it: the count may trail the last reply.
  Reply stats;
  for (int i = 0; i < 200; ++i) {
    stats = send(server.port(), bh::verb::get, "/stats", "", "");
    if (stats.body.find("\"completed\":3") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_EQ(stats.status, 200u);
  if (GetParam() != Mode::kPerOp) {
    EXPECT_NE(stats.body.find("\"completed\":3"), std::string::npos) << stats.body;
  }
}

TEST_P(HttpServerModes, RejectsBadRequestsWithAReasonAndKeepsServing) {
  Server server(small_model(), {.threads = 2, .max_body_bytes = 4096},
                {.mode = GetParam(), .max_rows = 4});
  const unsigned short port = server.port();
  struct Case {
    std::string content_type, body;
    unsigned status;
    std::string says;
  };
  const std::vector<Case> cases{
      {"application/json", "[1, 2", 400, "malformed JSON"},
      {"application/json", "{\"x\": 1}", 400, "expected a non-empty JSON array"},
      {"application/json", "[]", 400, "expected a non-empty JSON array"},
      {"application/json", "[1,2,3]", 400, "expected 8 numbers, got 3 elements"},
      {"application/json", "[1,2,3,4,5,6,7,\"8\"]", 400, "element 7: expected a number"},
      {"application/json", "[[1,2,3,4,5,6,7,8],[1]]", 400, "row 1: expected 8 numbers"},
      {"application/json", "[[1,2,3,4,5,6,7,8],3]", 400, "row 1: expected an array of numbers"},
      {"application/octet-stream", std::string(30, '\0'), 400,
       "expected a non-empty multiple of 32 bytes (8 little-endian float32 per row), got 30"},
      {"application/octet-stream", "", 400, "got 0 bytes"},
      {"application/octet-stream", std::string(32 * 5, '\0'), 413, "at most 4 rows, got 5"},
      {"text/plain", "[1]", 415, "expected Content-Type application/json or"},
      {"", "[1]", 415, "got none"},
      {"application/octet-stream", std::string(5000, '\0'), 413, "at most 4096 bytes"},
  };
  for (const Case& c : cases) {
    const Reply r = post(port, c.content_type, c.body);
    EXPECT_EQ(r.status, c.status) << c.body.substr(0, 40) << " -> " << r.body;
    EXPECT_NE(r.body.find(c.says), std::string::npos) << r.body;
  }
  EXPECT_EQ(send(port, bh::verb::get, "/v1/infer", "", "").status, 405u);
  EXPECT_EQ(send(port, bh::verb::post, "/nope", "application/json", "[1]").status, 404u);

  // Bytes that are not HTTP: answered 400 and the connection closed, the server unharmed.
  {
    boost::asio::io_context ioc;
    tcp::socket socket(ioc);
    socket.connect(tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), port));
    boost::asio::write(socket, boost::asio::buffer(std::string("GARBAGE \x01\x02\r\n\r\n")));
    std::string reply(256, '\0');
    boost::system::error_code ec;
    const std::size_t n = socket.read_some(boost::asio::buffer(reply), ec);
    EXPECT_EQ(reply.substr(0, 12), "HTTP/1.1 400") << reply.substr(0, n);
  }
  const at::Tensor x = at::randn({1, kWidth});
  EXPECT_EQ(post(port, "application/octet-stream", raw_bytes(x)).status, 200u);
}

// A raw HTTP exchange: `request` sent as bytes, the reply read until the server closes or
// `until` appears (the whole reply when the body length is known from the caller's request).
std::string exchange_raw(unsigned short port, const std::string& request) {
  boost::asio::io_context ioc;
  tcp::socket socket(ioc);
  socket.connect(tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), port));
  boost::asio::write(socket, boost::asio::buffer(request));
  // No half-close: the server takes a client that shuts its sending side as gone (as nginx
  // does) and cancels its request. The requests say Connection: close; the server closes.
  std::string reply;
  boost::system::error_code ec;
  char chunk[4096];
  for (;;) {
    const std::size_t n = socket.read_some(boost::asio::buffer(chunk), ec);
    reply.append(chunk, n);
    if (ec) break;
  }
  return reply;
}

// Regression: numbers outside float32 (1e400 parses as inf, 3e38 * 4 overflows in the model)
// were run, and the output's inf and nan were written into a 200 body as bare words that no
// JSON parser accepts. Inputs must now be finite float32, and JSON outputs are valid JSON or an
// error naming the element; raw outputs keep their bytes.
TEST_P(HttpServerModes, NonFiniteNumbersNeverReachABody) {
  // y = x summed over the row, 4 times: inputs near FLT_MAX overflow to inf, and inf - inf = nan.
  const Model model{[](const at::Tensor& x) {
                      return at::stack({x.sum(1), x.sum(1) * -1, x.sum(1) - x.sum(1)}, 1);
                    },
                    4, "sums"};
  Server server(model, {.threads = 2}, {.mode = GetParam()});
  const unsigned short port = server.port();
  struct Case {
    std::string body;
    std::string says;
  };
  const std::vector<Case> bad_inputs{
      {"[-1e400,1,1,1]", "element 0: expected a finite number in float32 range"},
      {"[1,1e39,1,1]", "element 1: expected a finite number in float32 range"},
      {"[[1,1,1,1],[1,1,1,-4e38]]", "row 1, element 3: expected a finite number"},
  };
  for (const Case& c : bad_inputs) {
    const Reply r = post(port, "application/json", c.body);
    EXPECT_EQ(r.status, 400u) << c.body << " -> " << r.body;
    EXPECT_NE(r.body.find(c.says), std::string::npos) << r.body;
  }
  // Finite inputs whose outputs are not: no 200 with an invalid body.
  const Reply overflow = post(port, "application/json", "[-3e38,-3e38,-3e38,-3e38]");
  EXPECT_EQ(overflow.status, 500u) << overflow.body;
  EXPECT_NE(overflow.body.find("output row 0, element 0 is -inf"), std::string::npos)
      << overflow.body;
  EXPECT_NE(overflow.body.find("application/octet-stream"), std::string::npos) << overflow.body;
  // The same request as raw float32: the bytes as the model made them.
  const float big[4] = {-3e38f, -3e38f, -3e38f, -3e38f};
  const Reply raw =
      post(port, "application/octet-stream", std::string(reinterpret_cast<const char*>(big), 16));
  ASSERT_EQ(raw.status, 200u) << raw.body;
  const at::Tensor y = from_raw(raw.body, 3);
  EXPECT_TRUE(std::isinf(y[0][0].item<float>()));
  EXPECT_TRUE(std::isnan(y[0][2].item<float>()));
  // Raw inputs are held to the same rule as JSON ones.
  const float nan_in[4] = {1, 2, std::numeric_limits<float>::quiet_NaN(), 4};
  const Reply raw_nan = post(port, "application/octet-stream",
                             std::string(reinterpret_cast<const char*>(nan_in), 16));
  EXPECT_EQ(raw_nan.status, 400u) << raw_nan.body;
  EXPECT_NE(raw_nan.body.find("row 0, element 2: expected a finite float32, got nan"),
            std::string::npos)
      << raw_nan.body;
  // Every 200 body for good finite inputs still parses as JSON.
  const Reply ok = post(port, "application/json", "[1,2,3,4]");
  ASSERT_EQ(ok.status, 200u) << ok.body;
  boost::system::error_code ec;
  boost::json::parse(ok.body, ec);
  EXPECT_FALSE(ec) << ok.body;
}

// Regression: a non-number element was echoed whole in the 400 message (500 KB in, 500 KB back).
TEST_P(HttpServerModes, ErrorMessagesQuoteAShortExcerpt) {
  Server server(small_model(), {.threads = 2, .max_body_bytes = 1 << 20}, {.mode = GetParam()});
  const std::string huge = "\"" + std::string(200000, 'x') + "\"";
  const Reply r = post(server.port(), "application/json", "[1,2,3,4,5,6,7," + huge + "]");
  EXPECT_EQ(r.status, 400u);
  EXPECT_NE(r.body.find("element 7: expected a number, got \"xxxx"), std::string::npos)
      << r.body.substr(0, 200);
  EXPECT_LT(r.body.size(), 300u) << "the message echoes the element whole";
}

// Regression: a transfer coding other than chunked was ignored (the body read as if plain) and
// answered 200. RFC 9112 section 6.1: a server that does not understand a transfer coding
// answers 501. Sent through a raw socket, as a client could.
TEST_P(HttpServerModes, UnknownTransferCodingsAnswer501) {
  Server server(small_model(), {.threads = 2}, {.mode = GetParam()});
  const std::string body = "[1,2,3,4,5,6,7,8]";
  char size[16];
  std::snprintf(size, sizeof size, "%zx", body.size());
  const std::string chunked = std::string(size) + "\r\n" + body + "\r\n0\r\n\r\n";
  auto request = [&](const std::string& coding) {
    return "POST /v1/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           "Transfer-Encoding: " +
           coding + "\r\nConnection: close\r\n\r\n" + chunked;
  };
  for (const std::string coding : {"gzip, chunked", "deflate,chunked", "x-custom , chunked"}) {
    const std::string reply = exchange_raw(server.port(), request(coding));
    EXPECT_EQ(reply.substr(0, 12), "HTTP/1.1 501") << coding << ": " << reply.substr(0, 200);
    EXPECT_NE(reply.find("chunked"), std::string::npos) << reply;
  }
  const std::string plain = exchange_raw(server.port(), request("chunked"));
  EXPECT_EQ(plain.substr(0, 12), "HTTP/1.1 200") << plain.substr(0, 200);
  const std::string upper = exchange_raw(server.port(), request("Chunked"));
  EXPECT_EQ(upper.substr(0, 12), "HTTP/1.1 200") << upper.substr(0, 200);
}

// HTTP/1.1 pipelining: requests sent on one connection before the answers to those before them
// are answered in order, each with its own result. Requests 2 and 3 come in while request 1
// runs (the model takes 20 ms): the hang-up watch (on by default) must take them for what they
// are, not for a client gone.
TEST_P(HttpServerModes, PipelinedRequestsAreAnsweredInOrder) {
  const Model model{[](const at::Tensor& x) {
                      std::this_thread::sleep_for(std::chrono::milliseconds(20));
                      return x * 2;
                    },
                    kWidth, "double"};
  Server server(model, {.threads = 2}, {.mode = GetParam()});
  auto request = [](int i) {
    std::string body = "[";
    for (int j = 0; j < kWidth; ++j) {
      if (j) body += ',';
      body += std::to_string(i);
    }
    body += "]";
    return "POST /v1/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           "Content-Length: " +
           std::to_string(body.size()) + "\r\n" + (i == 3 ? "Connection: close\r\n" : "") + "\r\n" +
           body;
  };
  boost::asio::io_context ioc;
  tcp::socket socket(ioc);
  socket.connect(tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), server.port()));
  boost::asio::write(socket, boost::asio::buffer(request(1)));
  std::this_thread::sleep_for(std::chrono::milliseconds(5));  // request 1 runs
  boost::asio::write(socket, boost::asio::buffer(request(2) + request(3)));
  std::string reply;
  boost::system::error_code ec;
  char chunk[4096];
  while (!ec) reply.append(chunk, socket.read_some(boost::asio::buffer(chunk), ec));
  std::size_t at = 0;
  for (int i = 1; i <= 3; ++i) {
    ASSERT_EQ(reply.compare(at, 12, "HTTP/1.1 200"), 0) << "answer " << i << ": " << reply;
    std::string want = "[";
    for (int j = 0; j < kWidth; ++j) {
      if (j) want += ',';
      want += std::to_string(2 * i);
    }
    want += "]";
    const std::size_t body = reply.find("\r\n\r\n", at) + 4;
    ASSERT_EQ(reply.compare(body, want.size(), want), 0) << "answer " << i << ": " << reply;
    at = body + want.size();
  }
  EXPECT_EQ(at, reply.size()) << reply;
}

INSTANTIATE_TEST_SUITE_P(Modes, HttpServerModes,
                         ::testing::Values(Mode::kPerOp, Mode::kPerCall, Mode::kStacked),
                         [](const auto& info) {
                           std::string s = to_string(info.param);
                           s.erase(std::remove(s.begin(), s.end(), '-'), s.end());
                           return s;
                         });

TEST(HttpServer, FullQueueAnswers503WithRetryAfterAndLosesNothing) {
  std::latch running(1);
  std::atomic<bool> release{false};
  Model model{[&](const at::Tensor& x) {
                running.count_down();
                while (!release.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
                return x * 2;
              },
              kWidth, "blocking"};
  Server server(model, {.threads = 4}, {.mode = Mode::kPerCall, .queue_capacity = 1});
  const unsigned short port = server.port();
  const at::Tensor x = at::ones({1, kWidth});
  Reply first, second;
  std::thread a([&] { first = post(port, "application/octet-stream", raw_bytes(x)); });
  running.wait();  // the worker holds request 1 in the model; the queue is empty
  std::thread b([&] { second = post(port, "application/octet-stream", raw_bytes(x)); });
  for (int i = 0; i < 5000; ++i) {  // until request 2 waits in the queue
    if (server.stats_json().find("\"queued\":1") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const Reply third = post(port, "application/octet-stream", raw_bytes(x));
  EXPECT_EQ(third.status, 503u) << third.body;
  EXPECT_EQ(third.retry_after, "1");
  EXPECT_NE(third.body.find("queue is full"), std::string::npos);
  release = true;
  a.join();
  b.join();
  EXPECT_EQ(first.status, 200u);
  EXPECT_EQ(second.status, 200u);
  EXPECT_TRUE(at::equal(from_raw(second.body, kWidth), x * 2));
}

// A connection that keeps the server waiting (no request, half a request) is closed after
// idle_timeout; one whose request is in the model, or that keeps sending requests, is not.
TEST(HttpServer, IdleConnectionsCloseAndBusyOnesStay) {
  std::atomic<bool> release{false};
  Model model{[&](const at::Tensor& x) {
                while (!release.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
                return x * 2;
              },
              kWidth, "slow"};
  Server server(model, {.threads = 2, .idle_timeout = std::chrono::milliseconds(200)},
                {.mode = Mode::kPerCall});
  const unsigned short port = server.port();
  boost::asio::io_context ioc;
  const auto connect = [&] {
    tcp::socket s(ioc);
    s.connect(tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), port));
    return s;
  };
  // Seconds until the server closes `s` (a read sees the end of the stream), 10 at most.
  const auto until_closed = [](tcp::socket& s) {
    const auto start = std::chrono::steady_clock::now();
    const auto elapsed = [&] {
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    };
    s.non_blocking(true);
    char chunk[4096];
    for (boost::system::error_code ec; elapsed() < 10;) {
      s.read_some(boost::asio::buffer(chunk), ec);
      if (ec == boost::asio::error::would_block) {
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      } else if (ec) {
        break;
      }
    }
    return elapsed();
  };
  tcp::socket silent = connect();
  tcp::socket half = connect();
  boost::asio::write(half, boost::asio::buffer(std::string("POST /v1/infer HTTP/1.1\r\nHost: x")));
  const double silent_s = until_closed(silent);
  const double half_s = until_closed(half);
  EXPECT_GE(silent_s, 0.19);
  EXPECT_LT(silent_s, 5.0);
  EXPECT_LT(half_s, 5.0);
  // A request the model holds for longer than the timeout is answered, and a client sending a
  // request every 50 ms on one connection keeps it.
  const at::Tensor x = at::ones({1, kWidth});
  Reply held;
  std::thread slow([&] { held = post(port, "application/octet-stream", raw_bytes(x)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  release = true;
  slow.join();
  EXPECT_EQ(held.status, 200u) << held.body;
  boost::beast::tcp_stream busy(ioc);
  busy.connect(tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), port));
  for (int i = 0; i < 12; ++i) {
    bh::request<bh::string_body> req(bh::verb::get, "/v2/health/live", 11);
    req.set(bh::field::host, "127.0.0.1");
    bh::write(busy, req);
    boost::beast::flat_buffer buffer;
    bh::response<bh::string_body> res;
    bh::read(busy, buffer, res);
    EXPECT_EQ(res.result_int(), 200u) << i;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  // An idle timeout under a millisecond would close every connection at once: refused.
  try {
    Server(model, {.idle_timeout = std::chrono::milliseconds(0)});
    ADD_FAILURE() << "an idle_timeout of 0 ms was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("expected an idle_timeout of at least 1 ms, got 0 ms"),
              std::string::npos)
        << e.what();
  }
}

// A client that hangs up while its request waits in the queue cancels it: the model never sees
// it (its rows, all 7s here, never reach a forward), and the submitter counts a cancellation.
// A client hangs up while its request waits in the queue behind one the model holds. With the
// watch on (the default) the request is cancelled and the model never sees it (499 in
// /metrics); with it off the request runs to an answer no one reads.
void hang_up_while_queued(bool cancel_on_hangup) {
  std::latch running(1);
  std::atomic<bool> release{false};
  std::atomic<int> sevens{0};
  Model model{[&](const at::Tensor& x) {
                running.count_down();
                while (!release.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
                if ((x == 7).all(1).any().item<bool>()) sevens.fetch_add(1);
                return x * 2;
              },
              kWidth, "blocking"};
  Server server(model, {.threads = 4, .cancel_on_hangup = cancel_on_hangup},
                {.mode = Mode::kStacked, .name = "m"});
  const unsigned short port = server.port();
  Reply first;
  std::thread a([&] {
    first = post(port, "application/octet-stream", raw_bytes(at::ones({1, kWidth})));
  });
  running.wait();  // the worker holds request 1 in the model
  {
    // Request 2 from a client that closes its connection without waiting for the answer.
    boost::asio::io_context ioc;
    boost::beast::tcp_stream stream(ioc);
    stream.connect(tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), port));
    bh::request<bh::string_body> req(bh::verb::post, "/v2/models/m/infer", 11);
    req.set(bh::field::host, "127.0.0.1");
    req.set(bh::field::content_type, "application/json");
    req.body() = oip_infer(at::full({1, kWidth}, 7.0), false);
    req.prepare_payload();
    bh::write(stream, req);
    for (int i = 0; i < 5000; ++i) {  // until request 2 waits in the queue
      if (server.stats_json().find("\"queued\":1") != std::string::npos) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ASSERT_NE(server.stats_json().find("\"queued\":1"), std::string::npos) << server.stats_json();
    stream.socket().close();
  }
  if (!cancel_on_hangup) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));  // time to (wrongly) cancel
    release = true;
    a.join();
    EXPECT_EQ(first.status, 200u);
    for (int i = 0; i < 5000 && sevens.load() == 0; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    EXPECT_EQ(sevens.load(), 1) << "the hung-up client's request did not run";
    const std::string metrics = send(port, bh::verb::get, "/metrics", "", "").body;
    EXPECT_NE(metrics.find("syncbatch_failures_total{model=\"m\",reason=\"cancelled\"} 0"),
              std::string::npos)
        << metrics;
    return;
  }
  std::string metrics;
  for (int i = 0; i < 5000; ++i) {  // until the server has seen the hang-up and cancelled it
    metrics = send(port, bh::verb::get, "/metrics", "", "").body;
    if (metrics.find("syncbatch_failures_total{model=\"m\",reason=\"cancelled\"} 1") !=
        std::string::npos)
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_NE(metrics.find("syncbatch_failures_total{model=\"m\",reason=\"cancelled\"} 1"),
            std::string::npos)
      << metrics;
  release = true;
  a.join();
  EXPECT_EQ(first.status, 200u);
  // A later request runs: the model is free, and it never saw request 2.
  EXPECT_EQ(post(port, "application/octet-stream", raw_bytes(at::ones({1, kWidth}))).status, 200u);
  EXPECT_EQ(sevens.load(), 0);
  EXPECT_NE(send(port, bh::verb::get, "/metrics", "", "").body.find("code=\"499\"} 1"),
            std::string::npos);
  EXPECT_NE(server.stats_json().find("\"cancelled\":1"), std::string::npos) << server.stats_json();
}

TEST(HttpServer, AClientThatHangsUpCancelsItsQueuedRequest) {
  hang_up_while_queued(true);
}

TEST(HttpServer, WithoutTheHangUpWatchAHungUpClientsRequestRuns) {
  hang_up_while_queued(false);
}

// The queue timeout: a request held in the queue past it is answered 504, not run; a request
// that by the measured batch time cannot start within it is shed with 503 and Retry-After.
TEST(HttpServer, QueueTimeoutAnswers504AndSheddingAnswers503) {
  std::latch running(1);
  std::atomic<bool> release{false};
  std::atomic<int> runs{0};
  Model model{[&](const at::Tensor& x) {
                runs.fetch_add(1);
                running.count_down();
                while (!release.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
                return x * 2;
              },
              kWidth, "blocking"};
  Server server(
      model, {.threads = 4},
      {.mode = Mode::kPerCall, .policy = EveryN{1}, .timeout = std::chrono::milliseconds(30)});
  const unsigned short port = server.port();
  const at::Tensor x = at::ones({1, kWidth});
  Reply first, second;
  std::thread a([&] { first = post(port, "application/octet-stream", raw_bytes(x)); });
  running.wait();  // request 1 holds the worker in the model
  std::thread b([&] { second = post(port, "application/octet-stream", raw_bytes(x)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // request 2 waits past 30 ms
  release = true;
  a.join();
  b.join();
  EXPECT_EQ(first.status, 200u) << first.body;
  EXPECT_EQ(second.status, 504u) << second.body;
  EXPECT_NE(second.body.find("queue timeout of 30 ms"), std::string::npos) << second.body;
  EXPECT_EQ(runs.load(), 1) << "the timed-out request ran";
  EXPECT_THROW(Server(model, {}, {.shed_late = true}), std::invalid_argument);
  try {
    Server(model, {}, {.timeout = std::chrono::milliseconds(-1)});
    ADD_FAILURE() << "a negative timeout was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("expected a timeout >= 0 ms, got -1"), std::string::npos)
        << e.what();
  }

  // Shedding: 40 ms batches measured, then a request behind a running one cannot start in 20 ms.
  Model slow{[](const at::Tensor& y) {
               std::this_thread::sleep_for(std::chrono::milliseconds(40));
               return y;
             },
             kWidth, "slow"};
  Server shedding(slow, {.threads = 4},
                  {.mode = Mode::kPerCall,
                   .policy = EveryN{1},
                   .timeout = std::chrono::milliseconds(20),
                   .shed_late = true});
  for (int i = 0; i < 2; ++i)  // each alone: starts at once, so within the timeout
    EXPECT_EQ(post(shedding.port(), "application/octet-stream", raw_bytes(x)).status, 200u);
  Reply busy;
  std::thread c([&] { busy = post(shedding.port(), "application/octet-stream", raw_bytes(x)); });
  // Until the busy request is in the submitter (queued or running): either way a batch ahead.
  for (int i = 0; i < 5000 && shedding.stats_json().find("\"submitted\":3") == std::string::npos;
       ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  const Reply shed = post(shedding.port(), "application/octet-stream", raw_bytes(x));
  c.join();
  EXPECT_EQ(busy.status, 200u) << busy.body;
  EXPECT_EQ(shed.status, 503u) << shed.body;
  EXPECT_EQ(shed.retry_after, "1");
  EXPECT_NE(shed.body.find("overloaded"), std::string::npos) << shed.body;
}

TEST(HttpServer, ServesATorchScriptModelSavedFromCpp) {
  // A TorchScript module written in TorchScript source, compiled and saved here: the same file
  // format torch.jit.save writes from Python.
  torch::jit::Module m("Affine");
  at::manual_seed(3);
  const at::Tensor w = at::randn({2, 4}), b = at::randn({2});
  m.register_parameter("w", w, /*is_buffer=*/false);
  m.register_parameter("b", b, false);
  m.define(R"(
    def forward(self, x):
        return torch.relu(torch.matmul(x, self.w.t()) + self.b)
  )");
  const auto path = std::filesystem::temp_directory_path() /
                    ("syncbatch_affine_" + std::to_string(::getpid()) + ".pt");
  m.save(path.string());
  const Model model = load_model(path.string(), 4, c10::Device(c10::kCPU));
  std::filesystem::remove(path);
  Server server(model, {.threads = 2}, {.mode = Mode::kStacked});
  const at::Tensor x = at::randn({2, 4});
  const Reply r = post(server.port(), "application/octet-stream", raw_bytes(x));
  ASSERT_EQ(r.status, 200u) << r.body;
  EXPECT_TRUE(at::allclose(from_raw(r.body, 2), at::relu(at::matmul(x, w.t()) + b)));
}

// Several models from one configuration: a per-call MLP and a stacked TorchScript model of two
// inputs (int64 token ids of any length, float32 features) and two outputs, batched across
// requests of different lengths; JSON and binary tensor data; versions in paths; /metrics by
// model.
TEST(HttpServer, ServesSeveralModelsFromAConfigWithIntegerAndBinaryTensors) {
  torch::jit::Module m("Pair");
  m.define(R"(
    def forward(self, ids, x):
        n = ids.sum(1)
        return (x * 2.0 + n.unsqueeze(1).float(), n)
  )");
  const auto path = std::filesystem::temp_directory_path() /
                    ("syncbatch_pair_" + std::to_string(::getpid()) + ".pt");
  m.save(path.string());
  const std::string config = R"({"models": [
      {"name": "mlp", "model": "mlp:1x8", "mode": "per-call", "device": "cpu"},
      {"name": "pair", "model": ")" +
                             path.string() + R"(", "mode": "stacked", "device": "cpu",
       "policy": "every:4", "batch_buckets": [1, 2, 4, 8],
       "inputs": [{"name": "ids", "datatype": "INT64", "shape": [-1, -1]},
                  {"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
       "outputs": [{"name": "y", "datatype": "FP32"}, {"name": "n", "datatype": "INT64"}]}]})";
  Server server(load_config(config), {.threads = 4});
  std::filesystem::remove(path);
  const unsigned short port = server.port();

  // Requests of lengths 1 to 6 from 6 threads at once: each answer is its own.
  std::atomic<int> wrong{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < 6; ++c) {
    clients.emplace_back([&, c] {
      for (int i = 0; i < 10; ++i) {
        const int len = 1 + (c + i) % 6;
        std::string ids;
        int64_t sum = 0;
        for (int k = 0; k < len; ++k) {
          if (k) ids += ',';
          ids += std::to_string(c * 100 + k);
          sum += c * 100 + k;
        }
        const Reply r = send(port, bh::verb::post, "/v2/models/pair/infer", "application/json",
                             R"({"inputs":[{"name":"ids","datatype":"INT64","shape":[1,)" +
                                 std::to_string(len) + R"(],"data":[)" + ids +
                                 R"(]},{"name":"x","datatype":"FP32","shape":[1,2],"data":[1,)" +
                                 std::to_string(i) + "]}]}");
        const std::string want = R"({"name":"y","datatype":"FP32","shape":[1,2],"data":[)" +
                                 std::to_string(2 + sum) + "," + std::to_string(2 * i + sum) +
                                 R"(]},{"name":"n","datatype":"INT64","shape":[1],"data":[)" +
                                 std::to_string(sum) + "]}";
        if (r.status != 200 || r.body.find(want) == std::string::npos) {
          wrong.fetch_add(1);
          ADD_FAILURE() << r.status << " " << r.body << " (want " << want << ")";
        }
      }
    });
  }
  for (auto& t : clients) t.join();
  EXPECT_EQ(wrong.load(), 0);

  // Binary tensor data both ways, one output asked for, through a versioned path.
  const at::Tensor ids = at::tensor(std::vector<int64_t>{1, 2, 3, 4, 5, 6}).view({2, 3});
  const at::Tensor x = at::tensor(std::vector<float>{0.5f, 1.5f, 2.5f, 3.5f}).view({2, 2});
  const std::string header =
      R"({"inputs":[{"name":"ids","datatype":"INT64","shape":[2,3],"parameters":{"binary_data_size":48}},)"
      R"({"name":"x","datatype":"FP32","shape":[2,2],"parameters":{"binary_data_size":16}}],)"
      R"("outputs":[{"name":"y","parameters":{"binary_data":true}}]})";
  const Reply bin = send(port, bh::verb::post, "/v2/models/pair/versions/1/infer",
                         "application/octet-stream", header + raw_bytes(ids) + raw_bytes(x),
                         {{"Inference-Header-Content-Length", std::to_string(header.size())}});
  ASSERT_EQ(bin.status, 200u) << bin.body;
  EXPECT_EQ(bin.content_type, "application/octet-stream");
  const std::size_t json_size = std::stoul(bin.header_length);
  EXPECT_EQ(
      boost::json::serialize(
          boost::json::parse(bin.body.substr(0, json_size)).as_object().at("outputs")),
      R"([{"name":"y","datatype":"FP32","shape":[2,2],"parameters":{"binary_data_size":16}}])");
  const at::Tensor want = x * 2 + ids.sum(1, true).to(at::kFloat);
  EXPECT_EQ(bin.body.substr(json_size), raw_bytes(want));
  // A header length that is not a number, and binary sizes that do not add up: 400, named.
  const Reply bad_length = send(port, bh::verb::post, "/v2/models/pair/infer", "", header,
                                {{"Inference-Header-Content-Length", "12x"}});
  EXPECT_EQ(bad_length.status, 400u);
  EXPECT_NE(bad_length.body.find("expected a length in bytes, got '12x'"), std::string::npos);
  const Reply short_body =
      send(port, bh::verb::post, "/v2/models/pair/infer", "", header + raw_bytes(ids),
           {{"Inference-Header-Content-Length", std::to_string(header.size())}});
  EXPECT_EQ(short_body.status, 400u);
  EXPECT_NE(short_body.body.find("expected 16 bytes of binary data, the body has 0 left"),
            std::string::npos)
      << short_body.body;

  // Metadata, versions, and the models' names where one is unknown.
  EXPECT_EQ(send(port, bh::verb::get, "/v2/models/pair/versions/1", "", "").body,
            R"({"name":"pair","versions":["1"],"platform":"syncbatch","inputs":[)"
            R"({"name":"ids","datatype":"INT64","shape":[-1,-1]},)"
            R"({"name":"x","datatype":"FP32","shape":[-1,2]}],"outputs":[)"
            R"({"name":"y","datatype":"FP32","shape":[-1,-1]},)"
            R"({"name":"n","datatype":"INT64","shape":[-1,-1]}]})");
  EXPECT_EQ(send(port, bh::verb::get, "/v2/models/mlp/versions/1/ready", "", "").status, 200u);
  const Reply v2 = send(port, bh::verb::get, "/v2/models/pair/versions/2", "", "");
  EXPECT_EQ(v2.status, 404u);
  EXPECT_EQ(v2.body, R"({"error":"unknown version '2' of model 'pair': it has version '1'"})");
  const Reply unknown = send(port, bh::verb::post, "/v2/models/resnet/infer", "", "{}");
  EXPECT_EQ(unknown.status, 404u);
  EXPECT_NE(unknown.body.find("this server serves 'mlp', 'pair'"), std::string::npos);

  // /v1 serves the first model; /metrics has each family once, with a sample per model.
  const Reply v1 = post(port, "application/json", "[1,2,3,4,5,6,7,8]");
  EXPECT_EQ(v1.status, 200u) << v1.body;
  const std::string metrics = send(port, bh::verb::get, "/metrics", "", "").body;
  EXPECT_NE(metrics.find(R"(syncbatch_requests_total{model="pair",code="200"} 61)"),
            std::string::npos)
      << metrics;
  EXPECT_NE(metrics.find(R"(syncbatch_requests_total{model="pair",code="400"} 2)"),
            std::string::npos);
  EXPECT_NE(metrics.find(R"(syncbatch_requests_total{model="mlp",code="200"} 1)"),
            std::string::npos);
  std::size_t helps = 0;
  for (std::size_t at = metrics.find("# HELP syncbatch_completed_total"); at != std::string::npos;
       at = metrics.find("# HELP syncbatch_completed_total", at + 1))
    ++helps;
  EXPECT_EQ(helps, 1u);
  EXPECT_NE(metrics.find(R"(syncbatch_completed_total{model="mlp"} 1)"), std::string::npos);
  EXPECT_NE(metrics.find(R"(syncbatch_completed_total{model="pair"} 61)"), std::string::npos);
}

TEST(HttpServer, ConfigErrorsNameTheModelAndTheKey) {
  const auto error = [](const std::string& text) {
    try {
      load_config(text);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_EQ(error("{}"), "config: models: expected a non-empty array of models, got {}");
  EXPECT_EQ(error(R"({"models":[{"name":"a","model":"mlp:1x4"},{"name":"a","model":"mlp:1x4"}]})"),
            R"(config: models[1].name: expected a unique name without '/', got "a")");
  EXPECT_EQ(error(R"({"models":[{"name":"a","model":"mlp:1x4","workers":-1}]})"),
            "config: models[0] ('a').workers: expected a whole number >= 0, got -1");
  EXPECT_EQ(
      error(R"({"models":[{"name":"a","model":"m.pt","inputs":[{"name":"t","datatype":"STR"}]}]})"),
      "config: models[0] ('a').inputs[0].datatype: expected BOOL, UINT8, INT8, INT16, INT32, "
      "INT64, FP16, BF16, FP32 or FP64, got \"STR\"");
  EXPECT_EQ(
      error(R"({"models":[{"name":"a","model":"m.pt","inputs":[{"name":"t","shape":[2]}]}]})"),
      "config: models[0] ('a').inputs[0].shape: expected -1 (the rows) first, got [2]");
}

// Graphs in stacked mode: every bucket captured on each worker before the server answers,
// answers equal to the model's own forward, /stats counting the replays. Where graphs cannot
// run (a build or machine without CUDA) the model runs eagerly and /stats says why.
TEST(HttpServer, GraphsServeEveryBucketAndStatsSayWhereTheyRan) {
  const c10::Device device = default_device();
  ModelOptions options;
  options.device = device;
  options.policy = EveryN{8};
  options.workers = 2;
  options.batch_buckets = {1, 2, 4, 8};
  options.graphs = true;
  std::vector<ServedModel> models;
  models.push_back(load_served("mlp:2x8", 0, options));
  const Model::Forward forward = models.front().model.forward;
  Server server(std::move(models), {.threads = 4});
  const unsigned short port = server.port();

  // 8 clients, requests of 1 to 3 rows: batches of every bucket, each answer its own.
  std::atomic<int> wrong{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < 8; ++c) {
    clients.emplace_back([&, c] {
      for (int i = 0; i < 25; ++i) {
        const at::Tensor x = at::full({1 + (c + i) % 3, 8}, 0.1 * c - 0.01 * i);
        const Reply r = post(port, "application/octet-stream", raw_bytes(x));
        const at::Tensor want = forward({x.to(device)}).at(0).cpu();
        if (r.status != 200 || !at::allclose(from_raw(r.body, 8), want, 1e-5, 1e-6)) {
          wrong.fetch_add(1);
          ADD_FAILURE() << r.status << " " << r.body.size() << " bytes";
        }
      }
    });
  }
  for (auto& t : clients) t.join();
  EXPECT_EQ(wrong.load(), 0);

  const boost::json::object graphs = parse_object(send(port, bh::verb::get, "/stats", "", "").body)
                                         .at("model")
                                         .as_object()
                                         .at("graphs")
                                         .as_object();
  if (graphs_unavailable_reason(device).empty()) {
    EXPECT_EQ(graphs.at("captured").to_number<std::uint64_t>(), 8u)
        << graphs;  // 2 workers x 4 buckets
    EXPECT_GT(graphs.at("replays").to_number<std::uint64_t>(), 0u) << graphs;
    EXPECT_EQ(graphs.at("eager_runs").to_number<std::uint64_t>(), 0u) << graphs;
    EXPECT_EQ(graphs.at("evictions").to_number<std::uint64_t>(), 0u) << graphs;
  } else {
    EXPECT_EQ(graphs.at("unavailable").as_string(), graphs_unavailable_reason(device)) << graphs;
    EXPECT_EQ(graphs.at("replays").to_number<std::uint64_t>(), 0u) << graphs;
    EXPECT_GT(graphs.at("eager_runs").to_number<std::uint64_t>(), 0u) << graphs;
  }
}

// Graphs where they cannot replay: refused when the server starts, naming what was expected.
TEST(HttpServer, GraphsOutsideStackedModeOrWithoutLengthBucketsAreRefused) {
  const auto error = [](const std::string& model) {
    try {
      Server server(load_config(R"({"models":[)" + model + "]}"), {.threads = 1});
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_EQ(
      error(R"({"name":"a","model":"mlp:1x4","device":"cpu","mode":"per-call","graphs":true})"),
      "model 'a': graphs are replayed in stacked mode, got per-call");
  const auto path = std::filesystem::temp_directory_path() /
                    ("syncbatch_ids_" + std::to_string(::getpid()) + ".pt");
  torch::jit::Module m("Ids");
  m.define("def forward(self, ids):\n    return ids * 2\n");
  m.save(path.string());
  const std::string ids = R"({"name":"b","model":")" + path.string() +
                          R"(","device":"cpu","graphs":true,)"
                          R"("inputs":[{"name":"ids","datatype":"INT64","shape":[-1,-1]}],)"
                          R"("outputs":[{"name":"y","datatype":"INT64"}])";
  EXPECT_EQ(error(ids + "}"),
            "model 'b': graphs of input 'ids' (a varying dim) need length_buckets, got none");
  EXPECT_EQ(error(ids + R"(,"length_buckets":[4,8]})"), "accepted");
  std::filesystem::remove(path);
  EXPECT_EQ(error(R"({"name":"c","model":"mlp:1x4","graphs":"yes"})"),
            R"(config: models[0] ('c').graphs: expected true or false, got "yes")");
}

// The Open Inference Protocol: every endpoint's documented requests, good and bad, with status
// codes and bodies checked against the protocol's shapes.
TEST_P(HttpServerModes, SpeaksTheOpenInferenceProtocol) {
  const Model model = small_model();
  Server server(model, {.threads = 2}, {.mode = GetParam(), .name = "small"});
  const unsigned short port = server.port();
  auto get = [&](const std::string& target) { return send(port, bh::verb::get, target, "", ""); };

  const Reply meta = get("/v2");
  ASSERT_EQ(meta.status, 200u);
  const auto m = parse_object(meta.body);
  EXPECT_EQ(m.at("name").as_string(), "syncbatch");
  EXPECT_TRUE(m.at("version").is_string());
  EXPECT_TRUE(m.at("extensions").is_array());
  EXPECT_EQ(get("/v2/health/live").status, 200u);
  EXPECT_EQ(get("/v2/health/ready").status, 200u);
  EXPECT_EQ(get("/v2/models/small/ready").status, 200u);

  const Reply model_meta = get("/v2/models/small");
  ASSERT_EQ(model_meta.status, 200u);
  const auto mm = parse_object(model_meta.body);
  EXPECT_EQ(mm.at("name").as_string(), "small");
  const auto& in = mm.at("inputs").as_array().at(0).as_object();
  EXPECT_EQ(in.at("name").as_string(), "input");
  EXPECT_EQ(in.at("datatype").as_string(), "FP32");
  EXPECT_EQ(boost::json::serialize(in.at("shape")), "[-1,8]");
  EXPECT_EQ(mm.at("outputs").as_array().at(0).as_object().at("name").as_string(), "output");

  // Infer, with flat and with nested data.
  for (bool nested : {false, true}) {
    const at::Tensor x = at::randn({2, kWidth});
    const Reply r = send(port, bh::verb::post, "/v2/models/small/infer", "application/json",
                         oip_infer(x, nested));
    ASSERT_EQ(r.status, 200u) << r.body;
    EXPECT_EQ(r.content_type, "application/json");
    const auto o = parse_object(r.body);
    EXPECT_EQ(o.at("model_name").as_string(), "small");
    EXPECT_EQ(o.at("id").as_string(), "req-7");
    const auto& out = o.at("outputs").as_array().at(0).as_object();
    EXPECT_EQ(out.at("name").as_string(), "output");
    EXPECT_EQ(out.at("datatype").as_string(), "FP32");
    EXPECT_EQ(boost::json::serialize(out.at("shape")), "[2,3]");
    std::vector<float> got;
    for (const auto& d : out.at("data").as_array())
      got.push_back(static_cast<float>(d.to_number<double>()));
    ASSERT_EQ(got.size(), 6u);
    EXPECT_TRUE(at::allclose(at::tensor(got).view({2, 3}), run(model, x), 1e-4, 1e-4));
  }

  // Bad requests: 4xx with {"error": "..."} naming what was expected and what came.
  const at::Tensor x = at::randn({1, kWidth});
  struct Bad {
    std::string target, body;
    unsigned status;
    std::string says;
  };
  const std::string good = oip_infer(x, false);
  auto replace = [&](std::string from, std::string to) {
    std::string b = good;
    b.replace(b.find(from), from.size(), to);
    return b;
  };
  const std::vector<Bad> bad = {
      {"/v2/models/other/infer", good, 404, "unknown model 'other': this server serves 'small'"},
      {"/v2/models/small/infer", "{", 400, "malformed JSON body"},
      {"/v2/models/small/infer", "[1,2]", 400, "expected an inference request object"},
      {"/v2/models/small/infer", R"({"inputs":[]})", 400,
       "inputs: expected an array of 1 ('input'), got []"},
      {"/v2/models/small/infer", replace("\"FP32\"", "\"INT64\""), 400,
       "expected datatype \"FP32\", got \"INT64\""},
      {"/v2/models/small/infer", replace("\"input\"", "\"x\""), 400,
       "inputs: expected a name among 'input', got \"x\""},
      {"/v2/models/small/infer", replace("[1,8]", "[1,7]"), 400,
       "input 'input': expected shape [-1, 8] (-1: any size >= 1; the first dim is the rows), got "
       "[1,7]"},
      {"/v2/models/small/infer", replace("[1,8]", "[2,8]"), 400,
       "input 'input': shape [2, 8] needs 16 values, got 8"},
      {"/v2/models/small/infer", replace("[1,8]", "[1000,8]"), 413, "expected at most 256 rows"},
      {"/v2/models/small/infer", good.substr(0, good.size() - 1) + R"(,"outputs":[{"name":"y"}]})",
       400, "outputs: expected names among 'output', got {\"name\":\"y\"}"},
      {"/v2/models/small/infer",
       good.substr(0, good.size() - 1) + R"(,"parameters":{"timeout":-5}})", 400,
       "parameters.timeout: expected microseconds >= 1, got -5"},
      {"/v2/models/small/infer",
       good.substr(0, good.size() - 1) + R"(,"parameters":{"priority":9}})", 400,
       "parameters.priority: expected 0 (the model's default level) to 2 (1 the highest), got 9"},
      {"/v2/models/small/infer",
       good.substr(0, good.size() - 1) + R"(,"parameters":{"sequence_id":4}})", 400,
       "parameters.sequence_id: not supported: the model is stateless"},
      {"/v2/models/small/nothing", "", 404, "no such endpoint"},
  };
  for (const Bad& b : bad) {
    const Reply r = send(port, bh::verb::post, b.target, "application/json", b.body);
    EXPECT_EQ(r.status, b.status) << b.target << " " << b.body << " -> " << r.body;
    EXPECT_EQ(r.content_type, "application/json") << r.body;
    const auto o = parse_object(r.body);
    ASSERT_TRUE(o.contains("error")) << r.body;
    EXPECT_NE(std::string(o.at("error").as_string()).find(b.says), std::string::npos)
        << "wanted: " << b.says << "\ngot: " << r.body;
  }
  if (GetParam() == Mode::kPerOp) return;  // the rest needs a queue
  // Per-request control: a priority and a timeout within reach are served.
  const Reply ok =
      send(port, bh::verb::post, "/v2/models/small/infer", "application/json",
           good.substr(0, good.size() - 1) + R"(,"parameters":{"priority":1,"timeout":10000000}})");
  EXPECT_EQ(ok.status, 200u) << ok.body;
  EXPECT_EQ(send(port, bh::verb::get, "/v2/models/small/infer", "", "").status, 405u);
}

// /metrics in the Prometheus text format: every line a comment or a sample, each family typed
// before its samples, histogram buckets cumulative with +Inf equal to _count, and the counts
// following the requests made.
TEST(HttpServer, MetricsAreValidPrometheusText) {
  const Model model = small_model();
  Server server(model, {.threads = 2}, {.mode = Mode::kStacked, .name = "small"});
  const at::Tensor x = at::randn({1, kWidth});
  for (int i = 0; i < 5; ++i)
    ASSERT_EQ(send(server.port(), bh::verb::post, "/v2/models/small/infer", "application/json",
                   oip_infer(x, false))
                  .status,
              200u);
  ASSERT_EQ(post(server.port(), "application/json", "[1,2]").status, 400u);
  // The worker counts a batch just after completing it: the counts may trail the last reply.
  Reply r;
  for (int i = 0; i < 5000; ++i) {
    r = send(server.port(), bh::verb::get, "/metrics", "", "");
    if (r.body.find("syncbatch_batch_size_sum{model=\"small\"} 5") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_EQ(r.status, 200u);
  EXPECT_EQ(r.content_type.rfind("text/plain; version=0.0.4", 0), 0u) << r.content_type;
  const std::regex sample(R"(^([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\} (-?[0-9.eE+-]+|\+Inf|NaN)$)");
  std::map<std::string, std::string> types;
  std::map<std::string, double> values;  // name{labels} -> value
  std::istringstream lines(r.body);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("# HELP ", 0) == 0) continue;
    if (line.rfind("# TYPE ", 0) == 0) {
      std::istringstream t(line.substr(7));
      std::string name, type;
      t >> name >> type;
      EXPECT_TRUE(type == "counter" || type == "gauge" || type == "histogram" || type == "summary")
          << line;
      types[name] = type;
      continue;
    }
    std::smatch m;
    ASSERT_TRUE(std::regex_match(line, m, sample)) << "not a sample: " << line;
    const std::string name = m[1];
    std::string family = name;
    for (const char* suffix : {"_bucket", "_sum", "_count"})
      if (!types.count(family) && family.size() > std::strlen(suffix) && family.ends_with(suffix))
        family = family.substr(0, family.size() - std::strlen(suffix));
    EXPECT_TRUE(types.count(family)) << "untyped family: " << line;
    EXPECT_NE(std::string(m[2]).find("model=\"small\""), std::string::npos) << line;
    values[name + "{" + std::string(m[2]) + "}"] = std::stod(m[3]);
  }
  EXPECT_EQ(types["syncbatch_requests_total"], "counter");
  EXPECT_EQ((values["syncbatch_requests_total{model=\"small\",code=\"200\"}"]), 5);
  EXPECT_EQ((values["syncbatch_requests_total{model=\"small\",code=\"400\"}"]), 1);
  EXPECT_EQ(types["syncbatch_request_duration_seconds"], "histogram");
  double previous = 0;
  for (double le : Metrics::kDurationBounds) {
    char key[128];
    std::snprintf(key, sizeof key,
                  "syncbatch_request_duration_seconds_bucket{model=\"small\",le=\"%.9g\"}", le);
    ASSERT_TRUE(values.count(key)) << key;
    EXPECT_GE(values[key], previous) << key;
    previous = values[key];
  }
  EXPECT_EQ((values["syncbatch_request_duration_seconds_bucket{model=\"small\",le=\"+Inf\"}"]), 6);
  EXPECT_EQ((values["syncbatch_request_duration_seconds_count{model=\"small\"}"]), 6);
  EXPECT_EQ((values["syncbatch_submitted_total{model=\"small\"}"]), 5);
  EXPECT_EQ((values["syncbatch_batch_size_bucket{model=\"small\",le=\"+Inf\"}"]),
            (values["syncbatch_batch_size_count{model=\"small\"}"]));
  EXPECT_EQ((values["syncbatch_batch_size_sum{model=\"small\"}"]), 5);
  EXPECT_EQ((values["syncbatch_requests_in_flight{model=\"small\"}"]), 0);
  EXPECT_EQ(types["syncbatch_worker_seconds_total"], "counter");
  for (const char* phase : {"run", "sync", "complete"})
    EXPECT_EQ(values.count("syncbatch_worker_seconds_total{model=\"small\",phase=\"" +
                           std::string(phase) + "\"}"),
              1u)
        << phase;
  EXPECT_GT((values["syncbatch_worker_seconds_total{model=\"small\",phase=\"run\"}"]), 0);
}

// SIGTERM: the server stops accepting, answers every request it had read (here 8 held in a
// forming batch by a 300 ms TimeBased policy), and exits 0.
TEST(HttpServer, SigtermDrainsAndExitsZero) {
  int out[2];
  ASSERT_EQ(pipe(out), 0);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    dup2(out[1], STDOUT_FILENO);
    close(out[0]);
    close(out[1]);
    execl(SYNCBATCH_HTTP_SERVER_BIN, "http_server", "--port", "0", "--model", "mlp:2x8", "--device",
          "cpu", "--name", "m", "--policy", "time:300ms:64", nullptr);
    _exit(127);
  }
  close(out[1]);
  // Killed and reaped if the test ends before it does (an ASSERT below failing).
  struct Child {
    pid_t pid;
    bool reaped = false;
    ~Child() {
      if (reaped) return;
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  } child{pid};
  // "threads: ...", then "listening on http://127.0.0.1:PORT (...)"
  std::string line;
  for (char c = 0; line.rfind("listening on", 0) != 0;) {
    line.clear();
    while (read(out[0], &c, 1) == 1 && c != '\n') line += c;
    if (c != '\n') break;  // the output ended
  }
  const auto colon = line.rfind(':', line.find(" ("));
  ASSERT_NE(colon, std::string::npos) << line;
  const auto port = static_cast<unsigned short>(std::stoi(line.substr(colon + 1)));
  std::vector<std::thread> clients;
  std::atomic<int> ok{0};
  for (int i = 0; i < 8; ++i)
    clients.emplace_back([&] {
      try {  // a connection closed without an answer throws: counted as not answered
        if (send(port, bh::verb::post, "/v2/models/m/infer", "application/json",
                 oip_infer(at::ones({1, kWidth}), false))
                .status == 200)
          ok.fetch_add(1);
      } catch (const std::exception&) {  // NOLINT(bugprone-empty-catch)
      }
    });
  for (int i = 0; i < 2000; ++i) {  // until all 8 wait in the forming batch
    const std::string m = send(port, bh::verb::get, "/metrics", "", "").body;
    if (m.find("syncbatch_requests_in_flight{model=\"m\"} 8") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_EQ(kill(pid, SIGTERM), 0);
  for (auto& t : clients) t.join();
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  child.reaped = true;
  close(out[0]);
  EXPECT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_EQ(ok.load(), 8);
  std::printf("SIGTERM drain: %d of 8 requests answered 200, exit status %d\n", ok.load(),
              WEXITSTATUS(status));
  // Nothing listens any more.
  boost::asio::io_context ioc;
  tcp::socket s(ioc);
  boost::system::error_code ec;
  s.connect(tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), port), ec);
  EXPECT_TRUE(ec) << "the port still accepts";
}

TEST(HttpServer, ModelSpecErrorsNameTheExpectedForms) {
  try {
    load_model("mlp:3", 0, c10::Device(c10::kCPU));
    FAIL() << "expected an error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("expected mlp:LAYERSxWIDTH"), std::string::npos);
  }
  EXPECT_THROW(load_model("model.pt", 0, c10::Device(c10::kCPU)), std::invalid_argument);
  EXPECT_THROW(load_model("/nonexistent/model.pt", 4, c10::Device(c10::kCPU)), syncbatch::Error);
  EXPECT_THROW(parse_mode("batched"), std::invalid_argument);
  const Model mlp = load_model("mlp:2x16", 0, c10::Device(c10::kCPU));
  EXPECT_EQ(mlp.inputs.at(0).shape, std::vector<int64_t>{16});
  EXPECT_EQ(run(mlp, at::ones({3, 16})).sizes(), (std::vector<int64_t>{3, 16}));
}

}  // namespace
}  // namespace syncbatch::http
