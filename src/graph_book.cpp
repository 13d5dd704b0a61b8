#include "graph_book.h"

#include <stdexcept>

namespace gstvae {

std::string GraphKey::str() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "x" : "") + std::to_string(shape[i]);
  return s + "] dtype " + std::to_string(dtype) + " on cuda:" + std::to_string(device);
}

GraphBook::GraphBook(int warmup_runs, size_t max_graphs) : warmup_runs_(warmup_runs), max_graphs_(max_graphs) {
  if (warmup_runs < 1) throw std::invalid_argument("GraphBook: at least one warm-up run before a capture");
  if (max_graphs < 1) throw std::invalid_argument("GraphBook: room for at least one graph");
}

GraphBook::Step GraphBook::next(const GraphKey& key) {
  Entry& e = entries_[key];
  e.last_use = ++clock_;
  if (e.captured) {
    ++replays_;
    return Step::Replay;
  }
  if (e.failed || e.runs < warmup_runs_) {
    ++e.runs;
    ++eager_runs_;
    return Step::Eager;
  }
  return Step::Capture;
}

std::optional<GraphKey> GraphBook::captured(const GraphKey& key) {
  Entry& e = entries_[key];
  e.captured = true;
  e.last_use = ++clock_;
  ++captures_;
  if (graphs() <= max_graphs_) return std::nullopt;
  // The least recently used other graph goes; its key warms up again if it
  // comes back.
  auto victim = entries_.end();
  for (auto it = entries_.begin(); it != entries_.end(); ++it)
    if (it->second.captured && !(it->first == key) &&
        (victim == entries_.end() || it->second.last_use < victim->second.last_use))
      victim = it;
  GraphKey dropped = victim->first;
  entries_.erase(victim);
  return dropped;
}

void GraphBook::capture_failed(const GraphKey& key) {
  Entry& e = entries_[key];
  e.failed = true;
  e.captured = false;
}

size_t GraphBook::graphs() const {
  size_t n = 0;
  for (const auto& [key, e] : entries_) n += e.captured;
  return n;
}

}  // namespace gstvae
