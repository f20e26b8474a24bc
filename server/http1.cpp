// HTTP/1.1 request framing. See http1.hpp.
#include "http1.hpp"

#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <vector>

#include <boost/asio/error.hpp>
#include <boost/beast/http/error.hpp>

namespace syncbatch::http {

std::string media_type(std::string_view content_type) {
  std::string_view t = content_type.substr(0, content_type.find(';'));
  while (!t.empty() && (t.front() == ' ' || t.front() == '\t')) t.remove_prefix(1);
  while (!t.empty() && (t.back() == ' ' || t.back() == '\t')) t.remove_suffix(1);
  std::string out(t);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

namespace {

// Inflates `in` (`window_bits` as zlib takes them: 15 + 32 detects gzip or zlib, -15 is raw
// deflate) into at most `max_bytes`; none where the data is not that format.
std::optional<std::string> inflate_bounded(std::string_view in, int window_bits,
                                           std::size_t max_bytes, const std::string& coding) {
  z_stream z{};
  if (inflateInit2(&z, window_bits) != Z_OK) throw std::bad_alloc();
  std::string out;
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
  z.avail_in = static_cast<uInt>(in.size());
  int rc = Z_OK;
  while (rc != Z_STREAM_END) {
    if (out.size() >= max_bytes + 1) break;
    const std::size_t have = out.size();
    out.resize(std::min(max_bytes + 1, std::max<std::size_t>(have * 2, 16 * 1024)));
    z.next_out = reinterpret_cast<Bytef*>(out.data() + have);
    z.avail_out = static_cast<uInt>(out.size() - have);
    rc = inflate(&z, Z_NO_FLUSH);
    out.resize(out.size() - z.avail_out);
    if (rc == Z_BUF_ERROR && z.avail_in == 0) break;  // the data ended early
    if (rc != Z_OK && rc != Z_STREAM_END && rc != Z_BUF_ERROR) {
      inflateEnd(&z);
      return std::nullopt;
    }
  }
  const bool complete = rc == Z_STREAM_END && z.avail_in == 0;
  inflateEnd(&z);
  if (out.size() > max_bytes)
    throw ProtocolError{413, "expected a body of at most " + std::to_string(max_bytes) +
                                 " bytes once decoded (" + coding + "), got more"};
  if (!complete) return std::nullopt;
  return out;
}

}  // namespace

std::string decode_content(std::string_view coding, std::string_view body, std::size_t max_bytes) {
  // Codings are listed in the order applied: undo the last first.
  std::vector<std::string> codings;
  for (const auto token : boost::beast::http::token_list(coding))
    codings.emplace_back(token.data(), token.size());
  std::string out(body);
  for (auto it = codings.rbegin(); it != codings.rend(); ++it) {
    std::string c = *it;
    for (char& ch : c) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    if (c == "identity") continue;
    if (c != "gzip" && c != "x-gzip" && c != "deflate")
      throw ProtocolError{
          415, "Content-Encoding: expected gzip, deflate or identity, got '" + excerpt(*it) + "'"};
    std::optional<std::string> decoded = inflate_bounded(out, 15 + 32, max_bytes, c);
    if (!decoded && c == "deflate")  // some clients send raw deflate, without zlib's wrapper
      decoded = inflate_bounded(out, -15, max_bytes, c);
    if (!decoded)
      throw bad_request("Content-Encoding: " + c + ": the body is not " + c +
                        " data, or it ends early");
    out = std::move(*decoded);
  }
  return out;
}

bool accepts_gzip(std::string_view accept_encoding) {
  for (const auto& [name, params] : boost::beast::http::ext_list(accept_encoding)) {
    const std::string_view n(name.data(), name.size());
    if (!boost::beast::iequals(n, "gzip") && n != "*") continue;
    bool refused = false;
    for (const auto& [key, value] : params)
      if (boost::beast::iequals(key, "q")) {
        const std::string q(value.data(), value.size());
        refused = std::strtod(q.c_str(), nullptr) <= 0;
      }
    return !refused;
  }
  return false;
}

std::string gzip(std::string_view body) {
  z_stream z{};
  // 15 + 16: a gzip wrapper; level 1, zlib's fastest.
  if (deflateInit2(&z, 1, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK)
    throw std::bad_alloc();
  std::string out(deflateBound(&z, static_cast<uLong>(body.size())), '\0');
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(body.data()));
  z.avail_in = static_cast<uInt>(body.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  const int rc = deflate(&z, Z_FINISH);
  out.resize(out.size() - z.avail_out);
  deflateEnd(&z);
  if (rc != Z_STREAM_END) throw std::runtime_error("gzip: deflate did not finish");
  return out;
}

std::optional<ProtocolError> read_error(const boost::system::error_code& ec,
                                        const RequestLimits& limits) {
  namespace bh = boost::beast::http;
  namespace net = boost::asio;
  if (ec == bh::error::end_of_stream || ec == net::error::eof ||
      ec == net::error::connection_reset || ec == net::error::operation_aborted)
    return std::nullopt;
  if (ec == bh::error::body_limit)
    return ProtocolError{
        413, "expected a body of at most " + std::to_string(limits.max_body_bytes) + " bytes"};
  if (ec == bh::error::header_limit)
    return ProtocolError{431, "expected a request line and header fields of at most " +
                                  std::to_string(limits.max_header_bytes) + " bytes"};
  if (ec == bh::error::buffer_overflow)
    return ProtocolError{400,
                         "expected a chunk-size line (with its extensions) or a trailer section "
                         "of at most " +
                             std::to_string(limits.read_buffer_bytes()) + " bytes"};
  return ProtocolError{400, "malformed HTTP request: " + ec.message()};
}

}  // namespace syncbatch::http
