// The HTTP server's protocol layer (see protocol.hpp).
#include "protocol.hpp"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string_view>
#include <tuple>
#include <variant>
#include <vector>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/json.hpp>

#include "http1.hpp"
#include "metrics.hpp"
#include "oip.hpp"
#include "protocol_error.hpp"
#include "syncbatch/asio.hpp"
#include "syncbatch/multi_device.hpp"
#include "syncbatch/torch.hpp"
#include "syncbatch/version.hpp"
#include "text.hpp"
#include "v1.hpp"

namespace syncbatch::http {
namespace net = boost::asio;
namespace bh = boost::beast::http;

namespace {

std::string version_string() {
  return std::to_string(SYNCBATCH_VERSION_MAJOR) + "." + std::to_string(SYNCBATCH_VERSION_MINOR) +
         "." + std::to_string(SYNCBATCH_VERSION_PATCH);
}

// GET, or HEAD: answered as GET is, the transport leaving out the body (RFC 9110 9.3.2).
bool is_get(const Request& req) {
  return req.method() == bh::verb::get || req.method() == bh::verb::head;
}

// `now` + `timeout` as a deadline, or none (time_point::max()) where that is past half of
// what the clock can still count (about 146 years): a timeout that large sets no practical
// limit, and the request runs, where the sum would overflow into the past. Half, so that the
// library's own arithmetic on the deadline keeps its room.
Clock::time_point deadline_after(Clock::time_point now, std::chrono::microseconds timeout) {
  const auto room =
      std::chrono::duration_cast<std::chrono::microseconds>(Clock::time_point::max() - now);
  if (timeout >= room / 2) return Clock::time_point::max();
  return now + timeout;
}

// The Inference-Header-Content-Length of a request (binary tensor data): none without the
// field. Errors: ProtocolError 400 for a value that is not a length, or for two fields that
// differ (which would frame the JSON header two ways).
std::optional<std::size_t> inference_header_length(const Request& req) {
  std::optional<std::size_t> out;
  const auto range = req.equal_range("Inference-Header-Content-Length");
  for (auto it = range.first; it != range.second; ++it) {
    const auto hl = it->value();
    std::size_t n = 0;
    const auto [ptr, ec] = std::from_chars(hl.data(), hl.data() + hl.size(), n);
    if (ec != std::errc{} || ptr != hl.data() + hl.size() || hl.empty())
      throw bad_request("Inference-Header-Content-Length: expected a length in bytes, got '" +
                        excerpt(std::string_view(hl.data(), hl.size())) + "'");
    if (out && *out != n)
      throw bad_request("Inference-Header-Content-Length: expected one length, got " +
                        std::to_string(*out) + " and " + std::to_string(n));
    out = n;
  }
  return out;
}

at::Tensor to_host_async(const at::Tensor& y) {
  if (y.device().is_cpu()) return y;
  at::Tensor host = at::empty(y.sizes(), y.options().device(c10::kCPU).pinned_memory(y.is_cuda()));
  host.copy_(y, /*non_blocking=*/true);  // complete when the batch's sync is
  return host;
}

boost::json::object stats_object(const SubmitterStats& s) {
  boost::json::object o;
  o["submitted"] = s.submitted;
  o["rejected"] = s.rejected;
  o["completed"] = s.completed;
  o["failed"] = s.failed;
  o["cancelled"] = s.cancelled;  // of failed (a client that hung up while queued, say)
  o["expired"] = s.expired;      // of failed: not started by their deadline
  o["batches"] = s.batches;
  o["syncs"] = s.syncs;
  o["queued"] = s.queued;
  o["batch_limit"] = s.batch_limit;
  o["mean_batch_size"] = s.mean_batch_size();
  o["latency_p50_us"] = static_cast<double>(s.latency.p50.count()) / 1e3;
  o["latency_p99_us"] = static_cast<double>(s.latency.p99.count()) / 1e3;
  o["recent_latency_p99_us"] = static_cast<double>(s.recent_latency.p99.count()) / 1e3;
  o["queue_delay_p50_us"] = static_cast<double>(s.queue_delay.p50.count()) / 1e3;
  // The workers' time by phase (SubmitterStats): next to the uptime, how busy they are.
  const auto seconds = [](auto d) { return std::chrono::duration<double>(d).count(); };
  o["worker_run_s"] = seconds(s.run_time);
  o["worker_sync_s"] = seconds(s.sync_time);
  o["worker_complete_s"] = seconds(s.complete_time);
  return o;
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

// One model as the server serves it.
struct Endpoint {
  using Submitter = MultiDeviceSubmitter<Tensors, Tensors, TorchBackend>;

  Endpoint(ServedModel served)
      : model(std::move(served.model)), options(std::move(served.options)) {
    const ModelOptions& o = options;
    const std::string what = "model '" + o.name + "': ";
    if (!model.forward || model.inputs.empty() || model.outputs.empty())
      throw std::invalid_argument(what + "expected a forward function, inputs and outputs");
    if (o.name.empty() || o.name.find('/') != std::string::npos)
      throw std::invalid_argument("Server: expected a model name without '/', got '" + o.name +
                                  "'");
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
    const bool cuda = o.devices.empty() ? o.device.is_cuda()
                                        : std::all_of(o.devices.begin(), o.devices.end(),
                                                      [](c10::Device d) { return d.is_cuda(); });
    if (o.mode == Mode::kStacked && cuda) pin_from_bytes = kDirectStagingBytes;
  }

  // The forward `f` served on `device`: with graphs, replayed by a GraphedMultiModel whose every
  // bucket each worker captures before it takes a request.
  Replica<Tensors, Tensors, TorchBackend> replica(const Model::Forward& f, c10::Device device) {
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
  SubmitterModel<Tensors, Tensors> replica_model(const Model::Forward& f,
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

  // The submitter's stats: with one device, its replica's (latency percentiles and batch
  // limit included); with several, their sum (MultiDeviceSubmitter::stats).
  SubmitterStats stats() const {
    return submitter->replicas() == 1 ? submitter->replica(0).stats() : submitter->stats();
  }

  Model model;
  ModelOptions options;
  oip::ModelInfo info;
  bool v1 = false;  // takes /v1/infer's one float32 [rows, width] input
  Metrics metrics;
  std::optional<Submitter> submitter;
  std::vector<GraphedMultiModel> graphs;  // with options.graphs: each replica's
  // Stacked on CUDA: inputs this large are parsed into pinned memory (oip::parse_infer).
  std::size_t pin_from_bytes = 0;
};

// An inference request between Protocol::begin() and its answer.
struct Protocol::Call::State {
  State(Endpoint& endpoint, unsigned v, bool is_v1) : e(&endpoint), version(v), v1(is_v1) {}

  // Counts the answer in /metrics (in flight since begin()).
  void done(const Response& res) {
    e->metrics.end();
    e->metrics.record(res.result_int(), Clock::now() - start);
    answered = true;
  }

  Endpoint* e;
  unsigned version;
  bool v1;  // /v1/infer: answered as `decoded` came; otherwise as `request` asks
  Clock::time_point start;
  bool answered = false;
  Tensors inputs;
  RequestOptions control;
  v1::Decoded decoded;        // /v1 (its values already in inputs)
  oip::InferRequest request;  // /v2 (its inputs moved to inputs)
};

Response text_response(bh::status status, const std::string& message, unsigned version) {
  Response res(status, version);
  res.set(bh::field::content_type, "text/plain; charset=utf-8");
  res.body() = message + "\n";
  return res;
}

struct Protocol::Impl {
  explicit Impl(std::vector<ServedModel> models) {
    if (models.empty()) throw std::invalid_argument("Server: expected at least 1 model, got 0");
    for (ServedModel& m : models) {
      for (const auto& e : endpoints)
        if (e->options.name == m.options.name)
          throw std::invalid_argument("Server: expected unique model names, got '" +
                                      m.options.name + "' twice");
      endpoints.push_back(std::make_unique<Endpoint>(std::move(m)));
    }
  }

  Endpoint* find(std::string_view name) {
    for (auto& e : endpoints)
      if (e->options.name == name) return e.get();
    return nullptr;
  }

  std::string model_names() const {
    return quoted_names(endpoints, [](const auto& e) { return e->options.name; });
  }

  // "/v2/models/{name}..." split into the name and what follows it; none for other targets.
  static std::optional<std::pair<std::string_view, std::string_view>> model_path(
      std::string_view target) {
    constexpr std::string_view kModels = "/v2/models/";
    if (!target.starts_with(kModels)) return std::nullopt;
    const std::string_view rest = target.substr(kModels.size());
    const std::string_view name = rest.substr(0, rest.find('/'));
    return std::pair{name, rest.substr(name.size())};
  }

  // Inference requests are timed and counted for /metrics, by model, from here to finish() or
  // gone(); the rest are answered as they come. Plain functions: a request reaches its model's
  // submitter with no coroutine frame of the protocol's (Protocol::Call).
  std::variant<Response, Call> begin(const Request& req) {
    const std::string_view target(req.target().data(), req.target().size());
    Endpoint* e = nullptr;
    if (req.method() == bh::verb::post) {
      if (target == "/v1/infer" && endpoints.front()->v1) e = endpoints.front().get();
      if (const auto path = model_path(target); path && target.ends_with("/infer"))
        e = find(path->first);
    }
    if (e == nullptr) return route(req, target);
    const auto start = Clock::now();
    e->metrics.begin();
    std::variant<Response, Call> step = route(req, target);
    if (Call* call = std::get_if<Call>(&step)) {
      call->s_->start = start;
    } else {
      e->metrics.end();
      e->metrics.record(std::get<Response>(step).result_int(), Clock::now() - start);
    }
    return step;
  }

  // The answer to a call whose model ran (or failed, or refused it), counted.
  static Response finish(Call::State& s, std::exception_ptr error, Tensors y) {
    Response res = answer(s, std::move(error), std::move(y));
    s.done(res);
    return res;
  }

  // The answer to `s` in its protocol: its outputs `y`, or its `error`.
  static Response answer(const Call::State& s, std::exception_ptr error, Tensors y) {
    if (!error) {
      try {
        return s.v1 ? v1_answer(s, std::move(y)) : v2_answer(s, std::move(y));
      } catch (...) {
        error = std::current_exception();
      }
    }
    return error_response(s, std::move(error));
  }

  std::variant<Response, Call> route(const Request& req, std::string_view target) {
    const unsigned v = req.version();
    if (target == "/v2" || target.starts_with("/v2/")) return handle_v2(req, target);
    if (target == "/metrics") {
      if (!is_get(req)) return method_not_allowed("GET, HEAD", v);
      Response res(bh::status::ok, v);
      res.set(bh::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
      std::vector<Metrics::Exposed> exposed;
      for (const auto& e : endpoints)
        exposed.push_back(
            {e->options.name, &e->metrics,
             e->submitter ? std::optional<SubmitterStats>(e->stats()) : std::nullopt});
      res.body() = Metrics::prometheus(exposed);
      return res;
    }
    if (target == "/healthz" || target == "/stats") {
      if (!is_get(req)) return method_not_allowed("GET, HEAD", v);
      if (target == "/healthz") return text_response(bh::status::ok, "ok", v);
      Response res(bh::status::ok, v);
      res.set(bh::field::content_type, "application/json");
      res.body() = stats_json();
      return res;
    }
    if (target != "/v1/infer")
      return text_response(bh::status::not_found,
                           "no such endpoint: expected /v2/..., POST /v1/infer, GET /healthz, "
                           "GET /metrics or GET /stats, got " +
                               excerpt(target),
                           v);
    if (req.method() != bh::verb::post) return method_not_allowed("POST", v);
    Endpoint& e = *endpoints.front();
    if (!e.v1)
      return text_response(bh::status::not_found,
                           "/v1/infer serves a model of one float32 [rows, width] input, and '" +
                               e.options.name + "' is not one: use /v2/models/" + e.options.name +
                               "/infer",
                           v);
    auto s = std::make_unique<Call::State>(e, v, /*v1=*/true);
    try {
      const int64_t width = e.model.inputs[0].shape[0];
      const auto ct = req[bh::field::content_type];
      s->decoded = v1::decode(std::string_view(ct.data(), ct.size()),
                              std::string_view(req.body().data(), req.body().size()), width,
                              e.options.max_rows);
      s->inputs.push_back(
          at::from_blob(s->decoded.values.data(), {s->decoded.rows, width}, at::kFloat).clone());
      s->decoded.values = {};
    } catch (...) {
      return error_response(*s, std::current_exception());
    }
    return call_or_answer(std::move(s));
  }

  // `s` as a call for its submitter, or, for a model served per-op, answered here: forwarded on
  // this thread, which waits for it (the copy to the host syncs this thread's stream).
  static std::variant<Response, Call> call_or_answer(std::unique_ptr<Call::State> s) {
    if (s->e->submitter) return Call(std::move(s));
    Tensors y;
    std::exception_ptr error;
    try {
      for (at::Tensor& t : s->inputs) t = t.to(s->e->options.device);
      y = s->e->model.forward(s->inputs);
      for (at::Tensor& t : y) t = t.to(c10::kCPU);
    } catch (...) {
      error = std::current_exception();
    }
    return answer(*s, std::move(error), std::move(y));
  }

  static Response v1_answer(const Call::State& s, Tensors y) {
    const at::Tensor out = y.at(0).to(at::kFloat).contiguous().view({y.at(0).size(0), -1});
    v1::Answer a = v1::encode(out.data_ptr<float>(), out.size(0), out.size(1), s.decoded);
    Response res(bh::status::ok, s.version);
    res.set(bh::field::content_type, a.content_type);
    if (!a.shape.empty()) res.set("X-Output-Shape", a.shape);
    res.body() = std::move(a.body);
    return res;
  }

  // What a call's failure `error` comes to, in either protocol: a client's mistake is the
  // ProtocolError it threw; the library's refusals are 503, 504 or 400 (status_of); anything
  // else is the server's fault, a 500 whose message names the model, the request and the error's
  // first line, its whole text (a LibTorch backtrace, say) going to the server's log only.
  static ProtocolError failure(const Call::State& s, std::exception_ptr error) {
    try {
      std::rethrow_exception(error);
    } catch (const ProtocolError& ex) {
      return ex;
    } catch (const Error& ex) {
      // /v1 requests have no deadline of their own: only the queue timeout can pass.
      if (auto refused =
              status_of(ex, s.v1 ? "not started within the queue timeout of " +
                                       std::to_string(s.e->options.timeout.count()) + " ms"
                                 : std::string("not started in time: ") + ex.what()))
        return *refused;
      return internal(s, ex.what(), ex.what());
    } catch (const c10::Error& ex) {
      return internal(s, ex.what_without_backtrace(), ex.what());
    } catch (const std::exception& ex) {
      return internal(s, ex.what(), ex.what());
    } catch (...) {
      return internal(s, "an exception of unknown type", "an exception of unknown type");
    }
  }

  // The 500 of a request the server failed: logged whole, answered short.
  static ProtocolError internal(const Call::State& s, std::string_view what,
                                std::string_view full) {
    static std::atomic<std::uint64_t> logged{0};
    const std::uint64_t n = logged.fetch_add(1) + 1;
    const std::string request =
        s.request.id ? "'" + excerpt(*s.request.id) + "'" : "#" + std::to_string(n);
    std::fprintf(stderr, "model '%s': request %s (failure #%llu) failed: %.*s\n",
                 s.e->options.name.c_str(), request.c_str(), static_cast<unsigned long long>(n),
                 static_cast<int>(full.size()), full.data());
    return {500, "model '" + s.e->options.name + "': inference failed for request " + request +
                     ": " + excerpt(what.substr(0, what.find('\n')), 200) +
                     " (the server's log has failure #" + std::to_string(n) + ")"};
  }

  // The answer to a call that failed with `error`, in its protocol's format.
  static Response error_response(const Call::State& s, std::exception_ptr error) {
    return error_response(failure(s, std::move(error)), s.v1, s.version);
  }

  // `e` answered as /v1 (text/plain) or the Open Inference Protocol ({"error": ...}) answer;
  // 503 says when to retry.
  static Response error_response(const ProtocolError& e, bool text, unsigned v) {
    const auto status = static_cast<bh::status>(e.status);
    Response res = text ? text_response(status, e.message, v)
                        : json_response(status, oip::error_body(e.message), v);
    if (status == bh::status::service_unavailable) res.set(bh::field::retry_after, "1");
    return res;
  }

  static Response json_response(bh::status status, std::string body, unsigned v) {
    Response res(status, v);
    res.set(bh::field::content_type, "application/json");
    res.body() = std::move(body);
    return res;
  }

  static Response oip_error(int status, const std::string& message, unsigned v) {
    return json_response(static_cast<bh::status>(status), oip::error_body(message), v);
  }

  // The Open Inference Protocol's endpoints (see protocol.hpp).
  std::variant<Response, Call> handle_v2(const Request& req, std::string_view target) {
    const unsigned v = req.version();
    auto need_get = [&]() -> std::optional<Response> {
      if (is_get(req)) return std::nullopt;
      Response res = oip_error(405, "expected method GET or HEAD", v);
      res.set(bh::field::allow, "GET, HEAD");
      return res;
    };
    if (target == "/v2") {
      if (auto r = need_get()) return std::move(*r);
      return json_response(bh::status::ok, oip::server_metadata(version_string()), v);
    }
    if (target == "/v2/health/live" || target == "/v2/health/ready") {
      if (auto r = need_get()) return std::move(*r);
      // Ready while accepting: a stopping server is live but not ready (4xx, as the protocol
      // says, so that balancers take it out).
      const bool ready = target.ends_with("live") || !stopping.load();
      return Response(ready ? bh::status::ok : bh::status::bad_request, v);  // no body
    }
    const auto path = model_path(target);
    if (!path) return oip_error(404, "no such endpoint: " + excerpt(target), v);
    const std::string_view name = path->first;
    std::string_view action = path->second;
    Endpoint* found = find(name);
    if (found == nullptr)
      return oip_error(
          404, "unknown model '" + excerpt(name) + "': this server serves " + model_names(), v);
    Endpoint& e = *found;
    constexpr std::string_view kVersions = "/versions/";
    if (action.starts_with(kVersions)) {  // the one version there is: "1"
      const std::string_view version =
          action.substr(kVersions.size()).substr(0, action.substr(kVersions.size()).find('/'));
      if (version != "1")
        return oip_error(404,
                         "unknown version '" + excerpt(version) + "' of model '" + e.options.name +
                             "': it has version '1'",
                         v);
      action = action.substr(kVersions.size() + version.size());
    }
    if (action.empty()) {
      if (auto r = need_get()) return std::move(*r);
      return json_response(bh::status::ok, oip::model_metadata(e.info), v);
    }
    if (action == "/ready") {
      if (auto r = need_get()) return std::move(*r);
      return Response(stopping.load() ? bh::status::bad_request : bh::status::ok, v);
    }
    if (action != "/infer")
      return oip_error(404,
                       "no such endpoint: expected /v2/models/" + e.options.name +
                           ", its /ready or its /infer, got " + excerpt(target),
                       v);
    if (req.method() != bh::verb::post) {
      Response res = oip_error(405, "expected method POST", v);
      res.set(bh::field::allow, "POST");
      return res;
    }
    auto s = std::make_unique<Call::State>(e, v, /*v1=*/false);
    try {
      const auto ct = req[bh::field::content_type];
      const std::string_view type(ct.data(), ct.size());
      const std::string base = media_type(type);
      if (!type.empty() && base != "application/json" && base != "application/octet-stream")
        throw ProtocolError{415,
                            "expected Content-Type application/json (or "
                            "application/octet-stream with binary data), got '" +
                                excerpt(type) + "'"};
      const std::optional<std::size_t> header_length = inference_header_length(req);
      s->request = oip::parse_infer(std::string_view(req.body().data(), req.body().size()),
                                    header_length, e.info, e.options.max_rows, e.pin_from_bytes);
      const oip::InferRequest& r = s->request;
      if (r.priority && *r.priority >= e.options.priority_levels)
        throw bad_request("parameters.priority: expected a level below " +
                          std::to_string(e.options.priority_levels) + " (0 the highest), got " +
                          std::to_string(*r.priority));
      if (r.timeout) s->control.deadline = deadline_after(Clock::now(), *r.timeout);
      s->control.priority = r.priority;
      s->inputs = std::move(s->request.inputs);
    } catch (...) {
      return error_response(*s, std::current_exception());
    }
    return call_or_answer(std::move(s));
  }

  static Response v2_answer(const Call::State& s, Tensors y) {
    oip::Encoded answer = oip::infer_response(s.e->info, s.request, y);
    Response res(bh::status::ok, s.version);
    res.set(bh::field::content_type,
            answer.header_length ? "application/octet-stream" : "application/json");
    if (answer.header_length)
      res.set("Inference-Header-Content-Length", std::to_string(*answer.header_length));
    res.body() = std::move(answer.body);
    return res;
  }

  // The status and message of a request the library refused or failed for a reason of the
  // request's own; `expired` is the message for one whose deadline passed before it started
  // (each protocol words its own). None for the server's own failures (a sync that threw).
  static std::optional<ProtocolError> status_of(const Error& e, std::string expired) {
    switch (e.code()) {
      case ErrorCode::kQueueFull:
        return ProtocolError{503, "the inference queue is full; retry shortly"};
      case ErrorCode::kOverloaded:
        return ProtocolError{503, std::string("overloaded: ") + e.what()};
      case ErrorCode::kShutDown:
        return ProtocolError{503, "the server is shutting down"};
      case ErrorCode::kDeadlineExceeded:
        return ProtocolError{504, std::move(expired)};
      case ErrorCode::kBadRequest:
        return ProtocolError{400, e.what()};
      default:
        return std::nullopt;
    }
  }

  // The answer to a client that hung up: never read, but counted in /metrics as 499 (nginx's
  // "client closed request").
  static Response gone(unsigned v) {
    Response res(static_cast<bh::status>(499), v);
    res.keep_alive(false);
    return res;
  }

  static Response method_not_allowed(const char* allowed, unsigned v) {
    Response res =
        text_response(bh::status::method_not_allowed, std::string("expected method ") + allowed, v);
    res.set(bh::field::allow, allowed);
    return res;
  }

  std::string stats_json() const {
    boost::json::object out;
    for (const auto& e : endpoints) {
      boost::json::object o;
      if (e->submitter) {
        o = stats_object(e->stats());
        if (e->submitter->replicas() > 1) {  // and each device's
          boost::json::array replicas;
          for (std::size_t i = 0; i < e->submitter->replicas(); ++i) {
            boost::json::object r = stats_object(e->submitter->replica(i).stats());
            r["device"] = e->options.devices[i].str();
            replicas.push_back(std::move(r));
          }
          o["replicas"] = std::move(replicas);
        }
      }
      if (!e->graphs.empty()) o["graphs"] = graphs_object(e->graphs);
      out[e->options.name] = std::move(o);
    }
    return boost::json::serialize(out);
  }

  std::vector<std::unique_ptr<Endpoint>> endpoints;
  std::atomic<bool> stopping{false};
};

Protocol::Protocol(std::vector<ServedModel> models)
    : impl_(std::make_unique<Impl>(std::move(models))) {}
Protocol::~Protocol() = default;

Protocol::Call::Call(std::unique_ptr<State> s) noexcept : s_(std::move(s)) {}
Protocol::Call::Call(Call&&) noexcept = default;
Protocol::Call& Protocol::Call::operator=(Call&&) noexcept = default;
Protocol::Call::~Call() {
  if (s_ && !s_->answered) s_->e->metrics.end();  // dropped unanswered: no longer in flight
}

Cancellation<Tensors> Protocol::Call::submit(
    std::function<void(std::exception_ptr, Tensors)> done) {
  return s_->e->submitter->submit_then(std::move(s_->inputs), std::move(done), s_->control);
}

std::variant<Response, Protocol::Call> Protocol::begin(const Request& request) {
  return impl_->begin(request);
}

Response Protocol::finish(Call call, std::exception_ptr error, Tensors outputs) {
  return Impl::finish(*call.s_, std::move(error), std::move(outputs));
}

Response Protocol::gone(Call call) {
  Response res = Impl::gone(call.s_->version);
  call.s_->done(res);
  return res;
}

net::awaitable<Response> Protocol::handle(const Request& request, HangupWatch hangup) {
  std::variant<Response, Call> step = begin(request);
  if (Response* res = std::get_if<Response>(&step)) co_return std::move(*res);
  Call call = std::get<Call>(std::move(step));
  Endpoint::Submitter& submitter = *call.s_->e->submitter;
  Tensors& x = call.s_->inputs;
  const RequestOptions control = call.s_->control;
  if (!hangup) {
    auto [error, y] =
        co_await async_submit(submitter, std::move(x), net::as_tuple(net::use_awaitable), control);
    co_return finish(std::move(call), std::move(error), std::move(y));
  }
  // `||` waits for the first to succeed: the request's outcome comes as a tuple, never as an
  // exception, so that a failed request is answered at once rather than waiting for the client
  // to go. Both run on the caller's executor, which one thread runs (see protocol.hpp).
  using namespace net::experimental::awaitable_operators;
  auto first =
      co_await (async_submit(submitter, std::move(x), net::as_tuple(net::use_awaitable), control) ||
                hangup());
  if (first.index() == 1) co_return gone(std::move(call));
  auto [error, y] = std::get<0>(std::move(first));
  co_return finish(std::move(call), std::move(error), std::move(y));
}

void Protocol::set_stopping() {
  impl_->stopping.store(true);
}
bool Protocol::stopping() const {
  return impl_->stopping.load();
}
void Protocol::shutdown() {
  for (auto& e : impl_->endpoints)  // drains: pending requests complete first
    if (e->submitter) e->submitter->shutdown();
}
std::string Protocol::stats_json() const {
  return impl_->stats_json();
}
std::vector<c10::Device> Protocol::per_op_cuda_devices() const {
  std::vector<c10::Device> out;
  for (const auto& e : impl_->endpoints)
    if (e->options.mode == Mode::kPerOp && e->options.device.is_cuda())
      out.push_back(e->options.device);
  return out;
}

}  // namespace syncbatch::http
