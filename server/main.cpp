// http_server: serves models over HTTP through syncbatch (see protocol.hpp for the endpoints).
//
//   http_server --port 8080 --model mlp:3x256 --mode stacked --policy adaptive:2ms
//   curl -s localhost:8080/v1/infer -H 'Content-Type: application/json' -d "[$(seq -s, 256)]"
//   http_server --port 8080 --config models.json   (several models: see load_config in model.hpp;
//                                                   the flags of one model are then not used)
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>

#include "cpus.hpp"
#include "server.hpp"
#include "syncbatch/error.hpp"
#include "syncbatch/torch/device_sync.hpp"

namespace {

[[noreturn]] void usage(const std::map<std::string, std::string>& flags, const std::string& error) {
  if (!error.empty()) std::fprintf(stderr, "error: %s\n", error.c_str());
  std::fprintf(stderr, "usage: http_server [--flag value]...\nflags (default):\n");
  for (const auto& [k, v] : flags) std::fprintf(stderr, "  --%s (%s)\n", k.c_str(), v.c_str());
  std::exit(error.empty() ? 0 : 2);
}

// A whole number, or 0 for "auto" where `automatic` allows it (the layout from the machine).
long number(const std::map<std::string, std::string>& flags, const std::string& name,
            bool automatic = false) {
  if (automatic && flags.at(name) == "auto") return 0;
  const std::string& v = flags.at(name);
  char* end = nullptr;
  const long n = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || n < 0)
    usage(flags, "--" + name + ": expected a whole number >= 0" +
                     (automatic ? std::string(" or auto") : std::string()) + ", got '" + v + "'");
  return n;
}

bool on_off(const std::map<std::string, std::string>& flags, const std::string& name) {
  const std::string& v = flags.at(name);
  if (v != "on" && v != "off") usage(flags, "--" + name + ": expected on or off, got '" + v + "'");
  return v == "on";
}

// "cuda:0" or "cuda:0+cuda:1" (one replica each).
std::string devices_text(const syncbatch::http::ModelOptions& o) {
  if (o.devices.empty()) return o.device.str();
  std::string out;
  for (const c10::Device d : o.devices) {
    if (!out.empty()) out += '+';
    out += d.str();
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> flags{{"address", "127.0.0.1"},
                                           {"port", "8080"},
                                           {"model", "mlp:3x256"},
                                           {"input-width", "0"},
                                           {"mode", "stacked"},
                                           {"policy", "adaptive:2ms"},
                                           {"device", "auto"},
                                           {"threads", "auto"},
                                           {"workers", "auto"},
                                           {"queue", "4096"},
                                           {"max-body", "1048576"},
                                           {"max-rows", "256"},
                                           {"timeout-ms", "0"},
                                           {"shed", "off"},
                                           {"name", "model"},
                                           {"priority-levels", "2"},
                                           {"config", ""},
                                           {"cancel-on-hangup", "on"},
                                           {"devices", ""},
                                           {"idle-timeout-ms", "60000"},
                                           {"graphs", "off"},
                                           {"max-header", "16384"},
                                           {"max-connections", "4096"}};
  for (int i = 1; i < argc; ++i) {
    std::string f = argv[i];
    if (f == "--help" || f == "-h") usage(flags, "");
    if (f.rfind("--", 0) != 0 || i + 1 >= argc)
      usage(flags, "expected --flag value, got '" + f + "'");
    f = f.substr(2);
    if (!flags.count(f)) usage(flags, "unknown flag --" + f);
    flags[f] = argv[++i];
  }
  using namespace syncbatch;
  try {
    http::ServerOptions options;
    options.address = flags["address"];
    options.port = static_cast<unsigned short>(number(flags, "port"));
    options.threads = static_cast<int>(number(flags, "threads", /*automatic=*/true));
    options.max_body_bytes = static_cast<std::size_t>(number(flags, "max-body"));
    options.max_header_bytes = static_cast<std::size_t>(number(flags, "max-header"));
    options.max_connections = static_cast<std::size_t>(number(flags, "max-connections"));
    options.idle_timeout = std::chrono::milliseconds(number(flags, "idle-timeout-ms"));
    options.cancel_on_hangup = on_off(flags, "cancel-on-hangup");
    std::vector<http::ServedModel> models;
    if (!flags["config"].empty()) {
      std::ifstream in(flags["config"]);
      if (!in) usage(flags, "--config: cannot read '" + flags["config"] + "'");
      std::stringstream text;
      text << in.rdbuf();
      models = http::load_config(text.str());
    } else {
      http::ModelOptions m;
      m.mode = http::parse_mode(flags["mode"]);
      m.policy = SyncPolicy::parse(flags["policy"]);
      m.device = parse_device(flags["device"]);
      m.workers = static_cast<std::size_t>(number(flags, "workers", /*automatic=*/true));
      m.queue_capacity = static_cast<std::size_t>(number(flags, "queue"));
      m.timeout = std::chrono::milliseconds(number(flags, "timeout-ms"));
      m.shed_late = on_off(flags, "shed");
      m.graphs = on_off(flags, "graphs");
      m.max_rows = number(flags, "max-rows");
      m.name = flags["name"];
      m.priority_levels = static_cast<std::size_t>(number(flags, "priority-levels"));
      // --devices cuda:0,cuda:1: one replica on each (MultiDeviceSubmitter); else --device.
      std::stringstream list(flags["devices"]);
      for (std::string d; std::getline(list, d, ',');) m.devices.push_back(parse_device(d));
      if (!flags["devices"].empty() && m.devices.empty())
        usage(flags, "--devices: expected a comma-separated list of devices, got '" +
                         flags["devices"] + "'");
      models.push_back(
          http::load_served(flags["model"], number(flags, "input-width"), std::move(m)));
    }
    std::string described;
    for (const http::ServedModel& m : models)
      described += std::string(described.empty() ? "" : ", ") + m.model.description +
                   " as /v2/models/" + m.options.name + " (" + http::to_string(m.options.mode) +
                   (m.options.graphs ? " with graphs" : "") + ", " + m.options.policy.describe() +
                   ", " + devices_text(m.options) + ")";
    http::Server server(std::move(models), options);
    // The layout it runs, and, where it chose it, from what.
    std::printf("threads: %s (%s%s)\n", server.layout().c_str(),
                http::cpu_budget().describe().c_str(),
                flags["threads"] == "auto" || flags["workers"] == "auto"
                    ? "; auto: io threads half the CPUs, 1 to 8; workers 2 on CUDA, else 1"
                    : "");
    std::printf("listening on http://%s:%u (%s)\n", options.address.c_str(), server.port(),
                described.c_str());
    std::fflush(stdout);
    boost::asio::io_context signals_ctx;
    boost::asio::signal_set signals(signals_ctx, SIGINT, SIGTERM);
    signals.async_wait([&](auto, int) { server.stop(); });
    std::thread signal_thread([&] { signals_ctx.run(); });
    server.wait();
    signals_ctx.stop();
    signal_thread.join();
    std::printf("stopped; stats: %s\n", server.stats_json().c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
