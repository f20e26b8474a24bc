// One model as the server serves it. See endpoint.hpp.
#include "endpoint.hpp"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <stdexcept>

#include "cpus.hpp"

namespace syncbatch::http {
namespace {

at::Tensor to_host_async(const at::Tensor& y) {
  if (y.device().is_cpu()) return y;
  at::Tensor host = at::empty(y.sizes(), y.options().device(c10::kCPU).pinned_memory(y.is_cuda()));
  host.copy_(y, /*non_blocking=*/true);  // complete when the batch's sync is
  return host;
}

// The graphs of a model's replicas, summed: what /stats shows of them.
boost::json::object graphs_object(const std::vector<GraphedMultiModel>& models) {
  std::uint64_t captured = 0, held = 0, replays = 0, eager_runs = 0, failures = 0, evictions = 0;
  std::string unavailable, last_fallback;
  for (const GraphedMultiModel& m : models) {
    const GraphStats g = m.stats();
    captured += g.captured;
    held += g.graphs;
    replays += g.replays;
    eager_runs += g.eager_runs;
    failures += g.capture_failures;
    evictions += g.evictions;
    if (!g.unavailable_reason.empty()) unavailable = g.unavailable_reason;
    if (!g.last_fallback.empty()) last_fallback = g.last_fallback;
  }
  return {{"captured", captured},         {"held", held},
          {"replays", replays},           {"eager_runs", eager_runs},
          {"capture_failures", failures}, {"evictions", evictions},
          {"unavailable", unavailable},   {"last_fallback", last_fallback}};
}

}  // namespace

Endpoint::Endpoint(ServedModel served)
    : model(std::move(served.model)), options(std::move(served.options)) {
  const bool cuda = options.devices.empty()
                        ? options.device.is_cuda()
                        : std::all_of(options.devices.begin(), options.devices.end(),
                                      [](c10::Device d) { return d.is_cuda(); });
  if (options.workers == 0)  // from the machine
    options.workers = default_layout(cpu_budget().usable(), cuda).workers;
  const ModelOptions& o = options;
  const std::string what = "model '" + o.name + "': ";
  if (!model.forward || model.inputs.empty() || model.outputs.empty())
    throw std::invalid_argument(what + "expected a forward function, inputs and outputs");
  if (o.name.empty() || o.name.find('/') != std::string::npos)
    throw std::invalid_argument("Server: expected a model name without '/', got '" + o.name + "'");
  if (o.priority_levels < 1)
    throw std::invalid_argument(what + "expected at least 1 priority level, got 0");
  if (o.timeout.count() < 0)
    throw std::invalid_argument(what + "expected a timeout >= 0 ms, got " +
                                std::to_string(o.timeout.count()));
  if (o.shed_late && o.timeout.count() == 0)
    throw std::invalid_argument(what + "shedding needs a timeout to predict against, got none");
  if (served.replicas.size() != o.devices.size())
    throw std::invalid_argument(what + "expected one replica per device (" +
                                std::to_string(o.devices.size()) + "), got " +
                                std::to_string(served.replicas.size()));
  if (o.graphs && o.mode != Mode::kStacked)
    throw std::invalid_argument(what + "graphs are replayed in stacked mode, got " +
                                to_string(o.mode));
  if (o.graphs && o.length_buckets.empty())
    for (const TensorSpec& t : model.inputs)
      if (std::find(t.shape.begin(), t.shape.end(), kVaries) != t.shape.end())
        throw std::invalid_argument(what + "graphs of input '" + t.name +
                                    "' (a varying dim) need length_buckets, got none");
  if (!o.devices.empty() && o.mode == Mode::kPerOp)
    throw std::invalid_argument(what + "per-op mode runs on one device; got " +
                                std::to_string(o.devices.size()) +
                                " devices (serve them per-call or stacked)");
  for (const auto& specs : {model.inputs, model.outputs})
    for (const TensorSpec& t : specs) oip::datatype_name(t.dtype);  // one the protocol names
  info = {o.name, model.inputs, model.outputs};
  v1 = model.inputs.size() == 1 && model.inputs[0].dtype == at::kFloat &&
       model.inputs[0].shape.size() == 1 && model.inputs[0].shape[0] >= 1;
  if (o.mode == Mode::kPerOp) return;
  const SubmitterOptions sopts{.queue_capacity = o.queue_capacity,
                               .on_full = OverflowPolicy::kReject,
                               .workers = o.workers,
                               .policy = o.policy,
                               .default_timeout = o.timeout,
                               .shed_late = o.shed_late,
                               .priority_levels = o.priority_levels,
                               .default_priority = o.priority_levels - 1};
  std::vector<Replica<Tensors, Tensors, TorchBackend>> replicas;
  if (o.devices.empty()) {
    replicas.push_back(replica(model.forward, o.device));
  } else {
    for (std::size_t i = 0; i < o.devices.size(); ++i)
      replicas.push_back(replica(served.replicas[i].forward, o.devices[i]));
  }
  submitter.emplace(std::move(replicas), sopts);
  if (o.mode == Mode::kStacked && cuda) pin_from_bytes = kDirectStagingBytes;
}

// The forward `f` served on `device`: with graphs, replayed by a GraphedMultiModel whose every
// bucket each worker captures before it takes a request.
Replica<Tensors, Tensors, TorchBackend> Endpoint::replica(const Model::Forward& f,
                                                          c10::Device device) {
  if (!options.graphs) return {replica_model(f, device), TorchBackend(device)};
  const std::vector<int64_t> rows = options.batch_buckets.empty()
                                        ? RowBuckets::powers_of_two(256).sizes()
                                        : options.batch_buckets;
  const std::vector<int64_t> lengths =
      options.length_buckets.empty() ? std::vector<int64_t>{1} : options.length_buckets;
  const std::string name = options.name;
  GraphedMultiModel graphed(f, device,
                            {.buckets = rows,
                             .capture_on_first_use = false,
                             .max_graphs = options.workers * rows.size() * lengths.size(),
                             .log = [name](const std::string& why) {
                               std::fprintf(stderr, "model '%s': graphs: %s\n", name.c_str(),
                                            why.c_str());
                             }});
  graphs.push_back(graphed);
  // One example per length bucket: a row of each input, its varying dims at that length.
  std::vector<Tensors> examples;
  for (const int64_t length : lengths) {
    Tensors example;
    for (const TensorSpec& t : model.inputs) {
      std::vector<int64_t> shape{1};
      for (const int64_t d : t.shape) shape.push_back(d == kVaries ? length : d);
      example.push_back(at::full(shape, t.pad_value, at::TensorOptions(t.dtype).device(device)));
    }
    examples.push_back(std::move(example));
  }
  return {replica_model(graphed, device),
          TorchBackend(device, {.on_worker_start = [graphed, examples] {
                         for (const Tensors& example : examples) graphed.warm_up(example);
                       }})};
}

// The submitter model of the forward `f` on `device`, in the endpoint's mode.
SubmitterModel<Tensors, Tensors> Endpoint::replica_model(const Model::Forward& f,
                                                         c10::Device device) const {
  if (options.mode == Mode::kPerCall)
    return [f, device](Tensors& x) {
      for (at::Tensor& t : x) t = t.to(device, /*non_blocking=*/true);
      Tensors y = f(x);
      for (at::Tensor& t : y) t = to_host_async(t);
      return y;
    };
  StackingOptions stacking{.device = device, .output_device = c10::Device(c10::kCPU)};
  for (const TensorSpec& t : model.inputs)
    stacking.expect.push_back(InputSpec{t.dtype, t.shape, t.pad_value});
  if (!options.batch_buckets.empty())
    stacking.batch_buckets = RowBuckets(options.batch_buckets, "batch_buckets");
  if (!options.length_buckets.empty())
    stacking.length_buckets = RowBuckets(options.length_buckets, "length_buckets");
  stacking.max_padding = options.max_padding;
  return make_stacked_model_multi(f, std::move(stacking));
}

SubmitterStats Endpoint::stats() const {
  return submitter->replicas() == 1 ? submitter->replica(0).stats() : submitter->stats();
}

Tensors Endpoint::run_here(Tensors inputs) const {
  for (at::Tensor& t : inputs) t = t.to(options.device);
  Tensors y = model.forward(inputs);
  for (at::Tensor& t : y) t = t.to(c10::kCPU);
  return y;
}

boost::json::object Endpoint::stats_object() const {
  boost::json::object o;
  if (submitter) {
    o = submitter_stats_object(stats());
    if (submitter->replicas() > 1) {  // and each device's
      boost::json::array replicas;
      for (std::size_t i = 0; i < submitter->replicas(); ++i) {
        boost::json::object r = submitter_stats_object(submitter->replica(i).stats());
        r["device"] = options.devices[i].str();
        replicas.push_back(std::move(r));
      }
      o["replicas"] = std::move(replicas);
    }
  }
  if (!graphs.empty()) o["graphs"] = graphs_object(graphs);
  return o;
}

}  // namespace syncbatch::http
