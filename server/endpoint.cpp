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
  for (const int64_t length : lengths) examples.push_back(example(length, device));
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
  BatchModel<Tensors, Tensors> stacked = make_stacked_model_multi(f, std::move(stacking));
  // Counted by size for Triton's batch_stats: one clock read and one short lock a batch.
  stacked.run = [run = std::move(stacked.run), sizes = batch_sizes](Batch<Tensors, Tensors>& b) {
    const auto start = Clock::now();
    run(b);
    sizes->record(b.size(), Clock::now() - start);
  };
  return stacked;
}

Tensors Endpoint::example(int64_t length, c10::Device device) const {
  Tensors out;
  for (const TensorSpec& t : model.inputs) {
    std::vector<int64_t> shape{1};
    for (const int64_t d : t.shape) shape.push_back(d == kVaries ? length : d);
    out.push_back(at::full(shape, t.pad_value, at::TensorOptions(t.dtype).device(device)));
  }
  return out;
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

namespace {

boost::json::object duration(std::uint64_t count, std::chrono::nanoseconds ns) {
  return {{"count", count}, {"ns", static_cast<std::uint64_t>(std::max<int64_t>(0, ns.count()))}};
}

boost::json::array triton_tensors(const std::vector<TensorSpec>& specs) {
  boost::json::array out;
  for (const TensorSpec& t : specs) {
    boost::json::array dims;
    for (const int64_t d : t.shape) dims.push_back(d);
    if (t.shape.empty()) dims.push_back(-1);  // not described: as the model makes it
    out.push_back(boost::json::object{{"name", t.name},
                                      {"data_type", "TYPE_" + oip::datatype_name(t.dtype)},
                                      {"dims", std::move(dims)}});
  }
  return out;
}

}  // namespace

boost::json::object Endpoint::triton_config() const {
  boost::json::object c{{"name", options.name},
                        {"platform", ""},
                        {"backend", "syncbatch"},
                        {"max_batch_size", options.max_rows},
                        {"input", triton_tensors(model.inputs)},
                        {"output", triton_tensors(model.outputs)}};
  const std::vector<c10::Device> devices =
      options.devices.empty() ? std::vector<c10::Device>{options.device} : options.devices;
  boost::json::array groups;
  for (const c10::Device d : devices) {
    boost::json::object g{{"count", submitter ? options.workers : std::size_t{1}},
                          {"kind", d.is_cuda() ? "KIND_GPU" : "KIND_CPU"}};
    if (d.is_cuda()) g["gpus"] = boost::json::array{d.has_index() ? d.index() : 0};
    groups.push_back(std::move(g));
  }
  c["instance_group"] = std::move(groups);
  const auto text = [](std::string v) { return boost::json::object{{"string_value", v}}; };
  c["parameters"] = boost::json::object{{"mode", text(to_string(options.mode))},
                                        {"policy", text(options.policy.describe())},
                                        {"graphs", text(options.graphs ? "true" : "false")}};
  if (!submitter) return c;  // per-op: no batcher
  std::uint64_t delay_us = 0;
  if (const auto* t = std::get_if<TimeBased>(&options.policy.variant()))
    delay_us = static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::microseconds>(t->max_delay).count());
  boost::json::array preferred;
  for (const int64_t b : options.batch_buckets) preferred.push_back(b);
  c["dynamic_batching"] = boost::json::object{
      {"preferred_batch_size", std::move(preferred)},
      {"max_queue_delay_microseconds", delay_us},
      {"priority_levels", options.priority_levels},
      // The lowest, which parameters.priority 0 (or none) gets.
      {"default_priority_level", options.priority_levels},
      {"default_queue_policy",
       boost::json::object{{"timeout_action", "REJECT"},
                           {"default_timeout_microseconds",
                            static_cast<std::uint64_t>(options.timeout.count()) * 1000},
                           {"allow_timeout_override", true},
                           {"max_queue_size", options.queue_capacity}}}};
  return c;
}

boost::json::object Endpoint::triton_stats() const {
  const Metrics::Totals t = metrics.totals();
  boost::json::object inference{{"success", duration(t.success, t.success_time)},
                                {"fail", duration(t.fail, t.fail_time)},
                                {"cache_hit", duration(0, {})},
                                {"cache_miss", duration(0, {})}};
  std::uint64_t executions = t.success + t.fail;  // per-op: one forward a request
  boost::json::array batches;
  if (submitter) {
    const SubmitterStats s = stats();
    executions = s.batches;
    inference["queue"] = duration(s.queue_delay.count,
                                  s.queue_delay.mean * static_cast<int64_t>(s.queue_delay.count));
    inference["compute_input"] = duration(s.batches, {});
    inference["compute_infer"] = duration(s.batches, s.run_time + s.sync_time);
    inference["compute_output"] = duration(s.batches, s.complete_time);
    for (const auto& [size, e] : batch_sizes->snapshot())
      batches.push_back(boost::json::object{{"batch_size", size},
                                            {"compute_input", duration(e.count, {})},
                                            {"compute_infer", duration(e.count, e.time)},
                                            {"compute_output", duration(e.count, {})}});
  } else {
    for (const char* k : {"queue", "compute_input", "compute_output"})
      inference[k] = duration(0, {});
    inference["compute_infer"] = duration(t.success + t.fail, t.success_time + t.fail_time);
  }
  return {{"name", options.name},
          {"version", "1"},
          {"last_inference", t.last_ms},
          {"inference_count", t.success},
          {"execution_count", executions},
          {"inference_stats", std::move(inference)},
          {"batch_stats", std::move(batches)}};
}

}  // namespace syncbatch::http
