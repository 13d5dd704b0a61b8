#include "torch_encoder.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>

#include "errors.h"
#include "frame_storage.h"
#include "tiling.h"

namespace gstvae {

TorchEncoder::TorchEncoder(EncoderInfo info, ComputeTarget target)
    : info_(std::move(info)), target_(target) {
  info_.device = target_.device.str();
  info_.precision = target_.precision;
  configure_cuda(target_);
  if (target_.levers.cuda_graphs) graphs_ = make_cuda_graphed_forward(target_.device);
}

TorchEncoder::Moments TorchEncoder::run_forward(const at::Tensor& pixels) {
  if (!graphs_) return forward(pixels);
  std::vector<at::Tensor> out = graphs_->run(pixels, [this](const at::Tensor& x) {
    Moments m = forward(x);
    return std::vector<at::Tensor>{m.mean, m.logvar};
  });
  return {out.at(0), out.at(1)};
}

void TorchEncoder::probe() {
  c10::InferenceMode guard;
  const int64_t side = info_.downscale;
  at::Tensor x = at::zeros({1, 3, side, side}, at::TensorOptions().device(target_.device).dtype(target_.dtype));
  try {
    Moments m = forward(x);
    if (m.mean.size(1) != info_.latent_channels)
      throw VaeError("model produced " + std::to_string(m.mean.size(1)) + " latent channels, expected " +
                        std::to_string(info_.latent_channels));
  } catch (const c10::Error& e) {
    throw VaeError(std::string("precision ") + precision_name(target_.precision) +
                      " does not run on device " + target_.device.str() + " with this LibTorch: " +
                      e.what_without_backtrace());
  }
}

namespace {

// A device batch's frames as N x 3 x H x W float32 (0..255) on `device`,
// read in place from their planes (one strided copy per frame and channel,
// which also converts to float); then marks them read on the current stream.
at::Tensor gather_device_frames(const FrameBatch& batch, const c10::Device& device) {
  FrameBatch::Storage& storage = const_cast<FrameBatch::Storage&>(batch.storage());
  const c10::Device where = storage.frames.front()[0].device();
  if (where != device)
    throw VaeError("frames in the memory of " + where.str() + " cannot be encoded on " + device.str() +
                   ": run the encoder on the frames' device");
  const Crop& crop = batch.crop();
  at::Tensor x = at::empty({static_cast<int64_t>(batch.size()), 3, crop.height, crop.width},
                           at::TensorOptions().dtype(at::kFloat).device(device));
  for (size_t i = 0; i < storage.frames.size(); ++i)
    for (int c = 0; c < 3; ++c) x.select(0, static_cast<int64_t>(i)).select(0, c).copy_(storage.frames[i][c]);
  storage.mark_frames_read(device);
  return x;
}

}  // namespace

at::Tensor prepare_pixels(const FrameBatch& batch, const ComputeTarget& target, bool signed_range) {
  at::Tensor x;
  if (batch.memory() == FrameMemory::Device) {
    x = gather_device_frames(batch, target.device);
  } else {
    const PixelLayout layout = pixel_layout(batch.format());
    at::Tensor staged = batch.storage().pixels.narrow(0, 0, static_cast<int64_t>(batch.size()));
    at::Tensor u8 = staged.to(target.device, /*non_blocking=*/batch.pinned());
    // N x H x W x bpp -> N x 3 x H x W in R, G, B order (views, then one copy).
    at::Tensor rgb = at::stack({u8.select(3, layout.r), u8.select(3, layout.g), u8.select(3, layout.b)}, 1);
    x = rgb.to(at::kFloat);
  }
  // ComfyUI: pixels = u8 / 255 in fp32, then 2 * pixels - 1, then the VAE dtype.
  x.div_(255.0f);
  if (signed_range) x.mul_(2.0f).sub_(1.0f);
  // NCHW, kept by every layer after it. Not channels-last on the CPU, though
  // eager bf16 runs 22 % faster so on this project's CPU: Debian's LibTorch
  // 1.13 CPU GroupNorm gives wrong bf16 values on channels-last input (max
  // error 4.75 against 0.077 in NCHW), and in fp32 channels-last is 1.5x
  // slower here. Channels-last (NHWC, which tensor cores prefer) only where the
  // GSTVAE_CHANNELS_LAST lever takes effect: bf16/fp16 on CUDA, or `always`.
  return x.to(target.dtype).contiguous(activation_format(target));
}

void TorchEncoder::prepare(FrameBatch& batch) {
  if (batch.empty()) return;
  use_configured_threads();
  c10::InferenceMode guard;
  FrameBatch::Storage& storage = batch.storage();
  storage.forget_prepared();
  try {
    if (target_.device.is_cuda() && target_.levers.upload_overlap) {
      // A side stream, so that the upload overlaps the encode running on the
      // compute stream; encode() makes the compute stream wait for the event.
      // GSTVAE_UPLOAD_OVERLAP=0: on the compute stream, as on the CPU.
      c10::impl::VirtualGuardImpl impl(target_.device.type());
      c10::StreamGuard on_side_stream(impl.getStreamFromGlobalPool(target_.device));
      storage.prepared = prepare_pixels(batch, target_, info_.input_signed);
      storage.prepared_ready = std::make_unique<c10::Event>(target_.device.type());
      storage.prepared_ready->record(impl.getStream(target_.device));
    } else {
      storage.prepared = prepare_pixels(batch, target_, info_.input_signed);
    }
  } catch (const c10::Error& e) {
    storage.forget_prepared();
    throw VaeError(std::string("preparing a batch of ") + std::to_string(batch.size()) + " frames for " +
                      target_.device.str() + " failed: " + e.what_without_backtrace());
  }
}

namespace {

// SplitMix64: decorrelates per-frame seeds derived from (seed, frame index).
uint64_t mix_seed(uint64_t seed, uint64_t index) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (index + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

at::Tensor TorchEncoder::batch_pixels(const FrameBatch& batch) const {
  if (!batch.storage().prepared.defined()) return prepare_pixels(batch, target_, info_.input_signed);
  at::Tensor pixels = batch.storage().prepared;
  if (const auto& ready = batch.storage().prepared_ready) {
    // Made on a side stream: the compute stream waits for it, and the
    // caching allocator learns that the compute stream uses its memory.
    c10::impl::VirtualGuardImpl impl(target_.device.type());
    const c10::Stream compute = impl.getStream(target_.device);
    ready->block(compute);
    impl.recordDataPtrOnStream(pixels.storage().data_ptr(), compute);
  }
  return pixels;
}

at::Tensor frame_noise(uint64_t seed, uint64_t index, at::IntArrayRef sizes) {
  auto gen = at::detail::createCPUGenerator(mix_seed(seed, index));
  return at::randn(sizes, gen, at::TensorOptions().dtype(at::kFloat));
}

at::Tensor TorchEncoder::encode_on_device(const FrameBatch& batch, const EncodeParams& params,
                                          EncodeReport& report) {
  at::Tensor pixels = batch_pixels(batch);
  std::vector<at::Tensor> means, logvars;
  auto keep = [&](const Moments& m) {
    means.push_back(m.mean.to(at::kFloat));
    if (m.logvar.defined()) logvars.push_back(m.logvar.to(at::kFloat));
  };
  report = run_with_memory_fallback(
      pixels.size(0), sub_batch_,
      [&](int64_t start, int64_t count) { keep(run_forward(pixels.narrow(0, start, count))); },
      [&](int64_t index) {
        // Mean and log-variance are blended together, then split again.
        const int64_t z = info_.latent_channels;
        auto moments = [&](const at::Tensor& tile) {
          Moments m = forward(tile);
          return m.logvar.defined() ? at::cat({m.mean, m.logvar}, 1) : m.mean;
        };
        at::Tensor blended = encode_tiled(moments, pixels.narrow(0, index, 1), info_.downscale);
        keep({blended.narrow(1, 0, z), blended.size(1) > z ? blended.narrow(1, z, z) : at::Tensor()});
      });
  at::Tensor latents = at::cat(means, 0);
  if (params.sample && logvars.size() == means.size()) {
    // Noise is drawn per frame on the CPU from (seed, frame index), so a
    // sample does not depend on the batch size or the device.
    std::vector<at::Tensor> noise;
    const auto sizes = latents.sizes().slice(1);
    for (uint64_t index : batch.indices()) noise.push_back(frame_noise(params.seed, index, sizes));
    at::Tensor eps = at::stack(noise).to(target_.device);
    at::Tensor std = at::exp(0.5f * at::cat(logvars, 0).clamp(-30.0, 20.0));
    latents = latents + std * eps;
  }
  // The model's space -> raw (ComfyUI: output / scale + shift) -> the format asked for.
  return raw_to_format(format_to_raw(latents, info_.native_format), params.latent_format);
}

EncodeReport TorchEncoder::encode_into(const FrameBatch& batch, const EncodeParams& params, at::Tensor host,
                                       LatentBlock* block) {
  EncodeReport report{sub_batch_.load(), 0, {}};
  if (batch.empty()) return report;
  use_configured_threads();
  c10::InferenceMode guard;
  try {
    at::Tensor latents = encode_on_device(batch, params, report);
    // One device->host copy per batch; asynchronous into page-locked memory,
    // so wait for it (and everything before it on the stream) here, or hand
    // the wait to the block's owner (the download overlapped with the next
    // batch's encode).
    const bool async = host.is_pinned() && target_.device.is_cuda();
    host.narrow(0, 0, latents.numel()).view(latents.sizes()).copy_(latents, /*non_blocking=*/async);
    if (async) finish_download(target_.device, target_.levers.download_overlap ? block : nullptr);
  } catch (const c10::Error& e) {
    throw VaeError(std::string("encoding a batch of ") + std::to_string(batch.size()) + " frames of " +
                      std::to_string(batch.crop().width) + "x" + std::to_string(batch.crop().height) + " on " +
                      target_.device.str() + " failed: " + e.what_without_backtrace());
  }
  return report;
}

EncodeReport TorchEncoder::encode(const FrameBatch& batch, const EncodeParams& params, float* out) {
  const auto floats = static_cast<int64_t>(batch.size() * latent_floats_per_frame(batch));
  return encode_into(batch, params, at::from_blob(out, {floats}, at::TensorOptions().dtype(at::kFloat)));
}

EncodeReport TorchEncoder::encode(const FrameBatch& batch, const EncodeParams& params, LatentBlock& out) {
  const size_t needed = batch.size() * latent_floats_per_frame(batch);
  if (out.floats() < needed)
    throw VaeError("latent block of " + std::to_string(out.floats()) + " floats is too small for " +
                      std::to_string(batch.size()) + " frames (" + std::to_string(needed) + " floats)");
  return encode_into(batch, params, out.storage().values, &out);
}

namespace {
// Host buffers of GPU encoders are page-locked (unless GSTVAE_PINNED_STAGING=0).
bool pinned_host(const EncoderInfo& info) {
  return info.device.rfind("cuda", 0) == 0 && cuda_levers().pinned_staging;
}

// One latent per frame: the session of an encoder without time.
class ImageEncodeSession final : public EncodeSession {
 public:
  explicit ImageEncodeSession(std::shared_ptr<Encoder> encoder) : encoder_(std::move(encoder)) {}
  void reset() override {}
  BatchResult encode(const FrameBatch& batch, const EncodeParams& params, LatentBlock& out) override {
    BatchResult result;
    result.report = encoder_->encode(batch, params, out);
    for (uint64_t index : batch.indices()) result.spans.push_back({index, 1});
    return result;
  }

 private:
  std::shared_ptr<Encoder> encoder_;
};
}  // namespace

std::unique_ptr<EncodeSession> Encoder::open_session() {
  return std::make_unique<ImageEncodeSession>(shared_from_this());
}

std::unique_ptr<FrameBatch> Encoder::new_batch(PixelFormat format, int width, int height, size_t capacity,
                                               FrameMemory memory) const {
  return std::make_unique<FrameBatch>(format, width, height, info().downscale, capacity, pinned_host(info()),
                                      memory);
}

std::unique_ptr<LatentBlock> Encoder::new_latents(const FrameBatch& batch) const {
  return std::make_unique<LatentBlock>(std::max<size_t>(batch.size(), 1) * latent_floats_per_frame(batch),
                                       pinned_host(info()));
}

size_t Encoder::latent_floats_per_frame(const FrameBatch& batch) const {
  const int d = info().downscale;
  return static_cast<size_t>(info().latent_channels) * (batch.crop().height / d) * (batch.crop().width / d);
}

}  // namespace gstvae
