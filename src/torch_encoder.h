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

#include "cuda_graphs.h"
#include "encoder.h"
#include "frame.h"
#include "torch_model.h"

namespace gstvae {

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

  // The batch's pixels on the compute device: what prepare() made (the compute
  // stream waiting for it on GPUs), else prepared now.
  at::Tensor batch_pixels(const FrameBatch& batch) const;
  // The batch's latents as float32 on the compute device, formatted per params.
  at::Tensor encode_on_device(const FrameBatch& batch, const EncodeParams& params, EncodeReport& report);
  // Both encode()s: the latents into `host`, a 1-D float32 tensor with room for
  // them (one asynchronous copy when it is page-locked and the device a GPU).
  // The copy is waited for here, unless the GSTVAE_DOWNLOAD_OVERLAP lever is
  // in effect and `block` is given: then the block carries the event that
  // ends it, and its owner waits (LatentBlock::wait_ready) before reading.
  EncodeReport encode_into(const FrameBatch& batch, const EncodeParams& params, at::Tensor host,
                           LatentBlock* block = nullptr);
  // forward(), through a CUDA graph when the GSTVAE_CUDA_GRAPHS lever is in effect.
  Moments run_forward(const at::Tensor& pixels);

  EncoderInfo info_;
  ComputeTarget target_;
  // Frames per forward pass; lowered for good after an out-of-memory.
  std::atomic<int64_t> sub_batch_{std::numeric_limits<int64_t>::max()};
  // Set when the GSTVAE_CUDA_GRAPHS lever is in effect (a CUDA device, a build with CUDA).
  std::unique_ptr<GraphedForward> graphs_;
};

// Converts a uint8 staging batch to N x 3 x H x W on `target`: upload the
// 8-bit data, then pick the colour channels and normalise on the device.
at::Tensor prepare_pixels(const FrameBatch& batch, const ComputeTarget& target, bool signed_range);

// The sampling noise of the output whose first input frame is `index`: float32
// on the CPU, depending on (seed, index) only, so that a sample depends on
// neither the batch size nor the device.
at::Tensor frame_noise(uint64_t seed, uint64_t index, at::IntArrayRef sizes);

}  // namespace gstvae
