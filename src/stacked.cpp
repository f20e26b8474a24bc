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
  std::string s = dtype_name(spec.dtype) + " [*";
  for (int64_t d : spec.trailing_shape) s += ", " + (d == kVaries ? "any" : std::to_string(d));
  return s + "]";
}

// The dims declared kVaries (tensor dims, >= 1), per input position, and the first of them: the
// dim whose size is a request's length.
struct Varying {
  std::vector<c10::SmallVector<int64_t, 2>> dims;
  std::size_t input = 0;  // the length's input and dim, when any()
  int64_t dim = 0;
  bool any() const { return dim != 0; }
  bool varies(std::size_t j, int64_t d) const {
    return j < dims.size() && std::find(dims[j].begin(), dims[j].end(), d) != dims[j].end();
  }
};

Varying varying_of(const std::vector<InputSpec>& expect) {
  Varying v;
  v.dims.resize(expect.size());
  for (std::size_t j = 0; j < expect.size(); ++j)
    for (std::size_t k = 0; k < expect[j].trailing_shape.size(); ++k)
      if (expect[j].trailing_shape[k] == kVaries) {
        v.dims[j].push_back(static_cast<int64_t>(k) + 1);
        if (!v.any()) {
          v.input = j;
          v.dim = static_cast<int64_t>(k) + 1;
        }
      }
  return v;
}

Error bad_request(const std::string& message) {
  return Error(ErrorCode::kBadRequest, message);
}

// One request's input tensors, by position; a single-tensor request needs no allocation.
using Row = c10::SmallVector<at::Tensor, 1>;

// The most rows one forward takes (0: no bound).
int64_t forward_cap(const StackingOptions& options) {
  return options.batch_buckets.empty() ? options.max_batch_rows : options.batch_buckets.largest();
}

// Checks one request's tensors; returns an error message, or "" when they can be stacked.
std::string check_inputs(const Row& inputs, const StackingOptions& options) {
  const std::vector<InputSpec>& expect = options.expect;
  if (inputs.empty()) return "expected at least one input tensor, got none";
  if (!expect.empty() && inputs.size() != expect.size())
    return "expected " + std::to_string(expect.size()) + " input tensors, got " +
           std::to_string(inputs.size());
  const int64_t cap = forward_cap(options);
  if (options.oversize == Oversize::kRefuse && cap != 0 && !inputs.empty() &&
      inputs.front().defined() && inputs.front().dim() > 0 && inputs.front().size(0) > cap)
    return "expected at most " + std::to_string(cap) + " rows per request (" +
           (options.batch_buckets.empty() ? "StackingOptions.max_batch_rows"
                                          : "the largest of StackingOptions.batch_buckets") +
           ", with Oversize::kRefuse), got " + describe_tensor(inputs.front());
  for (std::size_t j = 0; j < inputs.size(); ++j) {
    const at::Tensor& t = inputs[j];
    const auto which = [j] { return "input " + std::to_string(j) + ": "; };
    if (!t.defined()) return which() + "expected a defined tensor, got an undefined one";
    if (t.dim() == 0)
      return which() + "expected a tensor with a batch dimension (rank >= 1), got a scalar";
    if (t.size(0) == 0) return which() + "expected at least one row, got " + describe_tensor(t);
    if (expect.empty()) continue;
    const InputSpec& spec = expect[j];
    const bool same = t.scalar_type() == spec.dtype &&
                      static_cast<std::size_t>(t.dim()) == spec.trailing_shape.size() + 1 &&
                      std::equal(spec.trailing_shape.begin(), spec.trailing_shape.end(),
                                 t.sizes().begin() + 1, [](int64_t want, int64_t got) {
                                   return want == kVaries ? got >= 1 : want == got;
                                 });
    if (!same) return which() + "expected " + describe_spec(spec) + ", got " + describe_tensor(t);
    if (options.length_buckets.empty()) continue;
    for (std::size_t k = 0; k < spec.trailing_shape.size(); ++k) {
      const int64_t size = t.size(static_cast<int64_t>(k) + 1);
      if (spec.trailing_shape[k] == kVaries && size > options.length_buckets.largest())
        return which() + "dim " + std::to_string(k + 1) + " is " + std::to_string(size) +
               " long; expected at most " + std::to_string(options.length_buckets.largest()) +
               " (the largest of StackingOptions.length_buckets), got " + describe_tensor(t);
    }
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
// shape after the batch dimension, but for the varying dims.
bool same_signature(const Row& a, const Row& b, const Varying& varying) {
  if (a.size() != b.size()) return false;
  for (std::size_t j = 0; j < a.size(); ++j) {
    if (a[j].scalar_type() != b[j].scalar_type() || a[j].device() != b[j].device() ||
        a[j].dim() != b[j].dim())
      return false;
    for (int64_t d = 1; d < a[j].dim(); ++d)
      if (a[j].size(d) != b[j].size(d) && !varying.varies(j, d)) return false;
  }
  return true;
}

// A request's length: its size of the first varying dim.
int64_t length_of(const Row& inputs, const Varying& varying) {
  return inputs[varying.input].size(varying.dim);
}

// What a varying dim whose longest is `longest` is padded to.
int64_t padded_length(int64_t longest, const StackingOptions& options) {
  const int64_t b = options.length_buckets.bucket_for(longest);
  return b == 0 ? longest : b;
}

// A group being formed, as split_by_length weighs it: its rows, the elements its requests
// bring, and each input's largest size of each varying dim (padded as the forward would be).
struct PaddedGroup {
  int64_t rows = 0;
  double real = 0;                                    // elements of the requests' own inputs
  std::vector<c10::SmallVector<int64_t, 2>> longest;  // per input, per varying dim

  // The padded elements of every input if `r` (a request) joined.
  double padded_with(const Row& r, const Varying& varying, const StackingOptions& options) const {
    double total = 0;
    for (std::size_t j = 0; j < r.size(); ++j) {
      double cell = 1;  // one row of input j, padded
      for (int64_t d = 1; d < r[j].dim(); ++d) {
        int64_t size = r[j].size(d);
        const auto& dims = varying.dims[j];
        if (const auto k = std::find(dims.begin(), dims.end(), d); k != dims.end()) {
          const std::size_t at = static_cast<std::size_t>(k - dims.begin());
          if (j < longest.size() && at < longest[j].size()) size = std::max(size, longest[j][at]);
          size = padded_length(size, options);
        }
        cell *= static_cast<double>(size);
      }
      total += cell;
    }
    return total * static_cast<double>(rows + r.front().size(0));
  }

  void add(const Row& r, const Varying& varying) {
    if (longest.empty()) longest.resize(r.size());
    for (std::size_t j = 0; j < r.size(); ++j) {
      const auto& dims = varying.dims[j];
      longest[j].resize(dims.size(), 0);
      for (std::size_t k = 0; k < dims.size(); ++k)
        longest[j][k] = std::max(longest[j][k], r[j].size(dims[k]));
      real += static_cast<double>(r[j].numel());
    }
    rows += r.front().size(0);
  }
};

// StackingOptions::max_padding: the group split, longest first (by the first varying dim), into
// groups whose padded share of their elements, over every varying dim of every input, stays at
// or under the bound; a request joins the group being formed only if the group's share with it
// does, so no forward pads more than the bound allows (but one request alone, padded to its
// length bucket).
std::vector<std::vector<std::size_t>> split_by_length(std::vector<std::size_t> group,
                                                      const std::vector<Row>& inputs,
                                                      const Varying& varying,
                                                      const StackingOptions& options) {
  std::stable_sort(group.begin(), group.end(), [&](std::size_t a, std::size_t b) {
    return length_of(inputs[a], varying) > length_of(inputs[b], varying);
  });
  std::vector<std::vector<std::size_t>> out;
  PaddedGroup forming;
  for (std::size_t i : group) {
    const Row& r = inputs[i];
    if (!out.empty()) {
      const double real = forming.real + [&] {
        double n = 0;
        for (const at::Tensor& t : r) n += static_cast<double>(t.numel());
        return n;
      }();
      const double share = 1.0 - real / forming.padded_with(r, varying, options);
      if (share <= options.max_padding + 1e-12) {
        out.back().push_back(i);
        forming.add(r, varying);
        continue;
      }
    }
    out.push_back({i});  // longest first: it sets the group's padded length
    forming = PaddedGroup{};
    forming.add(r, varying);
  }
  return out;
}

// Whether `t` is on `device`, where a device without an index ("cuda") is the current one.
bool is_on(const at::Tensor& t, c10::Device device) {
  return t.device() == detail::with_current_index(device);
}

// Concatenates one input position of a group on `target`: on the source device when it is the
// target, else into one (pinned, for CUDA) host buffer followed by one copy; large pinned parts
// are copied to the target one by one.
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
    // Large parts already in pinned memory (a server that parsed them there) go to the device
    // one copy each: the worker copies nothing on the host.
    const auto direct = [](const at::Tensor& p) {
      return p.nbytes() >= kDirectStagingBytes && p.is_contiguous() && p.is_pinned();
    };
    if (parts.size() > 1 && std::all_of(parts.begin(), parts.end(), direct)) {
      at::Tensor out = at::empty(sizes, parts.front().options().device(*target));
      int64_t offset = 0;
      for (const auto& p : parts) {
        out.narrow(0, offset, p.size(0)).copy_(p, /*non_blocking=*/true);
        offset += p.size(0);
      }
      return out;
    }
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

// A group's outputs, shared by its requests; request g owns rows [offsets[g], +rows[g]), and
// of each cut output dim (cuts[c]) the first cut_sizes[g * cuts.size() + c].
struct BatchOutputs {
  Tensors outputs;
  std::vector<int64_t> offsets;
  std::vector<int64_t> rows;
  std::vector<OutputCut> cuts;
  std::vector<int64_t> cut_sizes;

  at::Tensor cut(std::size_t k, std::size_t g) const {
    at::Tensor t = outputs[k].narrow(0, offsets[g], rows[g]);
    for (std::size_t c = 0; c < cuts.size(); ++c)
      if (cuts[c].output == k) {
        const int64_t size = cut_sizes[g * cuts.size() + c];
        if (size != t.size(cuts[c].dim)) t = t.narrow(cuts[c].dim, 0, size);
      }
    return t;
  }
};

// Runs one group (requests with one signature) in one forward; on failure, bisects.
template <class In, class Out, class Adapter>
class GroupRunner {
 public:
  GroupRunner(Batch<In, Out>& batch, const std::vector<Row>& inputs, const Adapter& adapter,
              const StackingOptions& options, const Varying& varying)
      : batch_(batch), inputs_(inputs), adapter_(adapter), options_(options), varying_(varying) {}

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
    std::vector<std::vector<int64_t>> padded;  // per position, the sizes it is padded to
    if (varying_.any()) padded = pad_group(parts);
    std::vector<BucketRun> runs;
    if (options_.batch_buckets.empty() && options_.max_batch_rows != 0) {
      for (int64_t start = 0; start < total; start += options_.max_batch_rows) {
        const int64_t rows_here = std::min(options_.max_batch_rows, total - start);
        runs.push_back({rows_here, rows_here});
      }
    } else {
      runs = options_.batch_buckets.plan(total, options_.bucket_policy);
    }
    Tensors outputs;
    if (runs.size() == 1 && runs.front().bucket == total) {
      outputs = adapter_.forward(parts, options_.device);  // as it comes: no padding, no cut
      check_outputs(outputs, total);
    } else {
      outputs = forward_in_runs(parts, runs);
    }
    check_cut_outputs(outputs, padded);
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
    if (!options_.cut_outputs.empty()) {
      shared->cuts = options_.cut_outputs;
      shared->cut_sizes.reserve(group.size() * shared->cuts.size());
      for (std::size_t i : group)
        for (const OutputCut& c : shared->cuts)
          shared->cut_sizes.push_back(inputs_[i][c.input].size(c.input_dim));
    }
    for (std::size_t g = 0; g < group.size(); ++g)
      batch_.template set_shared<BatchOutputs, &Adapter::cut>(group[g], shared, g);
  }

  // Pads every varying dim of the group's parts to its padded length and stacks each such input
  // position into one tensor (see padded_stack), then appends the length input the options ask
  // for, built on the host in one piece and staged with one copy. Returns the padded sizes per
  // input position.
  std::vector<std::vector<int64_t>> pad_group(GroupParts& parts) const {
    std::vector<int64_t> lengths, rows;  // each request's, before padding
    lengths.reserve(parts.front().size());
    rows.reserve(parts.front().size());
    int64_t total = 0;
    for (const at::Tensor& t : parts[varying_.input]) {
      lengths.push_back(t.size(varying_.dim));
      rows.push_back(t.size(0));
      total += t.size(0);
    }
    std::vector<std::vector<int64_t>> sizes(parts.size());
    for (std::size_t j = 0; j < parts.size(); ++j) {
      sizes[j] = parts[j].front().sizes().vec();
      if (varying_.dims[j].empty()) continue;
      for (int64_t d : varying_.dims[j]) {
        int64_t longest = 0;
        for (const at::Tensor& t : parts[j]) longest = std::max(longest, t.size(d));
        sizes[j][static_cast<std::size_t>(d)] = padded_length(longest, options_);
      }
      at::Tensor stacked = padded_stack(parts[j], sizes[j], total, options_.expect[j].pad_value);
      parts[j] = {std::move(stacked)};
    }
    if (options_.length_input == LengthInput::kNone) return sizes;
    const int64_t padded = sizes[varying_.input][static_cast<std::size_t>(varying_.dim)];
    const at::Tensor& owner = parts[varying_.input].front();
    const bool pin = owner.is_cuda();
    at::Tensor per_row = at::empty({total}, at::TensorOptions(at::kLong).pinned_memory(pin));
    int64_t* out = per_row.data_ptr<int64_t>();
    for (std::size_t g = 0; g < lengths.size(); ++g) out = std::fill_n(out, rows[g], lengths[g]);
    at::Tensor extra = per_row;
    if (options_.length_input == LengthInput::kMask) {
      extra = at::empty({total, padded}, at::TensorOptions(options_.mask_dtype).pinned_memory(pin));
      extra.copy_(at::arange(padded, at::kLong).unsqueeze(0) < per_row.unsqueeze(1));
    }
    parts.push_back({extra.to(owner.device(), /*non_blocking=*/true)});
    return sizes;
  }

  // One input position's tensors stacked along dim 0 (`total` rows) and padded with `value` to
  // `sizes` (dims 1 and up): the padding written once, then each request copied into its corner.
  // Host tensors bound for a CUDA model are stacked in pinned memory and staged with one copy;
  // others stack where they are. Per request that is one copy (a memcpy on the host), where
  // padding each request alone took an allocation and a launch or two, and a mask three more.
  at::Tensor padded_stack(const std::vector<at::Tensor>& parts, std::vector<int64_t> sizes,
                          int64_t total, double value) const {
    const at::Tensor& first = parts.front();
    if (parts.size() == 1 && first.sizes().slice(1) == c10::IntArrayRef(sizes).slice(1))
      return first;
    sizes[0] = total;
    const bool stage = first.is_cpu() && options_.device && options_.device->is_cuda();
    at::Tensor out = at::full(sizes, value, first.options().pinned_memory(stage));
    int64_t offset = 0;
    for (const at::Tensor& t : parts) {
      at::Tensor corner = out.narrow(0, offset, t.size(0));
      for (int64_t d = 1; d < t.dim(); ++d)
        if (t.size(d) != sizes[static_cast<std::size_t>(d)])
          corner = corner.narrow(d, 0, t.size(d));
      corner.copy_(t);
      offset += t.size(0);
    }
    return stage ? out.to(*options_.device, /*non_blocking=*/true) : out;
  }

  // Each cut output's dim must come back as long as the padded input dim it follows.
  void check_cut_outputs(const Tensors& outputs,
                         const std::vector<std::vector<int64_t>>& padded) const {
    for (const OutputCut& c : options_.cut_outputs) {
      if (c.output >= outputs.size())
        throw bad_request("StackingOptions.cut_outputs: expected output " +
                          std::to_string(c.output) + ", got " + std::to_string(outputs.size()) +
                          " outputs from the model");
      const at::Tensor& out = outputs[c.output];
      const int64_t want = padded[c.input][static_cast<std::size_t>(c.input_dim)];
      if (out.dim() <= c.dim || out.size(c.dim) != want)
        throw bad_request("output " + std::to_string(c.output) + " dim " + std::to_string(c.dim) +
                          " follows input " + std::to_string(c.input) + " dim " +
                          std::to_string(c.input_dim) + ": expected size " + std::to_string(want) +
                          " (the padded length), got " + describe_tensor(out));
    }
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
  const Varying& varying_;
};

template <class In, class Out, class Adapter>
void run_batch(Batch<In, Out>& batch, const Adapter& adapter, const StackingOptions& options,
               const Varying& varying) {
  std::vector<Row> inputs;
  inputs.reserve(batch.size());
  for (std::size_t i = 0; i < batch.size(); ++i) inputs.push_back(adapter.tensors(batch.input(i)));
  std::vector<std::vector<std::size_t>> groups;
  for (std::size_t i = 0; i < batch.size(); ++i) {
    const std::string problem = check_inputs(inputs[i], options);
    if (!problem.empty()) {
      batch.set_error(i, std::make_exception_ptr(bad_request(problem)));
      continue;
    }
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) {
      return same_signature(inputs[g.front()], inputs[i], varying);
    });
    if (it == groups.end()) {
      groups.push_back({i});
    } else {
      it->push_back(i);
    }
  }
  GroupRunner<In, Out, Adapter> runner(batch, inputs, adapter, options, varying);
  for (const auto& group : groups) {
    if (!varying.any() || options.max_padding >= 1.0) {
      runner.run(group);
      continue;
    }
    for (const auto& by_length : split_by_length(group, inputs, varying, options))
      runner.run(by_length);
  }
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
  static at::Tensor cut(const BatchOutputs& b, std::size_t g) { return b.cut(0, g); }
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
    for (std::size_t k = 0; k < b.outputs.size(); ++k) mine.push_back(b.cut(k, g));
    return mine;
  }
};

Error invalid(const std::string& message) {
  return Error(ErrorCode::kInvalidArgument, "StackingOptions." + message);
}

// What a request's tensors count toward the batch limit (StackingOptions::batch_cost): the
// BatchModel's cost, holding only what it reads.
struct RequestCost {
  BatchCost how;
  std::size_t input;  // the length's input and dim (Varying); dim 0: no length
  int64_t dim;

  RequestCost(BatchCost how, const Varying& varying)
      : how(how), input(varying.input), dim(varying.dim) {}

  std::size_t operator()(c10::ArrayRef<at::Tensor> inputs) const {
    if (how == BatchCost::kRequests || inputs.empty() || !inputs.front().defined() ||
        inputs.front().dim() == 0)
      return 1;
    auto cost = static_cast<std::size_t>(inputs.front().size(0));
    if (how == BatchCost::kRowsTimesLength && dim != 0 && input < inputs.size()) {
      const at::Tensor& owner = inputs[input];
      if (owner.defined() && owner.dim() > dim) cost *= static_cast<std::size_t>(owner.size(dim));
    }
    return cost;
  }
};

// Checks the options; returns the varying dims they declare.
Varying check_options(const StackingOptions& options, bool single) {
  if (options.max_batch_rows < 0 || (options.max_batch_rows != 0 && !options.batch_buckets.empty()))
    throw invalid(
        "max_batch_rows: expected 0, or a bound >= 1 without batch_buckets (whose "
        "largest bucket bounds forwards), got " +
        std::to_string(options.max_batch_rows) +
        (options.batch_buckets.empty() ? "" : " with batch_buckets"));
  for (const auto& spec : options.expect)
    for (int64_t d : spec.trailing_shape)
      if (d < 0 && d != kVaries)
        throw invalid("expect: expected sizes >= 0 or kVaries (-1), got " + describe_spec(spec));
  const Varying varying = varying_of(options.expect);
  if (!(options.max_padding >= 0.0 && options.max_padding <= 1.0))
    throw invalid("max_padding: expected a share from 0 to 1, got " +
                  std::to_string(options.max_padding));
  if (!varying.any()) {  // (max_padding, which has a default, then bounds nothing)
    if (!options.length_buckets.empty() || options.length_input != LengthInput::kNone ||
        !options.cut_outputs.empty())
      throw invalid(
          "expect: length_buckets, length_input and cut_outputs need a varying dim (kVaries) in "
          "expect, got none");
    return varying;
  }
  if (single && options.length_input != LengthInput::kNone)
    throw invalid(
        "length_input: a single-tensor model takes no second input; use "
        "make_stacked_model_multi");
  for (const OutputCut& c : options.cut_outputs) {
    if (c.dim < 1 || (single && c.output != 0) || !varying.varies(c.input, c.input_dim))
      throw invalid("cut_outputs: expected an output dim >= 1" +
                    std::string(single ? " of output 0" : "") +
                    " following an input dim declared kVaries, got output " +
                    std::to_string(c.output) + " dim " + std::to_string(c.dim) + ", input " +
                    std::to_string(c.input) + " dim " + std::to_string(c.input_dim));
  }
  return varying;
}

}  // namespace

BatchModel<at::Tensor, at::Tensor> make_stacked_model(RowsModel model, StackingOptions options) {
  if (!model.forward)
    throw Error(ErrorCode::kInvalidArgument, "make_stacked_model: the model is empty");
  Varying varying = check_options(options, /*single=*/true);
  RequestCost cost(options.batch_cost, varying);
  return {[adapter = SingleAdapter{std::move(model)}, options = std::move(options),
           varying = std::move(varying)](Batch<at::Tensor, at::Tensor>& batch) {
            run_batch(batch, adapter, options, varying);
          },
          std::move(cost)};
}

BatchModel<at::Tensor, at::Tensor> make_stacked_model(
    std::function<at::Tensor(const at::Tensor&)> model, StackingOptions options) {
  return make_stacked_model(RowsModel{std::move(model)}, std::move(options));
}

BatchModel<Tensors, Tensors> make_stacked_model_multi(std::function<Tensors(const Tensors&)> model,
                                                      StackingOptions options) {
  if (!model)
    throw Error(ErrorCode::kInvalidArgument, "make_stacked_model_multi: the model is empty");
  Varying varying = check_options(options, /*single=*/false);
  RequestCost cost(options.batch_cost, varying);
  return {[adapter = MultiAdapter{std::move(model)}, options = std::move(options),
           varying = std::move(varying)](Batch<Tensors, Tensors>& batch) {
            run_batch(batch, adapter, options, varying);
          },
          std::move(cost)};
}

}  // namespace syncbatch
