// The decoding direction: load a VAE decoder from a checkpoint and turn
// batches of latents into 8-bit frames, as ComfyUI's VAE.decode and SaveImage
// do. No LibTorch and no GStreamer here.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "frame.h"
#include "latent_format.h"
#include "model.h"

namespace gstvae {

struct DecoderInfo {
  std::string family;  // "kl", "taesd"
  std::string model_path;
  std::string layout;  // checkpoint key layout, e.g. "ldm", "diffusers", "taesd"
  std::string device;  // resolved, e.g. "cpu", "cuda:0"
  Precision precision = Precision::F32;  // resolved, never Auto
  int upscale = 8;  // pixels per latent cell
  int latent_channels = 4;
  // The latent space the forward pass takes: raw for the KL VAEs, the
  // diffusion model's scaled space for a tiny autoencoder (ComfyUI feeds it
  // (raw - shift) * scale).
  LatentFormat native_format;
  // Output range of the forward pass: [-1, 1] (true, the KL VAEs) or [0, 1].
  bool output_signed = true;
  // Frames per latent of a video decoder (4 for the Wan VAEs and TAEHV): in
  // a video stream the first latent of a clip gives 1 frame, every later one
  // this many. 1 for image decoders.
  int temporal_upscale = 1;
  // Whether a clip's first latent covers a whole group of frames of which
  // the decoder keeps only the last (TAEHV), rather than frame 0 alone (Wan):
  // then that frame takes the last of the latent's temporal_upscale parts.
  bool first_latent_keeps_last = false;
  int64_t parameters = 0;
  std::string architecture;  // human-readable summary of what was inferred
};

struct DecodeParams {
  // The format of the latents given; they are turned into raw ones first.
  LatentFormat latent_format;
};

// Host staging for a batch of latents to decode: up to `capacity` latents of
// channels x height x width float32 each, back to back. Page-locked when the
// decoder runs on a GPU. Decoders create batches (Decoder::new_batch).
class LatentBatch {
 public:
  LatentBatch(int channels, int height, int width, size_t capacity, bool pinned);
  ~LatentBatch();
  LatentBatch(const LatentBatch&) = delete;
  LatentBatch& operator=(const LatentBatch&) = delete;

  // Copies one latent (floats_per_latent() values). `index` is its position
  // in the stream.
  void add(const void* values, uint64_t index);
  void clear();

  int channels() const { return channels_; }
  int height() const { return height_; }
  int width() const { return width_; }
  size_t size() const { return indices_.size(); }
  size_t capacity() const { return capacity_; }
  bool empty() const { return indices_.empty(); }
  bool full() const { return indices_.size() == capacity_; }
  const std::vector<uint64_t>& indices() const { return indices_; }
  size_t floats_per_latent() const { return static_cast<size_t>(channels_) * height_ * width_; }
  const LatentBlock& block() const { return *values_; }

 private:
  int channels_, height_, width_;
  size_t capacity_;
  std::vector<uint64_t> indices_;
  std::unique_ptr<LatentBlock> values_;
};

// Host memory receiving decoded frames: packed 8-bit pixels in one pixel
// format, frame after frame, rows without padding. Page-locked on GPUs.
class PixelBlock {
 public:
  PixelBlock(size_t bytes, bool pinned);
  ~PixelBlock();
  PixelBlock(const PixelBlock&) = delete;
  PixelBlock& operator=(const PixelBlock&) = delete;

  uint8_t* data();
  size_t bytes() const { return bytes_; }
  bool pinned() const;

  struct Storage;
  const Storage& storage() const { return *storage_; }

 private:
  size_t bytes_;
  std::unique_ptr<Storage> storage_;
};

// A stream's state over a shared decoder (see EncodeSession). A video
// session carries the decoder's causal state from latent to latent: a clip
// cut into batches in any way gives the frames of the whole-clip decode.
class DecodeSession {
 public:
  virtual ~DecodeSession() = default;
  // The next latent starts a new clip.
  virtual void reset() = 0;
  // Decodes `batch` into `out` (from Decoder::new_pixels with this session's
  // frames per latent): result.spans.size() frames in `format`, each made
  // from the latent its span names (for a video session, one of its parts).
  virtual BatchResult decode(const LatentBatch& batch, const DecodeParams& params, PixelFormat format,
                             PixelBlock& out) = 0;
  // The same stopped before the 8 bits (see Decoder::decode_float): 3 x H x W
  // float32 per frame at `out`, room for batch.size() x frames per latent.
  virtual BatchResult decode_float(const LatentBatch& batch, const DecodeParams& params, float* out) = 0;
  // Bytes of state carried between batches (0 for image sessions).
  virtual size_t state_bytes() const { return 0; }
};

class Decoder : public std::enable_shared_from_this<Decoder> {
 public:
  virtual ~Decoder() = default;
  virtual const DecoderInfo& info() const = 0;

  std::unique_ptr<LatentBatch> new_batch(int height, int width, size_t capacity) const;
  // Room for the frames of every latent of `batch`, `frames_per_latent` each
  // (a video session's, see open_session).
  std::unique_ptr<PixelBlock> new_pixels(const LatentBatch& batch, PixelFormat format,
                                         int frames_per_latent = 1) const;
  size_t frame_bytes(const LatentBatch& batch, PixelFormat format) const;

  // Decodes every latent of `batch` into frames of (height x upscale) x
  // (width x upscale) pixels in `format` (alpha and padding bytes 255) at
  // `out`. Thread-safe for distinct batches. On out-of-memory the batch is
  // split, and a lone latent decoded tile by tile, rather than lost.
  virtual ComputeReport decode(const LatentBatch& batch, const DecodeParams& params, PixelFormat format,
                               uint8_t* out) = 0;
  ComputeReport decode(const LatentBatch& batch, const DecodeParams& params, PixelFormat format, PixelBlock& out);

  // The same decode stopped before the 8 bits: N x 3 x H x W float32 (planar
  // RGB) in [0, 1], ComfyUI's clamp((x + 1) / 2) of the forward pass, at
  // `out`. For cross-checks against a float reference (decode rounds these
  // values to bytes). Throws VaeError for a decoder that cannot provide it.
  virtual ComputeReport decode_float(const LatentBatch& batch, const DecodeParams& params, float* out);

  // Test hook: from now on, a forward pass over more than `latent_cells`
  // latent cells (latents x height x width) fails as an out-of-memory error
  // would, so that sub-batch halving and tiled decoding run on any machine.
  // 0 turns it off. Affects every holder of this (shared) decoder.
  virtual void set_test_memory_limit(int64_t latent_cells);

  // A session for one stream (holds the decoder). `frames_per_latent` 1: an
  // image stream, one frame per latent, each latent decoded alone (for a
  // video decoder, as the first latent of a clip: how Qwen-Image uses the
  // Wan 2.1 VAE). info().temporal_upscale of a video decoder: a video
  // stream. Throws VaeError for any other value.
  virtual std::unique_ptr<DecodeSession> open_session(int frames_per_latent = 1);
};

// Detects the decoder's family from the checkpoint's tensor names (and, for
// the tiny autoencoders, its file name, metadata or options.latent_space) and
// loads it; shares loaded decoders as load_encoder shares encoders. Throws
// CheckpointError or VaeError naming the path and the fault.
std::shared_ptr<Decoder> load_decoder(const std::string& path, const ModelOptions& options);

}  // namespace gstvae
