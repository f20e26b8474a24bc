// Benchmark reports: result rows written as JSON through Boost.JSON, with a meta block that
// names the device, the LibTorch version and the date.
#pragma once

#include <c10/core/Device.h>
#include <torch/version.h>

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <string>
#include <utility>

// Boost.JSON header-only: each benchmark is one translation unit, so this is its one copy.
#include <boost/json/src.hpp>

namespace syncbatch::bench {

/// Result rows, written as {"meta": {...}, "rows": [{...}, ...]}.
class JsonRows {
 public:
  JsonRows& row() {
    rows_.emplace_back(boost::json::object());
    return *this;
  }
  JsonRows& set(const std::string& key, const std::string& value) {
    rows_.back().as_object()[key] = value;
    return *this;
  }
  JsonRows& set(const std::string& key, double value) {
    rows_.back().as_object()[key] = value;
    return *this;
  }
  /// Writes the rows to `path` ("" writes nothing); exits with a message when it cannot.
  void write(const std::string& path, boost::json::object meta) const {
    if (path.empty()) return;
    std::ofstream out(path);
    out << boost::json::serialize(boost::json::object{{"meta", std::move(meta)}, {"rows", rows_}})
        << "\n";
    if (!out) {
      std::fprintf(stderr, "error: could not write %s\n", path.c_str());
      std::exit(1);
    }
  }

 private:
  boost::json::array rows_;
};

/// The meta block: device, LibTorch version and UTC date, plus the fields of `extra`.
inline boost::json::object meta_json(c10::Device device, boost::json::object extra = {}) {
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%MZ", std::gmtime(&now));
  boost::json::object meta{{"device", device.str()}, {"torch", TORCH_VERSION}, {"date", date}};
  for (auto& field : extra) meta[field.key()] = std::move(field.value());
  return meta;
}

}  // namespace syncbatch::bench
