// The graphs a GraphedModel holds: slots keyed by stream, input signature and what they replay,
// bounded by max_graphs, each used by one call at a time; and the log of fallbacks to eager.
// Private to the library (src/).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/core/Stream.h>
#include <c10/util/SmallVector.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "syncbatch/torch/detail/graph_engine.hpp"

namespace syncbatch::detail {

/// What one graph replays: one forward of `rows` rows (a call's rows, padded up to them), or
/// `calls` separate forwards of `rows` rows each (call_each()'s fused calls).
enum class Replays : std::uint8_t { kRows, kFusedCalls };

/// Which graph a call needs. Graphs are never shared between streams: graphs replayed on one
/// stream run one after another on the device, so workspaces they share (cuBLAS keeps one per
/// stream it ran on) are never used at once.
struct GraphKey {
  c10::Stream stream;
  at::ScalarType dtype;
  c10::SmallVector<int64_t, 6> trailing;  // shape after dim 0; no allocation up to rank 7
  Replays kind;
  int64_t rows;       // rows per forward
  int64_t calls = 1;  // forwards per replay
  // What the input packs (GraphedMultiModel: each input's dtype and shape after dim 0, the
  // static input being their bytes side by side); empty for a single tensor.
  c10::SmallVector<int64_t, 8> layout{};
  bool operator==(const GraphKey&) const = default;

  /// Shaped like `x` (its dtype and trailing shape) on `stream`.
  static GraphKey like(const at::Tensor& x, c10::Stream stream, Replays kind, int64_t rows,
                       int64_t calls = 1);
  /// The static input's sizes: [rows * calls, trailing...].
  std::vector<int64_t> input_sizes() const;
};

struct GraphKeyHash {
  std::size_t operator()(const GraphKey& k) const noexcept;
};

/// One graph and its static buffers; `graph` is unset until captured. Between checkout and
/// checkin it belongs to one call; `busy` is the pool's, read and written under its lock.
struct GraphSlot {
  std::unique_ptr<CapturedGraph> graph;
  at::Tensor input, output;
  bool busy = true;
  std::uint64_t last_used = 0;  // the pool's tick at its latest checkout
};

/// The slots of one GraphedModel. Thread-safe: every member takes the pool's lock.
class GraphPool {
 public:
  /// `log` receives each distinct fallback reason once; may be empty.
  GraphPool(std::size_t max_graphs, std::function<void(const std::string&)> log);

  /// A free slot of `key`, now checked out to the caller (nullptr for a key marked failed); when
  /// none is free and `may_create`,
  /// a new uncaptured one: while fewer than max_graphs are held, or in place of the least
  /// recently used idle slot (freed once its stream's replays are done); nullptr with the
  /// fallback reported when every slot is in use; nullptr when none is free and not
  /// `may_create`.
  GraphSlot* checkout(const GraphKey& key, bool may_create);
  /// Returns a checked-out slot for other calls.
  void checkin(GraphSlot* slot);
  /// Frees a checked-out slot (its capture failed, or the model threw while capturing).
  void discard(const GraphKey& key, GraphSlot* slot);
  /// Marks `key` as one that cannot be captured: checkout() gives no slot for it from then on.
  void mark_failed(const GraphKey& key);
  /// Whether a slot of `key` exists, captured or being captured.
  bool holds(const GraphKey& key) const;
  /// Waits for the idle slots' pending replays (their streams), then frees them.
  void release();
  /// Slots held now.
  std::size_t held() const;
  /// Slots freed to make room for another.
  std::uint64_t evictions() const;

  /// Records why a call ran eagerly: kept as the latest, logged once per distinct reason.
  void fallback(const std::string& reason);
  std::string last_fallback() const;
  /// Every distinct reason so far, in the order they first came.
  std::vector<std::string> fallback_reasons() const;

 private:
  const std::size_t max_graphs_;
  const std::string full_reason_;  // made once: calls may hit it again and again
  const std::function<void(const std::string&)> log_;
  mutable std::mutex mu_;
  // Guarded by mu_:
  std::unordered_map<GraphKey, std::vector<std::unique_ptr<GraphSlot>>, GraphKeyHash> slots_;
  std::unordered_set<GraphKey, GraphKeyHash> failed_;
  std::size_t held_ = 0;
  std::uint64_t tick_ = 0;
  std::uint64_t evictions_ = 0;
  std::set<std::string> logged_;
  std::vector<std::string> reasons_;
  std::string last_fallback_;
};

}  // namespace syncbatch::detail
