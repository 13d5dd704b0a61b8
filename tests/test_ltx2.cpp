// The LTX-2 video VAE encoder through the engine's session interface, on a
// small random checkpoint written here (every block kind, the `config`
// metadata official files carry). Chunk-plan invariance, when latents go out,
// the clip end (drop or pad), resets, bounded state, the latent formats (the
// file's statistics), and the errors. The numbers against the float64
// reference are checked by tests/python/crosscheck_ltx2.py.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "encoder.h"
#include "errors.h"
#include "fixtures.h"
#include "safetensors.h"

namespace gstvae {
namespace {

using test::TempDir;

constexpr int64_t kZ = 8;
constexpr int kWidth = 64, kHeight = 64;  // 2 x 2 latents

const char* kConfig =
    R"({"vae": {"_class_name": "CausalVideoAutoencoder", "dims": 3, "in_channels": 3, "latent_channels": 8,
        "encoder_blocks": [["res_x", {"num_layers": 1}], ["compress_space_res", {"multiplier": 2}],
                           ["res_x", 1], ["compress_time_res", {"multiplier": 2}],
                           ["compress_all_res", {"multiplier": 2}], ["compress_all_res", {"multiplier": 2}],
                           ["res_x", {"num_layers": 1}]],
        "patch_size": 4, "norm_layer": "pixel_norm", "latent_log_var": "uniform",
        "encoder_spatial_padding_mode": "zeros", "decoder_spatial_padding_mode": "reflect"}})";

// The official names ("vae." + ...) and shapes of kConfig's encoder, random
// values scaled so that activations stay of order 1; statistics mean 0.1 c,
// std 0.5 + 0.1 c.
void write_ltx2(const std::string& path, const std::string& prefix = "vae.", const char* config = kConfig,
                const std::string& stray = "") {
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
  auto conv = [&](const std::string& n, int64_t o, int64_t i) {
    shapes.push_back({prefix + n + ".conv.weight", {o, i, 3, 3, 3}});
    shapes.push_back({prefix + n + ".conv.bias", {o}});
  };
  conv("encoder.conv_in", kZ, 48);
  conv("encoder.down_blocks.0.res_blocks.0.conv1", kZ, kZ);
  conv("encoder.down_blocks.0.res_blocks.0.conv2", kZ, kZ);
  conv("encoder.down_blocks.1.conv", kZ / 2, kZ);      // space: 2C / 4
  conv("encoder.down_blocks.2.res_blocks.0.conv1", 2 * kZ, 2 * kZ);
  conv("encoder.down_blocks.2.res_blocks.0.conv2", 2 * kZ, 2 * kZ);
  conv("encoder.down_blocks.3.conv", 2 * kZ, 2 * kZ);  // time: 2C / 2
  conv("encoder.down_blocks.4.conv", kZ, 4 * kZ);      // all: 2C / 8
  conv("encoder.down_blocks.5.conv", 2 * kZ, 8 * kZ);
  conv("encoder.down_blocks.6.res_blocks.0.conv1", 16 * kZ, 16 * kZ);
  conv("encoder.down_blocks.6.res_blocks.0.conv2", 16 * kZ, 16 * kZ);
  conv("encoder.conv_out", kZ + 1, 16 * kZ);
  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<std::vector<float>> data;
  for (const auto& [name, shape] : shapes) {
    int64_t n = 1, fan_in = 1;
    for (size_t i = 0; i < shape.size(); ++i) n *= shape[i], fan_in *= i > 0 ? shape[i] : 1;
    const bool bias = shape.size() == 1;
    std::vector<float> v(static_cast<size_t>(n));
    for (float& x : v) x = (bias ? 0.1f : 1.0f / std::sqrt(static_cast<float>(fan_in))) * normal(rng);
    data.push_back(std::move(v));
  }
  std::vector<float> mean(kZ), std(kZ);
  for (int64_t c = 0; c < kZ; ++c) mean[c] = 0.1f * c, std[c] = 0.5f + 0.1f * c;
  std::vector<TensorToWrite> tensors;
  for (size_t i = 0; i < shapes.size(); ++i) tensors.push_back({shapes[i].first, DType::F32, shapes[i].second, data[i].data()});
  tensors.push_back({prefix + "per_channel_statistics.mean-of-means", DType::F32, {kZ}, mean.data()});
  tensors.push_back({prefix + "per_channel_statistics.std-of-means", DType::F32, {kZ}, std.data()});
  if (!stray.empty()) tensors.push_back({stray, DType::F32, {kZ}, std.data()});
  std::map<std::string, std::string> metadata;
  if (config) metadata["config"] = config;
  write_safetensors(path, tensors, metadata);
}

ModelOptions cpu() {
  ModelOptions o;
  o.device = "cpu";
  o.precision = Precision::F32;
  o.threads = 2;
  return o;
}

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
  size_t max_state = 0;
};

// Feeds `clip` in batches of the sizes in `plan` (cycled); the last batch ends the clip when `end` is set.
Stream run(Encoder& enc, EncodeSession& session, const std::vector<std::vector<uint8_t>>& clip,
           std::vector<size_t> plan, bool end = true, EncodeParams params = {}) {
  Stream s;
  size_t next = 0, step = 0;
  while (next < clip.size()) {
    const size_t n = std::min(plan[step++ % plan.size()], clip.size() - next);
    auto batch = enc.new_batch(PixelFormat::RGB, kWidth, kHeight, n);
    for (size_t i = 0; i < n; ++i) batch->add(clip[next + i].data(), kWidth * 3, next + i);
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
    s.max_state = std::max(s.max_state, session.state_bytes());
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

class Ltx2EncoderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_.file("ltx2.safetensors");
    write_ltx2(path_);
    enc_ = load_encoder(path_, cpu());
  }
  TempDir dir_;
  std::string path_;
  std::shared_ptr<Encoder> enc_;
};

TEST_F(Ltx2EncoderTest, Info) {
  const EncoderInfo& info = enc_->info();
  EXPECT_EQ(info.family, "ltx2");
  EXPECT_EQ(info.temporal_downscale, 8);
  EXPECT_EQ(info.downscale, 32);
  EXPECT_EQ(info.latent_channels, kZ);
  EXPECT_EQ(info.default_latent_format, "ltx2");
  EXPECT_NE(info.layout.find("official"), std::string::npos) << info.layout;
}

TEST_F(Ltx2EncoderTest, DirectEncodeRefusedOutsideASession) {
  auto batch = enc_->new_batch(PixelFormat::RGB, kWidth, kHeight, 1);
  const auto frame = make_clip(1, 1)[0];
  batch->add(frame.data(), kWidth * 3, 0);
  std::vector<float> out(enc_->latent_floats_per_frame(*batch));
  EXPECT_THROW(enc_->encode(*batch, EncodeParams{}, out.data()), VaeError);
}

// Latent 0 from frame 0, latent k from frames 8k-7..8k, whatever the batches.
TEST_F(Ltx2EncoderTest, ChunkPlansGiveTheSameLatents) {
  const auto clip = make_clip(25, 10);
  auto whole = enc_->open_session();
  const Stream ref = run(*enc_, *whole, clip, {25});
  ASSERT_EQ(ref.latents.size(), 4u);
  const std::vector<Span> expected = {{0, 1}, {1, 8}, {9, 8}, {17, 8}};
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(ref.spans[i].first, expected[i].first);
    EXPECT_EQ(ref.spans[i].count, expected[i].count);
  }
  for (std::vector<size_t> plan : {std::vector<size_t>{1}, {2}, {3}, {8}, {9}, {5, 11}, {7, 1, 16}}) {
    SCOPED_TRACE("plan starting " + std::to_string(plan[0]));
    auto session = enc_->open_session();
    const Stream s = run(*enc_, *session, clip, plan);
    ASSERT_EQ(s.latents.size(), 4u);
    EXPECT_LE(rel_diff(s.latents, ref.latents), 1e-5);
    EXPECT_EQ(s.dropped.count, 0u);
  }
}

// A prefix of 1 + 8k frames gives the first latents of the longer clip.
TEST_F(Ltx2EncoderTest, PrefixStability) {
  const auto clip = make_clip(25, 30);
  auto a = enc_->open_session();
  const Stream full = run(*enc_, *a, clip, {4});
  auto b = enc_->open_session();
  const Stream prefix = run(*enc_, *b, std::vector<std::vector<uint8_t>>(clip.begin(), clip.begin() + 9), {4});
  ASSERT_EQ(prefix.latents.size(), 2u);
  EXPECT_LE(rel_diff(prefix.latents, std::vector<std::vector<float>>(full.latents.begin(), full.latents.begin() + 2)),
            1e-5);
}

TEST_F(Ltx2EncoderTest, LatentsGoOutAsSoonAsTheirGroupIsComplete) {
  const auto clip = make_clip(10, 20);
  auto session = enc_->open_session();
  std::vector<size_t> outputs;
  for (size_t i = 0; i < clip.size(); ++i) {
    auto batch = enc_->new_batch(PixelFormat::RGB, kWidth, kHeight, 1);
    batch->add(clip[i].data(), kWidth * 3, i);
    auto block = enc_->new_latents(*batch);
    outputs.push_back(session->encode(*batch, EncodeParams{}, *block).spans.size());
    EXPECT_EQ(session->held_frames(), i == 0 ? 0u : i % 8);
  }
  EXPECT_EQ(outputs, (std::vector<size_t>{1, 0, 0, 0, 0, 0, 0, 0, 1, 0}));
}

// 12 frames: 2 latents, 3 dropped as the official encode crops them; with
// pad_clip_end a third latent covering frames 9..11.
TEST_F(Ltx2EncoderTest, ClipEndDropsOrPads) {
  const auto clip = make_clip(12, 40);
  auto session = enc_->open_session();
  const Stream dropped = run(*enc_, *session, clip, {5});
  ASSERT_EQ(dropped.latents.size(), 2u);
  EXPECT_EQ(dropped.dropped.first, 9u);
  EXPECT_EQ(dropped.dropped.count, 3u);
  EXPECT_EQ(session->held_frames(), 0u);
  EncodeParams pad;
  pad.pad_clip_end = true;
  const Stream padded = run(*enc_, *session, clip, {5}, true, pad);
  ASSERT_EQ(padded.latents.size(), 3u);
  EXPECT_EQ(padded.padded, 5u);
  EXPECT_EQ(padded.spans[2].first, 9u);
  EXPECT_EQ(padded.spans[2].count, 3u);
  // The clip end reset the session: the same clip again gives the same latents.
  EXPECT_LE(rel_diff(std::vector<std::vector<float>>(padded.latents.begin(), padded.latents.begin() + 2),
                     dropped.latents),
            1e-6);
}

// reset() (flush, caps change, DISCONT) makes the next frame a new frame 0.
TEST_F(Ltx2EncoderTest, ResetStartsANewClip) {
  const auto clip = make_clip(9, 50);
  auto fresh = enc_->open_session();
  const Stream ref = run(*enc_, *fresh, clip, {9});
  auto session = enc_->open_session();
  run(*enc_, *session, make_clip(13, 60), {13}, /*end=*/false);
  EXPECT_EQ(session->held_frames(), 4u);
  session->reset();
  EXPECT_EQ(session->held_frames(), 0u);
  const Stream again = run(*enc_, *session, clip, {9});
  ASSERT_EQ(again.latents.size(), 2u);
  EXPECT_LE(rel_diff(again.latents, ref.latents), 1e-6);
}

// The state carried between batches does not grow with the stream.
TEST_F(Ltx2EncoderTest, StateIsBounded) {
  auto a = enc_->open_session();
  const Stream short_clip = run(*enc_, *a, make_clip(17, 70), {8}, /*end=*/false);
  auto b = enc_->open_session();
  const Stream long_clip = run(*enc_, *b, make_clip(81, 70), {8}, /*end=*/false);
  EXPECT_GT(short_clip.max_state, 0u);
  EXPECT_EQ(long_clip.max_state, short_clip.max_state);
}

// The default output (ComfyUI's LATENT) is (raw - mean-of-means) / std-of-means from the file.
TEST_F(Ltx2EncoderTest, LatentFormatsUseTheFilesStatistics) {
  const auto clip = make_clip(9, 80);
  EncodeParams raw_params;
  raw_params.latent_format = latent_format_by_name("raw");
  auto a = enc_->open_session();
  const Stream raw = run(*enc_, *a, clip, {9}, true, raw_params);
  EncodeParams ltx2;
  ltx2.latent_format = latent_format_by_name(enc_->info().default_latent_format);
  auto b = enc_->open_session();
  const Stream norm = run(*enc_, *b, clip, {9}, true, ltx2);
  ASSERT_EQ(raw.latents.size(), 2u);
  ASSERT_EQ(norm.latents.size(), 2u);
  const size_t cell = raw.latents[0].size() / kZ;
  double worst = 0;
  for (size_t l = 0; l < 2; ++l)
    for (size_t i = 0; i < raw.latents[l].size(); ++i) {
      const size_t c = i / cell;
      const double want = (raw.latents[l][i] - 0.1 * c) / (0.5 + 0.1 * c);
      worst = std::max(worst, std::fabs(norm.latents[l][i] - want));
    }
  EXPECT_LE(worst, 1e-5);
  // A per-channel format of another family does not fit 8 channels.
  EncodeParams wan;
  wan.latent_format = latent_format_by_name("wan21");
  auto c = enc_->open_session();
  EXPECT_THROW(run(*enc_, *c, clip, {9}, true, wan), VaeError);
}

TEST(Ltx2Loader, ComfyLayoutLoadsTheSameModel) {
  TempDir dir;
  write_ltx2(dir.file("official.safetensors"), "vae.");
  write_ltx2(dir.file("comfy.safetensors"), "");
  auto official = load_encoder(dir.file("official.safetensors"), cpu());
  auto comfy = load_encoder(dir.file("comfy.safetensors"), cpu());
  EXPECT_NE(comfy->info().layout.find("comfyui"), std::string::npos) << comfy->info().layout;
  const auto clip = make_clip(9, 90);
  auto a = official->open_session();
  auto b = comfy->open_session();
  EXPECT_LE(rel_diff(run(*comfy, *b, clip, {3}).latents, run(*official, *a, clip, {3}).latents), 1e-7);
}

TEST(Ltx2Loader, RefusesAFileWithoutItsConfig) {
  TempDir dir;
  const std::string path = dir.file("bare.safetensors");
  write_ltx2(path, "vae.", nullptr);
  try {
    load_encoder(path, cpu());
    FAIL() << "a file without the config loaded";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("no 'config' metadata"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

// Every tensor under the claimed prefix is used or deliberately left alone
// (the decoder, unused statistics); anything else names itself. Outside the
// prefix (an official single file's transformer) nothing is claimed.
TEST(Ltx2Loader, EveryTensorUnderItsPrefixIsAccountedFor) {
  TempDir dir;
  write_ltx2(dir.file("stray.safetensors"), "", kConfig, "quant_conv.bias");
  try {
    load_encoder(dir.file("stray.safetensors"), cpu());
    FAIL() << "a stray tensor was ignored";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("quant_conv.bias"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("LTX-2"), std::string::npos) << e.what();
  }
  write_ltx2(dir.file("decoder.safetensors"), "", kConfig, "decoder.conv_in.conv.bias");
  EXPECT_NO_THROW(load_encoder(dir.file("decoder.safetensors"), cpu()));
  write_ltx2(dir.file("full.safetensors"), "vae.", kConfig, "model.diffusion_model.x");
  EXPECT_NO_THROW(load_encoder(dir.file("full.safetensors"), cpu()));
}

TEST(Ltx2Loader, RefusesBlocksItDoesNotImplementByName) {
  TempDir dir;
  const std::string path = dir.file("attn.safetensors");
  std::string config = kConfig;
  config.replace(config.find("[\"res_x\", 1]"), 12, "[\"attn\", {}]");
  write_ltx2(path, "vae.", config.c_str());
  try {
    load_encoder(path, cpu());
    FAIL() << "an attention block loaded";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("block 'attn'"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace gstvae
