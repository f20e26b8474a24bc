// Prometheus text format for the server. See metrics.hpp.
#include "metrics.hpp"

#include <cstdio>

namespace syncbatch::http {
namespace {

// A label value with \, " and newlines escaped (the text format's rule).
std::string escaped(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\' || c == '"') out += '\\';
    out += c == '\n' ? std::string("\\n") : std::string(1, c);
  }
  return out;
}

double seconds(std::chrono::nanoseconds d) {
  return std::chrono::duration<double>(d).count();
}

std::string num(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

// Writes families of samples, one sample (or set) per model in each family.
class Writer {
 public:
  void family(const char* name, const char* type, const char* help) {
    out_ += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
  }
  void model(const std::string& name) { label_ = "model=\"" + escaped(name) + "\""; }
  void sample(const std::string& name, double value, const std::string& labels = "") {
    out_ += name + "{" + label_ + (labels.empty() ? "" : "," + labels) + "} " + num(value) + "\n";
  }
  std::string take() { return std::move(out_); }

 private:
  std::string label_;
  std::string out_;
};

}  // namespace

void Metrics::record(int status, std::chrono::nanoseconds duration) noexcept {
  if (status >= 0 && status < static_cast<int>(by_status_.size()))
    by_status_[static_cast<std::size_t>(status)].fetch_add(1, std::memory_order_relaxed);
  const double s = seconds(duration);
  std::size_t i = 0;
  while (i < kDurationBounds.size() && s > kDurationBounds[i]) ++i;
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  duration_ns_.fetch_add(static_cast<std::uint64_t>(duration.count()), std::memory_order_relaxed);
  // Successes are counted above (by status) and timed in duration_ns_: only failures, the
  // rare path, write counters of their own.
  if (status < 200 || status >= 300) {
    failures_.fetch_add(1, std::memory_order_relaxed);
    failure_ns_.fetch_add(static_cast<std::uint64_t>(duration.count()), std::memory_order_relaxed);
  }
  // Written at most once a millisecond, where every request would write the shared line.
  const auto ms =
      static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                     std::chrono::system_clock::now().time_since_epoch())
                                     .count());
  if (last_ms_.load(std::memory_order_relaxed) != ms) last_ms_.store(ms, std::memory_order_relaxed);
}

Metrics::Totals Metrics::totals() const noexcept {
  const auto load = [](const std::atomic<std::uint64_t>& a) {
    return a.load(std::memory_order_relaxed);
  };
  std::uint64_t success = 0;
  for (std::size_t code = 200; code < 300; ++code) success += load(by_status_[code]);
  const std::uint64_t fail_ns = load(failure_ns_), all_ns = load(duration_ns_);
  // (Relaxed counters read while requests are answered: never a negative remainder.)
  const std::uint64_t success_ns = all_ns > fail_ns ? all_ns - fail_ns : 0;
  return {success, std::chrono::nanoseconds(success_ns), load(failures_),
          std::chrono::nanoseconds(fail_ns), load(last_ms_)};
}

void BatchSizes::record(std::size_t size, std::chrono::nanoseconds took) {
  std::lock_guard lock(mu_);
  Entry& e = sizes_[size];
  ++e.count;
  e.time += took;
}

std::map<std::size_t, BatchSizes::Entry> BatchSizes::snapshot() const {
  std::lock_guard lock(mu_);
  return sizes_;
}

std::string Metrics::prometheus(const std::vector<Exposed>& models) {
  Writer w;
  // Writes one family: its header, then each model's samples (of the models with a submitter
  // only, when `submitters`).
  const auto each = [&](const char* name, const char* type, const char* help, bool submitters,
                        const auto& samples) {
    w.family(name, type, help);
    for (const Exposed& e : models) {
      if (submitters && !e.stats) continue;
      w.model(e.model);
      samples(e);
    }
  };
  each("syncbatch_requests_total", "counter", "Inference requests answered, by HTTP status code.",
       false, [&](const Exposed& e) {
         for (std::size_t code = 0; code < e.metrics->by_status_.size(); ++code) {
           const std::uint64_t n = e.metrics->by_status_[code].load(std::memory_order_relaxed);
           if (n != 0)
             w.sample("syncbatch_requests_total", static_cast<double>(n),
                      "code=\"" + std::to_string(code) + "\"");
         }
       });
  each("syncbatch_request_duration_seconds", "histogram",
       "Inference requests from the arrival of their body to their answer.", false,
       [&](const Exposed& e) {
         std::uint64_t cumulative = 0;
         for (std::size_t i = 0; i <= kDurationBounds.size(); ++i) {
           cumulative += e.metrics->buckets_[i].load(std::memory_order_relaxed);
           w.sample(
               "syncbatch_request_duration_seconds_bucket", static_cast<double>(cumulative),
               "le=\"" + (i < kDurationBounds.size() ? num(kDurationBounds[i]) : "+Inf") + "\"");
         }
         w.sample(
             "syncbatch_request_duration_seconds_sum",
             static_cast<double>(e.metrics->duration_ns_.load(std::memory_order_relaxed)) * 1e-9);
         w.sample("syncbatch_request_duration_seconds_count", static_cast<double>(cumulative));
       });
  each("syncbatch_requests_in_flight", "gauge", "Inference requests received, not answered.", false,
       [&](const Exposed& e) {
         w.sample("syncbatch_requests_in_flight",
                  static_cast<double>(e.metrics->in_flight_.load(std::memory_order_relaxed)));
       });
  const auto stat = [&](const char* name, const char* type, const char* help, auto value) {
    each(name, type, help, true,
         [&](const Exposed& e) { w.sample(name, static_cast<double>(value(*e.stats))); });
  };
  stat("syncbatch_submitted_total", "counter", "Requests the submitter accepted.",
       [](const SubmitterStats& s) { return s.submitted; });
  each("syncbatch_rejected_total", "counter",
       "Requests the submitter refused: shed (could not start by their deadline) or other "
       "(queue full, shutting down).",
       true, [&](const Exposed& e) {
         const SubmitterStats& s = *e.stats;
         w.sample("syncbatch_rejected_total", static_cast<double>(s.shed), "reason=\"shed\"");
         w.sample("syncbatch_rejected_total", static_cast<double>(s.rejected - s.shed),
                  "reason=\"other\"");
       });
  stat("syncbatch_completed_total", "counter", "Requests completed, with a value or an error.",
       [](const SubmitterStats& s) { return s.completed; });
  each("syncbatch_failures_total", "counter",
       "Completed requests that failed: expired (not started by their deadline), cancelled, "
       "or other (the model or the sync failed, a bad request).",
       true, [&](const Exposed& e) {
         const SubmitterStats& s = *e.stats;
         w.sample("syncbatch_failures_total", static_cast<double>(s.expired), "reason=\"expired\"");
         w.sample("syncbatch_failures_total", static_cast<double>(s.cancelled),
                  "reason=\"cancelled\"");
         w.sample("syncbatch_failures_total",
                  static_cast<double>(s.failed - s.expired - s.cancelled), "reason=\"other\"");
       });
  stat("syncbatch_delayed_total", "counter",
       "Requests moved behind fresh work when their queue timeout passed.",
       [](const SubmitterStats& s) { return s.delayed; });
  stat("syncbatch_queue_depth", "gauge", "Requests waiting in the queue.",
       [](const SubmitterStats& s) { return s.queued; });
  each("syncbatch_batch_size", "histogram", "Requests per batch (one sync each).", true,
       [&](const Exposed& e) {
         const SubmitterStats& s = *e.stats;
         std::uint64_t cumulative = 0;
         for (std::size_t i = 0; i < SubmitterStats::kBuckets; ++i) {
           cumulative += s.batch_size_histogram[i];
           // Bucket i holds sizes 2^i to 2^(i+1) - 1; the last one holds everything above too.
           if (i + 1 < SubmitterStats::kBuckets)
             w.sample("syncbatch_batch_size_bucket", static_cast<double>(cumulative),
                      "le=\"" + std::to_string((std::uint64_t{2} << i) - 1) + "\"");
         }
         w.sample("syncbatch_batch_size_bucket", static_cast<double>(cumulative), "le=\"+Inf\"");
         w.sample("syncbatch_batch_size_sum",
                  static_cast<double>(s.completed - s.unbatched_failed));
         w.sample("syncbatch_batch_size_count", static_cast<double>(cumulative));
       });
  each("syncbatch_worker_seconds_total", "counter",
       "Submitter workers' time by phase: run (batch models' calls, mostly launching), sync "
       "(waiting for the device), complete (handing results over).",
       true, [&](const Exposed& e) {
         const SubmitterStats& s = *e.stats;
         w.sample("syncbatch_worker_seconds_total", seconds(s.run_time), "phase=\"run\"");
         w.sample("syncbatch_worker_seconds_total", seconds(s.sync_time), "phase=\"sync\"");
         w.sample("syncbatch_worker_seconds_total", seconds(s.complete_time), "phase=\"complete\"");
       });
  each("syncbatch_queue_delay_seconds", "summary",
       "Arrival to the start of the request's run (each quantile at most 12.5% high).", true,
       [&](const Exposed& e) {
         const SubmitterStats& s = *e.stats;
         const double n = static_cast<double>(s.queue_delay.count);
         w.sample("syncbatch_queue_delay_seconds", seconds(s.queue_delay.p50), "quantile=\"0.5\"");
         w.sample("syncbatch_queue_delay_seconds", seconds(s.queue_delay.p99), "quantile=\"0.99\"");
         w.sample("syncbatch_queue_delay_seconds", seconds(s.queue_delay.p999),
                  "quantile=\"0.999\"");
         w.sample("syncbatch_queue_delay_seconds_sum", seconds(s.queue_delay.mean) * n);
         w.sample("syncbatch_queue_delay_seconds_count", n);
       });
  return w.take();
}

boost::json::object submitter_stats_object(const SubmitterStats& s) {
  boost::json::object o;
  o["submitted"] = s.submitted;
  o["rejected"] = s.rejected;
  o["completed"] = s.completed;
  o["failed"] = s.failed;
  o["cancelled"] = s.cancelled;  // of failed (a client that hung up while queued, say)
  o["expired"] = s.expired;      // of failed: not started by their deadline
  o["batches"] = s.batches;
  o["syncs"] = s.syncs;
  o["queued"] = s.queued;
  o["batch_limit"] = s.batch_limit;
  o["mean_batch_size"] = s.mean_batch_size();
  o["latency_p50_us"] = static_cast<double>(s.latency.p50.count()) / 1e3;
  o["latency_p99_us"] = static_cast<double>(s.latency.p99.count()) / 1e3;
  o["recent_latency_p99_us"] = static_cast<double>(s.recent_latency.p99.count()) / 1e3;
  o["queue_delay_p50_us"] = static_cast<double>(s.queue_delay.p50.count()) / 1e3;
  // The workers' time by phase (SubmitterStats): next to the uptime, how busy they are.
  o["worker_run_s"] = seconds(s.run_time);
  o["worker_sync_s"] = seconds(s.sync_time);
  o["worker_complete_s"] = seconds(s.complete_time);
  return o;
}

}  // namespace syncbatch::http
