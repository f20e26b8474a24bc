// How the server's error messages quote what a client sent, shared by both protocols.
#pragma once

#include <charconv>
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>

#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

namespace syncbatch::http {

/// What error messages quote of a client's value: at most 80 characters of it.
inline std::string excerpt(std::string text) {
  constexpr std::size_t kMax = 80;
  if (text.size() > kMax)
    text = text.substr(0, kMax) + "... (" + std::to_string(text.size()) + " characters)";
  return text;
}

inline std::string excerpt(const boost::json::value& v) {
  return excerpt(boost::json::serialize(v));
}

/// 'a', 'b', 'c': the names of `items` (name(item) of each) as error messages list them.
template <class Items, class Name>
std::string quoted_names(const Items& items, Name name) {
  std::string out;
  for (const auto& item : items) out += (out.empty() ? "'" : ", '") + name(item) + "'";
  return out;
}

/// The shortest text that reads back as `d`.
inline std::string number_text(double d) {
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof buf, d);
  return std::string(buf, r.ptr);
}

/// Whether a JSON number can be run as a float32: finite, and not beyond float32's range (1e400
/// parses as inf; 1e39 overflows float32).
inline bool fits_float32(double d) {
  return std::isfinite(d) && std::fabs(d) <= std::numeric_limits<float>::max();
}

}  // namespace syncbatch::http
