// When to capture, replay or run eagerly, for CUDA graphs (GSTVAE_CUDA_GRAPHS,
// docs/gpu.md). A graph is only valid for the input shape, precision and
// device it was captured with, and capturing costs a forward pass; so each
// input key runs eagerly `warmup_runs` times first (cuDNN picks its algorithms
// and the caching allocator settles), then is captured once and replayed from
// then on. A new frame size or batch size is a new key: captured in its turn.
// At most `max_graphs` graphs are kept (each holds its own device memory); the
// least recently used one is dropped for a new one. A key whose capture failed
// runs eagerly for good. No LibTorch and no device here: the CPU tests check
// this bookkeeping, cuda_graphs.cpp does the capturing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace gstvae {

struct GraphKey {
  std::vector<int64_t> shape;  // the input's sizes
  int dtype = 0;               // the input's scalar type
  int device = 0;              // the CUDA device index
  bool operator<(const GraphKey& o) const {
    return std::tie(shape, dtype, device) < std::tie(o.shape, o.dtype, o.device);
  }
  bool operator==(const GraphKey& o) const { return !(*this < o) && !(o < *this); }
  std::string str() const;
};

class GraphBook {
 public:
  enum class Step { Eager, Capture, Replay };
  explicit GraphBook(int warmup_runs = 2, size_t max_graphs = 4);

  // What to do for the next run with `key`; counts the run.
  Step next(const GraphKey& key);
  // The capture of `key` succeeded. Returns the key whose graph must be
  // dropped to stay within max_graphs, if any.
  std::optional<GraphKey> captured(const GraphKey& key);
  // The capture of `key` failed (an operation that cannot be captured): it
  // runs eagerly from now on.
  void capture_failed(const GraphKey& key);

  size_t graphs() const;
  size_t captures() const { return captures_; }
  size_t replays() const { return replays_; }
  size_t eager_runs() const { return eager_runs_; }

 private:
  struct Entry {
    int runs = 0;
    bool captured = false;
    bool failed = false;
    uint64_t last_use = 0;
  };
  int warmup_runs_;
  size_t max_graphs_;
  std::map<GraphKey, Entry> entries_;
  uint64_t clock_ = 0;
  size_t captures_ = 0, replays_ = 0, eager_runs_ = 0;
};

}  // namespace gstvae
