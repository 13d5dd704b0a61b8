// Packed 8-bit video frames and the ComfyUI centre crop. No LibTorch in this
// header: the GStreamer glue fills FrameBatch objects directly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace gstvae {

// The packed 8-bit RGB layouts accepted, named as GStreamer names them.
enum class PixelFormat { RGB, BGR, RGBA, BGRA, ARGB, ABGR, RGBx, BGRx, xRGB, xBGR };

struct PixelLayout {
  int bytes_per_pixel;
  int r, g, b;  // byte offsets of the colour channels within a pixel
};

PixelLayout pixel_layout(PixelFormat format);
const char* pixel_format_name(PixelFormat format);
// Accepts the names above (case-sensitive, as in caps). Returns false if unknown.
bool parse_pixel_format(const std::string& name, PixelFormat* format);
const std::vector<PixelFormat>& all_pixel_formats();

// A region of a frame, in pixels.
struct Crop {
  int x = 0, y = 0, width = 0, height = 0;
};

// ComfyUI's vae_encode_crop_pixels: for each dimension d keep floor(d/m)*m
// pixels starting at (d mod m) / 2. Throws VaeError when the frame is
// smaller than `multiple` in either dimension.
Crop centre_crop(int width, int height, int multiple);

// Host staging for one batch: the cropped region of up to `capacity` frames,
// packed back to back (no row padding) in their original pixel format. This is
// the one copy a frame goes through on the host; conversion to floats happens
// on the compute device. Encoders create batches (page-locked memory when they
// run on a GPU).
class FrameBatch {
 public:
  FrameBatch(PixelFormat format, int width, int height, int multiple, size_t capacity,
             bool pinned = false);
  ~FrameBatch();
  FrameBatch(const FrameBatch&) = delete;
  FrameBatch& operator=(const FrameBatch&) = delete;

  // Copies the cropped region of a frame whose rows are `stride` bytes apart.
  // `index` is the frame's position in its stream (seeds sampling noise).
  void add(const uint8_t* pixels, size_t stride, uint64_t index);
  // Empties the batch for reuse (and forgets what Encoder::prepare made of it).
  void clear();

  PixelFormat format() const { return format_; }
  int frame_width() const { return width_; }
  int frame_height() const { return height_; }
  const Crop& crop() const { return crop_; }
  size_t size() const { return indices_.size(); }
  size_t capacity() const { return capacity_; }
  bool empty() const { return indices_.empty(); }
  bool full() const { return indices_.size() == capacity_; }
  const std::vector<uint64_t>& indices() const { return indices_; }
  size_t frame_bytes() const { return frame_bytes_; }
  const uint8_t* data() const;
  bool pinned() const;

  // LibTorch-side storage, opaque here.
  struct Storage;
  const Storage& storage() const { return *storage_; }
  Storage& storage() { return *storage_; }

 private:
  PixelFormat format_;
  int width_, height_;
  Crop crop_;
  size_t capacity_;
  size_t frame_bytes_;
  std::vector<uint64_t> indices_;
  std::unique_ptr<Storage> storage_;
};

// Host memory receiving a batch's latents: float32, frames x channels x h x w,
// row-major. Page-locked when the encoder runs on a GPU, so that the latents
// come back in one asynchronous device->host copy per batch. Encoders create
// blocks (Encoder::new_latents); the GStreamer glue wraps them in buffers.
class LatentBlock {
 public:
  LatentBlock(size_t floats, bool pinned);
  ~LatentBlock();
  LatentBlock(const LatentBlock&) = delete;
  LatentBlock& operator=(const LatentBlock&) = delete;

  float* data();
  // Waits until the values are in host memory: an encode may leave the copy
  // from the device in flight (GSTVAE_DOWNLOAD_OVERLAP) for the element to
  // wait on before it pushes. Returns at once otherwise. Throws VaeError if
  // the device reports an error. The destructor waits too.
  void wait_ready();
  bool has_pending_copy() const;
  size_t floats() const { return floats_; }
  size_t bytes() const { return floats_ * sizeof(float); }
  bool pinned() const;

  struct Storage;
  const Storage& storage() const { return *storage_; }
  Storage& storage() { return *storage_; }

 private:
  size_t floats_;
  std::unique_ptr<Storage> storage_;
};

}  // namespace gstvae
