// GstHarness and pipeline tests of vaedecode with a causal video VAE decoder
// (Wan 2.1, random weights from tests/python/wan_weights.py written at test
// time; TAEHV from taehv_reference.py for one pipeline): video latents
// (temporal-downscale=4) decoded as a stream give the engine session's
// frames byte for byte in the same batches (and within 1 of 255 of its
// whole clip in one batch: the session's passes of 1 and 2 latents may round
// a value differently, gst-vae-decode-file shows the same); the frames'
// timestamps, offsets, DISCONT and durations; clip ends (DISCONT, flush, new
// caps, a new stream, EOS); image latents given to a video decoder; refused
// caps; and vaeencode ! vaedecode pipelines, alone and two at once on one
// model file.
//
// A checkpoint that cannot be generated or loaded is a failure, not a skip.
#include <gst/check/gstharness.h>
#include <gst/gst.h>
#include <gst/video/video.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "decoder.h"
#include "fixtures.h"
#include "harness_util.h"

#ifndef GSTVAE_SHARED_DIR
#define GSTVAE_SHARED_DIR ""
#endif

namespace {

using namespace gstvae::test;  // harness_util.h and fixtures.h

constexpr int kChannels = 16;     // Wan 2.1's latent channels
constexpr int kLW = 8, kLH = 6;   // latents 8x6: frames 64x48
constexpr int kUpscale = 8;
constexpr size_t kFrameBytes = size_t(kLW) * kUpscale * kLH * kUpscale * 3;  // RGB

// Caps of Wan 2.1 latents of w x h, video latents (temporal-downscale=4, at
// 25/4: frames at 25/1) unless `td` says otherwise (0: no field).
std::string wan_caps(int w = kLW, int h = kLH, int td = 4, int fps_n = 25, int fps_d = 4) {
  std::string s = latent_caps(w, h, "raw", kChannels, fps_n, fps_d);
  if (td > 0) s += ", temporal-downscale=(int)" + std::to_string(td);
  return s;
}

std::vector<Latent> wan_latents(size_t n, uint64_t seed0 = 100, int w = kLW, int h = kLH) {
  return make_latents(w, h, n, seed0, kChannels);
}

// Stream frame numbers of latent k of a clip whose first frame is stream
// frame f0, as vaeencode makes them with a Wan model: latent 0 covers frame
// f0, latent k frames f0+4k-3 .. f0+4k.
guint64 first_frame(guint64 f0, size_t k) { return k == 0 ? f0 : f0 + 4 * k - 3; }
guint64 frame_count(size_t k) { return k == 0 ? 1 : 4; }

// Latent k of that clip as a buffer: the PTS, DTS and offset of its first
// frame, the duration of its frames (none without `with_duration`).
GstBuffer* video_latent(const Latent& latent, guint64 f0, size_t k, bool discont = false, bool with_duration = true) {
  GstBuffer* b = gst_buffer_new_allocate(nullptr, latent.size() * sizeof(float), nullptr);
  gst_buffer_fill(b, 0, latent.data(), latent.size() * sizeof(float));
  const guint64 first = first_frame(f0, k);
  GST_BUFFER_PTS(b) = first * kFrameDur;
  GST_BUFFER_DTS(b) = first * kFrameDur;
  GST_BUFFER_DURATION(b) = with_duration ? frame_count(k) * kFrameDur : GST_CLOCK_TIME_NONE;
  GST_BUFFER_OFFSET(b) = first;
  GST_BUFFER_OFFSET_END(b) = first + frame_count(k);
  if (discont) GST_BUFFER_FLAG_SET(b, GST_BUFFER_FLAG_DISCONT);
  return b;
}

// Frame buffers: their bytes and what they say about their time.
struct Frame {
  GstClockTime pts, dts, duration;
  guint64 offset, offset_end;
  bool discont;
  Pixels bytes;
};

std::vector<Frame> frames_of(std::vector<GstBuffer*> bufs) {
  std::vector<Frame> out;
  for (GstBuffer* b : bufs)
    out.push_back(Frame{GST_BUFFER_PTS(b), GST_BUFFER_DTS(b), GST_BUFFER_DURATION(b), GST_BUFFER_OFFSET(b),
                        GST_BUFFER_OFFSET_END(b), GST_BUFFER_FLAG_IS_SET(b, GST_BUFFER_FLAG_DISCONT) != 0,
                        bytes_of(b)});
  unref_all(bufs);
  return out;
}

// Frames [from, from + expect.size()) of `got` are `expect`, byte for byte.
void expect_bytes(const std::vector<Frame>& got, size_t from, const std::vector<Pixels>& expect,
                  const std::string& what) {
  ASSERT_GE(got.size(), from + expect.size()) << what;
  for (size_t i = 0; i < expect.size(); ++i)
    EXPECT_TRUE(got[from + i].bytes == expect[i]) << what << ", frame " << i << ": "
                                                  << diff_summary(got[from + i].bytes, expect[i]);
}

// The same within 1 of 255 per byte: the engine's session is exact only for
// the same batching (passes of other sizes may round a value the other way).
void expect_near(const std::vector<Frame>& got, size_t from, const std::vector<Pixels>& expect,
                 const std::string& what) {
  ASSERT_GE(got.size(), from + expect.size()) << what;
  for (size_t i = 0; i < expect.size(); ++i) {
    const Pixels& a = got[from + i].bytes;
    ASSERT_EQ(a.size(), expect[i].size()) << what << ", frame " << i;
    int worst = 0;
    for (size_t j = 0; j < a.size(); ++j) worst = std::max(worst, std::abs(int(a[j]) - int(expect[i][j])));
    EXPECT_LE(worst, 1) << what << ", frame " << i << ": " << diff_summary(a, expect[i]);
  }
}

// Frame i of the stream at 25/1: its time and offsets; DISCONT as given.
void expect_frame_at(const Frame& f, guint64 i, bool discont) {
  EXPECT_EQ(f.pts, i * kFrameDur) << "frame " << i << " pts " << time_string(f.pts);
  EXPECT_EQ(f.dts, i * kFrameDur) << "frame " << i;
  EXPECT_EQ(f.duration, kFrameDur) << "frame " << i << " duration " << time_string(f.duration);
  EXPECT_EQ(f.offset, i) << "frame " << i;
  EXPECT_EQ(f.offset_end, i + 1) << "frame " << i;
  EXPECT_EQ(f.discont, discont) << "frame " << i;
  EXPECT_EQ(f.bytes.size(), kFrameBytes) << "frame " << i;
}

std::string script(const char* name) { return std::string(GSTVAE_SOURCE_DIR) + "/tests/python/" + name; }

// Runs a generator command; "" on success, else what failed.
std::string run(const std::string& cmd) {
  return std::system((cmd + " > /dev/null").c_str()) == 0 ? "" : "failed: " + cmd;
}

/* ---------------------------------------------------------------- fixture */

class VideoDecodeTest : public ::testing::Test {
 protected:
  static TempDir* dir_;
  static std::string wan_;
  static std::string error_;
  static std::shared_ptr<gstvae::Decoder> engine_;
  static std::map<std::string, std::vector<Pixels>> cache_;

  static void SetUpTestSuite() {
    dir_ = new TempDir();
    wan_ = dir_->file("wan21_test.safetensors");
    error_ = run(std::string(GSTVAE_PYTHON) + " '" + script("wan_weights.py") +
                 "' --variant 2.1 --dim 8 --z 16 --layout official --dtype F32 --seed 1 --with-decoder --out '" +
                 wan_ + "'");
    if (!error_.empty()) return;
    try {
      gstvae::ModelOptions options;
      options.device = "cpu";
      engine_ = gstvae::load_decoder(wan_, options);
    } catch (const std::exception& e) {
      error_ = std::string("could not load the generated Wan decoder: ") + e.what();
    }
  }
  static void TearDownTestSuite() {
    engine_.reset();
    cache_.clear();
    delete dir_;
    dir_ = nullptr;
  }

  void SetUp() override {
    // A fixture that cannot be made is a failure.
    ASSERT_TRUE(error_.empty()) << error_;
    ASSERT_NE(engine_, nullptr);
    ASSERT_EQ(engine_->info().temporal_upscale, 4) << "a Wan decoder makes 4 frames per latent";
    ASSERT_EQ(engine_->info().latent_channels, kChannels);
    ASSERT_EQ(engine_->info().upscale, kUpscale);
    GstElementFactory* f = gst_element_factory_find("vaedecode");
    ASSERT_NE(f, nullptr) << "vaedecode not found: is GST_PLUGIN_PATH set to the build's gst folder?";
    gst_object_unref(f);
  }

  static GstElement* make_element(guint per_batch, const std::string& model = wan_) {
    GstElement* e = gst_element_factory_make("vaedecode", nullptr);
    g_object_set(e, "model", model.c_str(), "device", "cpu", "per-batch", per_batch, nullptr);
    return e;
  }

  static std::vector<Pixels> split(const uint8_t* data, size_t frames) {
    std::vector<Pixels> out;
    for (size_t i = 0; i < frames; ++i) out.emplace_back(data + i * kFrameBytes, data + (i + 1) * kFrameBytes);
    return out;
  }

  // The engine's own video session decoding `latents` as one clip, in
  // batches of `per_batch` from the clip's first latent (0: all in one):
  // 1 + 4 (T - 1) frames.
  static std::vector<Pixels> engine_clip(const std::vector<Latent>& latents, size_t per_batch = 0, int w = kLW,
                                         int h = kLH) {
    if (per_batch == 0) per_batch = latents.size();
    std::vector<size_t> sizes;
    for (size_t start = 0; start < latents.size(); start += per_batch)
      sizes.push_back(std::min(per_batch, latents.size() - start));
    return engine_batches(latents, sizes, w, h);
  }
  // The same in batches of these sizes.
  static std::vector<Pixels> engine_batches(const std::vector<Latent>& latents, const std::vector<size_t>& sizes,
                                            int w = kLW, int h = kLH) {
    auto session = engine_->open_session(4);
    std::vector<Pixels> out;
    size_t start = 0;
    for (size_t n : sizes) {
      auto batch = engine_->new_batch(h, w, n);
      for (size_t i = 0; i < n; ++i) batch->add(latents[start + i].data(), start + i);
      auto block = engine_->new_pixels(*batch, gstvae::PixelFormat::RGB, 4);
      const gstvae::BatchResult r =
          session->decode(*batch, gstvae::DecodeParams{}, gstvae::PixelFormat::RGB, *block);
      const size_t frame_bytes = engine_->frame_bytes(*batch, gstvae::PixelFormat::RGB);
      for (size_t i = 0; i < r.spans.size(); ++i)
        out.emplace_back(block->data() + i * frame_bytes, block->data() + (i + 1) * frame_bytes);
      start += n;
    }
    return out;
  }

  // The clip of T latents of seeds seed0.., decoded in batches of per_batch
  // (0: one batch; cached).
  static const std::vector<Pixels>& clip(size_t t, uint64_t seed0 = 100, size_t per_batch = 0) {
    if (per_batch >= t) per_batch = 0;
    const std::string key = std::to_string(t) + "/" + std::to_string(seed0) + "/" + std::to_string(per_batch);
    auto it = cache_.find(key);
    if (it == cache_.end()) it = cache_.emplace(key, engine_clip(wan_latents(t, seed0), per_batch)).first;
    return it->second;
  }

  // Pushes latents 0..T-1 of one clip (stream frame 0 first) and EOS.
  static void push_clip(Harness& t, const std::vector<Latent>& lat, bool with_duration = true) {
    for (size_t k = 0; k < lat.size(); ++k)
      ASSERT_EQ(t.push(video_latent(lat[k], 0, k, k == 0, with_duration)), GST_FLOW_OK) << "latent " << k;
  }
};

TempDir* VideoDecodeTest::dir_ = nullptr;
std::string VideoDecodeTest::wan_;
std::string VideoDecodeTest::error_;
std::shared_ptr<gstvae::Decoder> VideoDecodeTest::engine_;
std::map<std::string, std::vector<Pixels>> VideoDecodeTest::cache_;

/* ------------------------------------------------------------- exactness */

struct ClipCase {
  guint per_batch;
  size_t latents;
};

class VideoDecodeExactTest : public VideoDecodeTest, public ::testing::WithParamInterface<ClipCase> {};

// T latents in batches of per-batch: 1 + 4 (T - 1) frames at frames 0, 1,
// ... of 25/1, byte-identical to the engine's session given the same
// batches, within 1 of 255 of the engine's whole clip in one batch.
TEST_P(VideoDecodeExactTest, FramesOfTheWholeClipWhateverTheBatching) {
  const ClipCase c = GetParam();
  Harness t(make_element(c.per_batch));
  t.caps(wan_caps());
  auto lat = wan_latents(c.latents);
  push_clip(t, lat);
  ASSERT_TRUE(t.eos());
  auto out = frames_of(t.pull_all());
  const size_t expect_frames = 1 + 4 * (c.latents - 1);
  ASSERT_EQ(out.size(), expect_frames) << c.latents << " latents at per-batch " << c.per_batch;
  const auto& ref = clip(c.latents, 100, c.per_batch);
  ASSERT_EQ(ref.size(), expect_frames) << "the engine's session";
  expect_bytes(out, 0, ref, "per-batch " + std::to_string(c.per_batch) + " against the engine in the same batches");
  expect_near(out, 0, clip(c.latents), "per-batch " + std::to_string(c.per_batch) + " against the whole clip");
  for (size_t i = 0; i < out.size(); ++i) expect_frame_at(out[i], i, i == 0);
  EXPECT_EQ(t.u64("frames-out"), expect_frames);
}

INSTANTIATE_TEST_SUITE_P(Batching, VideoDecodeExactTest,
                         ::testing::Values(ClipCase{1, 1}, ClipCase{1, 2}, ClipCase{1, 5}, ClipCase{2, 1},
                                           ClipCase{2, 2}, ClipCase{2, 5}, ClipCase{5, 1}, ClipCase{5, 2},
                                           ClipCase{5, 5}),
                         [](const ::testing::TestParamInfo<ClipCase>& info) {
                           return "PerBatch" + std::to_string(info.param.per_batch) + "_T" +
                                  std::to_string(info.param.latents);
                         });

// batch-timeout hands partial batches over mid-clip (2 latents, then 3):
// the clip goes on, the frames are still the whole clip's.
TEST_F(VideoDecodeTest, BatchTimeoutKeepsTheClip) {
  GstElement* e = make_element(16);
  g_object_set(e, "batch-timeout", static_cast<guint64>(20 * GST_MSECOND), nullptr);
  Harness t(e);
  t.caps(wan_caps());
  auto lat = wan_latents(5);
  for (size_t k = 0; k < 2; ++k) ASSERT_EQ(t.push(video_latent(lat[k], 0, k, k == 0)), GST_FLOW_OK);
  ASSERT_TRUE(eventually([&] { return t.u64("frames-out") == 5; })) << "the timeout released the first 2 latents";
  EXPECT_EQ(t.u64("batches"), 1u);
  for (size_t k = 2; k < 5; ++k) ASSERT_EQ(t.push(video_latent(lat[k], 0, k)), GST_FLOW_OK);
  ASSERT_TRUE(eventually([&] { return t.u64("frames-out") == 17; })) << "the timeout released the other 3";
  EXPECT_EQ(t.u64("batches"), 2u);
  ASSERT_TRUE(t.eos());
  auto out = frames_of(t.pull_all());
  ASSERT_EQ(out.size(), 17u);
  expect_bytes(out, 0, engine_batches(lat, {2, 3}), "batch-timeout, against the engine in batches of 2 and 3");
  expect_near(out, 0, clip(5), "batch-timeout, against the whole clip");
  for (size_t i = 0; i < out.size(); ++i) expect_frame_at(out[i], i, i == 0);
}

/* ------------------------------------------------------------- timestamps */

// Latents with durations (as vaeencode makes them): every frame at its own
// 25/1 slot (the latent's PTS + k x dur / 4, duration dur / 4), offset = the
// latent's + k, DISCONT only on the clip's first.
TEST_F(VideoDecodeTest, FrameTimesFromLatentDurations) {
  Harness t(make_element(2));
  t.caps(wan_caps());
  push_clip(t, wan_latents(3), true);
  ASSERT_TRUE(t.eos());
  auto out = frames_of(t.pull_all());
  ASSERT_EQ(out.size(), 9u);
  for (size_t i = 0; i < out.size(); ++i) expect_frame_at(out[i], i, i == 0);
  expect_bytes(out, 0, clip(3, 100, 2), "latents with durations");
}

// Latents without durations: the same slots from the output framerate (25/4
// latents: 40 ms frames), every frame's duration that frame duration; the
// clip's first frame (the first latent's one frame) included.
TEST_F(VideoDecodeTest, FrameTimesWithoutLatentDurations) {
  Harness t(make_element(2));
  t.caps(wan_caps());
  push_clip(t, wan_latents(3), false);
  ASSERT_TRUE(t.eos());
  auto out = frames_of(t.pull_all());
  ASSERT_EQ(out.size(), 9u);
  for (size_t i = 0; i < out.size(); ++i) expect_frame_at(out[i], i, i == 0);
  expect_bytes(out, 0, clip(3, 100, 2), "latents without durations");
}

// Latents whose time does not divide by 4 (100 ms + 2 ns each, from 1 s, at
// latent offsets 10, 11, ...): the 4 frames of a latent share its time
// exactly (contiguous, summing to it), offsets latent offset + k.
TEST_F(VideoDecodeTest, FramesShareTheLatentsTime) {
  constexpr GstClockTime base = GST_SECOND, dur = 100 * GST_MSECOND + 2;
  Harness t(make_element(3));
  t.caps(wan_caps());
  auto lat = wan_latents(3);
  for (size_t k = 0; k < lat.size(); ++k) {
    GstBuffer* b = latent_buffer(lat[k], 0, k == 0);
    GST_BUFFER_PTS(b) = GST_BUFFER_DTS(b) = base + k * dur;
    GST_BUFFER_DURATION(b) = dur;
    GST_BUFFER_OFFSET(b) = 10 + k;
    GST_BUFFER_OFFSET_END(b) = 11 + k;
    ASSERT_EQ(t.push(b), GST_FLOW_OK);
  }
  ASSERT_TRUE(t.eos());
  auto out = frames_of(t.pull_all());
  ASSERT_EQ(out.size(), 9u);
  // The clip's first latent: one frame, all of its time.
  EXPECT_EQ(out[0].pts, base);
  EXPECT_EQ(out[0].duration, dur);
  EXPECT_EQ(out[0].offset, 10u);
  EXPECT_EQ(out[0].offset_end, 11u);
  EXPECT_TRUE(out[0].discont);
  for (size_t k = 1; k < 3; ++k) {
    GstClockTime sum = 0;
    for (size_t j = 0; j < 4; ++j) {
      const Frame& f = out[1 + 4 * (k - 1) + j];
      const std::string where = "latent " + std::to_string(k) + " part " + std::to_string(j);
      EXPECT_EQ(f.pts, base + k * dur + gst_util_uint64_scale(dur, j, 4)) << where;
      EXPECT_EQ(f.dts, f.pts) << where;
      EXPECT_GE(f.duration, dur / 4) << where;
      EXPECT_LE(f.duration, dur / 4 + 1) << where;
      EXPECT_EQ(f.offset, 10 + k + j) << where;
      EXPECT_EQ(f.offset_end, 11 + k + j) << where;
      EXPECT_FALSE(f.discont) << where;
      if (j < 3) {
        EXPECT_EQ(f.pts + f.duration, out[1 + 4 * (k - 1) + j + 1].pts) << where << ": gap or overlap";
      }
      sum += f.duration;
    }
    EXPECT_EQ(sum, dur) << "latent " << k << ": its frames' durations add up to its own";
  }
}

// Output caps: the latents' framerate x 4, the latents' size x 8.
TEST_F(VideoDecodeTest, OutputCapsFramerateTimesFour) {
  {
    Harness t(make_element(1));
    t.caps(wan_caps());
    ASSERT_EQ(t.push(video_latent(wan_latents(1)[0], 0, 0, true)), GST_FLOW_OK);
    auto c = t.out_caps();
    EXPECT_EQ(c.format, "RGB");
    EXPECT_EQ(c.width, kLW * kUpscale);
    EXPECT_EQ(c.height, kLH * kUpscale);
    EXPECT_EQ(c.fps_n, 25);
    EXPECT_EQ(c.fps_d, 1);
  }
  {
    Harness t(make_element(1));
    t.caps(wan_caps(kLW, kLH, 4, 15, 2));
    ASSERT_EQ(t.push(video_latent(wan_latents(1)[0], 0, 0, true)), GST_FLOW_OK);
    auto c = t.out_caps();
    EXPECT_EQ(c.fps_n, 30);
    EXPECT_EQ(c.fps_d, 1);
  }
}

/* ------------------------------------------------------------- clip ends */

// A DISCONT latent mid-stream ends the clip: it gives 1 frame, the first of
// a fresh clip, and the rest follow as that clip's.
TEST_F(VideoDecodeTest, DiscontLatentStartsANewClip) {
  for (guint per_batch : {1u, 4u, 16u}) {
    SCOPED_TRACE("per-batch " + std::to_string(per_batch));
    Harness t(make_element(per_batch));
    t.caps(wan_caps());
    auto a = wan_latents(3, 100), b = wan_latents(3, 200);
    push_clip(t, a);
    for (size_t k = 0; k < b.size(); ++k) ASSERT_EQ(t.push(video_latent(b[k], 9, k, k == 0)), GST_FLOW_OK);
    ASSERT_TRUE(t.eos());
    auto out = frames_of(t.pull_all());
    ASSERT_EQ(out.size(), 18u) << "9 frames per clip: the DISCONT latent gives 1";
    expect_bytes(out, 0, clip(3, 100, per_batch), "old clip");
    expect_bytes(out, 9, clip(3, 200, per_batch), "new clip");
    for (size_t i = 0; i < out.size(); ++i) expect_frame_at(out[i], i, i == 0 || i == 9);
  }
}

// A flush ends the clip: latents staged before it are dropped, the next
// latent (no DISCONT flag) is a clip's first.
TEST_F(VideoDecodeTest, FlushStartsANewClip) {
  for (guint per_batch : {1u, 16u}) {
    SCOPED_TRACE("per-batch " + std::to_string(per_batch));
    Harness t(make_element(per_batch));
    t.caps(wan_caps());
    auto a = wan_latents(3, 100), b = wan_latents(3, 200);
    push_clip(t, a);
    auto before = frames_of(t.pull_all());
    EXPECT_EQ(before.size(), per_batch == 1 ? 9u : 0u);
    if (per_batch == 1) expect_bytes(before, 0, clip(3, 100, 1), "before the flush");
    ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_flush_start()));
    ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_flush_stop(TRUE)));
    ASSERT_TRUE(t.segment());
    for (size_t k = 0; k < b.size(); ++k) ASSERT_EQ(t.push(video_latent(b[k], 0, k)), GST_FLOW_OK);
    ASSERT_TRUE(t.eos());
    auto out = frames_of(t.pull_all());
    ASSERT_EQ(out.size(), 9u);
    expect_bytes(out, 0, clip(3, 200, per_batch), "after the flush");
    for (size_t i = 0; i < out.size(); ++i) expect_frame_at(out[i], i, false);
  }
}

// New caps end the clip, whether the latents' size changes or only their
// framerate: the next latent (no DISCONT flag) is a clip's first.
TEST_F(VideoDecodeTest, NewCapsStartANewClip) {
  {
    SCOPED_TRACE("new size");
    Harness t(make_element(2));
    t.caps(wan_caps());
    auto a = wan_latents(3, 100);
    auto b = wan_latents(3, 300, 5, 4);
    push_clip(t, a);
    t.caps(wan_caps(5, 4));
    for (size_t k = 0; k < b.size(); ++k) ASSERT_EQ(t.push(video_latent(b[k], 9, k)), GST_FLOW_OK);
    ASSERT_TRUE(t.eos());
    auto out = frames_of(t.pull_all());
    ASSERT_EQ(out.size(), 18u);
    expect_bytes(out, 0, clip(3, 100, 2), "old clip");
    expect_bytes(out, 9, engine_clip(b, 2, 5, 4), "new clip at 5x4");
    EXPECT_EQ(out[9].bytes.size(), size_t(40) * 32 * 3);
  }
  {
    SCOPED_TRACE("new framerate");
    Harness t(make_element(2));
    t.caps(wan_caps());
    auto a = wan_latents(3, 100), b = wan_latents(3, 200);
    push_clip(t, a);
    t.caps(wan_caps(kLW, kLH, 4, 25, 2));
    for (size_t k = 0; k < b.size(); ++k) ASSERT_EQ(t.push(video_latent(b[k], 9, k)), GST_FLOW_OK);
    ASSERT_TRUE(t.eos());
    auto out = frames_of(t.pull_all());
    ASSERT_EQ(out.size(), 18u) << "the caps change must end the clip";
    expect_bytes(out, 0, clip(3, 100, 2), "old clip");
    expect_bytes(out, 9, clip(3, 200, 2), "new clip");
    EXPECT_EQ(t.out_caps().fps_n, 50);
  }
}

// A new stream (STREAM_START) ends the clip as well.
TEST_F(VideoDecodeTest, StreamStartStartsANewClip) {
  Harness t(make_element(4));
  t.caps(wan_caps());
  auto a = wan_latents(2, 100), b = wan_latents(2, 200);
  push_clip(t, a);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_stream_start("next")));
  for (size_t k = 0; k < b.size(); ++k) ASSERT_EQ(t.push(video_latent(b[k], 5, k)), GST_FLOW_OK);
  ASSERT_TRUE(t.eos());
  auto out = frames_of(t.pull_all());
  ASSERT_EQ(out.size(), 10u);
  expect_bytes(out, 0, clip(2, 100), "old stream");
  expect_bytes(out, 5, clip(2, 200), "new stream");
}

// EOS drains the staged latents: every frame comes out, before the EOS.
TEST_F(VideoDecodeTest, EosEmitsEveryFrame) {
  Harness t(make_element(16));
  t.caps(wan_caps());
  auto lat = wan_latents(5);
  push_clip(t, lat);
  EXPECT_EQ(t.queued(), 0u) << "5 latents wait for a batch of 16";
  ASSERT_TRUE(t.eos());
  auto out = frames_of(t.pull_all());
  ASSERT_EQ(out.size(), 17u);
  expect_bytes(out, 0, clip(5), "at EOS");
  auto events = t.pull_event_types();
  EXPECT_NE(std::find(events.begin(), events.end(), GST_EVENT_EOS), events.end());
  EXPECT_EQ(t.u64("frames-out"), 17u);
}

/* ---------------------------------------------------------- image latents */

// Latents without temporal-downscale to a Wan decoder: one frame each, each
// decoded alone as a clip's first (the engine's image session, what
// gst-vae-decode-file --images does, and a fresh video session per latent),
// with its latent's times; the framerate unchanged.
TEST_F(VideoDecodeTest, ImageLatentsGiveOneFrameEach) {
  for (guint per_batch : {1u, 2u, 16u}) {
    SCOPED_TRACE("per-batch " + std::to_string(per_batch));
    Harness t(make_element(per_batch));
    t.caps(wan_caps(kLW, kLH, 0, 25, 1));
    auto lat = wan_latents(5, 400);
    for (size_t i = 0; i < lat.size(); ++i) ASSERT_EQ(t.push(latent_buffer(lat[i], i, i == 0)), GST_FLOW_OK);
    ASSERT_TRUE(t.eos());
    auto out = frames_of(t.pull_all());
    ASSERT_EQ(out.size(), lat.size());
    for (size_t i = 0; i < out.size(); ++i) expect_frame_at(out[i], i, i == 0);
    EXPECT_EQ(t.out_caps().fps_n, 25);
    EXPECT_EQ(t.out_caps().fps_d, 1);

    // --images: an image session, all latents in one batch.
    auto session = engine_->open_session(1);
    auto batch = engine_->new_batch(kLH, kLW, lat.size());
    for (size_t i = 0; i < lat.size(); ++i) batch->add(lat[i].data(), i);
    auto block = engine_->new_pixels(*batch, gstvae::PixelFormat::RGB, 1);
    const auto r = session->decode(*batch, gstvae::DecodeParams{}, gstvae::PixelFormat::RGB, *block);
    ASSERT_EQ(r.spans.size(), lat.size());
    expect_bytes(out, 0, split(block->data(), lat.size()), "image session");
    // Each latent alone: a clip of one.
    for (size_t i = 0; i < lat.size(); ++i) expect_bytes(out, i, engine_clip({lat[i]}), "latent alone");
  }
}

// Video latents, then image latents, then video latents again on one
// element (new caps each time): each part decodes as it would alone.
TEST_F(VideoDecodeTest, VideoThenImageThenVideoLatents) {
  Harness t(make_element(2));
  t.caps(wan_caps());
  auto a = wan_latents(3, 100), images = wan_latents(2, 500), b = wan_latents(2, 200);
  push_clip(t, a);
  t.caps(wan_caps(kLW, kLH, 0, 25, 1));
  for (size_t i = 0; i < images.size(); ++i) ASSERT_EQ(t.push(latent_buffer(images[i], 9 + i)), GST_FLOW_OK);
  t.caps(wan_caps());
  for (size_t k = 0; k < b.size(); ++k) ASSERT_EQ(t.push(video_latent(b[k], 11, k)), GST_FLOW_OK);
  ASSERT_TRUE(t.eos());
  auto out = frames_of(t.pull_all());
  ASSERT_EQ(out.size(), 9u + 2u + 5u);
  expect_bytes(out, 0, clip(3, 100, 2), "first video clip");
  for (size_t i = 0; i < images.size(); ++i) expect_bytes(out, 9 + i, engine_clip({images[i]}), "image latent");
  expect_bytes(out, 11, clip(2, 200, 2), "second video clip");
  for (size_t i = 0; i < out.size(); ++i) {
    EXPECT_EQ(out[i].pts, i * kFrameDur) << "frame " << i;
    EXPECT_EQ(out[i].duration, kFrameDur) << "frame " << i;
  }
}

/* ----------------------------------------------------------------- errors */

// Video latents to an image decoder (TAESD): refused at caps, saying why.
TEST_F(VideoDecodeTest, VideoLatentsToAnImageDecoderRefused) {
  const std::string taesd = std::string(GSTVAE_SHARED_DIR) + "/models/taesd_decoder.safetensors";
  struct stat st;
  ASSERT_EQ(stat(taesd.c_str(), &st), 0) << "missing " << taesd;
  Harness t(make_element(1, taesd), true);
  t.caps(latent_caps(kLW, kLH, "raw", 4, 25, 4) + ", temporal-downscale=(int)4");
  EXPECT_EQ(t.push(latent_buffer(make_latent(kLW, kLH, 1, 4), 0, true)), GST_FLOW_NOT_NEGOTIATED);
  const std::string error = bus_text(t.bus, GST_MESSAGE_ERROR);
  EXPECT_NE(error.find("Video latents need a video decoder"), std::string::npos) << error;
  EXPECT_NE(error.find("temporal-downscale=4"), std::string::npos) << error;
  EXPECT_NE(error.find("taesd_decoder.safetensors"), std::string::npos) << error;
  EXPECT_EQ(t.queued(), 0u);
  EXPECT_EQ(t.u64("frames-out"), 0u);
}

// Latents of another temporal downscale to the Wan decoder: refused.
TEST_F(VideoDecodeTest, OtherTemporalDownscaleRefused) {
  Harness t(make_element(1), true);
  t.caps(wan_caps(kLW, kLH, 2));
  EXPECT_EQ(t.push(video_latent(wan_latents(1)[0], 0, 0, true)), GST_FLOW_NOT_NEGOTIATED);
  const std::string error = bus_text(t.bus, GST_MESSAGE_ERROR);
  EXPECT_NE(error.find("Latents do not fit the decoder"), std::string::npos) << error;
  EXPECT_NE(error.find("temporal-downscale=2"), std::string::npos) << error;
  EXPECT_NE(error.find("4 frames per latent"), std::string::npos) << error;
  EXPECT_EQ(t.queued(), 0u);
  EXPECT_EQ(t.u64("frames-out"), 0u);
}

/* -------------------------------------------------------------- pipelines */

// videotestsrc ! vaeencode ! vaedecode ! appsink, run to EOS: the frames
// (PTS and bytes), the input frames' PTS, the latents vaedecode got.
struct PipelineRun {
  std::vector<GstClockTime> input_pts;
  std::vector<Latent> latents;
  std::vector<Frame> frames;
  std::string error;
  std::string latent_caps;  // what vaedecode's sink pad had at EOS
};

class Pipeline {
 public:
  Pipeline(const std::string& model, const std::string& pattern, int frames) {
    const std::string desc = "videotestsrc num-buffers=" + std::to_string(frames) + " pattern=" + pattern +
                             " ! video/x-raw,format=RGB,width=64,height=48,framerate=25/1"
                             " ! vaeencode name=enc device=cpu per-batch=4 model=\"" + model +
                             "\" ! vaedecode name=dec device=cpu per-batch=2 model=\"" + model +
                             "\" ! appsink name=sink sync=false";
    GError* err = nullptr;
    pipeline_ = gst_parse_launch(desc.c_str(), &err);
    if (err) {
      run_.error = std::string("gst_parse_launch: ") + err->message;
      g_clear_error(&err);
    }
    if (!pipeline_) return;
    GstElement* enc = gst_bin_get_by_name(GST_BIN(pipeline_), "enc");
    GstElement* dec = gst_bin_get_by_name(GST_BIN(pipeline_), "dec");
    sink_ = gst_bin_get_by_name(GST_BIN(pipeline_), "sink");
    probe(enc, &Pipeline::on_frame);
    probe(dec, &Pipeline::on_latent);
    gst_object_unref(enc);
    gst_object_unref(dec);
  }
  ~Pipeline() {
    if (sink_) gst_object_unref(sink_);
    if (pipeline_) {
      gst_element_set_state(pipeline_, GST_STATE_NULL);
      gst_object_unref(pipeline_);
    }
  }
  Pipeline(const Pipeline&) = delete;
  Pipeline& operator=(const Pipeline&) = delete;

  void start() {
    if (pipeline_ && gst_element_set_state(pipeline_, GST_STATE_PLAYING) == GST_STATE_CHANGE_FAILURE)
      run_.error = "could not start the pipeline";
  }

  // Pulls every frame until EOS (or an error), at most 120 s.
  PipelineRun finish() {
    if (!pipeline_ || !run_.error.empty()) return run_;
    GstBus* bus = gst_element_get_bus(pipeline_);
    const gint64 deadline = g_get_monotonic_time() + 120 * G_USEC_PER_SEC;
    while (g_get_monotonic_time() < deadline) {
      GstSample* sample = nullptr;
      g_signal_emit_by_name(sink_, "try-pull-sample", 100 * GST_MSECOND, &sample);
      if (sample) {
        GstBuffer* b = gst_sample_get_buffer(sample);
        run_.frames.push_back(Frame{GST_BUFFER_PTS(b), GST_BUFFER_DTS(b), GST_BUFFER_DURATION(b),
                                    GST_BUFFER_OFFSET(b), GST_BUFFER_OFFSET_END(b),
                                    GST_BUFFER_FLAG_IS_SET(b, GST_BUFFER_FLAG_DISCONT) != 0, bytes_of(b)});
        gst_sample_unref(sample);
        continue;
      }
      if (std::string e = bus_text(bus, GST_MESSAGE_ERROR); !e.empty()) {
        run_.error = e;
        break;
      }
      gboolean eos = FALSE;
      g_object_get(sink_, "eos", &eos, nullptr);
      if (eos) break;
    }
    gst_object_unref(bus);
    if (run_.error.empty()) {
      gboolean eos = FALSE;
      g_object_get(sink_, "eos", &eos, nullptr);
      if (!eos) run_.error = "no EOS within 120 s";
    }
    if (GstElement* dec = gst_bin_get_by_name(GST_BIN(pipeline_), "dec")) {
      GstPad* pad = gst_element_get_static_pad(dec, "sink");
      if (GstCaps* caps = gst_pad_get_current_caps(pad)) {
        gchar* text = gst_caps_to_string(caps);
        run_.latent_caps = text;
        g_free(text);
        gst_caps_unref(caps);
      }
      gst_object_unref(pad);
      gst_object_unref(dec);
    }
    gst_element_set_state(pipeline_, GST_STATE_NULL);
    std::lock_guard<std::mutex> lock(mutex_);
    return run_;
  }

 private:
  using Handler = void (Pipeline::*)(GstBuffer*);
  struct ProbeData {
    Pipeline* self;
    Handler handler;
  };
  void probe(GstElement* e, Handler handler) {
    GstPad* pad = gst_element_get_static_pad(e, "sink");
    gst_pad_add_probe(
        pad, GST_PAD_PROBE_TYPE_BUFFER,
        [](GstPad*, GstPadProbeInfo* info, gpointer data) {
          auto* d = static_cast<ProbeData*>(data);
          (d->self->*(d->handler))(GST_PAD_PROBE_INFO_BUFFER(info));
          return GST_PAD_PROBE_OK;
        },
        new ProbeData{this, handler}, [](gpointer p) { delete static_cast<ProbeData*>(p); });
    gst_object_unref(pad);
  }
  void on_frame(GstBuffer* b) {
    std::lock_guard<std::mutex> lock(mutex_);
    run_.input_pts.push_back(GST_BUFFER_PTS(b));
  }
  void on_latent(GstBuffer* b) {
    std::lock_guard<std::mutex> lock(mutex_);
    run_.latents.push_back(gstvae::test::floats_of(b));
  }

  GstElement* pipeline_ = nullptr;
  GstElement* sink_ = nullptr;
  std::mutex mutex_;
  PipelineRun run_;
};

PipelineRun run_pipeline(const std::string& model, const std::string& pattern, int frames) {
  Pipeline p(model, pattern, frames);
  p.start();
  return p.finish();
}

// The round trip of a clip: 1 + 4 k frames at the PTS of the first 1 + 4 k
// input frames, byte-identical to the engine decoding the latents vaeencode
// made as one clip in vaedecode's batches (2).
void expect_round_trip(const PipelineRun& r, size_t input_frames, const std::vector<Pixels>& engine) {
  ASSERT_TRUE(r.error.empty()) << r.error;
  ASSERT_EQ(r.input_pts.size(), input_frames);
  const size_t latents = r.latents.size();
  ASSERT_GE(latents, 1u);
  const size_t expect = 1 + 4 * (latents - 1);
  ASSERT_EQ(r.frames.size(), expect) << latents << " latents";
  ASSERT_LE(expect, input_frames);
  for (size_t i = 0; i < expect; ++i) {
    EXPECT_EQ(r.frames[i].pts, r.input_pts[i]) << "frame " << i;
    EXPECT_EQ(r.frames[i].duration, kFrameDur) << "frame " << i;
  }
  ASSERT_EQ(engine.size(), expect);
  for (size_t i = 0; i < expect; ++i)
    EXPECT_TRUE(r.frames[i].bytes == engine[i]) << "frame " << i << ": " << diff_summary(r.frames[i].bytes, engine[i]);
}

// 11 frames: vaeencode makes 3 latents (frames 9 and 10 dropped), vaedecode
// 9 frames at the PTS of frames 0..8.
TEST_F(VideoDecodeTest, PipelineRoundTrip) {
  const PipelineRun r = run_pipeline(wan_, "smpte", 11);
  ASSERT_TRUE(r.error.empty()) << r.error;
  ASSERT_EQ(r.latents.size(), 3u);
  expect_round_trip(r, 11, engine_clip(r.latents, 2));
  for (size_t i = 0; i < r.frames.size(); ++i) EXPECT_EQ(r.frames[i].pts, i * kFrameDur) << "frame " << i;
}

// Two pipelines at once on one model file: each gives the frames it gives
// alone (separate stream states over the shared weights).
TEST_F(VideoDecodeTest, ConcurrentPipelinesShareTheModelNotTheState) {
  const PipelineRun alone_a = run_pipeline(wan_, "smpte", 13);
  const PipelineRun alone_b = run_pipeline(wan_, "ball", 17);
  ASSERT_TRUE(alone_a.error.empty()) << alone_a.error;
  ASSERT_TRUE(alone_b.error.empty()) << alone_b.error;
  ASSERT_EQ(alone_a.frames.size(), 13u);
  ASSERT_EQ(alone_b.frames.size(), 17u);
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    Pipeline a(wan_, "smpte", 13), b(wan_, "ball", 17);
    a.start();
    b.start();
    PipelineRun ra, rb;
    std::thread ta([&] { ra = a.finish(); });
    rb = b.finish();
    ta.join();
    ASSERT_TRUE(ra.error.empty()) << ra.error;
    ASSERT_TRUE(rb.error.empty()) << rb.error;
    ASSERT_EQ(ra.frames.size(), alone_a.frames.size());
    ASSERT_EQ(rb.frames.size(), alone_b.frames.size());
    for (size_t i = 0; i < ra.frames.size(); ++i) {
      EXPECT_EQ(ra.frames[i].pts, alone_a.frames[i].pts) << "A frame " << i;
      EXPECT_TRUE(ra.frames[i].bytes == alone_a.frames[i].bytes)
          << "A frame " << i << ": " << diff_summary(ra.frames[i].bytes, alone_a.frames[i].bytes);
    }
    for (size_t i = 0; i < rb.frames.size(); ++i) {
      EXPECT_EQ(rb.frames[i].pts, alone_b.frames[i].pts) << "B frame " << i;
      EXPECT_TRUE(rb.frames[i].bytes == alone_b.frames[i].bytes)
          << "B frame " << i << ": " << diff_summary(rb.frames[i].bytes, alone_b.frames[i].bytes);
    }
  }
  // The two clips differ (a shared state would mix them, equal ones would not show it).
  EXPECT_FALSE(alone_a.frames[5].bytes == alone_b.frames[5].bytes);
  expect_round_trip(alone_a, 13, engine_clip(alone_a.latents, 2));
}

// TAEHV (a generated taew2_1 file holding both halves): encode + decode in
// one pipeline, frames byte-identical to the engine's session over the
// latents vaeencode made; 1 + 4 (L - 1) frames, at input frames' times.
TEST_F(VideoDecodeTest, TaehvPipelineRoundTrip) {
  const std::string model = dir_->file("taew2_1_test.safetensors");
  const std::string err = run(std::string(GSTVAE_PYTHON) + " '" + script("taehv_reference.py") +
                              "' make-weights --variant taew2_1 --width 16 --decoder-widths 32,16,8,8 --seed 3"
                              " --out '" + model + "'");
  ASSERT_TRUE(err.empty()) << err;
  std::shared_ptr<gstvae::Decoder> taehv;
  try {
    gstvae::ModelOptions options;
    options.device = "cpu";
    taehv = gstvae::load_decoder(model, options);
  } catch (const std::exception& e) {
    FAIL() << "could not load the generated TAEHV decoder: " << e.what();
  }
  ASSERT_EQ(taehv->info().temporal_upscale, 4);
  const PipelineRun r = run_pipeline(model, "smpte", 13);
  ASSERT_TRUE(r.error.empty()) << r.error;
  ASSERT_EQ(r.input_pts.size(), 13u);
  ASSERT_GE(r.latents.size(), 2u);
  const size_t expect = 1 + 4 * (r.latents.size() - 1);
  ASSERT_EQ(r.frames.size(), expect) << r.latents.size() << " latents";
  // The stream starts DISCONT, on its first frame (the last quarter of the
  // first latent), and only there.
  for (size_t i = 0; i < r.frames.size(); ++i) EXPECT_EQ(r.frames[i].discont, i == 0) << "frame " << i;
  // Frame i reconstructs input frame 3 + i: a clip's first latent covers
  // frames 0-3 and upstream keeps only the last of its 4 frames.
  for (size_t i = 0; i < r.frames.size() && 3 + i < r.input_pts.size(); ++i)
    EXPECT_EQ(r.frames[i].pts, r.input_pts[3 + i]) << "frame " << i;
  // Every frame at an input frame's time, in order, each lasting until the
  // next.
  for (size_t i = 0; i < r.frames.size(); ++i) {
    if (i + 1 < r.frames.size()) {
      EXPECT_EQ(r.frames[i].pts + r.frames[i].duration, r.frames[i + 1].pts) << "frame " << i;
    }
    EXPECT_NE(std::find(r.input_pts.begin(), r.input_pts.end(), r.frames[i].pts), r.input_pts.end())
        << "frame " << i << " at " << time_string(r.frames[i].pts);
    if (i) {
      EXPECT_GT(r.frames[i].pts, r.frames[i - 1].pts) << "frame " << i;
    }
  }
  // The engine's session over the same latents, in vaedecode's batches of 2.
  auto session = taehv->open_session(4);
  std::vector<Pixels> want;
  for (size_t start = 0; start < r.latents.size(); start += 2) {
    const size_t n = std::min<size_t>(2, r.latents.size() - start);
    auto batch = taehv->new_batch(kLH, kLW, n);
    for (size_t i = 0; i < n; ++i) batch->add(r.latents[start + i].data(), start + i);
    auto block = taehv->new_pixels(*batch, gstvae::PixelFormat::RGB, 4);
    const auto out = session->decode(*batch, gstvae::DecodeParams{}, gstvae::PixelFormat::RGB, *block);
    for (size_t i = 0; i < out.spans.size(); ++i)
      want.emplace_back(block->data() + i * kFrameBytes, block->data() + (i + 1) * kFrameBytes);
  }
  ASSERT_EQ(want.size(), expect);
  for (size_t i = 0; i < expect; ++i)
    EXPECT_TRUE(r.frames[i].bytes == want[i]) << "frame " << i << ": " << diff_summary(r.frames[i].bytes, want[i]);
}

// taeltx_2 (a generated file holding both halves: 128 channels, 4x4 patches,
// 8 frames per latent): the 64x48 frames crop to 64x32, latents 2x1 with
// temporal-downscale=8 at 25/8; 17 frames give 2 latents (frame 16 dropped)
// and 1 + 8 frames back from input frame 7 on (upstream trims 7),
// byte-identical to the engine's session over the same latents.
TEST_F(VideoDecodeTest, TaeltxPipelineCapsAndRoundTrip) {
  const std::string model = dir_->file("taeltx_2_test.safetensors");
  const std::string err = run(std::string(GSTVAE_PYTHON) + " '" + script("taehv_reference.py") +
                              "' make-weights --variant taeltx_2 --width 8 --decoder-widths 16,8,8,8 --seed 4"
                              " --out '" + model + "'");
  ASSERT_TRUE(err.empty()) << err;
  std::shared_ptr<gstvae::Decoder> tae;
  try {
    gstvae::ModelOptions options;
    options.device = "cpu";
    tae = gstvae::load_decoder(model, options);
  } catch (const std::exception& e) {
    FAIL() << "could not load the generated taeltx_2 decoder: " << e.what();
  }
  ASSERT_EQ(tae->info().temporal_upscale, 8);
  ASSERT_EQ(tae->info().upscale, 32);
  const PipelineRun r = run_pipeline(model, "smpte", 17);
  ASSERT_TRUE(r.error.empty()) << r.error;
  ASSERT_EQ(r.input_pts.size(), 17u);
  ASSERT_EQ(r.latents.size(), 2u);
  for (const auto& latent : r.latents) EXPECT_EQ(latent.size(), 128u * 1 * 2);
  for (const char* field : {"channels=(int)128", "width=(int)2", "height=(int)1", "temporal-downscale=(int)8",
                            "framerate=(fraction)25/8"})
    EXPECT_NE(r.latent_caps.find(field), std::string::npos) << field << " not in " << r.latent_caps;
  ASSERT_EQ(r.frames.size(), 9u);
  for (size_t i = 0; i < r.frames.size(); ++i) EXPECT_EQ(r.frames[i].pts, r.input_pts[7 + i]) << "frame " << i;
  auto session = tae->open_session(8);
  const size_t frame_bytes = size_t(64) * 32 * 3;
  std::vector<Pixels> want;
  for (size_t start = 0; start < r.latents.size(); start += 2) {
    const size_t n = std::min<size_t>(2, r.latents.size() - start);
    auto batch = tae->new_batch(1, 2, n);
    for (size_t i = 0; i < n; ++i) batch->add(r.latents[start + i].data(), start + i);
    auto block = tae->new_pixels(*batch, gstvae::PixelFormat::RGB, 8);
    const auto out = session->decode(*batch, gstvae::DecodeParams{}, gstvae::PixelFormat::RGB, *block);
    for (size_t i = 0; i < out.spans.size(); ++i)
      want.emplace_back(block->data() + i * frame_bytes, block->data() + (i + 1) * frame_bytes);
  }
  ASSERT_EQ(want.size(), 9u);
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_EQ(r.frames[i].bytes.size(), frame_bytes) << "frame " << i;
    EXPECT_TRUE(r.frames[i].bytes == want[i]) << "frame " << i << ": " << diff_summary(r.frames[i].bytes, want[i]);
  }
}

}  // namespace
