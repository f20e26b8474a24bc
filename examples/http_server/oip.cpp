// The Open Inference Protocol REST codec. See oip.hpp.
#include "oip.hpp"

#include <ATen/ATen.h>

#include <cmath>

#include <boost/json.hpp>

#include "text.hpp"

namespace syncbatch::http::oip {
namespace json = boost::json;

namespace {

ProtocolError bad(std::string message) {
  return {400, std::move(message)};
}

// Appends the numbers of `data`, flat or nested (row-major), to `out`.
void flatten(const json::value& data, std::vector<float>& out, std::size_t limit) {
  if (data.is_array()) {
    for (const json::value& e : data.as_array()) {
      flatten(e, out, limit);
      if (out.size() > limit) return;  // the caller reports the length
    }
    return;
  }
  if (!data.is_number())
    throw bad("input 'input': data element " + std::to_string(out.size()) +
              ": expected a number, got " + excerpt(data));
  const double d = data.to_number<double>();
  if (!fits_float32(d))
    throw bad("input 'input': data element " + std::to_string(out.size()) +
              ": expected a finite number in float32 range, got " + number_text(d));
  out.push_back(static_cast<float>(d));
}

const json::value* field(const json::object& o, std::string_view key) {
  const auto it = o.find(key);
  return it == o.end() ? nullptr : &it->value();
}

}  // namespace

std::string server_metadata(std::string_view version) {
  return json::serialize(
      json::object{{"name", "syncbatch"}, {"version", version}, {"extensions", json::array{}}});
}

std::string model_metadata(const ModelInfo& model) {
  return json::serialize(json::object{
      {"name", model.name},
      {"versions", json::array{"1"}},
      {"platform", model.platform},
      {"inputs", json::array{json::object{{"name", "input"},
                                          {"datatype", "FP32"},
                                          {"shape", json::array{-1, model.input_width}}}}},
      {"outputs", json::array{json::object{
                      {"name", "output"}, {"datatype", "FP32"}, {"shape", json::array{-1, -1}}}}}});
}

InferRequest parse_infer(std::string_view body, const ModelInfo& model, int64_t max_rows) {
  boost::system::error_code ec;
  const json::value v = json::parse(body, ec);
  if (ec)
    throw bad("malformed JSON body: " + ec.message() + " (expected an inference request object)");
  if (!v.is_object()) throw bad("expected an inference request object, got " + excerpt(v));
  const json::object& o = v.as_object();
  InferRequest r;
  if (const json::value* id = field(o, "id")) {
    if (!id->is_string()) throw bad("id: expected a string, got " + excerpt(*id));
    r.id = std::string(id->as_string());
  }
  const json::value* inputs = field(o, "inputs");
  if (inputs == nullptr || !inputs->is_array() || inputs->as_array().size() != 1)
    throw bad("inputs: expected an array of 1 input ('input'), got " +
              (inputs == nullptr ? std::string("none") : excerpt(*inputs)));
  const json::value& in = inputs->as_array().front();
  if (!in.is_object()) throw bad("inputs[0]: expected an object, got " + excerpt(in));
  const json::object& t = in.as_object();
  const json::value* name = field(t, "name");
  if (name == nullptr || !name->is_string() || name->as_string() != "input")
    throw bad("inputs[0].name: expected \"input\", got " +
              (name == nullptr ? std::string("none") : excerpt(*name)));
  const json::value* datatype = field(t, "datatype");
  if (datatype == nullptr || !datatype->is_string() || datatype->as_string() != "FP32")
    throw bad("input 'input': expected datatype \"FP32\", got " +
              (datatype == nullptr ? std::string("none") : excerpt(*datatype)));
  const json::value* shape = field(t, "shape");
  const auto shape_error = [&] {
    return bad("input 'input': expected shape [rows, " + std::to_string(model.input_width) +
               "] with rows >= 1, got " +
               (shape == nullptr ? std::string("none") : excerpt(*shape)));
  };
  if (shape == nullptr || !shape->is_array() || shape->as_array().size() != 2) throw shape_error();
  const json::array& dims = shape->as_array();
  if (!dims[0].is_int64() || !dims[1].is_int64() || dims[0].as_int64() < 1 ||
      dims[1].as_int64() != model.input_width)
    throw shape_error();
  r.rows = dims[0].as_int64();
  if (r.rows > max_rows)
    throw ProtocolError{413, "input 'input': expected at most " + std::to_string(max_rows) +
                                 " rows, got " + std::to_string(r.rows)};
  const json::value* data = field(t, "data");
  if (data == nullptr) throw bad("input 'input': expected \"data\", got none");
  const auto want = static_cast<std::size_t>(r.rows * model.input_width);
  r.values.reserve(want);
  flatten(*data, r.values, want);
  if (r.values.size() != want)
    throw bad("input 'input': shape [" + std::to_string(r.rows) + ", " +
              std::to_string(model.input_width) + "] needs " + std::to_string(want) +
              " numbers, got " +
              (r.values.size() > want ? "more" : std::to_string(r.values.size())));
  if (const json::value* outputs = field(o, "outputs")) {
    if (!outputs->is_array()) throw bad("outputs: expected an array, got " + excerpt(*outputs));
    for (const json::value& out : outputs->as_array()) {
      const json::value* n = out.is_object() ? field(out.as_object(), "name") : nullptr;
      if (n == nullptr || !n->is_string() || n->as_string() != "output")
        throw bad("outputs: expected only {\"name\": \"output\"}, got " + excerpt(out));
    }
  }
  if (const json::value* params = field(o, "parameters")) {
    if (!params->is_object()) throw bad("parameters: expected an object, got " + excerpt(*params));
    const json::object& p = params->as_object();
    if (const json::value* timeout = field(p, "timeout")) {
      if (!timeout->is_int64() || timeout->as_int64() < 1)
        throw bad("parameters.timeout: expected microseconds >= 1, got " + excerpt(*timeout));
      r.timeout = std::chrono::microseconds(timeout->as_int64());
    }
    if (const json::value* priority = field(p, "priority")) {
      if (!priority->is_int64() || priority->as_int64() < 0)
        throw bad("parameters.priority: expected a level >= 0, got " + excerpt(*priority));
      r.priority = static_cast<std::size_t>(priority->as_int64());
    }
  }
  return r;
}

std::string infer_response(const ModelInfo& model, const std::optional<std::string>& id,
                           const at::Tensor& y) {
  const at::Tensor out = y.to(at::kFloat).contiguous().reshape({y.size(0), -1});
  const float* p = out.data_ptr<float>();
  const int64_t n = out.numel();
  json::array data;
  data.reserve(static_cast<std::size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(p[i]))
      throw ProtocolError{500, "output 'output': element " + std::to_string(i) + " is " +
                                   number_text(p[i]) + ", which JSON cannot carry"};
    data.emplace_back(static_cast<double>(p[i]));
  }
  json::object o{
      {"model_name", model.name},
      {"model_version", "1"},
      {"outputs", json::array{json::object{{"name", "output"},
                                           {"datatype", "FP32"},
                                           {"shape", json::array{out.size(0), out.size(1)}},
                                           {"data", std::move(data)}}}}};
  if (id) o["id"] = *id;
  return json::serialize(o);
}

std::string error_body(std::string_view message) {
  return json::serialize(json::object{{"error", message}});
}

}  // namespace syncbatch::http::oip
