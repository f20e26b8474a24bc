// multi_device: stacked-mode throughput with 1 device against N devices behind one
// MultiDeviceSubmitter, closed-loop clients sending batch-1 CPU tensors (staged to each device).
// Prints the scaling efficiency: throughput(N) / (N * throughput(1)).
#include <cstdio>

#include "bench_common.hpp"
#include "syncbatch/multi_device.hpp"

#include <torch/cuda.h>

using namespace syncbatch;
using namespace syncbatch::bench;

int main(int argc, char** argv) {
  const Flags flags(argc, argv,
                    "multi_device: stacked mode on 1 vs N devices (all CUDA devices, or "
                    "--cpu-replicas N CPU replicas where there is no GPU)",
                    {{"clients", "64,256"},
                     {"cpu-replicas", "2"},
                     {"seconds", "1"},
                     {"warmup", "0.3"},
                     {"layers", "3"},
                     {"width", "256"},
                     {"json", ""}});
  pin_threads();
  std::vector<c10::Device> devices;
  for (int i = 0; i < static_cast<int>(torch::cuda::device_count()); ++i)
    devices.emplace_back(c10::kCUDA, static_cast<c10::DeviceIndex>(i));
  if (devices.empty())
    devices.assign(static_cast<std::size_t>(flags.num("cpu-replicas")), c10::Device(c10::kCPU));
  if (devices.empty()) flags.fail("--cpu-replicas: expected at least 1");
  const int width = static_cast<int>(flags.num("width"));
  const int layers = static_cast<int>(flags.num("layers"));
  c10::InferenceMode inference;
  std::vector<std::unique_ptr<Mlp>> mlps;
  for (const auto& d : devices) mlps.push_back(std::make_unique<Mlp>(layers, width, d));

  using Multi = MultiDeviceSubmitter<at::Tensor, at::Tensor, TorchBackend>;
  auto make = [&](std::size_t n) {
    std::vector<Replica<at::Tensor, at::Tensor, TorchBackend>> replicas;
    for (std::size_t i = 0; i < n; ++i) {
      const Mlp& mlp = *mlps[i];
      replicas.push_back({make_stacked_model([&mlp](const at::Tensor& x) { return mlp(x); },
                                             {.device = devices[i]}),
                          TorchBackend(devices[i])});
    }
    return std::make_unique<Multi>(std::move(replicas),
                                   SubmitterOptions{.queue_capacity = 4096, .policy = EveryN{256}});
  };
  std::printf(
      "multi_device: %d-layer MLP width %d, stacked, CPU inputs staged to %zu x %s, "
      "LibTorch %s\n\n| clients | 1 device req/s | %zu devices req/s | scaling efficiency |\n"
      "|--:|--:|--:|--:|\n",
      layers, width, devices.size(), devices.front().str().c_str(), TORCH_VERSION, devices.size());
  JsonRows json;
  const auto input = at::randn({1, width});
  for (int clients : flags.ints("clients")) {
    double rate[2] = {0, 0};
    const std::size_t counts[2] = {1, devices.size()};
    for (int k = 0; k < 2; ++k) {
      auto multi = make(counts[k]);
      rate[k] = closed_loop(clients, flags.num("warmup"), flags.num("seconds"), [&](int) {
                  return [&] { multi->submit(input).get(); };
                }).ops_per_s;
    }
    const double efficiency = rate[1] / (static_cast<double>(devices.size()) * rate[0]);
    std::printf("| %d | %.0f | %.0f | %.2f |\n", clients, rate[0], rate[1], efficiency);
    std::fflush(stdout);
    json.row()
        .set("clients", clients)
        .set("one", rate[0])
        .set("all", rate[1])
        .set("efficiency", efficiency);
  }
  json.write(flags.str("json"),
             meta_json(devices.front(), "\"bench\": \"multi_device\", \"devices\": " +
                                            std::to_string(devices.size())));
  return 0;
}
