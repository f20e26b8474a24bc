// threads_vs_batching: T client threads, each submitting batch-1 requests to an MLP, served four
// ways side by side in one run:
//   per-op   each client thread forwards on its own stream and syncs after every op
//   per-call BatchedSubmitter, per-call mode: one forward per request, one sync per batch
//   stacked  BatchedSubmitter, stacked mode: one forward per batch of requests
//   ideal    one thread forwarding pre-stacked batches of T rows (no queue, no clients)
// and, where CUDA graphs run, per-call and stacked mode again replaying graphs (GraphedModel;
// per-call mode fuses each batch's calls into a few replays, make_fused_calls_model).
// Closed loop: each client waits for its result before sending the next. Prints throughput,
// client-side p50/p99 latency and the ratios stacked/per-op and stacked/ideal. With
// --callbacks both, stacked mode again with T requests in flight and no client threads: each
// completion callback sends the next request (an event-loop server), so no thread sleeps.
#include <cstdio>
#include <optional>
#include <string>

#include "flags.hpp"
#include "load.hpp"
#include "mlp.hpp"
#include "report.hpp"
#include "timing.hpp"

using namespace syncbatch;
using namespace syncbatch::bench;

namespace {

// Closed-loop clients submitting their input and waiting for the result; the mean batch size
// comes from the submitter's counters over the measured run.
template <class Submitter>
Cell submitter_cell(Submitter& submitter, const std::vector<at::Tensor>& inputs, int threads,
                    double warmup, double seconds) {
  const auto before = submitter.stats();
  Cell c = closed_loop(threads, warmup, seconds,
                       [&](int t) { return [&, t] { submitter.submit(inputs[t]).get(); }; });
  const auto after = submitter.stats();
  c.mean_batch = static_cast<double>(after.completed - before.completed) /
                 static_cast<double>(std::max<std::uint64_t>(1, after.batches - before.batches));
  return c;
}

// The share of its wall time a stacked submitter's workers spent in the model call, in the
// sync, and completing requests (waking their clients) while `run` ran; the rest went to
// waiting for requests, the queue and the policy.
struct WorkerShare {
  double model = 0;
  double sync = 0;
  double complete = 0;
  std::string str() const {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.0f / %.0f / %.0f / %.0f", model * 100, sync * 100,
                  complete * 100, (1 - model - sync - complete) * 100);
    return buf;
  }
};

template <class Submitter, class Run>
WorkerShare worker_share(WorkerClock& clock, const Submitter& submitter, Run run) {
  const auto m0 = clock.model_ns.load(), s0 = clock.sync_ns.load();
  const auto c0 = submitter.stats().complete_time;
  const auto t0 = Clock::now();
  run();
  const double wall_ns = std::chrono::duration<double, std::nano>(Clock::now() - t0).count() *
                         static_cast<double>(submitter.options().workers);
  const auto complete = submitter.stats().complete_time - c0;
  return {(clock.model_ns.load() - m0) / wall_ns, (clock.sync_ns.load() - s0) / wall_ns,
          static_cast<double>(complete.count()) / wall_ns};
}

// A client that forwards and syncs after every op, on a stream of its own.
struct PerOpClient {
  const Mlp& mlp;
  const at::Tensor& input;
  OwnStream stream;
  DeviceSync sync;
  void operator()() {
    mlp(input);
    sync();
  }
};

}  // namespace

int main(int argc, char** argv) {
  const Flags flags(argc, argv,
                    "threads_vs_batching: per-op sync vs BatchedSubmitter (per-call, stacked) vs "
                    "pre-stacked ideal, T client threads",
                    {{"device", "auto"},
                     {"threads", "1,2,4,8,16,32,64"},
                     {"seconds", "1"},
                     {"warmup", "0.3"},
                     {"layers", "3"},
                     {"width", "256"},
                     {"sync", "event"},
                     {"max-batch", "256"},
                     {"workers", "1"},
                     {"graphs", "auto"},
                     {"waker", "off"},
                     {"callbacks", "off"},
                     {"cat-first", "off"},
                     {"json", ""}});
  pin_threads();
  const c10::Device device = device_flag(flags);
  const SyncMode mode = sync_flag(flags.str("sync"));
  const int width = static_cast<int>(flags.num("width"));
  const double seconds = flags.num("seconds"), warmup = flags.num("warmup");
  const auto max_batch = static_cast<std::size_t>(flags.num("max-batch"));
  const auto workers = static_cast<std::size_t>(flags.num("workers"));
  c10::InferenceMode inference;
  const Mlp mlp(static_cast<int>(flags.num("layers")), width, device);
  const auto opts = at::TensorOptions().device(device);
  const bool graphs = graphs_flag(flags, device);
  const at::Tensor example = at::randn({1, width}, opts);

  using Submitter = BatchedSubmitter<at::Tensor, at::Tensor, TorchBackend>;
  Submitter per_call([&](at::Tensor& x) { return mlp(x); },
                     {.queue_capacity = 4096, .workers = workers, .policy = EveryN{max_batch}},
                     TorchBackend(device, {.mode = mode}));
  // --waker both: the stacked submitters again with SubmitterOptions::waker_thread, side by side.
  if (flags.str("waker") != "off" && flags.str("waker") != "both")
    flags.fail("--waker: expected off or both, got '" + flags.str("waker") + "'");
  const bool waker = flags.str("waker") == "both";
  if (flags.str("callbacks") != "off" && flags.str("callbacks") != "both")
    flags.fail("--callbacks: expected off or both, got '" + flags.str("callbacks") + "'");
  const bool callbacks = flags.str("callbacks") == "both";
  if (flags.str("cat-first") != "off" && flags.str("cat-first") != "both")
    flags.fail("--cat-first: expected off or both, got '" + flags.str("cat-first") + "'");
  const bool cat_first = flags.str("cat-first") == "both" && graphs;
  // The stacked submitters time their workers (model call and sync) for the profile columns.
  using TimedSubmitter = BatchedSubmitter<at::Tensor, at::Tensor, TimedTorchBackend>;
  struct TimedStacked {
    WorkerClock clock;
    std::optional<TimedSubmitter> submitter;
  };
  auto make_stacked = [&](TimedStacked& s, BatchModel<at::Tensor, at::Tensor> model,
                          bool waker_thread, std::function<void()> on_start) {
    s.submitter.emplace(
        timed(std::move(model), s.clock),
        SubmitterOptions{.queue_capacity = 4096,
                         .workers = workers,
                         .policy = EveryN{max_batch},
                         .waker_thread = waker_thread},
        TimedTorchBackend{TorchBackend(device, {.mode = mode, .on_worker_start = on_start}),
                          &s.clock});
  };
  const auto eager = [&](const at::Tensor& x) { return mlp(x); };
  TimedStacked stacked_s, stacked_graph_s, stacked_w, stacked_graph_w, stacked_graph_cat;
  make_stacked(stacked_s, make_stacked_model(eager), false, {});
  if (waker) make_stacked(stacked_w, make_stacked_model(eager), true, {});
  // Graph replay: per-call mode replays each batch's calls fused, up to 64 forwards per graph;
  // stacked mode pads each batch to its bucket (powers of two up to --max-batch). Workers
  // capture before serving.
  // Each worker stream of each submitter (up to four share graphed_batch) captures its own.
  const GraphedModel graphed_one(
      [&](const at::Tensor& x) { return mlp(x); }, device,
      {.buckets = {1}, .max_fused_calls = 64, .max_graphs = 16 * (workers + 1)});
  const GraphedModel graphed_batch(
      [&](const at::Tensor& x) { return mlp(x); }, device,
      {.max_rows = static_cast<int64_t>(max_batch), .max_graphs = 4 * 16 * (workers + 1)});
  std::optional<Submitter> per_call_graph;
  if (graphs) {
    per_call_graph.emplace(
        make_fused_calls_model(graphed_one),
        SubmitterOptions{.queue_capacity = 4096, .workers = workers, .policy = EveryN{max_batch}},
        TorchBackend(
            device, {.mode = mode, .on_worker_start = [&] { graphed_one.warm_up_each(example); }}));
    const auto warm = [&] { graphed_batch.warm_up(example); };
    make_stacked(stacked_graph_s, make_stacked_model(graphed_batch), false, warm);
    if (waker) make_stacked(stacked_graph_w, make_stacked_model(graphed_batch), true, warm);
    // --cat-first both: the graphed model again as a plain function, so each batch's rows are
    // concatenated and then copied into the graph's input, where make_stacked_model(graphed)
    // gathers them straight into it (GraphedModel::call_rows).
    if (cat_first)
      make_stacked(stacked_graph_cat,
                   make_stacked_model(std::function<at::Tensor(const at::Tensor&)>(graphed_batch)),
                   false, warm);
  }

  std::printf(
      "threads_vs_batching: %d-layer MLP width %d, batch-1 requests, %s, %s sync, "
      "LibTorch %s, %zu worker(s), max batch %zu, %.1f s per cell\n\n",
      static_cast<int>(flags.num("layers")), width, device.str().c_str(), flags.str("sync").c_str(),
      TORCH_VERSION, workers, max_batch, seconds);
  // The table's columns: the base set, then the groups the flags turn on.
  std::vector<std::string> columns{"T",
                                   "per-op ops/s",
                                   "p50 us",
                                   "p99 us",
                                   "per-call ops/s",
                                   "p50 us",
                                   "p99 us",
                                   "stacked ops/s",
                                   "p50 us",
                                   "p99 us",
                                   "mean batch",
                                   "ideal ops/s",
                                   "stacked/per-op",
                                   "stacked/ideal",
                                   "stacked worker % model / sync / complete / rest"};
  const auto add = [&](std::initializer_list<const char*> more) {
    columns.insert(columns.end(), more.begin(), more.end());
  };
  if (graphs)
    add({"per-call fused graphs ops/s", "p99 us", "stacked graph ops/s", "p50 us", "p99 us",
         "per-call fused/eager", "stacked graph/eager", "stacked graph/per-op",
         "stacked graph/ideal", "stacked graph worker % model / sync / complete / rest",
         "graph ideal ops/s"});
  if (waker) add({"stacked+waker ops/s", "p99 us", "worker %"});
  if (waker && graphs) add({"stacked graph+waker ops/s", "p99 us", "worker %"});
  if (cat_first) add({"stacked graph, cat first ops/s", "p99 us", "gather/cat first"});
  if (callbacks)
    add({"stacked, callbacks ops/s", "p50 us", "p99 us", "mean batch", "/per-op", "/ideal",
         "worker %"});
  if (callbacks && graphs)
    add({"stacked graph, callbacks ops/s", "p50 us", "p99 us", "mean batch", "/per-op", "/ideal",
         "worker %"});
  std::string header = "|", rule = "|";
  for (const auto& c : columns) {
    header += " " + c + " |";
    rule += "--:|";
  }
  std::printf("%s\n%s\n", header.c_str(), rule.c_str());
  JsonRows json;
  for (int threads : flags.ints("threads")) {
    std::vector<at::Tensor> inputs;
    for (int t = 0; t < threads; ++t) inputs.push_back(at::randn({1, width}, opts));

    // Per-op: each client thread on its own stream, syncing after every op.
    const Cell per_op = closed_loop(threads, warmup, seconds, [&](int t) {
      return PerOpClient{mlp, inputs[t], OwnStream(device), DeviceSync(device, mode)};
    });
    const Cell pc = submitter_cell(per_call, inputs, threads, warmup, seconds);
    // A stacked submitter's cell and its workers' profile.
    auto stacked_cell = [&](TimedStacked& s, Cell& cell) {
      return worker_share(s.clock, *s.submitter, [&] {
        cell = submitter_cell(*s.submitter, inputs, threads, warmup, seconds);
      });
    };
    auto callback_cell = [&](TimedStacked& s, Cell& cell) {
      return worker_share(s.clock, *s.submitter, [&] {
        cell = callback_loop(*s.submitter, inputs, threads, warmup, seconds);
      });
    };
    Cell st, pcg, stg, stw, stgw, stc, stgc, stgcat;
    const WorkerShare st_share = stacked_cell(stacked_s, st);
    WorkerShare stg_share, stw_share, stgw_share, stc_share, stgc_share;
    if (waker) stw_share = stacked_cell(stacked_w, stw);
    if (callbacks) stc_share = callback_cell(stacked_s, stc);
    if (graphs) {
      pcg = submitter_cell(*per_call_graph, inputs, threads, warmup, seconds);
      stg_share = stacked_cell(stacked_graph_s, stg);
      if (waker) stgw_share = stacked_cell(stacked_graph_w, stgw);
      if (callbacks) stgc_share = callback_cell(stacked_graph_s, stgc);
      if (cat_first) stacked_cell(stacked_graph_cat, stgcat);
    }
    // Ideal: one thread, batches of T rows already stacked, one sync per batch.
    const at::Tensor batch = at::randn({threads, width}, opts);
    const Cell ideal = closed_loop(
        1, warmup, seconds,
        [&](int) {
          return [&, sync = DeviceSync(device, mode)]() mutable {
            mlp(batch);
            sync();
          };
        },
        threads);
    // The same with graphs: the pre-stacked batch replayed (copy in, replay, copy out).
    Cell ideal_graph;
    if (graphs)
      ideal_graph = closed_loop(
          1, warmup, seconds,
          [&](int) {
            graphed_batch.warm_up(example);
            return [&, sync = DeviceSync(device, mode)]() mutable {
              graphed_batch(batch);
              sync();
            };
          },
          threads);
    std::printf(
        "| %d | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.1f | %.0f | "
        "%.2fx | %.2f | %s |",
        threads, per_op.ops_per_s, per_op.p50_us, per_op.p99_us, pc.ops_per_s, pc.p50_us, pc.p99_us,
        st.ops_per_s, st.p50_us, st.p99_us, st.mean_batch, ideal.ops_per_s,
        st.ops_per_s / per_op.ops_per_s, st.ops_per_s / ideal.ops_per_s, st_share.str().c_str());
    if (graphs)
      std::printf(" %.0f | %.0f | %.0f | %.0f | %.0f | %.2fx | %.2fx | %.2fx | %.2f | %s |",
                  pcg.ops_per_s, pcg.p99_us, stg.ops_per_s, stg.p50_us, stg.p99_us,
                  pcg.ops_per_s / pc.ops_per_s, stg.ops_per_s / st.ops_per_s,
                  stg.ops_per_s / per_op.ops_per_s, stg.ops_per_s / ideal.ops_per_s,
                  stg_share.str().c_str());
    if (graphs) std::printf(" %.0f |", ideal_graph.ops_per_s);
    if (waker) {
      std::printf(" %.0f | %.0f | %s |", stw.ops_per_s, stw.p99_us, stw_share.str().c_str());
      if (graphs)
        std::printf(" %.0f | %.0f | %s |", stgw.ops_per_s, stgw.p99_us, stgw_share.str().c_str());
    }
    const auto print_callbacks = [&](const Cell& c, const WorkerShare& share) {
      std::printf(" %.0f | %.0f | %.0f | %.1f | %.2fx | %.2f | %s |", c.ops_per_s, c.p50_us,
                  c.p99_us, c.mean_batch, c.ops_per_s / per_op.ops_per_s,
                  c.ops_per_s / ideal.ops_per_s, share.str().c_str());
    };
    if (cat_first)
      std::printf(" %.0f | %.0f | %.2fx |", stgcat.ops_per_s, stgcat.p99_us,
                  stg.ops_per_s / stgcat.ops_per_s);
    if (callbacks) print_callbacks(stc, stc_share);
    if (callbacks && graphs) print_callbacks(stgc, stgc_share);
    std::printf("\n");
    std::fflush(stdout);
    json.row()
        .set("threads", threads)
        .set("per_op_ops", per_op.ops_per_s)
        .set("per_op_p50_us", per_op.p50_us)
        .set("per_op_p99_us", per_op.p99_us)
        .set("per_call_ops", pc.ops_per_s)
        .set("per_call_p50_us", pc.p50_us)
        .set("per_call_p99_us", pc.p99_us)
        .set("per_call_mean_batch", pc.mean_batch)
        .set("stacked_ops", st.ops_per_s)
        .set("stacked_p50_us", st.p50_us)
        .set("stacked_p99_us", st.p99_us)
        .set("stacked_mean_batch", st.mean_batch)
        .set("stacked_worker_model_share", st_share.model)
        .set("stacked_worker_sync_share", st_share.sync)
        .set("stacked_worker_complete_share", st_share.complete)
        .set("stacked_graph_worker_model_share", stg_share.model)
        .set("stacked_graph_worker_sync_share", stg_share.sync)
        .set("stacked_graph_worker_complete_share", stg_share.complete)
        .set("ideal_ops", ideal.ops_per_s)
        .set("ideal_graph_ops", ideal_graph.ops_per_s)
        .set("per_call_graph_ops", pcg.ops_per_s)
        .set("per_call_graph_p99_us", pcg.p99_us)
        .set("stacked_graph_ops", stg.ops_per_s)
        .set("stacked_graph_p50_us", stg.p50_us)
        .set("stacked_graph_p99_us", stg.p99_us)
        .set("stacked_graph_mean_batch", stg.mean_batch)
        .set("stacked_waker_ops", stw.ops_per_s)
        .set("stacked_waker_mean_batch", stw.mean_batch)
        .set("stacked_waker_p99_us", stw.p99_us)
        .set("stacked_waker_worker_complete_share", stw_share.complete)
        .set("stacked_graph_waker_ops", stgw.ops_per_s)
        .set("stacked_graph_waker_mean_batch", stgw.mean_batch)
        .set("stacked_graph_waker_p99_us", stgw.p99_us)
        .set("stacked_graph_waker_worker_complete_share", stgw_share.complete)
        .set("stacked_graph_cat_first_ops", stgcat.ops_per_s)
        .set("stacked_callbacks_ops", stc.ops_per_s)
        .set("stacked_callbacks_p50_us", stc.p50_us)
        .set("stacked_callbacks_p99_us", stc.p99_us)
        .set("stacked_callbacks_mean_batch", stc.mean_batch)
        .set("stacked_callbacks_worker_model_share", stc_share.model)
        .set("stacked_callbacks_worker_complete_share", stc_share.complete)
        .set("stacked_graph_callbacks_ops", stgc.ops_per_s)
        .set("stacked_graph_callbacks_p50_us", stgc.p50_us)
        .set("stacked_graph_callbacks_p99_us", stgc.p99_us)
        .set("stacked_graph_callbacks_mean_batch", stgc.mean_batch)
        .set("stacked_graph_callbacks_worker_model_share", stgc_share.model)
        .set("stacked_graph_callbacks_worker_complete_share", stgc_share.complete);
  }
  json.write(flags.str("json"), meta_json(device, {{"bench", "threads_vs_batching"},
                                                   {"layers", flags.num("layers")},
                                                   {"width", flags.num("width")},
                                                   {"sync", flags.str("sync")}}));
  return 0;
}
