#include "frame.h"

#include <c10/core/impl/VirtualGuardImpl.h>

#if GSTVAE_TORCH_HAS_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

#include <cstring>

#include "errors.h"
#include "frame_storage.h"

namespace gstvae {

namespace {

struct FormatEntry {
  PixelFormat format;
  const char* name;
  PixelLayout layout;
};

const FormatEntry kFormats[] = {
    {PixelFormat::RGB, "RGB", {3, 0, 1, 2}},   {PixelFormat::BGR, "BGR", {3, 2, 1, 0}},
    {PixelFormat::RGBA, "RGBA", {4, 0, 1, 2}}, {PixelFormat::BGRA, "BGRA", {4, 2, 1, 0}},
    {PixelFormat::ARGB, "ARGB", {4, 1, 2, 3}}, {PixelFormat::ABGR, "ABGR", {4, 3, 2, 1}},
    {PixelFormat::RGBx, "RGBx", {4, 0, 1, 2}}, {PixelFormat::BGRx, "BGRx", {4, 2, 1, 0}},
    {PixelFormat::xRGB, "xRGB", {4, 1, 2, 3}}, {PixelFormat::xBGR, "xBGR", {4, 3, 2, 1}},
    // Planar: one byte per pixel and plane; r, g, b name the planes.
    {PixelFormat::RGBP, "RGBP", {1, 0, 1, 2}}, {PixelFormat::BGRP, "BGRP", {1, 2, 1, 0}},
};

const FormatEntry& entry(PixelFormat format) {
  for (const auto& e : kFormats)
    if (e.format == format) return e;
  throw std::logic_error("unknown PixelFormat");
}

}  // namespace

PixelLayout pixel_layout(PixelFormat format) { return entry(format).layout; }
const char* pixel_format_name(PixelFormat format) { return entry(format).name; }
bool pixel_format_planar(PixelFormat format) { return format == PixelFormat::RGBP || format == PixelFormat::BGRP; }

bool parse_pixel_format(const std::string& name, PixelFormat* format) {
  for (const auto& e : kFormats) {
    if (name == e.name) {
      *format = e.format;
      return true;
    }
  }
  return false;
}

const std::vector<PixelFormat>& all_pixel_formats() {
  static const std::vector<PixelFormat> formats = [] {
    std::vector<PixelFormat> v;
    for (const auto& e : kFormats)
      if (!pixel_format_planar(e.format)) v.push_back(e.format);
    return v;
  }();
  return formats;
}

const std::vector<PixelFormat>& device_pixel_formats() {
  static const std::vector<PixelFormat> formats = [] {
    std::vector<PixelFormat> v;
    for (const auto& e : kFormats) v.push_back(e.format);
    return v;
  }();
  return formats;
}

Crop centre_crop(int width, int height, int multiple) {
  if (multiple < 1) throw VaeError("crop multiple must be at least 1, got " + std::to_string(multiple));
  if (width < multiple || height < multiple)
    throw VaeError("frame of " + std::to_string(width) + "x" + std::to_string(height) +
                      " is smaller than the model's " + std::to_string(multiple) + "x" +
                      std::to_string(multiple) + " pixel minimum");
  Crop c;
  c.width = width / multiple * multiple;
  c.height = height / multiple * multiple;
  c.x = (width % multiple) / 2;
  c.y = (height % multiple) / 2;
  return c;
}

FrameBatch::FrameBatch(PixelFormat format, int width, int height, int multiple, size_t capacity,
                       bool pinned, FrameMemory memory)
    : format_(format), memory_(memory), width_(width), height_(height),
      crop_(centre_crop(width, height, multiple)), capacity_(capacity), storage_(std::make_unique<Storage>()) {
  if (capacity == 0) throw VaeError("a frame batch needs a capacity of at least 1");
  if (memory == FrameMemory::Host && pixel_format_planar(format))
    throw VaeError(std::string("planar ") + pixel_format_name(format) +
                   " frames are taken only from device memory (a device batch)");
  const int bpp = pixel_layout(format).bytes_per_pixel;
  frame_bytes_ = static_cast<size_t>(crop_.width) * crop_.height * bpp * (pixel_format_planar(format) ? 3 : 1);
  if (memory == FrameMemory::Host) {
    auto options = at::TensorOptions().dtype(at::kByte).pinned_memory(pinned);
    storage_->pixels = at::empty({static_cast<int64_t>(capacity), crop_.height, crop_.width, bpp}, options);
  } else {
    storage_->frames.reserve(capacity);
    storage_->keep.reserve(capacity);
  }
  indices_.reserve(capacity);
}

FrameBatch::~FrameBatch() { storage_->release_frames(); }

const uint8_t* FrameBatch::data() const {
  return storage_->pixels.defined() ? storage_->pixels.data_ptr<uint8_t>() : nullptr;
}
bool FrameBatch::pinned() const { return storage_->pixels.defined() && storage_->pixels.is_pinned(); }

namespace {

// `rows` x `cols` x `channels` bytes of a plane starting at `first`, rows
// `stride` bytes apart, on `device`: a view, no copy. Its extent ends at the
// last byte read, so a pitch wider than the crop reads nothing past the plane.
at::Tensor plane_view(const uint8_t* first, size_t stride, int rows, int cols, int channels,
                      const c10::Device& device) {
  // The device is given, so LibTorch does not ask the driver whose pointer it is.
  const int64_t sizes[] = {rows, cols, channels};
  const int64_t strides[] = {static_cast<int64_t>(stride), channels, 1};
  return at::for_blob(const_cast<uint8_t*>(first), sizes)
      .strides(strides)
      .target_device(device)
      .options(at::TensorOptions().dtype(at::kByte).device(device))
      .make_tensor();
}

// A copy of a plane region of another CUDA context into LibTorch's memory on
// `device`, made by the copy engine from the pointer (unified addressing
// tells the driver whose memory it is), waited for here: the frame's memory
// is then no longer read.
at::Tensor copy_foreign_plane(const uint8_t* first, size_t stride, int rows, int cols, int channels,
                              const c10::Device& device) {
#if GSTVAE_TORCH_HAS_CUDA
  c10::cuda::CUDAGuard guard(device);
  at::Tensor dst = at::empty({rows, cols, channels}, at::TensorOptions().dtype(at::kByte).device(device));
  const size_t row_bytes = static_cast<size_t>(cols) * channels;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  cudaError_t err = cudaMemcpy2DAsync(dst.data_ptr<uint8_t>(), row_bytes, first, stride, row_bytes, rows,
                                      cudaMemcpyDefault, stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess)
    throw VaeError(std::string("copying a frame from another CUDA context failed: ") + cudaGetErrorString(err));
  return dst;
#else
  (void)first, (void)stride, (void)rows, (void)cols, (void)channels;
  throw VaeError("a frame in CUDA memory (" + device.str() + ") reached an engine built without CUDA");
#endif
}

}  // namespace

void FrameBatch::add_device(const DeviceFrame& frame, uint64_t index, std::shared_ptr<const void> keep) {
  if (memory_ != FrameMemory::Device) throw VaeError("a frame in device memory was added to a host batch");
  if (full()) throw VaeError("frame batch is full (" + std::to_string(capacity_) + " frames)");
  const PixelLayout layout = pixel_layout(format_);
  const bool planar = pixel_format_planar(format_);
  const int planes = planar ? 3 : 1;
  for (int p = 0; p < planes; ++p) {
    if (!frame.planes[p])
      throw VaeError(std::string("device frame of format ") + pixel_format_name(format_) + " has no plane " +
                     std::to_string(p));
    if (frame.strides[p] < static_cast<size_t>(width_) * layout.bytes_per_pixel)
      throw VaeError("row pitch of " + std::to_string(frame.strides[p]) + " bytes in plane " + std::to_string(p) +
                     " is shorter than a " + std::to_string(width_) + "-pixel " + pixel_format_name(format_) + " row");
  }
  if (frame.device < -1) throw VaeError("device frame names device " + std::to_string(frame.device));
  const c10::Device device = frame.device < 0 ? c10::Device(c10::kCPU)
                                              : c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(frame.device));
  if (frame.foreign_context && !device.is_cuda())
    throw VaeError("a host-memory frame cannot belong to another CUDA context");
  const int bpp = layout.bytes_per_pixel;
  auto region = [&](int p) {
    const uint8_t* first = static_cast<const uint8_t*>(frame.planes[p]) +
                           static_cast<size_t>(crop_.y) * frame.strides[p] + static_cast<size_t>(crop_.x) * bpp;
    return frame.foreign_context ? copy_foreign_plane(first, frame.strides[p], crop_.height, crop_.width, bpp, device)
                                 : plane_view(first, frame.strides[p], crop_.height, crop_.width, bpp, device);
  };
  std::array<at::Tensor, 3> rgb;
  try {
    if (planar) {
      // Plane k holds the channel whose layout index is k.
      rgb = {region(layout.r).select(2, 0), region(layout.g).select(2, 0), region(layout.b).select(2, 0)};
    } else {
      at::Tensor packed = region(0);
      rgb = {packed.select(2, layout.r), packed.select(2, layout.g), packed.select(2, layout.b)};
    }
  } catch (const c10::Error& e) {
    throw VaeError(std::string("wrapping a device frame failed: ") + e.what_without_backtrace());
  }
  if (!storage_->frames.empty() && storage_->frames.front()[0].device() != device)
    throw VaeError("frames of one batch must be on one device: " + storage_->frames.front()[0].device().str() +
                   ", then " + device.str());
  storage_->forget_prepared();
  storage_->frames.push_back(std::move(rgb));
  storage_->keep.push_back(std::move(keep));
  indices_.push_back(index);
}

void FrameBatch::Storage::mark_frames_read(const c10::Device& device) {
  if (frames.empty() || !device.is_cuda()) return;
  // An earlier read (a prepare that was dropped) may be on another stream.
  if (frames_read) frames_read->synchronize();
  c10::impl::VirtualGuardImpl impl(device.type());
  frames_read = std::make_unique<c10::Event>(device.type());
  frames_read->record(impl.getStream(device));
}

void FrameBatch::Storage::release_frames() noexcept {
  try {
    if (frames_read) frames_read->synchronize();
  } catch (...) {
    // A failed device: its kernels are gone; the memory may go too.
  }
  frames_read.reset();
  frames.clear();
  keep.clear();  // last: the views above point into what these keep
}

void FrameBatch::add(const uint8_t* pixels, size_t stride, uint64_t index) {
  if (memory_ != FrameMemory::Host) throw VaeError("a frame in host memory was added to a device batch");
  if (full())
    throw VaeError("frame batch is full (" + std::to_string(capacity_) + " frames)");
  const int bpp = pixel_layout(format_).bytes_per_pixel;
  if (stride < static_cast<size_t>(width_) * bpp)
    throw VaeError("row stride of " + std::to_string(stride) + " bytes is shorter than a " +
                      std::to_string(width_) + "-pixel " + pixel_format_name(format_) + " row");
  const size_t row_bytes = static_cast<size_t>(crop_.width) * bpp;
  uint8_t* dst = storage_->pixels.data_ptr<uint8_t>() + indices_.size() * frame_bytes_;
  const uint8_t* src = pixels + static_cast<size_t>(crop_.y) * stride + static_cast<size_t>(crop_.x) * bpp;
  if (stride == row_bytes) {
    std::memcpy(dst, src, frame_bytes_);
  } else {
    for (int row = 0; row < crop_.height; ++row)
      std::memcpy(dst + row * row_bytes, src + row * stride, row_bytes);
  }
  storage_->forget_prepared();
  indices_.push_back(index);
}

void FrameBatch::clear() {
  indices_.clear();
  storage_->forget_prepared();
  storage_->release_frames();
}

LatentBlock::LatentBlock(size_t floats, bool pinned) : floats_(floats), storage_(std::make_unique<Storage>()) {
  storage_->values = at::empty({static_cast<int64_t>(floats)},
                               at::TensorOptions().dtype(at::kFloat).pinned_memory(pinned));
}

LatentBlock::~LatentBlock() {
  // A copy still in flight writes into values: it must end before they go.
  try {
    wait_ready();
  } catch (...) {
  }
}

void LatentBlock::wait_ready() {
  if (!storage_->ready) return;
  std::unique_ptr<c10::Event> ready = std::move(storage_->ready);
  try {
    ready->synchronize();
  } catch (const c10::Error& e) {
    throw VaeError(std::string("waiting for the latents' copy from the device failed: ") +
                   e.what_without_backtrace());
  }
}

bool LatentBlock::has_pending_copy() const { return storage_->ready != nullptr; }

void finish_download(const c10::Device& device, LatentBlock* block) {
  c10::impl::VirtualGuardImpl impl(device.type());
  const c10::Stream stream = impl.getStream(device);
  if (!block) {
    stream.synchronize();
    return;
  }
  block->storage().ready = std::make_unique<c10::Event>(device.type());
  block->storage().ready->record(stream);
}

float* LatentBlock::data() { return storage_->values.data_ptr<float>(); }
bool LatentBlock::pinned() const { return storage_->values.is_pinned(); }

}  // namespace gstvae
