// Benchmark flags: --name value pairs with defaults, and the device, sync and graph flags.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/Device.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "syncbatch/error.hpp"
#include "syncbatch/torch/device_sync.hpp"
#include "syncbatch/torch/graphs.hpp"

namespace syncbatch::bench {

/// --name value flags with defaults; unknown flags and bad values exit with a usage message.
class Flags {
 public:
  Flags(int argc, char** argv, std::string usage, std::map<std::string, std::string> defaults)
      : usage_(std::move(usage)), values_(std::move(defaults)) {
    for (int i = 1; i < argc; ++i) {
      std::string flag = argv[i];
      if (flag == "--help" || flag == "-h") fail("");
      if (flag.rfind("--", 0) != 0 || i + 1 >= argc)
        fail("expected --name value, got '" + flag + "'");
      flag = flag.substr(2);
      if (!values_.count(flag)) fail("unknown flag --" + flag);
      values_[flag] = argv[++i];
    }
  }
  std::string str(const std::string& name) const { return values_.at(name); }
  double num(const std::string& name) const {
    const std::string& v = values_.at(name);
    char* end = nullptr;
    const double d = std::strtod(v.c_str(), &end);
    if (v.empty() || *end != '\0' || d < 0)
      fail("--" + name + ": expected a number >= 0, got '" + v + "'");
    return d;
  }
  /// A comma-separated flag, split ("a,b,c" -> {"a", "b", "c"}).
  std::vector<std::string> list(const std::string& name) const {
    std::vector<std::string> out;
    std::stringstream s(values_.at(name));
    for (std::string part; std::getline(s, part, ',');) out.push_back(part);
    return out;
  }
  std::vector<int> ints(const std::string& name) const {
    std::vector<int> out;
    for (const std::string& part : list(name)) {
      char* end = nullptr;
      const long v = std::strtol(part.c_str(), &end, 10);
      if (part.empty() || *end != '\0' || v <= 0)
        fail("--" + name + ": expected positive integers separated by commas, got '" +
             values_.at(name) + "'");
      out.push_back(static_cast<int>(v));
    }
    return out;
  }
  [[noreturn]] void fail(const std::string& problem) const {
    if (!problem.empty()) std::fprintf(stderr, "error: %s\n", problem.c_str());
    std::fprintf(stderr, "%s\nflags (default):\n", usage_.c_str());
    for (const auto& [k, v] : values_) std::fprintf(stderr, "  --%s (%s)\n", k.c_str(), v.c_str());
    std::exit(problem.empty() ? 0 : 2);
  }

 private:
  std::string usage_;
  std::map<std::string, std::string> values_;
};

/// Parses --device (auto|cpu|cuda|cuda:N|mps), exiting with the library's message on error.
inline c10::Device device_flag(const Flags& flags) {
  try {
    return parse_device(flags.str("device"));
  } catch (const Error& e) {
    flags.fail(e.what());
  }
}

inline SyncMode sync_flag(const std::string& s) {
  if (s == "device") return SyncMode::kDevice;
  if (s == "event") return SyncMode::kEvent;
  std::fprintf(stderr, "error: expected sync mode device or event, got '%s'\n", s.c_str());
  std::exit(2);
}

/// Whether graph columns are measured: --graphs auto (where CUDA graphs can run), on, off.
inline bool graphs_flag(const Flags& flags, c10::Device device) {
  const std::string v = flags.str("graphs");
  if (v == "on") return true;
  if (v == "off") return false;
  if (v != "auto") flags.fail("--graphs: expected auto, on or off, got '" + v + "'");
  return graphs_unavailable_reason(device).empty();
}

/// Pins LibTorch to one intra-op thread, and warns when OpenBLAS may use more.
inline void pin_threads() {
  at::set_num_threads(1);
  const char* ob = std::getenv("OPENBLAS_NUM_THREADS");
  if (ob == nullptr || std::string(ob) != "1")
    std::fprintf(stderr, "note: set OPENBLAS_NUM_THREADS=1 for comparable CPU numbers\n");
}

}  // namespace syncbatch::bench
