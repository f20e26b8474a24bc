// Compile-fail test: a backend whose worker context misspells before_run is refused by
// SubmitterBackend instead of being silently never called. Built twice by run.cmake: with
// SYNCBATCH_CF_GOOD it must compile, without it must fail.
#include "syncbatch/batched_submitter.hpp"

struct MyBackend {
  struct Worker {
    void sync() {}
#ifdef SYNCBATCH_CF_GOOD
    void before_run(syncbatch::Clock::time_point) {}
#else
    void before_Run(syncbatch::Clock::time_point) {}
#endif
  };
  Worker make_worker(std::size_t) const {
    return {};
  }
};

int main() {
  syncbatch::BatchedSubmitter<int, int, MyBackend> s([](int& x) { return x; });
  return s.submit(1).get() == 1 ? 0 : 1;
}
