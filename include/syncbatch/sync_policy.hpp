// Sync policies: when to synchronize with the device.
//
// A policy is a small value type. It sees the unsynced work (`PendingWork`) and answers three
// questions: must we sync now (`should_sync`), may we wait for more work before syncing when
// none is available right now (`hold_until`), and how many ops may one sync cover at most
// (`batch_limit`). After each sync it is told what happened (`observe`), which the adaptive
// policy learns from. Every user of a policy (SyncScope, BatchedSubmitter) owns its own copy.
//
// No policy can make a request wait forever: `hold_until` is always finite, so when no more
// work arrives the pending work is synced at the latest then.
//
// Thread safety: policies are plain values; one instance must not be used from two threads
// at once. Copies are independent.
#pragma once

#include <algorithm>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <string>
#include <string_view>
#include <variant>

#include "syncbatch/clock.hpp"
#include "syncbatch/error.hpp"

namespace syncbatch {

/// The unsynced work a policy decides about.
struct PendingWork {
  std::size_t ops = 0;  ///< Ops issued since the last sync.
  /// When the first of them was issued (SyncScope: the first tick; BatchedSubmitter: when a
  /// worker took the batch's first request). Meaningful when ops > 0.
  Clock::time_point oldest{};
};

/// What one sync covered, reported to the policy after it completes.
struct BatchObservation {
  std::size_t ops = 0;            ///< Ops the sync covered.
  Clock::duration sync_wait{};    ///< Time blocked inside the sync call itself.
  Clock::duration batch_time{};   ///< From the first op's start to the end of the sync.
  Clock::duration max_latency{};  ///< Oldest op: arrival to completion.
  /// Whether the caller waited for more work (until `hold_until`) before this sync.
  bool held = false;
  /// Of `ops`, those that arrived while the caller waited: what the hold brought.
  std::size_t joined_while_held = 0;
};

/// The requirements on a sync policy. A type that misses one fails here, at compile time.
template <class P>
concept SyncPolicyLike = std::copy_constructible<P> &&
    requires(P& p, const P& cp, const PendingWork& w, Clock::time_point t,
             const BatchObservation& o) {
  { cp.should_sync(w, t) }
  noexcept->std::same_as<bool>;
  { cp.hold_until(w) }
  noexcept->std::same_as<Clock::time_point>;
  { cp.batch_limit() }
  noexcept->std::same_as<std::size_t>;
  { cp.uses_clock() }
  noexcept->std::same_as<bool>;
  { p.observe(o) }
  noexcept->std::same_as<void>;
  { cp.validate() } -> std::same_as<void>;
  { cp.describe() } -> std::same_as<std::string>;
};

/// Sync after every `n` issued ops; when no more work is available, sync at once.
struct EveryN {
  std::size_t n = 1;

  bool should_sync(const PendingWork& w, Clock::time_point) const noexcept { return w.ops >= n; }
  Clock::time_point hold_until(const PendingWork& w) const noexcept { return w.oldest; }
  std::size_t batch_limit() const noexcept { return n; }
  bool uses_clock() const noexcept { return false; }
  void observe(const BatchObservation&) noexcept {}
  /// Errors: throws Error(kInvalidArgument) if n == 0.
  void validate() const {
    if (n == 0) throw Error(ErrorCode::kInvalidArgument, "EveryN: expected n >= 1, got 0");
  }
  std::string describe() const { return "every:" + std::to_string(n); }
};

/// Sync when the oldest unsynced op is `max_delay` old or `max_ops` are pending, whichever comes
/// first. While fewer than `max_ops` are pending and no more work is available, the caller may
/// wait for more until the oldest op is `max_delay` old (Triton's max_queue_delay_microseconds,
/// TF Serving's batch_timeout_micros). In a BatchedSubmitter the age counts from when a worker
/// took the batch's first request, so a backlog is still batched up to `max_ops`.
struct TimeBased {
  Clock::duration max_delay = std::chrono::microseconds(100);
  std::size_t max_ops = 64;

  bool should_sync(const PendingWork& w, Clock::time_point now) const noexcept {
    return w.ops >= max_ops || (w.ops > 0 && now - w.oldest >= max_delay);
  }
  Clock::time_point hold_until(const PendingWork& w) const noexcept { return w.oldest + max_delay; }
  std::size_t batch_limit() const noexcept { return max_ops; }
  bool uses_clock() const noexcept { return true; }
  void observe(const BatchObservation&) noexcept {}
  /// Errors: throws Error(kInvalidArgument) if max_ops == 0 or max_delay < 0.
  void validate() const {
    if (max_ops == 0)
      throw Error(ErrorCode::kInvalidArgument, "TimeBased: expected max_ops >= 1, got 0");
    if (max_delay < Clock::duration::zero())
      throw Error(ErrorCode::kInvalidArgument, "TimeBased: expected max_delay >= 0, got " +
                                                   std::to_string(max_delay.count()) + " ticks");
  }
  std::string describe() const {
    return "time:" +
           std::to_string(
               std::chrono::duration_cast<std::chrono::microseconds>(max_delay).count()) +
           "us:" + std::to_string(max_ops);
  }
};

/// Picks the batch size online from each batch's size, duration and worst latency: additive
/// increase while batches fill up and the slowest request stays under `latency_target` with
/// headroom; on overshoot, multiplicative decrease when the batch itself is too slow (Clipper's
/// AIMD), but multiplicative *increase* when full batches overshoot because requests queued
/// (the worker is falling behind and bigger batches raise throughput), which plain AIMD gets
/// backwards. Never holds an op longer than `latency_target` to gather more, and holds only
/// while holding brings requests (see hold_until).
class Adaptive {
 public:
  /// Errors: none here; validate() reports bad arguments.
  explicit Adaptive(Clock::duration latency_target, std::size_t min_batch = 1,
                    std::size_t max_batch = 256) noexcept
      : latency_target_(latency_target),
        min_batch_(min_batch),
        max_batch_(max_batch),
        limit_(static_cast<double>(std::max<std::size_t>(min_batch, 1))) {}

  bool should_sync(const PendingWork& w, Clock::time_point now) const noexcept {
    return w.ops >= batch_limit() || (w.ops > 0 && now - w.oldest >= latency_target_);
  }
  /// When the queue runs dry with fewer ops pending than the limit, waits briefly for more
  /// (closed-loop clients resubmit as their results come back): an eighth of the recent batch
  /// time, at most an eighth of the target. Where a batch of one costs almost what a full one
  /// does (a heavy model), that turns batches split in two phases (1 and N-1, or N/2 and N/2)
  /// into batches of N. Holds under 50 us (batches under 400 us) are skipped: not worth a sleep.
  /// A hold that brings no request (one closed-loop client: nothing can arrive while its own
  /// request waits) only adds latency: after each such hold the next 1, 3, 7 ... 63 batches
  /// are not held, and one hold that brings a request restores holding at once.
  Clock::time_point hold_until(const PendingWork& w) const noexcept {
    if (w.ops >= batch_limit() || holds_to_skip_ > 0) return w.oldest;
    const auto hold = hold_time();
    return hold < kMinHold ? w.oldest : w.oldest + hold;
  }
  std::size_t batch_limit() const noexcept { return static_cast<std::size_t>(limit_); }
  bool uses_clock() const noexcept { return true; }

  /// Over the target, the latency is split into the batch's own time (`batch_time`) and the
  /// time its oldest request queued before it (the rest). Full batches that mostly queued mean
  /// the worker is falling behind: batching more raises throughput and drains the queue, so the
  /// limit doubles (also when the target cannot be met at all: then throughput is what is left
  /// to win). Otherwise the batch itself is too slow and the limit halves. Under the target with
  /// 20% headroom, full batches grow the limit by one. A batch that held for more and still
  /// came out short shows how many requests there are to gather: the limit drops to its size,
  /// and grows again only after a few full batches (so a lone client is rarely kept waiting).
  /// `o.held` and `o.joined_while_held` say whether the caller held and what it brought.
  void observe(const BatchObservation& o) noexcept {
    const bool full = o.ops >= batch_limit();
    const bool held = o.held && !full;  // held for more and still came out short
    if (o.held) {
      if (o.joined_while_held == 0) {
        idle_holds_ = std::min(idle_holds_ + 1, kMaxIdleHolds);
        holds_to_skip_ = (1 << idle_holds_) - 1;
      } else {
        idle_holds_ = 0;
        holds_to_skip_ = 0;
      }
    } else if (holds_to_skip_ > 0 && !full) {
      --holds_to_skip_;
    }
    const auto bt = static_cast<double>(o.batch_time.count());
    batch_time_ = batch_time_ == 0 ? bt : batch_time_ * 0.75 + bt * 0.25;
    if (o.max_latency > latency_target_) {
      const auto queued = o.max_latency - o.batch_time;
      if (full && queued > o.batch_time) {
        limit_ = std::min(static_cast<double>(max_batch_), limit_ * kIncreaseBehind);
      } else {
        limit_ = std::max(static_cast<double>(min_batch_), limit_ * kDecrease);
      }
    } else if (held) {
      limit_ = std::max(static_cast<double>(min_batch_), static_cast<double>(o.ops));
      probe_after_ = kFullBatchesBeforeProbe;
    } else if (full && o.max_latency * 10 < latency_target_ * 8) {
      if (probe_after_ > 0) {
        --probe_after_;
      } else {
        limit_ = std::min(static_cast<double>(max_batch_), limit_ + 1.0);
      }
    }
  }

  /// Errors: throws Error(kInvalidArgument) if the target is not positive or min/max are off.
  void validate() const {
    if (latency_target_ <= Clock::duration::zero())
      throw Error(ErrorCode::kInvalidArgument, "Adaptive: expected latency_target > 0");
    if (min_batch_ == 0 || min_batch_ > max_batch_)
      throw Error(ErrorCode::kInvalidArgument,
                  "Adaptive: expected 1 <= min_batch <= max_batch, got min_batch=" +
                      std::to_string(min_batch_) + " max_batch=" + std::to_string(max_batch_));
  }
  std::string describe() const {
    return "adaptive:" +
           std::to_string(
               std::chrono::duration_cast<std::chrono::microseconds>(latency_target_).count()) +
           "us:" + std::to_string(min_batch_) + ":" + std::to_string(max_batch_);
  }

  Clock::duration latency_target() const noexcept { return latency_target_; }
  std::size_t min_batch() const noexcept { return min_batch_; }
  std::size_t max_batch() const noexcept { return max_batch_; }

 private:
  static constexpr double kDecrease = 0.5;
  static constexpr double kIncreaseBehind = 2.0;
  static constexpr Clock::duration kMinHold = std::chrono::microseconds(50);
  static constexpr int kFullBatchesBeforeProbe = 4;
  static constexpr int kMaxIdleHolds = 6;  // up to 63 batches unheld after idle holds

  Clock::duration hold_time() const noexcept {
    return std::min(Clock::duration(static_cast<Clock::rep>(batch_time_ / 8)), latency_target_ / 8);
  }
  Clock::duration latency_target_;
  std::size_t min_batch_;
  std::size_t max_batch_;
  double limit_;
  double batch_time_ = 0;  // Clock ticks, moving average
  int probe_after_ = 0;    // full batches to see before growing again
  int idle_holds_ = 0;     // holds in a row that brought no request
  int holds_to_skip_ = 0;  // short batches to run unheld before holding again
};

/// A policy chosen at run time (from configuration, a flag): one of the policies above.
/// Itself a SyncPolicyLike value, so it goes wherever a policy does.
class SyncPolicy {
 public:
  using Variant = std::variant<EveryN, TimeBased, Adaptive>;

  SyncPolicy(EveryN p) noexcept : v_(p) {}     // NOLINT(google-explicit-constructor)
  SyncPolicy(TimeBased p) noexcept : v_(p) {}  // NOLINT(google-explicit-constructor)
  SyncPolicy(Adaptive p) noexcept : v_(p) {}   // NOLINT(google-explicit-constructor)

  /// Parses a policy spec: "every:N", "time:DELAY[:MAX_OPS]", "adaptive:TARGET[:MIN[:MAX]]",
  /// where DELAY and TARGET are a number with a unit (ns, us, ms, s), e.g. "time:500us:64".
  /// Errors: throws Error(kInvalidArgument) naming the expected form and what came.
  static SyncPolicy parse(std::string_view spec);

  bool should_sync(const PendingWork& w, Clock::time_point now) const noexcept {
    return std::visit([&](const auto& p) { return p.should_sync(w, now); }, v_);
  }
  Clock::time_point hold_until(const PendingWork& w) const noexcept {
    return std::visit([&](const auto& p) { return p.hold_until(w); }, v_);
  }
  std::size_t batch_limit() const noexcept {
    return std::visit([](const auto& p) { return p.batch_limit(); }, v_);
  }
  bool uses_clock() const noexcept {
    return std::visit([](const auto& p) { return p.uses_clock(); }, v_);
  }
  void observe(const BatchObservation& o) noexcept {
    std::visit([&](auto& p) { p.observe(o); }, v_);
  }
  void validate() const {
    std::visit([](const auto& p) { p.validate(); }, v_);
  }
  std::string describe() const {
    return std::visit([](const auto& p) { return p.describe(); }, v_);
  }

  const Variant& variant() const noexcept { return v_; }

 private:
  Variant v_;
};

static_assert(SyncPolicyLike<EveryN>);
static_assert(SyncPolicyLike<TimeBased>);
static_assert(SyncPolicyLike<Adaptive>);
static_assert(SyncPolicyLike<SyncPolicy>);

namespace detail {

inline Error bad_spec(std::string_view spec, std::string_view why) {
  return Error(ErrorCode::kInvalidArgument,
               "policy spec: expected every:N, time:DELAY[:MAX_OPS] or "
               "adaptive:TARGET[:MIN[:MAX]] (DELAY like 500us), got '" +
                   std::string(spec) + "': " + std::string(why));
}

inline std::size_t parse_count(std::string_view spec, std::string_view s) {
  if (s.empty() || s.size() > 18 ||
      !std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; }))
    throw bad_spec(spec, "'" + std::string(s) + "' is not a count");
  std::size_t v = 0;
  for (char c : s) v = v * 10 + static_cast<std::size_t>(c - '0');
  return v;
}

inline Clock::duration parse_duration(std::string_view spec, std::string_view s) {
  std::size_t digits = 0;
  while (digits < s.size() && s[digits] >= '0' && s[digits] <= '9') ++digits;
  const std::size_t n = parse_count(spec, s.substr(0, digits));
  const std::string_view unit = s.substr(digits);
  using namespace std::chrono;
  if (unit == "ns") return duration_cast<Clock::duration>(nanoseconds(n));
  if (unit == "us") return duration_cast<Clock::duration>(microseconds(n));
  if (unit == "ms") return duration_cast<Clock::duration>(milliseconds(n));
  if (unit == "s") return duration_cast<Clock::duration>(seconds(n));
  throw bad_spec(spec, "'" + std::string(s) + "' needs a unit: ns, us, ms or s");
}

}  // namespace detail

inline SyncPolicy SyncPolicy::parse(std::string_view spec) {
  std::string_view parts[4];
  std::size_t count = 0;
  for (std::string_view rest = spec;;) {
    if (count == 4) throw detail::bad_spec(spec, "too many fields");
    const auto colon = rest.find(':');
    parts[count++] = rest.substr(0, colon);
    if (colon == std::string_view::npos) break;
    rest.remove_prefix(colon + 1);
  }
  const std::string_view kind = parts[0];
  SyncPolicy policy = EveryN{1};
  if (kind == "every" && count == 2) {
    policy = EveryN{detail::parse_count(spec, parts[1])};
  } else if (kind == "time" && (count == 2 || count == 3)) {
    TimeBased p{detail::parse_duration(spec, parts[1])};
    if (count == 3) p.max_ops = detail::parse_count(spec, parts[2]);
    policy = p;
  } else if (kind == "adaptive" && count >= 2) {
    const Adaptive defaults(Clock::duration(1));
    policy = Adaptive(detail::parse_duration(spec, parts[1]),
                      count >= 3 ? detail::parse_count(spec, parts[2]) : defaults.min_batch(),
                      count >= 4 ? detail::parse_count(spec, parts[3]) : defaults.max_batch());
  } else {
    throw detail::bad_spec(spec, "unknown kind or wrong number of fields");
  }
  policy.validate();
  return policy;
}

}  // namespace syncbatch
