// The engine through its public, LibTorch-free interface: key normalisation,
// the centre crop, pixel formats, frame batches, latent formats, and loading
// and running KL encoders from generated random-weight checkpoints.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "checkpoint_keys.h"
#include "decoder.h"
#include "encoder.h"
#include "errors.h"
#include "fixtures.h"
#include "frame.h"
#include "latent_file.h"
#include "latent_format.h"
#include "levers.h"
#include "model_cache.h"
#include "safetensors.h"

namespace gstvae {
namespace {

using test::contains;
using test::error_of;
using test::TempDir;
using test::VaeSpec;

// ============================================================ key normalisation

// A representative set of encoder tensors in LDM naming, plus decoder ones.
const std::vector<std::string> kLdmEncoderNames = {
    "encoder.conv_in.weight",
    "encoder.conv_in.bias",
    "encoder.down.0.block.0.norm1.weight",
    "encoder.down.0.block.1.conv2.bias",
    "encoder.down.0.downsample.conv.weight",
    "encoder.down.1.block.0.nin_shortcut.weight",
    "encoder.down.1.block.0.nin_shortcut.bias",
    "encoder.down.3.block.1.norm2.bias",
    "encoder.mid.block_1.conv1.weight",
    "encoder.mid.block_2.norm2.weight",
    "encoder.mid.attn_1.norm.weight",
    "encoder.mid.attn_1.q.weight",
    "encoder.mid.attn_1.k.bias",
    "encoder.mid.attn_1.v.weight",
    "encoder.mid.attn_1.proj_out.weight",
    "encoder.norm_out.weight",
    "encoder.norm_out.bias",
    "encoder.conv_out.weight",
    "quant_conv.weight",
    "quant_conv.bias",
};
const std::vector<std::string> kLdmDecoderNames = {
    "decoder.conv_in.weight", "decoder.up.0.block.0.conv1.weight", "decoder.mid.attn_1.q.weight",
    "post_quant_conv.weight", "post_quant_conv.bias",
};

TEST(NormalizeKeys, LdmIsIdentityAndIgnoresDecoder) {
  std::vector<std::string> names = kLdmEncoderNames;
  names.insert(names.end(), kLdmDecoderNames.begin(), kLdmDecoderNames.end());
  const NormalizedKeys k = normalize_vae_keys(names, "vae.safetensors");
  EXPECT_EQ(k.prefix, "");
  EXPECT_EQ(k.layout, "ldm");
  EXPECT_EQ(k.source.size(), kLdmEncoderNames.size());
  for (const auto& n : kLdmEncoderNames) {
    ASSERT_TRUE(k.has(n)) << n;
    EXPECT_EQ(k.source.at(n), n);
  }
  for (const auto& n : kLdmDecoderNames) EXPECT_FALSE(k.has(n)) << n;
}

TEST(NormalizeKeys, PrefixedFirstStageModelAndVae) {
  for (const std::string prefix : {"first_stage_model.", "vae."}) {
    SCOPED_TRACE(prefix);
    std::vector<std::string> names;
    for (const auto& n : kLdmEncoderNames) names.push_back(prefix + n);
    for (const auto& n : kLdmDecoderNames) names.push_back(prefix + n);
    names.push_back("model.diffusion_model.input_blocks.0.0.weight");
    names.push_back("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight");
    names.push_back("encoder.something_unprefixed");  // outside the VAE prefix: ignored
    const NormalizedKeys k = normalize_vae_keys(names, "full.safetensors");
    EXPECT_EQ(k.prefix, prefix);
    EXPECT_EQ(k.layout, "ldm");
    EXPECT_EQ(k.source.size(), kLdmEncoderNames.size());
    for (const auto& n : kLdmEncoderNames) {
      ASSERT_TRUE(k.has(n)) << n;
      EXPECT_EQ(k.source.at(n), prefix + n);
    }
    EXPECT_FALSE(k.has("encoder.something_unprefixed"));
  }
}

// diffusers name -> canonical LDM name.
const std::vector<std::pair<std::string, std::string>> kDiffusersCommon = {
    {"encoder.conv_in.weight", "encoder.conv_in.weight"},
    {"encoder.conv_in.bias", "encoder.conv_in.bias"},
    {"encoder.down_blocks.0.resnets.0.norm1.weight", "encoder.down.0.block.0.norm1.weight"},
    {"encoder.down_blocks.0.resnets.1.conv1.bias", "encoder.down.0.block.1.conv1.bias"},
    {"encoder.down_blocks.0.resnets.1.norm2.bias", "encoder.down.0.block.1.norm2.bias"},
    {"encoder.down_blocks.0.resnets.0.conv2.weight", "encoder.down.0.block.0.conv2.weight"},
    {"encoder.down_blocks.0.downsamplers.0.conv.weight", "encoder.down.0.downsample.conv.weight"},
    {"encoder.down_blocks.2.downsamplers.0.conv.bias", "encoder.down.2.downsample.conv.bias"},
    {"encoder.down_blocks.1.resnets.0.conv_shortcut.weight", "encoder.down.1.block.0.nin_shortcut.weight"},
    {"encoder.down_blocks.12.resnets.10.conv_shortcut.bias", "encoder.down.12.block.10.nin_shortcut.bias"},
    {"encoder.mid_block.resnets.0.norm1.weight", "encoder.mid.block_1.norm1.weight"},
    {"encoder.mid_block.resnets.0.conv2.bias", "encoder.mid.block_1.conv2.bias"},
    {"encoder.mid_block.resnets.1.conv1.weight", "encoder.mid.block_2.conv1.weight"},
    {"encoder.mid_block.resnets.1.conv_shortcut.weight", "encoder.mid.block_2.nin_shortcut.weight"},
    {"encoder.mid_block.attentions.0.group_norm.weight", "encoder.mid.attn_1.norm.weight"},
    {"encoder.mid_block.attentions.0.group_norm.bias", "encoder.mid.attn_1.norm.bias"},
    {"encoder.conv_norm_out.weight", "encoder.norm_out.weight"},
    {"encoder.conv_norm_out.bias", "encoder.norm_out.bias"},
    {"encoder.conv_out.weight", "encoder.conv_out.weight"},
    {"quant_conv.weight", "quant_conv.weight"},
    {"quant_conv.bias", "quant_conv.bias"},
};
const std::vector<std::pair<std::string, std::string>> kDiffusersNewAttention = {
    {"encoder.mid_block.attentions.0.to_q.weight", "encoder.mid.attn_1.q.weight"},
    {"encoder.mid_block.attentions.0.to_q.bias", "encoder.mid.attn_1.q.bias"},
    {"encoder.mid_block.attentions.0.to_k.weight", "encoder.mid.attn_1.k.weight"},
    {"encoder.mid_block.attentions.0.to_v.bias", "encoder.mid.attn_1.v.bias"},
    {"encoder.mid_block.attentions.0.to_out.0.weight", "encoder.mid.attn_1.proj_out.weight"},
    {"encoder.mid_block.attentions.0.to_out.0.bias", "encoder.mid.attn_1.proj_out.bias"},
};
const std::vector<std::pair<std::string, std::string>> kDiffusersOldAttention = {
    {"encoder.mid_block.attentions.0.query.weight", "encoder.mid.attn_1.q.weight"},
    {"encoder.mid_block.attentions.0.query.bias", "encoder.mid.attn_1.q.bias"},
    {"encoder.mid_block.attentions.0.key.weight", "encoder.mid.attn_1.k.weight"},
    {"encoder.mid_block.attentions.0.value.bias", "encoder.mid.attn_1.v.bias"},
    {"encoder.mid_block.attentions.0.proj_attn.weight", "encoder.mid.attn_1.proj_out.weight"},
    {"encoder.mid_block.attentions.0.proj_attn.bias", "encoder.mid.attn_1.proj_out.bias"},
};
const std::vector<std::string> kDiffusersDecoderNames = {
    "decoder.conv_in.weight", "decoder.up_blocks.0.resnets.0.conv1.weight",
    "decoder.mid_block.attentions.0.to_q.weight", "decoder.conv_norm_out.weight", "post_quant_conv.weight",
};

void check_diffusers(const std::vector<std::pair<std::string, std::string>>& attention, const std::string& prefix) {
  std::vector<std::pair<std::string, std::string>> pairs = kDiffusersCommon;
  pairs.insert(pairs.end(), attention.begin(), attention.end());
  std::vector<std::string> names;
  for (const auto& p : pairs) names.push_back(prefix + p.first);
  for (const auto& n : kDiffusersDecoderNames) names.push_back(prefix + n);
  const NormalizedKeys k = normalize_vae_keys(names, "diffusers.safetensors");
  EXPECT_EQ(k.prefix, prefix);
  EXPECT_EQ(k.layout, "diffusers");
  EXPECT_EQ(k.source.size(), pairs.size());
  for (const auto& p : pairs) {
    ASSERT_TRUE(k.has(p.second)) << p.first << " -> " << p.second;
    EXPECT_EQ(k.source.at(p.second), prefix + p.first);
  }
  for (const auto& kv : k.source) {
    EXPECT_FALSE(contains(kv.first, "decoder")) << kv.first;
    EXPECT_FALSE(contains(kv.first, "post_quant_conv")) << kv.first;
  }
}

TEST(NormalizeKeys, DiffusersNewAttentionNames) { check_diffusers(kDiffusersNewAttention, ""); }
TEST(NormalizeKeys, DiffusersOldAttentionNames) { check_diffusers(kDiffusersOldAttention, ""); }
TEST(NormalizeKeys, DiffusersUnderVaePrefix) { check_diffusers(kDiffusersNewAttention, "vae."); }

TEST(NormalizeKeys, NoEncoderIsAnError) {
  const std::string m1 = error_of<CheckpointError>([] { normalize_vae_keys(kLdmDecoderNames, "dec-only.st"); });
  EXPECT_TRUE(contains(m1, "dec-only.st")) << m1;
  EXPECT_TRUE(contains(m1, "encoder.conv_in.weight")) << m1;
  EXPECT_THROW(normalize_vae_keys({}, "empty"), CheckpointError);
  // An encoder without conv_in is not recognised either.
  std::vector<std::string> names(kLdmEncoderNames.begin() + 2, kLdmEncoderNames.end());
  EXPECT_THROW(normalize_vae_keys(names, "x"), CheckpointError);
  // Wrong prefix.
  EXPECT_THROW(normalize_vae_keys({"model.encoder.conv_in.weight"}, "x"), CheckpointError);
}

TEST(NormalizeKeys, TwoNamesForOneTensorIsAnError) {
  std::vector<std::string> names;
  for (const auto& p : kDiffusersCommon) names.push_back(p.first);
  names.push_back("encoder.mid_block.attentions.0.to_q.weight");
  names.push_back("encoder.mid_block.attentions.0.query.weight");
  const std::string m = error_of<CheckpointError>([&] { normalize_vae_keys(names, "dup.st"); });
  EXPECT_TRUE(contains(m, "dup.st")) << m;
  EXPECT_TRUE(contains(m, "encoder.mid.attn_1.q.weight")) << m;
  EXPECT_TRUE(contains(m, "to_q")) << m;
  EXPECT_TRUE(contains(m, "query")) << m;
}

// ============================================================ centre crop

TEST(CentreCrop, ComfyUIRule) {
  Crop c = centre_crop(512, 519, 8);  // H=519 keeps rows 3..514
  EXPECT_EQ(c.y, 3);
  EXPECT_EQ(c.height, 512);
  EXPECT_EQ(c.x, 0);
  EXPECT_EQ(c.width, 512);

  c = centre_crop(513, 513, 8);  // the odd pixel goes from the bottom/right
  EXPECT_EQ(c.y, 0);
  EXPECT_EQ(c.height, 512);
  EXPECT_EQ(c.x, 0);
  EXPECT_EQ(c.width, 512);

  c = centre_crop(45, 37, 8);
  EXPECT_EQ(c.x, 2);
  EXPECT_EQ(c.width, 40);
  EXPECT_EQ(c.y, 2);
  EXPECT_EQ(c.height, 32);

  c = centre_crop(8, 8, 8);
  EXPECT_EQ(c.x, 0);
  EXPECT_EQ(c.y, 0);
  EXPECT_EQ(c.width, 8);
  EXPECT_EQ(c.height, 8);

  c = centre_crop(15, 1927, 8);  // 7 spare columns -> 3 left, 4 right
  EXPECT_EQ(c.x, 3);
  EXPECT_EQ(c.width, 8);
  EXPECT_EQ(c.y, 3);
  EXPECT_EQ(c.height, 1920);

  c = centre_crop(1920, 1080, 8);
  EXPECT_EQ(c.x, 0);
  EXPECT_EQ(c.y, 0);
  EXPECT_EQ(c.width, 1920);
  EXPECT_EQ(c.height, 1080);

  c = centre_crop(37, 21, 16);
  EXPECT_EQ(c.x, 2);
  EXPECT_EQ(c.width, 32);
  EXPECT_EQ(c.y, 2);
  EXPECT_EQ(c.height, 16);
}

TEST(CentreCrop, ExhaustiveAgainstFormula) {
  for (int m : {1, 2, 8, 16}) {
    for (int d = m; d < 80; ++d) {
      const Crop c = centre_crop(d, d + 3, m);
      ASSERT_EQ(c.width, d / m * m) << d;
      ASSERT_EQ(c.x, (d % m) / 2) << d;
      ASSERT_EQ(c.height, (d + 3) / m * m) << d;
      ASSERT_EQ(c.y, ((d + 3) % m) / 2) << d;
      ASSERT_LE(c.x + c.width, d);
      ASSERT_LE(c.y + c.height, d + 3);
    }
  }
}

TEST(CentreCrop, TooSmallFrameIsAnError) {
  std::string m = error_of<VaeError>([] { centre_crop(7, 64, 8); });
  EXPECT_TRUE(contains(m, "7x64")) << m;
  m = error_of<VaeError>([] { centre_crop(64, 7, 8); });
  EXPECT_TRUE(contains(m, "64x7")) << m;
  EXPECT_THROW(centre_crop(7, 7, 8), VaeError);
  EXPECT_THROW(centre_crop(0, 0, 8), VaeError);
  EXPECT_THROW(centre_crop(-5, 64, 8), VaeError);
}

// ============================================================ pixel formats

TEST(PixelFormats, NamesRoundTrip) {
  const std::vector<std::string> expected = {"RGB", "BGR", "RGBA", "BGRA", "ARGB",
                                             "ABGR", "RGBx", "BGRx", "xRGB", "xBGR"};
  ASSERT_EQ(all_pixel_formats().size(), 10u);
  std::set<std::string> seen;
  for (PixelFormat f : all_pixel_formats()) {
    const std::string name = pixel_format_name(f);
    seen.insert(name);
    PixelFormat parsed = PixelFormat::RGB;
    ASSERT_TRUE(parse_pixel_format(name, &parsed)) << name;
    EXPECT_EQ(parsed, f) << name;
  }
  EXPECT_EQ(seen, std::set<std::string>(expected.begin(), expected.end()));
  for (const auto& bad : {"rgb", "RGBX", "I420", "", "RGB ", "NV12", "BGRA64"}) {
    PixelFormat f = PixelFormat::xBGR;
    EXPECT_FALSE(parse_pixel_format(bad, &f)) << bad;
    EXPECT_EQ(f, PixelFormat::xBGR) << "output changed on failure for " << bad;
  }
}

TEST(PixelFormats, Layouts) {
  struct Expect {
    PixelFormat f;
    int bpp, r, g, b;
  };
  const Expect expected[] = {
      {PixelFormat::RGB, 3, 0, 1, 2},  {PixelFormat::BGR, 3, 2, 1, 0},  {PixelFormat::RGBA, 4, 0, 1, 2},
      {PixelFormat::BGRA, 4, 2, 1, 0}, {PixelFormat::ARGB, 4, 1, 2, 3}, {PixelFormat::ABGR, 4, 3, 2, 1},
      {PixelFormat::RGBx, 4, 0, 1, 2}, {PixelFormat::BGRx, 4, 2, 1, 0}, {PixelFormat::xRGB, 4, 1, 2, 3},
      {PixelFormat::xBGR, 4, 3, 2, 1},
  };
  for (const auto& e : expected) {
    SCOPED_TRACE(pixel_format_name(e.f));
    const PixelLayout l = pixel_layout(e.f);
    EXPECT_EQ(l.bytes_per_pixel, e.bpp);
    EXPECT_EQ(l.r, e.r);
    EXPECT_EQ(l.g, e.g);
    EXPECT_EQ(l.b, e.b);
  }
}

// ============================================================ frame batches

TEST(FrameBatch, AddWithStrideCopiesTheCrop) {
  const int w = 45, h = 37;
  const PixelFormat fmt = PixelFormat::BGRx;
  const int bpp = 4;
  FrameBatch batch(fmt, w, h, 8, 3);
  EXPECT_EQ(batch.format(), fmt);
  EXPECT_EQ(batch.frame_width(), w);
  EXPECT_EQ(batch.frame_height(), h);
  EXPECT_EQ(batch.crop().x, 2);
  EXPECT_EQ(batch.crop().y, 2);
  EXPECT_EQ(batch.crop().width, 40);
  EXPECT_EQ(batch.crop().height, 32);
  EXPECT_EQ(batch.frame_bytes(), size_t{40} * 32 * bpp);
  EXPECT_EQ(batch.capacity(), 3u);
  EXPECT_TRUE(batch.empty());
  EXPECT_FALSE(batch.full());
  EXPECT_FALSE(batch.pinned());

  const size_t strides[3] = {w * bpp + 12, w * bpp, w * bpp + 1};  // padded, tight, odd
  std::vector<std::vector<uint8_t>> frames;
  for (int i = 0; i < 3; ++i) frames.push_back(test::make_frame(w, h, bpp, strides[i], 100 + i));
  const uint64_t indices[3] = {7, 8, 42};
  for (int i = 0; i < 3; ++i) {
    batch.add(frames[i].data(), strides[i], indices[i]);
    EXPECT_EQ(batch.size(), static_cast<size_t>(i + 1));
  }
  EXPECT_TRUE(batch.full());
  EXPECT_EQ(batch.indices(), (std::vector<uint64_t>{7, 8, 42}));

  for (int i = 0; i < 3; ++i) {
    SCOPED_TRACE(i);
    const uint8_t* got = batch.data() + i * batch.frame_bytes();
    for (int y = 0; y < 32; ++y) {
      const uint8_t* src = frames[i].data() + (y + 2) * strides[i] + 2 * bpp;
      ASSERT_EQ(std::memcmp(got + y * 40 * bpp, src, 40 * bpp), 0) << "row " << y;
    }
  }

  // Past capacity.
  const std::string m = error_of<VaeError>([&] { batch.add(frames[0].data(), strides[0], 99); });
  EXPECT_TRUE(contains(m, "full")) << m;
  EXPECT_EQ(batch.size(), 3u);

  // clear() empties it; the next frame lands in slot 0.
  batch.clear();
  EXPECT_TRUE(batch.empty());
  EXPECT_FALSE(batch.full());
  EXPECT_EQ(batch.size(), 0u);
  EXPECT_TRUE(batch.indices().empty());
  batch.add(frames[2].data(), strides[2], 5);
  EXPECT_EQ(batch.indices(), std::vector<uint64_t>{5});
  for (int y = 0; y < 32; ++y) {
    const uint8_t* src = frames[2].data() + (y + 2) * strides[2] + 2 * bpp;
    ASSERT_EQ(std::memcmp(batch.data() + y * 40 * bpp, src, 40 * bpp), 0) << "row " << y;
  }
}

TEST(FrameBatch, TightRowsWithVerticalCropOnly) {
  // Width already a multiple of 8: rows are contiguous, only rows are cropped.
  const int w = 64, h = 50;  // crop y = 1, height 48
  FrameBatch batch(PixelFormat::RGB, w, h, 8, 1);
  EXPECT_EQ(batch.crop().x, 0);
  EXPECT_EQ(batch.crop().y, 1);
  EXPECT_EQ(batch.crop().height, 48);
  const auto frame = test::make_frame(w, h, 3, w * 3, 9);
  batch.add(frame.data(), w * 3, 0);
  ASSERT_EQ(batch.frame_bytes(), size_t{64} * 48 * 3);
  EXPECT_EQ(std::memcmp(batch.data(), frame.data() + w * 3, batch.frame_bytes()), 0);
}

TEST(FrameBatch, Errors) {
  FrameBatch batch(PixelFormat::RGBA, 16, 16, 8, 2);
  const auto frame = test::make_frame(16, 16, 4, 64, 1);
  const std::string m = error_of<VaeError>([&] { batch.add(frame.data(), 63, 0); });
  EXPECT_TRUE(contains(m, "63")) << m;
  EXPECT_TRUE(batch.empty());
  // A stride for RGB is too short for RGBA.
  EXPECT_THROW(batch.add(frame.data(), 48, 0), VaeError);
  EXPECT_THROW(FrameBatch(PixelFormat::RGB, 16, 16, 8, 0), VaeError);  // capacity 0
  EXPECT_THROW(FrameBatch(PixelFormat::RGB, 7, 16, 8, 1), VaeError);   // too small
  EXPECT_THROW(FrameBatch(PixelFormat::RGB, 16, 4, 8, 1), VaeError);
}

// ============================================================ latent formats

TEST(LatentFormats, KnownValues) {
  struct Expect {
    const char* name;
    double scale, shift;
  };
  const Expect expected[] = {
      {"raw", 1.0, 0.0}, {"sd15", 0.18215, 0.0}, {"sdxl", 0.13025, 0.0}, {"sd3", 1.5305, 0.0609}, {"flux", 0.3611, 0.1159},
  };
  ASSERT_EQ(known_latent_formats().size(), 8u);
  for (size_t i = 0; i < 5; ++i) {
    const auto& e = expected[i];
    SCOPED_TRACE(e.name);
    EXPECT_EQ(known_latent_formats()[i].name, e.name);
    const LatentFormat f = latent_format_by_name(e.name);
    EXPECT_EQ(f.name, e.name);
    EXPECT_DOUBLE_EQ(f.scale, e.scale);
    EXPECT_DOUBLE_EQ(f.shift, e.shift);
    EXPECT_EQ(f.is_raw(), std::string(e.name) == "raw");
  }
  EXPECT_TRUE(LatentFormat{}.is_raw());
  const LatentFormat c = custom_latent_format(0.5, 0.25);
  EXPECT_EQ(c.name, "custom");
  EXPECT_DOUBLE_EQ(c.scale, 0.5);
  EXPECT_DOUBLE_EQ(c.shift, 0.25);
  EXPECT_FALSE(c.is_raw());
  EXPECT_TRUE(custom_latent_format(1.0, 0.0).is_raw());

  // The video VAEs' per-channel normalisation (x - mean_c) / std_c: first and
  // last values of the published tables.
  const LatentFormat w21 = latent_format_by_name("wan21"), w22 = latent_format_by_name("wan22");
  ASSERT_TRUE(w21.per_channel() && w22.per_channel());
  EXPECT_FALSE(w21.is_raw());
  ASSERT_EQ(w21.shifts.size(), 16u);
  ASSERT_EQ(w22.shifts.size(), 48u);
  EXPECT_DOUBLE_EQ(w21.shift_of(0), -0.7571);
  EXPECT_DOUBLE_EQ(w21.scale_of(15), 1.0 / 1.9160);
  EXPECT_DOUBLE_EQ(w22.shift_of(0), -0.2289);
  EXPECT_DOUBLE_EQ(w22.shift_of(47), -0.0667);
  EXPECT_DOUBLE_EQ(w22.scale_of(0), 1.0 / 0.4765);
  EXPECT_DOUBLE_EQ(w22.scale_of(47), 1.0 / 0.7744);
  EXPECT_TRUE(w21.fits(16));
  EXPECT_FALSE(w21.fits(4));
  EXPECT_TRUE(latent_format_by_name("sd15").fits(4));

  // ltx2: per channel with the checkpoint's own statistics, which only the
  // LTX-2 encoder fills in; unresolved it is neither raw nor a table.
  const LatentFormat ltx2 = latent_format_by_name("ltx2");
  EXPECT_TRUE(ltx2.from_model);
  EXPECT_FALSE(ltx2.is_raw());
  EXPECT_FALSE(ltx2.per_channel());
}

TEST(LatentFormats, UnknownNameListsKnownOnes) {
  const std::string m = error_of<VaeError>([] { latent_format_by_name("sd21"); });
  EXPECT_TRUE(contains(m, "'sd21'")) << m;
  for (const char* n : {"raw", "sd15", "sdxl", "sd3", "flux"}) EXPECT_TRUE(contains(m, n)) << m;
  EXPECT_THROW(latent_format_by_name(""), VaeError);
  EXPECT_THROW(latent_format_by_name("SD15"), VaeError);
}

TEST(Precision, Names) {
  EXPECT_STREQ(precision_name(Precision::Auto), "auto");
  EXPECT_STREQ(precision_name(Precision::F32), "fp32");
  EXPECT_STREQ(precision_name(Precision::F16), "fp16");
  EXPECT_STREQ(precision_name(Precision::BF16), "bf16");
}

// ============================================================ encoders

// Checkpoints are written once per spec into one scratch directory.
class Models {
 public:
  static Models& get() {
    static Models m;
    return m;
  }
  std::string path(const std::string& key, const VaeSpec& spec, const std::string& ext = ".safetensors") {
    const std::string p = dir_.file(key + ext);
    if (!written_.count(p)) {
      test::write_test_vae(p, spec);
      written_.insert(p);
    }
    return p;
  }
  std::shared_ptr<Encoder> encoder(const std::string& key, const VaeSpec& spec) {
    auto it = encoders_.find(key);
    if (it != encoders_.end()) return it->second;
    ModelOptions o;
    o.device = "cpu";
    auto e = load_encoder(path(key, spec), o);
    encoders_[key] = e;
    return e;
  }

 private:
  TempDir dir_;
  std::set<std::string> written_;
  std::map<std::string, std::shared_ptr<Encoder>> encoders_;
};

VaeSpec small_spec(const std::string& layout = "ldm", uint64_t seed = 1) {
  VaeSpec s;
  s.ch = 32;
  s.mult = {1, 1, 2, 2};
  s.blocks = 1;
  s.layout = layout;
  s.seed = seed;
  return s;
}

std::shared_ptr<Encoder> ldm_encoder() { return Models::get().encoder("ldm", small_spec()); }

struct Frame {
  std::vector<uint8_t> pixels;
  size_t stride;
};

// Encodes `frames` (of `format`, w x h) as one batch with the given indices.
std::vector<float> encode_frames(Encoder& enc, PixelFormat format, int w, int h, const std::vector<Frame>& frames,
                                 const std::vector<uint64_t>& indices, const EncodeParams& params = {}) {
  auto batch = enc.new_batch(format, w, h, frames.size());
  for (size_t i = 0; i < frames.size(); ++i) batch->add(frames[i].pixels.data(), frames[i].stride, indices[i]);
  const size_t n = frames.size() * enc.latent_floats_per_frame(*batch);
  std::vector<float> out(n + 16, std::numeric_limits<float>::quiet_NaN());
  enc.encode(*batch, params, out.data());
  for (size_t i = n; i < out.size(); ++i) EXPECT_TRUE(std::isnan(out[i])) << "encode wrote past its output at " << i;
  out.resize(n);
  return out;
}

std::vector<uint64_t> iota(size_t n, uint64_t start = 0) {
  std::vector<uint64_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = start + i;
  return v;
}

std::vector<Frame> rgb_frames(int w, int h, size_t n, uint64_t seed = 1000) {
  std::vector<Frame> f;
  for (size_t i = 0; i < n; ++i) f.push_back({test::make_frame(w, h, 3, w * 3, seed + i), static_cast<size_t>(w) * 3});
  return f;
}

// The same colours as an RGB frame in another layout; the 4th byte (alpha or
// padding) gets unrelated values.
Frame convert(const Frame& rgb, int w, int h, PixelFormat format, size_t extra_stride = 0) {
  const PixelLayout l = pixel_layout(format);
  Frame out;
  out.stride = static_cast<size_t>(w) * l.bytes_per_pixel + extra_stride;
  out.pixels.assign(out.stride * h, 0x5a);
  for (int y = 0; y < h; ++y) {
    for (int x = 0; x < w; ++x) {
      const uint8_t* s = rgb.pixels.data() + y * rgb.stride + x * 3;
      uint8_t* d = out.pixels.data() + y * out.stride + x * l.bytes_per_pixel;
      if (l.bytes_per_pixel == 4) d[0] = d[1] = d[2] = d[3] = static_cast<uint8_t>(x * 31 + y * 17);
      d[l.r] = s[0];
      d[l.g] = s[1];
      d[l.b] = s[2];
    }
  }
  return out;
}

bool all_finite(const std::vector<float>& v) {
  return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, static_cast<double>(std::fabs(x)));
  return m;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) m = std::max(m, static_cast<double>(std::fabs(a[i] - b[i])));
  return m;
}

// Number of encoder-side parameters in a checkpoint, counted from the file.
int64_t encoder_parameters(const std::string& path) {
  SafetensorsFile f(path);
  int64_t n = 0;
  for (const auto& kv : f.tensors()) {
    const std::string& name = kv.first;
    for (const char* p : {"", "first_stage_model.", "vae."}) {
      const std::string a = std::string(p) + "encoder.", b = std::string(p) + "quant_conv.";
      if (name.compare(0, a.size(), a) == 0 || name.compare(0, b.size(), b) == 0) n += kv.second.numel();
    }
  }
  return n;
}

TEST(LoadEncoder, InfoFields) {
  auto enc = ldm_encoder();
  const EncoderInfo& i = enc->info();
  EXPECT_EQ(i.family, "kl");
  EXPECT_EQ(i.model_path, Models::get().path("ldm", small_spec()));
  EXPECT_EQ(i.layout, "ldm");
  EXPECT_EQ(i.device, "cpu");
  EXPECT_EQ(i.precision, Precision::F32);
  EXPECT_EQ(i.downscale, 8);
  EXPECT_EQ(i.latent_channels, 4);
  EXPECT_TRUE(i.input_signed);
  EXPECT_EQ(i.parameters, encoder_parameters(i.model_path));
  EXPECT_GT(i.parameters, 100000);
  EXPECT_TRUE(contains(i.architecture, "32, 32, 64, 64")) << i.architecture;
  EXPECT_TRUE(contains(i.architecture, "base width 32")) << i.architecture;
  EXPECT_TRUE(contains(i.architecture, "z=4")) << i.architecture;
  EXPECT_TRUE(contains(i.architecture, "quant_conv")) << i.architecture;
  EXPECT_FALSE(contains(i.architecture, "no quant_conv")) << i.architecture;
  std::cout << "[ info     ] " << i.architecture << ", " << i.parameters << " parameters\n";
}

TEST(LoadEncoder, AutoDeviceAndPrecisionOnCpu) {
  ModelOptions o;  // device auto, precision auto
  auto enc = load_encoder(Models::get().path("ldm", small_spec()), o);
  if (enc->info().device != "cpu") GTEST_SKIP() << "LibTorch has a CUDA device: " << enc->info().device;
  EXPECT_EQ(enc->info().precision, Precision::F32);
}

TEST(LoadEncoder, EveryLayoutLoadsAndGivesTheSameLatents) {
  const auto frames = rgb_frames(64, 48, 2);
  EncodeParams sample;
  sample.sample = true;
  sample.seed = 3;
  const auto ref = encode_frames(*ldm_encoder(), PixelFormat::RGB, 64, 48, frames, {0, 1});
  const auto ref_sample = encode_frames(*ldm_encoder(), PixelFormat::RGB, 64, 48, frames, {0, 1}, sample);
  ASSERT_EQ(ref.size(), 2u * 4 * 6 * 8);
  ASSERT_TRUE(all_finite(ref));
  const std::map<std::string, std::string> expected_layout = {
      {"first_stage_model", "ldm under 'first_stage_model.'"},
      {"vae", "ldm under 'vae.'"},
      {"diffusers", "diffusers"},
      {"diffusers_old", "diffusers"},
  };
  for (const auto& [layout, description] : expected_layout) {
    SCOPED_TRACE(layout);
    auto enc = Models::get().encoder(layout, small_spec(layout));
    EXPECT_EQ(enc->info().layout, description);
    EXPECT_EQ(enc->info().parameters, ldm_encoder()->info().parameters);
    EXPECT_EQ(enc->info().architecture, ldm_encoder()->info().architecture);
    EXPECT_EQ(encode_frames(*enc, PixelFormat::RGB, 64, 48, frames, {0, 1}), ref);
    EXPECT_EQ(encode_frames(*enc, PixelFormat::RGB, 64, 48, frames, {0, 1}, sample), ref_sample);
  }
}

TEST(LoadEncoder, DifferentSeedDifferentWeights) {
  const auto frames = rgb_frames(32, 24, 1);
  auto other = Models::get().encoder("ldm-seed2", small_spec("ldm", 2));
  EXPECT_NE(encode_frames(*other, PixelFormat::RGB, 32, 24, frames, {0}),
            encode_frames(*ldm_encoder(), PixelFormat::RGB, 32, 24, frames, {0}));
}

TEST(LoadEncoder, Z16WithoutQuantConv) {
  VaeSpec s = small_spec();
  s.z = 16;
  s.quant_conv = false;
  auto enc = Models::get().encoder("z16", s);
  EXPECT_EQ(enc->info().latent_channels, 16);
  EXPECT_EQ(enc->info().downscale, 8);
  EXPECT_TRUE(contains(enc->info().architecture, "z=16")) << enc->info().architecture;
  EXPECT_TRUE(contains(enc->info().architecture, "no quant_conv")) << enc->info().architecture;
  EXPECT_EQ(enc->info().parameters, encoder_parameters(enc->info().model_path));
  const auto out = encode_frames(*enc, PixelFormat::RGB, 32, 24, rgb_frames(32, 24, 2), {0, 1});
  EXPECT_EQ(out.size(), 2u * 16 * 3 * 4);
  EXPECT_TRUE(all_finite(out));
}

TEST(LoadEncoder, ArchitectureIsReadFromTheWeights) {
  // Two levels (downscale 2), two blocks per level, wider base.
  VaeSpec s = small_spec();
  s.ch = 64;
  s.mult = {1, 2};
  s.blocks = 2;
  s.include_decoder = false;
  auto enc = Models::get().encoder("two-levels", s);
  EXPECT_EQ(enc->info().downscale, 2);
  EXPECT_TRUE(contains(enc->info().architecture, "levels [64, 128]")) << enc->info().architecture;
  EXPECT_TRUE(contains(enc->info().architecture, "2 blocks per level")) << enc->info().architecture;
  EXPECT_EQ(enc->info().parameters, encoder_parameters(enc->info().model_path));
  auto batch = enc->new_batch(PixelFormat::RGB, 9, 7, 1);
  EXPECT_EQ(batch->crop().width, 8);
  EXPECT_EQ(batch->crop().height, 6);
  EXPECT_EQ(enc->latent_floats_per_frame(*batch), 4u * 3 * 4);
  const auto out = encode_frames(*enc, PixelFormat::RGB, 9, 7, rgb_frames(9, 7, 1), {0});
  EXPECT_TRUE(all_finite(out));

  // Three levels: downscale 4.
  VaeSpec t = small_spec("vae");
  t.mult = {1, 2, 4};
  auto enc3 = Models::get().encoder("three-levels", t);
  EXPECT_EQ(enc3->info().downscale, 4);
  EXPECT_TRUE(contains(enc3->info().architecture, "levels [32, 64, 128]")) << enc3->info().architecture;
  EXPECT_EQ(encode_frames(*enc3, PixelFormat::RGB, 16, 12, rgb_frames(16, 12, 1), {0}).size(), 4u * 3 * 4);
}

TEST(LoadEncoder, HalfPrecisionWeightFiles) {
  const auto frames = rgb_frames(64, 48, 2);
  const auto ref = encode_frames(*ldm_encoder(), PixelFormat::RGB, 64, 48, frames, {0, 1});
  for (DType dtype : {DType::F16, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dtype));
    VaeSpec s = small_spec("diffusers");
    s.dtype = dtype;
    const std::string key = std::string("ldm-") + dtype_name(dtype);
    const std::string path = Models::get().path(key, s);
    {
      SafetensorsFile f(path);
      for (const auto& kv : f.tensors()) ASSERT_EQ(kv.second.dtype, dtype) << kv.first;
    }
    auto enc = Models::get().encoder(key, s);
    EXPECT_EQ(enc->info().precision, Precision::F32);  // weights are upcast
    EXPECT_EQ(enc->info().parameters, ldm_encoder()->info().parameters);
    const auto out = encode_frames(*enc, PixelFormat::RGB, 64, 48, frames, {0, 1});
    ASSERT_EQ(out.size(), ref.size());
    ASSERT_TRUE(all_finite(out));
    // Same weights up to rounding: close, but not identical.
    const double tol = (dtype == DType::F16 ? 0.02 : 0.1) * std::max(1.0, max_abs(ref));
    EXPECT_LT(max_abs_diff(out, ref), tol) << "max |ref| " << max_abs(ref);
    EXPECT_NE(out, ref);
  }
}

TEST(LoadEncoder, FirstStageModelWithUnrelatedI64Tensor) {
  const std::string path = Models::get().path("first_stage_model", small_spec("first_stage_model"));
  SafetensorsFile f(path);
  bool has_i64 = false, has_unet = false;
  for (const auto& kv : f.tensors()) {
    if (kv.second.dtype == DType::I64) has_i64 = true;
    if (kv.first.rfind("model.diffusion_model.", 0) == 0) has_unet = true;
  }
  EXPECT_TRUE(has_i64);
  EXPECT_TRUE(has_unet);
  EXPECT_NO_THROW(Models::get().encoder("first_stage_model", small_spec("first_stage_model")));
}

// ---------------------------------------------------------------- load errors

std::string load_error(const std::string& path, const ModelOptions& o = [] {
  ModelOptions c;
  c.device = "cpu";
  return c;
}()) {
  return error_of<CheckpointError>([&] { load_encoder(path, o); });
}

TEST(LoadEncoderErrors, MissingTensorIsNamed) {
  for (const std::string layout : {"ldm", "diffusers"}) {
    SCOPED_TRACE(layout);
    VaeSpec s = small_spec(layout);
    s.drop = {"encoder.conv_out.weight"};
    const std::string path = Models::get().path("drop-conv_out-" + layout, s);
    const std::string m = load_error(path);
    EXPECT_TRUE(contains(m, "encoder.conv_out.weight")) << m;
    EXPECT_TRUE(contains(m, path)) << m;
  }
  // Missing pieces deeper in the network.
  for (const std::string name : {"encoder.down.2.block.0.nin_shortcut.weight", "encoder.mid.attn_1.proj_out.bias",
                                 "encoder.down.1.downsample.conv.bias", "quant_conv.bias", "encoder.norm_out.weight"}) {
    SCOPED_TRACE(name);
    VaeSpec s = small_spec();
    s.drop = {name};
    const std::string m = load_error(Models::get().path("drop-" + name, s));
    EXPECT_TRUE(contains(m, name)) << m;
  }
}

TEST(LoadEncoderErrors, WrongShapeIsNamedWithBothShapes) {
  {
    VaeSpec s = small_spec();
    s.reshape["encoder.down.0.block.0.conv1.weight"] = {32, 16, 3, 3};
    const std::string m = load_error(Models::get().path("reshape-conv1", s));
    EXPECT_TRUE(contains(m, "encoder.down.0.block.0.conv1.weight")) << m;
    EXPECT_TRUE(contains(m, "[32, 16, 3, 3]")) << m;
    EXPECT_TRUE(contains(m, "[32, 32, 3, 3]")) << m;
  }
  {
    // diffusers: the stored name is reported (with the canonical one).
    VaeSpec s = small_spec("diffusers");
    s.reshape["encoder.mid.attn_1.v.weight"] = {64, 32};
    const std::string m = load_error(Models::get().path("reshape-diffusers-v", s));
    EXPECT_TRUE(contains(m, "encoder.mid_block.attentions.0.to_v.weight")) << m;
    EXPECT_TRUE(contains(m, "[64, 32]")) << m;
    EXPECT_TRUE(contains(m, "[64, 64, 1, 1]")) << m;
  }
  {
    VaeSpec s = small_spec();
    s.reshape["encoder.conv_in.bias"] = {31};
    const std::string m = load_error(Models::get().path("reshape-bias", s));
    EXPECT_TRUE(contains(m, "encoder.conv_in.bias")) << m;
    EXPECT_TRUE(contains(m, "[31]")) << m;
    EXPECT_TRUE(contains(m, "[32]")) << m;
  }
  {
    VaeSpec s = small_spec();
    s.reshape["encoder.conv_in.weight"] = {32, 4, 3, 3};  // RGBA input is not a VAE
    const std::string m = load_error(Models::get().path("reshape-conv_in", s));
    EXPECT_TRUE(contains(m, "encoder.conv_in.weight")) << m;
    EXPECT_TRUE(contains(m, "[32, 4, 3, 3]")) << m;
  }
  {
    VaeSpec s = small_spec();
    s.reshape["encoder.conv_out.weight"] = {7, 64, 3, 3};  // odd channel count
    const std::string m = load_error(Models::get().path("reshape-conv_out", s));
    EXPECT_TRUE(contains(m, "encoder.conv_out.weight")) << m;
    EXPECT_TRUE(contains(m, "[7, 64, 3, 3]")) << m;
  }
  {
    // A quant_conv that does not match z.
    VaeSpec s = small_spec();
    s.reshape["quant_conv.weight"] = {16, 16, 1, 1};
    const std::string m = load_error(Models::get().path("reshape-quant", s));
    EXPECT_TRUE(contains(m, "quant_conv.weight")) << m;
    EXPECT_TRUE(contains(m, "[8, 8, 1, 1]")) << m;
  }
}

TEST(LoadEncoderErrors, GroupNormWidthNotMultipleOf32) {
  VaeSpec s = small_spec();
  s.ch = 16;
  const std::string m = load_error(Models::get().path("ch16", s));
  EXPECT_TRUE(contains(m, "GroupNorm")) << m;
  EXPECT_TRUE(contains(m, "16 channels")) << m;
}

TEST(LoadEncoderErrors, UnsupportedWeightDtype) {
  // Rewrite a generated file with one encoder tensor's bytes relabelled I32.
  TempDir dir;
  const std::string src = Models::get().path("ldm", small_spec());
  const std::string dst = dir.file("i32.safetensors");
  {
    SafetensorsFile f(src);
    std::vector<TensorToWrite> tensors;
    for (const auto& kv : f.tensors()) {
      const TensorInfo& t = kv.second;
      tensors.push_back({t.name, t.name == "encoder.mid.attn_1.k.weight" ? DType::I32 : t.dtype, t.shape, f.data(t)});
    }
    write_safetensors(dst, tensors);
  }
  const std::string m = load_error(dst);
  EXPECT_TRUE(contains(m, "encoder.mid.attn_1.k.weight")) << m;
  EXPECT_TRUE(contains(m, "I32")) << m;
}

TEST(LoadEncoderErrors, PickleCheckpointsAreRefused) {
  TempDir dir;
  // A genuine safetensors file under a pickle extension.
  const std::string good = Models::get().path("ldm", small_spec());
  for (const char* ext : {".ckpt", ".pt", ".pth", ".bin"}) {
    const std::string p = dir.file(std::string("model") + ext);
    std::ifstream in(good, std::ios::binary);
    test::write_bytes(p, std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()));
    const std::string m = load_error(p);
    EXPECT_TRUE(contains(m, "pickle")) << ext << ": " << m;
    EXPECT_TRUE(contains(m, p)) << m;
  }
  // Content sniffing: a zip archive (torch.save) and a raw pickle stream.
  const std::string zip = dir.file("zip.safetensors");
  test::write_bytes(zip, std::string("PK\x03\x04", 4) + std::string(100, '\0'));
  EXPECT_TRUE(contains(load_error(zip), "pickle")) << load_error(zip);
  const std::string raw = dir.file("raw.safetensors");
  test::write_bytes(raw, std::string("\x80\x02}q\x00(X", 7) + std::string(50, 'a'));
  EXPECT_TRUE(contains(load_error(raw), "pickle")) << load_error(raw);
}

TEST(LoadEncoderErrors, NotACheckpoint) {
  TempDir dir;
  EXPECT_TRUE(contains(load_error(""), "no model file")) << load_error("");
  const std::string missing = dir.file("missing.safetensors");
  EXPECT_TRUE(contains(load_error(missing), missing)) << load_error(missing);
  EXPECT_TRUE(contains(load_error(dir.path()), "not a regular file")) << load_error(dir.path());
  const std::string text = dir.file("text.safetensors");
  test::write_bytes(text, "hello, this is not a safetensors file at all");
  EXPECT_TRUE(contains(load_error(text), text)) << load_error(text);
  const std::string empty = dir.file("empty.safetensors");
  test::write_bytes(empty, "");
  EXPECT_TRUE(contains(load_error(empty), "empty")) << load_error(empty);
}

TEST(LoadEncoderErrors, FileWithoutEncoder) {
  TempDir dir;
  const std::string p = dir.file("decoder-only.safetensors");
  std::vector<float> w(4 * 4, 0.5f);
  write_safetensors(p, {{"decoder.conv_in.weight", DType::F32, {4, 4, 1, 1}, w.data()},
                        {"post_quant_conv.weight", DType::F32, {4, 4, 1, 1}, w.data()}});
  const std::string m = load_error(p);
  EXPECT_TRUE(contains(m, "no supported VAE encoder")) << m;
  EXPECT_TRUE(contains(m, "2 tensors")) << m;

  // An encoder without its attention block is not a KL VAE encoder.
  VaeSpec s = small_spec();
  s.drop = {"encoder.mid.attn_1.norm.weight"};
  EXPECT_TRUE(contains(load_error(Models::get().path("no-attn-norm", s)), "no supported VAE encoder"));
}

// ---------------------------------------------------------------- devices

std::string device_error(const std::string& device, Precision precision = Precision::Auto) {
  ModelOptions o;
  o.device = device;
  o.precision = precision;
  return error_of<VaeError>([&] { load_encoder(Models::get().path("ldm", small_spec()), o); });
}

TEST(Devices, CudaRequestWithoutCudaIsAnError) {
  if (ldm_encoder()->info().device != "cpu") GTEST_SKIP();
  ModelOptions o;
  if (load_encoder(Models::get().path("ldm", small_spec()), o)->info().device != "cpu")
    GTEST_SKIP() << "CUDA is available";
  for (const char* d : {"cuda", "cuda:0", "cuda:1"}) {
    const std::string m = device_error(d);
    EXPECT_TRUE(contains(m, std::string("'") + d + "'")) << m;
    EXPECT_TRUE(contains(m, "CUDA")) << m;
  }
}

TEST(Devices, InvalidDeviceNames) {
  for (const char* d : {"gpu", "CPU", "", "cuda:x", "cuda:-1", "cuda:12345", "cuda0", "cpu:0", "mps", "cuda:1a"}) {
    const std::string m = device_error(d);
    EXPECT_TRUE(contains(m, std::string("'") + d + "'")) << "device " << d << ": " << m;
    EXPECT_TRUE(contains(m, "not valid")) << "device " << d << ": " << m;
  }
}

TEST(Devices, CudaWithEmptyIndexIsInvalid) {
  // "cuda:" names no device: it must be refused as malformed (like "cuda:x"),
  // not taken for "cuda" (cuda:0).
  const std::string m = device_error("cuda:");
  EXPECT_TRUE(contains(m, "'cuda:'")) << m;
  EXPECT_TRUE(contains(m, "not valid")) << m;
}

TEST(Devices, ExplicitCpuFp32) {
  ModelOptions o;
  o.device = "cpu";
  o.precision = Precision::F32;
  auto enc = load_encoder(Models::get().path("ldm", small_spec()), o);
  EXPECT_EQ(enc->info().device, "cpu");
  EXPECT_EQ(enc->info().precision, Precision::F32);
  const auto frames = rgb_frames(32, 24, 1);
  EXPECT_EQ(encode_frames(*enc, PixelFormat::RGB, 32, 24, frames, {0}),
            encode_frames(*ldm_encoder(), PixelFormat::RGB, 32, 24, frames, {0}));
}

TEST(Devices, ReducedPrecisionOnCpuWorksOrFailsAtLoad) {
  const auto frames = rgb_frames(32, 24, 1);
  const auto ref = encode_frames(*ldm_encoder(), PixelFormat::RGB, 32, 24, frames, {0});
  for (Precision p : {Precision::F16, Precision::BF16}) {
    SCOPED_TRACE(precision_name(p));
    ModelOptions o;
    o.device = "cpu";
    o.precision = p;
    std::shared_ptr<Encoder> enc;
    try {
      enc = load_encoder(Models::get().path("ldm", small_spec()), o);
    } catch (const VaeError& e) {
      std::cout << "[ info     ] " << precision_name(p) << " on CPU fails at load: " << e.what() << "\n";
      EXPECT_TRUE(contains(e.what(), precision_name(p))) << e.what();
      continue;
    }
    std::cout << "[ info     ] " << precision_name(p) << " on CPU works\n";
    EXPECT_EQ(enc->info().precision, p);
    const auto out = encode_frames(*enc, PixelFormat::RGB, 32, 24, frames, {0});
    ASSERT_EQ(out.size(), ref.size());
    EXPECT_TRUE(all_finite(out));
    EXPECT_LT(max_abs_diff(out, ref), 0.25 * std::max(1.0, max_abs(ref)));
  }
}

// ---------------------------------------------------------------- encode

TEST(Encode, OutputSizeAndNewBatch) {
  auto enc = ldm_encoder();
  auto batch = enc->new_batch(PixelFormat::RGBA, 45, 37, 3);
  EXPECT_EQ(batch->capacity(), 3u);
  EXPECT_EQ(batch->crop().width, 40);
  EXPECT_EQ(batch->crop().height, 32);
  EXPECT_FALSE(batch->pinned());
  EXPECT_EQ(enc->latent_floats_per_frame(*batch), 4u * 4 * 5);
  std::vector<Frame> frames;
  for (int i = 0; i < 3; ++i) frames.push_back({test::make_frame(45, 37, 4, 45 * 4, i), 45 * 4});
  const auto out = encode_frames(*enc, PixelFormat::RGBA, 45, 37, frames, {0, 1, 2});
  EXPECT_EQ(out.size(), 3u * 4 * 4 * 5);
  EXPECT_TRUE(all_finite(out));
  EXPECT_GT(max_abs(out), 0.0);
  // Frames differ, so do their latents.
  EXPECT_NE(std::vector<float>(out.begin(), out.begin() + 80), std::vector<float>(out.begin() + 80, out.begin() + 160));
}

TEST(Encode, EmptyBatchWritesNothing) {
  auto enc = ldm_encoder();
  auto batch = enc->new_batch(PixelFormat::RGB, 32, 24, 2);
  std::vector<float> out(8, 123.0f);
  enc->encode(*batch, {}, out.data());
  EXPECT_EQ(out, std::vector<float>(8, 123.0f));
}

TEST(Encode, Deterministic) {
  auto enc = ldm_encoder();
  const auto frames = rgb_frames(64, 48, 3);
  EXPECT_EQ(encode_frames(*enc, PixelFormat::RGB, 64, 48, frames, {0, 1, 2}),
            encode_frames(*enc, PixelFormat::RGB, 64, 48, frames, {0, 1, 2}));
}

// Fails with LibTorch 1.13 on CPU for small frames: see the report. A batch of
// one frame takes a different convolution kernel (native slow_conv2d instead of
// oneDNN) when the input is small, so the last, partial batch of a stream gives
// latents that differ in the last bits from the same frame in a fuller batch.
TEST(Encode, BatchingDoesNotChangeResults) {
  auto enc = ldm_encoder();
  const auto frames = rgb_frames(64, 48, 5);
  const auto idx = iota(5, 10);
  for (bool sample : {false, true}) {
    SCOPED_TRACE(sample ? "sample" : "mean");
    EncodeParams p;
    p.sample = sample;
    p.seed = 77;
    const auto whole = encode_frames(*enc, PixelFormat::RGB, 64, 48, frames, idx, p);
    std::vector<float> pieces;
    for (auto [begin, end] : {std::pair<size_t, size_t>{0, 2}, {2, 4}, {4, 5}}) {
      const std::vector<Frame> part(frames.begin() + begin, frames.begin() + end);
      const std::vector<uint64_t> part_idx(idx.begin() + begin, idx.begin() + end);
      const auto out = encode_frames(*enc, PixelFormat::RGB, 64, 48, part, part_idx, p);
      pieces.insert(pieces.end(), out.begin(), out.end());
    }
    ASSERT_EQ(pieces.size(), whole.size());
    EXPECT_EQ(std::memcmp(pieces.data(), whole.data(), whole.size() * sizeof(float)), 0)
        << "max |diff| " << max_abs_diff(pieces, whole);
  }
}

TEST(Encode, BatchSplitsWithoutSingletonsAreExact) {
  auto enc = ldm_encoder();
  const auto frames = rgb_frames(64, 48, 5);
  const auto idx = iota(5, 10);
  const auto whole = encode_frames(*enc, PixelFormat::RGB, 64, 48, frames, idx);
  std::vector<float> pieces = encode_frames(*enc, PixelFormat::RGB, 64, 48, {frames[0], frames[1]}, {10, 11});
  const auto rest = encode_frames(*enc, PixelFormat::RGB, 64, 48, {frames[2], frames[3], frames[4]}, {12, 13, 14});
  pieces.insert(pieces.end(), rest.begin(), rest.end());
  ASSERT_EQ(pieces.size(), whole.size());
  EXPECT_EQ(std::memcmp(pieces.data(), whole.data(), whole.size() * sizeof(float)), 0)
      << "max |diff| " << max_abs_diff(pieces, whole);
}

TEST(Encode, SingleFrameBatchesAreClose) {
  // Whatever LibTorch's kernel choice per batch size, one frame at a time
  // agrees with the whole batch to float rounding.
  auto enc = ldm_encoder();
  const auto frames = rgb_frames(64, 48, 3);
  const auto whole = encode_frames(*enc, PixelFormat::RGB, 64, 48, frames, {0, 1, 2});
  std::vector<float> pieces;
  for (uint64_t i = 0; i < 3; ++i) {
    const auto out = encode_frames(*enc, PixelFormat::RGB, 64, 48, {frames[i]}, {i});
    pieces.insert(pieces.end(), out.begin(), out.end());
  }
  ASSERT_EQ(pieces.size(), whole.size());
  EXPECT_LT(max_abs_diff(pieces, whole), 1e-4 * std::max(1.0, max_abs(whole)));
}

TEST(Encode, Sampling) {
  auto enc = ldm_encoder();
  const auto frames = rgb_frames(64, 48, 2);
  EncodeParams p;
  p.sample = true;
  p.seed = 1234;
  const auto mean = encode_frames(*enc, PixelFormat::RGB, 64, 48, frames, {0, 1});
  const auto a = encode_frames(*enc, PixelFormat::RGB, 64, 48, frames, {0, 1}, p);
  const auto b = encode_frames(*enc, PixelFormat::RGB, 64, 48, frames, {0, 1}, p);
  EXPECT_EQ(a, b);
  EXPECT_TRUE(all_finite(a));
  EXPECT_NE(a, mean);
  p.seed = 1235;
  const auto c = encode_frames(*enc, PixelFormat::RGB, 64, 48, frames, {0, 1}, p);
  EXPECT_NE(c, a);
  // With sample=false the seed is irrelevant.
  EncodeParams m;
  m.seed = 999;
  EXPECT_EQ(encode_frames(*enc, PixelFormat::RGB, 64, 48, frames, {0, 1}, m), mean);
  // The noise of a frame depends on its stream index, not its batch slot.
  p.seed = 1234;
  const auto swapped = encode_frames(*enc, PixelFormat::RGB, 64, 48, {frames[1], frames[0]}, {1, 0}, p);
  const size_t half = a.size() / 2;
  EXPECT_EQ(std::vector<float>(swapped.begin(), swapped.begin() + half), std::vector<float>(a.begin() + half, a.end()));
  EXPECT_EQ(std::vector<float>(swapped.begin() + half, swapped.end()), std::vector<float>(a.begin(), a.begin() + half));
  const auto shifted = encode_frames(*enc, PixelFormat::RGB, 64, 48, frames, {5, 6}, p);
  EXPECT_NE(shifted, a);
}

TEST(Encode, LatentFormatsScaleAndShift) {
  auto enc = ldm_encoder();
  const auto frames = rgb_frames(32, 24, 2);
  for (bool sample : {false, true}) {
    EncodeParams raw;
    raw.sample = sample;
    raw.seed = 5;
    const auto r = encode_frames(*enc, PixelFormat::RGB, 32, 24, frames, {0, 1}, raw);
    for (const char* name : {"sd15", "sdxl", "sd3", "flux"}) {
      SCOPED_TRACE(name);
      EncodeParams p = raw;
      p.latent_format = latent_format_by_name(name);
      const auto s = encode_frames(*enc, PixelFormat::RGB, 32, 24, frames, {0, 1}, p);
      ASSERT_EQ(s.size(), r.size());
      for (size_t i = 0; i < r.size(); ++i) {
        const double expected = (r[i] - p.latent_format.shift) * p.latent_format.scale;
        ASSERT_NEAR(s[i], expected, 1e-6 * std::max(1.0, std::fabs(expected))) << i;
      }
    }
    EncodeParams p = raw;
    p.latent_format = latent_format_by_name("raw");
    EXPECT_EQ(encode_frames(*enc, PixelFormat::RGB, 32, 24, frames, {0, 1}, p), r);
    p.latent_format = custom_latent_format(2.0, -1.0);
    const auto c = encode_frames(*enc, PixelFormat::RGB, 32, 24, frames, {0, 1}, p);
    for (size_t i = 0; i < r.size(); ++i) ASSERT_NEAR(c[i], (r[i] + 1.0) * 2.0, 1e-5 * std::max(1.0, std::fabs(static_cast<double>(c[i]))));
  }
}

TEST(Encode, EveryPixelFormatGivesTheSameLatentsAsRgb) {
  auto enc = ldm_encoder();
  const int w = 45, h = 37;
  const auto rgb = rgb_frames(w, h, 2, 555);
  const auto ref = encode_frames(*enc, PixelFormat::RGB, w, h, rgb, {0, 1});
  for (PixelFormat f : all_pixel_formats()) {
    SCOPED_TRACE(pixel_format_name(f));
    const std::vector<Frame> conv = {convert(rgb[0], w, h, f), convert(rgb[1], w, h, f, 20)};
    EXPECT_EQ(encode_frames(*enc, f, w, h, conv, {0, 1}), ref);
  }
  // BGR explicitly: RGB bytes swapped.
  std::vector<Frame> bgr = rgb;
  for (auto& fr : bgr)
    for (size_t i = 0; i + 2 < fr.pixels.size(); i += 3) std::swap(fr.pixels[i], fr.pixels[i + 2]);
  EXPECT_EQ(encode_frames(*enc, PixelFormat::BGR, w, h, bgr, {0, 1}), ref);
  // Reading the swapped bytes as RGB is a different image.
  EXPECT_NE(encode_frames(*enc, PixelFormat::RGB, w, h, bgr, {0, 1}), ref);
  // The alpha value does not matter.
  Frame a = convert(rgb[0], w, h, PixelFormat::RGBA), b = a;
  for (size_t i = 3; i < b.pixels.size(); i += 4) b.pixels[i] = static_cast<uint8_t>(255 - b.pixels[i]);
  EXPECT_EQ(encode_frames(*enc, PixelFormat::RGBA, w, h, {a}, {0}), encode_frames(*enc, PixelFormat::RGBA, w, h, {b}, {0}));
}

TEST(Encode, CropMatchesEncodingTheCroppedRegion) {
  // A 45x37 frame encodes like the 40x32 region at (2, 2) given alone.
  auto enc = ldm_encoder();
  const auto big = rgb_frames(45, 37, 1, 31)[0];
  Frame small{std::vector<uint8_t>(40 * 32 * 3), 40 * 3};
  for (int y = 0; y < 32; ++y) std::memcpy(&small.pixels[y * 120], &big.pixels[(y + 2) * big.stride + 2 * 3], 120);
  // Also with a padded stride.
  Frame padded{std::vector<uint8_t>((45 * 3 + 9) * 37, 0xee), 45 * 3 + 9};
  for (int y = 0; y < 37; ++y) std::memcpy(&padded.pixels[y * padded.stride], &big.pixels[y * big.stride], 45 * 3);
  const auto ref = encode_frames(*enc, PixelFormat::RGB, 40, 32, {small}, {0});
  EXPECT_EQ(encode_frames(*enc, PixelFormat::RGB, 45, 37, {big}, {0}), ref);
  EXPECT_EQ(encode_frames(*enc, PixelFormat::RGB, 45, 37, {padded}, {0}), ref);
}

TEST(Encode, ConcurrentBatchesOnOneEncoder) {
  auto enc = ldm_encoder();
  const auto fa = rgb_frames(64, 48, 2, 1), fb = rgb_frames(64, 48, 2, 2);
  const auto ra = encode_frames(*enc, PixelFormat::RGB, 64, 48, fa, {0, 1});
  const auto rb = encode_frames(*enc, PixelFormat::RGB, 64, 48, fb, {0, 1});
  std::vector<float> ca, cb;
  std::thread ta([&] {
    for (int i = 0; i < 3; ++i) ca = encode_frames(*enc, PixelFormat::RGB, 64, 48, fa, {0, 1});
  });
  std::thread tb([&] {
    for (int i = 0; i < 3; ++i) cb = encode_frames(*enc, PixelFormat::RGB, 64, 48, fb, {0, 1});
  });
  ta.join();
  tb.join();
  EXPECT_EQ(ca, ra);
  EXPECT_EQ(cb, rb);
}

/* ------------------------------------------- prepare() and LatentBlock */

// Fills a batch of the encoder's with `frames` (RGB, w x h), indices 0..n-1.
std::unique_ptr<FrameBatch> rgb_batch(const Encoder& enc, int w, int h, const std::vector<Frame>& frames,
                                      size_t capacity = 0) {
  auto batch = enc.new_batch(PixelFormat::RGB, w, h, capacity ? capacity : frames.size());
  for (size_t i = 0; i < frames.size(); ++i) batch->add(frames[i].pixels.data(), frames[i].stride, i);
  return batch;
}

std::vector<float> block_values(LatentBlock& block) { return {block.data(), block.data() + block.floats()}; }

TEST(PreparedEncode, PreparedBatchIntoLatentBlockEqualsPlainEncode) {
  auto enc = ldm_encoder();
  const auto frames = rgb_frames(64, 48, 3);
  for (bool sample : {false, true}) {
    SCOPED_TRACE(sample ? "sample" : "mean");
    EncodeParams p;
    p.sample = sample;
    p.seed = 5;
    const auto expect = encode_frames(*enc, PixelFormat::RGB, 64, 48, frames, iota(3), p);
    auto batch = rgb_batch(*enc, 64, 48, frames);
    enc->prepare(*batch);
    auto block = enc->new_latents(*batch);
    EXPECT_FALSE(block->pinned()) << "page-locked memory is for GPU encoders";
    ASSERT_EQ(block->floats(), expect.size());
    EXPECT_EQ(block->bytes(), expect.size() * sizeof(float));
    enc->encode(*batch, p, *block);
    EXPECT_EQ(block_values(*block), expect);
    // The unprepared batch through a LatentBlock, too.
    auto plain = rgb_batch(*enc, 64, 48, frames);
    auto block2 = enc->new_latents(*plain);
    enc->encode(*plain, p, *block2);
    EXPECT_EQ(block_values(*block2), expect);
  }
}

TEST(PreparedEncode, FrameAddedAfterPrepareIsEncoded) {
  auto enc = ldm_encoder();
  const auto frames = rgb_frames(64, 48, 3);
  const auto expect = encode_frames(*enc, PixelFormat::RGB, 64, 48, frames, iota(3));
  auto batch = rgb_batch(*enc, 64, 48, {frames[0], frames[1]}, 3);
  enc->prepare(*batch);
  batch->add(frames[2].pixels.data(), frames[2].stride, 2);
  std::vector<float> out(expect.size());
  enc->encode(*batch, {}, out.data());
  EXPECT_EQ(out, expect) << "encode used what prepare() made of the first two frames";
}

TEST(PreparedEncode, ClearedBatchForgetsWhatWasPrepared) {
  auto enc = ldm_encoder();
  const auto a = rgb_frames(64, 48, 2, 1), b = rgb_frames(64, 48, 2, 2);
  const auto expect = encode_frames(*enc, PixelFormat::RGB, 64, 48, b, iota(2));
  auto batch = rgb_batch(*enc, 64, 48, a);
  enc->prepare(*batch);
  batch->clear();
  for (size_t i = 0; i < b.size(); ++i) batch->add(b[i].pixels.data(), b[i].stride, i);
  std::vector<float> out(expect.size());
  enc->encode(*batch, {}, out.data());
  EXPECT_EQ(out, expect) << "a reused batch encoded the frames prepared before clear()";
}

TEST(PreparedEncode, PrepareOnOneThreadEncodeOnAnother) {
  auto enc = ldm_encoder();
  const auto frames = rgb_frames(64, 48, 2, 3);
  const auto expect = encode_frames(*enc, PixelFormat::RGB, 64, 48, frames, iota(2));
  auto batch = rgb_batch(*enc, 64, 48, frames);
  std::thread([&] { enc->prepare(*batch); }).join();
  auto block = enc->new_latents(*batch);
  std::thread([&] { enc->encode(*batch, {}, *block); }).join();
  EXPECT_EQ(block_values(*block), expect);
}

TEST(PreparedEncode, TooSmallLatentBlockIsAnError) {
  auto enc = ldm_encoder();
  const auto frames = rgb_frames(64, 48, 2);
  auto batch = rgb_batch(*enc, 64, 48, frames);
  LatentBlock small(enc->latent_floats_per_frame(*batch), false);
  try {
    enc->encode(*batch, {}, small);
    FAIL() << "a block for one frame took two";
  } catch (const VaeError& e) {
    EXPECT_NE(std::string(e.what()).find("too small"), std::string::npos) << e.what();
  }
}

// ATen gives a thread the configured count when it first computes; OpenMP then
// keeps it per thread. A long-lived encoding thread (the element's) must follow
// a later change of the process-wide `threads` option.
TEST(PreparedEncode, ThreadOptionChangeReachesAnEncodingThread) {
  const std::string path = Models::get().path("ldm", small_spec());
  const auto frames = rgb_frames(32, 32, 1);
  ModelOptions options;
  options.threads = 2;
  auto enc = load_encoder(path, options);
  std::mutex m;
  std::condition_variable cv;
  int step = 0, before = -1, after = -1;
  auto encode_once = [&] {
    auto batch = rgb_batch(*enc, 32, 32, frames);
    std::vector<float> out(enc->latent_floats_per_frame(*batch));
    enc->encode(*batch, {}, out.data());
    return at::get_num_threads();
  };
  std::thread worker([&] {
    before = encode_once();
    {
      std::unique_lock<std::mutex> lock(m);
      step = 1;
      cv.notify_all();
      cv.wait(lock, [&] { return step == 2; });
    }
    after = encode_once();
  });
  {
    std::unique_lock<std::mutex> lock(m);
    cv.wait(lock, [&] { return step == 1; });
    options.threads = 1;
    load_encoder(path, options);  // a pipeline set up later with threads=1
    step = 2;
    cv.notify_all();
  }
  worker.join();
  EXPECT_EQ(before, 2);
  EXPECT_EQ(after, 1) << "the encoding thread kept its first thread count";
  load_encoder(path, ModelOptions{});  // back to all cores
}

// ------------------------------------------------------------ latent files

TEST(LatentFile, FormatFromTheExtensionIgnoresCase) {
  EXPECT_EQ(latent_file_format_for("dir/y.NPY"), LatentFileFormat::Npy);
  EXPECT_EQ(latent_file_format_for("y.Npy"), LatentFileFormat::Npy);
  EXPECT_EQ(latent_file_format_for("z.SafeTensors"), LatentFileFormat::Safetensors);
  EXPECT_EQ(latent_file_format_for("clip.latent"), LatentFileFormat::Latent);
  EXPECT_EQ(latent_file_format_for("npy"), LatentFileFormat::Latent);
}

// A .npy whose shape does not match its size is refused before anything is
// allocated for it (a hostile shape would ask for terabytes), and a header-only
// read gives the shape without the values.
TEST(LatentFile, NpyShapeMustMatchTheFileSize) {
  TempDir dir;
  auto write_npy = [&](const std::string& name, const std::string& shape, size_t data_bytes) {
    std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + shape + "), }";
    dict.append(118 - dict.size() - 1, ' ');
    dict += '\n';
    std::string blob = std::string("\x93NUMPY\x01\x00", 8) + static_cast<char>(dict.size()) + '\0' + dict;
    blob.append(data_bytes, '\0');
    std::ofstream(dir.file(name), std::ios::binary) << blob;
    return dir.file(name);
  };
  const std::string good = write_npy("good.npy", "2, 4, 3, 5", 2 * 4 * 3 * 5 * 4);
  EXPECT_EQ(read_latent_file(good).values.size(), 120u);
  const LatentArray header = read_latent_file(good, /*with_values=*/false);
  EXPECT_EQ(header.frames, 2);
  EXPECT_EQ(header.width, 5);
  EXPECT_TRUE(header.values.empty());
  for (const auto& [name, shape, bytes] :
       std::vector<std::tuple<std::string, std::string, size_t>>{{"huge.npy", "1000000000, 4, 1000, 1000", 64},
                                                                 {"short.npy", "2, 4, 3, 5", 100},
                                                                 {"long.npy", "2, 4, 3, 5", 500},
                                                                 {"negative.npy", "-2, 4, 3, 5", 480}}) {
    const std::string path = write_npy(name, shape, bytes);
    EXPECT_THROW(read_latent_file(path), LatentFileError) << name;
    EXPECT_THROW(read_latent_file(path, false), LatentFileError) << name;
  }
}

TEST(LatentFile, TemporaryNamesAreRecognisable) {
  EXPECT_EQ(latent_temp_file_target(".clip.latent.partial-AbC123"), "clip.latent");
  EXPECT_EQ(latent_temp_file_target(".seg-007.npy.partial-000000"), "seg-007.npy");
  EXPECT_EQ(latent_temp_file_target(".clip.latent.partial-AbC12"), "");   // 5 characters
  EXPECT_EQ(latent_temp_file_target(".clip.latent.partial-AbC12_"), "");  // not a letter or digit
  EXPECT_EQ(latent_temp_file_target("clip.latent.partial-AbC123"), "");   // not hidden
  EXPECT_EQ(latent_temp_file_target(".clip.latent.AbC123"), "");          // the old mkstemp name
  EXPECT_EQ(latent_temp_file_target("..partial-AbC123"), "");
}

TEST(LatentFile, WriterHonoursTheUmaskAndNamesItsTemporaryFile) {
  TempDir dir;
  const mode_t old_umask = ::umask(027);
  std::string temp;
  {
    LatentFileWriter w(dir.file("m.latent"), LatentFileFormat::Latent, 4, 2, 3);
    temp = w.temp_path();
    const std::vector<float> frame(24, 1.0f);
    w.append(frame.data(), frame.size() * sizeof(float));
    w.finish({});
  }
  ::umask(old_umask);
  EXPECT_EQ(latent_temp_file_target(temp.substr(temp.rfind('/') + 1)), "m.latent") << temp;
  struct stat st;
  ASSERT_EQ(::stat(dir.file("m.latent").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0640u);
}

TEST(LatentFile, WriterRefusesAnExistingDirectory) {
  TempDir dir;
  ASSERT_EQ(::mkdir(dir.file("d.latent").c_str(), 0755), 0);
  EXPECT_TRUE(contains(latent_file_target_problem(dir.file("d.latent")), "is a directory"));
  EXPECT_EQ(latent_file_target_problem(dir.file("new.latent")), "");
  try {
    LatentFileWriter w(dir.file("d.latent"), LatentFileFormat::Latent, 4, 2, 3);
    FAIL() << "no error for a directory";
  } catch (const LatentFileError& e) {
    EXPECT_TRUE(contains(e.what(), dir.file("d.latent"))) << e.what();
  }
}

// Were the check missing, the kernel would end this test binary with SIGXFSZ.
TEST(LatentFile, FileSizeLimitIsAnErrorBeforeTheWrite) {
  TempDir dir;
  struct rlimit old_limit;
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  const size_t frame_bytes = 4 * 2 * 3 * sizeof(float);
  struct rlimit limit = old_limit;
  limit.rlim_cur = 4096 + 2 * frame_bytes;  // the header and two frames
  if (old_limit.rlim_cur != RLIM_INFINITY && old_limit.rlim_cur < limit.rlim_cur) GTEST_SKIP();
  std::string error, temp;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &limit), 0);
  {
    LatentFileWriter w(dir.file("l.latent"), LatentFileFormat::Latent, 4, 2, 3);
    temp = w.temp_path();
    const std::vector<float> frame(24, 0.5f);
    w.append(frame.data(), frame_bytes);
    w.append(frame.data(), frame_bytes);  // up to the limit exactly: allowed
    try {
      w.append(frame.data(), frame_bytes);
    } catch (const LatentFileError& e) {
      error = e.what();
    }
  }
  ::setrlimit(RLIMIT_FSIZE, &old_limit);
  EXPECT_TRUE(contains(error, "RLIMIT_FSIZE, " + std::to_string(limit.rlim_cur) + " bytes")) << error;
  EXPECT_NE(::access(temp.c_str(), F_OK), 0) << "temporary file left: " << temp;
  EXPECT_NE(::access(dir.file("l.latent").c_str(), F_OK), 0);
}

TEST(LatentFile, RangesMetadataIsNeverCut) {
  TempDir dir;
  std::string ranges = "[";
  for (int i = 0; i < 150; ++i) ranges += std::to_string(i) + ",";
  ranges += "150]";  // over 256 characters
  const std::map<std::string, std::string> meta = {{"ranges", ranges}, {"model", std::string(600, 'm')}};
  {
    LatentFileWriter w(dir.file("r.latent"), LatentFileFormat::Latent, 4, 2, 3);
    const std::vector<float> frame(24, 0.25f);
    w.append(frame.data(), frame.size() * sizeof(float));
    EXPECT_TRUE(w.header_fits(meta));
    EXPECT_FALSE(w.header_fits({{"ranges", std::string(5000, '1')}}));
    w.finish(meta);
  }
  const LatentArray a = read_latent_file(dir.file("r.latent"));
  EXPECT_EQ(a.metadata.at("ranges"), ranges);
  EXPECT_EQ(a.metadata.at("model").size(), 256u) << "other values are still cut";
}

// ============================================================ decoders

TEST(NormalizeDecoderKeys, LdmIsIdentityAndIgnoresEncoder) {
  std::vector<std::string> names = kLdmEncoderNames;
  const std::vector<std::string> decoder = {"decoder.conv_in.weight", "decoder.up.0.block.2.conv1.weight",
                                            "decoder.up.3.upsample.conv.bias", "decoder.mid.attn_1.q.weight",
                                            "decoder.norm_out.weight", "post_quant_conv.weight"};
  names.insert(names.end(), decoder.begin(), decoder.end());
  const NormalizedKeys k = normalize_vae_keys(names, "vae.safetensors", VaePart::Decoder);
  EXPECT_EQ(k.layout, "ldm");
  EXPECT_EQ(k.source.size(), decoder.size());
  for (const auto& n : decoder) EXPECT_EQ(k.source.at(n), n);
}

TEST(NormalizeDecoderKeys, DiffusersUpBlocksAreNumberedFromTheDeepestLevel) {
  // Four up blocks: diffusers' up_blocks.0 is LDM's up.3 (the deepest, which upsamples).
  const std::vector<std::pair<std::string, std::string>> pairs = {
      {"decoder.conv_in.weight", "decoder.conv_in.weight"},
      {"decoder.up_blocks.0.resnets.0.conv1.weight", "decoder.up.3.block.0.conv1.weight"},
      {"decoder.up_blocks.0.upsamplers.0.conv.weight", "decoder.up.3.upsample.conv.weight"},
      {"decoder.up_blocks.1.resnets.2.norm2.bias", "decoder.up.2.block.2.norm2.bias"},
      {"decoder.up_blocks.2.resnets.0.conv_shortcut.weight", "decoder.up.1.block.0.nin_shortcut.weight"},
      {"decoder.up_blocks.3.resnets.1.conv2.weight", "decoder.up.0.block.1.conv2.weight"},
      {"decoder.mid_block.resnets.0.norm1.weight", "decoder.mid.block_1.norm1.weight"},
      {"decoder.mid_block.resnets.1.conv2.bias", "decoder.mid.block_2.conv2.bias"},
      {"decoder.mid_block.attentions.0.group_norm.weight", "decoder.mid.attn_1.norm.weight"},
      {"decoder.mid_block.attentions.0.to_q.weight", "decoder.mid.attn_1.q.weight"},
      {"decoder.mid_block.attentions.0.key.bias", "decoder.mid.attn_1.k.bias"},
      {"decoder.mid_block.attentions.0.to_out.0.weight", "decoder.mid.attn_1.proj_out.weight"},
      {"decoder.mid_block.attentions.0.proj_attn.bias", "decoder.mid.attn_1.proj_out.bias"},
      {"decoder.conv_norm_out.weight", "decoder.norm_out.weight"},
      {"decoder.conv_out.bias", "decoder.conv_out.bias"},
      {"post_quant_conv.weight", "post_quant_conv.weight"},
  };
  for (const std::string prefix : {"", "vae.", "first_stage_model."}) {
    SCOPED_TRACE(prefix);
    std::vector<std::string> names;
    for (const auto& p : pairs) names.push_back(prefix + p.first);
    for (const auto& p : kDiffusersCommon) names.push_back(prefix + p.first);
    const NormalizedKeys k = normalize_vae_keys(names, "d.safetensors", VaePart::Decoder);
    EXPECT_EQ(k.prefix, prefix);
    EXPECT_EQ(k.layout, "diffusers");
    EXPECT_EQ(k.source.size(), pairs.size());
    for (const auto& p : pairs) {
      ASSERT_TRUE(k.has(p.second)) << p.first << " -> " << p.second;
      EXPECT_EQ(k.source.at(p.second), prefix + p.first);
    }
    // The encoder part of the same names knows nothing of the decoder.
    const NormalizedKeys e = normalize_vae_keys(names, "d.safetensors", VaePart::Encoder);
    for (const auto& kv : e.source) EXPECT_EQ(kv.first.rfind("encoder.", 0) == 0 || kv.first.rfind("quant_conv.", 0) == 0, true) << kv.first;
  }
}

TEST(NormalizeDecoderKeys, Errors) {
  const std::string m = error_of<CheckpointError>(
      [] { normalize_vae_keys(kLdmEncoderNames, "enc-only.st", VaePart::Decoder); });
  EXPECT_TRUE(contains(m, "enc-only.st") && contains(m, "decoder.conv_in.weight")) << m;
  // An absurd up-block index is refused before any arithmetic on it.
  const std::string huge = "decoder.up_blocks." + std::string(5000, '9') + ".resnets.0.conv1.weight";
  const std::string m2 = error_of<CheckpointError>([&] {
    normalize_vae_keys({"decoder.conv_in.weight", huge}, "huge.st", VaePart::Decoder);
  });
  EXPECT_TRUE(contains(m2, "huge.st") && contains(m2, "up block")) << m2.substr(0, 300);
  EXPECT_LT(m2.size(), 1000u);
}

VaeSpec full_vae_spec(const std::string& layout = "ldm", uint64_t seed = 1) {
  VaeSpec s = small_spec(layout, seed);
  s.full_decoder = true;
  return s;
}

std::shared_ptr<Decoder> cpu_decoder(const std::string& path, Precision precision = Precision::F32) {
  ModelOptions o;
  o.device = "cpu";
  o.precision = precision;
  return load_decoder(path, o);
}

// Number of decoder-side parameters in a checkpoint, counted from the file.
int64_t decoder_parameters(const std::string& path) {
  SafetensorsFile f(path);
  int64_t n = 0;
  for (const auto& kv : f.tensors())
    for (const char* p : {"", "first_stage_model.", "vae."}) {
      const std::string a = std::string(p) + "decoder.", b = std::string(p) + "post_quant_conv.";
      if (kv.first.compare(0, a.size(), a) == 0 || kv.first.compare(0, b.size(), b) == 0) n += kv.second.numel();
    }
  return n;
}

// Deterministic latents ~ N(0, 1)-ish.
std::vector<float> test_latents(size_t count, uint64_t seed) {
  std::vector<float> v(count);
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (auto& f : v) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    f = static_cast<float>((static_cast<double>(x % 20001) / 10000.0 - 1.0) * 1.7);
  }
  return v;
}

std::vector<float> decode_float(Decoder& dec, int h, int w, const std::vector<float>& latents,
                                const DecodeParams& params = {}) {
  const size_t per = static_cast<size_t>(dec.info().latent_channels) * h * w;
  const size_t n = latents.size() / per;
  auto batch = dec.new_batch(h, w, n);
  for (size_t i = 0; i < n; ++i) batch->add(latents.data() + i * per, i);
  const size_t up = static_cast<size_t>(dec.info().upscale);
  std::vector<float> out(n * 3 * h * up * w * up + 8, std::numeric_limits<float>::quiet_NaN());
  dec.decode_float(*batch, params, out.data());
  for (size_t i = out.size() - 8; i < out.size(); ++i) EXPECT_TRUE(std::isnan(out[i])) << "wrote past the end";
  out.resize(out.size() - 8);
  return out;
}

TEST(LoadDecoder, InfoFields) {
  const std::string path = Models::get().path("full_ldm", full_vae_spec());
  auto dec = cpu_decoder(path);
  const DecoderInfo& i = dec->info();
  EXPECT_EQ(i.family, "kl");
  EXPECT_EQ(i.model_path, path);
  EXPECT_EQ(i.layout, "ldm");
  EXPECT_EQ(i.device, "cpu");
  EXPECT_EQ(i.precision, Precision::F32);
  EXPECT_EQ(i.upscale, 8);
  EXPECT_EQ(i.latent_channels, 4);
  EXPECT_TRUE(i.native_format.is_raw());
  EXPECT_TRUE(i.output_signed);
  EXPECT_EQ(i.parameters, decoder_parameters(path));
  EXPECT_TRUE(contains(i.architecture, "AutoencoderKL decoder")) << i.architecture;
  EXPECT_TRUE(contains(i.architecture, "levels [32, 32, 64, 64]")) << i.architecture;
  EXPECT_TRUE(contains(i.architecture, "2 blocks per level")) << i.architecture;
  EXPECT_TRUE(contains(i.architecture, "z=4, post_quant_conv")) << i.architecture;
  std::cout << "[ info     ] " << i.architecture << ", " << i.parameters << " parameters\n";

  VaeSpec z16 = full_vae_spec("vae");
  z16.z = 16;
  z16.quant_conv = false;
  z16.mult = {1, 2, 2};
  auto d16 = cpu_decoder(Models::get().path("full_z16", z16));
  EXPECT_EQ(d16->info().latent_channels, 16);
  EXPECT_EQ(d16->info().upscale, 4);
  EXPECT_EQ(d16->info().layout, "ldm under 'vae.'");
  EXPECT_TRUE(contains(d16->info().architecture, "no post_quant_conv")) << d16->info().architecture;
  const std::vector<float> px = decode_float(*d16, 3, 2, test_latents(16 * 3 * 2, 5));
  EXPECT_EQ(px.size(), 3u * 12 * 8);
}

TEST(LoadDecoder, EncoderOnlyFileIsAClearError) {
  VaeSpec s = small_spec();
  s.include_decoder = false;
  const std::string path = Models::get().path("no_decoder", s);
  const std::string m = error_of<CheckpointError>([&] { cpu_decoder(path); });
  EXPECT_TRUE(contains(m, path)) << m;
  EXPECT_TRUE(contains(m, "no supported VAE decoder")) << m;
  EXPECT_TRUE(contains(m, "decoder.conv_in.weight")) << m;
  // And the other way round: a decoder-only file has no encoder.
  VaeSpec d = full_vae_spec();
  d.include_encoder = false;
  const std::string dpath = Models::get().path("decoder_only", d);
  EXPECT_EQ(cpu_decoder(dpath)->info().upscale, 8);
  const std::string m2 = error_of<CheckpointError>([&] { load_encoder(dpath, ModelOptions{}); });
  EXPECT_TRUE(contains(m2, "no supported VAE encoder")) << m2;
}

TEST(LoadDecoder, MissingTensorIsNamedInBothNamings) {
  VaeSpec s = full_vae_spec("diffusers");
  s.drop = {"decoder.up.0.block.1.conv2.weight"};
  const std::string m = error_of<CheckpointError>([&] { cpu_decoder(Models::get().path("dec_missing", s)); });
  EXPECT_TRUE(contains(m, "decoder.up.0.block.1.conv2.weight")) << m;
}

TEST(LoadDecoder, EveryLayoutGivesTheSameFrames) {
  const std::vector<float> z = test_latents(2 * 4 * 5 * 3, 7);
  const std::vector<float> ref = decode_float(*cpu_decoder(Models::get().path("full_ldm", full_vae_spec())), 5, 3, z);
  ASSERT_EQ(ref.size(), 2u * 3 * 40 * 24);
  for (const std::string layout : {"first_stage_model", "vae", "diffusers", "diffusers_old"}) {
    SCOPED_TRACE(layout);
    auto dec = cpu_decoder(Models::get().path("full_" + layout, full_vae_spec(layout)));
    EXPECT_TRUE(contains(dec->info().layout, layout.rfind("diffusers", 0) == 0 ? "diffusers" : "ldm"));
    const std::vector<float> px = decode_float(*dec, 5, 3, z);
    EXPECT_LT(max_abs_diff(px, ref), 1e-5);
  }
  // Pixels stay in [0, 1] and are not all clamped.
  size_t inside = 0;
  for (float v : ref) {
    EXPECT_TRUE(v >= 0.0f && v <= 1.0f) << v;
    inside += v > 0.0f && v < 1.0f;
  }
  EXPECT_GT(inside, ref.size() / 2);
}

TEST(Decode, BytesArePixelsTimes255TruncatedInEveryFormat) {
  auto dec = cpu_decoder(Models::get().path("full_ldm", full_vae_spec()));
  const int h = 3, w = 4, H = 24, W = 32;
  const std::vector<float> z = test_latents(2 * 4 * h * w, 9);
  const std::vector<float> px = decode_float(*dec, h, w, z);
  auto batch = dec->new_batch(h, w, 2);
  batch->add(z.data(), 10);
  batch->add(z.data() + 4 * h * w, 11);
  for (PixelFormat format : {PixelFormat::RGB, PixelFormat::BGRA, PixelFormat::xRGB}) {
    const PixelLayout l = pixel_layout(format);
    auto out = dec->new_pixels(*batch, format);
    ASSERT_EQ(out->bytes(), 2u * H * W * l.bytes_per_pixel);
    dec->decode(*batch, DecodeParams{}, format, *out);
    const uint8_t* b = out->data();
    for (int n = 0; n < 2; ++n)
      for (int y = 0; y < H; ++y)
        for (int x = 0; x < W; ++x) {
          const uint8_t* p = b + ((static_cast<size_t>(n) * H + y) * W + x) * l.bytes_per_pixel;
          for (int c = 0; c < 3; ++c) {
            const float v = px[((static_cast<size_t>(n) * 3 + c) * H + y) * W + x];
            const int expected = static_cast<int>(std::min(255.0f, std::max(0.0f, v * 255.0f)));
            ASSERT_EQ(p[c == 0 ? l.r : c == 1 ? l.g : l.b], expected) << "frame " << n << " at " << x << "," << y;
          }
          if (l.bytes_per_pixel == 4) {
            const int other = 6 - l.r - l.g - l.b;
            ASSERT_EQ(p[other], 255);
          }
        }
  }
  // One frame per latent, with the latent's index.
  auto session = dec->open_session();
  auto out = dec->new_pixels(*batch, PixelFormat::RGB);
  BatchResult r = session->decode(*batch, DecodeParams{}, PixelFormat::RGB, *out);
  ASSERT_EQ(r.spans.size(), 2u);
  EXPECT_EQ(r.spans[0].first, 10u);
  EXPECT_EQ(r.spans[1].first, 11u);
}

TEST(Decode, LatentFormatIsConvertedToRawFirst) {
  auto dec = cpu_decoder(Models::get().path("full_ldm", full_vae_spec()));
  const std::vector<float> raw = test_latents(4 * 3 * 3, 12);
  for (const std::string name : {"sdxl", "sd3"}) {
    const LatentFormat f = latent_format_by_name(name);
    std::vector<float> scaled(raw.size());
    for (size_t i = 0; i < raw.size(); ++i) scaled[i] = static_cast<float>((raw[i] - f.shift) * f.scale);
    DecodeParams params;
    params.latent_format = f;
    EXPECT_LT(max_abs_diff(decode_float(*dec, 3, 3, scaled, params), decode_float(*dec, 3, 3, raw)), 1e-5) << name;
  }
}

TEST(Decode, BatchingAndWrongChannels) {
  auto dec = cpu_decoder(Models::get().path("full_ldm", full_vae_spec()));
  const std::vector<float> z = test_latents(3 * 4 * 2 * 3, 13);
  const std::vector<float> all = decode_float(*dec, 2, 3, z);
  const size_t per_latent = 4 * 2 * 3, per_frame = all.size() / 3;
  for (size_t i = 0; i < 3; ++i) {
    const std::vector<float> one(z.begin() + i * per_latent, z.begin() + (i + 1) * per_latent);
    const std::vector<float> alone = decode_float(*dec, 2, 3, one);
    EXPECT_LT(max_abs_diff(alone, std::vector<float>(all.begin() + i * per_frame, all.begin() + (i + 1) * per_frame)),
              1e-5);
  }
  LatentBatch wrong(16, 2, 2, 1, false);
  std::vector<float> zeros(16 * 4, 0.0f);
  wrong.add(zeros.data(), 0);
  std::vector<float> out(3 * 16 * 16);
  const std::string m = error_of<VaeError>([&] { dec->decode_float(wrong, DecodeParams{}, out.data()); });
  EXPECT_TRUE(contains(m, "16 channels") && contains(m, "takes 4")) << m;
}

TEST(Decode, OutOfMemoryHalvesTheBatchThenDecodesTileByTile) {
  // 65 x 33 latents exceed one 64-cell tile in each of the three passes, and
  // no tile of any pass has more than 2112 cells: with forward passes over more
  // than 2144 cells failing as out of memory, a batch of two is halved, and
  // each latent alone is decoded tile by tile. Two levels (upscale 2) keep it quick.
  VaeSpec s = full_vae_spec("diffusers", 4);
  s.mult = {1, 2};
  const std::string path = Models::get().path("full_two_level", s);
  const int h = 65, w = 33;
  const std::vector<float> z = test_latents(2 * 4 * h * w, 21);
  auto dec = cpu_decoder(path);
  ASSERT_EQ(dec->info().upscale, 2);
  const std::vector<float> whole = decode_float(*dec, h, w, z);
  dec->set_test_memory_limit(2144);
  auto batch = dec->new_batch(h, w, 2);
  batch->add(z.data(), 0);
  batch->add(z.data() + 4 * h * w, 1);
  std::vector<float> tiled(whole.size());
  const ComputeReport r = dec->decode_float(*batch, DecodeParams{}, tiled.data());
  dec->set_test_memory_limit(0);
  EXPECT_EQ(r.tiled_frames, 2);
  EXPECT_EQ(r.sub_batch, 1);
  ASSERT_EQ(r.notes.size(), 3u);
  EXPECT_TRUE(contains(r.notes[0], "halved to 1")) << r.notes[0];
  EXPECT_TRUE(contains(r.notes[1], "tiled decoding")) << r.notes[1];
  // Tiles see GroupNorm statistics and attention of their own region only, so
  // the blend differs from the whole decode, but not by much.
  double sum = 0;
  for (size_t i = 0; i < whole.size(); ++i) sum += std::fabs(whole[i] - tiled[i]);
  EXPECT_GT(max_abs_diff(whole, tiled), 1e-6);
  EXPECT_LT(sum / whole.size(), 0.1);
  // Tiled frames are in their places: the second equals the second latent tiled alone.
  dec->set_test_memory_limit(2144);
  const std::vector<float> second(z.begin() + 4 * h * w, z.end());
  const std::vector<float> alone = decode_float(*dec, h, w, second);
  dec->set_test_memory_limit(0);
  EXPECT_LT(max_abs_diff(alone, std::vector<float>(tiled.begin() + tiled.size() / 2, tiled.end())), 1e-6);
}

TEST(DecoderCache, OneDecoderPerFileAndEncoderKeptApart) {
  const std::string path = Models::get().path("full_cache", full_vae_spec("first_stage_model", 3));
  const size_t loads = gstvae_model_load_count();
  auto a = cpu_decoder(path);
  auto b = cpu_decoder(path);
  EXPECT_EQ(a.get(), b.get()) << "two loads of one file share one decoder";
  EXPECT_EQ(gstvae_model_load_count(), loads + 1);
  ModelOptions o;
  o.device = "cpu";
  auto e = load_encoder(path, o);
  EXPECT_EQ(gstvae_model_load_count(), loads + 2) << "the encoder of the same file is a load of its own";
  EXPECT_NE(static_cast<const void*>(e.get()), static_cast<const void*>(a.get()));
  EXPECT_EQ(load_encoder(path, o).get(), e.get());
  EXPECT_EQ(cpu_decoder(path).get(), a.get()) << "loading the encoder did not replace the decoder";
  EXPECT_EQ(gstvae_model_load_count(), loads + 2);
  // Each side loaded only its own tensors.
  EXPECT_EQ(a->info().parameters, decoder_parameters(path));
  EXPECT_EQ(e->info().parameters, encoder_parameters(path));
  // Released by every holder: the next load reads the file again.
  a.reset();
  b.reset();
  cpu_decoder(path);
  EXPECT_EQ(gstvae_model_load_count(), loads + 3);
}

// ============================================================ CUDA speed levers

// Sets (or, with nullptr, unsets) an environment variable for one scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = std::make_unique<std::string>(old);
    if (value) ::setenv(name, value, 1);
    else ::unsetenv(name);
  }
  ~ScopedEnv() {
    if (old_) ::setenv(name_.c_str(), old_->c_str(), 1);
    else ::unsetenv(name_.c_str());
  }

 private:
  std::string name_;
  std::unique_ptr<std::string> old_;
};

const char* const kLeverVariables[] = {"GSTVAE_CUDNN_BENCHMARK", "GSTVAE_PINNED_STAGING", "GSTVAE_UPLOAD_OVERLAP",
                                       "GSTVAE_CHANNELS_LAST",   "GSTVAE_SDPA",           "GSTVAE_CUDA_GRAPHS",
                                       "GSTVAE_DOWNLOAD_OVERLAP"};

// Every lever variable set to `value` (nullptr: unset) for one scope.
struct AllLevers {
  explicit AllLevers(const char* value) {
    for (const char* name : kLeverVariables) envs.push_back(std::make_unique<ScopedEnv>(name, value));
  }
  std::vector<std::unique_ptr<ScopedEnv>> envs;
};

TEST(Levers, DefaultsAreConservative) {
  AllLevers unset(nullptr);
  const CudaLevers l = cuda_levers();
  EXPECT_TRUE(l.cudnn_benchmark);
  EXPECT_TRUE(l.pinned_staging);
  EXPECT_TRUE(l.upload_overlap);
  EXPECT_EQ(l.channels_last, ChannelsLast::Off);
  EXPECT_FALSE(l.sdpa);
  EXPECT_FALSE(l.cuda_graphs) << "off until a GPU run measures it";
  EXPECT_FALSE(l.download_overlap) << "off until a GPU run measures it";
  AllLevers empty("");
  const CudaLevers e = cuda_levers();
  EXPECT_TRUE(e.cudnn_benchmark && e.pinned_staging && e.upload_overlap && !e.sdpa && !e.cuda_graphs &&
              !e.download_overlap);
  EXPECT_EQ(e.channels_last, ChannelsLast::Off);
}

TEST(Levers, EveryVariableSwitches) {
  {
    AllLevers on("1");
    const CudaLevers l = cuda_levers();
    EXPECT_TRUE(l.cudnn_benchmark && l.pinned_staging && l.upload_overlap && l.sdpa && l.cuda_graphs &&
                l.download_overlap);
    EXPECT_EQ(l.channels_last, ChannelsLast::Half);
  }
  {
    AllLevers off("off");
    const CudaLevers l = cuda_levers();
    EXPECT_FALSE(l.cudnn_benchmark || l.pinned_staging || l.upload_overlap || l.sdpa || l.cuda_graphs ||
                 l.download_overlap);
    EXPECT_EQ(l.channels_last, ChannelsLast::Off);
  }
  ScopedEnv always("GSTVAE_CHANNELS_LAST", "always");
  EXPECT_EQ(cuda_levers().channels_last, ChannelsLast::Always);
}

TEST(Levers, BadValueNamesTheVariableAtLoad) {
  for (const char* name : kLeverVariables) {
    SCOPED_TRACE(name);
    ScopedEnv bad(name, std::string(name) == "GSTVAE_SDPA" ? "always" : "maybe");
    EXPECT_THROW(cuda_levers(), VaeError);
    ModelOptions o;
    o.device = "cpu";
    const std::string msg = error_of<VaeError>([&] { load_encoder(Models::get().path("ldm", small_spec()), o); });
    EXPECT_TRUE(contains(msg, name)) << msg;
  }
}

TEST(Levers, InEffectOnlyOnCudaExceptChannelsLastAlways) {
  CudaLevers all;
  all.cudnn_benchmark = all.pinned_staging = all.upload_overlap = all.sdpa = true;
  all.cuda_graphs = all.download_overlap = true;
  all.channels_last = ChannelsLast::Half;
  for (Precision p : {Precision::F32, Precision::F16, Precision::BF16}) {
    SCOPED_TRACE(precision_name(p));
    EXPECT_EQ(levers_in_effect(all, /*cuda=*/false, p).bits(), 0) << "no lever takes effect on the CPU";
    const LeversInEffect cuda = levers_in_effect(all, true, p);
    EXPECT_TRUE(cuda.cudnn_benchmark && cuda.pinned_staging && cuda.upload_overlap);
    EXPECT_EQ(cuda.channels_last, p != Precision::F32) << "channels-last for bf16/fp16 only";
    EXPECT_EQ(cuda.sdpa, sdpa_built());
    EXPECT_EQ(cuda.cuda_graphs, cuda_built());
    EXPECT_EQ(cuda.download_overlap, cuda_built());
    const LeversInEffect defaults = levers_in_effect(CudaLevers{}, true, p);
    EXPECT_FALSE(defaults.channels_last || defaults.sdpa || defaults.cuda_graphs || defaults.download_overlap);
  }
  all.channels_last = ChannelsLast::Always;
  EXPECT_TRUE(levers_in_effect(all, false, Precision::F32).channels_last);
  EXPECT_TRUE(sdpa_built()) << "LibTorch >= 2.0 is required";
  EXPECT_EQ(cuda_built(), GSTVAE_TORCH_HAS_CUDA == 1);
}

TEST(Levers, DescriptionNamesEveryVariableAndWhatTookEffect) {
  CudaLevers l;
  l.channels_last = ChannelsLast::Half;
  const std::string cpu = describe_levers(l, "cpu", Precision::BF16);
  for (const char* name : kLeverVariables) EXPECT_TRUE(contains(cpu, name)) << cpu;
  EXPECT_TRUE(contains(cpu, "GSTVAE_CHANNELS_LAST=1")) << cpu;
  EXPECT_TRUE(contains(cpu, std::string("LibTorch ") + libtorch_version())) << cpu;
  EXPECT_TRUE(contains(cpu, "in effect on cpu bf16: none")) << cpu;
  const std::string cuda = describe_levers(l, "cuda:0", Precision::BF16);
  EXPECT_TRUE(contains(cuda, "in effect on cuda:0 bf16: cudnn_benchmark pinned_staging upload_overlap channels_last"))
      << cuda;
  EXPECT_FALSE(contains(cuda, " sdpa")) << cuda;
  EXPECT_FALSE(contains(cuda, " cuda_graphs")) << cuda;
  EXPECT_TRUE(contains(cpu, cuda_built() ? "CUDA code built" : "CUDA code not built")) << cpu;
  std::cout << "[ info     ] " << describe_levers(cuda_levers(), "cpu", Precision::F32) << "\n";
}

// On the CPU the levers (all switched away from their defaults, channels-last
// asked for bf16/fp16) change nothing: the same bits in fp32 and in bf16.
TEST(Levers, NoLeverChangesACpuResult) {
  const auto frames = rgb_frames(64, 48, 3);
  for (Precision p : {Precision::F32, Precision::BF16}) {
    SCOPED_TRACE(precision_name(p));
    ModelOptions o;
    o.device = "cpu";
    o.precision = p;
    const std::string path = Models::get().path("ldm", small_spec());
    std::shared_ptr<Encoder> plain;
    {
      AllLevers unset(nullptr);
      try {
        plain = load_encoder(path, o);
      } catch (const VaeError& e) {
        std::cout << "[ info     ] " << precision_name(p) << " on CPU fails at load: " << e.what() << "\n";
        continue;
      }
    }
    std::shared_ptr<Encoder> levered;
    {
      AllLevers flipped("0");
      ScopedEnv cl("GSTVAE_CHANNELS_LAST", "1");
      ScopedEnv sdpa("GSTVAE_SDPA", "1");
      ScopedEnv graphs("GSTVAE_CUDA_GRAPHS", "1");
      ScopedEnv overlap("GSTVAE_DOWNLOAD_OVERLAP", "1");
      levered = load_encoder(path, o);
      auto batch = levered->new_batch(PixelFormat::RGB, 64, 48, 1);
      EXPECT_FALSE(batch->pinned());
    }
    EXPECT_EQ(levered.get(), plain.get()) << "the same levers in effect: the cached encoder";
    const auto a = encode_frames(*plain, PixelFormat::RGB, 64, 48, frames, {0, 1, 2});
    {
      AllLevers flipped("0");
      ScopedEnv cl("GSTVAE_CHANNELS_LAST", "1");
      ScopedEnv sdpa("GSTVAE_SDPA", "1");
      ScopedEnv graphs("GSTVAE_CUDA_GRAPHS", "1");
      ScopedEnv overlap("GSTVAE_DOWNLOAD_OVERLAP", "1");
      const auto b = encode_frames(*levered, PixelFormat::RGB, 64, 48, frames, {0, 1, 2});
      ASSERT_EQ(a.size(), b.size());
      EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << "max |diff| " << max_abs_diff(a, b);
    }
  }
}

// GSTVAE_CHANNELS_LAST=always runs the channels-last path (weights and
// activations NHWC) on the CPU: in fp32 it gives the NCHW latents and frames
// to float rounding, from a model of its own (the cache keys on the levers).
TEST(Levers, ChannelsLastAlwaysAgreesWithNchwInFp32) {
  const std::string path = Models::get().path("full_ldm", full_vae_spec());
  const auto frames = rgb_frames(64, 48, 2);
  const std::vector<float> z = test_latents(2 * 4 * 5 * 3, 7);
  ModelOptions o;
  o.device = "cpu";
  o.precision = Precision::F32;
  std::shared_ptr<Encoder> nchw;
  std::shared_ptr<Decoder> nchw_dec;
  {
    ScopedEnv unset("GSTVAE_CHANNELS_LAST", nullptr);
    nchw = load_encoder(path, o);
    nchw_dec = load_decoder(path, o);
  }
  ScopedEnv always("GSTVAE_CHANNELS_LAST", "always");
  auto nhwc = load_encoder(path, o);
  auto nhwc_dec = load_decoder(path, o);
  EXPECT_NE(nhwc.get(), nchw.get()) << "another layout: another model";
  EXPECT_NE(nhwc_dec.get(), nchw_dec.get());
  const auto a = encode_frames(*nchw, PixelFormat::RGB, 64, 48, frames, {0, 1});
  const auto b = encode_frames(*nhwc, PixelFormat::RGB, 64, 48, frames, {0, 1});
  ASSERT_EQ(a.size(), b.size());
  EXPECT_TRUE(all_finite(b));
  EXPECT_LT(max_abs_diff(a, b), 1e-4 * std::max(1.0, max_abs(a)));
  const auto pa = decode_float(*nchw_dec, 5, 3, z);
  const auto pb = decode_float(*nhwc_dec, 5, 3, z);
  ASSERT_EQ(pa.size(), pb.size());
  EXPECT_LT(max_abs_diff(pa, pb), 1e-4);
  std::cout << "[ info     ] channels-last vs NCHW, fp32 CPU: latents max |diff| " << max_abs_diff(a, b)
            << ", frames " << max_abs_diff(pa, pb) << "\n";
}

// On a CUDA device (the GPU check runs engine-tests there; here they skip):
// a forward pass replayed from a CUDA graph gives the eager latents, through
// warm-up, capture, replays and a shape change; a download left in flight
// (GSTVAE_DOWNLOAD_OVERLAP) gives the synchronised latents once waited for.
std::shared_ptr<Encoder> cuda_fp32_encoder(const char* lever) {
  if (!at::hasCUDA()) return nullptr;
  ModelOptions o;
  o.device = "cuda";
  o.precision = Precision::F32;
  ScopedEnv on(lever, "1");
  return load_encoder(Models::get().path("ldm", small_spec()), o);
}

TEST(CudaPaths, GraphReplaysGiveTheEagerLatents) {
  std::shared_ptr<Encoder> graphed = cuda_fp32_encoder("GSTVAE_CUDA_GRAPHS");
  if (!graphed) GTEST_SKIP() << "no CUDA device: capture and replay run in the GPU check";
  ModelOptions o;
  o.device = "cuda";
  o.precision = Precision::F32;
  std::shared_ptr<Encoder> eager;
  {
    ScopedEnv off("GSTVAE_CUDA_GRAPHS", "0");
    eager = load_encoder(Models::get().path("ldm", small_spec()), o);
  }
  ASSERT_NE(graphed.get(), eager.get());
  for (auto [w, h] : {std::pair{64, 48}, std::pair{32, 24}}) {
    const auto frames = rgb_frames(w, h, 2, 77);
    const auto want = encode_frames(*eager, PixelFormat::RGB, w, h, frames, {0, 1});
    // 2 eager warm-ups, the capture (replayed once), then replays.
    for (int run = 0; run < 6; ++run) {
      SCOPED_TRACE(std::to_string(w) + "x" + std::to_string(h) + " run " + std::to_string(run));
      const auto got = encode_frames(*graphed, PixelFormat::RGB, w, h, frames, {0, 1});
      ASSERT_EQ(got.size(), want.size());
      EXPECT_LT(max_abs_diff(got, want), 1e-5 * std::max(1.0, max_abs(want)));
    }
  }
}

TEST(CudaPaths, AnOverlappedDownloadGivesTheSynchronisedLatents) {
  std::shared_ptr<Encoder> overlapped = cuda_fp32_encoder("GSTVAE_DOWNLOAD_OVERLAP");
  if (!overlapped) GTEST_SKIP() << "no CUDA device: the overlapped download runs in the GPU check";
  const auto frames = rgb_frames(64, 48, 3, 5);
  const auto want = encode_frames(*overlapped, PixelFormat::RGB, 64, 48, frames, {0, 1, 2});  // synchronised
  auto batch = overlapped->new_batch(PixelFormat::RGB, 64, 48, frames.size());
  for (size_t i = 0; i < frames.size(); ++i) batch->add(frames[i].pixels.data(), frames[i].stride, i);
  auto block = overlapped->new_latents(*batch);
  auto session = overlapped->open_session();
  session->encode(*batch, EncodeParams{}, *block);
  EXPECT_TRUE(block->has_pending_copy() || !block->pinned()) << "a pinned block's copy is left in flight";
  block->wait_ready();
  EXPECT_FALSE(block->has_pending_copy());
  const std::vector<float> got(block->data(), block->data() + want.size());
  EXPECT_EQ(std::memcmp(got.data(), want.data(), want.size() * sizeof(float)), 0) << max_abs_diff(got, want);
}

}  // namespace
}  // namespace gstvae
