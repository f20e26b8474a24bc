// multi_device: stacked-mode throughput with 1 device against N devices behind one
// MultiDeviceSubmitter, closed-loop clients sending batch-1 CPU tensors (staged to each device).
// Checks every answer first, then prints, for 1, 2, 4 ... and all devices, the throughput and the
// scaling efficiency, throughput(N) / (N * throughput(1)), with each device's share of requests.
#include <cstdio>
#include <string>

#include "flags.hpp"
#include "load.hpp"
#include "mlp.hpp"
#include "report.hpp"
#include "syncbatch/multi_device.hpp"
#include "timing.hpp"

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
  // Requests each of the first n replicas completed: "a / b / ...".
  auto served = [](Multi& multi, std::size_t n) {
    std::string s;
    for (std::size_t r = 0; r < n; ++r)
      s += (r ? " / " : "") + std::to_string(multi.replica(r).stats().completed);
    return s;
  };
  // Device counts compared: 1, 2, 4, ... and all of them.
  std::vector<std::size_t> counts;
  for (std::size_t n = 1; n < devices.size(); n *= 2) counts.push_back(n);
  counts.push_back(devices.size());

  // Before timing: every replica of the widest submitter serves, and every answer equals the
  // first device's own forward of that input.
  {
    auto multi = make(devices.size());
    std::vector<at::Tensor> inputs;
    std::vector<Future<at::Tensor>> futures;
    for (std::size_t i = 0; i < 64 * devices.size(); ++i) {
      inputs.push_back(at::randn({1, width}));
      futures.push_back(multi->submit(inputs.back()));
    }
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      const at::Tensor want = (*mlps[0])(inputs[i].to(devices[0])).cpu();
      const at::Tensor got = futures[i].get().cpu();
      if (!at::allclose(got, want, 1e-4, 1e-5)) {
        std::fprintf(stderr, "multi_device: request %zu's result differs from %s's forward\n", i,
                     devices[0].str().c_str());
        return 1;
      }
    }
    multi->shutdown();
    std::printf(
        "checked: %zu requests over %zu replicas, results equal to %s's forward; "
        "served %s\n",
        inputs.size(), devices.size(), devices[0].str().c_str(),
        served(*multi, devices.size()).c_str());
  }

  std::printf(
      "multi_device: %d-layer MLP width %d, stacked, CPU inputs staged to up to %zu x %s, "
      "LibTorch %s\n\n| clients | devices | req/s | vs 1 device | scaling efficiency | "
      "requests per device |\n|--:|--:|--:|--:|--:|:--|\n",
      layers, width, devices.size(), devices.front().str().c_str(), TORCH_VERSION);
  JsonRows json;
  const auto input = at::randn({1, width});
  for (int clients : flags.ints("clients")) {
    double one = 0;
    for (std::size_t n : counts) {
      auto multi = make(n);
      const double rate = closed_loop(clients, flags.num("warmup"), flags.num("seconds"), [&](int) {
                            return [&] { multi->submit(input).get(); };
                          }).ops_per_s;
      multi->shutdown();
      if (n == 1) one = rate;
      const double efficiency = rate / (static_cast<double>(n) * one);
      std::printf("| %d | %zu | %.0f | %.2fx | %.2f | %s |\n", clients, n, rate, rate / one,
                  efficiency, served(*multi, n).c_str());
      std::fflush(stdout);
      json.row()
          .set("clients", clients)
          .set("devices", static_cast<int>(n))
          .set("req_per_s", rate)
          .set("efficiency", efficiency);
    }
  }
  json.write(flags.str("json"),
             meta_json(devices.front(), {{"bench", "multi_device"},
                                         {"devices", static_cast<double>(devices.size())}}));
  return 0;
}
