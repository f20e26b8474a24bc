// The clock of syncbatch: arrivals, deadlines, policies and statistics all use it.
#pragma once

#include <chrono>

namespace syncbatch {

/// The clock every policy, deadline and statistic uses.
using Clock = std::chrono::steady_clock;

/// A source of Clock time points: `&Clock::now`, or a test's fake clock
/// (SubmitterOptions::clock).
using ClockFn = Clock::time_point (*)() noexcept;

}  // namespace syncbatch
