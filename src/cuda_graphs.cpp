#include "cuda_graphs.h"

#if GSTVAE_TORCH_HAS_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <map>
#include <mutex>
#endif

#include "errors.h"

namespace gstvae {

#if GSTVAE_TORCH_HAS_CUDA
namespace {

class CudaGraphedForward final : public GraphedForward {
 public:
  CudaGraphedForward(const c10::Device& device, int warmup_runs, size_t max_graphs)
      : device_(device), book_(warmup_runs, max_graphs) {}

  std::vector<at::Tensor> run(const at::Tensor& input, const Forward& forward) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const GraphKey key{input.sizes().vec(), static_cast<int>(input.scalar_type()), device_.index()};
    switch (book_.next(key)) {
      case GraphBook::Step::Eager:
        return forward(input);
      case GraphBook::Step::Replay:
        return replay(*graphs_.at(key), input);
      case GraphBook::Step::Capture:
        break;
    }
    auto graph = std::make_unique<Captured>();
    try {
      capture(*graph, input, forward);
    } catch (const c10::Error&) {
      // Something in the pass cannot be captured (a host synchronisation, an
      // operation without graph support): this key stays eager.
      book_.capture_failed(key);
      return forward(input);
    }
    if (std::optional<GraphKey> dropped = book_.captured(key)) graphs_.erase(*dropped);
    Captured& kept = *(graphs_[key] = std::move(graph));
    return replay(kept, input);
  }

 private:
  struct Captured {
    at::cuda::CUDAGraph graph;
    at::Tensor input;                  // the graph reads its input here
    std::vector<at::Tensor> outputs;   // and writes its outputs here
  };

  // As torch.cuda.graph does: capture on a side stream that waits for the
  // current one; the current stream then waits for the capture. Thread-local
  // capture mode, so that other threads' work on the device (other encoders
  // sharing it) neither breaks nor joins the capture.
  void capture(Captured& c, const at::Tensor& input, const Forward& forward) {
    c10::cuda::CUDAGuard device_guard(device_);
    const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device_.index());
    const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device_.index());
    c.input = at::empty_like(input);
    c.input.copy_(input);
    c10::Event copied(c10::DeviceType::CUDA);
    copied.record(current);
    copied.block(side);
    {
      c10::cuda::CUDAStreamGuard on_side(side);
      c.graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
      try {
        c.outputs = forward(c.input);
      } catch (...) {
        try {
          c.graph.capture_end();
        } catch (...) {
        }
        throw;
      }
      c.graph.capture_end();
    }
    c10::Event captured(c10::DeviceType::CUDA);
    captured.record(side);
    captured.block(current);
  }

  std::vector<at::Tensor> replay(Captured& c, const at::Tensor& input) {
    c10::cuda::CUDAGuard device_guard(device_);
    c.input.copy_(input);
    c.graph.replay();
    // The next replay overwrites the graph's outputs: the caller gets copies.
    std::vector<at::Tensor> out;
    for (const at::Tensor& t : c.outputs) out.push_back(t.defined() ? t.clone() : t);
    return out;
  }

  const c10::Device device_;
  std::mutex mutex_;  // everything below
  GraphBook book_;
  std::map<GraphKey, std::unique_ptr<Captured>> graphs_;
};

}  // namespace

std::unique_ptr<GraphedForward> make_cuda_graphed_forward(const c10::Device& device, int warmup_runs,
                                                         size_t max_graphs) {
  if (!device.is_cuda()) throw VaeError("CUDA graphs asked for on " + device.str() + ", which is not a CUDA device");
  return std::make_unique<CudaGraphedForward>(device, warmup_runs, max_graphs);
}

#else

std::unique_ptr<GraphedForward> make_cuda_graphed_forward(const c10::Device&, int, size_t) { return nullptr; }

#endif

}  // namespace gstvae
