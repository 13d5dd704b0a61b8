// The Wan video VAEs through the engine's session interface, on small random
// checkpoints written here. Encoders: chunk-plan invariance, the clip end
// (drop or pad), resets, separate streams on one shared model, bounded
// state, and the errors. Decoders: frames per latent and their spans,
// batching invariance, resets, image sessions, bounded state. The numbers
// against the float64 references are checked by tests/python/crosscheck_wan.py
// and crosscheck_video_decode.py.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "decoder.h"
#include "encoder.h"
#include "errors.h"
#include "fixtures.h"
#include "safetensors.h"

namespace gstvae {
namespace {

using test::TempDir;

struct WanSpec {
  bool wan22 = false;
  int64_t dim = 8;
  int64_t z = 4;
  uint64_t seed = 3;
  bool decoder = false;  // Wan 2.1's decoder and conv2 too (width 4 * dim)
};

// The official names and shapes of a Wan encoder (see wan_vae.cpp), random
// values scaled so that activations stay of order 1.
void write_wan(const std::string& path, const WanSpec& spec) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
  auto conv3 = [&](const std::string& n, int64_t o, int64_t i, int64_t kt, int64_t ks) {
    shapes.push_back({n + ".weight", {o, i, kt, ks, ks}});
    shapes.push_back({n + ".bias", {o}});
  };
  auto block = [&](const std::string& n, int64_t i, int64_t o) {
    shapes.push_back({n + ".residual.0.gamma", {i, 1, 1, 1}});
    conv3(n + ".residual.2", o, i, 3, 3);
    shapes.push_back({n + ".residual.3.gamma", {o, 1, 1, 1}});
    conv3(n + ".residual.6", o, o, 3, 3);
    if (i != o) conv3(n + ".shortcut", o, i, 1, 1);
  };
  const int64_t d = spec.dim;
  conv3("encoder.conv1", d, spec.wan22 ? 12 : 3, 3, 3);
  const int64_t widths[4] = {d, 2 * d, 4 * d, 4 * d};
  int64_t in = d;
  for (int level = 0; level < 4; ++level) {
    const std::string base = spec.wan22 ? "encoder.downsamples." + std::to_string(level) + ".downsamples." : "encoder.downsamples.";
    const int first = spec.wan22 ? 0 : level * 3;
    block(base + std::to_string(first), in, widths[level]);
    block(base + std::to_string(first + 1), widths[level], widths[level]);
    if (level < 3) {
      const std::string r = base + std::to_string(first + 2);
      shapes.push_back({r + ".resample.1.weight", {widths[level], widths[level], 3, 3}});
      shapes.push_back({r + ".resample.1.bias", {widths[level]}});
      if (level >= 1) conv3(r + ".time_conv", widths[level], widths[level], 3, 1);
    }
    in = widths[level];
  }
  block("encoder.middle.0", in, in);
  shapes.push_back({"encoder.middle.1.norm.gamma", {in, 1, 1}});
  shapes.push_back({"encoder.middle.1.to_qkv.weight", {3 * in, in, 1, 1}});
  shapes.push_back({"encoder.middle.1.to_qkv.bias", {3 * in}});
  shapes.push_back({"encoder.middle.1.proj.weight", {in, in, 1, 1}});
  shapes.push_back({"encoder.middle.1.proj.bias", {in}});
  block("encoder.middle.2", in, in);
  shapes.push_back({"encoder.head.0.gamma", {in, 1, 1, 1}});
  conv3("encoder.head.2", 2 * spec.z, in, 3, 3);
  conv3("conv1", 2 * spec.z, 2 * spec.z, 1, 1);
  if (spec.decoder && !spec.wan22) {
    // Wan 2.1's decoder: widths [4d, 4d, 4d, 2d, d], each level after the
    // first taking half its predecessor's width (the upsamplings halve it).
    const int64_t dims[5] = {4 * d, 4 * d, 4 * d, 2 * d, d};
    conv3("conv2", spec.z, spec.z, 1, 1);
    conv3("decoder.conv1", dims[0], spec.z, 3, 3);
    block("decoder.middle.0", dims[0], dims[0]);
    shapes.push_back({"decoder.middle.1.norm.gamma", {dims[0], 1, 1}});
    shapes.push_back({"decoder.middle.1.to_qkv.weight", {3 * dims[0], dims[0], 1, 1}});
    shapes.push_back({"decoder.middle.1.to_qkv.bias", {3 * dims[0]}});
    shapes.push_back({"decoder.middle.1.proj.weight", {dims[0], dims[0], 1, 1}});
    shapes.push_back({"decoder.middle.1.proj.bias", {dims[0]}});
    block("decoder.middle.2", dims[0], dims[0]);
    for (int level = 0; level < 4; ++level) {
      int64_t i = level == 0 ? dims[0] : dims[level] / 2;
      const int64_t o = dims[level + 1];
      for (int j = 0; j < 3; ++j, i = o) block("decoder.upsamples." + std::to_string(level * 4 + j), i, o);
      if (level < 3) {
        const std::string r = "decoder.upsamples." + std::to_string(level * 4 + 3);
        shapes.push_back({r + ".resample.1.weight", {o / 2, o, 3, 3}});
        shapes.push_back({r + ".resample.1.bias", {o / 2}});
        if (level < 2) conv3(r + ".time_conv", 2 * o, o, 3, 1);
      }
    }
    shapes.push_back({"decoder.head.0.gamma", {d, 1, 1, 1}});
    conv3("decoder.head.2", 3, d, 3, 3);
  }

  std::mt19937_64 rng(spec.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<std::vector<float>> data;
  std::vector<TensorToWrite> tensors;
  for (const auto& [name, shape] : shapes) {
    int64_t n = 1, fan_in = 1;
    for (size_t i = 0; i < shape.size(); ++i) {
      n *= shape[i];
      if (i > 0) fan_in *= shape[i];
    }
    std::vector<float> v(static_cast<size_t>(n));
    const bool gamma = name.find("gamma") != std::string::npos;
    const bool bias = name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
    const float s = bias ? 0.1f : 1.0f / std::sqrt(static_cast<float>(fan_in));
    for (float& x : v) x = gamma ? 1.0f + 0.1f * normal(rng) : s * normal(rng);
    data.push_back(std::move(v));
  }
  for (size_t i = 0; i < shapes.size(); ++i)
    tensors.push_back({shapes[i].first, DType::F32, shapes[i].second, data[i].data()});
  write_safetensors(path, tensors);
}

ModelOptions cpu() {
  ModelOptions o;
  o.device = "cpu";
  o.precision = Precision::F32;
  o.threads = 2;
  return o;
}

constexpr int kWidth = 40, kHeight = 24;

std::vector<std::vector<uint8_t>> make_clip(size_t frames, uint64_t seed) {
  std::vector<std::vector<uint8_t>> clip;
  for (size_t i = 0; i < frames; ++i) clip.push_back(test::make_frame(kWidth, kHeight, 3, kWidth * 3, seed + i));
  return clip;
}

struct Stream {
  std::vector<std::vector<float>> latents;
  std::vector<Span> spans;
  Span dropped{0, 0};
  uint32_t padded = 0;
};

// Feeds `clip` to `session` in batches of the sizes in `plan` (cycled), the
// last batch ending the clip when `end` is set.
Stream run(Encoder& enc, EncodeSession& session, const std::vector<std::vector<uint8_t>>& clip,
           std::vector<size_t> plan, bool end = true, EncodeParams params = {}, uint64_t first_index = 0) {
  Stream s;
  size_t next = 0, step = 0;
  while (next < clip.size() || (end && next == clip.size() && clip.empty())) {
    const size_t n = std::min(plan[step++ % plan.size()], clip.size() - next);
    auto batch = enc.new_batch(PixelFormat::RGB, kWidth, kHeight, std::max<size_t>(n, 1));
    for (size_t i = 0; i < n; ++i) batch->add(clip[next + i].data(), kWidth * 3, first_index + next + i);
    next += n;
    params.end_of_clip = end && next == clip.size();
    auto block = enc.new_latents(*batch);
    const BatchResult r = session.encode(*batch, params, *block);
    const size_t per = enc.latent_floats_per_frame(*batch);
    for (size_t i = 0; i < r.spans.size(); ++i)
      s.latents.emplace_back(block->data() + i * per, block->data() + (i + 1) * per);
    s.spans.insert(s.spans.end(), r.spans.begin(), r.spans.end());
    if (r.dropped.count) s.dropped = r.dropped;
    s.padded += r.padded_frames;
    if (clip.empty()) break;
  }
  return s;
}

double rel_diff(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  double diff = 0, peak = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    for (size_t j = 0; j < a[i].size(); ++j) {
      diff = std::max(diff, static_cast<double>(std::fabs(a[i][j] - b[i][j])));
      peak = std::max(peak, static_cast<double>(std::fabs(b[i][j])));
    }
  return peak > 0 ? diff / peak : diff;
}

class WanEncoderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_.file("wan_2.1_vae.safetensors");
    write_wan(path_, WanSpec{});
    enc_ = load_encoder(path_, cpu());
  }
  TempDir dir_;
  std::string path_;
  std::shared_ptr<Encoder> enc_;
};

TEST_F(WanEncoderTest, Info) {
  const EncoderInfo& info = enc_->info();
  EXPECT_EQ(info.family, "wan2.1");
  EXPECT_EQ(info.temporal_downscale, 4);
  EXPECT_EQ(info.downscale, 8);
  EXPECT_EQ(info.latent_channels, 4);
  EXPECT_EQ(info.layout, "official");
  EXPECT_NE(info.architecture.find("Wan 2.1"), std::string::npos) << info.architecture;
}

TEST_F(WanEncoderTest, DirectEncodeRefusedOutsideASession) {
  auto batch = enc_->new_batch(PixelFormat::RGB, kWidth, kHeight, 1);
  const auto frame = make_clip(1, 1)[0];
  batch->add(frame.data(), kWidth * 3, 0);
  std::vector<float> out(enc_->latent_floats_per_frame(*batch));
  try {
    enc_->encode(*batch, EncodeParams{}, out.data());
    FAIL() << "a video VAE encoded without a session";
  } catch (const VaeError& e) {
    EXPECT_NE(std::string(e.what()).find("session"), std::string::npos) << e.what();
  }
}

// Frame 0 alone, then one latent per group of 4, whatever the batches.
TEST_F(WanEncoderTest, ChunkPlansGiveTheSameLatents) {
  const auto clip = make_clip(13, 10);
  auto whole = enc_->open_session();
  const Stream ref = run(*enc_, *whole, clip, {13});
  ASSERT_EQ(ref.latents.size(), 4u);
  const std::vector<Span> expected = {{0, 1}, {1, 4}, {5, 4}, {9, 4}};
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(ref.spans[i].first, expected[i].first);
    EXPECT_EQ(ref.spans[i].count, expected[i].count);
  }
  for (std::vector<size_t> plan : {std::vector<size_t>{1}, {2}, {5}, {3, 7}, {16}}) {
    SCOPED_TRACE("per-batch " + std::to_string(plan[0]));
    auto session = enc_->open_session();
    const Stream s = run(*enc_, *session, clip, plan);
    ASSERT_EQ(s.latents.size(), 4u);
    EXPECT_LE(rel_diff(s.latents, ref.latents), 1e-5);
    EXPECT_EQ(s.dropped.count, 0u);
  }
}

// Latent 0 goes out with frame 0; a group's latent as soon as its 4th frame comes.
TEST_F(WanEncoderTest, LatentsGoOutAsSoonAsTheirGroupIsComplete) {
  const auto clip = make_clip(6, 20);
  auto session = enc_->open_session();
  std::vector<size_t> outputs;
  for (size_t i = 0; i < clip.size(); ++i) {
    auto batch = enc_->new_batch(PixelFormat::RGB, kWidth, kHeight, 1);
    batch->add(clip[i].data(), kWidth * 3, i);
    auto block = enc_->new_latents(*batch);
    outputs.push_back(session->encode(*batch, EncodeParams{}, *block).spans.size());
    EXPECT_EQ(session->held_frames(), i == 0 ? 0u : (i % 4 == 0 ? 0u : i % 4));
  }
  EXPECT_EQ(outputs, (std::vector<size_t>{1, 0, 0, 0, 1, 0}));
}

// The first k latents of a long clip are those of its prefix.
TEST_F(WanEncoderTest, PrefixStability) {
  const auto clip = make_clip(13, 30);
  auto a = enc_->open_session(), b = enc_->open_session();
  const Stream full = run(*enc_, *a, clip, {4});
  const Stream prefix = run(*enc_, *b, std::vector<std::vector<uint8_t>>(clip.begin(), clip.begin() + 5), {4});
  ASSERT_EQ(prefix.latents.size(), 2u);
  EXPECT_LE(rel_diff(prefix.latents, std::vector<std::vector<float>>(full.latents.begin(), full.latents.begin() + 2)),
            1e-5);
}

TEST_F(WanEncoderTest, ClipEndDropsOrPadsTheIncompleteGroup) {
  const auto clip = make_clip(7, 40);
  auto session = enc_->open_session();
  const Stream dropped = run(*enc_, *session, clip, {3});
  ASSERT_EQ(dropped.latents.size(), 2u);
  EXPECT_EQ(dropped.dropped.first, 5u);
  EXPECT_EQ(dropped.dropped.count, 2u);
  EXPECT_EQ(dropped.padded, 0u);
  EXPECT_EQ(session->held_frames(), 0u);

  EncodeParams pad;
  pad.pad_clip_end = true;
  auto padded_session = enc_->open_session();
  const Stream padded = run(*enc_, *padded_session, clip, {3}, true, pad);
  ASSERT_EQ(padded.latents.size(), 3u);
  EXPECT_EQ(padded.spans[2].first, 5u);
  EXPECT_EQ(padded.spans[2].count, 2u);
  EXPECT_EQ(padded.padded, 2u);
  EXPECT_EQ(padded.dropped.count, 0u);
  EXPECT_LE(rel_diff(std::vector<std::vector<float>>(padded.latents.begin(), padded.latents.begin() + 2),
                     dropped.latents),
            1e-5);
  // The padded latent is the encode of frames 5, 6, 6, 6.
  std::vector<std::vector<uint8_t>> repeated(clip.begin(), clip.end());
  repeated.push_back(clip[6]);
  repeated.push_back(clip[6]);
  auto plain = enc_->open_session();
  const Stream by_hand = run(*enc_, *plain, repeated, {9});
  ASSERT_EQ(by_hand.latents.size(), 3u);
  EXPECT_LE(rel_diff(padded.latents, by_hand.latents), 1e-5);
}

// After a clip end or a reset, the next frame is a new frame 0.
TEST_F(WanEncoderTest, ClipEndAndResetStartANewClip) {
  const auto first = make_clip(6, 50), second = make_clip(5, 60);
  auto fresh = enc_->open_session();
  const Stream ref = run(*enc_, *fresh, second, {5});

  auto ended = enc_->open_session();
  run(*enc_, *ended, first, {6}, /*end=*/true);
  const Stream after_end = run(*enc_, *ended, second, {5}, true, {}, 6);
  ASSERT_EQ(after_end.latents.size(), 2u);
  EXPECT_EQ(after_end.spans[0].first, 6u);
  EXPECT_EQ(after_end.spans[0].count, 1u);
  EXPECT_LE(rel_diff(after_end.latents, ref.latents), 1e-5);

  auto reset = enc_->open_session();
  run(*enc_, *reset, first, {6}, /*end=*/false);
  EXPECT_EQ(reset->held_frames(), 1u);
  reset->reset();
  EXPECT_EQ(reset->held_frames(), 0u);
  const Stream after_reset = run(*enc_, *reset, second, {2});
  EXPECT_LE(rel_diff(after_reset.latents, ref.latents), 1e-5);
}

// Two streams on one shared model keep separate states.
TEST_F(WanEncoderTest, InterleavedSessionsAreIndependent) {
  const auto a = make_clip(9, 70), b = make_clip(9, 80);
  auto solo_a = enc_->open_session(), solo_b = enc_->open_session();
  const Stream ref_a = run(*enc_, *solo_a, a, {9}), ref_b = run(*enc_, *solo_b, b, {9});
  auto sa = enc_->open_session(), sb = enc_->open_session();
  Stream got_a, got_b;
  for (size_t start = 0; start < 9; start += 3) {
    const std::vector<std::vector<uint8_t>> part_a(a.begin() + start, a.begin() + start + 3),
        part_b(b.begin() + start, b.begin() + start + 3);
    const bool last = start + 3 == 9;
    Stream x = run(*enc_, *sa, part_a, {3}, last, {}, start), y = run(*enc_, *sb, part_b, {3}, last, {}, start);
    got_a.latents.insert(got_a.latents.end(), x.latents.begin(), x.latents.end());
    got_b.latents.insert(got_b.latents.end(), y.latents.begin(), y.latents.end());
  }
  ASSERT_EQ(got_a.latents.size(), 3u);
  ASSERT_EQ(got_b.latents.size(), 3u);
  EXPECT_LE(rel_diff(got_a.latents, ref_a.latents), 1e-5);
  EXPECT_LE(rel_diff(got_b.latents, ref_b.latents), 1e-5);
  EXPECT_GT(rel_diff(got_a.latents, ref_b.latents), 1e-2) << "the two clips should differ";
}

// The state is bounded by the frame size: it does not grow with the stream.
TEST_F(WanEncoderTest, StateDoesNotGrowWithTheStream) {
  const auto clip = make_clip(8, 90);
  auto session = enc_->open_session();
  size_t after_warm_up = 0;
  for (int round = 0; round < 12; ++round) {
    run(*enc_, *session, clip, {3}, /*end=*/false, {}, static_cast<uint64_t>(round) * 8);
    if (round == 2) after_warm_up = session->state_bytes();
    ASSERT_LE(session->held_frames(), 3u);
  }
  EXPECT_GT(after_warm_up, 0u);
  EXPECT_EQ(session->state_bytes(), after_warm_up);
}

size_t resident_bytes() {
  long pages = 0, resident = 0;
  if (FILE* f = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
    std::fclose(f);
  }
  return static_cast<size_t>(resident) * static_cast<size_t>(sysconf(_SC_PAGESIZE));
}

// Soak: 5,000 frames through one session in batches of 16; the process's
// resident memory after warm-up stays within 5 %.
TEST_F(WanEncoderTest, SoakFiveThousandFramesWithFlatMemory) {
  constexpr int kSide = 16;
  constexpr size_t kFrames = 5000, kBatch = 16;
  std::vector<std::vector<uint8_t>> frames;
  for (int i = 0; i < 8; ++i) frames.push_back(test::make_frame(kSide, kSide, 3, kSide * 3, 200 + i));
  auto session = enc_->open_session();
  auto batch = enc_->new_batch(PixelFormat::RGB, kSide, kSide, kBatch);
  size_t latents = 0, warm = 0, peak = 0;
  for (size_t i = 0; i < kFrames; ++i) {
    batch->add(frames[i % frames.size()].data(), kSide * 3, i);
    if (batch->full() || i + 1 == kFrames) {
      EncodeParams params;
      params.end_of_clip = i + 1 == kFrames;
      auto block = enc_->new_latents(*batch);
      latents += session->encode(*batch, params, *block).spans.size();
      batch->clear();
      if (i >= 500 && !warm) warm = resident_bytes();
      if (warm) peak = std::max(peak, resident_bytes());
    }
  }
  EXPECT_EQ(latents, 1 + (kFrames - 1) / 4);
  ASSERT_GT(warm, 0u);
  EXPECT_LE(static_cast<double>(peak), 1.05 * static_cast<double>(warm))
      << "resident memory grew from " << warm << " to " << peak << " bytes";
}

TEST_F(WanEncoderTest, SamplingDependsOnTheSeedNotTheBatching) {
  const auto clip = make_clip(5, 100);
  EncodeParams sample;
  sample.sample = true;
  sample.seed = 7;
  auto a = enc_->open_session(), b = enc_->open_session(), c = enc_->open_session();
  const Stream x = run(*enc_, *a, clip, {5}, true, sample), y = run(*enc_, *b, clip, {1}, true, sample);
  EXPECT_LE(rel_diff(x.latents, y.latents), 1e-5);
  const Stream mean = run(*enc_, *c, clip, {5});
  EXPECT_GT(rel_diff(x.latents, mean.latents), 1e-3) << "sampling changed nothing";
}

TEST_F(WanEncoderTest, FrameSizeChangeInsideAClipIsAnError) {
  auto session = enc_->open_session();
  run(*enc_, *session, make_clip(2, 110), {2}, /*end=*/false);
  auto batch = enc_->new_batch(PixelFormat::RGB, 48, 32, 1);
  const auto big = test::make_frame(48, 32, 3, 48 * 3, 1);
  batch->add(big.data(), 48 * 3, 2);
  auto block = enc_->new_latents(*batch);
  EXPECT_THROW(session->encode(*batch, EncodeParams{}, *block), VaeError);
}

TEST(WanEncoderLoad, Wan22AndNormalisedFormats) {
  TempDir dir;
  const std::string path = dir.file("wan2.2_vae.safetensors");
  WanSpec spec;
  spec.wan22 = true;
  spec.z = 48;
  write_wan(path, spec);
  auto enc = load_encoder(path, cpu());
  EXPECT_EQ(enc->info().family, "wan2.2");
  EXPECT_EQ(enc->info().downscale, 16);
  EXPECT_EQ(enc->info().latent_channels, 48);
  // wan22 normalises 48 channels; wan21 (16) does not fit them.
  auto session = enc->open_session();
  auto batch = enc->new_batch(PixelFormat::RGB, 32, 32, 1);
  const auto frame = test::make_frame(32, 32, 3, 32 * 3, 1);
  batch->add(frame.data(), 32 * 3, 0);
  EncodeParams raw, w22, w21;
  w22.latent_format = latent_format_by_name("wan22");
  w21.latent_format = latent_format_by_name("wan21");
  auto block = enc->new_latents(*batch);
  session->encode(*batch, raw, *block);
  const std::vector<float> r(block->data(), block->data() + enc->latent_floats_per_frame(*batch));
  session->reset();
  session->encode(*batch, w22, *block);
  // Channel 0: (raw - mean_0) / std_0.
  const LatentFormat f = w22.latent_format;
  EXPECT_NEAR(block->data()[0], (r[0] - f.shift_of(0)) * f.scale_of(0), 1e-4);
  session->reset();
  EXPECT_THROW(session->encode(*batch, w21, *block), VaeError);
}

TEST(WanEncoderLoad, RgbaVariantsAreRefusedClearly) {
  TempDir dir;
  const std::string path = dir.file("rgba.safetensors");
  // A 4-channel conv1 alone is enough to be detected as Wan and refused.
  std::vector<float> w(8 * 4 * 27, 0.0f), b(8, 0.0f);
  write_safetensors(path, {{"encoder.conv1.weight", DType::F32, {8, 4, 3, 3, 3}, w.data()},
                           {"encoder.conv1.bias", DType::F32, {8}, b.data()}});
  try {
    load_encoder(path, cpu());
    FAIL() << "a 4-channel Wan encoder loaded";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("4 input channels"), std::string::npos) << e.what();
  }
}

/* ------------------------------------------------------------------ decoder */

constexpr int kLatentW = 5, kLatentH = 3;

// Latents of order 1, one clip.
std::vector<std::vector<float>> make_latents(size_t n, int channels, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<std::vector<float>> latents(n, std::vector<float>(static_cast<size_t>(channels) * kLatentW * kLatentH));
  for (auto& l : latents)
    for (float& x : l) x = normal(rng);
  return latents;
}

struct Frames {
  std::vector<std::vector<float>> frames;  // 3 x H x W float in [0, 1] each
  std::vector<Span> spans;
};

// Feeds `latents` to `session` in batches of the sizes in `plan` (cycled).
Frames decode_run(Decoder& dec, DecodeSession& session, const std::vector<std::vector<float>>& latents,
                  std::vector<size_t> plan, int frames_per_latent, uint64_t first_index = 0) {
  Frames f;
  const size_t per_frame = 3 * static_cast<size_t>(kLatentW * 8) * (kLatentH * 8);
  size_t next = 0, step = 0;
  while (next < latents.size()) {
    const size_t n = std::min(plan[step++ % plan.size()], latents.size() - next);
    auto batch = dec.new_batch(kLatentH, kLatentW, n);
    for (size_t i = 0; i < n; ++i) batch->add(latents[next + i].data(), first_index + next + i);
    next += n;
    std::vector<float> out(n * frames_per_latent * per_frame);
    const BatchResult r = session.decode_float(*batch, DecodeParams{}, out.data());
    for (size_t i = 0; i < r.spans.size(); ++i)
      f.frames.emplace_back(out.begin() + i * per_frame, out.begin() + (i + 1) * per_frame);
    f.spans.insert(f.spans.end(), r.spans.begin(), r.spans.end());
  }
  return f;
}

class WanDecoderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_.file("wan_2.1_vae.safetensors");
    WanSpec spec;
    spec.decoder = true;
    write_wan(path_, spec);
    dec_ = load_decoder(path_, cpu());
  }
  TempDir dir_;
  std::string path_;
  std::shared_ptr<Decoder> dec_;
};

TEST_F(WanDecoderTest, Info) {
  const DecoderInfo& info = dec_->info();
  EXPECT_EQ(info.family, "wan2.1");
  EXPECT_EQ(info.upscale, 8);
  EXPECT_EQ(info.temporal_upscale, 4);
  EXPECT_EQ(info.latent_channels, 4);
  EXPECT_TRUE(info.output_signed);
  EXPECT_TRUE(info.native_format.is_raw());
}

// Latent 0 gives one frame, each later latent 4, each frame naming its
// latent and its share of the latent's time.
TEST_F(WanDecoderTest, FramesPerLatentAndTheirSpans) {
  auto session = dec_->open_session(4);
  const Frames f = decode_run(*dec_, *session, make_latents(3, 4, 1), {3}, 4, 10);
  ASSERT_EQ(f.frames.size(), 9u);
  EXPECT_EQ(f.spans[0].first, 10u);
  EXPECT_EQ(f.spans[0].parts, 1u);
  for (size_t i = 1; i < 9; ++i) {
    EXPECT_EQ(f.spans[i].first, 10u + 1 + (i - 1) / 4) << i;
    EXPECT_EQ(f.spans[i].count, 1u);
    EXPECT_EQ(f.spans[i].part, (i - 1) % 4) << i;
    EXPECT_EQ(f.spans[i].parts, 4u);
  }
}

// Any batching of a clip gives the frames of one batch (the state carries).
TEST_F(WanDecoderTest, BatchingDoesNotChangeTheFrames) {
  const auto latents = make_latents(6, 4, 2);
  auto whole_session = dec_->open_session(4);
  const Frames whole = decode_run(*dec_, *whole_session, latents, {6}, 4);
  ASSERT_EQ(whole.frames.size(), 21u);
  for (const std::vector<size_t>& plan : std::vector<std::vector<size_t>>{{1}, {2}, {1, 4}, {5}, {3, 1}}) {
    auto session = dec_->open_session(4);
    const Frames f = decode_run(*dec_, *session, latents, plan, 4);
    ASSERT_EQ(f.frames.size(), whole.frames.size());
    EXPECT_LT(rel_diff(f.frames, whole.frames), 1e-5) << "plan starting " << plan[0];
  }
}

// After reset() the next latent is a clip's first again: one frame, the one
// a fresh session gives; and two sessions on the one decoder do not mix.
TEST_F(WanDecoderTest, ResetAndSeparateSessions) {
  const auto a = make_latents(3, 4, 3), b = make_latents(2, 4, 4);
  auto fresh = dec_->open_session(4);
  const Frames b_alone = decode_run(*dec_, *fresh, b, {2}, 4);
  auto session = dec_->open_session(4);
  auto other = dec_->open_session(4);
  decode_run(*dec_, *session, a, {3}, 4);
  const Frames interleaved = decode_run(*dec_, *other, b, {1}, 4);
  EXPECT_LT(rel_diff(interleaved.frames, b_alone.frames), 1e-5);
  session->reset();
  const Frames after = decode_run(*dec_, *session, b, {2}, 4);
  ASSERT_EQ(after.frames.size(), 5u);
  EXPECT_LT(rel_diff(after.frames, b_alone.frames), 1e-5);
}

// An image session decodes each latent as a clip's first.
TEST_F(WanDecoderTest, ImageSessionDecodesEachLatentAlone) {
  const auto latents = make_latents(3, 4, 5);
  auto images = dec_->open_session(1);
  const Frames f = decode_run(*dec_, *images, latents, {3}, 1);
  ASSERT_EQ(f.frames.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    auto video = dec_->open_session(4);
    const Frames first = decode_run(*dec_, *video, {latents[i]}, {1}, 4);
    EXPECT_LT(rel_diff({f.frames[i]}, first.frames), 1e-5) << i;
  }
}

TEST_F(WanDecoderTest, StateIsBoundedAndSessionKindsChecked) {
  auto session = dec_->open_session(4);
  EXPECT_EQ(session->state_bytes(), 0u);
  decode_run(*dec_, *session, make_latents(3, 4, 6), {3}, 4);
  const size_t after3 = session->state_bytes();
  EXPECT_GT(after3, 0u);
  decode_run(*dec_, *session, make_latents(8, 4, 7), {2}, 4, 3);
  EXPECT_EQ(session->state_bytes(), after3);
  EXPECT_THROW(dec_->open_session(2), VaeError);
  EXPECT_THROW(dec_->open_session(8), VaeError);
}

// Image VAE decoders have no video sessions.
TEST(WanDecoderLoad, ImageDecodersRefuseVideoSessions) {
  TempDir dir;
  const std::string path = dir.file("kl.safetensors");
  test::VaeSpec spec;
  spec.full_decoder = true;
  test::write_test_vae(path, spec);
  auto kl = load_decoder(path, cpu());
  EXPECT_EQ(kl->info().temporal_upscale, 1);
  try {
    kl->open_session(4);
    FAIL() << "an image decoder opened a video session";
  } catch (const VaeError& e) {
    EXPECT_NE(std::string(e.what()).find("decodes images"), std::string::npos) << e.what();
  }
}

TEST(WanDecoderLoad, OtherOutputChannelsAreRefusedClearly) {
  TempDir dir;
  const std::string path = dir.file("rgba_decoder.safetensors");
  std::vector<float> w(16 * 4 * 27, 0.0f), b(16, 0.0f), head(4 * 8 * 27, 0.0f), hb(4, 0.0f);
  write_safetensors(path, {{"decoder.conv1.weight", DType::F32, {16, 4, 3, 3, 3}, w.data()},
                           {"decoder.conv1.bias", DType::F32, {16}, b.data()},
                           {"decoder.head.2.weight", DType::F32, {4, 8, 3, 3, 3}, head.data()},
                           {"decoder.head.2.bias", DType::F32, {4}, hb.data()}});
  try {
    load_decoder(path, cpu());
    FAIL() << "a 4-channel Wan decoder loaded";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("gives 4 channels"), std::string::npos) << e.what();
  }
}

// No silent misloads (tensor_usage.h): no other family loads a Wan file even
// when forced, and a stray tensor in either half fails that half's load.
TEST(WanMisloads, OnlyWanLoadsItAndStraysAreNamed) {
  TempDir dir;
  WanSpec spec;
  spec.decoder = true;
  const std::string clean = dir.file("wan.safetensors");
  write_wan(clean, spec);
  for (bool decoder : {false, true}) {
    SCOPED_TRACE(decoder ? "decoder" : "encoder");
    std::vector<std::string> faults;
    EXPECT_EQ(test::families_that_load(clean, decoder, cpu(), &faults), std::vector<std::string>{"wan"});
    EXPECT_TRUE(faults.empty()) << faults.front();
  }
  const std::string enc_stray = dir.file("wan_enc_stray.safetensors");
  test::copy_with_extra_tensor(clean, enc_stray, "encoder.middle.3.weight");
  const std::string err = test::error_of<CheckpointError>([&] { load_encoder(enc_stray, cpu()); });
  EXPECT_TRUE(test::contains(err, "'encoder.middle.3.weight'") && test::contains(err, "Wan VAE encoder")) << err;
  EXPECT_NO_THROW(load_decoder(enc_stray, cpu()));
  const std::string dec_stray = dir.file("wan_dec_stray.safetensors");
  test::copy_with_extra_tensor(clean, dec_stray, "decoder.middle.3.weight");
  const std::string derr = test::error_of<CheckpointError>([&] { load_decoder(dec_stray, cpu()); });
  EXPECT_TRUE(test::contains(derr, "'decoder.middle.3.weight'") && test::contains(derr, "Wan VAE decoder")) << derr;
  EXPECT_NO_THROW(load_encoder(dec_stray, cpu()));
}

}  // namespace
}  // namespace gstvae
