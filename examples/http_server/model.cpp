// Models the HTTP server can serve: the benchmark MLP, or a TorchScript file.
#include <ATen/ATen.h>

#include <cstdio>
#include <memory>
#include <stdexcept>

#include "mlp.hpp"
#include "server.hpp"
#include "syncbatch/torch/torchscript.hpp"

namespace syncbatch::http {

Model load_model(const std::string& spec, int64_t input_width, c10::Device device) {
  if (spec.rfind("mlp:", 0) == 0) {
    int layers = 0;
    int64_t width = 0;
    char x = 0;
    char rest = 0;
    if (std::sscanf(spec.c_str() + 4, "%d%c%ld%c", &layers, &x, &width, &rest) != 3 || x != 'x' ||
        layers < 1 || width < 1)
      throw std::invalid_argument(
          "model: expected mlp:LAYERSxWIDTH (e.g. mlp:3x256) or a "
          "TorchScript file, got '" +
          spec + "'");
    // The benchmark MLP (bench/common/mlp.hpp).
    const bench::Mlp mlp(layers, width, device);
    return {mlp, width, spec};
  }
  if (input_width < 1)
    throw std::invalid_argument(
        "model: a TorchScript file needs its input width (--input-width), "
        "got " +
        std::to_string(input_width));
  // The library's adapter: eval mode, InferenceMode; what it cannot load is an Error naming the
  // file.
  const TorchScriptModel module(spec, {.device = device});
  return {module, input_width, "TorchScript " + spec};
}

}  // namespace syncbatch::http
