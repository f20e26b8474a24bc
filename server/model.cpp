// Models the HTTP server can serve (the benchmark MLP, TorchScript files, AOTInductor packages)
// and the configuration file that lists them.
#include <ATen/ATen.h>

#include <cstdio>
#include <memory>
#include <set>
#include <stdexcept>

#include <boost/json.hpp>

#include "codecs/oip.hpp"
#include "mlp.hpp"
#include "model.hpp"
#include "syncbatch/torch/device_sync.hpp"
#include "syncbatch/torch/torchscript.hpp"
#include "text.hpp"
#ifdef SYNCBATCH_WITH_AOTI
#include "syncbatch/torch/aoti.hpp"
#endif

namespace syncbatch::http {
namespace json = boost::json;

Mode parse_mode(const std::string& s) {
  if (s == "per-op") return Mode::kPerOp;
  if (s == "per-call") return Mode::kPerCall;
  if (s == "stacked") return Mode::kStacked;
  throw std::invalid_argument("mode: expected per-op, per-call or stacked, got '" + s + "'");
}

std::string to_string(Mode mode) {
  switch (mode) {
    case Mode::kPerOp:
      return "per-op";
    case Mode::kPerCall:
      return "per-call";
    case Mode::kStacked:
      return "stacked";
  }
  return "?";
}

Model::Model(Forward f, std::vector<TensorSpec> in, std::vector<TensorSpec> out, std::string what)
    : forward(std::move(f)),
      inputs(std::move(in)),
      outputs(std::move(out)),
      description(std::move(what)) {}

Model::Model(std::function<at::Tensor(const at::Tensor&)> f, int64_t input_width, std::string what)
    : forward([f = std::move(f)](const std::vector<at::Tensor>& x) {
        return std::vector<at::Tensor>{f(x.at(0))};
      }),
      inputs{TensorSpec{"input", at::kFloat, {input_width}}},
      outputs{TensorSpec{"output", at::kFloat, {}}},
      description(std::move(what)) {}

Model load_model(const std::string& spec, int64_t input_width, c10::Device device,
                 std::vector<TensorSpec> inputs, std::vector<TensorSpec> outputs) {
  if (spec.rfind("mlp:", 0) == 0) {
    int layers = 0;
    int64_t width = 0;
    char x = 0;
    char rest = 0;
    if (std::sscanf(spec.c_str() + 4, "%d%c%ld%c", &layers, &x, &width, &rest) != 3 || x != 'x' ||
        layers < 1 || width < 1)
      throw std::invalid_argument(
          "model: expected mlp:LAYERSxWIDTH (e.g. mlp:3x256), a TorchScript file or an "
          "AOTInductor package (.pt2), got '" +
          spec + "'");
    // The benchmark MLP (bench/common/mlp.hpp).
    const bench::Mlp mlp(layers, width, device);
    return {mlp, width, spec};
  }
  if (inputs.empty()) {
    if (input_width < 1)
      throw std::invalid_argument(
          "model: a model file needs its inputs (a config's \"inputs\") or its input width "
          "(--input-width), got neither");
    inputs = {TensorSpec{"input", at::kFloat, {input_width}}};
  }
  if (outputs.empty()) outputs = {TensorSpec{"output", at::kFloat, {}}};
  Model::Forward forward;
  std::string what;
  if (spec.size() > 4 && spec.ends_with(".pt2")) {
#ifdef SYNCBATCH_WITH_AOTI
    const AotiModel package(spec, {.device = device});
    forward = [package](const std::vector<at::Tensor>& x) { return package.call(x); };
    what = "AOTInductor " + spec;
#else
    throw std::invalid_argument("model: '" + spec +
                                "' is an AOTInductor package, and this build's LibTorch has no "
                                "AOTIModelPackageLoader (it came with LibTorch 2.6)");
#endif
  } else {
    // The library's adapter: eval mode, InferenceMode; what it cannot load is an Error naming
    // the file.
    const TorchScriptModel module(spec, {.device = device});
    forward = [module](const std::vector<at::Tensor>& x) { return module.call(x); };
    what = "TorchScript " + spec;
  }
  return {std::move(forward), std::move(inputs), std::move(outputs), std::move(what)};
}

ServedModel load_served(const std::string& spec, int64_t input_width, ModelOptions options,
                        const std::vector<TensorSpec>& inputs,
                        const std::vector<TensorSpec>& outputs) {
  std::vector<Model> replicas;  // one per device, loaded there
  for (const c10::Device d : options.devices)
    replicas.push_back(load_model(spec, input_width, d, inputs, outputs));
  if (!replicas.empty()) options.device = options.devices.front();
  Model model = replicas.empty() ? load_model(spec, input_width, options.device, inputs, outputs)
                                 : replicas.front();
  const ModelOptions again = options;
  ServedModel served{std::move(model), std::move(options), std::move(replicas)};
  served.reload = [spec, input_width, again, inputs, outputs] {
    return load_served(spec, input_width, again, inputs, outputs);
  };
  return served;
}

namespace {

[[noreturn]] void config_error(const std::string& where, const std::string& expected,
                               const json::value* came) {
  throw std::invalid_argument("config: " + where + ": expected " + expected + ", got " +
                              (came == nullptr ? std::string("none") : excerpt(*came)));
}

const json::value* find(const json::object& o, std::string_view key) {
  const auto it = o.find(key);
  return it == o.end() ? nullptr : &it->value();
}

std::string text(const json::object& o, std::string_view key, const std::string& where,
                 std::string fallback) {
  const json::value* v = find(o, key);
  if (v == nullptr) return fallback;
  if (!v->is_string()) config_error(where + "." + std::string(key), "a string", v);
  return std::string(v->as_string());
}

int64_t whole(const json::object& o, std::string_view key, const std::string& where,
              int64_t fallback, int64_t min = 0) {
  const json::value* v = find(o, key);
  if (v == nullptr) return fallback;
  if (!v->is_int64() || v->get_int64() < min)
    config_error(where + "." + std::string(key), "a whole number >= " + std::to_string(min), v);
  return v->get_int64();
}

bool boolean(const json::object& o, std::string_view key, const std::string& where, bool fallback) {
  const json::value* v = find(o, key);
  if (v == nullptr) return fallback;
  if (!v->is_bool()) config_error(where + "." + std::string(key), "true or false", v);
  return v->get_bool();
}

std::vector<int64_t> sizes(const json::object& o, std::string_view key, const std::string& where,
                           int64_t min) {
  const json::value* v = find(o, key);
  std::vector<int64_t> out;
  if (v == nullptr) return out;
  const std::string at = where + "." + std::string(key);
  if (!v->is_array()) config_error(at, "an array of whole numbers >= " + std::to_string(min), v);
  for (const json::value& e : v->as_array()) {
    if (!e.is_int64() || e.get_int64() < min)
      config_error(at, "whole numbers >= " + std::to_string(min), &e);
    out.push_back(e.get_int64());
  }
  return out;
}

std::vector<TensorSpec> tensors(const json::object& o, std::string_view key,
                                const std::string& where) {
  std::vector<TensorSpec> out;
  const json::value* v = find(o, key);
  if (v == nullptr) return out;
  const std::string at = where + "." + std::string(key);
  if (!v->is_array()) config_error(at, "an array of tensors", v);
  for (std::size_t i = 0; i < v->as_array().size(); ++i) {
    const json::value& e = v->as_array()[i];
    const std::string here = at + "[" + std::to_string(i) + "]";
    if (!e.is_object()) config_error(here, "an object", &e);
    const json::object& t = e.as_object();
    TensorSpec spec;
    spec.name = text(t, "name", here, "");
    if (spec.name.empty()) config_error(here + ".name", "a name", find(t, "name"));
    const std::string datatype = text(t, "datatype", here, "FP32");
    const auto dtype = oip::datatype_dtype(datatype);
    if (!dtype)
      config_error(here + ".datatype",
                   "BOOL, UINT8, INT8, INT16, INT32, INT64, FP16, BF16, FP32 or FP64",
                   find(t, "datatype"));
    spec.dtype = *dtype;
    // The shape as the protocol writes it: the batch dim first (-1), then the rest.
    std::vector<int64_t> shape = sizes(t, "shape", here, -1);
    if (!shape.empty()) {
      if (shape.front() != -1)
        config_error(here + ".shape", "-1 (the rows) first", find(t, "shape"));
      for (std::size_t d = 1; d < shape.size(); ++d)
        if (shape[d] == 0) config_error(here + ".shape", "sizes >= 1 or -1", find(t, "shape"));
      shape.erase(shape.begin());
    }
    spec.shape = std::move(shape);
    if (const json::value* pad = find(t, "pad")) {
      if (!pad->is_number()) config_error(here + ".pad", "a number", pad);
      spec.pad_value = pad->to_number<double>();
    }
    out.push_back(std::move(spec));
  }
  return out;
}

}  // namespace

std::vector<ServedModel> load_config(std::string_view json_text) {
  boost::system::error_code ec;
  const json::value root = json::parse(json_text, ec);
  if (ec) throw std::invalid_argument("config: malformed JSON: " + ec.message());
  const json::value* models = root.is_object() ? find(root.as_object(), "models") : nullptr;
  if (models == nullptr || !models->is_array() || models->as_array().empty())
    config_error("models", "a non-empty array of models", models ? models : &root);
  std::vector<ServedModel> out;
  std::set<std::string> names;
  for (std::size_t i = 0; i < models->as_array().size(); ++i) {
    const json::value& e = models->as_array()[i];
    std::string where = "models[" + std::to_string(i) + "]";
    if (!e.is_object()) config_error(where, "an object", &e);
    const json::object& m = e.as_object();
    ModelOptions o;
    o.name = text(m, "name", where, "");
    if (o.name.empty() || o.name.find('/') != std::string::npos || !names.insert(o.name).second)
      config_error(where + ".name", "a unique name without '/'", find(m, "name"));
    where += " ('" + o.name + "')";
    const std::string spec = text(m, "model", where, "");
    if (spec.empty()) config_error(where + ".model", "a model", find(m, "model"));
    o.mode = parse_mode(text(m, "mode", where, to_string(o.mode)));
    o.policy = SyncPolicy::parse(text(m, "policy", where, "adaptive:2ms"));
    o.device = parse_device(text(m, "device", where, "auto"));
    if (const json::value* devices = find(m, "devices")) {
      if (find(m, "device") != nullptr)
        config_error(where + ".devices", "\"devices\" or \"device\", not both", devices);
      if (!devices->is_array() || devices->as_array().empty())
        config_error(where + ".devices", "a non-empty array of devices", devices);
      for (const json::value& d : devices->as_array()) {
        if (!d.is_string()) config_error(where + ".devices", "device names", &d);
        o.devices.push_back(parse_device(std::string(d.as_string())));
      }
    }
    o.workers = static_cast<std::size_t>(whole(m, "workers", where, 0, 0));
    o.queue_capacity = static_cast<std::size_t>(whole(m, "queue", where, 4096, 1));
    o.timeout = std::chrono::milliseconds(whole(m, "timeout_ms", where, 0));
    o.shed_late = boolean(m, "shed", where, false);
    o.graphs = boolean(m, "graphs", where, false);
    o.priority_levels = static_cast<std::size_t>(whole(m, "priority_levels", where, 2, 1));
    o.max_rows = whole(m, "max_rows", where, 256, 1);
    o.batch_buckets = sizes(m, "batch_buckets", where, 1);
    o.length_buckets = sizes(m, "length_buckets", where, 1);
    if (const json::value* padding = find(m, "max_padding")) {
      if (!padding->is_number() || padding->to_number<double>() < 0 ||
          padding->to_number<double>() > 1)
        config_error(where + ".max_padding", "a share from 0 to 1", padding);
      o.max_padding = padding->to_number<double>();
    }
    out.push_back(load_served(spec, 0, std::move(o), tensors(m, "inputs", where),
                              tensors(m, "outputs", where)));
  }
  return out;
}

}  // namespace syncbatch::http
