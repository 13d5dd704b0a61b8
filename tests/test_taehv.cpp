// The TAEHV family (taew2_1, taew2_2) on generated weights in the real layout
// (no real TAEHV weights are available): detection against TAESD, refusals,
// the session's groups of 4 (spans, held frames, dropped or padded clip ends,
// reset), chunk-plan invariance, raw de-normalisation and latent formats.
// tests/python/crosscheck_taehv.py checks the values against the float64 reference.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "encoder.h"
#include "errors.h"
#include "fixtures.h"
#include "frame.h"
#include "safetensors.h"

namespace gstvae {
namespace {

using test::contains;
using test::error_of;
using test::TempDir;

ModelOptions cpu(const std::string& latent_space = "") { return test::cpu_fp32(latent_space); }

// Random TAEHV-layout encoder weights (He-scaled: activations stay O(1)).
class TinyTaehv {
 public:
  explicit TinyTaehv(int64_t patch = 1, int64_t channels = 16, int64_t width = 8, int64_t last_pool = 1) {
    const int64_t w = width;
    conv("encoder.0", w, 3 * patch * patch, 3, true, 2.0);
    const int firsts[3] = {2, 7, 12};
    const int64_t pools[3] = {2, 2, last_pool};
    for (int s = 0; s < 3; ++s) {
      const std::string f = std::to_string(firsts[s]);
      conv("encoder." + f + ".conv", w, w * pools[s], 1, false, 1.0);
      conv("encoder." + std::to_string(firsts[s] + 1), w, w, 3, false, 1.0);
      for (int b = 2; b < 5; ++b) {
        const std::string p = "encoder." + std::to_string(firsts[s] + b) + ".conv.";
        conv(p + "0", w, 2 * w, 3, true, 2.0);
        conv(p + "2", w, w, 3, true, 2.0);
        conv(p + "4", w, w, 3, true, 0.3);
      }
    }
    conv("encoder.17", channels, w, 3, true, 2.0);
  }

  // Decoder tensors, as a whole TAEHV file has: the encoder must ignore them.
  TinyTaehv& with_decoder() {
    conv("decoder.1", 16, 16, 3, true, 1.0);
    conv("decoder.3.conv.0", 16, 32, 3, true, 1.0);
    return *this;
  }

  std::string write(const std::string& path) const {
    std::vector<TensorToWrite> tensors;
    for (const auto& t : tensors_) tensors.push_back({t.name, DType::F32, t.shape, t.values.data()});
    write_safetensors(path, tensors);
    return path;
  }

 private:
  struct Tensor {
    std::string name;
    std::vector<int64_t> shape;
    std::vector<float> values;
  };
  void conv(const std::string& p, int64_t out, int64_t in, int64_t k, bool bias, double gain) {
    add(p + ".weight", {out, in, k, k}, std::sqrt(gain / static_cast<double>(in * k * k)));
    if (bias) add(p + ".bias", {out}, 0.05);
  }
  void add(const std::string& name, std::vector<int64_t> shape, double stddev) {
    size_t n = 1;
    for (int64_t d : shape) n *= static_cast<size_t>(d);
    std::vector<float> v(n);
    std::normal_distribution<float> dist(0.0f, static_cast<float>(stddev));
    for (float& x : v) x = dist(rng_);
    tensors_.push_back({name, std::move(shape), std::move(v)});
  }
  std::mt19937 rng_{11};
  std::vector<Tensor> tensors_;
};

// n RGB frames of w x h, frame i seeded by i.
std::vector<std::vector<uint8_t>> frames(int n, int w, int h) {
  std::vector<std::vector<uint8_t>> out;
  for (int i = 0; i < n; ++i) out.push_back(test::make_frame(w, h, 3, static_cast<size_t>(w) * 3, 100 + i));
  return out;
}

struct ClipRun {
  std::vector<float> latents;
  std::vector<Span> spans;
  Span dropped{0, 0};
  uint32_t padded = 0;
  size_t held_after = 0;
};

// Feeds `clip` to a session in batches of the sizes in `plan` (cycled); the
// last batch ends the clip when `end` (padding it when `pad`).
ClipRun encode_clip(Encoder& enc, EncodeSession& session, const std::vector<std::vector<uint8_t>>& clip, int w, int h,
                std::vector<size_t> plan, bool end, bool pad, const LatentFormat& format = {}, uint64_t first = 0) {
  ClipRun run;
  size_t next = 0, step = 0;
  do {
    const size_t size = std::min(plan[step++ % plan.size()], clip.size() - next);
    auto batch = enc.new_batch(PixelFormat::RGB, w, h, std::max<size_t>(size, 1));
    for (size_t i = 0; i < size; ++i, ++next) batch->add(clip[next].data(), static_cast<size_t>(w) * 3, first + next);
    EncodeParams params;
    params.latent_format = format;
    params.end_of_clip = end && next == clip.size();
    params.pad_clip_end = pad;
    auto block = enc.new_latents(*batch);
    BatchResult r = session.encode(*batch, params, *block);
    const size_t per = enc.latent_floats_per_frame(*batch);
    EXPECT_LE(r.spans.size() * per, block->floats());
    run.latents.insert(run.latents.end(), block->data(), block->data() + r.spans.size() * per);
    run.spans.insert(run.spans.end(), r.spans.begin(), r.spans.end());
    if (r.dropped.count) run.dropped = r.dropped;
    run.padded += r.padded_frames;
  } while (next < clip.size());
  run.held_after = session.held_frames();
  return run;
}

double max_rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, scale = 1e-30;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(a[i]) - b[i]));
    scale = std::max(scale, std::abs(static_cast<double>(b[i])));
  }
  return diff / scale;
}

// ------------------------------------------------------------------ detection

TEST(TaehvDetection, Taew21FromShapes) {
  TempDir dir;
  auto enc = load_encoder(TinyTaehv().with_decoder().write(dir.file("any_name.safetensors")), cpu());
  const EncoderInfo& i = enc->info();
  EXPECT_EQ(i.family, "taehv");
  EXPECT_EQ(i.layout, "taehv");
  EXPECT_EQ(i.latent_channels, 16);
  EXPECT_EQ(i.downscale, 8);
  EXPECT_EQ(i.temporal_downscale, 4);
  EXPECT_FALSE(i.input_signed);
  EXPECT_EQ(i.native_format.name, "wan21");
  EXPECT_TRUE(contains(i.architecture, "taew2_1")) << i.architecture;
}

TEST(TaehvDetection, Taew22FromShapes) {
  TempDir dir;
  auto enc = load_encoder(TinyTaehv(2, 48).write(dir.file("m.safetensors")), cpu("taew2_2"));
  EXPECT_EQ(enc->info().family, "taehv");
  EXPECT_EQ(enc->info().latent_channels, 48);
  EXPECT_EQ(enc->info().downscale, 16);
  EXPECT_EQ(enc->info().native_format.name, "wan22");
}

TEST(TaehvDetection, TaesdUnderEncoderPrefixStaysTaesd) {
  // A TAESD encoder stored under 'encoder.' (upstream's TAESD module) has
  // encoder.0.weight from RGB too; it must not be taken for TAEHV.
  TempDir dir;
  std::vector<std::vector<float>> store;
  std::vector<TensorToWrite> tensors;
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    size_t n = 1;
    for (int64_t d : shape) n *= static_cast<size_t>(d);
    store.emplace_back(n, 0.01f);
    tensors.push_back({name, DType::F32, shape, nullptr});
  };
  const int64_t w = 8;
  add("encoder.0.weight", {w, 3, 3, 3});
  add("encoder.0.bias", {w});
  auto block = [&](int b) {
    for (int i : {0, 2, 4}) {
      add("encoder." + std::to_string(b) + ".conv." + std::to_string(i) + ".weight", {w, w, 3, 3});
      add("encoder." + std::to_string(b) + ".conv." + std::to_string(i) + ".bias", {w});
    }
  };
  block(1);
  for (int s : {2, 6, 10}) {
    add("encoder." + std::to_string(s) + ".weight", {w, w, 3, 3});
    for (int b = s + 1; b < s + 4; ++b) block(b);
  }
  add("encoder.14.weight", {4, w, 3, 3});
  add("encoder.14.bias", {4});
  for (size_t i = 0; i < tensors.size(); ++i) tensors[i].data = store[i].data();
  const std::string path = dir.file("taesd_encoder.safetensors");
  write_safetensors(path, tensors);
  EXPECT_EQ(load_encoder(path, cpu())->info().family, "taesd");
}

TEST(TaehvDetection, RefusesOtherLatentSpaces) {
  TempDir dir;
  // taehv1_5's shapes (2x2 patches, 32 channels): not supported.
  std::string e = error_of<CheckpointError>(
      [&] { load_encoder(TinyTaehv(2, 32).write(dir.file("m32.safetensors")), cpu()); });
  EXPECT_TRUE(contains(e, "32 latent channels")) << e;
  EXPECT_TRUE(contains(e, "taew2_1")) << e;
  // taeltx-like: the third TPool merges 2 frames (8 per latent).
  e = error_of<CheckpointError>(
      [&] { load_encoder(TinyTaehv(1, 16, 8, 2).write(dir.file("m8.safetensors")), cpu()); });
  EXPECT_TRUE(contains(e, "8 frames per latent")) << e;
  // HunyuanVideo's taehv has taew2_1's shapes: refused by name unless told.
  const std::string hv = TinyTaehv().write(dir.file("taehv.safetensors"));
  e = error_of<CheckpointError>([&] { load_encoder(hv, cpu()); });
  EXPECT_TRUE(contains(e, "taehv")) << e;
  EXPECT_EQ(load_encoder(hv, cpu("taew2_1"))->info().family, "taehv");
  // An option that contradicts the shapes.
  e = error_of<CheckpointError>(
      [&] { load_encoder(TinyTaehv().write(dir.file("m16.safetensors")), cpu("taew2_2")); });
  EXPECT_TRUE(contains(e, "taew2_2")) << e;
}

TEST(TaehvDetection, RefusesWrongShapes) {
  TempDir dir;
  // A MemBlock whose conv.0 does not take frame and past (2W channels).
  TinyTaehv bad;
  const std::string path = dir.file("bad.safetensors");
  bad.write(path);
  // Rewrite one tensor with a wrong shape.
  SafetensorsFile file(path);
  std::vector<std::vector<uint8_t>> store;
  std::vector<TensorToWrite> tensors;
  for (const auto& kv : file.tensors()) {
    std::vector<int64_t> shape = kv.second.shape;
    if (kv.first == "encoder.9.conv.0.weight") shape[1] = 8;
    size_t n = 4;
    for (int64_t d : shape) n *= static_cast<size_t>(d);
    store.emplace_back(n, 0);
    tensors.push_back({kv.first, DType::F32, shape, nullptr});
  }
  for (size_t i = 0; i < tensors.size(); ++i) tensors[i].data = store[i].data();
  const std::string bad_path = dir.file("bad2.safetensors");
  write_safetensors(bad_path, tensors);
  const std::string e = error_of<CheckpointError>([&] { load_encoder(bad_path, cpu()); });
  EXPECT_TRUE(contains(e, "encoder.9.conv.0.weight")) << e;
}

// ------------------------------------------------------------------ sessions

TEST(TaehvSession, EncodeWithoutSessionIsRefused) {
  TempDir dir;
  auto enc = load_encoder(TinyTaehv().write(dir.file("m.safetensors")), cpu());
  auto batch = enc->new_batch(PixelFormat::RGB, 16, 16, 4);
  auto f = frames(4, 16, 16);
  for (int i = 0; i < 4; ++i) batch->add(f[i].data(), 48, i);
  std::vector<float> out(enc->latent_floats_per_frame(*batch) * 4);
  const std::string e = error_of<VaeError>([&] { enc->encode(*batch, EncodeParams(), out.data()); });
  EXPECT_TRUE(contains(e, "session")) << e;
  auto block = enc->new_latents(*batch);
  EXPECT_TRUE(contains(error_of<VaeError>([&] { enc->encode(*batch, EncodeParams(), *block); }), "session"));
}

TEST(TaehvSession, GroupsOfFourAndClipEnds) {
  TempDir dir;
  auto enc = load_encoder(TinyTaehv().write(dir.file("m.safetensors")), cpu());
  auto session = enc->open_session();
  const int w = 24, h = 16;
  auto clip = frames(9, w, h);

  // Open clip: 9 frames in batches of 1, 3, 4, 1 -> latents for 0..3 and 4..7, frame 8 held.
  ClipRun open = encode_clip(*enc, *session, clip, w, h, {1, 3, 4, 1}, false, false, {}, 100);
  ASSERT_EQ(open.spans.size(), 2u);
  EXPECT_EQ(open.spans[0].first, 100u);
  EXPECT_EQ(open.spans[0].count, 4u);
  EXPECT_EQ(open.spans[1].first, 104u);
  EXPECT_EQ(open.held_after, 1u);
  EXPECT_EQ(open.dropped.count, 0u);

  // An empty batch with end_of_clip drops the held frame and resets.
  auto empty = enc->new_batch(PixelFormat::RGB, w, h, 1);
  auto block = enc->new_latents(*empty);
  EncodeParams end;
  end.end_of_clip = true;
  BatchResult r = session->encode(*empty, end, *block);
  EXPECT_TRUE(r.spans.empty());
  EXPECT_EQ(r.dropped.first, 108u);
  EXPECT_EQ(r.dropped.count, 1u);
  EXPECT_EQ(session->held_frames(), 0u);

  // After the reset the same clip gives the same latents (a fresh clip).
  ClipRun again = encode_clip(*enc, *session, clip, w, h, {9}, true, false);
  ASSERT_EQ(again.spans.size(), 2u);
  EXPECT_EQ(again.spans[0].first, 0u);
  EXPECT_EQ(again.dropped.first, 8u);
  EXPECT_EQ(again.dropped.count, 1u);
  EXPECT_LE(max_rel_diff(again.latents, open.latents), 1e-5);

  // Padded: 9 frames -> 3 latents, the last one with 3 copies of frame 8.
  ClipRun padded = encode_clip(*enc, *session, clip, w, h, {2}, true, true);
  ASSERT_EQ(padded.spans.size(), 3u);
  EXPECT_EQ(padded.spans[2].first, 8u);
  EXPECT_EQ(padded.spans[2].count, 4u);
  EXPECT_EQ(padded.padded, 3u);
  EXPECT_EQ(padded.dropped.count, 0u);
  EXPECT_EQ(padded.held_after, 0u);
  std::vector<float> first_two(padded.latents.begin(), padded.latents.begin() + open.latents.size());
  EXPECT_LE(max_rel_diff(first_two, open.latents), 1e-5);

  // Padding a clip that ends on a group boundary pads nothing.
  auto eight = std::vector<std::vector<uint8_t>>(clip.begin(), clip.begin() + 8);
  ClipRun exact = encode_clip(*enc, *session, eight, w, h, {3}, true, true);
  EXPECT_EQ(exact.spans.size(), 2u);
  EXPECT_EQ(exact.padded, 0u);

  // reset() in the middle of a group forgets the held frames and the state.
  encode_clip(*enc, *session, std::vector<std::vector<uint8_t>>(clip.begin() + 3, clip.begin() + 6), w, h, {3},
              false, false);
  EXPECT_EQ(session->held_frames(), 3u);
  session->reset();
  EXPECT_EQ(session->held_frames(), 0u);
  ClipRun fresh = encode_clip(*enc, *session, eight, w, h, {8}, true, false);
  EXPECT_LE(max_rel_diff(fresh.latents, open.latents), 1e-5);
}

TEST(TaehvSession, ChunkPlansGiveTheSameLatents) {
  TempDir dir;
  auto enc = load_encoder(TinyTaehv().write(dir.file("m.safetensors")), cpu());
  const int w = 16, h = 24;
  auto clip = frames(12, w, h);
  auto session = enc->open_session();
  ClipRun whole = encode_clip(*enc, *session, clip, w, h, {12}, true, false);
  ASSERT_EQ(whole.spans.size(), 3u);
  for (std::vector<size_t> plan : {std::vector<size_t>{1}, {3}, {4}, {7}, {5, 2}}) {
    ClipRun r = encode_clip(*enc, *session, clip, w, h, plan, true, false);
    ASSERT_EQ(r.spans.size(), 3u);
    // oneDNN convolutions: the frames per pass do not change the numbers.
    EXPECT_LE(max_rel_diff(r.latents, whole.latents), 1e-6) << "plan " << plan[0];
  }
  // Two sessions over one encoder do not share state.
  auto other = enc->open_session();
  encode_clip(*enc, *other, clip, w, h, {5}, false, false);
  ClipRun again = encode_clip(*enc, *session, clip, w, h, {12}, true, false);
  EXPECT_LE(max_rel_diff(again.latents, whole.latents), 1e-6);
}

TEST(TaehvSession, LargeBatchesRunInSeveralPasses) {
  // 8 frames of 544x544 exceed one pass (8 frames of 512x512): two passes of
  // one group each, chained through the state, give what two batches give.
  TempDir dir;
  auto enc = load_encoder(TinyTaehv().write(dir.file("m.safetensors")), cpu());
  const int w = 544, h = 544;
  auto clip = frames(8, w, h);
  auto session = enc->open_session();
  ClipRun one = encode_clip(*enc, *session, clip, w, h, {8}, true, false);
  ClipRun two = encode_clip(*enc, *session, clip, w, h, {4}, true, false);
  ASSERT_EQ(one.spans.size(), 2u);
  EXPECT_LE(max_rel_diff(one.latents, two.latents), 1e-6);
}

TEST(TaehvSession, RawLatentsThenTheLatentFormat) {
  TempDir dir;
  auto enc = load_encoder(TinyTaehv().write(dir.file("m.safetensors")), cpu());
  const int w = 16, h = 16;
  auto clip = frames(4, w, h);
  auto session = enc->open_session();
  ClipRun raw = encode_clip(*enc, *session, clip, w, h, {4}, true, false);
  ClipRun scaled = encode_clip(*enc, *session, clip, w, h, {4}, true, false, latent_format_by_name("sd3"));
  ASSERT_EQ(raw.latents.size(), scaled.latents.size());
  const LatentFormat f = latent_format_by_name("sd3");
  for (size_t i = 0; i < raw.latents.size(); ++i)
    EXPECT_NEAR(scaled.latents[i], (raw.latents[i] - f.shift) * f.scale, 1e-5);
}

TEST(TaehvSession, SizeChangeWhileHoldingIsAnError) {
  TempDir dir;
  auto enc = load_encoder(TinyTaehv().write(dir.file("m.safetensors")), cpu());
  auto session = enc->open_session();
  encode_clip(*enc, *session, frames(2, 16, 16), 16, 16, {2}, false, false);
  const std::string e = error_of<VaeError>(
      [&] { encode_clip(*enc, *session, frames(2, 24, 16), 24, 16, {2}, false, false); });
  EXPECT_TRUE(contains(e, "reset")) << e;
  session->reset();
  ClipRun r = encode_clip(*enc, *session, frames(4, 24, 16), 24, 16, {4}, true, false);
  EXPECT_EQ(r.spans.size(), 1u);
}

// No silent misloads (tensor_usage.h): no other family loads a TAEHV encoder
// file even when forced; a stray tensor beside it fails the load.
TEST(TaehvDetection, OnlyTaehvLoadsItAndAStrayIsNamed) {
  TempDir dir;
  const std::string clean = TinyTaehv().with_decoder().write(dir.file("taew2_1.safetensors"));
  std::vector<std::string> faults;
  EXPECT_EQ(test::families_that_load(clean, false, cpu(), &faults), std::vector<std::string>{"taehv"});
  EXPECT_TRUE(faults.empty()) << faults.front();
  const std::string stray = dir.file("taew2_1_stray.safetensors");
  test::copy_with_extra_tensor(clean, stray, "encoder.18.weight");
  const std::string err = error_of<CheckpointError>([&] { load_encoder(stray, cpu()); });
  EXPECT_TRUE(contains(err, "'encoder.18.weight'") && contains(err, "TAEHV encoder")) << err;
}

}  // namespace
}  // namespace gstvae
