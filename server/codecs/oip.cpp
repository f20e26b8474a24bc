// The Open Inference Protocol REST codec. See oip.hpp.
#include "codecs/oip.hpp"

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string_view>
#include <type_traits>
#include <utility>

#include <boost/json.hpp>

#include "codecs/finite.hpp"
#include "text.hpp"

namespace syncbatch::http {
// inf and nan in the 16-bit float layouts (finite.hpp).
template <>
struct FloatBits<at::Half> {
  using Bits = std::uint16_t;
  static constexpr Bits kExponent = 0x7c00;
};
template <>
struct FloatBits<at::BFloat16> {
  using Bits = std::uint16_t;
  static constexpr Bits kExponent = 0x7f80;
};
}  // namespace syncbatch::http

namespace syncbatch::http::oip {
namespace json = boost::json;

static_assert(std::endian::native == std::endian::little,
              "the binary tensor data extension is little-endian; this host is not");

namespace {

struct Datatype {
  const char* name;
  at::ScalarType dtype;
};
constexpr std::array<Datatype, 10> kDatatypes{{{"BOOL", at::kBool},
                                               {"UINT8", at::kByte},
                                               {"INT8", at::kChar},
                                               {"INT16", at::kShort},
                                               {"INT32", at::kInt},
                                               {"INT64", at::kLong},
                                               {"FP16", at::kHalf},
                                               {"BF16", at::kBFloat16},
                                               {"FP32", at::kFloat},
                                               {"FP64", at::kDouble}}};

// Calls f(T{}) with the C++ type of `dtype`, one of kDatatypes'.
template <class F>
decltype(auto) visit(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kBool:
      return f(bool{});
    case at::kByte:
      return f(uint8_t{});
    case at::kChar:
      return f(int8_t{});
    case at::kShort:
      return f(int16_t{});
    case at::kInt:
      return f(int32_t{});
    case at::kLong:
      return f(int64_t{});
    case at::kHalf:
      return f(at::Half{});
    case at::kBFloat16:
      return f(at::BFloat16{});
    case at::kFloat:
      return f(float{});
    case at::kDouble:
      return f(double{});
    default:
      throw std::invalid_argument(std::string("no protocol datatype for dtype ") +
                                  c10::toString(dtype));
  }
}

template <class T>
constexpr bool kIsFloat =
    std::is_floating_point_v<T> || std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>;

ProtocolError bad(std::string message) {
  return bad_request(std::move(message));
}

std::string shape_text(c10::IntArrayRef shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string shape_text(const TensorSpec& spec) {
  std::vector<int64_t> full{-1};
  full.insert(full.end(), spec.shape.begin(), spec.shape.end());
  return shape_text(full);
}

const json::value* field(const json::object& o, std::string_view key) {
  const auto it = o.find(key);
  return it == o.end() ? nullptr : &it->value();
}

// The index in `specs` of the tensor a request names (a JSON string), or specs.size().
std::size_t index_of(const std::vector<TensorSpec>& specs, const json::value* name) {
  std::size_t k = 0;
  while (k < specs.size() &&
         !(name != nullptr && name->is_string() && name->as_string() == specs[k].name))
    ++k;
  return k;
}

std::string names_of(const std::vector<TensorSpec>& specs) {
  return quoted_names(specs, [](const TensorSpec& t) { return t.name; });
}

std::string got(const json::value* v) {
  return v == nullptr ? std::string("none") : excerpt(*v);
}

// Writes the JSON number (or bool) `v` as a T at out[i], or throws naming it.
template <class T>
void put(const json::value& v, T* out, std::size_t i, const std::string& what) {
  const auto element = [&] { return what + ": data element " + std::to_string(i) + ": "; };
  if constexpr (std::is_same_v<T, bool>) {
    if (!v.is_bool()) throw bad(element() + "expected true or false, got " + excerpt(v));
    out[i] = v.get_bool();
  } else if constexpr (kIsFloat<T>) {
    double d = 0;
    if (v.is_double()) {
      d = v.get_double();
    } else if (v.is_int64()) {
      d = static_cast<double>(v.get_int64());
    } else if (v.is_uint64()) {
      d = static_cast<double>(v.get_uint64());
    } else {
      throw bad(element() + "expected a number, got " + excerpt(v));
    }
    const double max = static_cast<double>(std::numeric_limits<T>::max());
    if (!std::isfinite(d) || std::fabs(d) > max)
      throw bad(element() + "expected a finite number of magnitude at most " + number_text(max) +
                ", got " + number_text(d));
    if constexpr (std::is_same_v<T, double>)
      out[i] = d;
    else
      out[i] = static_cast<T>(static_cast<float>(d));
  } else {
    const auto range = [&] {
      return "an integer from " + std::to_string(int64_t{std::numeric_limits<T>::min()}) + " to " +
             std::to_string(int64_t{std::numeric_limits<T>::max()});
    };
    if (!v.is_int64()) throw bad(element() + "expected " + range() + ", got " + excerpt(v));
    const int64_t n = v.get_int64();
    if (n < int64_t{std::numeric_limits<T>::min()} || n > int64_t{std::numeric_limits<T>::max()})
      throw bad(element() + "expected " + range() + ", got " + std::to_string(n));
    out[i] = static_cast<T>(n);
  }
}

// Writes the values of the nested arrays `a` (at `depth` of `shape`) to out[i, ...), advancing
// i: each array must have its dim's size, and hold arrays down to the last dim, values there.
template <class T>
void fill_nested(const json::array& a, T* out, c10::IntArrayRef shape, std::size_t depth,
                 std::size_t& i, const std::string& what) {
  if (static_cast<int64_t>(a.size()) != shape[depth])
    throw bad(what + ": data nested as shape " + shape_text(shape) + " needs " +
              std::to_string(shape[depth]) + " elements at depth " + std::to_string(depth) +
              ", got " + std::to_string(a.size()));
  for (const json::value& e : a) {
    if (depth + 1 == shape.size()) {
      put(e, out, i++, what);
    } else if (!e.is_array()) {
      throw bad(what + ": data nested as shape " + shape_text(shape) + " needs an array at depth " +
                std::to_string(depth + 1) + ", got " + excerpt(e));
    } else {
      fill_nested(e.as_array(), out, shape, depth + 1, i, what);
    }
  }
}

// Writes the values of `data` to out[0, numel): flat (an array of numel values), or nested as
// `shape` says (shape[0] arrays of shape[1] ... values); the shape says how data nests, so
// ragged or over-nested data is refused even where its values add up.
template <class T>
void fill(const json::value& data, T* out, c10::IntArrayRef shape, std::size_t numel,
          const std::string& what) {
  if (!data.is_array())
    throw bad(what + ": expected \"data\" as an array, flat or nested as shape " +
              shape_text(shape) + ", got " + excerpt(data));
  const json::array& a = data.as_array();
  if (!a.empty() && a.front().is_array()) {
    std::size_t i = 0;
    fill_nested(a, out, shape, 0, i, what);
    return;
  }
  if (a.size() != numel)
    throw bad(what + ": shape " + shape_text(shape) + " needs " + std::to_string(numel) +
              " values, got " + std::to_string(a.size()));
  for (std::size_t i = 0; i < numel; ++i) put(a[i], out, i, what);
}

// Checks the values of binary data that their datatype refuses: non-finite floats, bools other
// than 0 and 1.
template <class T>
void check_binary(const T* p, std::size_t n, const std::string& what) {
  if constexpr (kIsFloat<T>) {
    const std::size_t i = first_non_finite(p, n);
    if (i < n)
      throw bad(what + ": binary element " + std::to_string(i) +
                ": expected a finite number, got " + number_text(static_cast<double>(p[i])));
  } else if constexpr (std::is_same_v<T, bool>) {
    for (std::size_t i = 0; i < n; ++i) {
      uint8_t byte = 0;
      std::memcpy(&byte, p + i, 1);
      if (byte > 1)
        throw bad(what + ": binary element " + std::to_string(i) +
                  ": expected a BOOL byte of 0 or 1, got " + std::to_string(byte));
    }
  }
}

// The request's shape of input `spec`, checked against the model's.
std::vector<int64_t> read_shape(const json::value* shape, const TensorSpec& spec,
                                const std::string& what) {
  const auto error = [&] {
    return bad(what + ": expected shape " + shape_text(spec) +
               " (-1: any size >= 1; the first dim is the rows), got " + got(shape));
  };
  if (shape == nullptr || !shape->is_array() || shape->as_array().size() != spec.shape.size() + 1)
    throw error();
  std::vector<int64_t> dims;
  for (std::size_t d = 0; d < shape->as_array().size(); ++d) {
    const json::value& e = shape->as_array()[d];
    if (!e.is_int64() || e.get_int64() < 1) throw error();
    if (d > 0 && spec.shape[d - 1] != -1 && e.get_int64() != spec.shape[d - 1]) throw error();
    dims.push_back(e.get_int64());
  }
  return dims;
}

std::optional<bool> read_bool(const json::object* params, std::string_view key,
                              const std::string& what) {
  if (params == nullptr) return std::nullopt;
  const json::value* v = field(*params, key);
  if (v == nullptr) return std::nullopt;
  if (!v->is_bool())
    throw bad(what + "parameters." + std::string(key) + ": expected true or false, got " +
              excerpt(*v));
  return v->get_bool();
}

const json::object* read_params(const json::object& o, const std::string& what) {
  const json::value* p = field(o, "parameters");
  if (p == nullptr) return nullptr;
  if (!p->is_object()) throw bad(what + "parameters: expected an object, got " + excerpt(*p));
  return &p->as_object();
}

// Refuses the parameters that would change the answer and that this server does not do, each
// named with why: never ignored, where a client would take the raw answer for what it asked.
void refuse_unsupported(const json::object* params, const std::string& what,
                        std::initializer_list<std::pair<std::string_view, std::string_view>> keys) {
  if (params == nullptr) return;
  for (const auto& [key, why] : keys)
    if (field(*params, key) != nullptr)
      throw bad(what + "parameters." + std::string(key) + ": not supported: " + std::string(why));
}

constexpr std::string_view kSharedMemory =
    "this server has no shared-memory extension; send the tensor's data in the request";
constexpr std::string_view kStateless =
    "the model is stateless (no sequence batcher); send each request on its own";

template <class T>
void append_number(std::string& s, T v) {
  char buf[40];
  std::to_chars_result r{};
  if constexpr (std::is_same_v<T, bool>) {
    s += v ? "true" : "false";
    return;
  } else if constexpr (std::is_same_v<T, double>) {
    r = std::to_chars(buf, buf + sizeof buf, v);
  } else if constexpr (kIsFloat<T>) {
    r = std::to_chars(buf, buf + sizeof buf, static_cast<float>(v));
  } else {
    r = std::to_chars(buf, buf + sizeof buf, int64_t{v});
  }
  s.append(buf, r.ptr);
}

}  // namespace

std::string datatype_name(at::ScalarType dtype) {
  for (const Datatype& d : kDatatypes)
    if (d.dtype == dtype) return d.name;
  throw std::invalid_argument(std::string("no protocol datatype for dtype ") +
                              c10::toString(dtype));
}

std::optional<at::ScalarType> datatype_dtype(std::string_view name) {
  for (const Datatype& d : kDatatypes)
    if (name == d.name) return d.dtype;
  return std::nullopt;
}

std::string server_metadata(std::string_view version) {
  return json::serialize(json::object{
      {"name", "syncbatch"},
      {"version", version},
      {"extensions", json::array{"binary_tensor_data", "schedule_policy", "model_configuration",
                                 "statistics", "model_repository"}}});
}

std::string model_metadata(const ModelInfo& model) {
  const auto describe = [](const std::vector<TensorSpec>& specs) {
    json::array a;
    for (const TensorSpec& t : specs) {
      json::array shape{-1};
      if (t.shape.empty()) shape.emplace_back(-1);
      for (int64_t d : t.shape) shape.emplace_back(d);
      a.emplace_back(json::object{
          {"name", t.name}, {"datatype", datatype_name(t.dtype)}, {"shape", std::move(shape)}});
    }
    return a;
  };
  return json::serialize(json::object{{"name", model.name},
                                      {"versions", json::array{"1"}},
                                      {"platform", model.platform},
                                      {"inputs", describe(model.inputs)},
                                      {"outputs", describe(model.outputs)}});
}

InferRequest parse_infer(std::string_view body, std::optional<std::size_t> header_length,
                         const ModelInfo& model, int64_t max_rows, std::size_t pin_from_bytes) {
  if (header_length && *header_length > body.size())
    throw bad("Inference-Header-Content-Length: expected at most the body's " +
              std::to_string(body.size()) + " bytes, got " + std::to_string(*header_length));
  const std::string_view header = header_length ? body.substr(0, *header_length) : body;
  std::string_view binary = header_length ? body.substr(*header_length) : std::string_view{};
  // The parser and its stack are the thread's, kept between requests; the parsed values live
  // in a buffer on this stack frame (the heap only past it): no allocation per JSON value.
  thread_local json::parser parser;
  alignas(std::max_align_t) unsigned char values[32 * 1024];
  json::monotonic_resource memory(values, sizeof values);
  parser.reset(&memory);
  boost::system::error_code ec;
  parser.write(header, ec);
  const json::value v = ec ? json::value() : parser.release();
  if (ec)
    throw bad("malformed JSON body: " + ec.message() + " (expected an inference request object)");
  if (!v.is_object()) throw bad("expected an inference request object, got " + excerpt(v));
  const json::object& o = v.as_object();
  InferRequest r;
  if (const json::value* id = field(o, "id")) {
    if (!id->is_string()) throw bad("id: expected a string, got " + excerpt(*id));
    r.id = std::string(id->as_string());
  }
  const std::string names = names_of(model.inputs);
  const json::value* inputs = field(o, "inputs");
  if (inputs == nullptr || !inputs->is_array() || inputs->as_array().size() != model.inputs.size())
    throw bad("inputs: expected an array of " + std::to_string(model.inputs.size()) + " (" + names +
              "), got " + got(inputs));
  r.inputs.resize(model.inputs.size());
  for (const json::value& in : inputs->as_array()) {
    if (!in.is_object()) throw bad("inputs: expected objects, got " + excerpt(in));
    const json::object& t = in.as_object();
    const json::value* name = field(t, "name");
    const std::size_t k = index_of(model.inputs, name);
    if (k == model.inputs.size())
      throw bad("inputs: expected a name among " + names + ", got " + got(name));
    const TensorSpec& spec = model.inputs[k];
    const std::string what = "input '" + spec.name + "'";
    if (r.inputs[k].defined()) throw bad(what + ": expected once, got twice");
    const json::value* datatype = field(t, "datatype");
    if (datatype == nullptr || !datatype->is_string() ||
        datatype->as_string() != datatype_name(spec.dtype))
      throw bad(what + ": expected datatype \"" + datatype_name(spec.dtype) + "\", got " +
                got(datatype));
    const std::vector<int64_t> shape = read_shape(field(t, "shape"), spec, what);
    if (r.rows == 0) r.rows = shape[0];
    if (shape[0] != r.rows)
      throw bad(what + ": expected the " + std::to_string(r.rows) +
                " rows of the inputs before it, got " + std::to_string(shape[0]));
    if (r.rows > max_rows)
      throw ProtocolError{413, what + ": expected at most " + std::to_string(max_rows) +
                                   " rows, got " + std::to_string(r.rows)};
    // Every value takes at least one byte of the body: a shape that claims more than that is
    // refused before anything is allocated for it (checked by division: a product of dims
    // could wrap around).
    std::size_t numel = 1;
    for (const int64_t d : shape) {
      if (static_cast<std::size_t>(d) > body.size() / numel)
        throw bad(what + ": shape " + shape_text(shape) + " needs more values than the body's " +
                  std::to_string(body.size()) + " bytes can hold");
      numel *= static_cast<std::size_t>(d);
    }
    const bool pinned =
        pin_from_bytes != 0 && numel * c10::elementSize(spec.dtype) >= pin_from_bytes;
    at::Tensor x = at::empty(shape, at::TensorOptions().dtype(spec.dtype).pinned_memory(pinned));
    const json::object* params = read_params(t, what + ": ");
    refuse_unsupported(params, what + ": ",
                       {{"shared_memory_region", kSharedMemory},
                        {"shared_memory_byte_size", kSharedMemory},
                        {"shared_memory_offset", kSharedMemory}});
    const json::value* size = params ? field(*params, "binary_data_size") : nullptr;
    const json::value* data = field(t, "data");
    if (size != nullptr) {
      const std::size_t want = numel * x.element_size();
      if (!header_length)
        throw bad(what +
                  ": parameters.binary_data_size needs the Inference-Header-Content-Length "
                  "header, got none");
      if (data != nullptr) throw bad(what + ": expected \"data\" or binary data, got both");
      if (!size->is_int64() || size->get_int64() < 0 ||
          static_cast<std::size_t>(size->get_int64()) != want)
        throw bad(what + ": expected binary_data_size " + std::to_string(want) + " (shape " +
                  shape_text(shape) + " of " + datatype_name(spec.dtype) + "), got " +
                  excerpt(*size));
      if (want > binary.size())
        throw bad(what + ": expected " + std::to_string(want) +
                  " bytes of binary data, the body has " + std::to_string(binary.size()) + " left");
      std::memcpy(x.data_ptr(), binary.data(), want);
      binary.remove_prefix(want);
      visit(spec.dtype, [&](auto t0) { check_binary(x.data_ptr<decltype(t0)>(), numel, what); });
    } else {
      if (data == nullptr) throw bad(what + ": expected \"data\" or binary data, got neither");
      visit(spec.dtype,
            [&](auto t0) { fill(*data, x.data_ptr<decltype(t0)>(), shape, numel, what); });
    }
    r.inputs[k] = std::move(x);
  }
  if (!binary.empty())
    throw bad("binary data: the inputs' binary_data_size take " +
              std::to_string(body.size() - header.size() - binary.size()) + " bytes, got " +
              std::to_string(body.size() - header.size()));
  const json::object* params = read_params(o, "");
  refuse_unsupported(
      params, "",
      {{"sequence_id", kStateless}, {"sequence_start", kStateless}, {"sequence_end", kStateless}});
  const bool all_binary = read_bool(params, "binary_data_output", "").value_or(false);
  if (const json::value* outputs = field(o, "outputs")) {
    if (!outputs->is_array()) throw bad("outputs: expected an array, got " + excerpt(*outputs));
    for (const json::value& out : outputs->as_array()) {
      const std::size_t k =
          index_of(model.outputs, out.is_object() ? field(out.as_object(), "name") : nullptr);
      if (k == model.outputs.size())
        throw bad("outputs: expected names among " + names_of(model.outputs) + ", got " +
                  excerpt(out));
      for (std::size_t seen : r.outputs)
        if (seen == k)
          throw bad("outputs: expected '" + model.outputs[k].name + "' once, got twice");
      r.outputs.push_back(k);
      const std::string what = "output '" + model.outputs[k].name + "': ";
      const json::object* out_params = read_params(out.as_object(), what);
      refuse_unsupported(
          out_params, what,
          {{"classification", "this server answers the output tensor itself, not its top classes"},
           {"shared_memory_region", kSharedMemory},
           {"shared_memory_byte_size", kSharedMemory},
           {"shared_memory_offset", kSharedMemory}});
      r.binary.push_back(read_bool(out_params, "binary_data", what).value_or(all_binary));
    }
  }
  if (r.outputs.empty()) {
    for (std::size_t k = 0; k < model.outputs.size(); ++k) r.outputs.push_back(k);
    r.binary.assign(model.outputs.size(), all_binary);
  }
  if (params != nullptr) {
    if (const json::value* timeout = field(*params, "timeout")) {
      if (timeout->is_uint64()) {  // past int64: no practical limit
        r.timeout = std::chrono::microseconds::max();
      } else if (!timeout->is_int64() || timeout->as_int64() < 1) {
        throw bad("parameters.timeout: expected microseconds >= 1, got " + excerpt(*timeout));
      } else {
        r.timeout = std::chrono::microseconds(timeout->as_int64());
      }
    }
    if (const json::value* priority = field(*params, "priority")) {
      if (!priority->is_int64() || priority->as_int64() < 0)
        throw bad(
            "parameters.priority: expected a whole number >= 0 (0 the model's default "
            "level, 1 the highest), got " +
            excerpt(*priority));
      r.priority = static_cast<std::size_t>(priority->as_int64());
    }
  }
  return r;
}

// Appends `text` to `s` as a JSON string.
void append_quoted(std::string& s, std::string_view text) {
  const bool plain = std::none_of(text.begin(), text.end(), [](char c) {
    return c == '"' || c == '\\' || static_cast<unsigned char>(c) < 0x20;
  });
  if (!plain) {
    s += json::serialize(json::string(text));
    return;
  }
  s += '"';
  s += text;
  s += '"';
}

void append_integer(std::string& s, std::uint64_t v) {
  char buf[24];
  s.append(buf, std::to_chars(buf, buf + sizeof buf, v).ptr);
}

Encoded infer_response(const ModelInfo& model, const InferRequest& request,
                       const std::vector<at::Tensor>& y) {
  // The outputs asked for, and the answer's size: one buffer, grown once, the binary data (if
  // any) written after the JSON header into the same buffer.
  std::vector<at::Tensor> outs;
  outs.reserve(request.outputs.size());
  std::size_t binary_bytes = 0, json_bytes = 96 + model.name.size();
  for (std::size_t i = 0; i < request.outputs.size(); ++i) {
    const std::size_t k = request.outputs[i];
    if (k >= y.size())
      throw ProtocolError{500, "output '" + model.outputs[k].name + "': the model returned " +
                                   std::to_string(y.size()) + " outputs"};
    outs.push_back(y[k].contiguous());
    const std::size_t n = static_cast<std::size_t>(outs.back().numel());
    json_bytes += 128 + model.outputs[k].name.size();
    if (request.binary[i]) {
      binary_bytes += n * outs.back().element_size();
    } else {
      json_bytes += n * 16;
    }
  }
  std::string body;
  body.reserve(json_bytes + binary_bytes);
  body += "{\"model_name\":";
  append_quoted(body, model.name);
  body += ",\"model_version\":\"1\"";
  if (request.id) {
    body += ",\"id\":";
    append_quoted(body, *request.id);
  }
  body += ",\"outputs\":[";
  for (std::size_t i = 0; i < outs.size(); ++i) {
    const at::Tensor& out = outs[i];
    const std::string& name = model.outputs[request.outputs[i]].name;
    if (i) body += ',';
    body += "{\"name\":";
    append_quoted(body, name);
    body += ",\"datatype\":\"";
    body += datatype_name(out.scalar_type());
    body += "\",\"shape\":[";
    for (int64_t d = 0; d < out.dim(); ++d) {
      if (d) body += ',';
      append_integer(body, static_cast<std::uint64_t>(out.size(d)));
    }
    body += ']';
    const std::size_t n = static_cast<std::size_t>(out.numel());
    if (request.binary[i]) {
      body += ",\"parameters\":{\"binary_data_size\":";
      append_integer(body, n * out.element_size());
      body += "}}";
      continue;
    }
    body += ",\"data\":[";
    visit(out.scalar_type(), [&](auto t0) {
      using T = decltype(t0);
      const T* p = out.data_ptr<T>();
      for (std::size_t e = 0; e < n; ++e) {
        if constexpr (kIsFloat<T>) {
          if (!std::isfinite(static_cast<double>(p[e])))
            throw ProtocolError{500, "output '" + name + "': element " + std::to_string(e) +
                                         " is " + number_text(static_cast<double>(p[e])) +
                                         ", which JSON cannot carry (binary data can: "
                                         "parameters.binary_data_output)"};
        }
        if (e) body += ',';
        append_number(body, p[e]);
      }
    });
    body += "]}";
  }
  body += "]}";
  if (binary_bytes == 0) return {std::move(body), std::nullopt};
  const std::size_t length = body.size();
  for (std::size_t i = 0; i < outs.size(); ++i)
    if (request.binary[i])
      body.append(static_cast<const char*>(outs[i].data_ptr()),
                  static_cast<std::size_t>(outs[i].numel()) * outs[i].element_size());
  return {std::move(body), length};
}

std::string error_body(std::string_view message) {
  return json::serialize(json::object{{"error", message}});
}

}  // namespace syncbatch::http::oip
