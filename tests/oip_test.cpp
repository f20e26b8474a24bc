// The Open Inference Protocol codec alone (no sockets): every datatype through JSON and binary
// tensor data, requested outputs, and requests refused with the reason.
#include "codecs/oip.hpp"

#include <ATen/ATen.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include <boost/json.hpp>

namespace syncbatch::http::oip {
namespace {

namespace json = boost::json;

ModelInfo two_inputs() {
  return {"m",
          {TensorSpec{"ids", at::kLong, {-1}}, TensorSpec{"x", at::kFloat, {2}}},
          {TensorSpec{"y", at::kFloat, {}}, TensorSpec{"n", at::kLong, {}}}};
}

std::string bytes_of(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size());
}

// A JSON infer request of one input `dt` [1, n] holding `data`.
std::string one(const std::string& dt, std::size_t n, const std::string& data) {
  return R"({"inputs":[{"name":"v","datatype":")" + dt + R"(","shape":[1,)" + std::to_string(n) +
         R"(],"data":)" + data + "}]}";
}

ProtocolError refusal(std::string_view body, std::optional<std::size_t> header, const ModelInfo& m,
                      int64_t max_rows = 16) {
  try {
    parse_infer(body, header, m, max_rows);
  } catch (const ProtocolError& e) {
    return e;
  }
  ADD_FAILURE() << "accepted: " << body.substr(0, 200);
  return {0, ""};
}

TEST(OipCodec, EveryDatatypeReadsFromJsonAndAnswersInKind) {
  struct Case {
    std::string datatype;
    at::ScalarType dtype;
    std::string data;
    at::Tensor want;
  };
  const auto of = [](std::vector<double> v, at::ScalarType dtype) {
    return at::tensor(v, at::kDouble).to(dtype);
  };
  const std::vector<Case> cases{
      {"BOOL", at::kBool, "[true,false,true]", of({1, 0, 1}, at::kBool)},
      {"UINT8", at::kByte, "[0,7,255]", of({0, 7, 255}, at::kByte)},
      {"INT8", at::kChar, "[-128,0,127]", of({-128, 0, 127}, at::kChar)},
      {"INT16", at::kShort, "[-32768,1,32767]", of({-32768, 1, 32767}, at::kShort)},
      {"INT32", at::kInt, "[-2147483648,2,2147483647]",
       of({-2147483648.0, 2, 2147483647}, at::kInt)},
      {"INT64", at::kLong, "[-9223372036854775807,3,9223372036854775807]",
       at::tensor(std::vector<int64_t>{-9223372036854775807LL, 3, 9223372036854775807LL})},
      {"FP16", at::kHalf, "[0.5,-2,65504]", of({0.5, -2, 65504}, at::kHalf)},
      {"BF16", at::kBFloat16, "[0.5,-2,1e30]", of({0.5, -2, 1e30}, at::kBFloat16)},
      {"FP32", at::kFloat, "[0.25,-1.5,3e38]", of({0.25, -1.5, 3e38}, at::kFloat)},
      {"FP64", at::kDouble, "[[0.1,1e300,-3]]", of({0.1, 1e300, -3}, at::kDouble)},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.datatype);
    EXPECT_EQ(datatype_name(c.dtype), c.datatype);
    EXPECT_EQ(datatype_dtype(c.datatype), c.dtype);
    const ModelInfo m{"m", {TensorSpec{"v", c.dtype, {3}}}, {TensorSpec{"v", c.dtype, {}}}};
    const InferRequest r = parse_infer(one(c.datatype, 3, c.data), std::nullopt, m, 4);
    ASSERT_EQ(r.inputs.size(), 1u);
    EXPECT_EQ(r.inputs[0].scalar_type(), c.dtype);
    EXPECT_TRUE(at::equal(r.inputs[0], c.want.view({1, 3})));
    // Answered as it came: the same values through JSON and through binary data.
    const Encoded text = infer_response(m, r, {r.inputs[0]});
    EXPECT_FALSE(text.header_length);
    const json::object out =
        json::parse(text.body).as_object().at("outputs").as_array()[0].as_object();
    EXPECT_EQ(out.at("datatype").as_string(), c.datatype);
    const InferRequest again =
        parse_infer(one(c.datatype, 3, json::serialize(out.at("data"))), std::nullopt, m, 4);
    EXPECT_TRUE(at::equal(again.inputs[0], r.inputs[0])) << text.body;
    InferRequest binary = r;
    binary.binary = {true};
    const Encoded bin = infer_response(m, binary, {r.inputs[0]});
    ASSERT_TRUE(bin.header_length);
    EXPECT_EQ(bin.body.substr(*bin.header_length), bytes_of(c.want));
  }
}

TEST(OipCodec, NumbersADatatypeCannotHoldAreRefusedNamingTheRange) {
  const auto message = [](const std::string& dt, const std::string& data) {
    const ModelInfo m{"m", {TensorSpec{"v", *datatype_dtype(dt), {1}}}, {TensorSpec{"y"}}};
    const ProtocolError e = refusal(one(dt, 1, data), std::nullopt, m);
    EXPECT_EQ(e.status, 400) << e.message;
    return e.message;
  };
  EXPECT_NE(message("INT8", "[128]").find("an integer from -128 to 127, got 128"),
            std::string::npos);
  EXPECT_NE(message("UINT8", "[-1]").find("from 0 to 255, got -1"), std::string::npos);
  EXPECT_NE(message("INT32", "[1.5]").find("got 1.5"), std::string::npos);
  EXPECT_NE(message("INT64", "[18446744073709551615]").find("an integer from"), std::string::npos);
  EXPECT_NE(message("BOOL", "[1]").find("expected true or false, got 1"), std::string::npos);
  EXPECT_NE(message("FP16", "[70000]").find("magnitude at most 65504, got 70000"),
            std::string::npos);
  EXPECT_NE(message("FP32", "[1e39]").find("got 1e+39"), std::string::npos);
  EXPECT_NE(message("FP64", "[\"x\"]").find("expected a number, got \"x\""), std::string::npos);
}

TEST(OipCodec, SeveralInputsInAnyOrderWithVaryingDims) {
  const ModelInfo m = two_inputs();
  const InferRequest r = parse_infer(
      R"({"id":"a","inputs":[{"name":"x","datatype":"FP32","shape":[2,2],"data":[1,2,3,4]},)"
      R"({"name":"ids","datatype":"INT64","shape":[2,3],"data":[[1,2,3],[4,5,6]]}],)"
      R"("outputs":[{"name":"n"}],"parameters":{"timeout":500,"priority":0}})",
      std::nullopt, m, 4);
  EXPECT_EQ(r.id, "a");
  EXPECT_EQ(r.rows, 2);
  EXPECT_TRUE(at::equal(r.inputs[0], at::tensor({1, 2, 3, 4, 5, 6}, at::kLong).view({2, 3})));
  EXPECT_TRUE(at::equal(r.inputs[1], at::tensor({1.f, 2.f, 3.f, 4.f}).view({2, 2})));
  EXPECT_EQ(r.outputs, std::vector<std::size_t>{1});
  EXPECT_EQ(r.timeout, std::chrono::microseconds(500));
  EXPECT_EQ(r.priority, 0u);
  const Encoded e = infer_response(m, r, {at::zeros({2, 1}), at::tensor({7, 8}, at::kLong)});
  const json::object o = json::parse(e.body).as_object();
  EXPECT_EQ(o.at("id").as_string(), "a");
  ASSERT_EQ(o.at("outputs").as_array().size(), 1u);
  EXPECT_EQ(json::serialize(o.at("outputs").as_array()[0]),
            R"({"name":"n","datatype":"INT64","shape":[2],"data":[7,8]})");
}

TEST(OipCodec, BinaryInputsTakeTheirBytesInOrderAfterTheJsonHeader) {
  const ModelInfo m = two_inputs();
  const at::Tensor ids = at::tensor({5, 6, 7, 8}, at::kLong).view({2, 2});
  const at::Tensor x = at::tensor({0.5f, 1.5f, 2.5f, 3.5f}).view({2, 2});
  const std::string header =
      R"({"inputs":[{"name":"x","datatype":"FP32","shape":[2,2],"parameters":{"binary_data_size":16}},)"
      R"({"name":"ids","datatype":"INT64","shape":[2,2],"parameters":{"binary_data_size":32}}],)"
      R"("parameters":{"binary_data_output":true}})";
  const std::string body = header + bytes_of(x) + bytes_of(ids);
  const InferRequest r = parse_infer(body, header.size(), m, 4);
  EXPECT_TRUE(at::equal(r.inputs[0], ids));
  EXPECT_TRUE(at::equal(r.inputs[1], x));
  EXPECT_EQ(r.binary, (std::vector<bool>{true, true}));
  const Encoded e = infer_response(m, r, {x, ids});
  ASSERT_TRUE(e.header_length);
  const json::array outs =
      json::parse(e.body.substr(0, *e.header_length)).as_object().at("outputs").as_array();
  EXPECT_EQ(outs[0].at("parameters").at("binary_data_size").as_int64(), 16);
  EXPECT_EQ(outs[1].at("parameters").at("binary_data_size").as_int64(), 32);
  EXPECT_EQ(e.body.substr(*e.header_length), bytes_of(x) + bytes_of(ids));

  // Sizes that do not add up, a header longer than the body, binary data without its header.
  EXPECT_NE(refusal(body + "x", header.size(), m).message.find("take 48 bytes, got 49"),
            std::string::npos);
  EXPECT_NE(refusal(body.substr(0, body.size() - 1), header.size(), m)
                .message.find("expected 32 bytes of binary data, the body has 31 left"),
            std::string::npos);
  EXPECT_NE(refusal(body, body.size() + 1, m).message.find("Inference-Header-Content-Length"),
            std::string::npos);
  EXPECT_NE(refusal(header, std::nullopt, m).message.find("needs the Inference-Header"),
            std::string::npos);
  // Binary floats are checked as JSON numbers are: no inf or nan reaches the model.
  const float inf = std::numeric_limits<float>::infinity();
  const std::string bad_x(reinterpret_cast<const char*>(&inf), 4);
  EXPECT_NE(refusal(header + bytes_of(x).substr(4) + bad_x + bytes_of(ids), header.size(), m)
                .message.find("binary element 3: expected a finite number, got inf"),
            std::string::npos);
}

// Every float datatype's binary data: the largest finite values, a denormal and -0 pass as they
// are; inf, -inf and nan at any place are refused, naming the first.
TEST(OipCodec, BinaryFloatsOfEveryWidthAreCheckedForInfAndNan) {
  const double inf = std::numeric_limits<double>::infinity();
  for (const auto& [name, dtype] :
       std::vector<std::pair<std::string, at::ScalarType>>{{"FP16", at::kHalf},
                                                           {"BF16", at::kBFloat16},
                                                           {"FP32", at::kFloat},
                                                           {"FP64", at::kDouble}}) {
    SCOPED_TRACE(name);
    const ModelInfo m{"m", {TensorSpec{"v", dtype, {-1}}}, {TensorSpec{"y", dtype, {}}}};
    const auto request = [&](const at::Tensor& v) {
      const std::string header = R"({"inputs":[{"name":"v","datatype":")" + name +
                                 R"(","shape":[1,)" + std::to_string(v.numel()) +
                                 R"(],"parameters":{"binary_data_size":)" +
                                 std::to_string(v.numel() * v.element_size()) + "}}]}";
      return std::make_pair(header + bytes_of(v), header.size());
    };
    // 67 values (past any vector width): large finite ones, the smallest denormal, -0.
    const double big = dtype == at::kHalf       ? 65504.0
                       : dtype == at::kBFloat16 ? 3.3895313892515355e38
                       : dtype == at::kFloat
                           ? static_cast<double>(std::numeric_limits<float>::max())
                           : std::numeric_limits<double>::max();
    at::Tensor good = at::full({67}, -big, at::kDouble).to(dtype);
    good[5] = at::tensor(std::vector<double>{-0.0}, at::kDouble).to(dtype)[0];
    const double denormal = dtype == at::kHalf       ? 5.960464477539063e-08
                            : dtype == at::kBFloat16 ? 9.183549615799121e-41
                            : dtype == at::kFloat    ? 1.401298464324817e-45
                                                     : 4.9406564584124654e-324;
    good[6] = at::tensor(std::vector<double>{denormal}, at::kDouble).to(dtype)[0];
    ASSERT_NE(good[6].item<double>(), 0.0);
    const auto [body, length] = request(good);
    const InferRequest r = parse_infer(body, length, m, 4);
    EXPECT_EQ(bytes_of(r.inputs[0]), bytes_of(good));
    for (const double bad : {inf, -inf, std::nan("")}) {
      for (const int64_t at_index : {0, 40, 66}) {
        at::Tensor v = good.clone();
        v[at_index] = at::tensor(std::vector<double>{bad}, at::kDouble).to(dtype)[0];
        const auto [bad_body, bad_length] = request(v);
        EXPECT_NE(refusal(bad_body, bad_length, m)
                      .message.find("binary element " + std::to_string(at_index) +
                                    ": expected a finite number"),
                  std::string::npos)
            << bad << " at " << at_index;
      }
    }
  }
}

TEST(OipCodec, RequestsThatDoNotFitTheModelAreRefusedWithTheReason) {
  const ModelInfo m = two_inputs();
  const std::string x = R"({"name":"x","datatype":"FP32","shape":[1,2],"data":[1,2]})";
  const std::string ids = R"({"name":"ids","datatype":"INT64","shape":[1,1],"data":[1]})";
  struct Case {
    std::string body, expected;
    int status = 400;
  };
  const std::vector<Case> cases{
      {"{", "malformed JSON"},
      {R"({"inputs":[)" + x + "]}", "expected an array of 2 ('ids', 'x')"},
      {R"({"inputs":[)" + x + "," + x + "]}", "input 'x': expected once, got twice"},
      {R"({"inputs":[)" + x + R"(,{"name":"z"}]})", "expected a name among 'ids', 'x', got \"z\""},
      {R"({"inputs":[)" + ids + R"(,{"name":"x","datatype":"FP64","shape":[1,2],"data":[1,2]}]})",
       "input 'x': expected datatype \"FP32\", got \"FP64\""},
      {R"({"inputs":[)" + ids + R"(,{"name":"x","datatype":"FP32","shape":[1,3],"data":[1,2,3]}]})",
       "input 'x': expected shape [-1, 2]"},
      {R"({"inputs":[)" + ids +
           R"(,{"name":"x","datatype":"FP32","shape":[2,2],"data":[1,2,3,4]}]})",
       "input 'x': expected the 1 rows of the inputs before it, got 2"},
      {R"({"inputs":[)" + ids + R"(,{"name":"x","datatype":"FP32","shape":[1,2],"data":[1]}]})",
       "needs 2 values, got 1"},
      {R"({"inputs":[)" + ids + R"(,{"name":"x","datatype":"FP32","shape":[1,2]}]})",
       "expected \"data\" or binary data, got neither"},
      {R"({"inputs":[)" + ids + "," + x + R"(],"outputs":[{"name":"q"}]})",
       "outputs: expected names among 'y', 'n'"},
      {R"({"inputs":[)" + ids + "," + x + R"(],"outputs":[{"name":"y"},{"name":"y"}]})",
       "'y' once, got twice"},
      {R"({"inputs":[)" + ids + "," + x + R"(],"parameters":{"binary_data_output":1}})",
       "parameters.binary_data_output: expected true or false"},
      {R"({"inputs":[)" + ids + "," + x + R"(],"parameters":{"timeout":0}})",
       "parameters.timeout: expected microseconds >= 1"},
      // A shape that claims more values than the body could hold is refused before anything is
      // allocated for it.
      {R"({"inputs":[{"name":"ids","datatype":"INT64","shape":[1,4000000000000],"data":[1]},)" + x +
           "]}",
       "needs more values than the body's"},
      {R"({"inputs":[{"name":"ids","datatype":"INT64","shape":[17,1],"data":[1]},)" + x + "]}",
       "expected at most 16 rows, got 17", 413},
  };
  for (const Case& c : cases) {
    const ProtocolError e = refusal(c.body, std::nullopt, m);
    EXPECT_EQ(e.status, c.status) << c.body << " -> " << e.message;
    EXPECT_NE(e.message.find(c.expected), std::string::npos) << c.body << " -> " << e.message;
  }
}

TEST(OipCodec, NonFiniteOutputsAreA500InJsonAndCarriedAsTheyAreInBinary) {
  const ModelInfo m{"m", {TensorSpec{"v", at::kFloat, {1}}}, {TensorSpec{"y"}}};
  InferRequest r = parse_infer(one("FP32", 1, "[1]"), std::nullopt, m, 4);
  const at::Tensor y = at::tensor({1.f, std::numeric_limits<float>::quiet_NaN()});
  try {
    infer_response(m, r, {y});
    ADD_FAILURE() << "a NaN went into JSON";
  } catch (const ProtocolError& e) {
    EXPECT_EQ(e.status, 500);
    EXPECT_NE(e.message.find("output 'y': element 1 is nan"), std::string::npos) << e.message;
  }
  r.binary = {true};
  const Encoded e = infer_response(m, r, {y});
  EXPECT_EQ(e.body.substr(*e.header_length), bytes_of(y));
}

TEST(OipCodec, MetadataDescribesEveryTensorWithMinusOneForTheRowsAndVaryingDims) {
  EXPECT_EQ(model_metadata(two_inputs()),
            R"({"name":"m","versions":["1"],"platform":"syncbatch","inputs":[)"
            R"({"name":"ids","datatype":"INT64","shape":[-1,-1]},)"
            R"({"name":"x","datatype":"FP32","shape":[-1,2]}],"outputs":[)"
            R"({"name":"y","datatype":"FP32","shape":[-1,-1]},)"
            R"({"name":"n","datatype":"INT64","shape":[-1,-1]}]})");
}

}  // namespace
}  // namespace syncbatch::http::oip
