// Shared by the torch-free tests: a gate that holds a model (and so its worker) until opened.
#pragma once

#include <atomic>
#include <chrono>
#include <thread>

namespace syncbatch::testing {

/// Blocks the model until released; tells when the model was entered.
struct Gate {
  std::atomic<bool> open{false};
  std::atomic<int> entered{0};
  void pass() {
    entered.fetch_add(1);
    while (!open.load()) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  void wait_entered(int n) {
    while (entered.load() < n) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
};

}  // namespace syncbatch::testing
