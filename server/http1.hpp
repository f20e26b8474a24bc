// HTTP/1.1 request framing as the server reads it (RFC 9112): the limits a request parser gets,
// and the checks of a request's header that come before its body is read. No sockets: the
// transport (server.cpp) and the request-reader fuzz target (tests/fuzz) share these.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <boost/beast/core/error.hpp>
#include <boost/beast/core/string.hpp>
#include <boost/beast/http/field.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/rfc7230.hpp>

#include "protocol_error.hpp"
#include "text.hpp"

namespace syncbatch::http {

/// `content_type`'s media type, "type/subtype" in lower case, its parameters and the white
/// space around it dropped (RFC 9110 8.3.1: "Application/JSON ; charset=utf-8" is
/// "application/json").
std::string media_type(std::string_view content_type);

/// What one request may make the server read and hold.
struct RequestLimits {
  /// The request line and header fields together.
  std::size_t max_header_bytes = 16 * 1024;
  /// The body as it comes (a chunked body: its data, without the framing).
  std::size_t max_body_bytes = 1 << 20;
  /// The most a connection's read buffer holds: a header and the room for reading a large
  /// body in 64 KiB steps. Each chunk-size line (with its extensions) and a chunked body's
  /// trailer section must fit in it whole.
  std::size_t read_buffer_bytes() const { return max_header_bytes + 64 * 1024; }
};

/// Sets `parser`'s limits on the header and the body (Beast's errors header_limit and
/// body_limit). A chunk-size line and a trailer section are bounded by the read buffer the
/// transport gives the parser (read_buffer_bytes(): Beast's buffer_overflow past it).
template <class Parser>
void set_limits(Parser& parser, const RequestLimits& limits) {
  parser.header_limit(static_cast<std::uint32_t>(limits.max_header_bytes));
  parser.body_limit(limits.max_body_bytes);
}

/// A request body of Content-Encoding `coding` (gzip, deflate, identity, or a list of them, in
/// the order they were applied), decoded, at most `max_bytes` of it: a small compressed body
/// cannot make the server hold more than an uncompressed one may. Errors: ProtocolError 415
/// naming a coding this server does not decode, 413 for a decoded body over `max_bytes`, 400 for
/// data that is not what its coding says.
std::string decode_content(std::string_view coding, std::string_view body, std::size_t max_bytes);

/// Answers of at least this many bytes are compressed for a client that accepts gzip.
inline constexpr std::size_t kCompressFrom = 1024;

/// Whether an Accept-Encoding field value accepts gzip (listed, or "*", with a q above 0).
bool accepts_gzip(std::string_view accept_encoding);

/// `body` compressed as gzip (zlib's fastest level: an answer's time matters more than its
/// bytes on a server's network).
std::string gzip(std::string_view body);

/// What a failed read of a request is answered with (then the connection closes): 413 a body
/// over the limit, 431 a header over it, 400 a chunk-size line or trailer over the read buffer,
/// or malformed HTTP; none where the client is gone (end of stream, reset, cancelled).
std::optional<ProtocolError> read_error(const boost::system::error_code& ec,
                                        const RequestLimits& limits);

/// What a request's header asks of the transport before its body is read.
struct HeaderCheck {
  /// Answer this and close the connection: the request's framing cannot be trusted (RFC 9112),
  /// or it asks for what this server does not do.
  std::optional<ProtocolError> refuse;
  /// `Expect: 100-continue` on a request with a body: write "100 Continue" before reading it.
  bool send_continue = false;
};

/// The checks of RFC 9112 on a request's header that Beast's parser leaves to the server:
/// - Host: HTTP/1.1 needs exactly one, HTTP/1.0 at most one (3.2): 400.
/// - Transfer-Encoding: chunked alone is decoded; another coding is 501, an empty or repeated
///   one 400; with Content-Length beside it (6.1, a smuggling vector) or in HTTP/1.0 (6.1: the
///   framing is faulty) 400.
/// - Expect: 100-continue is answered before the body (send_continue); another expectation 417
///   (RFC 9110 10.1.1).
template <class Fields>
HeaderCheck check_header(const boost::beast::http::request_header<Fields>& h, bool has_body) {
  namespace bh = boost::beast::http;
  HeaderCheck out;
  const auto refuse = [&](int status, std::string message) {
    out.refuse = ProtocolError{status, std::move(message)};
    return out;
  };
  const auto hosts = h.count(bh::field::host);
  if (h.version() >= 11 ? hosts != 1 : hosts > 1)
    return refuse(400, "Host: expected exactly one field" +
                           std::string(h.version() >= 11 ? "" : " at most") + " in HTTP/" +
                           (h.version() >= 11 ? "1.1" : "1.0") + ", got " + std::to_string(hosts));
  const auto te = h.equal_range(bh::field::transfer_encoding);
  if (te.first != te.second) {
    if (h.version() < 11)
      return refuse(400, "Transfer-Encoding: expected none in HTTP/1.0 (RFC 9112 6.1), got '" +
                             excerpt(te.first->value()) + "'");
    if (h.count(bh::field::content_length) > 0)
      return refuse(400, "expected Content-Length or Transfer-Encoding, got both (RFC 9112 6.1)");
    int chunked = 0, codings = 0;
    for (auto it = te.first; it != te.second; ++it)
      for (const auto token : bh::token_list(it->value())) {
        ++codings;
        if (!boost::beast::iequals(token, "chunked"))
          return refuse(501, "Transfer-Encoding: expected chunked alone, got '" + excerpt(token) +
                                 "', which this server does not decode");
        ++chunked;
      }
    if (codings == 0 || chunked > 1)
      return refuse(400, "Transfer-Encoding: expected chunked once, got '" +
                             excerpt(te.first->value()) + "'");
  }
  const auto expect = h.find(bh::field::expect);
  if (expect != h.end()) {
    if (!boost::beast::iequals(expect->value(), "100-continue"))
      return refuse(417, "Expect: expected 100-continue, got '" + excerpt(expect->value()) + "'");
    out.send_continue = has_body && h.version() >= 11;
  }
  return out;
}

}  // namespace syncbatch::http
