// The HTTP server's protocol layer driven directly, with no sockets: every route's status and
// body, readiness while stopping, every encoding of an inference, and a request whose client is
// gone while it waits in the queue cancelled before the model sees it (the hang-up watch here is
// a coroutine of the test's).
#include <ATen/ATen.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <latch>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include <boost/json.hpp>

#include "protocol.hpp"

namespace syncbatch::http {
namespace {

namespace net = boost::asio;
namespace bh = boost::beast::http;
using namespace std::chrono_literals;

constexpr int64_t kWidth = 4;

Model affine() {
  return {[](const at::Tensor& x) { return x * 2 + 1; }, kWidth, "x*2+1"};
}

std::vector<ServedModel> one(Model model, Mode mode = Mode::kStacked) {
  std::vector<ServedModel> models;
  models.push_back({std::move(model), {.mode = mode, .name = "m"}});
  return models;
}

Request make(bh::verb verb, const std::string& target, const std::string& content_type = "",
             const std::string& body = "") {
  Request req(verb, target, 11);
  if (!content_type.empty()) req.set(bh::field::content_type, content_type);
  req.body().assign(body.begin(), body.end());
  req.prepare_payload();
  return req;
}

// Drives the protocol as the server's transport does (server.cpp): begin(), then for a Call its
// submit(), and finish() with its outcome, or, for a client gone while it waits, a cancel and
// gone(). No socket: the protocol's own path, the one production runs.
class Driver {
 public:
  explicit Driver(Protocol& protocol) : protocol_(protocol) {}
  ~Driver() {
    for (auto& t : threads_) t.join();
  }

  // The answer to `req`, on a thread of its own (as a connection's).
  std::future<Response> start(Request req, std::chrono::milliseconds gone_after = {}) {
    auto answer = std::make_shared<std::promise<Response>>();
    std::future<Response> out = answer->get_future();
    threads_.emplace_back([this, req = std::move(req), gone_after, answer]() mutable {
      answer->set_value(call(std::move(req), gone_after));
    });
    return out;
  }

  // The answer to `req`. With `gone_after`, its client hangs up that long after the request is
  // submitted, unless it was answered first: the transport then cancels it, waits for its
  // submission to complete and answers gone() (499, never read).
  Response call(Request req, std::chrono::milliseconds gone_after = {}) {
    std::variant<Response, Protocol::Call> step = protocol_.begin(req);
    if (Response* res = std::get_if<Response>(&step)) return std::move(*res);
    Protocol::Call call = std::get<Protocol::Call>(std::move(step));
    std::promise<std::pair<std::exception_ptr, Tensors>> done;
    auto outcome = done.get_future();
    auto cancel = call.submit([&done](std::exception_ptr error, Tensors y) {
      done.set_value({std::move(error), std::move(y)});
    });
    if (gone_after.count() > 0 && outcome.wait_for(gone_after) != std::future_status::ready) {
      cancel.cancel();
      outcome.wait();
      return protocol_.gone(std::move(call));
    }
    auto [error, y] = outcome.get();
    return protocol_.finish(std::move(call), std::move(error), std::move(y));
  }
  Response get(const std::string& target) { return call(make(bh::verb::get, target)); }

 private:
  Protocol& protocol_;
  std::vector<std::thread> threads_;
};

std::string oip_json(const std::vector<float>& row) {
  std::string data;
  for (float f : row) {
    if (!data.empty()) data += ',';
    data += std::to_string(f);
  }
  return R"({"inputs":[{"name":"input","shape":[1,)" + std::to_string(row.size()) +
         R"(],"datatype":"FP32","data":[)" + data + "]}]}";
}

// The floats of the first output of an OIP JSON answer.
std::vector<double> output_data(const std::string& body) {
  std::vector<double> out;
  const boost::json::value v = boost::json::parse(body);
  for (const auto& x : v.at("outputs").at(0).at("data").as_array())
    out.push_back(x.to_number<double>());
  return out;
}

TEST(Protocol, RoutesAnswerWithTheProtocolsStatusesAndBodies) {
  Protocol protocol(one(affine()));
  Driver d(protocol);
  struct Case {
    bh::verb verb;
    std::string target;
    unsigned status;
    std::string body_has;
  };
  const std::vector<Case> cases{
      {bh::verb::get, "/v2", 200, R"("name":"syncbatch")"},
      {bh::verb::get, "/v2/health/live", 200, ""},
      {bh::verb::get, "/v2/health/ready", 200, ""},
      {bh::verb::get, "/v2/models/m", 200,
       R"("inputs":[{"name":"input","datatype":"FP32","shape":[-1,4]}])"},
      {bh::verb::get, "/v2/models/m/versions/1", 200, R"("versions":["1"])"},
      {bh::verb::get, "/v2/models/m/versions/2", 404, "unknown version '2' of model 'm'"},
      {bh::verb::get, "/v2/models/m/ready", 200, ""},
      {bh::verb::get, "/v2/models/nope", 404, "unknown model 'nope': this server serves 'm'"},
      {bh::verb::get, "/v2/models/m/explain", 404, "no such endpoint"},
      {bh::verb::post, "/v2", 405, "expected method GET"},
      {bh::verb::get, "/v2/models/m/infer", 405, "expected method POST"},
      {bh::verb::get, "/v2/nowhere", 404, "no such endpoint: /v2/nowhere"},
      {bh::verb::get, "/healthz", 200, "ok"},
      {bh::verb::post, "/metrics", 405, "expected method GET"},
      {bh::verb::get, "/stats", 200, R"("m":{"submitted":)"},
      {bh::verb::get, "/nowhere", 404, "no such endpoint"},
      // Query strings (Triton's clients send query_params) are dropped, unknown ones ignored.
      {bh::verb::get, "/v2/health/ready?probe=1", 200, ""},
      {bh::verb::get, "/v2/models/m?x=y&z", 200, R"("versions":["1"])"},
      {bh::verb::get, "/v2/models/nope?x=y", 404, "unknown model 'nope'"},
      {bh::verb::head, "/v2/models/m", 200, R"("versions":["1"])"},  // the transport drops it
  };
  for (const Case& c : cases) {
    const Response res = d.call(make(c.verb, c.target));
    EXPECT_EQ(res.result_int(), c.status) << c.target << ": " << res.body();
    EXPECT_NE(res.body().find(c.body_has), std::string::npos) << c.target << ": " << res.body();
    if (c.status == 405) {
      EXPECT_FALSE(res[bh::field::allow].empty()) << c.target;
    }
    // Health and readiness answer with their status alone (an empty body, as the protocol
    // says); whatever says it is JSON is JSON.
    if (res[bh::field::content_type] == "application/json") {
      EXPECT_NO_THROW(boost::json::parse(res.body())) << c.target << ": '" << res.body() << "'";
    }
    if (c.target.ends_with("/live") || c.target.ends_with("/ready")) {
      EXPECT_TRUE(res.body().empty()) << c.target;
      EXPECT_TRUE(res[bh::field::content_type].empty()) << c.target;
    }
    if (c.target.starts_with("/v2") && c.status >= 400) {  // the protocol's error object
      const boost::json::value v = boost::json::parse(res.body());
      EXPECT_TRUE(v.is_object() && v.as_object().contains("error")) << res.body();
    }
  }
}

TEST(Protocol, InferenceAnswersEveryEncodingWithTheModelsOutput) {
  for (Mode mode : {Mode::kPerOp, Mode::kPerCall, Mode::kStacked}) {
    Protocol protocol(one(affine(), mode));
    Driver d(protocol);
    const std::vector<float> row{0.5f, -1.0f, 2.0f, 3.25f};
    const std::vector<double> want{2.0, -1.0, 5.0, 7.5};
    const Response json =
        d.call(make(bh::verb::post, "/v2/models/m/infer", "application/json", oip_json(row)));
    ASSERT_EQ(json.result_int(), 200u) << json.body();
    EXPECT_EQ(output_data(json.body()), want);
    // The binary tensor data extension: a JSON header, then the raw float32 bytes.
    const std::string header =
        R"({"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","parameters":{"binary_data_size":16}}],"parameters":{"binary_data_output":true}})";
    std::string body = header;
    body.append(reinterpret_cast<const char*>(row.data()), 16);
    Request binary = make(bh::verb::post, "/v2/models/m/infer", "application/octet-stream", body);
    binary.set("Inference-Header-Content-Length", std::to_string(header.size()));
    const Response res = d.call(std::move(binary));
    ASSERT_EQ(res.result_int(), 200u) << res.body();
    const std::size_t n = std::stoul(std::string(res["Inference-Header-Content-Length"]));
    ASSERT_EQ(res.body().size(), n + 16);
    std::vector<float> got(4);
    std::memcpy(got.data(), res.body().data() + n, 16);
    EXPECT_EQ(std::vector<double>(got.begin(), got.end()), want);
    // /v1/infer: JSON and raw rows.
    const Response queried = d.call(
        make(bh::verb::post, "/v2/models/m/infer?trace=on", "application/json", oip_json(row)));
    ASSERT_EQ(queried.result_int(), 200u) << queried.body();
    EXPECT_EQ(output_data(queried.body()), want);
    const Response v1 =
        d.call(make(bh::verb::post, "/v1/infer", "application/json", "[0.5,-1,2,3.25]"));
    EXPECT_EQ(v1.result_int(), 200u);
    EXPECT_EQ(v1.body(), "[2,-1,5,7.5]");
    const Response bad =
        d.call(make(bh::verb::post, "/v2/models/m/infer", "application/json", "{\"inputs\":[]}"));
    EXPECT_EQ(bad.result_int(), 400u);
    EXPECT_NE(bad.body().find("inputs: expected an array of 1 ('input'), got []"),
              std::string::npos)
        << bad.body();
    protocol.shutdown();
  }
}

TEST(Protocol, AStoppingServerIsLiveButNotReadyThenRefusesAfterItsDrain) {
  Protocol protocol(one(affine()));
  Driver d(protocol);
  protocol.set_stopping();
  EXPECT_TRUE(protocol.stopping());
  EXPECT_EQ(d.get("/v2/health/live").result_int(), 200u);
  EXPECT_EQ(d.get("/v2/health/ready").result_int(), 400u);
  EXPECT_EQ(d.get("/v2/models/m/ready").result_int(), 400u);
  const std::string body = oip_json({1, 1, 1, 1});
  EXPECT_EQ(
      d.call(make(bh::verb::post, "/v2/models/m/infer", "application/json", body)).result_int(),
      200u)
      << "requests still in flight are answered";
  protocol.shutdown();
  const Response late =
      d.call(make(bh::verb::post, "/v2/models/m/infer", "application/json", body));
  EXPECT_EQ(late.result_int(), 503u);
  EXPECT_EQ(late[bh::field::retry_after], "1");
  EXPECT_NE(late.body().find("shutting down"), std::string::npos) << late.body();
}

// Request 2 waits in the queue behind request 1, which the model holds; its client hangs up:
// request 2 is cancelled, answered 499 and counted, and the model never sees it.
TEST(Protocol, AQueuedRequestWhoseClientIsGoneIsCancelledBeforeTheModelSeesIt) {
  std::latch running(1);
  std::atomic<bool> release{false};
  std::atomic<int> calls{0}, sevens{0};
  Model held{[&](const at::Tensor& x) {
               calls.fetch_add(1);
               running.count_down();
               while (!release.load()) std::this_thread::sleep_for(1ms);
               if ((x == 7).all(1).any().item<bool>()) sevens.fetch_add(1);
               return x * 2 + 1;
             },
             kWidth, "held"};
  Protocol protocol(one(std::move(held)));
  Driver d(protocol);
  auto first = d.start(
      make(bh::verb::post, "/v2/models/m/infer", "application/json", oip_json({1, 1, 1, 1})));
  running.wait();
  // Its client hangs up 30 ms after it was submitted, while it waits behind request 1.
  auto second = d.start(
      make(bh::verb::post, "/v2/models/m/infer", "application/json", oip_json({7, 7, 7, 7})), 30ms);
  const bool answered = second.wait_for(std::chrono::seconds(10)) == std::future_status::ready;
  release = true;  // before any assertion: the model must not hold the worker past the test
  ASSERT_TRUE(answered) << "the gone client's request was not cancelled while queued";
  EXPECT_EQ(second.get().result_int(), 499u);
  EXPECT_EQ(first.get().result_int(), 200u);
  // A request answered before its client would hang up is answered as ever.
  const Response third =
      d.call(make(bh::verb::post, "/v2/models/m/infer", "application/json", oip_json({2, 2, 2, 2})),
             std::chrono::hours(1));
  EXPECT_EQ(third.result_int(), 200u);
  EXPECT_EQ(sevens.load(), 0) << "the model saw the cancelled request";
  EXPECT_EQ(calls.load(), 2);
  const std::string metrics = d.get("/metrics").body();
  EXPECT_NE(metrics.find(R"(syncbatch_failures_total{model="m",reason="cancelled"} 1)"),
            std::string::npos)
      << metrics;
  EXPECT_NE(metrics.find(R"(code="499"} 1)"), std::string::npos) << metrics;
  protocol.shutdown();
}

// One model on two devices (both the CPU here, as replicas): every request answered right, each
// replica runs some, /stats shows each device's share; mismatched replicas and per-op mode on
// several devices are refused by name.
TEST(Protocol, SeveralDevicesServeOneModelThroughAReplicaEach) {
  std::array<std::atomic<int>, 2> rows_seen{};
  auto counting = [&rows_seen](int i) {
    return Model{[&rows_seen, i](const at::Tensor& x) {
                   rows_seen[i].fetch_add(static_cast<int>(x.size(0)));
                   std::this_thread::sleep_for(1ms);  // busy: the other replica gets work
                   return x * 2 + 1;
                 },
                 kWidth, "replica " + std::to_string(i)};
  };
  std::vector<ServedModel> models;
  models.push_back({counting(0),
                    {.mode = Mode::kStacked,
                     .name = "m",
                     .devices = {c10::Device(c10::kCPU), c10::Device(c10::kCPU)}},
                    {counting(0), counting(1)}});
  Protocol protocol(std::move(models));
  Driver d(protocol);
  std::vector<std::future<Response>> answers;
  for (int i = 0; i < 200; ++i)
    answers.push_back(d.start(make(bh::verb::post, "/v2/models/m/infer", "application/json",
                                   oip_json({float(i), 0, 1, 2}))));
  for (int i = 0; i < 200; ++i) {
    const Response res = answers[i].get();
    ASSERT_EQ(res.result_int(), 200u) << res.body();
    EXPECT_EQ(output_data(res.body()), (std::vector<double>{2.0 * i + 1, 1, 3, 5}));
  }
  EXPECT_EQ(rows_seen[0].load() + rows_seen[1].load(), 200);
  EXPECT_GT(rows_seen[0].load(), 0);
  EXPECT_GT(rows_seen[1].load(), 0);
  const boost::json::value stats = boost::json::parse(d.get("/stats").body());
  const auto& replicas = stats.at("m").at("replicas").as_array();
  ASSERT_EQ(replicas.size(), 2u);
  EXPECT_EQ(replicas[0].at("device").as_string(), "cpu");
  EXPECT_EQ(replicas[0].at("completed").to_number<int64_t>() +
                replicas[1].at("completed").to_number<int64_t>(),
            200);
  EXPECT_EQ(stats.at("m").at("completed").to_number<int64_t>(), 200);
  protocol.shutdown();

  const auto refused = [](std::vector<ServedModel> bad, const std::string& says) {
    try {
      Protocol p(std::move(bad));
      ADD_FAILURE() << "accepted; expected: " << says;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << e.what();
    }
  };
  std::vector<ServedModel> short_one;
  short_one.push_back({affine(),
                       {.name = "m", .devices = {c10::Device(c10::kCPU), c10::Device(c10::kCPU)}},
                       {affine()}});
  refused(std::move(short_one), "model 'm': expected one replica per device (2), got 1");
  std::vector<ServedModel> per_op;
  per_op.push_back({affine(),
                    {.mode = Mode::kPerOp,
                     .name = "m",
                     .devices = {c10::Device(c10::kCPU), c10::Device(c10::kCPU)}},
                    {affine(), affine()}});
  refused(std::move(per_op), "per-op mode runs on one device; got 2 devices");
}

TEST(Protocol, AConfigsDevicesLoadTheModelOnEach) {
  const std::vector<ServedModel> models =
      load_config(R"({"models": [{"name": "m", "model": "mlp:1x4", "devices": ["cpu", "cpu"]}]})");
  ASSERT_EQ(models.size(), 1u);
  EXPECT_EQ(models[0].options.devices.size(), 2u);
  EXPECT_EQ(models[0].replicas.size(), 2u);
  // Each bad "devices" is refused, naming the model, the key, what was expected and what came.
  const std::vector<std::pair<std::string, std::string>> bad{
      {R"("devices": [])",
       R"(models[0] ('m').devices: expected a non-empty array of devices, got [])"},
      {R"("devices": "cpu")",
       R"(models[0] ('m').devices: expected a non-empty array of devices, got "cpu")"},
      {R"("devices": ["cpu", 1])", R"(models[0] ('m').devices: expected device names, got 1)"},
  };
  for (const auto& [devices, says] : bad) {
    try {
      load_config(R"({"models": [{"name": "m", "model": "mlp:1x4", )" + devices + "}]}");
      ADD_FAILURE() << "accepted " << devices;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << e.what();
    }
  }
  try {
    load_config(
        R"({"models": [{"name": "m", "model": "mlp:1x4", "device": "cpu", "devices": ["cpu"]}]})");
    ADD_FAILURE() << "accepted both device and devices";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(
                  R"(models[0] ('m').devices: expected "devices" or "device", not both)"),
              std::string::npos)
        << e.what();
  }
}

TEST(Protocol, ModelOptionsAreCheckedWithTheModelsName) {
  std::vector<ServedModel> twice = one(affine());
  twice.push_back({affine(), {.name = "m"}});
  EXPECT_THROW(
      {
        try {
          Protocol p(std::move(twice));
        } catch (const std::invalid_argument& e) {
          EXPECT_NE(std::string(e.what()).find("unique model names, got 'm' twice"),
                    std::string::npos)
              << e.what();
          throw;
        }
      },
      std::invalid_argument);
  EXPECT_THROW(Protocol(std::vector<ServedModel>{}), std::invalid_argument);
}

// Triton's schedule-policy extension as its clients use it: parameters.priority 1 is the
// highest level, 0 (or none) the model's default (the lowest), past the levels a 400 naming the
// range. Request B (priority 1) comes after request A (none) while both wait behind a held
// request, and runs first.
TEST(Protocol, PriorityOneIsTheHighestAsInTritonsSchedulePolicy) {
  std::latch running(1);
  std::atomic<bool> release{false};
  std::mutex mu;
  std::vector<float> order;
  Model held{[&](const at::Tensor& x) {
               running.count_down();
               while (!release.load()) std::this_thread::sleep_for(1ms);
               std::lock_guard lock(mu);
               for (int64_t r = 0; r < x.size(0); ++r) order.push_back(x[r][0].item<float>());
               return x;
             },
             kWidth, "held"};
  std::vector<ServedModel> models;
  models.push_back({std::move(held), {.policy = EveryN{1}, .workers = 1, .name = "m"}});
  Protocol protocol(std::move(models));
  Driver d(protocol);
  const auto infer = [](float v, const std::string& params) {
    std::string body = oip_json({v, v, v, v});
    if (!params.empty())
      body = body.substr(0, body.size() - 1) + R"(,"parameters":)" + params + "}";
    return make(bh::verb::post, "/v2/models/m/infer", "application/json", body);
  };
  auto first = d.start(infer(1, ""));
  running.wait();
  auto a = d.start(infer(2, ""));                   // the default level: the lowest
  auto c = d.start(infer(4, R"({"priority":0})"));  // 0: the default as well
  std::this_thread::sleep_for(50ms);
  auto b = d.start(infer(3, R"({"priority":1})"));  // the highest
  std::this_thread::sleep_for(50ms);
  const Response too_high = d.call(infer(5, R"({"priority":3})"));
  release = true;
  for (auto* f : {&first, &a, &b, &c}) EXPECT_EQ(f->get().result_int(), 200u);
  EXPECT_EQ(too_high.result_int(), 400u);
  EXPECT_NE(too_high.body().find("expected 0 (the model's default level) to 2 (1 the highest), "
                                 "got 3"),
            std::string::npos)
      << too_high.body();
  std::lock_guard lock(mu);
  ASSERT_EQ(order.size(), 4u);
  EXPECT_EQ(order[0], 1);
  EXPECT_EQ(order[1], 3) << "priority 1 did not run first";
  protocol.shutdown();
}

// Parameters that would change the answer and that the server does not do are refused by name,
// never ignored: a Triton client asking for the top classes must not get the raw tensor.
TEST(Protocol, ParametersThatWouldChangeTheAnswerAreRefusedByName) {
  Protocol protocol(one(affine()));
  Driver d(protocol);
  const std::string in = R"({"name":"input","shape":[1,4],"datatype":"FP32","data":[1,2,3,4])";
  const std::vector<std::pair<std::string, std::string>> cases{
      {R"({"inputs":[)" + in +
           R"(}],"outputs":[{"name":"output","parameters":{"classification":3}}]})",
       "output 'output': parameters.classification: not supported"},
      {R"({"inputs":[)" + in + R"(,"parameters":{"shared_memory_region":"r"}}]})",
       "input 'input': parameters.shared_memory_region: not supported"},
      {R"({"inputs":[)" + in +
           R"(}],"outputs":[{"name":"output","parameters":{"shared_memory_byte_size":16}}]})",
       "output 'output': parameters.shared_memory_byte_size: not supported"},
      {R"({"inputs":[)" + in + R"(}],"parameters":{"sequence_id":7,"sequence_start":true}})",
       "parameters.sequence_id: not supported: the model is stateless"},
  };
  for (const auto& [body, says] : cases) {
    const Response r = d.call(make(bh::verb::post, "/v2/models/m/infer", "application/json", body));
    EXPECT_EQ(r.result_int(), 400u) << body;
    EXPECT_NE(r.body().find(says), std::string::npos) << r.body();
  }
  // Other parameters are the client's own business: ignored.
  const Response ok = d.call(make(bh::verb::post, "/v2/models/m/infer", "application/json",
                                  R"({"inputs":[)" + in + R"(}],"parameters":{"tag":"x"}})"));
  EXPECT_EQ(ok.result_int(), 200u) << ok.body();
  protocol.shutdown();
}

// Triton's model configuration and statistics extensions, as perf_analyzer and Triton's clients
// read them; the server metadata lists them.
TEST(Protocol, ModelConfigAndStatisticsSpeakTritonsExtensions) {
  std::vector<ServedModel> models;
  models.push_back({affine(),
                    {.policy = TimeBased{std::chrono::microseconds(300), 8},
                     .max_rows = 64,
                     .queue_capacity = 100,
                     .workers = 2,
                     .timeout = std::chrono::milliseconds(50),
                     .name = "m",
                     .priority_levels = 3,
                     .batch_buckets = {1, 2, 4, 8}}});
  models.push_back({affine(), {.mode = Mode::kPerOp, .name = "p"}});
  Protocol protocol(std::move(models));
  Driver d(protocol);
  const boost::json::value server = boost::json::parse(d.get("/v2").body());
  for (const char* ext : {"binary_tensor_data", "schedule_policy", "model_configuration",
                          "statistics", "model_repository"}) {
    const auto& list = server.at("extensions").as_array();
    EXPECT_NE(std::find(list.begin(), list.end(), boost::json::value(ext)), list.end()) << ext;
  }
  const Response config = d.get("/v2/models/m/config");
  ASSERT_EQ(config.result_int(), 200u) << config.body();
  const boost::json::value c = boost::json::parse(config.body());
  EXPECT_EQ(c.at("name").as_string(), "m");
  EXPECT_EQ(c.at("max_batch_size").to_number<int>(), 64);
  EXPECT_EQ(c.at("input").at(0).at("data_type").as_string(), "TYPE_FP32");
  EXPECT_EQ(boost::json::serialize(c.at("input").at(0).at("dims")), "[4]");
  EXPECT_EQ(boost::json::serialize(c.at("output").at(0).at("dims")), "[-1]");
  const auto& batching = c.at("dynamic_batching");
  EXPECT_EQ(boost::json::serialize(batching.at("preferred_batch_size")), "[1,2,4,8]");
  EXPECT_EQ(batching.at("max_queue_delay_microseconds").to_number<int>(), 300);
  EXPECT_EQ(batching.at("priority_levels").to_number<int>(), 3);
  EXPECT_EQ(batching.at("default_queue_policy").at("default_timeout_microseconds").to_number<int>(),
            50000);
  EXPECT_EQ(batching.at("default_queue_policy").at("max_queue_size").to_number<int>(), 100);
  EXPECT_EQ(c.at("instance_group").at(0).at("count").to_number<int>(), 2);
  EXPECT_EQ(c.at("instance_group").at(0).at("kind").as_string(), "KIND_CPU");
  EXPECT_FALSE(boost::json::parse(d.get("/v2/models/p/config").body())
                   .as_object()
                   .contains("dynamic_batching"));

  // Three answered, one refused (a 400 is a failure to Triton's statistics too).
  for (float v : {1.f, 2.f, 3.f})
    EXPECT_EQ(d.call(make(bh::verb::post, "/v2/models/m/infer", "application/json",
                          oip_json({v, v, v, v})))
                  .result_int(),
              200u);
  EXPECT_EQ(
      d.call(make(bh::verb::post, "/v2/models/m/infer", "application/json", "{}")).result_int(),
      400u);
  const Response stats = d.get("/v2/models/m/stats");
  ASSERT_EQ(stats.result_int(), 200u) << stats.body();
  const boost::json::value s = boost::json::parse(stats.body()).at("model_stats").at(0);
  EXPECT_EQ(s.at("name").as_string(), "m");
  EXPECT_EQ(s.at("version").as_string(), "1");
  EXPECT_EQ(s.at("inference_count").to_number<int>(), 3);
  const auto& inference = s.at("inference_stats");
  EXPECT_EQ(inference.at("success").at("count").to_number<int>(), 3);
  EXPECT_GT(inference.at("success").at("ns").to_number<double>(), 0);
  EXPECT_EQ(inference.at("fail").at("count").to_number<int>(), 1);
  EXPECT_EQ(inference.at("queue").at("count").to_number<int>(), 3);
  EXPECT_GT(s.at("last_inference").to_number<double>(), 1.7e12);  // ms since the epoch
  const int executions = s.at("execution_count").to_number<int>();
  EXPECT_GE(executions, 1);
  EXPECT_EQ(inference.at("compute_infer").at("count").to_number<int>(), executions);
  int rows = 0, batches = 0;
  for (const auto& b : s.at("batch_stats").as_array()) {
    const int count = b.at("compute_infer").at("count").to_number<int>();
    rows += count * b.at("batch_size").to_number<int>();
    batches += count;
  }
  EXPECT_EQ(rows, 3) << stats.body();
  EXPECT_EQ(batches, executions) << stats.body();
  const boost::json::value all = boost::json::parse(d.get("/v2/models/stats").body());
  ASSERT_EQ(all.at("model_stats").as_array().size(), 2u) << boost::json::serialize(all);
  EXPECT_EQ(all.at("model_stats").at(1).at("name").as_string(), "p");
  EXPECT_EQ(d.get("/v2/models/m/versions/1/stats").result_int(), 200u);
  protocol.shutdown();
}

// Triton's model repository extension, explicit mode, under load: four clients send all along.
// A new version loads from a configuration in the body and takes over with no request lost or
// failed; a load that fails leaves it serving and says why; a load without a configuration
// serves the model as last configured; unload drains before it answers, and only then do
// clients get 404; the index says what is where.
TEST(Protocol, AModelReloadsUnderLoadLosingNoRequest) {
  Protocol protocol(load_config(R"({"models":[{"name":"m","model":"mlp:1x4","device":"cpu",
                                                "policy":"every:4"}]})"));
  Driver d(protocol);
  const auto infer = [&] {
    return d.call(make(bh::verb::post, "/v2/models/m/infer", "application/json",
                       oip_json({0.5f, -1.0f, 2.0f, 3.0f})));
  };
  const auto post = [&](const std::string& target, const std::string& body) {
    return d.call(make(bh::verb::post, target, body.empty() ? "" : "application/json", body));
  };
  const std::string before = infer().body();
  std::atomic<bool> stop{false}, unloading{false};
  std::atomic<int> ok{0}, not_found_early{0}, not_found{0}, other{0};
  std::mutex mu;
  std::string other_bodies;
  std::vector<std::thread> clients;
  for (int c = 0; c < 4; ++c)
    clients.emplace_back([&] {
      while (!stop.load()) {
        const bool after = unloading.load();
        const Response r = infer();
        if (r.result_int() == 200) {
          ok.fetch_add(1);
        } else if (r.result_int() == 404) {
          (after ? not_found : not_found_early).fetch_add(1);
        } else {
          other.fetch_add(1);
          std::lock_guard lock(mu);
          other_bodies += std::to_string(r.result_int()) + " " + r.body() + "\n";
        }
      }
    });
  std::this_thread::sleep_for(100ms);

  const Response loaded =
      post("/v2/repository/models/m/load", R"({"parameters":{"config":"{\"model\":\"mlp:2x4\",)"
                                           R"(\"device\":\"cpu\",\"policy\":\"every:8\"}"}})");
  ASSERT_EQ(loaded.result_int(), 200u) << loaded.body();
  const std::string after = infer().body();
  EXPECT_NE(after, before) << "the new version does not answer";
  std::this_thread::sleep_for(50ms);

  const Response failed = post("/v2/repository/models/m/load",
                               R"({"parameters":{"config":{"model":"mlp:0x4","device":"cpu"}}})");
  EXPECT_EQ(failed.result_int(), 400u) << failed.body();
  EXPECT_NE(failed.body().find("load failed"), std::string::npos) << failed.body();
  EXPECT_NE(failed.body().find("the version before it still serves"), std::string::npos)
      << failed.body();
  EXPECT_EQ(infer().body(), after);
  const Response unknown = post("/v2/repository/models/other/load", "");
  EXPECT_EQ(unknown.result_int(), 404u) << unknown.body();
  EXPECT_NE(unknown.body().find("send its configuration as parameters.config"), std::string::npos);

  const Response again = post("/v2/repository/models/m/load", "");  // as last configured
  ASSERT_EQ(again.result_int(), 200u) << again.body();
  EXPECT_EQ(infer().body(), after);
  std::this_thread::sleep_for(50ms);

  const Response index = post("/v2/repository/index", "");
  EXPECT_EQ(index.body(), R"([{"name":"m","version":"1","state":"READY","reason":""}])");
  const int ok_before_unload = ok.load();
  unloading = true;  // from here on a request may find the model gone: 404
  const Response unload = post("/v2/repository/models/m/unload", "");
  ASSERT_EQ(unload.result_int(), 200u) << unload.body();
  EXPECT_EQ(d.get("/v2/models/m").result_int(), 404u);
  EXPECT_EQ(post("/v2/repository/models/m/unload", "").result_int(), 404u);
  EXPECT_EQ(post("/v2/repository/index", R"({"ready":true})").body(), "[]");
  EXPECT_EQ(post("/v2/repository/index", "").body(),
            R"([{"name":"m","version":"1","state":"UNAVAILABLE","reason":"unloaded"}])");
  std::this_thread::sleep_for(50ms);
  stop = true;
  for (auto& t : clients) t.join();
  EXPECT_GT(ok_before_unload, 20);
  EXPECT_EQ(other.load(), 0) << other_bodies;
  EXPECT_EQ(not_found_early.load(), 0) << "a request was refused before the unload was sent";
  EXPECT_GT(not_found.load(), 0);
  // Loaded again, from its last configuration: it serves as before the unload.
  ASSERT_EQ(post("/v2/repository/models/m/load", "").result_int(), 200u);
  EXPECT_EQ(infer().body(), after);
  protocol.shutdown();
}

}  // namespace
}  // namespace syncbatch::http
