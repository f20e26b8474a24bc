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
#include <future>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string_view>
#include <thread>
#include <tuple>
#include <variant>
#include <vector>

#include <boost/json.hpp>

#include "codecs/oip.hpp"
#include "codecs/v1.hpp"
#include "endpoint.hpp"
#include "http1.hpp"
#include "metrics.hpp"
#include "protocol_error.hpp"
#include "syncbatch/multi_device.hpp"
#include "syncbatch/torch.hpp"
#include "syncbatch/version.hpp"
#include "text.hpp"

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

}  // namespace

// An inference request between Protocol::begin() and its answer.
struct Protocol::Call::State {
  State(std::shared_ptr<Endpoint> endpoint, unsigned v, bool is_v1)
      : e(std::move(endpoint)), version(v), v1(is_v1) {}

  // Counts the answer in /metrics (in flight since begin()).
  void done(const Response& res) {
    e->metrics.end();
    e->metrics.record(res.result_int(), Clock::now() - start);
    answered = true;
  }

  std::shared_ptr<Endpoint> e;  // alive until answered, though a reload replaces it
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

using Endpoints = std::vector<std::shared_ptr<Endpoint>>;

struct Protocol::Impl {
  explicit Impl(std::vector<ServedModel> models) {
    if (models.empty()) throw std::invalid_argument("Server: expected at least 1 model, got 0");
    auto list = std::make_shared<Endpoints>();
    for (ServedModel& m : models) {
      for (const auto& e : *list)
        if (e->options.name == m.options.name)
          throw std::invalid_argument("Server: expected unique model names, got '" +
                                      m.options.name + "' twice");
      known[m.options.name] = {m, "READY", ""};
      list->push_back(std::make_shared<Endpoint>(std::move(m)));
    }
    live.store(std::move(list));
  }

  ~Impl() {
    for (Reaper& r : reapers) r.thread.join();
  }

  // The models served now: a snapshot that a load or unload replaces whole, never changes.
  std::shared_ptr<const Endpoints> endpoints() const { return live.load(); }

  static std::shared_ptr<Endpoint> find(const Endpoints& list, std::string_view name) {
    for (const auto& e : list)
      if (e->options.name == name) return e;
    return nullptr;
  }

  static std::string model_names(const Endpoints& list) {
    return quoted_names(list, [](const auto& e) { return e->options.name; });
  }

  // A request's target, parsed once: what it asks for, of which model; or the 404 that names
  // what was expected. The query string (after '?') is dropped: no endpoint takes one, and
  // unknown parameters are ignored, as HTTP clients expect.
  struct Route {
    enum Action {
      kServer,
      kLive,
      kReady,
      kModel,
      kModelReady,
      kInfer,
      kV1Infer,
      kMetrics,
      kHealthz,
      kStats,
      kModelConfig,  // Triton's model configuration extension
      kModelStats,   // Triton's statistics extension: one model's
      kAllStats,     // every model's
      kRepository,   // Triton's model repository extension: index, load, unload
      kNotFound
    };
    Action action = kNotFound;
    std::shared_ptr<Endpoint> endpoint;  // the kModel... actions, kInfer, kV1Infer
    bool v2 = true;                      // answered in the Open Inference Protocol's format
    std::string not_found;               // kNotFound: the message
    std::string repository;              // kRepository: "index", or "load" / "unload" and the model
  };

  Route route_of(std::string_view target, const Endpoints& list) {
    target = target.substr(0, target.find('?'));
    const auto found = [](Route::Action a, std::shared_ptr<Endpoint> e = nullptr, bool v2 = true) {
      return Route{a, std::move(e), v2, {}, {}};
    };
    const auto missing = [](std::string message, bool v2 = true) {
      return Route{Route::kNotFound, nullptr, v2, std::move(message), {}};
    };
    if (target == "/metrics") return found(Route::kMetrics, nullptr, false);
    if (target == "/healthz") return found(Route::kHealthz, nullptr, false);
    if (target == "/stats") return found(Route::kStats, nullptr, false);
    if (target == "/v1/infer") {
      if (list.empty()) return missing("/v1/infer: no model is loaded", false);
      const std::shared_ptr<Endpoint>& e = list.front();
      if (!e->v1)
        return missing("/v1/infer serves a model of one float32 [rows, width] input, and '" +
                           e->options.name + "' is not one: use /v2/models/" + e->options.name +
                           "/infer",
                       false);
      return found(Route::kV1Infer, e, false);
    }
    if (target != "/v2" && !target.starts_with("/v2/"))
      return missing(
          "no such endpoint: expected /v2/..., POST /v1/infer, GET /healthz, GET /metrics or "
          "GET /stats, got " +
              excerpt(target),
          false);
    constexpr std::string_view kRepository = "/v2/repository/";
    if (target.starts_with(kRepository)) {
      const std::string_view what = target.substr(kRepository.size());
      constexpr std::string_view kModel = "models/";
      if (what == "index") return Route{Route::kRepository, nullptr, true, {}, "index"};
      if (what.starts_with(kModel)) {
        const std::string_view rest = what.substr(kModel.size());
        const std::size_t slash = rest.find('/');
        const std::string_view verb = slash == rest.npos ? "" : rest.substr(slash + 1);
        if (slash != rest.npos && slash > 0 && (verb == "load" || verb == "unload"))
          return Route{Route::kRepository,
                       nullptr,
                       true,
                       {},
                       std::string(verb) + " " + std::string(rest.substr(0, slash))};
      }
      return missing(
          "no such endpoint: expected /v2/repository/index or "
          "/v2/repository/models/{name}/load or /unload, got " +
          excerpt(target));
    }
    if (target == "/v2") return found(Route::kServer);
    if (target == "/v2/health/live") return found(Route::kLive);
    if (target == "/v2/health/ready") return found(Route::kReady);
    constexpr std::string_view kModels = "/v2/models/";
    if (!target.starts_with(kModels)) return missing("no such endpoint: " + excerpt(target));
    const std::string_view rest = target.substr(kModels.size());
    if (rest == "stats") return found(Route::kAllStats);
    const std::string_view name = rest.substr(0, rest.find('/'));
    std::string_view action = rest.substr(name.size());
    std::shared_ptr<Endpoint> e = find(list, name);
    if (e == nullptr)
      return missing("unknown model '" + excerpt(name) + "': this server serves " +
                     model_names(list));
    constexpr std::string_view kVersions = "/versions/";
    if (action.starts_with(kVersions)) {  // the one version there is: "1"
      const std::string_view version =
          action.substr(kVersions.size()).substr(0, action.substr(kVersions.size()).find('/'));
      if (version != "1")
        return missing("unknown version '" + excerpt(version) + "' of model '" + e->options.name +
                       "': it has version '1'");
      action = action.substr(kVersions.size() + version.size());
    }
    if (action.empty()) return found(Route::kModel, e);
    if (action == "/ready") return found(Route::kModelReady, e);
    if (action == "/infer") return found(Route::kInfer, e);
    if (action == "/config") return found(Route::kModelConfig, e);
    if (action == "/stats") return found(Route::kModelStats, e);
    return missing("no such endpoint: expected /v2/models/" + e->options.name +
                   ", its /ready, /infer, /config or /stats, got " + excerpt(target));
  }

  // Inference requests are timed and counted for /metrics, by model, from here to finish() or
  // gone(); the rest are answered as they come. Plain functions: a request reaches its model's
  // submitter with no coroutine frame of the protocol's (Protocol::Call).
  std::variant<Response, Call> begin(const Request& req) {
    std::shared_ptr<const Endpoints> list = endpoints();
    const Route route = route_of(std::string_view(req.target().data(), req.target().size()), *list);
    if (route.action == Route::kRepository) {
      list.reset();  // an unload waits for every holder of its model, this snapshot too
      return repository(req, route.repository, req.version());
    }
    const bool inference = (route.action == Route::kInfer || route.action == Route::kV1Infer) &&
                           req.method() == bh::verb::post;
    if (!inference) return answer_now(req, route, *list);
    Endpoint& e = *route.endpoint;
    const auto start = Clock::now();
    e.metrics.begin();
    std::variant<Response, Call> step =
        infer(req, route.endpoint, /*v1=*/route.action == Route::kV1Infer);
    if (Call* call = std::get_if<Call>(&step)) {
      call->s_->start = start;
    } else {
      e.metrics.end();
      e.metrics.record(std::get<Response>(step).result_int(), Clock::now() - start);
    }
    return step;
  }

  // The answer to every request but an inference: metadata, health, metrics, stats, 404, 405.
  Response answer_now(const Request& req, const Route& route, const Endpoints& list) {
    const unsigned v = req.version();
    if (route.action == Route::kNotFound)
      return error_response({404, route.not_found}, !route.v2, v);
    if (route.action == Route::kInfer || route.action == Route::kV1Infer) {
      Response res = error_response({405, "expected method POST"}, !route.v2, v);
      res.set(bh::field::allow, "POST");
      return res;
    }
    if (!is_get(req)) {
      Response res = error_response({405, "expected method GET or HEAD"}, !route.v2, v);
      res.set(bh::field::allow, "GET, HEAD");
      return res;
    }
    switch (route.action) {
      case Route::kServer:
        return json_response(bh::status::ok, oip::server_metadata(version_string()), v);
      case Route::kLive:
        return Response(bh::status::ok, v);  // no body
      case Route::kReady:
      case Route::kModelReady:
        // Ready while accepting: a stopping server is live but not ready (4xx, as the protocol
        // says, so that balancers take it out).
        return Response(stopping.load() ? bh::status::bad_request : bh::status::ok, v);
      case Route::kModel:
        return json_response(bh::status::ok, oip::model_metadata(route.endpoint->info), v);
      case Route::kMetrics: {
        Response res(bh::status::ok, v);
        res.set(bh::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
        std::vector<Metrics::Exposed> exposed;
        for (const auto& e : list)
          exposed.push_back(
              {e->options.name, &e->metrics,
               e->submitter ? std::optional<SubmitterStats>(e->stats()) : std::nullopt});
        res.body() = Metrics::prometheus(exposed);
        return res;
      }
      case Route::kHealthz:
        return text_response(bh::status::ok, "ok", v);
      case Route::kStats:
        return json_response(bh::status::ok, stats_json(), v);
      case Route::kModelConfig:
        return json_response(bh::status::ok,
                             boost::json::serialize(route.endpoint->triton_config()), v);
      case Route::kModelStats:
      case Route::kAllStats: {
        boost::json::array models;
        for (const auto& e : list)
          if (route.endpoint == nullptr || route.endpoint == e) models.push_back(e->triton_stats());
        return json_response(
            bh::status::ok,
            boost::json::serialize(boost::json::object{{"model_stats", std::move(models)}}), v);
      }
      default:
        return error_response({500, "unrouted request"}, !route.v2, v);
    }
  }

  // Triton's model repository extension, explicit mode: the index of the models the server
  // knows, and a model's load or unload. One at a time (repository_mu); each answers once done.
  Response repository(const Request& req, const std::string& what, unsigned v) {
    if (req.method() != bh::verb::post) {
      Response res = error_response({405, "expected method POST"}, false, v);
      res.set(bh::field::allow, "POST");
      return res;
    }
    std::lock_guard lock(repository_mu);
    try {
      const std::string_view body(req.body().data(), req.body().size());
      if (what == "index") return json_response(bh::status::ok, index(body), v);
      const std::size_t space = what.find(' ');
      const std::string name = what.substr(space + 1);
      if (what.starts_with("load ")) {
        load(name, body);
      } else {
        unload(name);
      }
      return Response(bh::status::ok, v);
    } catch (const ProtocolError& e) {
      return error_response(e, false, v);
    }
  }

  // POST /v2/repository/index: [{"name", "version", "state", "reason"}], READY ones alone with
  // {"ready": true}.
  std::string index(std::string_view body) {
    bool ready_only = false;
    if (!body.empty()) {
      boost::system::error_code ec;
      const boost::json::value v = boost::json::parse(body, ec);
      if (ec || !v.is_object())
        throw bad_request("repository index: expected a JSON object (or no body), got " +
                          excerpt(body));
      if (const auto* ready = v.as_object().if_contains("ready")) {
        if (!ready->is_bool())
          throw bad_request("repository index: ready: expected true or false, got " +
                            excerpt(*ready));
        ready_only = ready->get_bool();
      }
    }
    boost::json::array out;
    for (const auto& [name, k] : known)
      if (!ready_only || k.state == "READY")
        out.push_back(boost::json::object{
            {"name", name}, {"version", "1"}, {"state", k.state}, {"reason", k.reason}});
    return boost::json::serialize(out);
  }

  // A model (re)loaded: from the body's parameters.config (one model of the configuration
  // file's format, as a JSON object or a string of one: Triton's load_model(config=...)), else
  // as it was last served, read anew from its file. It serves once it has answered a warm-up
  // request (its graphs captured); then new requests go to it, and the version it replaces
  // drains, freed once its last request is answered. A load that fails leaves what was served
  // serving, and says why. Errors: ProtocolError 400 (the configuration or the load's
  // failure), 404 a model the server does not know and that comes without a configuration.
  void load(const std::string& name, std::string_view body) {
    std::shared_ptr<Endpoint> fresh;
    std::optional<ServedModel> source;  // for the next load without a configuration
    std::string why;
    try {
      ServedModel served = configured(name, body);
      source = served;
      fresh = std::make_shared<Endpoint>(std::move(served));
      warm_up(*fresh);
    } catch (const ProtocolError& e) {
      if (e.status != 400) throw;  // a model it does not know: nothing was tried
      why = e.message;
    } catch (const std::exception& e) {
      why = e.what();
    }
    if (!why.empty()) {
      if (fresh && fresh->submitter) fresh->submitter->shutdown();
      std::fprintf(stderr, "model '%s': load failed: %s\n", name.c_str(), why.c_str());
      auto it = known.find(name);
      if (it != known.end()) it->second.reason = "load failed: " + excerpt(why, 300);
      throw bad_request("model '" + name + "': load failed: " + excerpt(why, 300) +
                        (it != known.end() && it->second.state == "READY"
                             ? " (the version before it still serves)"
                             : ""));
    }
    auto list = std::make_shared<Endpoints>(*endpoints());
    std::shared_ptr<Endpoint> old;
    for (auto& e : *list)
      if (e->options.name == name) old = std::exchange(e, fresh);
    if (!old) list->push_back(fresh);
    live.store(std::move(list));
    known[name] = {std::move(*source), "READY", ""};
    if (old) retire(std::move(old));
  }

  // Unloads a model: it leaves what is served at once (new requests get 404), then the call
  // waits for its last request to be answered, and frees it. Errors: ProtocolError 404 for a
  // model not loaded.
  void unload(const std::string& name) {
    auto list = std::make_shared<Endpoints>(*endpoints());
    const auto it = std::find_if(list->begin(), list->end(),
                                 [&](const auto& e) { return e->options.name == name; });
    if (it == list->end())
      throw ProtocolError{
          404, "model '" + excerpt(name) + "' is not loaded; loaded: " + model_names(*list)};
    std::shared_ptr<Endpoint> gone = *it;
    list->erase(it);
    live.store(std::move(list));
    known[name].state = "UNAVAILABLE";
    known[name].reason = "unloaded";
    drain(gone);
  }

  // The ServedModel of a load's `body`: its parameters.config, else the model as last served.
  ServedModel configured(const std::string& name, std::string_view body) {
    std::optional<boost::json::object> entry;
    if (!body.empty()) {
      boost::system::error_code ec;
      const boost::json::value v = boost::json::parse(body, ec);
      const boost::json::value* config = nullptr;
      if (!ec && v.is_object())
        if (const auto* params = v.as_object().if_contains("parameters");
            params && params->is_object())
          config = params->as_object().if_contains("config");
      if (ec || !v.is_object())
        throw bad_request("load: expected a JSON object (or no body), got " + excerpt(body));
      if (config != nullptr) {
        boost::json::value parsed = *config;
        if (config->is_string()) parsed = boost::json::parse(config->as_string(), ec);
        if (ec || !parsed.is_object())
          throw bad_request(
              "load: parameters.config: expected a model's configuration as a JSON "
              "object or a string of one, got " +
              excerpt(*config));
        entry = parsed.as_object();
      }
    }
    if (!entry) {
      const auto it = known.find(name);
      if (it == known.end())
        throw ProtocolError{404, "model '" + excerpt(name) +
                                     "' is not known to this server: send its configuration "
                                     "as parameters.config"};
      return it->second.source.reload ? it->second.source.reload() : it->second.source;
    }
    if (const auto* n = entry->if_contains("name");
        n && !(n->is_string() && n->as_string() == name))
      throw bad_request("load: parameters.config.name: expected '" + name + "' (the path's), got " +
                        excerpt(*n));
    (*entry)["name"] = name;
    try {
      return std::move(load_config(boost::json::serialize(
                                       boost::json::object{{"models", boost::json::array{*entry}}}))
                           .front());
    } catch (const std::exception& e) {
      throw bad_request("load: " + excerpt(e.what(), 300));
    }
  }

  // One request of zeros through a new endpoint, waited for: it serves only once that works
  // (its workers started, their graphs captured).
  static void warm_up(Endpoint& e) {
    Tensors example = e.example(
        e.options.length_buckets.empty() ? 1 : e.options.length_buckets.front(), c10::kCPU);
    if (!e.submitter) {
      e.run_here(std::move(example));
      return;
    }
    std::promise<void> done;
    auto ready = done.get_future();
    e.submitter->submit_then(std::move(example), [&done](std::exception_ptr error, Tensors) {
      if (error) {
        done.set_exception(error);
      } else {
        done.set_value();
      }
    });
    ready.get();
  }

  // Frees `e` once its last request is answered, on a thread of its own (its submitter's
  // shutdown joins its workers, which must not be an io thread's wait).
  void retire(std::shared_ptr<Endpoint> e) {
    std::erase_if(reapers, [](Reaper& r) {  // those done, joined: they do not pile up
      if (!r.done->load()) return false;
      r.thread.join();
      return true;
    });
    auto done = std::make_shared<std::atomic<bool>>(false);
    reapers.push_back({std::thread([e = std::move(e), done]() mutable {
                         drain(e);
                         done->store(true);
                       }),
                       done});
  }

  // Waits until nothing but `e` holds its endpoint (every request routed to it answered), then
  // frees it: its submitter drains whatever is left and stops.
  static void drain(std::shared_ptr<Endpoint>& e) {
    while (e.use_count() > 1) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    e.reset();
  }

  // An inference request for `e`, decoded: a Call, or its answer (a refusal; per-op, the model's
  // answer, run here).
  std::variant<Response, Call> infer(const Request& req, std::shared_ptr<Endpoint> endpoint,
                                     bool v1) {
    auto s = std::make_unique<Call::State>(std::move(endpoint), req.version(), v1);
    const Endpoint& e = *s->e;
    try {
      const auto ct = req[bh::field::content_type];
      const std::string_view type(ct.data(), ct.size());
      std::string_view body(req.body().data(), req.body().size());
      std::string decoded;  // a compressed body, decoded (bounded by max_body_bytes)
      if (const auto coding = req[bh::field::content_encoding]; !coding.empty()) {
        decoded =
            decode_content(std::string_view(coding.data(), coding.size()), body, max_body_bytes);
        body = decoded;
      }
      if (v1) {
        const int64_t width = e.model.inputs[0].shape[0];
        s->decoded = v1::decode(type, body, width, e.options.max_rows);
        s->inputs.push_back(
            at::from_blob(s->decoded.values.data(), {s->decoded.rows, width}, at::kFloat).clone());
        s->decoded.values = {};
        return call_or_answer(std::move(s));
      }
      const std::string base = media_type(type);
      if (!type.empty() && base != "application/json" && base != "application/octet-stream")
        throw ProtocolError{415,
                            "expected Content-Type application/json (or "
                            "application/octet-stream with binary data), got '" +
                                excerpt(type) + "'"};
      s->request = oip::parse_infer(body, inference_header_length(req), e.info, e.options.max_rows,
                                    e.pin_from_bytes);
      const oip::InferRequest& r = s->request;
      // Triton's schedule policy: 0 the model's default level, 1 the highest, N the lowest of N;
      // the library's levels count from 0, the highest.
      if (r.priority && *r.priority > e.options.priority_levels)
        throw bad_request("parameters.priority: expected 0 (the model's default level) to " +
                          std::to_string(e.options.priority_levels) + " (1 the highest), got " +
                          std::to_string(*r.priority));
      if (r.timeout) s->control.deadline = deadline_after(Clock::now(), *r.timeout);
      if (r.priority && *r.priority > 0) s->control.priority = *r.priority - 1;
      s->inputs = std::move(s->request.inputs);
    } catch (...) {
      return error_response(*s, std::current_exception());
    }
    return call_or_answer(std::move(s));
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

  // `s` as a call for its submitter, or, for a model served per-op, answered here: forwarded on
  // this thread, which waits for it (the copy to the host syncs this thread's stream).
  static std::variant<Response, Call> call_or_answer(std::unique_ptr<Call::State> s) {
    if (s->e->submitter) return Call(std::move(s));
    Tensors y;
    std::exception_ptr error;
    try {
      y = s->e->run_here(std::move(s->inputs));
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

  std::string stats_json() const {
    boost::json::object out;
    for (const auto& e : *endpoints()) out[e->options.name] = e->stats_object();
    return boost::json::serialize(out);
  }

  // What is served, replaced whole by load and unload (a request keeps the snapshot it routed
  // by, and its Call its endpoint, until answered).
  std::atomic<std::shared_ptr<const Endpoints>> live;
  // Every model the repository knows: how it was last served, its state and why. Load and
  // unload hold repository_mu from start to end, one at a time.
  struct Known {
    ServedModel source;
    std::string state;  // READY or UNAVAILABLE
    std::string reason;
  };
  std::mutex repository_mu;
  std::map<std::string, Known> known;  // guarded by repository_mu
  struct Reaper {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::vector<Reaper> reapers;           // guarded by repository_mu
  std::size_t max_body_bytes = 1 << 20;  // decoded, for a body with a Content-Encoding
  std::atomic<bool> stopping{false};
};

Protocol::Protocol(std::vector<ServedModel> models, std::size_t max_body_bytes)
    : impl_(std::make_unique<Impl>(std::move(models))) {
  impl_->max_body_bytes = max_body_bytes;
}
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

void Protocol::set_stopping() {
  impl_->stopping.store(true);
}
bool Protocol::stopping() const {
  return impl_->stopping.load();
}
void Protocol::shutdown() {
  for (auto& e : *impl_->endpoints())  // drains: pending requests complete first
    if (e->submitter) e->submitter->shutdown();
}
std::string Protocol::stats_json() const {
  return impl_->stats_json();
}
std::vector<std::pair<std::string, std::size_t>> Protocol::workers() const {
  std::vector<std::pair<std::string, std::size_t>> out;
  for (const auto& e : *impl_->endpoints())
    out.emplace_back(e->options.name, e->submitter ? e->options.workers : 0);
  return out;
}
std::vector<c10::Device> Protocol::per_op_cuda_devices() const {
  std::vector<c10::Device> out;
  for (const auto& e : *impl_->endpoints())
    if (e->options.mode == Mode::kPerOp && e->options.device.is_cuda())
      out.push_back(e->options.device);
  return out;
}

}  // namespace syncbatch::http
