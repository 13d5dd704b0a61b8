// GstHarness tests of vaeencode with a causal video VAE (Wan 2.1, random
// weights from tests/python/wan_weights.py): one latent per group of frames
// (frame 0 alone, then groups of 4) whatever per-batch is, the latents'
// timestamps, clip ends (EOS, DISCONT, caps change) dropping or padding the
// incomplete group, flushes, caps and latency. The element-level exactness
// check: the latents do not depend on per-batch.
//
// Skipped (with the reason) while the checkpoint generator or the engine's
// Wan support is missing from the tree.
#include <gst/check/gstharness.h>
#include <gst/gst.h>
#include <gst/video/video.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "encoder.h"
#include "fixtures.h"
#include "harness_util.h"

namespace {

using gstvae::test::floats_of;
using gstvae::test::joined;
using gstvae::test::kFrameDur;
using gstvae::test::TempDir;
using gstvae::test::time_string;

constexpr int kW = 64, kH = 48;                     // latents 8x6
constexpr int kChannels = 16;
constexpr size_t kLatentFloats = size_t(kChannels) * (kH / 8) * (kW / 8);

std::string video_caps(int w = kW, int h = kH, int fps_n = 25, int fps_d = 1) {
  return "video/x-raw, format=(string)RGB, width=(int)" + std::to_string(w) + ", height=(int)" + std::to_string(h) +
         ", framerate=(fraction)" + std::to_string(fps_n) + "/" + std::to_string(fps_d);
}

// Frame n of a stream: pixels from `seed`, the timestamps of frame n at 25/1.
GstBuffer* frame_buffer(guint64 n, uint64_t seed, bool discont = false, int w = kW, int h = kH) {
  GstVideoInfo info;
  gst_video_info_set_format(&info, GST_VIDEO_FORMAT_RGB, w, h);
  const size_t stride = GST_VIDEO_INFO_PLANE_STRIDE(&info, 0);
  std::vector<uint8_t> pixels = gstvae::test::make_frame(w, h, 3, stride, seed);
  GstBuffer* b = gst_buffer_new_allocate(nullptr, GST_VIDEO_INFO_SIZE(&info), nullptr);
  gst_buffer_fill(b, 0, pixels.data(), std::min<size_t>(pixels.size(), GST_VIDEO_INFO_SIZE(&info)));
  return gstvae::test::stamp_frame(b, n, discont);
}

// max |a - b| relative to max |b|; infinity when the sizes differ.
double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size() || a.empty()) return INFINITY;
  double diff = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(double(a[i]) - b[i]));
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return scale > 0 ? diff / scale : diff;
}

// What a latent buffer says about the frames it covers.
struct Out {
  GstClockTime pts, dts, duration;
  guint64 offset, offset_end;
  bool discont;
  std::vector<float> values;
};

// The shared harness with a bus, reading latents back as Out records.
struct Harness : gstvae::test::Harness {
  explicit Harness(GstElement* e) : gstvae::test::Harness(e, true) {}

  // Waits until `n` batches (jobs, clip ends of no frames included) ran and
  // their latents are out, at most 60 s.
  void wait_batches(guint64 n) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (u64("batches") < n || u64("frames-in-flight") != 0) {
      ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "the encode thread did not finish";
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the push thread, after the count
  }
  std::vector<Out> pull_all() {
    std::vector<Out> out;
    while (GstBuffer* b = gst_harness_try_pull(h)) {
      out.push_back(Out{GST_BUFFER_PTS(b), GST_BUFFER_DTS(b), GST_BUFFER_DURATION(b), GST_BUFFER_OFFSET(b),
                        GST_BUFFER_OFFSET_END(b), GST_BUFFER_FLAG_IS_SET(b, GST_BUFFER_FLAG_DISCONT) != 0,
                        floats_of(b)});
      gst_buffer_unref(b);
    }
    return out;
  }
  // Texts (message + debug) of the bus messages of `type` so far (all
  // waiting messages are read; the others are kept for later calls).
  std::map<GstMessageType, std::vector<std::string>> seen;
  std::vector<std::string> messages(GstMessageType type) {
    while (GstMessage* m = gst_bus_pop(bus)) {
      GError* err = nullptr;
      gchar* debug = nullptr;
      const GstMessageType t = GST_MESSAGE_TYPE(m);
      if (t == GST_MESSAGE_ERROR) gst_message_parse_error(m, &err, &debug);
      if (t == GST_MESSAGE_WARNING) gst_message_parse_warning(m, &err, &debug);
      if (t == GST_MESSAGE_INFO) gst_message_parse_info(m, &err, &debug);
      if (err) seen[t].push_back(std::string(err->message) + "\n" + (debug ? debug : ""));
      g_clear_error(&err);
      g_free(debug);
      gst_message_unref(m);
    }
    std::vector<std::string> out;
    out.swap(seen[type]);
    return out;
  }
  // The fixed caps on the src pad, or null.
  GstCaps* out_caps() { return gst_pad_get_current_caps(h->sinkpad); }
};

// Latent k of a clip whose frame 0 is stream frame `f0`: frame f0 alone, then
// frames f0+4k-3 .. f0+4k.
void expect_latent_covers(const Out& o, guint64 f0, size_t k, bool discont = false) {
  const guint64 first = k == 0 ? f0 : f0 + 4 * k - 3;
  const guint64 count = k == 0 ? 1 : 4;
  EXPECT_EQ(o.pts, first * kFrameDur) << "latent " << k << " of the clip at frame " << f0;
  EXPECT_EQ(o.dts, first * kFrameDur) << "latent " << k;
  EXPECT_EQ(o.duration, count * kFrameDur) << "latent " << k;
  EXPECT_EQ(o.offset, first) << "latent " << k;
  EXPECT_EQ(o.offset_end, first + count) << "latent " << k;
  EXPECT_EQ(o.discont, discont) << "latent " << k;
  EXPECT_EQ(o.values.size(), kLatentFloats) << "latent " << k;
}

class VideoEncodeTest : public ::testing::Test {
 protected:
  static TempDir* dir_;
  static std::string model_;
  static std::string skip_;
  static std::map<std::string, std::vector<Out>> cache_;

  static void SetUpTestSuite() {
    dir_ = new TempDir();
    model_ = dir_->file("wan21.safetensors");
    const char* env = std::getenv("GSTVAE_WAN_WEIGHTS");
    const std::string script = env && *env ? env : GSTVAE_SOURCE_DIR "/tests/python/wan_weights.py";
    if (!std::ifstream(script)) {
      skip_ = "no checkpoint generator at " + script + " (set GSTVAE_WAN_WEIGHTS to it)";
      return;
    }
    const std::string cmd = std::string(GSTVAE_PYTHON) + " '" + script +
                            "' --variant 2.1 --dim 8 --z 16 --layout official --dtype F32 --seed 1 --out '" +
                            model_ + "' > /dev/null";
    if (std::system(cmd.c_str()) != 0) {
      skip_ = "could not generate a Wan checkpoint: " + cmd;
      return;
    }
    try {
      gstvae::load_encoder(model_, gstvae::ModelOptions{});  // SetUp checks what it is
    } catch (const std::exception& e) {
      skip_ = std::string("the engine does not load Wan checkpoints yet: ") + e.what();
    }
  }
  static void TearDownTestSuite() {
    cache_.clear();
    delete dir_;
    dir_ = nullptr;
  }

  void SetUp() override {
    if (!skip_.empty()) GTEST_SKIP() << skip_;
    auto encoder = gstvae::load_encoder(model_, gstvae::ModelOptions{});
    ASSERT_EQ(encoder->info().temporal_downscale, 4) << "a Wan model compresses time by 4";
    ASSERT_EQ(encoder->info().latent_channels, kChannels);
  }

  static GstElement* make_element(guint per_batch, bool pad = false) {
    GstElement* e = gst_element_factory_make("vaeencode", nullptr);
    EXPECT_NE(e, nullptr) << "vaeencode not found: is GST_PLUGIN_PATH set?";
    g_object_set(e, "model", model_.c_str(), "per-batch", per_batch, "pad-clip-end", pad, nullptr);
    return e;
  }

  // The latents of frames (seeds 100 + n) 0..n-1 as one clip ended by EOS.
  static std::vector<Out> encode_clip(size_t n, guint per_batch, bool pad = false, uint64_t seed0 = 100) {
    const std::string key = std::to_string(n) + "/" + std::to_string(per_batch) + "/" + std::to_string(pad) + "/" +
                            std::to_string(seed0);
    auto it = cache_.find(key);
    if (it != cache_.end()) return it->second;
    Harness t(make_element(per_batch, pad));
    t.caps(video_caps());
    for (guint64 i = 0; i < n; ++i) EXPECT_EQ(t.push(frame_buffer(i, seed0 + i, i == 0)), GST_FLOW_OK);
    EXPECT_TRUE(t.eos());
    std::vector<Out> out = t.pull_all();
    cache_[key] = out;
    return out;
  }
};

TempDir* VideoEncodeTest::dir_ = nullptr;
std::string VideoEncodeTest::model_;
std::string VideoEncodeTest::skip_;
std::map<std::string, std::vector<Out>> VideoEncodeTest::cache_;

/* ------------------------------------------------------------------ tests */

class VideoPerBatchTest : public VideoEncodeTest, public ::testing::WithParamInterface<guint> {};

// 13 frames = 1 + 3 groups of 4: 4 latents at the right times, nothing
// dropped, and the same values whatever per-batch is.
TEST_P(VideoPerBatchTest, LatentsAtTheRightTimesAndIndependentOfPerBatch) {
  const guint per_batch = GetParam();
  Harness t(make_element(per_batch));
  t.caps(video_caps());
  for (guint64 n = 0; n < 13; ++n) ASSERT_EQ(t.push(frame_buffer(n, 100 + n, n == 0)), GST_FLOW_OK);
  ASSERT_TRUE(t.eos());
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 4u);
  for (size_t k = 0; k < 4; ++k) expect_latent_covers(out[k], 0, k, k == 0);
  EXPECT_TRUE(t.messages(GST_MESSAGE_WARNING).empty()) << "13 frames drop nothing";
  EXPECT_EQ(t.u64("latents-out"), 4u);
  EXPECT_EQ(t.u64("frames-in"), 13u);

  auto ref = encode_clip(13, 1);
  ASSERT_EQ(ref.size(), 4u);
  for (size_t k = 0; k < 4; ++k)
    EXPECT_LE(rel_diff(out[k].values, ref[k].values), 1e-5) << "latent " << k << " at per-batch " << per_batch;
}

// A latent comes out as soon as its group is complete: frame 0's at once,
// then one per 4 frames (per-batch 1, so each frame is its own batch).
TEST_F(VideoEncodeTest, LatentComesOutWhenItsGroupCompletes) {
  Harness t(make_element(1));
  t.caps(video_caps());
  const size_t expect_after[] = {1, 1, 1, 1, 2, 2, 2, 2, 3};
  for (guint64 n = 0; n < 9; ++n) {
    ASSERT_EQ(t.push(frame_buffer(n, 100 + n, n == 0)), GST_FLOW_OK);
    t.wait_batches(n + 1);
    EXPECT_EQ(gst_harness_buffers_in_queue(t.h), expect_after[n]) << "after frame " << n;
  }
}

class VideoDropTest : public VideoEncodeTest, public ::testing::WithParamInterface<guint> {};

// 16 frames: 4 latents; frames 13..15 are dropped at EOS, with a warning
// naming their count and times. With per-batch 1 the session holds them with
// nothing staged: the clip end is a job of no frames.
TEST_P(VideoDropTest, TrailingFramesDroppedWithAWarning) {
  Harness t(make_element(GetParam()));
  t.caps(video_caps());
  for (guint64 n = 0; n < 16; ++n) ASSERT_EQ(t.push(frame_buffer(n, 100 + n, n == 0)), GST_FLOW_OK);
  ASSERT_TRUE(t.eos());
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 4u);
  for (size_t k = 0; k < 4; ++k) expect_latent_covers(out[k], 0, k, k == 0);
  auto warnings = t.messages(GST_MESSAGE_WARNING);
  ASSERT_EQ(warnings.size(), 1u) << joined(warnings);
  const std::string& w = warnings[0];
  EXPECT_NE(w.find("Dropped 3 frames"), std::string::npos) << w;
  EXPECT_NE(w.find(time_string(13 * kFrameDur)), std::string::npos) << w;
  EXPECT_NE(w.find(time_string(16 * kFrameDur)), std::string::npos) << w;
  EXPECT_NE(w.find("frames 13..15"), std::string::npos) << w;
  EXPECT_NE(w.find("pad-clip-end"), std::string::npos) << w;
  // The latents of a 16-frame clip are those of its first 13 frames.
  auto ref = encode_clip(13, 1);
  for (size_t k = 0; k < 4; ++k) EXPECT_LE(rel_diff(out[k].values, ref[k].values), 1e-5) << "latent " << k;
  // Latents of the EOS's clip all came before the EOS.
  bool saw_eos = false;
  while (GstEvent* e = gst_harness_try_pull_event(t.h)) {
    saw_eos |= GST_EVENT_TYPE(e) == GST_EVENT_EOS;
    gst_event_unref(e);
  }
  EXPECT_TRUE(saw_eos);
}

INSTANTIATE_TEST_SUITE_P(PerBatch, VideoPerBatchTest, ::testing::Values(1u, 2u, 5u, 16u));
INSTANTIATE_TEST_SUITE_P(PerBatch, VideoDropTest, ::testing::Values(1u, 4u, 16u));

// pad-clip-end: the last 3 frames become a fifth latent (the last frame
// repeated), said on the bus; its duration is that of its real frames.
TEST_F(VideoEncodeTest, PadClipEndGivesAFifthLatent) {
  Harness t(make_element(16, true));
  t.caps(video_caps());
  for (guint64 n = 0; n < 16; ++n) ASSERT_EQ(t.push(frame_buffer(n, 100 + n, n == 0)), GST_FLOW_OK);
  ASSERT_TRUE(t.eos());
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 5u);
  for (size_t k = 0; k < 4; ++k) expect_latent_covers(out[k], 0, k, k == 0);
  EXPECT_EQ(out[4].pts, 13 * kFrameDur);
  EXPECT_EQ(out[4].duration, 3 * kFrameDur);
  EXPECT_EQ(out[4].offset, 13u);
  EXPECT_EQ(out[4].offset_end, 16u);
  EXPECT_EQ(out[4].values.size(), kLatentFloats);
  EXPECT_TRUE(t.messages(GST_MESSAGE_WARNING).empty()) << "nothing was dropped";
  auto infos = t.messages(GST_MESSAGE_INFO);
  // The CUDA build's once-per-process "No CUDA device" note comes with
  // whichever element starts first: this test's when it runs alone.
  infos.erase(std::remove_if(infos.begin(), infos.end(),
                             [](const std::string& m) { return m.rfind("No CUDA device", 0) == 0; }),
              infos.end());
  ASSERT_EQ(infos.size(), 1u) << joined(infos);
  EXPECT_NE(infos[0].find("Padded"), std::string::npos) << infos[0];
  EXPECT_NE(infos[0].find(time_string(13 * kFrameDur)), std::string::npos) << infos[0];
  auto ref = encode_clip(13, 1);
  for (size_t k = 0; k < 4; ++k) EXPECT_LE(rel_diff(out[k].values, ref[k].values), 1e-5) << "latent " << k;
  // Padding with per-batch 1 (a clip end of no frames) gives the same.
  auto one = encode_clip(16, 1, true);
  ASSERT_EQ(one.size(), 5u);
  EXPECT_LE(rel_diff(out[4].values, one[4].values), 1e-5);
  EXPECT_EQ(one[4].pts, 13 * kFrameDur);
}

class VideoDiscontTest : public VideoEncodeTest, public ::testing::WithParamInterface<guint> {};

// A DISCONT frame inside a clip (frame 7 of 16): frames 0..6 are one clip
// (latents at 0 and 1..4, frames 5 and 6 dropped and reported), frame 7 is
// frame 0 of the next (latents at 7, 8..11, 12..15), with the values of that
// clip encoded on its own.
TEST_P(VideoDiscontTest, DiscontStartsANewClip) {
  Harness t(make_element(GetParam()));
  t.caps(video_caps());
  for (guint64 n = 0; n < 16; ++n) ASSERT_EQ(t.push(frame_buffer(n, n < 7 ? 100 + n : 200 + n - 7, n == 0 || n == 7)), GST_FLOW_OK);
  ASSERT_TRUE(t.eos());
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 5u);
  expect_latent_covers(out[0], 0, 0, true);
  expect_latent_covers(out[1], 0, 1);
  expect_latent_covers(out[2], 7, 0, true);
  expect_latent_covers(out[3], 7, 1);
  expect_latent_covers(out[4], 7, 2);
  auto warnings = t.messages(GST_MESSAGE_WARNING);
  ASSERT_EQ(warnings.size(), 1u) << joined(warnings);
  EXPECT_NE(warnings[0].find("Dropped 2 frames"), std::string::npos) << warnings[0];
  EXPECT_NE(warnings[0].find(time_string(5 * kFrameDur)), std::string::npos) << warnings[0];
  EXPECT_NE(warnings[0].find(time_string(7 * kFrameDur)), std::string::npos) << warnings[0];

  auto first = encode_clip(13, 1);        // frames 0..4 of seeds 100.. give its latents 0, 1
  auto second = encode_clip(9, 1, false, 200);
  ASSERT_EQ(second.size(), 3u);
  for (size_t k = 0; k < 2; ++k) EXPECT_LE(rel_diff(out[k].values, first[k].values), 1e-5) << "old clip latent " << k;
  for (size_t k = 0; k < 3; ++k)
    EXPECT_LE(rel_diff(out[2 + k].values, second[k].values), 1e-5) << "new clip latent " << k;
}

INSTANTIATE_TEST_SUITE_P(PerBatch, VideoDiscontTest, ::testing::Values(1u, 3u, 16u));

// New caps end the clip (reported), and the new geometry starts a new one.
TEST_F(VideoEncodeTest, CapsChangeEndsTheClip) {
  Harness t(make_element(4));
  t.caps(video_caps());
  for (guint64 n = 0; n < 7; ++n) ASSERT_EQ(t.push(frame_buffer(n, 100 + n, n == 0)), GST_FLOW_OK);
  t.caps(video_caps(40, 32));
  auto old_clip = t.pull_all();
  ASSERT_EQ(old_clip.size(), 2u) << "the caps change must end the clip before the new caps";
  expect_latent_covers(old_clip[0], 0, 0, true);
  expect_latent_covers(old_clip[1], 0, 1);
  auto warnings = t.messages(GST_MESSAGE_WARNING);
  ASSERT_EQ(warnings.size(), 1u) << joined(warnings);
  EXPECT_NE(warnings[0].find("Dropped 2 frames"), std::string::npos) << warnings[0];

  for (guint64 n = 7; n < 12; ++n) ASSERT_EQ(t.push(frame_buffer(n, 300 + n, false, 40, 32)), GST_FLOW_OK);
  ASSERT_TRUE(t.eos());
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 2u);
  for (size_t k = 0; k < 2; ++k) {
    const guint64 first = k == 0 ? 7 : 8;
    EXPECT_EQ(out[k].pts, first * kFrameDur);
    EXPECT_EQ(out[k].duration, (k == 0 ? 1 : 4) * kFrameDur);
    EXPECT_EQ(out[k].values.size(), size_t(kChannels) * 4 * 5);
  }
  EXPECT_TRUE(t.messages(GST_MESSAGE_WARNING).empty()) << "5 frames = 2 whole latents";
}

// A flush drops the frames the session holds, silently; the next frame
// starts a new clip.
TEST_F(VideoEncodeTest, FlushDropsHeldFramesSilently) {
  Harness t(make_element(1));
  t.caps(video_caps());
  for (guint64 n = 0; n < 3; ++n) ASSERT_EQ(t.push(frame_buffer(n, 100 + n, n == 0)), GST_FLOW_OK);
  t.wait_batches(3);
  ASSERT_EQ(t.pull_all().size(), 1u);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_flush_start()));
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_flush_stop(TRUE)));
  GstSegment seg;
  gst_segment_init(&seg, GST_FORMAT_TIME);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_segment(&seg)));
  for (guint64 n = 100; n < 105; ++n) ASSERT_EQ(t.push(frame_buffer(n, 200 + n - 100, n == 100)), GST_FLOW_OK);
  ASSERT_TRUE(t.eos());
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 2u);
  expect_latent_covers(out[0], 100, 0, true);
  expect_latent_covers(out[1], 100, 1);
  EXPECT_TRUE(t.messages(GST_MESSAGE_WARNING).empty()) << "a flush drops held frames silently";
  auto ref = encode_clip(9, 1, false, 200);
  for (size_t k = 0; k < 2; ++k) EXPECT_LE(rel_diff(out[k].values, ref[k].values), 1e-5) << "latent " << k;
}

// A new stream ends the clip like EOS does.
TEST_F(VideoEncodeTest, StreamStartEndsTheClip) {
  Harness t(make_element(16));
  t.caps(video_caps());
  for (guint64 n = 0; n < 6; ++n) ASSERT_EQ(t.push(frame_buffer(n, 100 + n, n == 0)), GST_FLOW_OK);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_stream_start("next")));
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 2u);
  auto warnings = t.messages(GST_MESSAGE_WARNING);
  ASSERT_EQ(warnings.size(), 1u) << joined(warnings);
  EXPECT_NE(warnings[0].find("Dropped 1 frames"), std::string::npos) << warnings[0];
}

// batch-timeout hands a partial batch over without ending the clip: the
// session keeps the incomplete group and the latents stay those of one clip.
TEST_F(VideoEncodeTest, BatchTimeoutDoesNotEndTheClip) {
  GstElement* e = make_element(16);
  g_object_set(e, "batch-timeout", static_cast<guint64>(20 * GST_MSECOND), nullptr);
  Harness t(e);
  t.caps(video_caps());
  for (guint64 n = 0; n < 3; ++n) ASSERT_EQ(t.push(frame_buffer(n, 100 + n, n == 0)), GST_FLOW_OK);
  t.wait_batches(1);
  EXPECT_EQ(t.pull_all().size(), 1u);
  for (guint64 n = 3; n < 9; ++n) ASSERT_EQ(t.push(frame_buffer(n, 100 + n)), GST_FLOW_OK);
  ASSERT_TRUE(t.eos());
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 2u);
  expect_latent_covers(out[0], 0, 1);
  expect_latent_covers(out[1], 0, 2);
  EXPECT_TRUE(t.messages(GST_MESSAGE_WARNING).empty());
  auto ref = encode_clip(13, 1);
  for (size_t k = 0; k < 2; ++k) EXPECT_LE(rel_diff(out[k].values, ref[1 + k].values), 1e-5) << "latent " << k;
}

// Output caps: temporal-downscale=4 and the framerate divided by 4; back
// from latent caps to video, multiplied.
TEST_F(VideoEncodeTest, CapsCarryTemporalDownscaleAndFramerate) {
  {
    Harness t(make_element(1));
    t.caps(video_caps(kW, kH, 30, 1));
    ASSERT_EQ(t.push(frame_buffer(0, 100, true)), GST_FLOW_OK);
    GstCaps* caps = t.out_caps();
    ASSERT_NE(caps, nullptr);
    const GstStructure* s = gst_caps_get_structure(caps, 0);
    int td = 0, fps_n = 0, fps_d = 0;
    EXPECT_TRUE(gst_structure_get_int(s, "temporal-downscale", &td));
    EXPECT_EQ(td, 4);
    EXPECT_TRUE(gst_structure_get_fraction(s, "framerate", &fps_n, &fps_d));
    EXPECT_EQ(fps_n, 15);
    EXPECT_EQ(fps_d, 2);
    int channels = 0;
    gst_structure_get_int(s, "channels", &channels);
    EXPECT_EQ(channels, kChannels);
    gst_caps_unref(caps);
  }
  {
    Harness t(make_element(1));
    t.caps(video_caps(kW, kH, 0, 1));
    ASSERT_EQ(t.push(frame_buffer(0, 100, true)), GST_FLOW_OK);
    GstCaps* caps = t.out_caps();
    ASSERT_NE(caps, nullptr);
    int fps_n = -1, fps_d = -1;
    EXPECT_TRUE(gst_structure_get_fraction(gst_caps_get_structure(caps, 0), "framerate", &fps_n, &fps_d));
    EXPECT_EQ(fps_n, 0);
    EXPECT_EQ(fps_d, 1);
    gst_caps_unref(caps);
  }
  {
    // Downstream wants 15/2 latents: upstream is asked for 30/1 video; and
    // latents of another temporal downscale cannot come from this model.
    Harness t(make_element(1));
    GstPad* sink = gst_element_get_static_pad(t.element, "sink");
    GstCaps* want = gst_caps_from_string("application/x-latent, framerate=(fraction)15/2");
    GstCaps* video = nullptr;
    gst_harness_set_sink_caps(t.h, want);  // takes it
    video = gst_pad_query_caps(sink, nullptr);
    ASSERT_FALSE(gst_caps_is_empty(video));
    int fps_n = 0, fps_d = 0;
    EXPECT_TRUE(gst_structure_get_fraction(gst_caps_get_structure(video, 0), "framerate", &fps_n, &fps_d));
    EXPECT_EQ(fps_n, 30);
    EXPECT_EQ(fps_d, 1);
    gst_caps_unref(video);
    gst_harness_set_sink_caps_str(t.h, "application/x-latent, temporal-downscale=(int)1");
    video = gst_pad_query_caps(sink, nullptr);
    gchar* str = gst_caps_to_string(video);
    EXPECT_TRUE(gst_caps_is_empty(video)) << "an image latent stream cannot come from a video VAE: " << str;
    g_free(str);
    gst_caps_unref(video);
    gst_object_unref(sink);
  }
}

// Latency: the group wait (3 frames) comes on top of the batch wait.
TEST_F(VideoEncodeTest, LatencyIncludesTheGroupWait) {
  constexpr GstClockTime upstream = 10 * GST_MSECOND;
  {
    Harness t(make_element(1));
    gst_harness_set_live(t.h, TRUE);
    gst_harness_set_upstream_latency(t.h, upstream);
    t.caps(video_caps());
    EXPECT_EQ(gst_harness_query_latency(t.h), upstream + 3 * kFrameDur);
  }
  {
    Harness t(make_element(4));
    gst_harness_set_live(t.h, TRUE);
    gst_harness_set_upstream_latency(t.h, upstream);
    t.caps(video_caps());
    EXPECT_EQ(gst_harness_query_latency(t.h), upstream + 6 * kFrameDur);
  }
  {
    GstElement* e = make_element(16);
    g_object_set(e, "batch-timeout", static_cast<guint64>(50 * GST_MSECOND), nullptr);
    Harness t(e);
    gst_harness_set_live(t.h, TRUE);
    gst_harness_set_upstream_latency(t.h, upstream);
    t.caps(video_caps());
    EXPECT_EQ(gst_harness_query_latency(t.h), upstream + 50 * GST_MSECOND + 3 * kFrameDur);
  }
}

// The property: default off, settable while playing.
TEST_F(VideoEncodeTest, PadClipEndProperty) {
  Harness t(make_element(1));
  gboolean pad = TRUE;
  g_object_get(t.element, "pad-clip-end", &pad, nullptr);
  EXPECT_FALSE(pad);
  GParamSpec* spec = g_object_class_find_property(G_OBJECT_GET_CLASS(t.element), "pad-clip-end");
  ASSERT_NE(spec, nullptr);
  EXPECT_TRUE(spec->flags & GST_PARAM_MUTABLE_PLAYING);
  EXPECT_NE(std::string(g_param_spec_get_blurb(spec)).find("no reference"), std::string::npos);
  // Switched on while playing: the next clip end pads.
  t.caps(video_caps());
  for (guint64 n = 0; n < 2; ++n) ASSERT_EQ(t.push(frame_buffer(n, 100 + n, n == 0)), GST_FLOW_OK);
  g_object_set(t.element, "pad-clip-end", TRUE, nullptr);
  ASSERT_TRUE(t.eos());
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[1].pts, kFrameDur);
  EXPECT_EQ(out[1].duration, kFrameDur);
}

}  // namespace
