// Stacked mode for tensor models. See syncbatch/torch/stacked.hpp.
#include "syncbatch/torch/stacked.hpp"

#include <ATen/ATen.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <memory>
#include <utility>

#include "syncbatch/torch/device_sync.hpp"

namespace syncbatch {
namespace {

std::string describe_spec(const InputSpec& spec) {
  std::vector<int64_t> sizes{0};
  sizes.insert(sizes.end(), spec.trailing_shape.begin(), spec.trailing_shape.end());
  return dtype_name(spec.dtype) + " " + shape_string(sizes, true);
}

Error bad_request(const std::string& message) {
  return Error(ErrorCode::kBadRequest, message);
}

// One request's input tensors, by position; a single-tensor request needs no allocation.
using Row = c10::SmallVector<at::Tensor, 1>;

// Checks one request's tensors; returns an error message, or "" when they can be stacked.
std::string check_inputs(const Row& inputs, const std::vector<InputSpec>& expect) {
  if (inputs.empty()) return "expected at least one input tensor, got none";
  if (!expect.empty() && inputs.size() != expect.size())
    return "expected " + std::to_string(expect.size()) + " input tensors, got " +
           std::to_string(inputs.size());
  for (std::size_t j = 0; j < inputs.size(); ++j) {
    const at::Tensor& t = inputs[j];
    const auto which = [j] { return "input " + std::to_string(j) + ": "; };
    if (!t.defined()) return which() + "expected a defined tensor, got an undefined one";
    if (t.dim() == 0)
      return which() + "expected a tensor with a batch dimension (rank >= 1), got a scalar";
    if (t.size(0) == 0) return which() + "expected at least one row, got " + describe_tensor(t);
    if (expect.empty()) continue;
    const InputSpec& spec = expect[j];
    const bool same =
        t.scalar_type() == spec.dtype &&
        static_cast<std::size_t>(t.dim()) == spec.trailing_shape.size() + 1 &&
        std::equal(spec.trailing_shape.begin(), spec.trailing_shape.end(), t.sizes().begin() + 1);
    if (!same) return which() + "expected " + describe_spec(spec) + ", got " + describe_tensor(t);
  }
  // Every input is cut into the same rows: one request's row i is row i of each input.
  const int64_t rows = inputs.front().size(0);
  if (std::any_of(inputs.begin(), inputs.end(),
                  [&](const at::Tensor& t) { return t.size(0) != rows; })) {
    std::string m =
        "expected every input to have the same number of rows (one row per example), got";
    for (std::size_t j = 0; j < inputs.size(); ++j)
      m += (j == 0 ? " input " : ", input ") + std::to_string(j) + ": " +
           std::to_string(inputs[j].size(0)) + (inputs[j].size(0) == 1 ? " row" : " rows");
    return m;
  }
  return "";
}

// Requests that can share one forward: same count, and per input the same dtype, device and
// shape after the batch dimension.
bool same_signature(const Row& a, const Row& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t j = 0; j < a.size(); ++j) {
    if (a[j].scalar_type() != b[j].scalar_type() || a[j].device() != b[j].device() ||
        a[j].dim() != b[j].dim() || a[j].sizes().slice(1) != b[j].sizes().slice(1))
      return false;
  }
  return true;
}

// Whether `t` is on `device`, where a device without an index ("cuda") is the current one.
bool is_on(const at::Tensor& t, c10::Device device) {
  return t.device() == detail::with_current_index(device);
}

// Concatenates one input position of a group on `target`: on the source device when it is the
// target, else into one (pinned, for CUDA) host buffer followed by one copy.
at::Tensor stack_inputs(const std::vector<at::Tensor>& parts,
                        const std::optional<c10::Device>& target) {
  const c10::Device source = parts.front().device();
  if (!target || is_on(parts.front(), *target))
    return parts.size() == 1 ? parts.front() : at::cat(parts, 0);
  if (source.is_cpu() && target->is_cuda()) {
    int64_t rows = 0;
    for (const auto& p : parts) rows += p.size(0);
    std::vector<int64_t> sizes = parts.front().sizes().vec();
    sizes[0] = rows;
    at::Tensor host = at::empty(sizes, parts.front().options().pinned_memory(true));
    at::cat_out(host, parts, 0);
    return host.to(*target, /*non_blocking=*/true);
  }
  return (parts.size() == 1 ? parts.front() : at::cat(parts, 0)).to(*target);
}

// Moves a batch output where callers want it, asynchronously where it can (the batch's sync
// covers the copy).
at::Tensor place_output(const at::Tensor& out, const std::optional<c10::Device>& where) {
  if (!where || out.device() == *where) return out;
  if (where->is_cpu() && out.is_cuda()) {
    at::Tensor host = at::empty(out.sizes(), out.options().device(c10::kCPU).pinned_memory(true));
    host.copy_(out, /*non_blocking=*/true);
    return host;
  }
  return out.to(*where);
}

// One group's rows, by input position, as the adapters receive them.
using GroupParts = c10::SmallVector<std::vector<at::Tensor>, 1>;

// Each input position of a group concatenated on `target` (see stack_inputs).
Tensors stack_positions(const GroupParts& parts, const std::optional<c10::Device>& target) {
  Tensors stacked;
  stacked.reserve(parts.size());
  for (const auto& position : parts) stacked.push_back(stack_inputs(position, target));
  return stacked;
}

// A group's outputs, shared by its requests; request g owns rows [offsets[g], +rows[g]).
struct BatchOutputs {
  Tensors outputs;
  std::vector<int64_t> offsets;
  std::vector<int64_t> rows;
};

// Runs one group (requests with one signature) in one forward; on failure, bisects.
template <class In, class Out, class Adapter>
class GroupRunner {
 public:
  GroupRunner(Batch<In, Out>& batch, const std::vector<Row>& inputs, const Adapter& adapter,
              const StackingOptions& options)
      : batch_(batch), inputs_(inputs), adapter_(adapter), options_(options) {}

  void run(const std::vector<std::size_t>& group) {
    try {
      forward(group);
    } catch (...) {
      const auto error = std::current_exception();
      if (group.size() == 1 || !options_.isolate_failures) {
        for (std::size_t i : group) batch_.set_error(i, error);
        return;
      }
      const auto mid = group.begin() + static_cast<std::ptrdiff_t>(group.size() / 2);
      run(std::vector<std::size_t>(group.begin(), mid));
      run(std::vector<std::size_t>(mid, group.end()));
    }
  }

 private:
  void forward(const std::vector<std::size_t>& group) {
    const std::size_t positions = inputs_[group.front()].size();
    std::vector<int64_t> rows;
    rows.reserve(group.size());
    int64_t total = 0;
    for (std::size_t i : group) {
      rows.push_back(inputs_[i].front().size(0));
      total += rows.back();
    }
    // The group's rows, input position by input position; the adapter stacks and runs them.
    GroupParts parts(positions);
    for (std::size_t j = 0; j < positions; ++j) {
      parts[j].reserve(group.size());
      for (std::size_t i : group) parts[j].push_back(inputs_[i][j]);
    }
    const std::vector<BucketRun> runs = options_.batch_buckets.plan(total, options_.bucket_policy);
    Tensors outputs;
    if (runs.size() == 1 && runs.front().bucket == total) {
      outputs = adapter_.forward(parts, options_.device);  // as it comes: no padding, no cut
      check_outputs(outputs, total);
    } else {
      outputs = forward_in_runs(parts, runs);
    }
    for (at::Tensor& out : outputs) out = place_output(out, options_.output_device);
    // Each caller cuts its rows from the shared outputs on its own thread (Future::get), so the
    // worker does not create one view per request.
    auto shared = std::make_shared<BatchOutputs>();
    shared->outputs = std::move(outputs);
    shared->offsets.reserve(group.size());
    shared->rows = std::move(rows);
    int64_t offset = 0;
    for (int64_t r : shared->rows) {
      shared->offsets.push_back(offset);
      offset += r;
    }
    for (std::size_t g = 0; g < group.size(); ++g)
      batch_.template set_shared<BatchOutputs, &Adapter::cut>(group[g], shared, g);
  }

  static void check_outputs(const Tensors& outputs, int64_t rows) {
    for (std::size_t k = 0; k < outputs.size(); ++k) {
      const at::Tensor& out = outputs[k];
      if (!out.defined() || out.dim() == 0 || out.size(0) != rows)
        throw bad_request(
            "the model returned " +
            (out.defined() ? describe_tensor(out) : std::string("an undefined tensor")) +
            " as output " + std::to_string(k) + " for " + std::to_string(rows) +
            " input rows: expected one output row per input row");
    }
  }

  // Batch buckets: the group's rows stacked once, then run as the plan's runs, each padded up to
  // its bucket with copies of its last real row; the padding's outputs are dropped and the
  // runs' outputs joined back in order, so each request's rows come back as one.
  Tensors forward_in_runs(const GroupParts& parts, const std::vector<BucketRun>& runs) const {
    const Tensors stacked = stack_positions(parts, options_.device);
    std::vector<Tensors> pieces;  // per output, one piece per run
    int64_t start = 0;
    for (const BucketRun& run : runs) {
      Tensors in;
      in.reserve(stacked.size());
      for (const at::Tensor& x : stacked)
        in.push_back(padded(x.narrow(0, start, run.rows), run.bucket));
      Tensors out = adapter_.forward_stacked(in);
      check_outputs(out, run.bucket);
      if (pieces.empty()) pieces.resize(out.size());
      if (out.size() != pieces.size())
        throw bad_request("the model returned " + std::to_string(out.size()) +
                          " outputs for one run and " + std::to_string(pieces.size()) +
                          " for another");
      for (std::size_t k = 0; k < out.size(); ++k)
        pieces[k].push_back(run.rows == run.bucket ? out[k] : out[k].narrow(0, 0, run.rows));
      start += run.rows;
    }
    Tensors joined;
    joined.reserve(pieces.size());
    for (auto& p : pieces) joined.push_back(p.size() == 1 ? p.front() : at::cat(p, 0));
    return joined;
  }

  // `x` with rows appended up to `rows`, each a copy of x's last row.
  static at::Tensor padded(const at::Tensor& x, int64_t rows) {
    if (x.size(0) == rows) return x;
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes[0] = rows - x.size(0);
    return at::cat({x, x.narrow(0, x.size(0) - 1, 1).expand(sizes)}, 0);
  }

  Batch<In, Out>& batch_;
  const std::vector<Row>& inputs_;
  const Adapter& adapter_;
  const StackingOptions& options_;
};

template <class In, class Out, class Adapter>
void run_batch(Batch<In, Out>& batch, const Adapter& adapter, const StackingOptions& options) {
  std::vector<Row> inputs;
  inputs.reserve(batch.size());
  for (std::size_t i = 0; i < batch.size(); ++i) inputs.push_back(adapter.tensors(batch.input(i)));
  std::vector<std::vector<std::size_t>> groups;
  for (std::size_t i = 0; i < batch.size(); ++i) {
    const std::string problem = check_inputs(inputs[i], options.expect);
    if (!problem.empty()) {
      batch.set_error(i, std::make_exception_ptr(bad_request(problem)));
      continue;
    }
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) {
      return same_signature(inputs[g.front()], inputs[i]);
    });
    if (it == groups.end()) {
      groups.push_back({i});
    } else {
      it->push_back(i);
    }
  }
  GroupRunner<In, Out, Adapter> runner(batch, inputs, adapter, options);
  for (const auto& group : groups) runner.run(group);
}

// Adapts a single-tensor model to the list-of-tensors machinery.
struct SingleAdapter {
  RowsModel model;
  Row tensors(const at::Tensor& t) const { return Row{t}; }
  Tensors forward(const GroupParts& parts, const std::optional<c10::Device>& target) const {
    const std::vector<at::Tensor>& rows = parts.front();
    // A model that stacks the rows itself, where they need no staging on another device.
    if (model.forward_rows && rows.size() > 1 && (!target || is_on(rows.front(), *target)))
      return {model.forward_rows(rows)};
    return {model.forward(stack_inputs(rows, target))};
  }
  Tensors forward_stacked(const Tensors& stacked) const { return {model.forward(stacked.front())}; }
  static at::Tensor cut(const BatchOutputs& b, std::size_t g) {
    return b.outputs.front().narrow(0, b.offsets[g], b.rows[g]);
  }
};

struct MultiAdapter {
  std::function<Tensors(const Tensors&)> model;
  Row tensors(const Tensors& t) const { return Row(t.begin(), t.end()); }
  Tensors forward(const GroupParts& parts, const std::optional<c10::Device>& target) const {
    return model(stack_positions(parts, target));
  }
  Tensors forward_stacked(const Tensors& stacked) const { return model(stacked); }
  static Tensors cut(const BatchOutputs& b, std::size_t g) {
    Tensors mine;
    mine.reserve(b.outputs.size());
    for (const auto& out : b.outputs) mine.push_back(out.narrow(0, b.offsets[g], b.rows[g]));
    return mine;
  }
};

void check_options(const StackingOptions& options) {
  for (const auto& spec : options.expect)
    for (int64_t d : spec.trailing_shape)
      if (d < 0)
        throw Error(ErrorCode::kInvalidArgument,
                    "StackingOptions.expect: expected sizes >= 0, got " + describe_spec(spec));
}

}  // namespace

BatchModel<at::Tensor, at::Tensor> make_stacked_model(RowsModel model, StackingOptions options) {
  if (!model.forward)
    throw Error(ErrorCode::kInvalidArgument, "make_stacked_model: the model is empty");
  check_options(options);
  return {[adapter = SingleAdapter{std::move(model)}, options = std::move(options)](
              Batch<at::Tensor, at::Tensor>& batch) { run_batch(batch, adapter, options); }};
}

BatchModel<at::Tensor, at::Tensor> make_stacked_model(
    std::function<at::Tensor(const at::Tensor&)> model, StackingOptions options) {
  return make_stacked_model(RowsModel{std::move(model)}, std::move(options));
}

BatchModel<Tensors, Tensors> make_stacked_model_multi(std::function<Tensors(const Tensors&)> model,
                                                      StackingOptions options) {
  if (!model)
    throw Error(ErrorCode::kInvalidArgument, "make_stacked_model_multi: the model is empty");
  check_options(options);
  return {[adapter = MultiAdapter{std::move(model)}, options = std::move(options)](
              Batch<Tensors, Tensors>& batch) { run_batch(batch, adapter, options); }};
}

}  // namespace syncbatch
