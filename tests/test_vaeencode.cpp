// GstHarness tests of the vaeencode element: batching, timestamps, events,
// caps, latency, properties, messages and numerical agreement with the engine
// (linked directly into this test, run in the same process).
#include <gst/check/gstharness.h>
#include <gst/check/gsttestclock.h>
#include <gst/gst.h>
#include <gst/video/video.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "encoder.h"
#include "fixtures.h"
#include "harness_util.h"

namespace {

using gstvae::test::TempDir;
using gstvae::test::VaeSpec;

using gstvae::test::bus_text;
using gstvae::test::eventually;
using gstvae::test::floats_of;
using gstvae::test::Harness;
using gstvae::test::kFrameDur;
using gstvae::test::unref_all;

constexpr const char* kProgress = "vaeencode-progress";

/* ---------------------------------------------------------------- helpers */

std::string video_caps(const char* format, int w, int h, int fps_n = 25, int fps_d = 1) {
  return "video/x-raw, format=(string)" + std::string(format) + ", width=(int)" + std::to_string(w) +
         ", height=(int)" + std::to_string(h) + ", framerate=(fraction)" + std::to_string(fps_n) + "/" +
         std::to_string(fps_d);
}

GstVideoInfo video_info(const char* format, int w, int h) {
  GstVideoInfo info;
  gst_video_info_init(&info);
  gst_video_info_set_format(&info, gst_video_format_from_string(format), w, h);
  return info;
}

gstvae::PixelFormat pixel_format(const char* name) {
  gstvae::PixelFormat f;
  if (!gstvae::parse_pixel_format(name, &f)) throw std::runtime_error(std::string("bad format ") + name);
  return f;
}

// One input frame: its packed pixels as GStreamer lays them out (default stride).
struct Frame {
  std::vector<uint8_t> pixels;
  size_t stride;
};

Frame make_frame(const char* format, int w, int h, uint64_t seed) {
  GstVideoInfo info = video_info(format, w, h);
  const int bpp = GST_VIDEO_INFO_COMP_PSTRIDE(&info, 0);
  const size_t stride = GST_VIDEO_INFO_PLANE_STRIDE(&info, 0);
  Frame f{gstvae::test::make_frame(w, h, bpp, stride, seed), stride};
  return f;
}

// A buffer of `f` with the timestamps of frame number `n` at 25/1.
GstBuffer* frame_buffer(const char* format, int w, int h, const Frame& f, guint64 n, bool discont = false) {
  GstVideoInfo info = video_info(format, w, h);
  GstBuffer* b = gst_buffer_new_allocate(nullptr, GST_VIDEO_INFO_SIZE(&info), nullptr);
  GstMapInfo map;
  gst_buffer_map(b, &map, GST_MAP_WRITE);
  std::memset(map.data, 0x5A, map.size);
  std::memcpy(map.data, f.pixels.data(), std::min(map.size, f.pixels.size()));
  gst_buffer_unmap(b, &map);
  return gstvae::test::stamp_frame(b, n, discont);
}


bool bit_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Counts differing values for a readable failure message.
std::string diff_summary(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return "sizes " + std::to_string(a.size()) + " vs " + std::to_string(b.size());
  size_t n = 0;
  float worst = 0;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) {
      ++n;
      worst = std::max(worst, std::abs(a[i] - b[i]));
    }
  return std::to_string(n) + " of " + std::to_string(a.size()) + " values differ, max |diff| " +
         std::to_string(worst);
}



// The latents of frames first, first+1, ...: one each, in order, with the
// frame's PTS and the engine's exact values.
void expect_latents(const std::vector<GstBuffer*>& out, const std::vector<std::vector<float>>& expect,
                    guint64 first = 0) {
  ASSERT_EQ(out.size(), expect.size());
  for (size_t i = 0; i < out.size(); ++i) {
    EXPECT_EQ(GST_BUFFER_PTS(out[i]), (first + i) * kFrameDur) << "latent " << i;
    EXPECT_TRUE(bit_equal(floats_of(out[i]), expect[i])) << "latent " << i;
  }
}

// What went out of the element's src pad, in order (buffers and events),
// with the pad's caps at the time of each buffer.
struct Recorder {
  struct Item {
    bool is_buffer;
    GstEventType event;
    gsize size;
    GstClockTime pts;
    int caps_width, caps_height;
    std::string latent_format;
  };
  std::mutex mutex;
  std::vector<Item> items;

  static GstPadProbeReturn probe(GstPad* pad, GstPadProbeInfo* info, gpointer data) {
    auto* self = static_cast<Recorder*>(data);
    Item it{false, GST_EVENT_UNKNOWN, 0, GST_CLOCK_TIME_NONE, -1, -1, ""};
    if (info->type & GST_PAD_PROBE_TYPE_BUFFER) {
      GstBuffer* b = GST_PAD_PROBE_INFO_BUFFER(info);
      it.is_buffer = true;
      it.size = gst_buffer_get_size(b);
      it.pts = GST_BUFFER_PTS(b);
      if (GstCaps* c = gst_pad_get_current_caps(pad)) {
        const GstStructure* s = gst_caps_get_structure(c, 0);
        gst_structure_get_int(s, "width", &it.caps_width);
        gst_structure_get_int(s, "height", &it.caps_height);
        if (const char* lf = gst_structure_get_string(s, "latent-format")) it.latent_format = lf;
        gst_caps_unref(c);
      }
    } else if (info->type & GST_PAD_PROBE_TYPE_EVENT_DOWNSTREAM) {
      it.event = GST_EVENT_TYPE(GST_PAD_PROBE_INFO_EVENT(info));
    } else {
      return GST_PAD_PROBE_OK;
    }
    std::lock_guard<std::mutex> lock(self->mutex);
    self->items.push_back(it);
    return GST_PAD_PROBE_OK;
  }

  void attach(GstElement* element) {
    GstPad* src = gst_element_get_static_pad(element, "src");
    gst_pad_add_probe(src,
                      static_cast<GstPadProbeType>(GST_PAD_PROBE_TYPE_BUFFER | GST_PAD_PROBE_TYPE_EVENT_DOWNSTREAM),
                      probe, this, nullptr);
    gst_object_unref(src);
  }

  std::vector<Item> take() {
    std::lock_guard<std::mutex> lock(mutex);
    std::vector<Item> out;
    out.swap(items);
    return out;
  }
};

// Stands for a slow or blocked downstream: the harness sink's chain function
// waits until the gate opens (or returns `refuse` instead of chaining).
class DownstreamGate {
 public:
  explicit DownstreamGate(GstHarness* h) : pad_(h->sinkpad) {
    original_ = GST_PAD_CHAINFUNC(pad_);
    g_object_set_data(G_OBJECT(pad_), "test-gate", this);
    gst_pad_set_chain_function(pad_, chain);
  }
  ~DownstreamGate() {
    open();
    gst_pad_set_chain_function(pad_, original_);
    g_object_set_data(G_OBJECT(pad_), "test-gate", nullptr);
  }
  void open() {
    std::lock_guard<std::mutex> lock(mutex_);
    open_ = true;
    cond_.notify_all();
  }
  void refuse(GstFlowReturn ret) {
    std::lock_guard<std::mutex> lock(mutex_);
    refuse_ = ret;
  }
  // Buffers that reached the gate (whether or not they have passed it).
  int arrived() {
    std::lock_guard<std::mutex> lock(mutex_);
    return arrived_;
  }
  // Waits until `n` buffers reached the gate, at most 60 s.
  bool wait_arrived(int n) {
    std::unique_lock<std::mutex> lock(mutex_);
    return cond_.wait_for(lock, std::chrono::seconds(60), [&] { return arrived_ >= n; });
  }

 private:
  static GstFlowReturn chain(GstPad* pad, GstObject* parent, GstBuffer* buffer) {
    auto* self = static_cast<DownstreamGate*>(g_object_get_data(G_OBJECT(pad), "test-gate"));
    std::unique_lock<std::mutex> lock(self->mutex_);
    self->arrived_++;
    self->cond_.notify_all();
    if (self->refuse_ != GST_FLOW_OK) {
      gst_buffer_unref(buffer);
      return self->refuse_;
    }
    self->cond_.wait(lock, [&] { return self->open_; });
    lock.unlock();
    return self->original_(pad, parent, buffer);
  }

  GstPad* pad_;
  GstPadChainFunction original_;
  std::mutex mutex_;
  std::condition_variable cond_;
  bool open_ = false;
  int arrived_ = 0;
  GstFlowReturn refuse_ = GST_FLOW_OK;
};

// Runs `fn` on its own thread (a push or an event that may block).
class Background {
 public:
  explicit Background(std::function<void()> fn)
      : thread_([this, fn] {
          fn();
          std::lock_guard<std::mutex> lock(mutex_);
          done_ = true;
          cond_.notify_all();
        }) {}
  ~Background() { join(); }
  Background(const Background&) = delete;
  Background& operator=(const Background&) = delete;
  // Whether `fn` has returned within `limit`.
  bool finished_within(std::chrono::seconds limit) {
    std::unique_lock<std::mutex> lock(mutex_);
    return cond_.wait_for(lock, limit, [&] { return done_; });
  }
  void join() {
    if (thread_.joinable()) thread_.join();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cond_;
  bool done_ = false;
  std::thread thread_;  // last: starts once the members it uses exist
};


/* ---------------------------------------------------------------- fixture */

class VaeEncodeTest : public ::testing::Test {
 protected:
  static TempDir* dir_;
  static std::string model_;
  static std::shared_ptr<gstvae::Encoder> engine_;

  static void SetUpTestSuite() {
    dir_ = new TempDir();
    model_ = dir_->file("vae.safetensors");
    gstvae::test::write_test_vae(model_, VaeSpec{});
    engine_ = gstvae::load_encoder(model_, gstvae::ModelOptions{});
  }
  static void TearDownTestSuite() {
    engine_.reset();
    delete dir_;
    dir_ = nullptr;
  }

  void SetUp() override {
    GstElementFactory* f = gst_element_factory_find("vaeencode");
    ASSERT_NE(f, nullptr) << "vaeencode not found: is GST_PLUGIN_PATH set to the build's gst folder?";
    gst_object_unref(f);
  }

  // A vaeencode with the suite's model and the given per-batch.
  static GstElement* make_element(guint per_batch) {
    GstElement* e = gst_element_factory_make("vaeencode", nullptr);
    g_object_set(e, "model", model_.c_str(), "per-batch", per_batch, nullptr);
    return e;
  }

  // The engine's latents for `frames`, encoded in batches of `per_batch`
  // (as the element groups them), frame i having stream index first_index + i.
  static std::vector<std::vector<float>> engine_latents(const char* format, int w, int h,
                                                       const std::vector<Frame>& frames, size_t per_batch,
                                                       bool sample = false, uint64_t seed = 0,
                                                       uint64_t first_index = 0,
                                                       const char* latent_format = "raw") {
    gstvae::EncodeParams params;
    params.sample = sample;
    params.seed = seed;
    params.latent_format = gstvae::latent_format_by_name(latent_format);
    std::vector<std::vector<float>> out;
    for (size_t start = 0; start < frames.size(); start += per_batch) {
      const size_t n = std::min(per_batch, frames.size() - start);
      auto batch = engine_->new_batch(pixel_format(format), w, h, per_batch);
      for (size_t i = 0; i < n; ++i)
        batch->add(frames[start + i].pixels.data(), frames[start + i].stride, first_index + start + i);
      const size_t per_frame = engine_->latent_floats_per_frame(*batch);
      std::vector<float> all(per_frame * n);
      engine_->encode(*batch, params, all.data());
      for (size_t i = 0; i < n; ++i)
        out.emplace_back(all.begin() + i * per_frame, all.begin() + (i + 1) * per_frame);
    }
    return out;
  }

  static std::vector<Frame> frames(const char* format, int w, int h, size_t n, uint64_t seed0 = 100) {
    std::vector<Frame> out;
    for (size_t i = 0; i < n; ++i) out.push_back(make_frame(format, w, h, seed0 + i));
    return out;
  }
};

TempDir* VaeEncodeTest::dir_ = nullptr;
std::string VaeEncodeTest::model_;
std::shared_ptr<gstvae::Encoder> VaeEncodeTest::engine_;

/* ------------------------------------------------------------------ tests */

TEST_F(VaeEncodeTest, BatchReleasedWhenFullWithTimestampsAndCaps) {
  Harness t(make_element(4));
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 8);
  // DISCONT on the first frame of the stream (see DiscontMidBatch* for the others).
  auto discont = [](guint64 n) { return n == 0; };
  for (guint64 n = 0; n < 3; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n, discont(n))), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 0u) << "latents came out before the batch was full";
  ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[3], 3, discont(3))), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 4u);
  for (guint64 n = 4; n < 7; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n, discont(n))), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 4u) << "the second batch came out before it was full";
  ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[7], 7, discont(7))), GST_FLOW_OK);

  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 8u);
  for (guint64 n = 0; n < 8; ++n) {
    GstBuffer* b = out[n];
    SCOPED_TRACE("latent " + std::to_string(n));
    EXPECT_EQ(gst_buffer_get_size(b), 4u * 6 * 8 * sizeof(float));
    EXPECT_EQ(GST_BUFFER_PTS(b), n * kFrameDur);
    EXPECT_EQ(GST_BUFFER_DTS(b), n * kFrameDur);
    EXPECT_EQ(GST_BUFFER_DURATION(b), kFrameDur);
    EXPECT_EQ(GST_BUFFER_OFFSET(b), n);
    EXPECT_EQ(GST_BUFFER_OFFSET_END(b), n + 1);
    EXPECT_EQ(GST_BUFFER_FLAG_IS_SET(b, GST_BUFFER_FLAG_DISCONT) != 0, discont(n))
        << "DISCONT must be on exactly the latents of the frames that had it";
  }
  unref_all(out);

  GstCaps* caps = gst_pad_get_current_caps(t.h->sinkpad);
  ASSERT_NE(caps, nullptr);
  ASSERT_TRUE(gst_caps_is_fixed(caps));
  const GstStructure* s = gst_caps_get_structure(caps, 0);
  EXPECT_TRUE(gst_structure_has_name(s, "application/x-latent"));
  EXPECT_STREQ(gst_structure_get_string(s, "format"), "F32");
  int channels = 0, width = 0, height = 0, fps_n = 0, fps_d = 0;
  EXPECT_TRUE(gst_structure_get_int(s, "channels", &channels));
  EXPECT_TRUE(gst_structure_get_int(s, "width", &width));
  EXPECT_TRUE(gst_structure_get_int(s, "height", &height));
  EXPECT_TRUE(gst_structure_get_fraction(s, "framerate", &fps_n, &fps_d));
  EXPECT_EQ(channels, 4);
  EXPECT_EQ(width, 8);
  EXPECT_EQ(height, 6);
  EXPECT_EQ(fps_n, 25);
  EXPECT_EQ(fps_d, 1);
  EXPECT_STREQ(gst_structure_get_string(s, "latent-format"), "raw");
  EXPECT_FALSE(gst_structure_has_field(s, "temporal-downscale")) << "image models' caps are as before video VAEs";
  gst_caps_unref(caps);
}

// A Flux.2 VAE (issue 21): ComfyUI's LATENT layout, 128 channels at 1/16 of
// the frame after the crop to 16 (72 x 40 keeps 64 x 32), in the caps and
// the buffers, with the engine's exact values.
TEST_F(VaeEncodeTest, Flux2LatentsAre128ChannelsAtOneSixteenth) {
  VaeSpec spec;
  spec.z = 32;
  spec.batch_norm = true;
  spec.layout = "flux2";
  spec.full_decoder = true;
  const std::string model = dir_->file("flux2.safetensors");
  gstvae::test::write_test_vae(model, spec);
  GstElement* e = gst_element_factory_make("vaeencode", nullptr);
  g_object_set(e, "model", model.c_str(), "per-batch", 2, nullptr);
  Harness t(e);
  t.caps(video_caps("RGB", 72, 40));
  auto fr = frames("RGB", 72, 40, 2);
  for (guint64 n = 0; n < 2; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 72, 40, fr[n], n)), GST_FLOW_OK);
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 2u);

  auto engine = gstvae::load_encoder(model, gstvae::ModelOptions{});
  EXPECT_EQ(engine->info().family, "flux2");
  auto batch = engine->new_batch(pixel_format("RGB"), 72, 40, 2);
  for (guint64 n = 0; n < 2; ++n) batch->add(fr[n].pixels.data(), fr[n].stride, n);
  std::vector<float> expect(2 * 128 * 2 * 4);
  engine->encode(*batch, gstvae::EncodeParams{}, expect.data());
  for (size_t n = 0; n < 2; ++n) {
    ASSERT_EQ(gst_buffer_get_size(out[n]), 128u * 2 * 4 * sizeof(float));
    const std::vector<float> got = floats_of(out[n]);
    EXPECT_TRUE(bit_equal(got, std::vector<float>(expect.begin() + n * 1024, expect.begin() + (n + 1) * 1024)))
        << "latent " << n;
  }
  unref_all(out);

  GstCaps* caps = gst_pad_get_current_caps(t.h->sinkpad);
  ASSERT_NE(caps, nullptr);
  const GstStructure* s = gst_caps_get_structure(caps, 0);
  int channels = 0, width = 0, height = 0;
  EXPECT_TRUE(gst_structure_get_int(s, "channels", &channels));
  EXPECT_TRUE(gst_structure_get_int(s, "width", &width));
  EXPECT_TRUE(gst_structure_get_int(s, "height", &height));
  EXPECT_EQ(channels, 128);
  EXPECT_EQ(width, 4);
  EXPECT_EQ(height, 2);
  EXPECT_STREQ(gst_structure_get_string(s, "latent-format"), "raw");
  gst_caps_unref(caps);
}

// The base class remembers a DISCONT input and marks the next buffer it is
// given; that must not put DISCONT on the first latent of a batch whose
// DISCONT frame is further in.
TEST_F(VaeEncodeTest, DiscontMidBatchStaysOnItsLatent) {
  Harness t(make_element(4));
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 4);
  for (guint64 n = 0; n < 4; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n, n == 2)), GST_FLOW_OK);
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 4u);
  for (guint64 n = 0; n < 4; ++n)
    EXPECT_EQ(GST_BUFFER_FLAG_IS_SET(out[n], GST_BUFFER_FLAG_DISCONT) != 0, n == 2) << "latent " << n;
  unref_all(out);
}

// A DISCONT frame drained by an event (here GAP) must not leave a DISCONT
// pending for the first latent of the next batch.
TEST_F(VaeEncodeTest, DiscontDrainedByEventIsNotRepeated) {
  Harness t(make_element(4));
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 6);
  ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[0], 0)), GST_FLOW_OK);
  ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[1], 1, true)), GST_FLOW_OK);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_gap(2 * kFrameDur, kFrameDur)));
  for (guint64 n = 3; n < 7; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n - 1], n)), GST_FLOW_OK);
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 6u);
  const guint64 pts[] = {0, 1, 3, 4, 5, 6};
  for (size_t i = 0; i < 6; ++i) {
    EXPECT_EQ(GST_BUFFER_PTS(out[i]), pts[i] * kFrameDur);
    EXPECT_EQ(GST_BUFFER_FLAG_IS_SET(out[i], GST_BUFFER_FLAG_DISCONT) != 0, i == 1) << "latent " << i;
  }
  unref_all(out);
}

TEST_F(VaeEncodeTest, GapAndSegmentDrainPendingFramesFirst) {
  Harness t(make_element(4));
  Recorder rec;
  rec.attach(t.element);
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 3);
  for (guint64 n = 0; n < 2; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  rec.take();
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_gap(2 * kFrameDur, kFrameDur)));
  auto items = rec.take();
  ASSERT_EQ(items.size(), 3u);
  EXPECT_TRUE(items[0].is_buffer && items[0].pts == 0);
  EXPECT_TRUE(items[1].is_buffer && items[1].pts == kFrameDur);
  EXPECT_EQ(items[2].event, GST_EVENT_GAP);

  ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[2], 3)), GST_FLOW_OK);
  ASSERT_TRUE(t.segment(10 * GST_SECOND));
  items = rec.take();
  ASSERT_EQ(items.size(), 2u);
  EXPECT_TRUE(items[0].is_buffer && items[0].pts == 3 * kFrameDur);
  EXPECT_EQ(items[1].event, GST_EVENT_SEGMENT);
  EXPECT_EQ(t.queued(), 3u);
}

// A downstream RECONFIGURE makes the base class renegotiate (set_caps again,
// same caps) on the next buffer: frames already staged must survive it.
TEST_F(VaeEncodeTest, RenegotiationKeepsPendingFrames) {
  Harness t(make_element(4));
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 4);
  for (guint64 n = 0; n < 2; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  ASSERT_TRUE(gst_harness_push_upstream_event(t.h, gst_event_new_reconfigure()));
  for (guint64 n = 2; n < 4; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 4u) << "the batch of 4 did not complete";
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 4u) << "frames were lost across the renegotiation";
  expect_latents(out, engine_latents("RGB", 64, 48, fr, 4));
  unref_all(out);
}

TEST_F(VaeEncodeTest, EosDrainsPartialBatchBeforeEos) {
  Harness t(make_element(4));
  Recorder rec;
  rec.attach(t.element);
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 7);
  for (guint64 n = 0; n < 7; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 4u);
  rec.take();
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));

  auto items = rec.take();
  ASSERT_EQ(items.size(), 4u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_TRUE(items[i].is_buffer) << "item " << i;
    EXPECT_EQ(items[i].pts, (4 + i) * kFrameDur);
  }
  EXPECT_FALSE(items[3].is_buffer);
  EXPECT_EQ(items[3].event, GST_EVENT_EOS) << "EOS must follow the drained latents";

  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 7u);
  for (guint64 n = 0; n < 7; ++n) EXPECT_EQ(GST_BUFFER_PTS(out[n]), n * kFrameDur);
  auto expect = engine_latents("RGB", 64, 48, fr, 4);
  for (size_t n = 0; n < 7; ++n) EXPECT_TRUE(bit_equal(floats_of(out[n]), expect[n])) << "latent " << n;
  unref_all(out);
  auto events = t.pull_event_types();
  EXPECT_NE(std::find(events.begin(), events.end(), GST_EVENT_EOS), events.end());
}

TEST_F(VaeEncodeTest, FlushDropsPendingFrames) {
  Harness t(make_element(4));
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 7);
  for (guint64 n = 0; n < 3; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 0u);

  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_flush_start()));
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_flush_stop(TRUE)));
  EXPECT_EQ(t.queued(), 0u) << "a flush must not push the pending frames";
  ASSERT_TRUE(t.segment());
  EXPECT_EQ(t.queued(), 0u) << "stale frames came out at the segment after the flush";

  // Frames 100..103: one full batch of new frames only.
  for (guint64 i = 0; i < 3; ++i)
    ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[3 + i], 100 + i)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 0u) << "the batch after the flush still held stale frames";
  ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[6], 103)), GST_FLOW_OK);
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 4u);
  for (guint64 i = 0; i < 4; ++i) EXPECT_EQ(GST_BUFFER_PTS(out[i]), (100 + i) * kFrameDur);
  std::vector<Frame> fresh(fr.begin() + 3, fr.end());
  auto expect = engine_latents("RGB", 64, 48, fresh, 4);
  for (size_t i = 0; i < 4; ++i) EXPECT_TRUE(bit_equal(floats_of(out[i]), expect[i])) << "latent " << i;
  unref_all(out);

  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
  EXPECT_EQ(t.queued(), 0u);
}

TEST_F(VaeEncodeTest, CapsChangeDrainsWithOldCaps) {
  Harness t(make_element(4));
  Recorder rec;
  rec.attach(t.element);
  t.caps(video_caps("RGB", 64, 48));
  auto old_frames = frames("RGB", 64, 48, 3);
  auto new_frames = frames("RGB", 40, 32, 4, 500);
  for (guint64 n = 0; n < 3; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, old_frames[n], n)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 0u);
  rec.take();

  t.caps(video_caps("RGB", 40, 32));
  EXPECT_EQ(t.queued(), 3u) << "the caps change must drain the pending frames";
  for (guint64 n = 3; n < 7; ++n)
    ASSERT_EQ(t.push(frame_buffer("RGB", 40, 32, new_frames[n - 3], n)), GST_FLOW_OK);
  t.settle();

  auto items = rec.take();
  std::vector<Recorder::Item> bufs;
  int caps_at = -1;
  for (size_t i = 0; i < items.size(); ++i) {
    if (items[i].is_buffer) bufs.push_back(items[i]);
    if (!items[i].is_buffer && items[i].event == GST_EVENT_CAPS && caps_at < 0) caps_at = static_cast<int>(i);
  }
  ASSERT_GE(caps_at, 0) << "no caps event went downstream";
  EXPECT_EQ(caps_at, 3) << "the new caps must come after the 3 old latents";
  ASSERT_EQ(bufs.size(), 7u);
  for (size_t i = 0; i < 7; ++i) {
    SCOPED_TRACE("latent " + std::to_string(i));
    const bool old = i < 3;
    EXPECT_EQ(bufs[i].pts, i * kFrameDur);
    EXPECT_EQ(bufs[i].size, (old ? 4u * 6 * 8 : 4u * 4 * 5) * sizeof(float));
    EXPECT_EQ(bufs[i].caps_width, old ? 8 : 5);
    EXPECT_EQ(bufs[i].caps_height, old ? 6 : 4);
  }

  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 7u);
  auto expect_old = engine_latents("RGB", 64, 48, old_frames, 4);
  auto expect_new = engine_latents("RGB", 40, 32, new_frames, 4);
  for (size_t i = 0; i < 3; ++i) EXPECT_TRUE(bit_equal(floats_of(out[i]), expect_old[i])) << "old latent " << i;
  for (size_t i = 0; i < 4; ++i) EXPECT_TRUE(bit_equal(floats_of(out[3 + i]), expect_new[i])) << "new latent " << i;
  unref_all(out);

  GstCaps* caps = gst_pad_get_current_caps(t.h->sinkpad);
  ASSERT_NE(caps, nullptr);
  int w = 0, h = 0;
  gst_structure_get_int(gst_caps_get_structure(caps, 0), "width", &w);
  gst_structure_get_int(gst_caps_get_structure(caps, 0), "height", &h);
  EXPECT_EQ(w, 5);
  EXPECT_EQ(h, 4);
  gst_caps_unref(caps);
}

TEST_F(VaeEncodeTest, RepeatedIdenticalCapsDoNotDrain) {
  Harness t(make_element(4));
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 4);
  for (guint64 n = 0; n < 2; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  GstCaps* same = gst_caps_from_string(video_caps("RGB", 64, 48).c_str());
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_caps(same)));
  gst_caps_unref(same);
  EXPECT_EQ(t.queued(), 0u) << "resending the same caps must not cut the batch";
  for (guint64 n = 2; n < 4; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 4u);
  EXPECT_EQ(t.u64("batches"), 1u);
  unref_all(out);
}

TEST_F(VaeEncodeTest, PerBatchOneOutputsEachFrameAtOnce) {
  Harness t(make_element(1));
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 3);
  auto expect = engine_latents("RGB", 64, 48, fr, 1);
  for (guint64 n = 0; n < 3; ++n) {
    ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
    t.settle();
    GstBuffer* b = gst_harness_try_pull(t.h);
    ASSERT_NE(b, nullptr) << "frame " << n << " did not come out at once";
    EXPECT_EQ(GST_BUFFER_PTS(b), n * kFrameDur);
    EXPECT_TRUE(bit_equal(floats_of(b), expect[n]));
    gst_buffer_unref(b);
  }
  EXPECT_EQ(t.u64("batches"), 3u);
}

TEST_F(VaeEncodeTest, PerBatchLargerThanStreamOutputsAllAtEos) {
  Harness t(make_element(16));
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 5);
  for (guint64 n = 0; n < 5; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 0u);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
  auto out = t.pull_all();
  expect_latents(out, engine_latents("RGB", 64, 48, fr, 16));
  unref_all(out);
  EXPECT_EQ(t.u64("batches"), 1u);
  auto events = t.pull_event_types();
  EXPECT_NE(std::find(events.begin(), events.end(), GST_EVENT_EOS), events.end());
}

TEST_F(VaeEncodeTest, StridedInputMatchesEngine) {
  // 45 RGB pixels = 135 bytes: GStreamer's default stride pads rows to 136.
  GstVideoInfo info = video_info("RGB", 45, 37);
  ASSERT_EQ(GST_VIDEO_INFO_PLANE_STRIDE(&info, 0), 136);
  Harness t(make_element(2));
  t.caps(video_caps("RGB", 45, 37));
  auto fr = frames("RGB", 45, 37, 4);
  for (guint64 n = 0; n < 4; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 45, 37, fr[n], n)), GST_FLOW_OK);
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 4u);
  auto expect = engine_latents("RGB", 45, 37, fr, 2);
  for (size_t n = 0; n < 4; ++n) {
    EXPECT_EQ(gst_buffer_get_size(out[n]), 4u * 4 * 5 * sizeof(float));  // 40x32 crop -> 5x4
    auto got = floats_of(out[n]);
    EXPECT_TRUE(bit_equal(got, expect[n])) << "latent " << n << ": " << diff_summary(got, expect[n]);
  }
  unref_all(out);
}

class VaeEncodeFormatTest : public VaeEncodeTest, public ::testing::WithParamInterface<const char*> {};

TEST_P(VaeEncodeFormatTest, LatentsEqualEngine) {
  const char* format = GetParam();
  Harness t(make_element(2));
  t.caps(video_caps(format, 64, 48));
  auto fr = frames(format, 64, 48, 4);
  for (guint64 n = 0; n < 4; ++n) ASSERT_EQ(t.push(frame_buffer(format, 64, 48, fr[n], n)), GST_FLOW_OK);
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 4u);
  auto expect = engine_latents(format, 64, 48, fr, 2);
  for (size_t n = 0; n < 4; ++n) {
    auto got = floats_of(out[n]);
    EXPECT_TRUE(bit_equal(got, expect[n])) << "latent " << n << ": " << diff_summary(got, expect[n]);
  }
  // Different frames give different latents (the comparison is not vacuous).
  EXPECT_FALSE(bit_equal(floats_of(out[0]), floats_of(out[1])));
  unref_all(out);
}

INSTANTIATE_TEST_SUITE_P(Formats, VaeEncodeFormatTest, ::testing::Values("RGB", "BGRA"));

TEST_F(VaeEncodeTest, AcceptCaps) {
  Harness t(make_element(4));
  GstPad* sink = gst_element_get_static_pad(t.element, "sink");
  auto accepts = [&](const std::string& s) {
    GstCaps* caps = gst_caps_from_string(s.c_str());
    EXPECT_NE(caps, nullptr) << s;
    const bool ok = caps && gst_pad_query_accept_caps(sink, caps);
    if (caps) gst_caps_unref(caps);
    return ok;
  };
  EXPECT_TRUE(accepts(video_caps("RGB", 64, 48)));
  EXPECT_TRUE(accepts(video_caps("BGRA", 8, 8)));
  EXPECT_FALSE(accepts(video_caps("I420", 64, 48)));
  EXPECT_FALSE(accepts("video/x-raw, width=(int)7"));
  // Frames smaller than a latent cell pass the pad: they are refused when
  // they arrive, saying why (TooSmallFramesRefusedOnce).
  EXPECT_TRUE(accepts(video_caps("RGB", 4, 4)));
  gst_object_unref(sink);
}

// Counts the ERROR messages on `bus` (popping everything).
static int count_errors(GstBus* bus) {
  int n = 0;
  while (GstMessage* m = gst_bus_pop_filtered(bus, GST_MESSAGE_ERROR)) {
    ++n;
    gst_message_unref(m);
  }
  return n;
}

// Frames smaller than one latent cell: the element's own error naming the
// size, posted once however often upstream offers the caps again and
// pushes on; refused again after a flush, with a new error.
TEST_F(VaeEncodeTest, TooSmallFramesRefusedOnce) {
  Harness t(make_element(1), true);
  t.caps(video_caps("RGB", 4, 4));
  auto fr = frames("RGB", 4, 4, 3);
  for (guint64 n = 0; n < 3; ++n) {
    EXPECT_EQ(t.push(frame_buffer("RGB", 4, 4, fr[n], n)), GST_FLOW_NOT_NEGOTIATED);
    t.caps(video_caps("RGB", 4, 4));  // a source renegotiating the same caps
  }
  const std::string error = bus_text(t.bus, GST_MESSAGE_ERROR);
  EXPECT_NE(error.find("Frames are too small"), std::string::npos) << error;
  EXPECT_NE(error.find("4x4"), std::string::npos) << error;
  EXPECT_EQ(count_errors(t.bus), 0) << "the refusal was posted more than once";
  EXPECT_EQ(t.queued(), 0u);
  // A flush starts the stream again: the same caps are refused again, once.
  gst_harness_push_event(t.h, gst_event_new_flush_start());
  gst_harness_push_event(t.h, gst_event_new_flush_stop(TRUE));
  t.caps(video_caps("RGB", 4, 4));
  EXPECT_EQ(t.push(frame_buffer("RGB", 4, 4, fr[0], 0)), GST_FLOW_NOT_NEGOTIATED);
  EXPECT_EQ(count_errors(t.bus), 1);
}


// An application that stops the element from a probe on its src pad (on the
// push thread, as from a sync bus handler on the encode thread): the thread
// cannot join itself, so the join waits for the next start; no crash, and the
// element starts and encodes again.
TEST_F(VaeEncodeTest, StoppedFromItsOwnPushThread) {
  Harness t(make_element(1));
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 2);
  GstPad* src = gst_element_get_static_pad(t.element, "src");
  std::atomic<bool> stopped{false};
  struct Ctx {
    GstElement* element;
    std::atomic<bool>* stopped;
  } ctx{t.element, &stopped};
  const gulong probe = gst_pad_add_probe(
      src, GST_PAD_PROBE_TYPE_BUFFER,
      [](GstPad*, GstPadProbeInfo*, gpointer data) {
        auto* c = static_cast<Ctx*>(data);
        if (!c->stopped->exchange(true)) gst_element_set_state(c->element, GST_STATE_READY);
        return GST_PAD_PROBE_OK;
      },
      &ctx, nullptr);
  ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[0], 0)), GST_FLOW_OK);
  EXPECT_TRUE(eventually([&] { return stopped.load() && GST_STATE(t.element) == GST_STATE_READY; }));
  gst_pad_remove_probe(src, probe);
  gst_object_unref(src);
  ASSERT_EQ(gst_element_set_state(t.element, GST_STATE_PLAYING), GST_STATE_CHANGE_SUCCESS);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_stream_start("again")));
  t.caps(video_caps("RGB", 64, 48));
  ASSERT_TRUE(t.segment());
  while (GstBuffer* b = gst_harness_try_pull(t.h)) gst_buffer_unref(b);
  ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[1], 1)), GST_FLOW_OK);
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(GST_BUFFER_PTS(out[0]), kFrameDur);
  unref_all(out);
}

// A buffer too small for its caps: the error names its real size.
TEST_F(VaeEncodeTest, ShortBufferErrorNamesItsSize) {
  Harness t(make_element(1), true);
  t.caps(video_caps("RGB", 64, 48));
  EXPECT_EQ(t.push(gst_buffer_new_allocate(nullptr, 100, nullptr)), GST_FLOW_ERROR);
  const std::string error = bus_text(t.bus, GST_MESSAGE_ERROR);
  EXPECT_NE(error.find("buffer of 100 bytes does not hold a 64x48 RGB frame"), std::string::npos) << error;
}

// Woven fields would comb the latents: refused, naming the fix.
TEST_F(VaeEncodeTest, InterlacedInputRefused) {
  Harness t(make_element(1), true);
  t.caps(video_caps("RGB", 64, 48) + ", interlace-mode=(string)interleaved");
  auto fr = frames("RGB", 64, 48, 1);
  EXPECT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[0], 0)), GST_FLOW_NOT_NEGOTIATED);
  const std::string error = bus_text(t.bus, GST_MESSAGE_ERROR);
  EXPECT_NE(error.find("Interlaced"), std::string::npos) << error;
  EXPECT_NE(error.find("deinterlace"), std::string::npos) << error;
  EXPECT_EQ(t.queued(), 0u);
}

// Non-square pixels are encoded as stored, with a warning saying how to
// encode square ones.
TEST_F(VaeEncodeTest, NonSquarePixelsWarn) {
  Harness t(make_element(1), true);
  t.caps(video_caps("RGB", 64, 48) + ", pixel-aspect-ratio=(fraction)16/15");
  auto fr = frames("RGB", 64, 48, 1);
  EXPECT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[0], 0)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 1u);
  const std::string warning = bus_text(t.bus, GST_MESSAGE_WARNING);
  EXPECT_NE(warning.find("16/15"), std::string::npos) << warning;
  EXPECT_NE(warning.find("pixel-aspect-ratio=1/1"), std::string::npos) << warning;
  Harness square(make_element(1), true);
  square.caps(video_caps("RGB", 64, 48) + ", pixel-aspect-ratio=(fraction)1/1");
  EXPECT_EQ(square.push(frame_buffer("RGB", 64, 48, fr[0], 0)), GST_FLOW_OK);
  EXPECT_EQ(square.queued(), 1u);
  EXPECT_EQ(bus_text(square.bus, GST_MESSAGE_WARNING), "");
}

// A latent size asked downstream reaches upstream as the frame sizes that
// give it, also when the downstream caps carry vaeencode's own source-width
// range next to it (as a capsfilter's do): videoscale picks one of them.
TEST_F(VaeEncodeTest, LatentSizeFromDownstreamNegotiates) {
  const std::string desc = "videotestsrc num-buffers=2 ! videoscale ! videoconvert ! vaeencode model=\"" + model_ +
                           "\" per-batch=2 name=enc ! application/x-latent,width=12,height=10 ! fakesink";
  GError* err = nullptr;
  GstElement* pipeline = gst_parse_launch(desc.c_str(), &err);
  ASSERT_NE(pipeline, nullptr) << (err ? err->message : "?");
  GstBus* bus = gst_element_get_bus(pipeline);
  gst_element_set_state(pipeline, GST_STATE_PLAYING);
  GstMessage* m = gst_bus_timed_pop_filtered(bus, 60 * GST_SECOND,
                                             static_cast<GstMessageType>(GST_MESSAGE_EOS | GST_MESSAGE_ERROR));
  ASSERT_NE(m, nullptr) << "no EOS within 60 s";
  std::string error;
  if (GST_MESSAGE_TYPE(m) == GST_MESSAGE_ERROR) {
    GError* e = nullptr;
    gchar* debug = nullptr;
    gst_message_parse_error(m, &e, &debug);
    error = std::string(e->message) + " " + (debug ? debug : "");
    g_clear_error(&e);
    g_free(debug);
  }
  gst_message_unref(m);
  EXPECT_EQ(error, "");
  GstElement* enc = gst_bin_get_by_name(GST_BIN(pipeline), "enc");
  GstPad* sink = gst_element_get_static_pad(enc, "sink");
  GstCaps* caps = gst_pad_get_current_caps(sink);
  int w = 0, h = 0;
  if (caps) {
    gst_structure_get_int(gst_caps_get_structure(caps, 0), "width", &w);
    gst_structure_get_int(gst_caps_get_structure(caps, 0), "height", &h);
    gst_caps_unref(caps);
  }
  EXPECT_GE(w, 96);
  EXPECT_LE(w, 103);
  EXPECT_GE(h, 80);
  EXPECT_LE(h, 87);
  gst_object_unref(sink);
  gst_object_unref(enc);
  gst_element_set_state(pipeline, GST_STATE_NULL);
  gst_object_unref(bus);
  gst_object_unref(pipeline);
}

TEST_F(VaeEncodeTest, LatencyAddsBatchWaitAndEncodeTime) {
  constexpr GstClockTime upstream = 10 * GST_MSECOND;
  {
    Harness t(make_element(4));
    gst_harness_set_live(t.h, TRUE);
    gst_harness_set_upstream_latency(t.h, upstream);
    t.caps(video_caps("RGB", 64, 48));
    // No batch encoded yet: the encode-time part is 0.
    EXPECT_EQ(gst_harness_query_latency(t.h), upstream + 3 * kFrameDur);
    auto fr = frames("RGB", 64, 48, 4);
    for (guint64 n = 0; n < 4; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
    ASSERT_EQ(t.queued(), 4u);
    const GstClockTime encode = t.u64("last-batch-time");
    EXPECT_GT(encode, 0u);
    const GstClockTime after = gst_harness_query_latency(t.h);
    // The processing part covers the batch's preparation (on the streaming
    // thread) and its encode.
    EXPECT_GE(after, upstream + 3 * kFrameDur + encode);
    EXPECT_LT(after, upstream + 3 * kFrameDur + encode + GST_SECOND);
  }
  {
    GstElement* e = make_element(4);
    g_object_set(e, "batch-timeout", static_cast<guint64>(50 * GST_MSECOND), nullptr);
    Harness t(e);
    gst_harness_set_live(t.h, TRUE);
    gst_harness_set_upstream_latency(t.h, upstream);
    t.caps(video_caps("RGB", 64, 48));
    EXPECT_EQ(gst_harness_query_latency(t.h), upstream + 50 * GST_MSECOND);
  }
  {
    Harness t(make_element(1));
    gst_harness_set_live(t.h, TRUE);
    gst_harness_set_upstream_latency(t.h, upstream);
    t.caps(video_caps("RGB", 64, 48));
    EXPECT_EQ(gst_harness_query_latency(t.h), upstream);
  }
}

// The processing part of the latency follows the recent batches: a slow
// first batch (here 64 frames, then batches of one) stops counting.
TEST_F(VaeEncodeTest, LatencyForgetsASlowFirstBatch) {
  Harness t(make_element(64));
  gst_harness_set_live(t.h, TRUE);
  gst_harness_set_upstream_latency(t.h, 0);
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 64);
  for (guint64 n = 0; n < 64; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  ASSERT_EQ(t.queued(), 64u);
  const GstClockTime slow = t.u64("last-batch-time");
  g_object_set(t.element, "per-batch", 1u, nullptr);  // no batch wait any more
  GstClockTime fast = 0;
  for (guint64 n = 0; n < 8; ++n) {
    ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], 64 + n)), GST_FLOW_OK);
    ASSERT_EQ(t.queued(), 65u + n);
    fast = std::max(fast, t.u64("last-batch-time"));
  }
  const GstClockTime latency = gst_harness_query_latency(t.h);
  // Then a mean over every batch, above (slow + 8 fast) / 9, would be above the bound below.
  ASSERT_GT(slow, 16 * fast + 9 * GST_MSECOND) << "the first batch must be much slower for this test to tell";
  EXPECT_GE(latency, fast);
  EXPECT_LT(latency, 2 * fast + GST_MSECOND) << "slow batch " << slow << " ns, fast batches up to " << fast << " ns";
}

TEST_F(VaeEncodeTest, BatchTimeoutReleasesPartialBatch) {
  GstElement* e = make_element(8);
  g_object_set(e, "batch-timeout", static_cast<guint64>(100 * GST_MSECOND), nullptr);
  Harness t(e);
  gst_harness_set_live(t.h, TRUE);
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 3);
  const auto start = std::chrono::steady_clock::now();
  for (guint64 n = 0; n < 3; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);

  std::vector<GstBuffer*> out;
  std::chrono::steady_clock::duration first_at{};
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(3);
  while (out.size() < 3 && std::chrono::steady_clock::now() < deadline) {
    if (GstBuffer* b = gst_harness_try_pull(t.h)) {
      if (out.empty()) first_at = std::chrono::steady_clock::now() - start;
      out.push_back(b);
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  ASSERT_EQ(out.size(), 3u) << "the partial batch did not come out after batch-timeout";
  EXPECT_GE(first_at, std::chrono::milliseconds(100)) << "latents came out before the timeout";
  for (guint64 n = 0; n < 3; ++n) EXPECT_EQ(GST_BUFFER_PTS(out[n]), n * kFrameDur);
  unref_all(out);
  EXPECT_EQ(t.u64("latents-out"), 3u);
}

// The batch timer waits on the pipeline clock: with a GstTestClock, the
// partial batch comes out when the test moves the clock past batch-timeout,
// not before, however long real time runs.
TEST_F(VaeEncodeTest, BatchTimeoutFollowsThePipelineClock) {
  GstElement* e = make_element(8);
  g_object_set(e, "batch-timeout", static_cast<guint64>(100 * GST_MSECOND), nullptr);
  Harness t(e);
  gst_harness_use_testclock(t.h);
  GstTestClock* clock = gst_harness_get_testclock(t.h);
  gst_test_clock_set_time(clock, 10 * GST_SECOND);
  gst_harness_set_live(t.h, TRUE);
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 3);
  for (guint64 n = 0; n < 3; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  gst_test_clock_wait_for_next_pending_id(clock, nullptr);  // the batch timer waits
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(t.queued(), 0u) << "the partial batch came out on real time";
  gst_test_clock_set_time(clock, 10 * GST_SECOND + 99 * GST_MSECOND);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(t.queued(), 0u) << "the partial batch came out before batch-timeout";
  gst_test_clock_set_time(clock, 10 * GST_SECOND + 100 * GST_MSECOND);
  gst_test_clock_crank(clock);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (t.u64("latents-out") < 3 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  auto out = t.pull_all();
  EXPECT_EQ(out.size(), 3u) << "the partial batch did not come out at batch-timeout on the pipeline clock";
  unref_all(out);
  gst_object_unref(clock);
}

TEST_F(VaeEncodeTest, WithoutBatchTimeoutPartialBatchWaits) {
  Harness t(make_element(8));
  gst_harness_set_live(t.h, TRUE);
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 3);
  for (guint64 n = 0; n < 3; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(500);
  while (std::chrono::steady_clock::now() < deadline) {
    ASSERT_EQ(t.queued(), 0u) << "a partial batch came out with batch-timeout 0";
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
  EXPECT_EQ(t.queued(), 3u);
}

// Element errors from going to PLAYING with `model`; returns "message\ndebug".
std::string start_error(const std::string& model) {
  GstElement* e = gst_element_factory_make("vaeencode", nullptr);
  g_object_set(e, "model", model.c_str(), nullptr);
  GstBus* bus = gst_bus_new();
  gst_element_set_bus(e, bus);
  const GstStateChangeReturn ret = gst_element_set_state(e, GST_STATE_PLAYING);
  EXPECT_EQ(ret, GST_STATE_CHANGE_FAILURE) << "starting with model '" << model << "' did not fail";
  std::string text;
  GstMessage* m = gst_bus_pop_filtered(bus, GST_MESSAGE_ERROR);
  EXPECT_NE(m, nullptr) << "no ERROR message on the bus";
  if (m) {
    GError* err = nullptr;
    gchar* debug = nullptr;
    gst_message_parse_error(m, &err, &debug);
    text = std::string(err ? err->message : "") + "\n" + (debug ? debug : "");
    g_clear_error(&err);
    g_free(debug);
    gst_message_unref(m);
  }
  gst_element_set_state(e, GST_STATE_NULL);
  gst_element_set_bus(e, nullptr);
  gst_bus_set_flushing(bus, TRUE);
  gst_object_unref(bus);
  gst_object_unref(e);
  return text;
}

TEST_F(VaeEncodeTest, MissingModelFailsToStart) {
  const std::string path = dir_->file("no-such-vae.safetensors");
  const std::string text = start_error(path);
  EXPECT_NE(text.find(path), std::string::npos) << text;
}

TEST_F(VaeEncodeTest, PickleCheckpointRefused) {
  const std::string path = dir_->file("model.ckpt");
  gstvae::test::write_bytes(path, std::string("PK\x03\x04", 4) + std::string(60, '\0'));
  const std::string text = start_error(path);
  EXPECT_NE(text.find(path), std::string::npos) << text;
  EXPECT_NE(text.find("pickle"), std::string::npos) << text;
}

TEST_F(VaeEncodeTest, TruncatedSafetensorsRefused) {
  std::ifstream in(model_, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_GT(bytes.size(), 1000u);
  const std::string path = dir_->file("truncated.safetensors");
  gstvae::test::write_bytes(path, bytes.substr(0, bytes.size() / 2));
  const std::string text = start_error(path);
  // The engine's own message (the debug part) names the file too.
  const size_t first = text.find(path);
  ASSERT_NE(first, std::string::npos) << text;
  const size_t nl = text.find('\n');
  EXPECT_NE(text.find(path, nl), std::string::npos) << "the detail does not name the file: " << text;
}

TEST_F(VaeEncodeTest, SmallestFrameGivesOneCellLatent) {
  Harness t(make_element(1));
  t.caps(video_caps("RGB", 8, 8));
  auto fr = frames("RGB", 8, 8, 1);
  ASSERT_EQ(t.push(frame_buffer("RGB", 8, 8, fr[0], 0)), GST_FLOW_OK);
  t.settle();
  GstBuffer* b = gst_harness_try_pull(t.h);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(gst_buffer_get_size(b), 4u * sizeof(float));
  auto expect = engine_latents("RGB", 8, 8, fr, 1);
  EXPECT_TRUE(bit_equal(floats_of(b), expect[0]));
  gst_buffer_unref(b);
  GstCaps* caps = gst_pad_get_current_caps(t.h->sinkpad);
  ASSERT_NE(caps, nullptr);
  int w = 0, h = 0;
  gst_structure_get_int(gst_caps_get_structure(caps, 0), "width", &w);
  gst_structure_get_int(gst_caps_get_structure(caps, 0), "height", &h);
  EXPECT_EQ(w, 1);
  EXPECT_EQ(h, 1);
  gst_caps_unref(caps);
}

// Lowering per-batch to (or below) the number of frames waiting releases
// them at once; the following batches have the new size.
TEST_F(VaeEncodeTest, PerBatchLoweredReleasesTheBatchNowFull) {
  Harness t(make_element(4));
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 6);
  for (guint64 n = 0; n < 2; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 0u);
  g_object_set(t.element, "per-batch", 2u, nullptr);
  // The hand-over happens on the batch-timeout thread: no more input needed.
  EXPECT_TRUE(eventually([&] { return t.queued() >= 2u; }));
  EXPECT_EQ(t.queued(), 2u) << "the 2 waiting frames are a full batch now";
  ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[2], 2)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 2u);
  ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[3], 3)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 4u);
  ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[4], 4)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 4u);
  ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[5], 5)), GST_FLOW_OK);
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 6u);
  for (guint64 n = 0; n < 6; ++n) EXPECT_EQ(GST_BUFFER_PTS(out[n]), n * kFrameDur);
  expect_latents(out, engine_latents("RGB", 64, 48, fr, 2));
  unref_all(out);
  EXPECT_EQ(t.u64("batches"), 3u);
}

// Raising per-batch applies from the next batch: the one being gathered was
// staged for the old size.
TEST_F(VaeEncodeTest, PerBatchRaisedAppliesFromTheNextBatch) {
  Harness t(make_element(2));
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 4);
  ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[0], 0)), GST_FLOW_OK);
  g_object_set(t.element, "per-batch", 4u, nullptr);
  for (guint64 n = 1; n < 3; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 2u) << "the staging batch was made for 2 frames: it goes out full";
  ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[3], 3)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 2u);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 4u);
  unref_all(out);
}

TEST_F(VaeEncodeTest, SampleAndSeedChangeWhilePlaying) {
  Harness t(make_element(2));
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 4);
  for (guint64 n = 0; n < 2; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  g_object_set(t.element, "sample", TRUE, "seed", static_cast<guint64>(7), nullptr);
  for (guint64 n = 2; n < 4; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 4u);
  auto mean = engine_latents("RGB", 64, 48, fr, 2);
  std::vector<Frame> later(fr.begin() + 2, fr.end());
  auto sampled = engine_latents("RGB", 64, 48, later, 2, true, 7, 2);
  for (size_t n = 0; n < 2; ++n) EXPECT_TRUE(bit_equal(floats_of(out[n]), mean[n])) << "latent " << n;
  for (size_t n = 2; n < 4; ++n) {
    EXPECT_FALSE(bit_equal(floats_of(out[n]), mean[n])) << "latent " << n << " was not sampled";
    EXPECT_TRUE(bit_equal(floats_of(out[n]), sampled[n - 2])) << "latent " << n;
  }
  unref_all(out);
  gboolean sample = FALSE;
  guint64 seed = 0;
  g_object_get(t.element, "sample", &sample, "seed", &seed, nullptr);
  EXPECT_TRUE(sample);
  EXPECT_EQ(seed, 7u);
}

TEST_F(VaeEncodeTest, StatisticsWhileRunning) {
  Harness t(make_element(4));
  t.caps(video_caps("RGB", 64, 48));
  EXPECT_EQ(t.u64("frames-in"), 0u);
  auto fr = frames("RGB", 64, 48, 6);
  for (guint64 n = 0; n < 6; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  t.settle();
  EXPECT_EQ(t.u64("frames-in"), 6u);
  EXPECT_EQ(t.u64("latents-out"), 4u);
  EXPECT_EQ(t.u64("batches"), 1u);
  EXPECT_GT(t.u64("last-batch-time"), 0u);
  gdouble fps = 0;
  g_object_get(t.element, "average-fps", &fps, nullptr);
  EXPECT_GT(fps, 0.0);
  auto out = t.pull_all();
  unref_all(out);
}

// Collects GLib warnings (the element refuses some properties with g_warning).
struct WarningCatcher {
  std::vector<std::string> messages;
  guint id;
  WarningCatcher() {
    id = g_log_set_handler(nullptr, static_cast<GLogLevelFlags>(G_LOG_LEVEL_WARNING | G_LOG_LEVEL_CRITICAL),
                           handler, this);
  }
  ~WarningCatcher() { g_log_remove_handler(nullptr, id); }
  static void handler(const gchar*, GLogLevelFlags, const gchar* message, gpointer data) {
    static_cast<WarningCatcher*>(data)->messages.push_back(message ? message : "");
  }
};

TEST_F(VaeEncodeTest, ModelCannotChangeWhilePlaying) {
  Harness t(make_element(4));
  t.caps(video_caps("RGB", 64, 48));
  {
    WarningCatcher warnings;
    g_object_set(t.element, "model", "/elsewhere/other.safetensors", nullptr);
    EXPECT_FALSE(warnings.messages.empty()) << "no warning when refusing the change";
  }
  gchar* model = nullptr;
  g_object_get(t.element, "model", &model, nullptr);
  EXPECT_STREQ(model, model_.c_str());
  g_free(model);
  // The element still works with its model.
  auto fr = frames("RGB", 64, 48, 4);
  for (guint64 n = 0; n < 4; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 4u);
}

// latent-format is documented as NULL/READY only: a change while playing is
// refused, and in any case the caps a latent goes out with must describe its values.
TEST_F(VaeEncodeTest, LatentFormatChangeWhilePlayingKeepsCapsTruthful) {
  Harness t(make_element(2));
  Recorder rec;
  rec.attach(t.element);
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 4);
  for (guint64 n = 0; n < 2; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  {
    WarningCatcher warnings;  // a refusal warns
    g_object_set(t.element, "latent-format", 1 /* sd15 */, nullptr);
  }
  gint lf = -1;
  g_object_get(t.element, "latent-format", &lf, nullptr);
  EXPECT_EQ(lf, 0) << "latent-format changed while PLAYING (documented as NULL/READY only)";
  for (guint64 n = 2; n < 4; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 4u);
  std::vector<Recorder::Item> bufs;
  for (auto& it : rec.take())
    if (it.is_buffer) bufs.push_back(it);
  ASSERT_EQ(bufs.size(), 4u);
  for (size_t n = 0; n < 4; ++n) {
    SCOPED_TRACE("latent " + std::to_string(n) + " sent with latent-format=" + bufs[n].latent_format);
    ASSERT_FALSE(bufs[n].latent_format.empty());
    auto expect = engine_latents("RGB", 64, 48, {fr[n - n % 2], fr[n - n % 2 + 1]}, 2, false, 0, n - n % 2,
                                 bufs[n].latent_format.c_str());
    auto got = floats_of(out[n]);
    EXPECT_TRUE(bit_equal(got, expect[n % 2])) << "values do not match the caps' latent-format: "
                                               << diff_summary(got, expect[n % 2]);
  }
  unref_all(out);
}

// The first measured encode time differs from the 0 reported before any batch:
// the element asks the pipeline to re-query latency.
TEST_F(VaeEncodeTest, LatencyMessageAfterFirstBatch) {
  Harness t(make_element(4), /*with_bus=*/true);
  gst_harness_set_live(t.h, TRUE);
  // Frames large enough that a batch takes well over the 1 ms threshold.
  t.caps(video_caps("RGB", 256, 192));
  gst_harness_query_latency(t.h);
  auto fr = frames("RGB", 256, 192, 4);
  for (guint64 n = 0; n < 3; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 256, 192, fr[n], n)), GST_FLOW_OK);
  GstMessage* m = gst_bus_pop_filtered(t.bus, GST_MESSAGE_LATENCY);
  EXPECT_EQ(m, nullptr) << "LATENCY message before any batch";
  if (m) gst_message_unref(m);
  ASSERT_EQ(t.push(frame_buffer("RGB", 256, 192, fr[3], 3)), GST_FLOW_OK);
  t.settle();
  ASSERT_GT(t.u64("last-batch-time"), 2 * GST_MSECOND) << "batch encoded too fast for this test to mean anything";
  m = gst_bus_pop_filtered(t.bus, GST_MESSAGE_LATENCY);
  EXPECT_NE(m, nullptr) << "no LATENCY message after the encode time became known";
  if (m) gst_message_unref(m);
  auto out = t.pull_all();
  unref_all(out);
}

TEST_F(VaeEncodeTest, ProgressMessageAfterEachBatch) {
  Harness t(make_element(4), /*with_bus=*/true);
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 10);
  for (guint64 n = 0; n < 3; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  EXPECT_TRUE(t.element_messages(kProgress).empty()) << "progress before any batch";
  ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[3], 3)), GST_FLOW_OK);

  auto check = [&](guint64 frames_so_far, guint64 batches, guint batch_frames) {
    t.settle();
    auto msgs = t.element_messages(kProgress);
    ASSERT_EQ(msgs.size(), 1u);
    GstStructure* s = msgs[0];
    guint64 frames = 0, nbatches = 0, batch_time = 0;
    guint bf = 0;
    gdouble fps = -1, avg = -1;
    EXPECT_TRUE(gst_structure_get_uint64(s, "frames", &frames));
    EXPECT_TRUE(gst_structure_get_uint64(s, "batches", &nbatches));
    EXPECT_TRUE(gst_structure_get_uint(s, "batch-frames", &bf));
    EXPECT_TRUE(gst_structure_get_uint64(s, "batch-time", &batch_time));
    EXPECT_TRUE(gst_structure_get_double(s, "fps", &fps));
    EXPECT_TRUE(gst_structure_get_double(s, "average-fps", &avg));
    EXPECT_EQ(frames, frames_so_far);
    EXPECT_EQ(frames, t.u64("latents-out"));
    EXPECT_EQ(nbatches, batches);
    EXPECT_EQ(bf, batch_frames);
    EXPECT_GT(batch_time, 0u);
    EXPECT_GT(fps, 0.0);
    EXPECT_GT(avg, 0.0);
    for (GstStructure* m : msgs) gst_structure_free(m);
  };
  check(4, 1, 4);
  for (guint64 n = 4; n < 8; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  check(8, 2, 4);
  for (guint64 n = 8; n < 10; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
  check(10, 3, 2);
  auto out = t.pull_all();
  EXPECT_EQ(out.size(), 10u);
  unref_all(out);
}

TEST_F(VaeEncodeTest, SamplingIsReproducibleAndDiffersFromMean) {
  auto fr = frames("RGB", 64, 48, 4);
  auto run = [&](bool sample, guint64 seed) {
    GstElement* e = make_element(2);
    g_object_set(e, "sample", sample, "seed", seed, nullptr);
    Harness t(e);
    t.caps(video_caps("RGB", 64, 48));
    for (guint64 n = 0; n < 4; ++n) EXPECT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
    auto out = t.pull_all();
    std::vector<std::vector<float>> v;
    for (GstBuffer* b : out) v.push_back(floats_of(b));
    unref_all(out);
    return v;
  };
  auto a = run(true, 5), b = run(true, 5), mean = run(false, 0), other = run(true, 6);
  ASSERT_EQ(a.size(), 4u);
  ASSERT_EQ(b.size(), 4u);
  ASSERT_EQ(mean.size(), 4u);
  ASSERT_EQ(other.size(), 4u);
  auto engine = engine_latents("RGB", 64, 48, fr, 2, true, 5);
  for (size_t n = 0; n < 4; ++n) {
    SCOPED_TRACE("latent " + std::to_string(n));
    EXPECT_TRUE(bit_equal(a[n], b[n])) << "same seed, different samples";
    EXPECT_FALSE(bit_equal(a[n], mean[n])) << "sample equals the mean";
    EXPECT_FALSE(bit_equal(a[n], other[n])) << "seeds 5 and 6 gave the same sample";
    EXPECT_TRUE(bit_equal(a[n], engine[n])) << "element sample differs from the engine's";
  }
}

// Frame i's noise depends on (seed, i) only: the batch size changes nothing
// beyond float rounding of the mean.
TEST_F(VaeEncodeTest, SamplingDoesNotDependOnPerBatch) {
  auto fr = frames("RGB", 64, 48, 4);
  auto run = [&](guint per_batch) {
    GstElement* e = make_element(per_batch);
    g_object_set(e, "sample", TRUE, "seed", static_cast<guint64>(11), nullptr);
    Harness t(e);
    t.caps(video_caps("RGB", 64, 48));
    for (guint64 n = 0; n < 4; ++n) EXPECT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
    auto out = t.pull_all();
    std::vector<std::vector<float>> v;
    for (GstBuffer* b : out) v.push_back(floats_of(b));
    unref_all(out);
    return v;
  };
  auto one = run(1), four = run(4);
  ASSERT_EQ(one.size(), 4u);
  ASSERT_EQ(four.size(), 4u);
  for (size_t n = 0; n < 4; ++n) {
    ASSERT_EQ(one[n].size(), four[n].size());
    float worst = 0;
    for (size_t i = 0; i < one[n].size(); ++i)
      worst = std::max(worst, std::abs(one[n][i] - four[n][i]) / (1.0f + std::abs(one[n][i])));
    EXPECT_LT(worst, 1e-4f) << "latent " << n;
  }
}

TEST_F(VaeEncodeTest, RestartDropsFramesPendingBeforeStop) {
  Harness t(make_element(4));
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 7);
  for (guint64 n = 0; n < 3; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 0u);

  ASSERT_NE(gst_element_set_state(t.element, GST_STATE_READY), GST_STATE_CHANGE_FAILURE);
  EXPECT_EQ(t.queued(), 0u) << "stopping must drop, not push, the pending frames";
  ASSERT_EQ(gst_element_set_state(t.element, GST_STATE_PLAYING), GST_STATE_CHANGE_SUCCESS);
  EXPECT_EQ(t.u64("frames-in"), 0u) << "statistics restart with the element";

  // The element's pads lost their sticky events: send a new stream start.
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_stream_start("restarted")));
  t.caps(video_caps("RGB", 64, 48));
  EXPECT_EQ(t.queued(), 0u) << "stale frames came out after the restart";
  for (guint64 i = 0; i < 3; ++i)
    ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[3 + i], 200 + i)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 0u) << "the first batch after the restart held stale frames";
  ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[6], 203)), GST_FLOW_OK);
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 4u);
  std::vector<Frame> fresh(fr.begin() + 3, fr.end());
  auto expect = engine_latents("RGB", 64, 48, fresh, 4);
  for (guint64 i = 0; i < 4; ++i) {
    EXPECT_EQ(GST_BUFFER_PTS(out[i]), (200 + i) * kFrameDur);
    EXPECT_TRUE(bit_equal(floats_of(out[i]), expect[i])) << "latent " << i;
  }
  unref_all(out);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
  EXPECT_EQ(t.queued(), 0u);
}

/* ------------------------------------------------- the encode thread */

// While batch k's latents are held downstream, the encoder goes on: batch
// k+1's latents wait behind them, k+2 is encoded and waits for room, k+3
// waits to be encoded, k+4 fills, then upstream is held back.
TEST_F(VaeEncodeTest, BoundedQueueWhileDownstreamBlocks) {
  Harness t(make_element(2));
  DownstreamGate gate(t.h);
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 12);
  std::thread pusher([&] {
    for (guint64 n = 0; n < 12; ++n) EXPECT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  });
  ASSERT_TRUE(gate.wait_arrived(1));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (t.u64("frames-in") < 10 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_EQ(t.u64("frames-in"), 10u);
  EXPECT_EQ(t.u64("frames-in-flight"), 8u);
  EXPECT_EQ(t.u64("batches"), 3u);
  EXPECT_EQ(gate.arrived(), 1);
  gate.open();
  pusher.join();
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
  auto out = t.pull_all();
  expect_latents(out, engine_latents("RGB", 64, 48, fr, 2));
  unref_all(out);
}

// The streaming thread waits for an encode, never for downstream: with the
// first latent held (a sink prerolling in PAUSED, or syncing to the clock),
// two more batches are taken and the next batch is encoded meanwhile. An
// application's EOS during preroll needs the streaming thread back (basesrc
// takes its stream lock while gst_element_send_event holds the state lock).
TEST_F(VaeEncodeTest, StreamingThreadNeverWaitsForDownstream) {
  Harness t(make_element(2));
  DownstreamGate gate(t.h);
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 6);
  for (guint64 n = 0; n < 2; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  ASSERT_TRUE(gate.wait_arrived(1));
  Background pusher([&] {
    for (guint64 n = 2; n < 6; ++n) EXPECT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  });
  EXPECT_TRUE(pusher.finished_within(std::chrono::seconds(60)))
      << "upstream was held back while downstream held the first latent";
  EXPECT_TRUE(eventually([&] { return t.u64("batches") >= 2; }))
      << "batch 2 was not encoded while batch 1 waited downstream";
  EXPECT_EQ(gate.arrived(), 1);
  gate.open();
  pusher.join();
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
  auto out = t.pull_all();
  expect_latents(out, engine_latents("RGB", 64, 48, fr, 2));
  unref_all(out);
}

// A serialized event waits for the latents of the frames before it, even
// those of a batch the encode thread is still busy with.
TEST_F(VaeEncodeTest, SerializedEventWaitsForLatentsInFlight) {
  Harness t(make_element(2));
  Recorder rec;
  rec.attach(t.element);
  DownstreamGate gate(t.h);
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 2);
  for (guint64 n = 0; n < 2; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  ASSERT_TRUE(gate.wait_arrived(1));
  rec.take();
  GstStructure* tag = gst_structure_new_empty("test-marker");
  std::thread sender(
      [&] { EXPECT_TRUE(gst_harness_push_event(t.h, gst_event_new_custom(GST_EVENT_CUSTOM_DOWNSTREAM, tag))); });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  for (const auto& it : rec.take()) EXPECT_TRUE(it.is_buffer) << "an event overtook the latents in flight";
  gate.open();
  sender.join();
  auto items = rec.take();
  ASSERT_EQ(items.size(), 2u);  // the second latent, then the event
  EXPECT_TRUE(items[0].is_buffer);
  EXPECT_EQ(items[1].event, GST_EVENT_CUSTOM_DOWNSTREAM);
  auto out = t.pull_all();
  EXPECT_EQ(out.size(), 2u);
  unref_all(out);
}

// A tag (parsers send them mid-stream) does not hold the streaming thread
// while downstream holds a latent (a sink prerolling): it goes out after the
// latents before it, pushed by the push thread.
TEST_F(VaeEncodeTest, TagDoesNotHoldTheStreamingThread) {
  Harness t(make_element(2));
  Recorder rec;
  rec.attach(t.element);
  DownstreamGate gate(t.h);
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 2);
  for (guint64 n = 0; n < 2; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  ASSERT_TRUE(gate.wait_arrived(1));
  rec.take();
  Background sender([&] {
    EXPECT_TRUE(gst_harness_push_event(
        t.h, gst_event_new_tag(gst_tag_list_new(GST_TAG_TITLE, "mid-stream", nullptr))));
  });
  EXPECT_TRUE(sender.finished_within(std::chrono::seconds(30)))
      << "the tag held the streaming thread while downstream held a latent";
  for (const auto& it : rec.take()) EXPECT_TRUE(it.is_buffer) << "the tag overtook the latents in flight";
  gate.open();
  sender.join();
  std::vector<Recorder::Item> items;
  eventually([&] {
    for (auto& it : rec.take()) items.push_back(it);
    return items.size() >= 2;
  });
  ASSERT_EQ(items.size(), 2u);  // the second latent, then the tag
  EXPECT_TRUE(items[0].is_buffer);
  EXPECT_EQ(items[1].event, GST_EVENT_TAG);
  auto out = t.pull_all();
  EXPECT_EQ(out.size(), 2u);
  unref_all(out);
}

// A flush while a batch is at the gate and another waits: the waiting one is
// dropped, the rest of the busy one never goes out, new frames do.
TEST_F(VaeEncodeTest, FlushWhileEncodingDropsStaleLatents) {
  Harness t(make_element(2));
  DownstreamGate gate(t.h);
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 6);
  for (guint64 n = 0; n < 4; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  ASSERT_TRUE(gate.wait_arrived(1));
  EXPECT_EQ(t.u64("frames-in-flight"), 4u);

  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_flush_start()));
  gate.open();
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_flush_stop(TRUE)));
  ASSERT_TRUE(t.segment());
  // The push thread counts its (dropped) batch off just after the flush fence.
  EXPECT_TRUE(eventually([&] { return t.u64("frames-in-flight") == 0; })) << "the waiting batch survived the flush";
  for (guint64 i = 0; i < 2; ++i)
    ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[4 + i], 100 + i)), GST_FLOW_OK);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));

  auto out = t.pull_all();
  // Latent 0 was inside the downstream chain when the flush began; no other
  // latent from before the flush may come out.
  ASSERT_GE(out.size(), 2u);
  ASSERT_LE(out.size(), 3u);
  if (out.size() == 3) {
    EXPECT_EQ(GST_BUFFER_PTS(out[0]), 0u);
  }
  EXPECT_EQ(GST_BUFFER_PTS(out[out.size() - 2]), 100 * kFrameDur);
  EXPECT_EQ(GST_BUFFER_PTS(out[out.size() - 1]), 101 * kFrameDur);
  std::vector<Frame> fresh(fr.begin() + 4, fr.end());
  auto expect = engine_latents("RGB", 64, 48, fresh, 2);
  EXPECT_TRUE(bit_equal(floats_of(out[out.size() - 2]), expect[0]));
  EXPECT_TRUE(bit_equal(floats_of(out[out.size() - 1]), expect[1]));
  unref_all(out);
}

// A flush while a batch is still encoding: its latents are stale when the
// encode ends, and never go out; the batch waiting behind it is dropped.
TEST_F(VaeEncodeTest, FlushDuringEncodeDropsItsLatents) {
  Harness t(make_element(2));
  // Large enough that an encode outlasts the flush by far.
  t.caps(video_caps("RGB", 512, 512));
  auto fr = frames("RGB", 512, 512, 4);
  // Batch A (frames 0, 1), then batch B (2, 3): B's hand-over returns only once
  // the encode thread has taken A from the queue, so A is encoding now.
  for (guint64 n = 0; n < 4; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 512, 512, fr[n], n)), GST_FLOW_OK);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_flush_start()));
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_flush_stop(TRUE)));
  ASSERT_EQ(t.u64("frames-in-flight"), 2u) << "batch A should still be encoding (and B dropped)";
  ASSERT_TRUE(t.segment());
  for (guint64 i = 0; i < 2; ++i)
    ASSERT_EQ(t.push(frame_buffer("RGB", 512, 512, fr[i], 100 + i)), GST_FLOW_OK);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(GST_BUFFER_PTS(out[0]), 100 * kFrameDur);
  EXPECT_EQ(GST_BUFFER_PTS(out[1]), 101 * kFrameDur);
  unref_all(out);
}

// A flow return downstream reaches upstream at its next buffer; a non-fatal
// one (NOT_LINKED) only once, so a relinked downstream gets latents again.
// Per-batch 1, a downstream refusing latents with `ret`: frame 0 goes in, its
// latent is refused, and upstream learns of it with frame 1.
void expect_refusal_returned(Harness& t, DownstreamGate& gate, GstFlowReturn ret, const std::vector<Frame>& fr) {
  gate.refuse(ret);
  t.caps(video_caps("RGB", 64, 48));
  EXPECT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[0], 0)), GST_FLOW_OK);
  t.settle();
  EXPECT_EQ(gate.arrived(), 1);
  EXPECT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[1], 1)), ret);
}

TEST_F(VaeEncodeTest, DownstreamFlowReturnReachesUpstreamOnce) {
  Harness t(make_element(1));
  DownstreamGate gate(t.h);
  auto fr = frames("RGB", 64, 48, 3);
  expect_refusal_returned(t, gate, GST_FLOW_NOT_LINKED, fr);
  gate.refuse(GST_FLOW_OK);  // relinked
  gate.open();
  t.settle();  // frame 1 was refused with the NOT_LINKED, before staging
  EXPECT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[2], 2)), GST_FLOW_OK);
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(GST_BUFFER_PTS(out[0]), 2 * kFrameDur);
  unref_all(out);
}

// An error stays: every later buffer gets it.
TEST_F(VaeEncodeTest, DownstreamErrorStays) {
  Harness t(make_element(1));
  DownstreamGate gate(t.h);
  auto fr = frames("RGB", 64, 48, 3);
  expect_refusal_returned(t, gate, GST_FLOW_ERROR, fr);
  EXPECT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[2], 2)), GST_FLOW_ERROR);
}

// batch-timeout set while frames already wait: they come out after it, not
// only when more frames or EOS arrive.
TEST_F(VaeEncodeTest, BatchTimeoutSetWhileFramesWait) {
  Harness t(make_element(8));
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 2);
  for (guint64 n = 0; n < 2; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(t.queued(), 0u);
  g_object_set(t.element, "batch-timeout", static_cast<guint64>(200 * GST_MSECOND), nullptr);
  std::vector<GstBuffer*> out;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (out.size() < 2 && std::chrono::steady_clock::now() < deadline) {
    if (GstBuffer* b = gst_harness_try_pull(t.h))
      out.push_back(b);
    else
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  expect_latents(out, engine_latents("RGB", 64, 48, fr, 8));
  unref_all(out);
}

// A custom downstream event is a marker in the stream: the latents of every
// frame before it, the partial batch's too, come out first.
TEST_F(VaeEncodeTest, CustomEventDrainsThePartialBatch) {
  Harness t(make_element(4));
  Recorder rec;
  rec.attach(t.element);
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 2);
  for (guint64 n = 0; n < 2; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  rec.take();
  ASSERT_TRUE(gst_harness_push_event(
      t.h, gst_event_new_custom(GST_EVENT_CUSTOM_DOWNSTREAM, gst_structure_new_empty("scene-cut"))));
  auto items = rec.take();
  ASSERT_EQ(items.size(), 3u);
  EXPECT_TRUE(items[0].is_buffer && items[0].pts == 0);
  EXPECT_TRUE(items[1].is_buffer && items[1].pts == kFrameDur);
  EXPECT_EQ(items[2].event, GST_EVENT_CUSTOM_DOWNSTREAM);
  auto out = t.pull_all();
  unref_all(out);
}

// Stopping while the encode thread is busy waits for it, then pushes nothing
// stale after a restart.
TEST_F(VaeEncodeTest, StopWhileEncodingDoesNotHangOrLeak) {
  Harness t(make_element(2));
  auto gate = std::make_unique<DownstreamGate>(t.h);
  t.caps(video_caps("RGB", 64, 48));
  auto fr = frames("RGB", 64, 48, 6);
  for (guint64 n = 0; n < 4; ++n) ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[n], n)), GST_FLOW_OK);
  ASSERT_TRUE(gate->wait_arrived(1));
  std::thread opener([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    gate->open();
  });
  ASSERT_EQ(gst_element_set_state(t.element, GST_STATE_READY), GST_STATE_CHANGE_SUCCESS);
  opener.join();
  gate.reset();
  EXPECT_LE(t.queued(), 1u) << "latents pushed after the element stopped";
  auto stale = t.pull_all();
  unref_all(stale);

  ASSERT_EQ(gst_element_set_state(t.element, GST_STATE_PLAYING), GST_STATE_CHANGE_SUCCESS);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_stream_start("restarted")));
  t.caps(video_caps("RGB", 64, 48));
  for (guint64 i = 0; i < 2; ++i)
    ASSERT_EQ(t.push(frame_buffer("RGB", 64, 48, fr[4 + i], 200 + i)), GST_FLOW_OK);
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(GST_BUFFER_PTS(out[0]), 200 * kFrameDur);
  EXPECT_EQ(GST_BUFFER_PTS(out[1]), 201 * kFrameDur);
  unref_all(out);
}

}  // namespace
