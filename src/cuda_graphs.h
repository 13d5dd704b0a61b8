// CUDA graphs for a forward pass (GSTVAE_CUDA_GRAPHS, docs/gpu.md): after the
// warm-up runs of graph_book.h, the pass is captured for the input's shape and
// dtype on a side stream, then replayed with the input copied into the graph's
// own input tensor. Kernel launches cost microseconds each and an SD VAE
// encode launches hundreds; a replay launches them all at once.
// The CUDA part lives in cuda_graphs.cpp, compiled against libtorch_cuda when
// the LibTorch has it (GSTVAE_TORCH_HAS_CUDA); otherwise there is no runner.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <vector>

#include "graph_book.h"

namespace gstvae {

class GraphedForward {
 public:
  using Forward = std::function<std::vector<at::Tensor>(const at::Tensor&)>;
  virtual ~GraphedForward() = default;
  // forward(input), eagerly, captured or replayed as the book says. The
  // tensors returned are the caller's (copies of the graph's outputs).
  // Thread-safe: one run at a time.
  virtual std::vector<at::Tensor> run(const at::Tensor& input, const Forward& forward) = 0;
};

// A runner for `device` (a CUDA device), or nullptr when this build has no
// CUDA code (cuda_built() in levers.h is false).
std::unique_ptr<GraphedForward> make_cuda_graphed_forward(const c10::Device& device, int warmup_runs = 2,
                                                         size_t max_graphs = 4);

}  // namespace gstvae
