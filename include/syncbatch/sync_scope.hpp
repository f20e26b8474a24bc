// SyncScope: the single-thread loop. Call tick() after each op; it syncs when the policy says.
#pragma once

#include <concepts>
#include <cstddef>
#include <utility>

#include "syncbatch/sync_policy.hpp"

namespace syncbatch {

/// Counts ops issued by one thread and synchronizes by `Policy`, calling `Sync` (any callable
/// taking no arguments, e.g. syncbatch::DeviceSync or a lambda) to wait for the device.
///
///   SyncScope scope(EveryN{32}, DeviceSync(device));
///   for (auto& x : inputs) { outputs.push_back(model(x)); scope.tick(); }
///   scope.flush();  // everything issued is now complete
///
/// No threads and no allocations: tick() is a counter increment and a comparison, plus one
/// clock read when the policy uses the clock.
///
/// Thread safety: not thread-safe. One SyncScope belongs to one thread.
/// Ordering: when tick() returns true or flush() returns, every op issued before it has
/// completed on the device (as far as `Sync` guarantees).
template <SyncPolicyLike Policy, std::invocable Sync>
class SyncScope {
 public:
  /// Errors: throws Error(kInvalidArgument) if `policy` is invalid.
  SyncScope(Policy policy, Sync sync) : policy_(std::move(policy)), sync_(std::move(sync)) {
    policy_.validate();
  }

  SyncScope(const SyncScope&) = delete;
  SyncScope& operator=(const SyncScope&) = delete;

  /// Flushes. An exception from the sync is swallowed here: call flush() to see it.
  ~SyncScope() {
    try {
      flush();
    } catch (...) {  // NOLINT(bugprone-empty-catch): a destructor must not throw
    }
  }

  /// Records one op issued and syncs if the policy says so. Returns whether it synced.
  /// Errors: rethrows what `Sync` throws; the pending ops then count as synced.
  bool tick() {
    if (pending_.ops == 0 && policy_.uses_clock()) pending_.oldest = Clock::now();
    ++pending_.ops;
    ++ops_;
    const bool due = policy_.uses_clock() ? policy_.should_sync(pending_, Clock::now())
                                          : policy_.should_sync(pending_, Clock::time_point{});
    if (due) sync_now();
    return due;
  }

  /// Syncs if any op is pending. Errors: rethrows what `Sync` throws.
  void flush() {
    if (pending_.ops > 0) sync_now();
  }

  std::size_t ops() const noexcept { return ops_; }              ///< Ops ticked so far.
  std::size_t syncs() const noexcept { return syncs_; }          ///< Syncs issued so far.
  std::size_t pending() const noexcept { return pending_.ops; }  ///< Ops since the last sync.
  const Policy& policy() const noexcept { return policy_; }

 private:
  void sync_now() {
    const PendingWork work = std::exchange(pending_, PendingWork{});
    ++syncs_;
    if (!policy_.uses_clock()) {
      sync_();
      return;
    }
    const auto before = Clock::now();
    sync_();
    const auto after = Clock::now();
    policy_.observe(
        BatchObservation{work.ops, after - before, after - work.oldest, after - work.oldest});
  }

  Policy policy_;
  Sync sync_;
  PendingWork pending_;
  std::size_t ops_ = 0;
  std::size_t syncs_ = 0;
};

}  // namespace syncbatch
