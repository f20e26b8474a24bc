// libFuzzer target: the HTTP/1.1 request reader as the server runs it (http1.hpp): Beast's
// request parser with the server's limits, over a read buffer bounded as the server's is, the
// header checks of RFC 9112 before the body, then the body, and a Content-Encoding decoded as
// the protocol decodes it; each failure as the transport maps it. Properties beyond "no crash, no
// sanitizer report": every refusal is a 4xx or 5xx whose message is valid UTF-8, and the read
// buffer never holds more than its bound.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include <boost/beast/_experimental/test/stream.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>

#include "http1.hpp"
#include "text.hpp"

namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace bh = boost::beast::http;
using syncbatch::http::ProtocolError;

void check(const ProtocolError& e) {
  if (e.status < 400 || e.status > 599) std::abort();
  // A message that is not UTF-8 would make an invalid answer.
  if (!syncbatch::http::is_utf8(e.message)) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // Small limits, so that the fuzzer reaches them.
  const syncbatch::http::RequestLimits limits{.max_header_bytes = 1024, .max_body_bytes = 4096};
  net::io_context ioc;
  beast::test::stream stream(ioc);
  stream.append(std::string_view(reinterpret_cast<const char*>(data), size));
  stream.close_remote();
  beast::flat_buffer buffer(limits.read_buffer_bytes());
  // Several requests, pipelined, as one connection would read them.
  for (int request = 0; request < 8; ++request) {
    bh::request_parser<bh::string_body> parser;
    syncbatch::http::set_limits(parser, limits);
    boost::system::error_code ec;
    bh::read_header(stream, buffer, parser, ec);
    if (!ec) {
      const auto h = syncbatch::http::check_header(
          parser.get(), parser.chunked() || parser.content_length().value_or(0) > 0);
      if (h.refuse) {
        check(*h.refuse);
        break;
      }
      bh::read(stream, buffer, parser, ec);
    }
    if (buffer.size() > limits.read_buffer_bytes()) std::abort();
    if (ec) {
      if (const auto e = syncbatch::http::read_error(ec, limits)) check(*e);
      break;
    }
    const auto& req = parser.get();
    (void)syncbatch::http::media_type(req[bh::field::content_type]);
    (void)syncbatch::http::accepts_gzip(req[bh::field::accept_encoding]);
    if (const auto coding = req[bh::field::content_encoding]; !coding.empty()) {
      try {  // a body decoded as the protocol decodes it: never past the limit
        const std::string body = syncbatch::http::decode_content(
            std::string_view(coding.data(), coding.size()), req.body(), limits.max_body_bytes);
        if (body.size() > limits.max_body_bytes) std::abort();
      } catch (const ProtocolError& e) {
        check(e);
      }
    }
    if (parser.get().body().size() > limits.max_body_bytes) std::abort();
    if (!parser.get().keep_alive()) break;
  }
  return 0;
}
