// Queue policy: a default timeout for requests without a deadline (REJECT), and load shedding
// of requests that cannot start by their deadline (kOverloaded). Torch-free: this file also runs
// under TSan and ASan.
#include "gate.hpp"
#include "syncbatch/batched_submitter.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>

namespace syncbatch {
namespace {

using namespace std::chrono_literals;
using IntSubmitter = BatchedSubmitter<int, int>;

using testing::code_of;

TEST(QueuePolicy, ADefaultTimeoutRejectsRequestsWithoutADeadline) {
  std::atomic<bool> open{false}, entered{false};
  IntSubmitter s(
      [&](int& x) {
        if (x == 0) {
          entered = true;
          while (!open.load()) std::this_thread::sleep_for(100us);
        }
        return x;
      },
      {.policy = EveryN{1}, .default_timeout = 20ms});
  auto blocker = s.submit(0, Clock::now() + 1h);  // an explicit deadline wins over the default
  while (!entered.load()) std::this_thread::sleep_for(100us);
  auto timed = s.submit(1);  // no deadline: arrival + 20 ms
  auto explicit_deadline = s.submit(2, Clock::now() + 1h);
  std::this_thread::sleep_for(60ms);
  open = true;
  EXPECT_EQ(blocker.get(), 0);
  EXPECT_EQ(code_of(timed), ErrorCode::kDeadlineExceeded);
  EXPECT_EQ(explicit_deadline.get(), 2);
  s.shutdown();
  EXPECT_EQ(s.stats().expired, 1u);
  EXPECT_THROW(IntSubmitter([](int& x) { return x; }, {.default_timeout = -1ms}), Error);
}

// A model that takes 30 ms a batch: once that is measured, a request whose deadline comes before
// the running batch can end is refused at once with kOverloaded; one with room is accepted.
TEST(QueuePolicy, ShedLateRefusesWhatCannotStartByItsDeadline) {
  for (bool shed : {true, false}) {
    IntSubmitter s(
        [](int& x) {
          std::this_thread::sleep_for(30ms);
          return x;
        },
        {.policy = EveryN{1}, .shed_late = shed});
    for (int i = 0; i < 3; ++i) s.submit(i).get();  // measures the batch time
    auto running = s.submit(10);                    // no deadline: never shed
    auto tight = [&] { return s.submit(11, Clock::now() + 5ms); };
    if (shed) {
      try {
        tight();
        ADD_FAILURE() << "a request that cannot start in 5 ms was accepted";
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::kOverloaded);
        EXPECT_NE(std::string(e.what()).find("after its deadline"), std::string::npos) << e.what();
      }
      std::atomic<int> overloaded{0};
      s.submit_then(
          12,
          [&](std::exception_ptr e, int) {
            try {
              if (e) std::rethrow_exception(e);
            } catch (const Error& err) {
              if (err.code() == ErrorCode::kOverloaded) overloaded.fetch_add(1);
            }
          },
          Clock::now() + 5ms);
      EXPECT_EQ(overloaded.load(), 1) << "a shed callback request is refused through on_done";
    } else {
      auto late = tight();  // accepted, and then too late to start
      EXPECT_EQ(code_of(late), ErrorCode::kDeadlineExceeded);
    }
    auto roomy = s.submit(13, Clock::now() + 10s);
    EXPECT_EQ(roomy.get(), 13);
    EXPECT_EQ(running.get(), 10);
    s.shutdown();
    EXPECT_EQ(s.stats().shed, shed ? 2u : 0u);
  }
}

}  // namespace
}  // namespace syncbatch
