// The /v1/infer codec. See v1.hpp.
#include "codecs/v1.hpp"

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include <boost/json/parse.hpp>
#include <boost/json/value.hpp>

#include "codecs/finite.hpp"
#include "http1.hpp"
#include "protocol_error.hpp"
#include "text.hpp"

namespace syncbatch::http::v1 {
namespace {

std::string plural(int64_t n, const char* what) {
  return std::to_string(n) + " " + what + (n == 1 ? "" : "s");
}

std::string element(int64_t row, std::size_t j) {
  return "row " + std::to_string(row) + ", element " + std::to_string(j);
}

void append_row(const boost::json::array& row, int64_t width, int64_t index,
                std::vector<float>& out) {
  if (static_cast<int64_t>(row.size()) != width)
    throw bad_request("row " + std::to_string(index) + ": expected " + plural(width, "number") +
                      ", got " + plural(static_cast<int64_t>(row.size()), "element"));
  for (std::size_t j = 0; j < row.size(); ++j) {
    if (!row[j].is_number())
      throw bad_request(element(index, j) + ": expected a number, got " + excerpt(row[j]));
    // A number JSON can write but float32 cannot hold is refused rather than run as inf.
    const double d = row[j].to_number<double>();
    if (!fits_float32(d))
      throw bad_request(
          element(index, j) + ": expected a finite number in float32 range (magnitude at most " +
          number_text(std::numeric_limits<float>::max()) + "), got " + number_text(d));
    out.push_back(static_cast<float>(d));
  }
}

// The request's row limit, whatever its encoding.
void check_rows(int64_t rows, int64_t max_rows) {
  if (rows > max_rows)
    throw ProtocolError{
        413, "expected at most " + plural(max_rows, "row") + ", got " + std::to_string(rows)};
}

Decoded decode_json(std::string_view body, int64_t width, int64_t max_rows) {
  boost::system::error_code ec;
  boost::json::value v = boost::json::parse(body, ec);
  if (ec)
    throw bad_request("malformed JSON body: " + ec.message() +
                      " (expected [x, ...] or [[x, ...], ...])");
  if (!v.is_array() || v.as_array().empty())
    throw bad_request("expected a non-empty JSON array of numbers, or of rows, got " +
                      (v.is_array() ? std::string("an empty array") : excerpt(v)));
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
      throw bad_request("row " + std::to_string(i) + ": expected an array of numbers, got " +
                        excerpt(a[i]));
    append_row(a[i].as_array(), width, static_cast<int64_t>(i), d.values);
  }
  return d;
}

Decoded decode_raw(std::string_view body, int64_t width, int64_t max_rows) {
  const std::size_t row_bytes = static_cast<std::size_t>(width) * sizeof(float);
  if (body.empty() || body.size() % row_bytes != 0)
    throw bad_request("expected a non-empty multiple of " + std::to_string(row_bytes) + " bytes (" +
                      std::to_string(width) + " little-endian float32 per row), got " +
                      plural(static_cast<int64_t>(body.size()), "byte"));
  Decoded d;
  d.encoding = Encoding::kRaw;
  d.rows = static_cast<int64_t>(body.size() / row_bytes);
  check_rows(d.rows, max_rows);
  d.values.resize(body.size() / sizeof(float));
  std::memcpy(d.values.data(), body.data(), body.size());
  if constexpr (std::endian::native == std::endian::big)
    for (float& f : d.values)
      f = std::bit_cast<float>(__builtin_bswap32(std::bit_cast<uint32_t>(f)));
  if (const std::size_t i = first_non_finite(d.values.data(), d.values.size()); i < d.values.size())
    throw bad_request(
        element(static_cast<int64_t>(i) / width, i % static_cast<std::size_t>(width)) +
        ": expected a finite float32, got " + number_text(d.values[i]));
  return d;
}

void append_float(std::string& s, float f) {
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof buf, f);
  s.append(buf, r.ptr);
}

}  // namespace

Decoded decode(std::string_view content_type, std::string_view body, int64_t width,
               int64_t max_rows) {
  const std::string type = media_type(content_type);
  if (type == "application/json") return decode_json(body, width, max_rows);
  if (type == "application/octet-stream") return decode_raw(body, width, max_rows);
  throw ProtocolError{
      415, "expected Content-Type application/json or application/octet-stream, got " +
               (content_type.empty() ? std::string("none") : "'" + excerpt(content_type) + "'")};
}

Answer encode(const float* p, int64_t rows, int64_t cols, const Decoded& request) {
  Answer a;
  const std::size_t n = static_cast<std::size_t>(rows * cols);
  if (request.encoding == Encoding::kRaw) {
    a.content_type = "application/octet-stream";
    a.shape = std::to_string(rows) + "," + std::to_string(cols);
    a.body.assign(reinterpret_cast<const char*>(p), n * sizeof(float));
    return a;
  }
  // JSON has no inf or nan: an output that is not finite is an error naming it, never a body
  // no parser accepts. Raw float32 answers above keep every value as the model made it.
  if (const std::size_t i = first_non_finite(p, n); i < n)
    throw ProtocolError{
        500, "output " +
                 element(static_cast<int64_t>(i) / cols, i % static_cast<std::size_t>(cols)) +
                 " is " + number_text(p[i]) +
                 ", which JSON cannot carry; send the request as "
                 "application/octet-stream to get the raw float32 values"};
  std::string& s = a.body;
  s.reserve(n * 12 + 8);
  if (request.nested) s += '[';
  for (int64_t i = 0; i < rows; ++i) {
    if (i > 0) s += ',';
    s += '[';
    for (int64_t j = 0; j < cols; ++j) {
      if (j > 0) s += ',';
      append_float(s, p[i * cols + j]);
    }
    s += ']';
  }
  if (request.nested) s += ']';
  a.content_type = "application/json";
  return a;
}

}  // namespace syncbatch::http::v1
