// Packed 8-bit video frames and the ComfyUI centre crop. No LibTorch in this
// header: the GStreamer glue fills FrameBatch objects directly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace gstvae {

// The 8-bit RGB layouts accepted, named as GStreamer names them: packed ones
// (one plane), and the planar RGBP/BGRP (three planes of one byte per pixel),
// which cudaconvert gives and which come only as device frames.
enum class PixelFormat { RGB, BGR, RGBA, BGRA, ARGB, ABGR, RGBx, BGRx, xRGB, xBGR, RGBP, BGRP };

struct PixelLayout {
  int bytes_per_pixel;  // per plane: 1 for the planar formats
  int r, g, b;          // packed: byte offsets of the colour channels within a pixel; planar: plane numbers
};

PixelLayout pixel_layout(PixelFormat format);
const char* pixel_format_name(PixelFormat format);
bool pixel_format_planar(PixelFormat format);
// Accepts the names above (case-sensitive, as in caps). Returns false if unknown.
bool parse_pixel_format(const std::string& name, PixelFormat* format);
// The packed formats: what a host batch (FrameBatch::add) takes.
const std::vector<PixelFormat>& all_pixel_formats();
// What a device batch (FrameBatch::add_device) takes: the packed formats and RGBP, BGRP.
const std::vector<PixelFormat>& device_pixel_formats();

// Where a batch's frames are. Host: copied into the batch's host staging
// (then uploaded). Device: referenced where they are (GPU memory, e.g.
// GStreamer's CUDA memory) and read there, with no copy through the host.
enum class FrameMemory { Host, Device };

// One frame in memory the engine does not own, for FrameBatch::add_device: a
// CUDA device pointer per plane with its pitch (what mapping a GstCudaMemory
// with GST_MAP_CUDA gives), or, device = -1, host memory read through the same
// code path (the CPU target, and tests). Packed formats use plane 0; RGBP and
// BGRP planes 0, 1, 2 in the format's order.
struct DeviceFrame {
  int device = -1;  // CUDA device index; -1: host memory
  const void* planes[3] = {nullptr, nullptr, nullptr};
  size_t strides[3] = {0, 0, 0};  // bytes from one row to the next (the pitch)
  // The memory belongs to another CUDA context than LibTorch's (the device's
  // primary context): kernels here may not read it, so its cropped region is
  // copied device-to-device (cudaMemcpy2DAsync, which resolves the pointers
  // through unified addressing) at add time instead of being wrapped.
  bool foreign_context = false;
};

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
  // Host batches stage frames in host memory (page-locked with `pinned`);
  // device batches hold no staging, only references to their frames.
  FrameBatch(PixelFormat format, int width, int height, int multiple, size_t capacity,
             bool pinned = false, FrameMemory memory = FrameMemory::Host);
  ~FrameBatch();
  FrameBatch(const FrameBatch&) = delete;
  FrameBatch& operator=(const FrameBatch&) = delete;

  // Copies the cropped region of a frame whose rows are `stride` bytes apart.
  // `index` is the frame's position in its stream (seeds sampling noise).
  // Host batches only.
  void add(const uint8_t* pixels, size_t stride, uint64_t index);
  // Device batches only: references the cropped region of `frame` (views of
  // its planes on its device, no copy unless frame.foreign_context) and keeps
  // `keep` (what keeps that memory valid: the mapped GstBuffer) until the
  // batch is cleared or destroyed, and until then waits for the last kernel
  // reading the frame to finish. Throws VaeError for a frame whose planes are
  // missing or whose pitch is shorter than a row.
  void add_device(const DeviceFrame& frame, uint64_t index, std::shared_ptr<const void> keep);
  // Empties the batch for reuse (and forgets what Encoder::prepare made of it).
  // A device batch first waits until its frames have been read, then lets them go.
  void clear();

  PixelFormat format() const { return format_; }
  FrameMemory memory() const { return memory_; }
  int frame_width() const { return width_; }
  int frame_height() const { return height_; }
  const Crop& crop() const { return crop_; }
  size_t size() const { return indices_.size(); }
  size_t capacity() const { return capacity_; }
  bool empty() const { return indices_.empty(); }
  bool full() const { return indices_.size() == capacity_; }
  const std::vector<uint64_t>& indices() const { return indices_; }
  size_t frame_bytes() const { return frame_bytes_; }
  const uint8_t* data() const;  // host batches; null for device batches
  bool pinned() const;

  // LibTorch-side storage, opaque here.
  struct Storage;
  const Storage& storage() const { return *storage_; }
  Storage& storage() { return *storage_; }

 private:
  PixelFormat format_;
  FrameMemory memory_;
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
