#include "torch_decoder.h"

#include <c10/core/InferenceMode.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <stdexcept>

#include "errors.h"
#include "frame_storage.h"
#include "tiling.h"

namespace gstvae {

struct PixelBlock::Storage {
  at::Tensor bytes;  // uint8, 1-D, page-locked on GPUs
};

PixelBlock::PixelBlock(size_t bytes, bool pinned) : bytes_(bytes), storage_(std::make_unique<Storage>()) {
  storage_->bytes = at::empty({static_cast<int64_t>(bytes)},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(pinned));
}
PixelBlock::~PixelBlock() = default;
uint8_t* PixelBlock::data() { return storage_->bytes.data_ptr<uint8_t>(); }
bool PixelBlock::pinned() const { return storage_->bytes.is_pinned(); }

LatentBatch::LatentBatch(int channels, int height, int width, size_t capacity, bool pinned)
    : channels_(channels), height_(height), width_(width), capacity_(capacity) {
  if (capacity == 0) throw VaeError("a latent batch needs a capacity of at least 1");
  if (channels <= 0 || height <= 0 || width <= 0)
    throw VaeError("latents of " + std::to_string(channels) + "x" + std::to_string(height) + "x" +
                   std::to_string(width) + " cannot be decoded");
  values_ = std::make_unique<LatentBlock>(capacity * floats_per_latent(), pinned);
  indices_.reserve(capacity);
}
LatentBatch::~LatentBatch() = default;

void LatentBatch::add(const void* values, uint64_t index) {
  if (full()) throw VaeError("latent batch is full (" + std::to_string(capacity_) + " latents)");
  std::memcpy(values_->data() + indices_.size() * floats_per_latent(), values, floats_per_latent() * sizeof(float));
  indices_.push_back(index);
}

void LatentBatch::clear() { indices_.clear(); }

namespace {
bool pinned_host(const DecoderInfo& info) {
  return info.device.rfind("cuda", 0) == 0 && cuda_levers().pinned_staging;
}

// One frame per latent, each latent decoded alone.
class ImageDecodeSession final : public DecodeSession {
 public:
  explicit ImageDecodeSession(std::shared_ptr<Decoder> decoder) : decoder_(std::move(decoder)) {}
  void reset() override {}
  BatchResult decode(const LatentBatch& batch, const DecodeParams& params, PixelFormat format,
                     PixelBlock& out) override {
    return spans_of(batch, decoder_->decode(batch, params, format, out));
  }
  BatchResult decode_float(const LatentBatch& batch, const DecodeParams& params, float* out) override {
    return spans_of(batch, decoder_->decode_float(batch, params, out));
  }

 private:
  static BatchResult spans_of(const LatentBatch& batch, ComputeReport report) {
    BatchResult result;
    result.report = std::move(report);
    for (uint64_t index : batch.indices()) result.spans.push_back({index, 1});
    return result;
  }

  std::shared_ptr<Decoder> decoder_;
};

// Latents per forward pass of a video decoder after a clip's first (which
// goes alone: it makes one frame, not temporal_upscale). Bounds the
// activations, which are temporal_upscale full-size frames per latent; any
// number gives the same frames.
constexpr int64_t kVideoLatentsPerPass = 2;

// A video stream: the decoder's causal state carried from latent to latent.
// No memory fallback: a pass that failed half-way has changed the state, so
// the clip cannot be retried; the session resets and the error names the batch.
class VideoDecodeSession final : public DecodeSession {
 public:
  explicit VideoDecodeSession(std::shared_ptr<TorchDecoder> decoder)
      : decoder_(std::move(decoder)), state_(decoder_->new_stream_state()) {}

  void reset() override {
    state_ = decoder_->new_stream_state();
    started_ = false;
  }
  size_t state_bytes() const override { return state_->bytes(); }

  BatchResult decode(const LatentBatch& batch, const DecodeParams& params, PixelFormat format,
                     PixelBlock& out) override {
    check_room(out.bytes(), batch, decoder_->frame_bytes(batch, format));
    return run(batch, params, [&](const at::Tensor& pixels, size_t done) {
      TorchDecoder::pack(TorchDecoder::to_bytes(pixels), format, out.data() + done * decoder_->frame_bytes(batch, format));
    });
  }

  BatchResult decode_float(const LatentBatch& batch, const DecodeParams& params, float* out) override {
    return run(batch, params, [&](const at::Tensor& pixels, size_t done) {
      at::from_blob(out + done * static_cast<size_t>(pixels[0].numel()), pixels.sizes(),
                    at::TensorOptions().dtype(at::kFloat))
          .copy_(pixels);
    });
  }

 private:
  void check_room(size_t bytes, const LatentBatch& batch, size_t frame_bytes) const {
    const size_t needed = batch.size() * decoder_->info().temporal_upscale * frame_bytes;
    if (bytes < needed)
      throw VaeError("pixel block of " + std::to_string(bytes) + " bytes is too small for the frames of " +
                     std::to_string(batch.size()) + " latents (" + std::to_string(needed) +
                     " bytes; Decoder::new_pixels with frames_per_latent " +
                     std::to_string(decoder_->info().temporal_upscale) + ")");
  }

  // Decodes the batch pass by pass; `emit(pixels, frames_done)` stores each
  // pass's frames (float32 in [0, 1]) after the frames already stored.
  BatchResult run(const LatentBatch& batch, const DecodeParams& params,
                  const std::function<void(const at::Tensor&, size_t)>& emit) {
    const DecoderInfo& info = decoder_->info();
    const auto upscale = static_cast<uint32_t>(info.temporal_upscale);
    BatchResult result;
    result.report.sub_batch = kVideoLatentsPerPass;
    if (batch.empty()) return result;
    use_configured_threads();
    c10::InferenceMode guard;
    try {
      const at::Tensor z = decoder_->prepare(batch, params);
      const int64_t n = z.size(0);
      size_t frames = 0;
      for (int64_t start = 0; start < n;) {
        const int64_t count = started_ ? std::min(kVideoLatentsPerPass, n - start) : 1;
        const at::Tensor x = decoder_->forward_stream(z.narrow(0, start, count), *state_);
        const int64_t expected = started_ ? count * upscale : 1 + (count - 1) * upscale;
        if (x.size(0) != expected)
          throw VaeError("internal: " + std::to_string(count) + " latents gave " + std::to_string(x.size(0)) +
                         " frames, expected " + std::to_string(expected));
        emit(comfy_pixels_float(x.to(at::kFloat), info.output_signed), frames);
        frames += static_cast<size_t>(expected);
        for (int64_t i = 0; i < count; ++i) {
          const uint64_t index = batch.indices()[static_cast<size_t>(start + i)];
          if (started_) {
            for (uint32_t part = 0; part < upscale; ++part) result.spans.push_back({index, 1, part, upscale});
          } else if (info.first_latent_keeps_last) {
            result.spans.push_back({index, 1, upscale - 1, upscale});  // the last frame of its group
          } else {
            result.spans.push_back({index, 1});  // frame 0, the latent's only frame
          }
          started_ = true;
        }
        start += count;
      }
    } catch (const c10::Error& e) {
      reset();
      throw VaeError(std::string("decoding a batch of ") + std::to_string(batch.size()) + " latents of " +
                     std::to_string(batch.width()) + "x" + std::to_string(batch.height()) + " with " + info.family +
                     " on " + info.device + " failed (the clip restarts at the next latent): " +
                     e.what_without_backtrace());
    } catch (...) {
      reset();
      throw;
    }
    return result;
  }

  std::shared_ptr<TorchDecoder> decoder_;
  std::unique_ptr<TorchDecoder::StreamState> state_;
  bool started_ = false;  // a latent of this clip was decoded
};
}  // namespace

std::unique_ptr<LatentBatch> Decoder::new_batch(int height, int width, size_t capacity) const {
  return std::make_unique<LatentBatch>(info().latent_channels, height, width, capacity, pinned_host(info()));
}

size_t Decoder::frame_bytes(const LatentBatch& batch, PixelFormat format) const {
  const size_t up = static_cast<size_t>(info().upscale);
  return batch.height() * up * batch.width() * up * pixel_layout(format).bytes_per_pixel;
}

std::unique_ptr<PixelBlock> Decoder::new_pixels(const LatentBatch& batch, PixelFormat format,
                                                int frames_per_latent) const {
  return std::make_unique<PixelBlock>(batch.size() * std::max(1, frames_per_latent) * frame_bytes(batch, format),
                                      pinned_host(info()));
}

ComputeReport Decoder::decode(const LatentBatch& batch, const DecodeParams& params, PixelFormat format,
                              PixelBlock& out) {
  const size_t needed = batch.size() * frame_bytes(batch, format);
  if (out.bytes() < needed)
    throw VaeError("pixel block of " + std::to_string(out.bytes()) + " bytes is too small for " +
                   std::to_string(batch.size()) + " frames (" + std::to_string(needed) + " bytes)");
  return decode(batch, params, format, out.data());
}

std::unique_ptr<DecodeSession> Decoder::open_session(int frames_per_latent) {
  if (frames_per_latent != 1)
    throw VaeError("the " + info().family + " decoder '" + info().model_path +
                   "' decodes images (one frame per latent), not latents of " + std::to_string(frames_per_latent) +
                   " frames each");
  return std::make_unique<ImageDecodeSession>(shared_from_this());
}

std::unique_ptr<DecodeSession> TorchDecoder::open_session(int frames_per_latent) {
  if (frames_per_latent == 1 || info_.temporal_upscale == 1) return Decoder::open_session(frames_per_latent);
  if (frames_per_latent != info_.temporal_upscale)
    throw VaeError("the " + info_.family + " decoder '" + info_.model_path + "' makes " +
                   std::to_string(info_.temporal_upscale) + " frames per latent, not " +
                   std::to_string(frames_per_latent));
  return std::make_unique<VideoDecodeSession>(std::static_pointer_cast<TorchDecoder>(shared_from_this()));
}

std::unique_ptr<TorchDecoder::StreamState> TorchDecoder::new_stream_state() const {
  throw VaeError("the " + info_.family + " decoder '" + info_.model_path + "' has no video state");
}

at::Tensor TorchDecoder::forward_stream(const at::Tensor&, StreamState&) {
  throw VaeError("the " + info_.family + " decoder '" + info_.model_path + "' decodes no video streams");
}

TorchDecoder::TorchDecoder(DecoderInfo info, ComputeTarget target) : info_(std::move(info)), target_(target) {
  info_.device = target_.device.str();
  info_.precision = target_.precision;
  configure_cuda(target_);
}

void TorchDecoder::probe() {
  c10::InferenceMode guard;
  at::Tensor z = at::zeros({1, info_.latent_channels, 1, 1},
                           at::TensorOptions().device(target_.device).dtype(target_.dtype));
  try {
    at::Tensor x = forward(z);
    if (x.dim() != 4 || x.size(1) != 3 || x.size(2) != info_.upscale || x.size(3) != info_.upscale)
      throw VaeError("decoder produced " + shape_string(x.sizes().vec()) + " for one latent cell, expected [1, 3, " +
                     std::to_string(info_.upscale) + ", " + std::to_string(info_.upscale) + "]");
  } catch (const c10::Error& e) {
    throw VaeError(std::string("precision ") + precision_name(target_.precision) + " does not run on device " +
                   target_.device.str() + " with this LibTorch: " + e.what_without_backtrace());
  }
}

at::Tensor comfy_pixels_float(const at::Tensor& x, bool signed_output) {
  at::Tensor y = signed_output ? x : (x - 0.5).mul(2.0);  // callers convert to float32 first
  return y.to(at::kFloat).add(1.0f).div(2.0f).clamp(0.0, 1.0);
}

ComputeReport Decoder::decode_float(const LatentBatch&, const DecodeParams&, float*) {
  throw VaeError("the " + info().family + " decoder '" + info().model_path + "' gives no float output");
}

void Decoder::set_test_memory_limit(int64_t) {
  throw VaeError("the " + info().family + " decoder '" + info().model_path + "' has no test memory limit");
}

at::Tensor TorchDecoder::limited_forward(const at::Tensor& z) {
  const int64_t limit = test_memory_limit_.load();
  const int64_t cells = z.size(0) * z.size(2) * z.size(3);
  if (limit > 0 && cells > limit)
    throw std::runtime_error("out of memory (test limit of " + std::to_string(limit) + " latent cells, asked " +
                             std::to_string(cells) + ")");
  return forward(z);
}

at::Tensor TorchDecoder::prepare(const LatentBatch& batch, const DecodeParams& params) const {
  if (batch.channels() != info_.latent_channels)
    throw VaeError("latents have " + std::to_string(batch.channels()) + " channels, but the decoder '" +
                   info_.model_path + "' takes " + std::to_string(info_.latent_channels));
  const int64_t n = static_cast<int64_t>(batch.size());
  at::Tensor host = batch.block().storage().values.narrow(0, 0, n * static_cast<int64_t>(batch.floats_per_latent()));
  at::Tensor z = host.view({n, batch.channels(), batch.height(), batch.width()})
                     .to(target_.device, /*non_blocking=*/batch.block().pinned());
  // Given format -> raw (x / scale + shift) -> the model's own space.
  z = raw_to_format(format_to_raw(z, params.latent_format), info_.native_format);
  return z.to(target_.dtype).contiguous(activation_format(target_));
}

at::Tensor TorchDecoder::run(const LatentBatch& batch, const DecodeParams& params,
                             const std::function<at::Tensor(const at::Tensor&)>& finish, ComputeReport& report) {
  const int64_t n = static_cast<int64_t>(batch.size());
  const int64_t up = info_.upscale;
  try {
    const at::Tensor z = prepare(batch, params);
    std::vector<at::Tensor> parts;
    report = run_with_memory_fallback(
        n, sub_batch_,
        [&](int64_t start, int64_t count) {
          parts.push_back(finish(comfy_pixels_float(limited_forward(z.narrow(0, start, count)).to(at::kFloat), info_.output_signed)));
        },
        [&](int64_t index) {
          // ComfyUI blends the tiles' raw outputs, then maps the blend to pixels.
          auto fn = [&](const at::Tensor& tile) { return limited_forward(tile).to(at::kFloat); };
          parts.push_back(finish(comfy_pixels_float(decode_tiled(fn, z.narrow(0, index, 1), up), info_.output_signed)));
        },
        "decoding", "tiled decoding (64x64-latent tiles, 16-cell overlap)");
    return at::cat(parts, 0);
  } catch (const c10::Error& e) {
    throw VaeError(std::string("decoding a batch of ") + std::to_string(n) + " latents of " +
                   std::to_string(batch.width()) + "x" + std::to_string(batch.height()) + " on " +
                   target_.device.str() + " failed: " + e.what_without_backtrace());
  }
}

at::Tensor TorchDecoder::to_bytes(const at::Tensor& pixels) {
  // numpy: 255. * float32 array stays float32; clip; astype(uint8) truncates.
  return pixels.mul(255.0f).clamp(0.0, 255.0).to(at::kByte);
}

void TorchDecoder::pack(const at::Tensor& bytes, PixelFormat format, uint8_t* out) {
  const at::Tensor rgb = bytes.permute({0, 2, 3, 1});  // N x H x W x 3
  const int64_t n = rgb.size(0), H = rgb.size(1), W = rgb.size(2);
  const PixelLayout layout = pixel_layout(format);
  try {
    // Packed into the pixel format: colour bytes where the layout puts them,
    // 255 in alpha and padding bytes.
    at::Tensor packed;
    if (layout.bytes_per_pixel == 3 && layout.r == 0 && layout.g == 1 && layout.b == 2) {
      packed = rgb;
    } else {
      packed = at::full({n, H, W, layout.bytes_per_pixel}, 255, rgb.options());
      packed.select(3, layout.r).copy_(rgb.select(3, 0));
      packed.select(3, layout.g).copy_(rgb.select(3, 1));
      packed.select(3, layout.b).copy_(rgb.select(3, 2));
    }
    at::Tensor dest = at::from_blob(out, {n, H, W, layout.bytes_per_pixel}, at::TensorOptions().dtype(at::kByte));
    dest.copy_(packed);
  } catch (const c10::Error& e) {
    throw VaeError(std::string("packing ") + std::to_string(n) + " decoded frames failed: " +
                   e.what_without_backtrace());
  }
}

ComputeReport TorchDecoder::decode(const LatentBatch& batch, const DecodeParams& params, PixelFormat format,
                                   uint8_t* out) {
  ComputeReport report{sub_batch_.load(), 0, {}};
  if (batch.empty()) return report;
  use_configured_threads();
  c10::InferenceMode guard;
  // Each sub-batch goes to bytes as it is done: one sub-batch of float pixels at a time.
  pack(run(batch, params, to_bytes, report), format, out);
  return report;
}

ComputeReport TorchDecoder::decode_float(const LatentBatch& batch, const DecodeParams& params, float* out) {
  ComputeReport report{sub_batch_.load(), 0, {}};
  if (batch.empty()) return report;
  use_configured_threads();
  c10::InferenceMode guard;
  const int64_t n = static_cast<int64_t>(batch.size());
  const int64_t H = batch.height() * info_.upscale, W = batch.width() * info_.upscale;
  at::Tensor pixels = run(batch, params, [](const at::Tensor& p) { return p; }, report);
  at::from_blob(out, {n, 3, H, W}, at::TensorOptions().dtype(at::kFloat)).copy_(pixels);
  return report;
}

}  // namespace gstvae
