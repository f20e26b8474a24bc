// HTTP/1.1 request framing. See http1.hpp.
#include "http1.hpp"

#include <cctype>

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
