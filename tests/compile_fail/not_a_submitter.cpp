// Compile-fail test: async_submit takes only a Submitter (Input, Output and submit_then).
// Built twice by run.cmake: with SYNCBATCH_CF_GOOD it must compile, without it must fail.
#include <boost/asio/use_future.hpp>

#include "syncbatch/asio.hpp"

struct NotASubmitter {
  using Input = int;
  using Output = int;
#ifdef SYNCBATCH_CF_GOOD
  template <class F>
  syncbatch::Cancellation<int> submit_then(int x, F f, const syncbatch::RequestOptions&) {
    f(nullptr, x);
    return {};
  }
#else
  int submit(int x) {
    return x;
  }
#endif
};

int main() {
  NotASubmitter s;
  return syncbatch::async_submit(s, 1, boost::asio::use_future).get() == 1 ? 0 : 1;
}
