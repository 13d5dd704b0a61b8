// Device batches (FrameBatch::add_device): frames referenced in place, as
// vaeencode does with GStreamer's CUDA memory. The same code path runs on
// host memory (DeviceFrame::device = -1) with the CPU target, so the pitch,
// crop, plane and channel arithmetic and the frames' lifetime are tested here
// against the host batch (FrameBatch::add), which the rest of the suite
// checks against the float64 references. On a GPU, CudaPaths.* (the GPU
// check) runs the CUDA side.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "encoder.h"
#include "errors.h"
#include "fixtures.h"
#include "frame.h"
#include "frame_storage.h"
#include "levers.h"
#include "torch_encoder.h"
#include "torch_model.h"

using namespace gstvae;
using namespace gstvae::test;

namespace {

class DeviceFrames : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    const std::string path = dir_->file("vae.safetensors");
    write_test_vae(path, VaeSpec{});
    encoder_ = load_encoder(path, cpu_fp32());
  }
  static void TearDownTestSuite() {
    encoder_.reset();
    delete dir_;
  }
  static TempDir* dir_;
  static std::shared_ptr<Encoder> encoder_;
};
TempDir* DeviceFrames::dir_ = nullptr;
std::shared_ptr<Encoder> DeviceFrames::encoder_;

// A packed RGBA frame in a pitched buffer (the pitch padded as CUDA's
// cuMemAllocPitch pads it, the padding filled with bytes that must not be read).
struct Pitched {
  std::vector<uint8_t> bytes;
  size_t pitch;
};

Pitched pitched_copy(const std::vector<uint8_t>& packed, int width, int height, int bpp, size_t pitch) {
  Pitched p{std::vector<uint8_t>(pitch * height, 0xAB), pitch};
  for (int y = 0; y < height; ++y)
    std::memcpy(p.bytes.data() + y * pitch, packed.data() + static_cast<size_t>(y) * width * bpp,
                static_cast<size_t>(width) * bpp);
  return p;
}

// The R, G, B planes of a packed RGB(x) frame, each in a pitched buffer of its own.
std::vector<Pitched> planes_of(const std::vector<uint8_t>& rgba, int width, int height, size_t pitch) {
  std::vector<Pitched> planes;
  for (int c = 0; c < 3; ++c) {
    Pitched p{std::vector<uint8_t>(pitch * height, 0xCD), pitch};
    for (int y = 0; y < height; ++y)
      for (int x = 0; x < width; ++x) p.bytes[y * pitch + x] = rgba[(static_cast<size_t>(y) * width + x) * 4 + c];
    planes.push_back(std::move(p));
  }
  return planes;
}

std::vector<float> encode(Encoder& enc, FrameBatch& batch) {
  std::vector<float> out(batch.size() * enc.latent_floats_per_frame(batch));
  enc.encode(batch, EncodeParams{}, out.data());
  return out;
}

ComputeTarget cpu_target() {
  ModelOptions o = cpu_fp32();
  return resolve_target(o);
}

}  // namespace

TEST_F(DeviceFrames, PackedPitchedFramesGiveTheHostBatchsPixelsAndLatents) {
  // 37x29: a crop offset in both directions (2, 2) and pitches wider than a row.
  const int w = 37, h = 29;
  for (PixelFormat f : {PixelFormat::RGBA, PixelFormat::BGRx, PixelFormat::xRGB, PixelFormat::ABGR}) {
    SCOPED_TRACE(pixel_format_name(f));
    std::vector<std::vector<uint8_t>> frames = {make_frame(w, h, 4, w * 4, 7), make_frame(w, h, 4, w * 4, 8)};
    auto host = encoder_->new_batch(f, w, h, 2);
    auto dev = encoder_->new_batch(f, w, h, 2, FrameMemory::Device);
    EXPECT_EQ(dev->memory(), FrameMemory::Device);
    EXPECT_EQ(dev->data(), nullptr) << "a device batch has no host staging";
    std::vector<Pitched> pitched;
    for (size_t i = 0; i < frames.size(); ++i) {
      host->add(frames[i].data(), w * 4, i);
      pitched.push_back(pitched_copy(frames[i], w, h, 4, 256));
      DeviceFrame df;
      df.planes[0] = pitched.back().bytes.data();
      df.strides[0] = pitched.back().pitch;
      dev->add_device(df, i, nullptr);
    }
    const ComputeTarget target = cpu_target();
    at::Tensor a = prepare_pixels(*host, target, true), b = prepare_pixels(*dev, target, true);
    ASSERT_EQ(a.sizes(), b.sizes());
    EXPECT_TRUE(at::equal(a, b)) << "max difference " << (a - b).abs().max().item<float>();
    EXPECT_EQ(encode(*encoder_, *host), encode(*encoder_, *dev));
  }
}

TEST_F(DeviceFrames, PlanarFramesGiveThePackedFramesLatents) {
  const int w = 40, h = 27;
  const std::vector<uint8_t> rgba = make_frame(w, h, 4, w * 4, 3);
  auto host = encoder_->new_batch(PixelFormat::RGBA, w, h, 1);
  host->add(rgba.data(), w * 4, 0);
  const std::vector<float> want = encode(*encoder_, *host);
  std::vector<Pitched> rgb = planes_of(rgba, w, h, 64);
  {
    auto dev = encoder_->new_batch(PixelFormat::RGBP, w, h, 1, FrameMemory::Device);
    DeviceFrame df;
    for (int p = 0; p < 3; ++p) df.planes[p] = rgb[p].bytes.data(), df.strides[p] = rgb[p].pitch;
    dev->add_device(df, 0, nullptr);
    EXPECT_EQ(encode(*encoder_, *dev), want);
  }
  {
    // BGRP: plane 0 is blue.
    auto dev = encoder_->new_batch(PixelFormat::BGRP, w, h, 1, FrameMemory::Device);
    DeviceFrame df;
    const int order[3] = {2, 1, 0};
    for (int p = 0; p < 3; ++p) df.planes[p] = rgb[order[p]].bytes.data(), df.strides[p] = rgb[order[p]].pitch;
    dev->add_device(df, 0, nullptr);
    EXPECT_EQ(encode(*encoder_, *dev), want);
    // The planes in RGB order read as BGRP are another image.
    auto swapped = encoder_->new_batch(PixelFormat::BGRP, w, h, 1, FrameMemory::Device);
    for (int p = 0; p < 3; ++p) df.planes[p] = rgb[p].bytes.data();
    swapped->add_device(df, 0, nullptr);
    EXPECT_NE(encode(*encoder_, *swapped), want);
  }
}

TEST_F(DeviceFrames, FramesAreKeptUntilTheBatchIsCleared) {
  const int w = 16, h = 16;
  std::vector<uint8_t> frame = make_frame(w, h, 4, w * 4, 1);
  auto released = std::make_shared<std::atomic<int>>(0);
  auto keeper = [released] {
    return std::shared_ptr<const void>(new int(0), [released](const void* p) {
      delete static_cast<const int*>(p);
      ++*released;
    });
  };
  auto batch = encoder_->new_batch(PixelFormat::RGBx, w, h, 2, FrameMemory::Device);
  DeviceFrame df;
  df.planes[0] = frame.data();
  df.strides[0] = w * 4;
  batch->add_device(df, 0, keeper());
  batch->add_device(df, 1, keeper());
  encoder_->prepare(*batch);
  encode(*encoder_, *batch);
  EXPECT_EQ(released->load(), 0) << "a frame was let go before its batch was done";
  batch->clear();
  EXPECT_EQ(released->load(), 2);
  batch->add_device(df, 2, keeper());
  batch.reset();
  EXPECT_EQ(released->load(), 3) << "the destructor lets the frames go";
}

TEST_F(DeviceFrames, BadFramesAreRefusedWithTheirFault) {
  const int w = 16, h = 16;
  std::vector<uint8_t> frame(w * h * 4);
  auto dev = encoder_->new_batch(PixelFormat::RGBA, w, h, 1, FrameMemory::Device);
  DeviceFrame df;
  EXPECT_TRUE(contains(error_of<VaeError>([&] { dev->add_device(df, 0, nullptr); }), "has no plane 0"));
  df.planes[0] = frame.data();
  df.strides[0] = w * 4 - 1;
  EXPECT_TRUE(contains(error_of<VaeError>([&] { dev->add_device(df, 0, nullptr); }), "row pitch of 63 bytes"));
  df.strides[0] = w * 4;
  df.foreign_context = true;
  EXPECT_TRUE(contains(error_of<VaeError>([&] { dev->add_device(df, 0, nullptr); }), "another CUDA context"));
  df.foreign_context = false;
  EXPECT_TRUE(contains(error_of<VaeError>([&] { dev->add(frame.data(), w * 4, 0); }), "device batch"));
  dev->add_device(df, 0, nullptr);
  EXPECT_TRUE(contains(error_of<VaeError>([&] { dev->add_device(df, 1, nullptr); }), "full"));
  auto host = encoder_->new_batch(PixelFormat::RGBA, w, h, 1);
  EXPECT_TRUE(contains(error_of<VaeError>([&] { host->add_device(df, 0, nullptr); }), "host batch"));
  // Planar frames only from device memory; their three planes are all needed.
  EXPECT_TRUE(contains(error_of<VaeError>([&] { encoder_->new_batch(PixelFormat::RGBP, w, h, 1); }),
                       "only from device memory"));
  auto planar = encoder_->new_batch(PixelFormat::RGBP, w, h, 1, FrameMemory::Device);
  df.strides[0] = w;
  EXPECT_TRUE(contains(error_of<VaeError>([&] { planar->add_device(df, 0, nullptr); }), "has no plane 1"));
}

TEST(DeviceFormats, PlanarFormatsAreDeviceOnly) {
  EXPECT_EQ(device_pixel_formats().size(), all_pixel_formats().size() + 2);
  for (const char* name : {"RGBP", "BGRP"}) {
    PixelFormat f = PixelFormat::RGB;
    ASSERT_TRUE(parse_pixel_format(name, &f)) << name;
    EXPECT_TRUE(pixel_format_planar(f));
    for (PixelFormat packed : all_pixel_formats()) EXPECT_NE(packed, f) << name << " is not a host format";
  }
  EXPECT_FALSE(pixel_format_planar(PixelFormat::RGBA));
}

// The CUDA side of the same path (run by the GPU check; skipped without a
// device): pitched frames in device memory, wrapped in place, prepared on the
// side stream, give the latents of the same frames uploaded from the host.
TEST_F(DeviceFrames, CudaFramesGiveTheUploadedFramesLatents) {
  if (!cuda_device_present()) GTEST_SKIP() << "no CUDA device (the GPU check runs this on one)";
  ModelOptions o = cpu_fp32();
  o.device = "cuda";
  std::shared_ptr<Encoder> enc = load_encoder(dir_->file("vae.safetensors"), o);
  const int w = 37, h = 29;
  const size_t pitch = 256;
  for (PixelFormat f : {PixelFormat::RGBA, PixelFormat::BGRx, PixelFormat::RGBP}) {
    SCOPED_TRACE(pixel_format_name(f));
    auto host = enc->new_batch(pixel_format_planar(f) ? PixelFormat::RGBx : f, w, h, 2);
    auto dev = enc->new_batch(f, w, h, 2, FrameMemory::Device);
    for (uint64_t i = 0; i < 2; ++i) {
      const std::vector<uint8_t> packed = make_frame(w, h, 4, w * 4, 20 + i);
      host->add(packed.data(), w * 4, i);
      std::vector<Pitched> planes;
      if (pixel_format_planar(f))
        planes = planes_of(packed, w, h, pitch);
      else
        planes.push_back(pitched_copy(packed, w, h, 4, pitch));
      DeviceFrame df;
      df.device = 0;
      auto keep = std::make_shared<std::vector<at::Tensor>>();
      for (size_t p = 0; p < planes.size(); ++p) {
        at::Tensor t = at::from_blob(planes[p].bytes.data(), {static_cast<int64_t>(planes[p].bytes.size())},
                                     at::TensorOptions().dtype(at::kByte))
                           .to(at::Device(at::kCUDA, 0));
        keep->push_back(t);
        df.planes[p] = t.data_ptr();
        df.strides[p] = planes[p].pitch;
      }
      dev->add_device(df, i, keep);
    }
    enc->prepare(*dev);  // the side stream, as the element does
    const std::vector<float> a = encode(*enc, *host), b = encode(*enc, *dev);
    ASSERT_EQ(a.size(), b.size());
    float worst = 0;
    for (size_t k = 0; k < a.size(); ++k) worst = std::max(worst, std::abs(a[k] - b[k]));
    EXPECT_LE(worst, 1e-5f);
    dev->clear();
  }
}
