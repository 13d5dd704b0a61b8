// The engine's public interface: load a VAE encoder from a checkpoint and turn
// batches of 8-bit frames into latents. No LibTorch and no GStreamer here.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "frame.h"
#include "latent_format.h"
#include "model.h"

namespace gstvae {

struct EncoderInfo {
  std::string family;      // "kl" (AutoencoderKL), "taesd", "wan2.1", "wan2.2", "taehv"
  std::string model_path;
  std::string layout;      // checkpoint key layout, e.g. "ldm", "diffusers"
  std::string device;      // resolved, e.g. "cpu", "cuda:0"
  Precision precision = Precision::F32;  // resolved, never Auto
  int downscale = 8;       // pixels per latent cell
  int latent_channels = 4;
  // Input frames per latent frame: 1 for image models; 4 for the causal video
  // VAEs, whose sessions regroup frames into the model's chunks (see
  // EncodeSession) and whose encode() refuses to run outside a session.
  int temporal_downscale = 1;
  bool input_signed = true;  // pixels fed as [-1, 1] (true) or [0, 1]
  // The latent space the forward pass outputs: raw for the KL VAEs; a tiny
  // autoencoder outputs its diffusion model's scaled space, which encode()
  // turns back into raw ones (ComfyUI: output / scale + shift) first.
  LatentFormat native_format;
  // The latent format ComfyUI's LATENT holds for this model, which tools use
  // when none is asked for: raw for most, "ltx2" (normalised with the
  // checkpoint's statistics) for LTX-2, whose ComfyUI encode normalises.
  std::string default_latent_format = "raw";
  int64_t parameters = 0;
  std::string architecture;  // human-readable summary of what was inferred
};

struct EncodeParams {
  bool sample = false;  // false: the Gaussian mean; true: mean + sigma * eps
  uint64_t seed = 0;    // with sample: noise of frame i depends on (seed, i) only
  LatentFormat latent_format;
  // Temporal models: the clip ends after this batch (EOS, a new stream, a caps
  // change, DISCONT). Frames held in an incomplete group are dropped, as every
  // reference drops them (BatchResult::dropped), or with pad_clip_end the group
  // is completed by repeating its last frame (one more latent, which no
  // reference gives). The session then starts a new clip. Image models: no effect.
  bool end_of_clip = false;
  bool pad_clip_end = false;
};

// A stream's state over a shared encoder: what a temporal family carries from
// batch to batch. Image families carry nothing: each frame gives one latent.
// One session per stream; used by one thread at a time.
class EncodeSession {
 public:
  virtual ~EncodeSession() = default;
  // The next frame starts a new clip (flush, caps change, DISCONT).
  virtual void reset() = 0;
  // Encodes `batch` into `out` (from Encoder::new_latents): result.spans.size()
  // latents, in order, each covering the frames its span names. A temporal
  // session emits a latent as soon as its group of frames is complete, keeps
  // the frames of an incomplete group for the next batch, and may be given an
  // empty batch (with params.end_of_clip) to end a clip.
  virtual BatchResult encode(const FrameBatch& batch, const EncodeParams& params, LatentBlock& out) = 0;
  // Frames received that no latent covers yet (an incomplete group); 0 for image models.
  virtual size_t held_frames() const { return 0; }
  // Bytes of state carried to the next batch (caches and held frames); 0 for
  // image models. Bounded by the frame size, never by the stream's length.
  virtual size_t state_bytes() const { return 0; }
};

class Encoder : public std::enable_shared_from_this<Encoder> {
 public:
  virtual ~Encoder() = default;
  virtual const EncoderInfo& info() const = 0;

  // A staging batch suited to this encoder (page-locked on GPUs); with
  // FrameMemory::Device, a batch of frames referenced in device memory
  // (FrameBatch::add_device), which must be the encoder's device.
  std::unique_ptr<FrameBatch> new_batch(PixelFormat format, int width, int height, size_t capacity,
                                        FrameMemory memory = FrameMemory::Host) const;
  // A block for the latents of `batch`'s frames (page-locked on GPUs): room
  // for max(batch.size(), 1) latents, which is what a session's encode() can
  // give for that batch (a temporal model's padded clip end included).
  std::unique_ptr<LatentBlock> new_latents(const FrameBatch& batch) const;

  // Optional: turns a filled batch into the encoder's input ahead of encode(),
  // so that it overlaps another batch's encode from another thread. On GPUs the
  // 8-bit frames are uploaded and converted on a side stream, asynchronously;
  // on the CPU they are converted. encode() uses (and waits for) the result;
  // adding a frame or clearing the batch drops it. Thread-safe.
  virtual void prepare(FrameBatch& batch) = 0;

  // Encodes every frame of `batch` into `out`, which must hold
  // batch.size() x latent_channels x (crop.height/downscale) x (crop.width/downscale)
  // float32 values, row-major. Thread-safe for distinct batches. On
  // out-of-memory the batch is split (and a lone frame tiled) rather than lost.
  virtual ComputeReport encode(const FrameBatch& batch, const EncodeParams& params, float* out) = 0;
  // The same into a block from new_latents(): on GPUs one asynchronous copy
  // into page-locked memory, waited for before returning.
  virtual ComputeReport encode(const FrameBatch& batch, const EncodeParams& params, LatentBlock& out) = 0;

  size_t latent_floats_per_frame(const FrameBatch& batch) const;

  // A session for one stream. It holds the encoder (which must be owned by a
  // shared_ptr, as load_encoder's are). The default: one latent per frame.
  virtual std::unique_ptr<EncodeSession> open_session();
};

// Detects the model family from the checkpoint's tensor names and loads it.
// Throws CheckpointError or VaeError with a message naming the path and the fault.
std::shared_ptr<Encoder> load_encoder(const std::string& path, const ModelOptions& options);

}  // namespace gstvae
