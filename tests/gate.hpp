// Shared by the tests: gates that hold a model (and so its worker) until opened, and the error
// code a Future completes with.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "syncbatch/batched_submitter.hpp"
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

/// A batch model of ints that answers each input with itself, records each batch's inputs, and
/// holds the batch whose first input is 0 at `gate`.
struct BatchRecorder {
  Gate gate;
  std::mutex mutex;
  std::vector<std::vector<int>> batches;  // guarded by mutex
  BatchModel<int, int> model() {
    return {[this](Batch<int, int>& b) {
      std::vector<int> seen;
      for (std::size_t i = 0; i < b.size(); ++i) {
        seen.push_back(b.input(i));
        b.set_value(i, b.input(i));
      }
      if (seen.front() == 0) gate.pass();
      std::lock_guard lock(mutex);
      batches.push_back(seen);
    }};
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
