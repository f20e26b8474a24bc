// Shared by the tests: gates that hold a model (and so its worker) until opened, and the error
// code a Future completes with.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>

#include "syncbatch/error.hpp"
#include "syncbatch/future.hpp"

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

/// A Gate that holds only the first call through it (the first batch), so that later requests
/// queue up behind it and form the next batches.
struct OnceGate {
  std::atomic<bool> open{false};
  std::atomic<bool> armed{true};
  std::atomic<int> entered{0};
  void pass() {
    if (!armed.exchange(false)) return;
    entered.fetch_add(1);
    while (!open.load()) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  void wait_entered() {
    while (entered.load() < 1) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
};

/// The code of the syncbatch::Error that `f` completes with (its message into `what` if given);
/// a test failure if it completes with a value.
template <class T>
ErrorCode code_of(Future<T>& f, std::string* what = nullptr) {
  try {
    f.get();
  } catch (const Error& e) {
    if (what != nullptr) *what = e.what();
    return e.code();
  }
  ADD_FAILURE() << "expected an error, got a value";
  return ErrorCode::kInvalidArgument;
}

}  // namespace syncbatch::testing
