#include <syncbatch/syncbatch.hpp>

#include <cstdio>

int main() {
  syncbatch::BatchedSubmitter<int, int> submitter([](int& x) { return x * 2; });
  const int y = submitter.submit(21).get();
  std::printf("syncbatch::core via find_package: %d\n", y);
  return y == 42 ? 0 : 1;
}
