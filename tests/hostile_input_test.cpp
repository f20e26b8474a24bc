// The HTTP server under hostile input, over real sockets: what a client can make the server
// hold or compute is bounded by a stated limit, a client's mistake is never a 500, framing
// follows RFC 9112, and every answer is valid in its own format. Each case sends the bytes an
// attacker (or a careless client) would, then checks the status, the body, and that the server
// still serves.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <zlib.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>
#include <boost/json.hpp>

#include "server.hpp"
#include "text.hpp"

namespace syncbatch::http {
namespace {

using tcp = boost::asio::ip::tcp;

struct RawReply {
  int status = 0;
  std::multimap<std::string, std::string> fields;  // names in lower case
  std::string body;
  std::string field(const std::string& name) const {
    const auto it = fields.find(name);
    return it == fields.end() ? "" : it->second;
  }
};

// One connection that sends bytes as they are and reads answers as they come.
class RawConnection {
 public:
  explicit RawConnection(unsigned short port) : socket_(ioc_) {
    socket_.connect(tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), port));
    timeval tv{10, 0};  // a read that waits longer fails the test rather than hanging it
    ::setsockopt(socket_.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  }

  // Whether all of `bytes` went out (false once the server has closed).
  bool send(std::string_view bytes) {
    boost::system::error_code ec;
    boost::asio::write(socket_, boost::asio::buffer(bytes.data(), bytes.size()), ec);
    return !ec;
  }

  // The next answer (a HEAD's has no body whatever its Content-Length); none if the connection
  // ends first.
  std::optional<RawReply> read(bool head = false) {
    std::size_t end;
    while ((end = buffer_.find("\r\n\r\n")) == std::string::npos)
      if (!fill()) return std::nullopt;
    RawReply r;
    const std::string top = buffer_.substr(0, end);
    buffer_.erase(0, end + 4);
    std::size_t line_end = top.find("\r\n");
    const std::string status_line = top.substr(0, line_end);
    if (status_line.size() < 12) return std::nullopt;
    r.status = std::stoi(status_line.substr(9, 3));
    while (line_end != std::string::npos) {
      const std::size_t start = line_end + 2;
      line_end = top.find("\r\n", start);
      const std::string line = top.substr(start, line_end - start);
      const std::size_t colon = line.find(':');
      std::string name = line.substr(0, colon);
      for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      std::string value = line.substr(colon + 1);
      value.erase(0, value.find_first_not_of(' '));
      r.fields.emplace(name, value);
    }
    const std::string length = r.field("content-length");
    const std::size_t n = head || length.empty() ? 0 : std::stoul(length);
    while (buffer_.size() < n)
      if (!fill()) return std::nullopt;
    r.body = buffer_.substr(0, n);
    buffer_.erase(0, n);
    return r;
  }

  // Whether the server closed the connection (a read ends, with no more bytes).
  bool closed() {
    buffer_.clear();
    return !fill() && buffer_.empty();
  }

 private:
  bool fill() {
    char chunk[16384];
    boost::system::error_code ec;
    const std::size_t n = socket_.read_some(boost::asio::buffer(chunk), ec);
    buffer_.append(chunk, n);
    return !ec && n > 0;
  }

  boost::asio::io_context ioc_;
  tcp::socket socket_;
  std::string buffer_;
};

// One request on a fresh connection, its answer.
RawReply round_trip(unsigned short port, const std::string& request, bool head = false) {
  RawConnection c(port);
  EXPECT_TRUE(c.send(request));
  const auto r = c.read(head);
  EXPECT_TRUE(r.has_value()) << request.substr(0, 200);
  return r.value_or(RawReply{});
}

std::string post(const std::string& target, const std::string& body,
                 const std::string& content_type = "application/json",
                 const std::string& extra = "") {
  return "POST " + target + " HTTP/1.1\r\nHost: localhost\r\nContent-Type: " + content_type +
         "\r\nContent-Length: " + std::to_string(body.size()) + "\r\n" + extra + "\r\n" + body;
}

std::string get(const std::string& target, const std::string& method = "GET") {
  return method + " " + target + " HTTP/1.1\r\nHost: localhost\r\n\r\n";
}

// The answer's body is valid in its content type: JSON that parses, or UTF-8 text.
void expect_valid_body(const RawReply& r) {
  EXPECT_TRUE(is_utf8(r.body)) << r.body;
  if (r.field("content-type") == "application/json") {
    boost::system::error_code ec;
    boost::json::parse(r.body, ec);
    EXPECT_FALSE(ec) << "not JSON: " << r.body;
  }
}

std::size_t rss_bytes() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind("VmRSS:", 0) == 0) return std::stoul(line.substr(6)) * 1024;
  return 0;
}

constexpr int64_t kWidth = 4;

Model small_model() {
  return {[](const at::Tensor& x) { return x * 2; }, kWidth, "double"};
}

const std::string kInfer = R"({"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],)"
                           R"("data":[1,2,3,4]}]})";

void expect_serving(unsigned short port) {
  const RawReply r = round_trip(port, post("/v2/models/model/infer", kInfer));
  EXPECT_EQ(r.status, 200) << r.body;
}

// Defect 1: a chunk-size line with an endless extension, or an endless trailer section, was
// buffered without limit (1 GiB in 12 s on one connection). Now the connection's read buffer
// is bounded (max_header_bytes + 64 KiB = 80 KiB): the server answers 400 and closes, and its
// memory stays flat however much is sent.
TEST(HostileInput, EndlessChunkExtensionsAndTrailersAreCutOffAndMemoryStaysFlat) {
  Server server(small_model(), {.threads = 2, .max_header_bytes = 16 * 1024});
  const unsigned short port = server.port();
  const std::string head =
      "POST /v2/models/model/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
      "application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
  const std::string filler(64 * 1024, 'a');
  for (const std::string& start : {head + "1;", head + "0\r\nX-Trailer: "}) {
    const std::size_t before = rss_bytes();
    RawConnection c(port);
    std::size_t sent = 0;
    bool open = c.send(start);
    while (open && sent < (std::size_t{64} << 20)) {
      open = c.send(filler);
      if (open) sent += filler.size();
    }
    const std::size_t after = rss_bytes();
    EXPECT_LT(sent, std::size_t{64} << 20) << "the server read 64 MiB of one chunk line";
    EXPECT_LT(after, before + (std::size_t{24} << 20))
        << "RSS grew from " << before << " to " << after << " bytes";
  }
  // Just over the bound, with nothing more coming: the answer says what was expected.
  for (const std::string& start : {head + "1;", head + "0\r\nX-Trailer: "}) {
    RawConnection c(port);
    ASSERT_TRUE(c.send(start + std::string(100 * 1024, 'a')));
    const auto r = c.read();
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->status, 400);
    EXPECT_NE(r->body.find("chunk-size line (with its extensions) or a trailer section of at "
                           "most 81920 bytes"),
              std::string::npos)
        << r->body;
    EXPECT_EQ(r->field("connection"), "close");
    EXPECT_TRUE(c.closed());
  }
  // A header over its limit is 431.
  const RawReply big =
      round_trip(port, "GET /v2 HTTP/1.1\r\nHost: localhost\r\nX-Big: " + std::string(20000, 'b') +
                           "\r\n\r\n");
  EXPECT_EQ(big.status, 431) << big.body;
  EXPECT_NE(big.body.find("at most 16384 bytes"), std::string::npos) << big.body;
  expect_serving(port);
}

// Defect 2: HEAD was answered 404/405 with a body, which a kept-alive client (a proxy's pool)
// reads as the start of the next answer. HEAD is answered as GET is, without the body.
TEST(HostileInput, HeadIsAnsweredWithoutABodyAndTheConnectionStaysInStep) {
  Server server(small_model(), {.threads = 2});
  RawConnection c(server.port());
  const auto full = [&](const std::string& target) {
    EXPECT_TRUE(c.send(get(target)));
    return c.read().value_or(RawReply{});
  };
  const auto head = [&](const std::string& target) {
    EXPECT_TRUE(c.send(get(target, "HEAD")));
    return c.read(/*head=*/true).value_or(RawReply{});
  };
  for (const std::string& target :
       std::vector<std::string>{"/v2", "/v2/models/model", "/v2/health/live", "/metrics",
                                "/nowhere", "/v2/models/none", "/v2/models/model/infer"}) {
    const RawReply h = head(target);
    const RawReply g = full(target);
    EXPECT_EQ(h.body, "");
    if (target.ends_with("/infer")) {
      EXPECT_EQ(h.status, 405);
      EXPECT_EQ(h.field("allow"), "POST");
      continue;
    }
    EXPECT_EQ(h.status, g.status) << target;
    if (target != "/metrics") {  // its counters move between the two
      EXPECT_EQ(h.field("content-length"), std::to_string(g.body.size())) << target;
    }
  }
  // The connection is still in step: the next answer is the next request's.
  EXPECT_TRUE(c.send(post("/v2/models/model/infer", kInfer)));
  const auto r = c.read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 200) << r->body;
  EXPECT_NE(r->body.find("[2,4,6,8]"), std::string::npos) << r->body;
}

// A model of one INT64 input whose second dim varies (token ids), answering each row's sum, that
// records the elements of every forward it is given.
struct RecordingModel {
  std::shared_ptr<std::mutex> mu = std::make_shared<std::mutex>();
  std::shared_ptr<std::vector<int64_t>> forwards = std::make_shared<std::vector<int64_t>>();

  ServedModel served(ModelOptions options) const {
    auto mu_ = mu;
    auto forwards_ = forwards;
    Model model(
        [mu_, forwards_](const std::vector<at::Tensor>& x) {
          {
            std::lock_guard lock(*mu_);
            forwards_->push_back(x.at(0).numel());
          }
          return std::vector<at::Tensor>{x.at(0).sum(1)};
        },
        {TensorSpec{"ids", at::kLong, {-1}}}, {TensorSpec{"sum", at::kLong, {}}}, "sums");
    return {std::move(model), std::move(options)};
  }
  int64_t largest() const {
    std::lock_guard lock(*mu);
    return forwards->empty() ? 0 : *std::max_element(forwards->begin(), forwards->end());
  }
};

std::string ids_request(int64_t rows, int64_t length, int value) {
  std::string data;
  for (int64_t i = 0; i < rows * length; ++i) {
    if (i > 0) data += ',';
    data += std::to_string(value);
  }
  return R"({"inputs":[{"name":"ids","datatype":"INT64","shape":[)" + std::to_string(rows) + "," +
         std::to_string(length) + R"(],"data":[)" + data + "]}]}";
}

// Defect 3: stacked mode padded the varying dim to the longest of the batch, so one [255, 1]
// and one [1, 65536] request (516 KiB on the wire) became one [256, 65536] forward. Now no
// forward's padding passes max_padding (0.75 by default: at most 4x what its requests brought).
TEST(HostileInput, ABatchNeverPadsFarBeyondWhatItsRequestsBrought) {
  const RecordingModel recording;
  std::vector<ServedModel> models;
  // A hold of 200 ms, so that the two requests share a batch.
  models.push_back(recording.served(
      {.policy = SyncPolicy::parse("time:200ms:512"), .device = c10::Device(c10::kCPU)}));
  Server server(std::move(models), {.threads = 2, .max_body_bytes = 4 << 20});
  const unsigned short port = server.port();
  RawReply wide, tall;
  std::thread a(
      [&] { wide = round_trip(port, post("/v2/models/model/infer", ids_request(1, 65536, 1))); });
  std::thread b(
      [&] { tall = round_trip(port, post("/v2/models/model/infer", ids_request(255, 1, 3))); });
  a.join();
  b.join();
  ASSERT_EQ(wide.status, 200) << wide.body.substr(0, 200);
  ASSERT_EQ(tall.status, 200) << tall.body.substr(0, 200);
  EXPECT_NE(wide.body.find(R"("data":[65536])"), std::string::npos) << wide.body;
  EXPECT_NE(tall.body.find(R"("shape":[255],"data":[3,3,3)"), std::string::npos) << tall.body;
  EXPECT_LE(recording.largest(), 4 * (65536 + 255)) << "a forward padded past 4x its requests";
}

// Defects 4, 6 and part of 7: sizes that overflow, timeouts past the clock, and non-UTF-8 text
// in a request: each a clear 4xx (or, for the timeout, a request that runs) in valid JSON.
TEST(HostileInput, OverflowingShapesHugeTimeoutsAndRawBytesGetValidAnswers) {
  const RecordingModel recording;
  std::vector<ServedModel> models;
  models.push_back(recording.served({.device = c10::Device(c10::kCPU)}));
  Server server(std::move(models), {.threads = 2});
  const unsigned short port = server.port();
  // [16, 2^60] wraps to 0 when multiplied in 64 bits.
  for (const std::string& shape :
       std::vector<std::string>{"[16,1152921504606846976]", "[2,9223372036854775807]"}) {
    const RawReply r = round_trip(
        port,
        post("/v2/models/model/infer", R"({"inputs":[{"name":"ids","datatype":"INT64","shape":)" +
                                           shape + R"(,"data":[1,2]}]})"));
    EXPECT_EQ(r.status, 400) << r.body;
    EXPECT_NE(r.body.find("needs more values than the body"), std::string::npos) << r.body;
    expect_valid_body(r);
  }
  for (const std::string& timeout : std::vector<std::string>{
           "9223372036854775807", "10000000000000000", "18446744073709551615"}) {
    const std::string body = R"({"inputs":[{"name":"ids","datatype":"INT64","shape":[1,2],)"
                             R"("data":[1,2]}],"parameters":{"timeout":)" +
                             timeout + "}}";
    const RawReply r = round_trip(port, post("/v2/models/model/infer", body));
    EXPECT_EQ(r.status, 200) << timeout << ": " << r.body;
  }
  // Raw bytes in the target, and a quote that would be cut inside a character.
  for (const std::string& target : std::vector<std::string>{
           "/v2/models/\xff\xfe/ready", "/v2/models/model/\xc3", "/\xe2\x82", "/v2/x\x01y"}) {
    const RawReply r = round_trip(port, get(target));
    // (A control character is not allowed in a target at all: Beast's parser refuses it.)
    EXPECT_EQ(r.status, target.find('\x01') == std::string::npos ? 404 : 400) << target;
    expect_valid_body(r);
  }
  const std::string name(200, 'x');
  std::string accented;
  for (int i = 0; i < 60; ++i) accented += "\xc3\xa9";  // é: two bytes each
  for (const std::string& bad_name : {accented, "x" + accented}) {
    const RawReply r = round_trip(
        port,
        post("/v2/models/model/infer", R"({"inputs":[{"name":")" + bad_name +
                                           R"(","datatype":"INT64","shape":[1,1],"data":[1]}]})"));
    EXPECT_EQ(r.status, 400) << r.body;
    expect_valid_body(r);
  }
  const RawReply ok = round_trip(port, post("/v2/models/model/infer", ids_request(2, 3, 5)));
  EXPECT_EQ(ok.status, 200) << ok.body;
  EXPECT_NE(ok.body.find(R"("data":[15,15])"), std::string::npos) << ok.body;
}

// Defect 5: a model's exception reached the client whole: a 3.9 KB body with LibTorch's
// backtrace and library load addresses. Now the client gets the model, the request and the
// error's first line; the whole text goes to the server's log.
TEST(HostileInput, AModelsFailureIsAShortMessageWithoutInternals) {
  const Model failing{[](const at::Tensor& x) -> at::Tensor {
                        TORCH_CHECK(x.sum().item<float>() < 100, "the sum is too large");
                        return x;
                      },
                      kWidth, "failing"};
  for (const Mode mode : {Mode::kPerOp, Mode::kStacked}) {
    Server server(failing, {.threads = 2}, {.mode = mode, .name = "judge"});
    const std::string big = R"(","inputs":[{"name":"input","datatype":"FP32","shape":[1,4],)"
                            R"("data":[100,200,300,400]}]})";
    const RawReply r =
        round_trip(server.port(), post("/v2/models/judge/infer", R"({"id":"r-1)" + big));
    EXPECT_EQ(r.status, 500) << r.body;
    expect_valid_body(r);
    EXPECT_LT(r.body.size(), 400u) << r.body;
    EXPECT_NE(r.body.find("model 'judge': inference failed for request 'r-1': the sum is too "
                          "large"),
              std::string::npos)
        << r.body;
    for (const char* internal : {"Exception raised from", "frame #", ".so", "0x"})
      EXPECT_EQ(r.body.find(internal), std::string::npos) << internal << " in " << r.body;
    // /v1 likewise, in text.
    const RawReply v1 = round_trip(server.port(), post("/v1/infer", "[100,200,300,400]"));
    EXPECT_EQ(v1.status, 500) << v1.body;
    EXPECT_NE(v1.body.find("the sum is too large"), std::string::npos) << v1.body;
    EXPECT_EQ(v1.body.find("Exception raised from"), std::string::npos) << v1.body;
    expect_valid_body(v1);
  }
}

// Defect 8: RFC 9112 framing, Expect, media types and the binary extension's header, each as a
// client could send it.
TEST(HostileInput, FramingFollowsRfc9112) {
  Server server(small_model(), {.threads = 2});
  const unsigned short port = server.port();
  struct Case {
    const char* what;
    std::string request;
    int status;
    const char* says;
  };
  const std::string body = R"([1,2,3,4])";
  const std::string json = "Content-Type: application/json\r\n";
  const std::vector<Case> refused{
      {"no Host in HTTP/1.1", "GET /v2 HTTP/1.1\r\n\r\n", 400, "Host: expected exactly one"},
      {"two Hosts", "GET /v2 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "got 2"},
      {"an empty Transfer-Encoding beside Content-Length",
       "POST /v1/infer HTTP/1.1\r\nHost: a\r\n" + json +
           "Transfer-Encoding: \r\nContent-Length: 9\r\n\r\n" + body,
       400, "got both"},
      {"chunked and Content-Length",
       "POST /v1/infer HTTP/1.1\r\nHost: a\r\n" + json +
           "Transfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n9\r\n" + body + "\r\n0\r\n\r\n",
       400, "malformed HTTP request"},  // Beast's own refusal
      {"chunked in HTTP/1.0",
       "POST /v1/infer HTTP/1.0\r\nConnection: keep-alive\r\n" + json +
           "Transfer-Encoding: chunked\r\n\r\n9\r\n" + body + "\r\n0\r\n\r\n",
       400, "expected none in HTTP/1.0"},
      {"chunked twice",
       "POST /v1/infer HTTP/1.1\r\nHost: a\r\n" + json +
           "Transfer-Encoding: chunked, chunked\r\n\r\n9\r\n" + body + "\r\n0\r\n\r\n",
       400, "expected chunked once"},
      {"another expectation", post("/v1/infer", body, "application/json", "Expect: 200-ok\r\n"),
       417, "expected 100-continue"},
  };
  for (const Case& c : refused) {
    RawConnection conn(port);
    ASSERT_TRUE(conn.send(c.request)) << c.what;
    const auto r = conn.read();
    ASSERT_TRUE(r.has_value()) << c.what;
    EXPECT_EQ(r->status, c.status) << c.what << ": " << r->body;
    EXPECT_NE(r->body.find(c.says), std::string::npos) << c.what << ": " << r->body;
    if (c.request.find("HTTP/1.0") == std::string::npos) {  // (1.0 closes by default)
      EXPECT_EQ(r->field("connection"), "close") << c.what;
    }
    EXPECT_TRUE(conn.closed()) << c.what << ": the connection stayed open";
    expect_valid_body(*r);
  }

  // Expect: 100-continue: the server says go before the client sends its body.
  {
    RawConnection conn(port);
    const std::string request =
        post("/v1/infer", body, "application/json", "Expect: 100-continue\r\n");
    const std::size_t split = request.find("\r\n\r\n") + 4;
    ASSERT_TRUE(conn.send(request.substr(0, split)));
    const auto go = conn.read();
    ASSERT_TRUE(go.has_value());
    EXPECT_EQ(go->status, 100);
    ASSERT_TRUE(conn.send(request.substr(split)));
    const auto r = conn.read();
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->status, 200) << r->body;
    EXPECT_EQ(r->body, "[2,4,6,8]");
  }

  // Media types are case-insensitive, with parameters and white space.
  for (const std::string& type : std::vector<std::string>{
           "Application/JSON", "application/json ; charset=utf-8", "APPLICATION/JSON;x=y"}) {
    const RawReply v2 = round_trip(port, post("/v2/models/model/infer", kInfer, type));
    EXPECT_EQ(v2.status, 200) << type << ": " << v2.body;
    const RawReply v1 = round_trip(port, post("/v1/infer", body, type));
    EXPECT_EQ(v1.status, 200) << type << ": " << v1.body;
  }

  // The binary extension's header length, given twice and differently, frames nothing.
  const std::string header = R"({"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],)"
                             R"("parameters":{"binary_data_size":16}}]})";
  const float values[4] = {1, 2, 3, 4};
  const std::string binary = header + std::string(reinterpret_cast<const char*>(values), 16);
  const RawReply twice = round_trip(
      port, post("/v2/models/model/infer", binary, "application/octet-stream",
                 "Inference-Header-Content-Length: " + std::to_string(header.size()) +
                     "\r\nInference-Header-Content-Length: " + std::to_string(header.size() + 4) +
                     "\r\n"));
  EXPECT_EQ(twice.status, 400) << twice.body;
  EXPECT_NE(twice.body.find("expected one length"), std::string::npos) << twice.body;
  const RawReply once = round_trip(
      port, post("/v2/models/model/infer", binary, "application/octet-stream",
                 "Inference-Header-Content-Length: " + std::to_string(header.size()) + "\r\n"));
  EXPECT_EQ(once.status, 200) << once.body;

  // The shape says how data nests: ragged or over-nested data is refused, even where the count
  // of values matches.
  for (const std::string& data :
       std::vector<std::string>{"[[1,2,3],[4]]", "[[[1,2]],[[3,4]]]", "[[1,2],3,4]", "[[1,2]]"}) {
    const RawReply r = round_trip(
        port, post("/v2/models/model/infer",
                   R"({"inputs":[{"name":"input","datatype":"FP32","shape":[2,2],"data":)" + data +
                       "}]}"));
    EXPECT_EQ(r.status, 400) << data << ": " << r.body;
    expect_valid_body(r);
  }
  expect_serving(port);
}

// Connections past max_connections wait in the kernel's backlog, unanswered, until one closes.
TEST(HostileInput, ConnectionsPastTheLimitWaitUntilOneCloses) {
  Server server(small_model(), {.threads = 2, .max_connections = 3});
  const unsigned short port = server.port();
  std::vector<std::unique_ptr<RawConnection>> held;
  for (int i = 0; i < 3; ++i) {
    held.push_back(std::make_unique<RawConnection>(port));
    ASSERT_TRUE(held.back()->send(get("/v2/health/live")));
    ASSERT_TRUE(held.back()->read(true).has_value());  // accepted and served
  }
  std::atomic<bool> answered{false};
  std::thread late([&] {
    RawConnection c(port);
    c.send(get("/v2/health/live"));
    answered = c.read().has_value();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_FALSE(answered.load()) << "a connection past the limit was served";
  held.pop_back();  // one closes: the late one is accepted
  late.join();
  EXPECT_TRUE(answered.load());
}

// Compressed bodies (Triton's request_compression_algorithm): gzip and deflate are decoded, the
// decoded size bounded by --max-body so that a small bomb cannot expand without limit; an
// unknown coding is 415 naming it; a client that accepts gzip gets large answers gzipped.
TEST(HostileInput, CompressedBodiesAreDecodedWithinTheBodyLimit) {
  Server server(small_model(), {.threads = 2, .max_body_bytes = 64 * 1024});
  const unsigned short port = server.port();
  const auto compress = [](const std::string& text, int window_bits) {
    z_stream z{};
    deflateInit2(&z, 9, Z_DEFLATED, window_bits, 8, Z_DEFAULT_STRATEGY);
    std::string out(deflateBound(&z, text.size()), '\0');
    z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(text.data()));
    z.avail_in = static_cast<uInt>(text.size());
    z.next_out = reinterpret_cast<Bytef*>(out.data());
    z.avail_out = static_cast<uInt>(out.size());
    deflate(&z, Z_FINISH);
    out.resize(out.size() - z.avail_out);
    deflateEnd(&z);
    return out;
  };
  for (const auto& [coding, bits] :
       std::vector<std::pair<std::string, int>>{{"gzip", 31}, {"deflate", 15}, {"deflate", -15}}) {
    const RawReply r =
        round_trip(port, post("/v2/models/model/infer", compress(kInfer, bits), "application/json",
                              "Content-Encoding: " + coding + "\r\n"));
    EXPECT_EQ(r.status, 200) << coding << " " << bits << ": " << r.body;
    EXPECT_NE(r.body.find("[2,4,6,8]"), std::string::npos) << r.body;
  }
  // 1 MiB of spaces compresses to about a kilobyte: decoded, it passes the 64 KiB limit.
  const std::string bomb = compress(kInfer + std::string(1 << 20, ' '), 31);
  ASSERT_LT(bomb.size(), 8192u);
  const RawReply big = round_trip(
      port, post("/v2/models/model/infer", bomb, "application/json", "Content-Encoding: gzip\r\n"));
  EXPECT_EQ(big.status, 413) << big.body;
  EXPECT_NE(big.body.find("at most 65536 bytes once decoded"), std::string::npos) << big.body;
  expect_valid_body(big);
  const RawReply br = round_trip(
      port, post("/v2/models/model/infer", kInfer, "application/json", "Content-Encoding: br\r\n"));
  EXPECT_EQ(br.status, 415) << br.body;
  EXPECT_NE(br.body.find("expected gzip, deflate or identity, got 'br'"), std::string::npos)
      << br.body;
  const RawReply broken = round_trip(port, post("/v2/models/model/infer", "not gzip at all",
                                                "application/json", "Content-Encoding: gzip\r\n"));
  EXPECT_EQ(broken.status, 400) << broken.body;
  expect_valid_body(broken);
  // A large answer (200 rows, 3 KB of JSON) to a client that accepts gzip comes gzipped; to one
  // that does not (or refuses it with q=0), plain.
  std::string rows;
  for (int r = 0; r < 200; ++r) rows += std::string(r ? "," : "") + "1.25,2.25,3.25,4.25";
  const std::string many =
      R"({"inputs":[{"name":"input","datatype":"FP32","shape":[200,4],"data":[)" + rows + "]}]}";
  const RawReply zipped = round_trip(port, post("/v2/models/model/infer", many, "application/json",
                                                "Accept-Encoding: deflate, gzip;q=0.8\r\n"));
  ASSERT_EQ(zipped.status, 200);
  EXPECT_EQ(zipped.field("content-encoding"), "gzip");
  z_stream z{};
  inflateInit2(&z, 31);
  std::string plain(1 << 16, '\0');
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(zipped.body.data()));
  z.avail_in = static_cast<uInt>(zipped.body.size());
  z.next_out = reinterpret_cast<Bytef*>(plain.data());
  z.avail_out = static_cast<uInt>(plain.size());
  EXPECT_EQ(inflate(&z, Z_FINISH), Z_STREAM_END);
  plain.resize(plain.size() - z.avail_out);
  inflateEnd(&z);
  EXPECT_NE(plain.find(R"("shape":[200,4],"data":[2.5,4.5,6.5,8.5,)"), std::string::npos) << plain;
  EXPECT_LT(zipped.body.size(), plain.size());
  for (const std::string accept :
       {"", "Accept-Encoding: gzip;q=0\r\n", "Accept-Encoding: br\r\n"}) {
    const RawReply r =
        round_trip(port, post("/v2/models/model/infer", many, "application/json", accept));
    EXPECT_EQ(r.field("content-encoding"), "") << accept;
    EXPECT_NE(r.body.find(R"("shape":[200,4])"), std::string::npos) << accept;
  }
}

}  // namespace
}  // namespace syncbatch::http
