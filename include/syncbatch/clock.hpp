// The clock of syncbatch: arrivals, deadlines, policies and statistics all use it.
#pragma once

#include <chrono>

namespace syncbatch {

/// The clock every policy, deadline and statistic uses.
using Clock = std::chrono::steady_clock;

}  // namespace syncbatch
