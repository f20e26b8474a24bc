// libFuzzer target: the /v1/infer codec (v1.hpp), JSON and raw rows. The first byte picks the
// content type; the rest is the body. Properties beyond "no crash": a decoded request has
// rows x width values within the row limit, its answer in JSON parses back as JSON, and every
// refusal is a 4xx whose message is valid UTF-8.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include <boost/json/parse.hpp>

#include "codecs/v1.hpp"
#include "protocol_error.hpp"
#include "text.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  constexpr std::string_view kTypes[] = {"application/json", "application/octet-stream",
                                         "Application/JSON ; charset=utf-8", "text/plain"};
  const std::string_view type = kTypes[data[0] % 4];
  const std::string_view body(reinterpret_cast<const char*>(data) + 1, size - 1);
  constexpr int64_t kWidth = 4, kMaxRows = 16;
  namespace v1 = syncbatch::http::v1;
  try {
    const v1::Decoded d = v1::decode(type, body, kWidth, kMaxRows);
    if (d.rows < 1 || d.rows > kMaxRows ||
        d.values.size() != static_cast<std::size_t>(d.rows * kWidth))
      std::abort();
    const v1::Answer a = v1::encode(d.values.data(), d.rows, kWidth, d);
    if (a.content_type == "application/json") {
      boost::system::error_code ec;
      boost::json::parse(a.body, ec);
      if (ec) std::abort();  // a 200 body that is not JSON
    }
  } catch (const syncbatch::http::ProtocolError& e) {
    if (e.status < 400 || e.status > 499) std::abort();
    if (!syncbatch::http::is_utf8(e.message)) std::abort();
  }
  return 0;
}
