// The graphs a GraphedModel holds. See graph_pool.hpp.
#include "graph_pool.hpp"

#include <algorithm>
#include <functional>
#include <iterator>
#include <optional>
#include <utility>

namespace syncbatch::detail {

GraphKey GraphKey::like(const at::Tensor& x, c10::Stream stream, Replays kind, int64_t rows,
                        int64_t calls) {
  const c10::IntArrayRef t = x.sizes().slice(1);
  return {stream, x.scalar_type(), c10::SmallVector<int64_t, 6>(t.begin(), t.end()), kind, rows,
          calls};
}

std::vector<int64_t> GraphKey::input_sizes() const {
  std::vector<int64_t> sizes{rows * calls};
  sizes.insert(sizes.end(), trailing.begin(), trailing.end());
  return sizes;
}

std::size_t GraphKeyHash::operator()(const GraphKey& k) const noexcept {
  std::size_t h = std::hash<c10::Stream>()(k.stream);
  auto mix = [&](std::size_t v) { h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2); };
  mix(static_cast<std::size_t>(k.dtype));
  mix(static_cast<std::size_t>(k.kind));
  mix(static_cast<std::size_t>(k.rows));
  mix(static_cast<std::size_t>(k.calls));
  for (int64_t d : k.trailing) mix(static_cast<std::size_t>(d));
  for (int64_t d : k.layout) mix(static_cast<std::size_t>(d));
  return h;
}

GraphPool::GraphPool(std::size_t max_graphs, std::function<void(const std::string&)> log)
    : max_graphs_(max_graphs),
      full_reason_("max_graphs (" + std::to_string(max_graphs) +
                   ") graphs are held and all in use; calls that need another run eagerly"),
      log_(std::move(log)) {}

GraphSlot* GraphPool::checkout(const GraphKey& key, bool may_create) {
  std::unique_ptr<GraphSlot> victim;
  std::optional<c10::Stream> victim_stream;
  GraphSlot* slot = nullptr;
  {
    std::lock_guard lock(mu_);
    if (!failed_.empty() && failed_.contains(key))
      return nullptr;  // counted as eager by the caller
    auto& slots = slots_[key];
    for (auto& s : slots)
      if (!s->busy) {
        s->busy = true;
        s->last_used = ++tick_;
        return s.get();
      }
    if (!may_create) return nullptr;  // counted as eager by the caller; nothing to report
    if (held_ == max_graphs_) {
      // Full: the least recently used idle slot gives way.
      std::vector<std::unique_ptr<GraphSlot>>* owner = nullptr;
      std::vector<std::unique_ptr<GraphSlot>>::iterator lru;
      for (auto& [k, v] : slots_)
        for (auto it = v.begin(); it != v.end(); ++it)
          if (!(*it)->busy && (owner == nullptr || (*it)->last_used < (*lru)->last_used)) {
            owner = &v;
            lru = it;
            victim_stream = k.stream;
          }
      if (owner != nullptr) {
        victim = std::move(*lru);
        owner->erase(lru);
        ++evictions_;
        --held_;
      }
    }
    if (held_ < max_graphs_) {
      ++held_;
      slots.push_back(std::make_unique<GraphSlot>());  // the map's references stay valid
      slots.back()->last_used = ++tick_;
      slot = slots.back().get();
    }
  }
  if (victim) {
    // Its last replay may still run on the device: wait before its memory goes back.
    victim_stream->synchronize();
    victim.reset();
  }
  if (slot == nullptr) fallback(full_reason_);
  return slot;
}

void GraphPool::checkin(GraphSlot* slot) {
  std::lock_guard lock(mu_);
  slot->busy = false;
}

void GraphPool::discard(const GraphKey& key, GraphSlot* slot) {
  std::lock_guard lock(mu_);
  auto& slots = slots_[key];
  slots.erase(
      std::find_if(slots.begin(), slots.end(), [&](const auto& s) { return s.get() == slot; }));
  --held_;
}

void GraphPool::mark_failed(const GraphKey& key) {
  std::lock_guard lock(mu_);
  failed_.insert(key);
}

bool GraphPool::holds(const GraphKey& key) const {
  std::lock_guard lock(mu_);
  const auto it = slots_.find(key);
  return it != slots_.end() && !it->second.empty();
}

void GraphPool::release() {
  std::vector<std::unique_ptr<GraphSlot>> freed;
  std::vector<c10::Stream> streams;
  {
    std::lock_guard lock(mu_);
    for (auto& [key, slots] : slots_) {
      auto idle =
          std::stable_partition(slots.begin(), slots.end(), [](const auto& s) { return s->busy; });
      if (idle != slots.end() &&
          std::find(streams.begin(), streams.end(), key.stream) == streams.end())
        streams.push_back(key.stream);
      std::move(idle, slots.end(), std::back_inserter(freed));
      slots.erase(idle, slots.end());
    }
    held_ -= freed.size();
  }
  // Replays may still be running on the device: wait before their memory goes back.
  for (const c10::Stream& s : streams) s.synchronize();
}

std::size_t GraphPool::held() const {
  std::lock_guard lock(mu_);
  return held_;
}

std::uint64_t GraphPool::evictions() const {
  std::lock_guard lock(mu_);
  return evictions_;
}

void GraphPool::fallback(const std::string& reason) {
  {
    std::lock_guard lock(mu_);
    last_fallback_ = reason;
    if (!logged_.insert(reason).second) return;
    reasons_.push_back(reason);
  }
  if (log_) log_(reason);
}

std::string GraphPool::last_fallback() const {
  std::lock_guard lock(mu_);
  return last_fallback_;
}

std::vector<std::string> GraphPool::fallback_reasons() const {
  std::lock_guard lock(mu_);
  return reasons_;
}

}  // namespace syncbatch::detail
