// The CPUs this process may use. See cpus.hpp.
#include "cpus.hpp"

#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

namespace syncbatch::http {
namespace {

std::optional<std::string> read_line(const std::filesystem::path& file) {
  std::ifstream in(file);
  std::string line;
  if (!in || !std::getline(in, line)) return std::nullopt;
  return line;
}

// cgroup v2's cpu.max: "QUOTA PERIOD", or "max PERIOD" for none.
std::optional<double> v2_limit(const std::filesystem::path& dir) {
  const auto line = read_line(dir / "cpu.max");
  if (!line) return std::nullopt;
  std::istringstream fields(*line);
  std::string quota;
  double period = 0;
  if (!(fields >> quota >> period) || quota == "max" || period <= 0) return std::nullopt;
  try {
    const double q = std::stod(quota);
    if (q > 0) return q / period;
  } catch (const std::exception&) {
  }
  return std::nullopt;
}

// cgroup v1's cpu.cfs_quota_us (-1: none) over cpu.cfs_period_us.
std::optional<double> v1_limit(const std::filesystem::path& dir) {
  const auto quota = read_line(dir / "cpu.cfs_quota_us");
  const auto period = read_line(dir / "cpu.cfs_period_us");
  if (!quota || !period) return std::nullopt;
  try {
    const double q = std::stod(*quota), p = std::stod(*period);
    if (q > 0 && p > 0) return q / p;
  } catch (const std::exception&) {
  }
  return std::nullopt;
}

}  // namespace

unsigned CpuBudget::usable() const {
  unsigned n = std::max(1u, affinity);
  if (quota) n = std::min(n, std::max(1u, static_cast<unsigned>(std::ceil(*quota - 1e-9))));
  return n;
}

std::string CpuBudget::describe() const {
  const unsigned n = usable();
  std::string out = std::to_string(n) + (n == 1 ? " CPU" : " CPUs") + " usable (affinity " +
                    std::to_string(affinity) + ", cgroup limit ";
  if (quota) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", *quota);
    out += buf;
  } else {
    out += "none";
  }
  return out + ")";
}

std::optional<double> cgroup_cpu_limit(std::string_view self_cgroup,
                                       const std::filesystem::path& root) {
  std::optional<double> limit;
  const auto tighter = [&](std::optional<double> l) {
    if (l && (!limit || *l < *limit)) limit = l;
  };
  std::istringstream lines{std::string(self_cgroup)};
  for (std::string line; std::getline(lines, line);) {
    // "ID:CONTROLLERS:PATH": v2 is "0::PATH"; v1 lists its controllers ("cpu,cpuacct").
    const std::size_t a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1);
    const std::filesystem::path path = std::filesystem::path(line.substr(b + 1)).relative_path();
    if (controllers.empty()) {
      // v2: every cgroup from this one up to the root may limit it.
      for (std::filesystem::path p = path;; p = p.parent_path()) {
        tighter(v2_limit(root / p));
        if (p.empty()) break;
      }
    } else if (("," + controllers + ",").find(",cpu,") != std::string::npos) {
      for (const char* mount : {"cpu,cpuacct", "cpu"}) tighter(v1_limit(root / mount / path));
    }
  }
  return limit;
}

CpuBudget cpu_budget() {
  CpuBudget b;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) b.affinity = std::max(1, CPU_COUNT(&set));
  std::ifstream in("/proc/self/cgroup");
  std::stringstream text;
  text << in.rdbuf();
  b.quota = cgroup_cpu_limit(text.str(), "/sys/fs/cgroup");
  return b;
}

ThreadLayout default_layout(unsigned cpus, bool cuda) {
  return {.io_threads = static_cast<int>(std::clamp(cpus / 2, 1u, 8u)),
          .workers = cuda ? std::size_t{2} : std::size_t{1}};
}

}  // namespace syncbatch::http
