#include <ATen/ATen.h>
#include <syncbatch/torch.hpp>

#include <cstdio>

int main() {
  const auto w = at::randn({4, 8});
  syncbatch::BatchedSubmitter<at::Tensor, at::Tensor, syncbatch::TorchBackend> submitter(
      [&](at::Tensor& x) { return at::matmul(w, x); }, {.policy = syncbatch::EveryN{4}},
      syncbatch::TorchBackend(c10::Device(c10::kCPU)));
  const auto x = at::randn({8});
  const bool ok = at::equal(submitter.submit(x).get(), at::matmul(w, x));
  std::printf("syncbatch %d via find_package: %s\n", SYNCBATCH_VERSION, ok ? "ok" : "WRONG RESULT");
  return ok ? 0 : 1;
}
