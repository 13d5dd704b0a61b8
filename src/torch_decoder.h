// The latents -> frames pipeline around a decoder family's forward pass:
// upload, latent format to the model's space, memory fallbacks, ComfyUI's
// output mapping and 8-bit rounding, packing into the pixel format. A family
// implements only its forward pass and its loader.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <functional>
#include <limits>

#include "decoder.h"
#include "torch_model.h"

namespace gstvae {

class TorchDecoder : public Decoder {
 public:
  const DecoderInfo& info() const override { return info_; }
  ComputeReport decode(const LatentBatch& batch, const DecodeParams& params, PixelFormat format,
                       uint8_t* out) override;
  using Decoder::decode;
  ComputeReport decode_float(const LatentBatch& batch, const DecodeParams& params, float* out) override;
  void set_test_memory_limit(int64_t latent_cells) override { test_memory_limit_ = latent_cells; }
  std::unique_ptr<DecodeSession> open_session(int frames_per_latent = 1) override;

  // What a video decoder (info_.temporal_upscale > 1) carries from latent to
  // latent of a stream; the family defines it.
  struct StreamState {
    virtual ~StreamState() = default;
    virtual size_t bytes() const = 0;
  };

  // The work of a video session (torch_decoder.cpp), on its stream's state:
  // a fresh state, at the start of a clip.
  virtual std::unique_ptr<StreamState> new_stream_state() const;
  // z: L x C x h x w (compute dtype, native format), the latents following
  // what `state` saw. Returns their frames, N x 3 x H x W (range per
  // info_.output_signed): 1 for the first latent of a clip, temporal_upscale
  // for each later one.
  virtual at::Tensor forward_stream(const at::Tensor& z, StreamState& state);
  // The batch's latents on the device, in the model's space and compute dtype.
  at::Tensor prepare(const LatentBatch& batch, const DecodeParams& params) const;
  // Pixels in [0, 1] (N x 3 x H x W float32) -> ComfyUI SaveImage's 8 bits, N x 3 x H x W.
  static at::Tensor to_bytes(const at::Tensor& pixels);
  // Those bytes packed into `format` (alpha and padding bytes 255) at `out`.
  static void pack(const at::Tensor& bytes, PixelFormat format, uint8_t* out);

 protected:
  TorchDecoder(DecoderInfo info, ComputeTarget target);
  // z: N x C x h x w in the compute dtype, in info_.native_format. Returns
  // N x 3 x (h * upscale) x (w * upscale), range per info_.output_signed.
  virtual at::Tensor forward(const at::Tensor& z) = 0;
  // Runs one minimal latent through forward() so that an unsupported
  // device/precision combination fails at load time with a clear message.
  void probe();

  DecoderInfo info_;
  ComputeTarget target_;
  std::atomic<int64_t> sub_batch_{std::numeric_limits<int64_t>::max()};

 private:
  // Uploads and converts the batch's latents, runs forward() with the memory
  // fallbacks and returns finish(pixels) of every sub-batch, concatenated;
  // pixels is N x 3 x H x W float32 in [0, 1]. Finishing each sub-batch before
  // the next keeps one sub-batch of float pixels in memory at a time.
  // forward(), failing as out of memory past the test limit.
  at::Tensor limited_forward(const at::Tensor& z);
  at::Tensor run(const LatentBatch& batch, const DecodeParams& params,
                 const std::function<at::Tensor(const at::Tensor&)>& finish, ComputeReport& report);

  std::atomic<int64_t> test_memory_limit_{0};
};

// ComfyUI's pixels from a decoder output x (N x 3 x H x W, any float dtype):
// clamp((x + 1) / 2, 0, 1) in float32 for a signed output; a [0, 1] output
// (TAESD, TAEHV) goes through the same arithmetic after ComfyUI's
// (x - 0.5) * 2. TorchDecoder::to_bytes makes SaveImage's 8 bits of them.
at::Tensor comfy_pixels_float(const at::Tensor& x, bool signed_output);

}  // namespace gstvae
