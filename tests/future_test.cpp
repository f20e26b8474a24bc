// syncbatch::Future over its shared state (detail::Completion), without a submitter: readiness,
// timed waits, values, errors, results made on the reader's thread, and wake-ups of sleeping
// readers. Torch-free: this file also runs under TSan and ASan.
#include "syncbatch/future.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace syncbatch {
namespace {

using namespace std::chrono_literals;
using State = detail::Completion<std::string>;

struct Handle {
  std::atomic<std::uint32_t> wakeups{0};
  boost::intrusive_ptr<State> state{new State(&wakeups)};
  Future<std::string> future{state};
};

TEST(Future, NotReadyUntilCompletedThenGetMovesTheValueOut) {
  Handle h;
  EXPECT_TRUE(h.future.valid());
  EXPECT_FALSE(h.future.ready());
  EXPECT_FALSE(h.future.wait_for(2ms));
  h.state->set_value("forty-two");
  EXPECT_FALSE(h.future.ready()) << "a stored value is not published before complete()";
  h.state->complete();
  EXPECT_TRUE(h.future.ready());
  EXPECT_TRUE(h.future.wait_for(0ms));
  EXPECT_EQ(h.future.get(), "forty-two");
  EXPECT_FALSE(h.future.valid()) << "get() invalidates the Future";
}

TEST(Future, AnErrorWinsOverAValueAndIsRethrownOnce) {
  Handle h;
  h.state->set_value("ignored");
  h.state->set_error(std::make_exception_ptr(std::domain_error("bad row")));
  h.state->complete();
  try {
    h.future.get();
    ADD_FAILURE() << "no error";
  } catch (const std::domain_error& e) {
    EXPECT_EQ(std::string(e.what()), "bad row");
  }
}

std::string second_word(const std::vector<std::string>& words, std::size_t i) {
  return words[i];
}

TEST(Future, ASharedResultIsMadeWhenRead) {
  auto words = std::make_shared<const std::vector<std::string>>(
      std::vector<std::string>{"zero", "one", "two"});
  Handle h;
  h.state->set_shared<std::vector<std::string>, &second_word>(words, 2);
  h.state->complete();
  EXPECT_EQ(h.future.get(), "two");
  EXPECT_EQ(words.use_count(), 1) << "the reader's state let go of the shared result";
}

// Readers asleep in get() are woken by one wake_all() on the shared word after completion.
TEST(Future, SleepingReadersWakeOnWakeAll) {
  std::atomic<std::uint32_t> wakeups{0};
  constexpr int kReaders = 8;
  std::vector<boost::intrusive_ptr<State>> states;
  std::vector<Future<std::string>> futures;
  for (int i = 0; i < kReaders; ++i) {
    states.emplace_back(new State(&wakeups));
    futures.emplace_back(states.back());
  }
  std::atomic<int> got{0};
  std::vector<std::thread> readers;
  for (int i = 0; i < kReaders; ++i)
    readers.emplace_back([&, i] {
      if (futures[i].get() == std::to_string(i)) got.fetch_add(1);
    });
  std::this_thread::sleep_for(20ms);  // past the readers' spin: they sleep on the word
  for (int i = 0; i < kReaders; ++i) {
    states[i]->set_value(std::to_string(i));
    states[i]->complete();
  }
  State::wake_all(wakeups);
  for (auto& r : readers) r.join();
  EXPECT_EQ(got.load(), kReaders);
}

}  // namespace
}  // namespace syncbatch
