#include "frame.h"

#include <c10/core/impl/VirtualGuardImpl.h>

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
};

const FormatEntry& entry(PixelFormat format) {
  for (const auto& e : kFormats)
    if (e.format == format) return e;
  throw std::logic_error("unknown PixelFormat");
}

}  // namespace

PixelLayout pixel_layout(PixelFormat format) { return entry(format).layout; }
const char* pixel_format_name(PixelFormat format) { return entry(format).name; }

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
                       bool pinned)
    : format_(format), width_(width), height_(height), crop_(centre_crop(width, height, multiple)),
      capacity_(capacity), storage_(std::make_unique<Storage>()) {
  if (capacity == 0) throw VaeError("a frame batch needs a capacity of at least 1");
  const int bpp = pixel_layout(format).bytes_per_pixel;
  frame_bytes_ = static_cast<size_t>(crop_.width) * crop_.height * bpp;
  auto options = at::TensorOptions().dtype(at::kByte).pinned_memory(pinned);
  storage_->pixels = at::empty({static_cast<int64_t>(capacity), crop_.height, crop_.width, bpp}, options);
  indices_.reserve(capacity);
}

FrameBatch::~FrameBatch() = default;

const uint8_t* FrameBatch::data() const { return storage_->pixels.data_ptr<uint8_t>(); }
bool FrameBatch::pinned() const { return storage_->pixels.is_pinned(); }

void FrameBatch::add(const uint8_t* pixels, size_t stride, uint64_t index) {
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
