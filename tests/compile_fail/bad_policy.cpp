// Compile-fail test: a policy whose should_sync is not noexcept is refused by SyncPolicyLike.
// Built twice by run.cmake: with SYNCBATCH_CF_GOOD it must compile, without it must fail.
#include "syncbatch/sync_scope.hpp"

struct AlmostPolicy {
#ifdef SYNCBATCH_CF_GOOD
  bool should_sync(const syncbatch::PendingWork& w, syncbatch::Clock::time_point) const noexcept {
#else
  bool should_sync(const syncbatch::PendingWork& w, syncbatch::Clock::time_point) const {
#endif
      return w.ops >= 4;
} syncbatch::Clock::time_point hold_until(const syncbatch::PendingWork& w) const noexcept {
  return w.oldest;
}
std::size_t batch_limit() const noexcept {
  return 4;
}
bool uses_clock() const noexcept {
  return false;
}
void observe(const syncbatch::BatchObservation&) noexcept {}
void validate() const {}
std::string describe() const {
  return "almost";
}
}
;

int main() {
  syncbatch::SyncScope<AlmostPolicy, void (*)()> scope(AlmostPolicy{}, [] {});
  scope.tick();
  scope.flush();
}
