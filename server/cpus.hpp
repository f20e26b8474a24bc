// The CPUs this process may use, and the thread layout the server takes from them when the
// operator sets none: read from the process's affinity mask and its cgroup's CPU limit (a
// Kubernetes pod's `limits.cpu`), so that a server in a 4-CPU pod on a 64-CPU host does not
// start 32 io threads.
#pragma once

#include <cstddef>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

namespace syncbatch::http {

/// What bounds this process's CPUs.
struct CpuBudget {
  unsigned affinity = 1;        ///< CPUs in its affinity mask (taskset, cpusets)
  std::optional<double> quota;  ///< its cgroup's CPU limit in CPUs (cpu.max), if any
  /// The CPUs it may keep busy: the affinity, or the quota rounded up where that is fewer.
  unsigned usable() const;
  /// "4 CPUs usable (affinity 16, cgroup limit 3.5)".
  std::string describe() const;
};

/// The CPU limit, in CPUs, of the cgroup that /proc/self/cgroup's text `self_cgroup` names,
/// under `root` (where cgroupfs is mounted): cgroup v2's cpu.max ("QUOTA PERIOD" or "max ..."),
/// the smallest along the path from the cgroup up to the root, or cgroup v1's
/// cpu.cfs_quota_us / cpu.cfs_period_us. None where no file sets one.
std::optional<double> cgroup_cpu_limit(std::string_view self_cgroup,
                                       const std::filesystem::path& root);

/// This process's budget: sched_getaffinity, and cgroup_cpu_limit of /proc/self/cgroup under
/// /sys/fs/cgroup.
CpuBudget cpu_budget();

/// The thread layout the server takes when the operator sets none.
struct ThreadLayout {
  int io_threads = 1;
  std::size_t workers = 1;  ///< per model
};

/// For `cpus` usable CPUs and a model on CUDA (`cuda`) or not: half the CPUs as io threads (at
/// least 1, at most 8), where the rest go to the submitter workers, LibTorch's own threads and
/// the load balancer or client beside it; 2 workers for a CUDA model (one launches a batch while
/// the other waits on its sync), 1 otherwise (a CPU model's forward uses LibTorch's threads).
/// README ("Threads") has the measurements behind it.
ThreadLayout default_layout(unsigned cpus, bool cuda);

}  // namespace syncbatch::http
