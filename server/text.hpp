// How the server's error messages quote what a client sent, shared by both protocols.
#pragma once

#include <charconv>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <limits>
#include <string>
#include <string_view>

#include <boost/core/detail/string_view.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

namespace syncbatch::http {

/// The length of the well-formed UTF-8 sequence at the start of `s` (RFC 3629: no overlong
/// forms, no surrogates, nothing past U+10FFFF), or 0 where none starts there.
inline std::size_t utf8_sequence(std::string_view s) {
  const auto b = [&](std::size_t i) { return static_cast<unsigned char>(s[i]); };
  const unsigned char c = b(0);
  if (c < 0x80) return 1;
  std::size_t n = 0;
  unsigned char lo = 0x80, hi = 0xbf;  // the range of the second byte
  if (c >= 0xc2 && c <= 0xdf) {
    n = 2;
  } else if (c >= 0xe0 && c <= 0xef) {
    n = 3;
    if (c == 0xe0) lo = 0xa0;
    if (c == 0xed) hi = 0x9f;
  } else if (c >= 0xf0 && c <= 0xf4) {
    n = 4;
    if (c == 0xf0) lo = 0x90;
    if (c == 0xf4) hi = 0x8f;
  } else {
    return 0;
  }
  if (s.size() < n || b(1) < lo || b(1) > hi) return 0;
  for (std::size_t i = 2; i < n; ++i)
    if (b(i) < 0x80 || b(i) > 0xbf) return 0;
  return n;
}

/// Whether `text` is well-formed UTF-8 throughout.
inline bool is_utf8(std::string_view text) {
  for (std::size_t i = 0, n = 0; i < text.size(); i += n)
    if ((n = utf8_sequence(text.substr(i))) == 0) return false;
  return true;
}

/// What error messages quote of a client's text: at most 80 bytes of it, cut between
/// characters (or `max`), as valid UTF-8 whatever came (a byte that starts no well-formed
/// character, or a control character, is written as \xNN), so that a JSON or text/plain answer
/// quoting it stays valid in its format.
inline std::string excerpt(std::string_view text, std::size_t max = 80) {
  std::string out;
  std::size_t i = 0;
  while (i < text.size()) {
    const std::size_t n = utf8_sequence(text.substr(i));
    const auto c = static_cast<unsigned char>(text[i]);
    const bool escape = n == 0 || c < 0x20 || c == 0x7f;
    if (out.size() + (escape ? 4 : n) > max) break;
    if (escape) {
      constexpr char kHex[] = "0123456789ABCDEF";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
      ++i;
    } else {
      out.append(text.substr(i, n));
      i += n;
    }
  }
  if (i < text.size()) out += "... (" + std::to_string(text.size()) + " bytes)";
  return out;
}

/// As above, for Beast's field values (a template, so that a std::string picks the above).
template <class S>
requires std::same_as<S, boost::core::string_view> std::string excerpt(const S& text) {
  return excerpt(std::string_view(text.data(), text.size()));
}

/// A JSON value as it would be written, quoted as above.
template <class V>
requires std::same_as<V, boost::json::value> std::string excerpt(const V& v) {
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
