// Shared LibTorch machinery for encoder families: device and precision
// resolution, checked weight loading, and the frame -> latent pipeline around a
// family's forward pass (pixel upload and conversion, sampling, latent format,
// host copy). A family implements only its forward pass and its loader.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "encoder.h"
#include "safetensors.h"

namespace gstvae {

struct ComputeTarget {
  c10::Device device = c10::Device(c10::kCPU);
  Precision precision = Precision::F32;
  at::ScalarType dtype = at::kFloat;
};

// Resolves "auto"/"cpu"/"cuda"/"cuda:N" and the precision rule. An explicit CUDA
// request that cannot be met throws VaeError; there is no silent fallback.
ComputeTarget resolve_target(const ModelOptions& options);

// Sets LibTorch's intra-op thread count (0 = all cores) for the process.
void apply_thread_option(int threads);
// ATen gives a thread the count once, when it first computes, and OpenMP keeps
// it per thread: encode() and prepare() call this so that a long-lived thread
// (the element's encode thread) follows a later apply_thread_option().
void use_configured_threads();

// Reads checkpoint tensors by canonical name onto the compute target, checking
// each shape. Weights are converted to the compute dtype once, here.
class WeightReader {
 public:
  WeightReader(std::shared_ptr<const SafetensorsFile> file, std::map<std::string, std::string> names,
               ComputeTarget target);

  bool has(const std::string& name) const { return names_.count(name) != 0; }
  // Shape as stored; throws CheckpointError naming the tensor when missing.
  std::vector<int64_t> shape(const std::string& name) const;
  // The tensor, which must have `expected` shape. A 2-D [O, I] Linear weight is
  // accepted for an expected [O, I, 1, 1] 1x1 convolution.
  at::Tensor get(const std::string& name, const std::vector<int64_t>& expected);
  int64_t parameters_loaded() const { return parameters_; }
  const std::string& path() const { return file_->path(); }

 private:
  const TensorInfo& info(const std::string& name) const;

  std::shared_ptr<const SafetensorsFile> file_;
  std::map<std::string, std::string> names_;
  ComputeTarget target_;
  int64_t parameters_ = 0;
};

class TorchEncoder : public Encoder {
 public:
  const EncoderInfo& info() const override { return info_; }
  void prepare(FrameBatch& batch) override;
  EncodeReport encode(const FrameBatch& batch, const EncodeParams& params, float* out) override;
  EncodeReport encode(const FrameBatch& batch, const EncodeParams& params, LatentBlock& out) override;

 protected:
  struct Moments {
    at::Tensor mean;    // N x C x h x w, raw latent space
    at::Tensor logvar;  // same shape, or undefined for deterministic encoders
  };

  TorchEncoder(EncoderInfo info, ComputeTarget target);
  // pixels: N x 3 x H x W in the compute dtype, range per info_.input_signed.
  virtual Moments forward(const at::Tensor& pixels) = 0;
  // Runs one minimal frame through forward() so that an unsupported
  // device/precision combination fails at load time with a clear message.
  void probe();

  // The batch's latents as float32 on the compute device, formatted per params.
  at::Tensor encode_on_device(const FrameBatch& batch, const EncodeParams& params, EncodeReport& report);
  // Both encode()s: the latents into `host`, a 1-D float32 tensor with room for
  // them (one asynchronous copy when it is page-locked and the device a GPU).
  EncodeReport encode_into(const FrameBatch& batch, const EncodeParams& params, at::Tensor host);

  EncoderInfo info_;
  ComputeTarget target_;
  // Frames per forward pass; lowered for good after an out-of-memory.
  std::atomic<int64_t> sub_batch_{std::numeric_limits<int64_t>::max()};
};

// Converts a uint8 staging batch to N x 3 x H x W on `target`: upload the
// 8-bit data, then pick the colour channels and normalise on the device.
at::Tensor prepare_pixels(const FrameBatch& batch, const ComputeTarget& target, bool signed_range);

}  // namespace gstvae
