// GstHarness tests of the vaedecode element with the real TAESD decoder of
// ../shared/models: batching, timestamps, events, flushes, caps, latency,
// properties, messages, errors, and byte equality with the engine (linked
// directly into this test, run in the same process).
#include <gst/check/gstharness.h>
#include <gst/check/gsttestclock.h>
#include <gst/gst.h>
#include <gst/video/video.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
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

constexpr const char* kProgress = "vaedecode-progress";
constexpr int kChannels = 4;                         // TAESD's latent channels
constexpr int kUpscale = 8;

/* ---------------------------------------------------------------- helpers */

gstvae::PixelFormat pixel_format(const char* name) {
  gstvae::PixelFormat f;
  if (!gstvae::parse_pixel_format(name, &f)) throw std::runtime_error(std::string("bad format ") + name);
  return f;
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
    std::string caps_format;
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
        if (const char* f = gst_structure_get_string(s, "format")) it.caps_format = f;
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
  int arrived() {
    std::lock_guard<std::mutex> lock(mutex_);
    return arrived_;
  }
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

/* ---------------------------------------------------------------- fixture */

std::string decoder_path() { return std::string(GSTVAE_SHARED_DIR) + "/models/taesd_decoder.safetensors"; }

class VaeDecodeTest : public ::testing::Test {
 protected:
  static std::shared_ptr<gstvae::Decoder> engine_;
  static std::string load_error_;

  static void SetUpTestSuite() {
    try {
      gstvae::ModelOptions options;
      options.device = "cpu";
      engine_ = gstvae::load_decoder(decoder_path(), options);
    } catch (const std::exception& e) {
      load_error_ = e.what();
    }
  }
  static void TearDownTestSuite() { engine_.reset(); }

  void SetUp() override {
    // The real weights are part of the test: missing ones are a failure.
    struct stat st;
    ASSERT_EQ(stat(decoder_path().c_str(), &st), 0) << "missing " << decoder_path();
    ASSERT_NE(engine_, nullptr) << "could not load " << decoder_path() << ": " << load_error_;
    GstElementFactory* f = gst_element_factory_find("vaedecode");
    ASSERT_NE(f, nullptr) << "vaedecode not found: is GST_PLUGIN_PATH set to the build's gst folder?";
    gst_object_unref(f);
  }

  static GstElement* make_element(guint per_batch) {
    GstElement* e = gst_element_factory_make("vaedecode", nullptr);
    g_object_set(e, "model", decoder_path().c_str(), "device", "cpu", "per-batch", per_batch, nullptr);
    return e;
  }

  // The engine's frames for `latents` (w x h each), decoded in batches of
  // `per_batch` as the element groups them, latent i having stream index
  // first_index + i.
  static std::vector<Pixels> engine_frames(const char* format, int w, int h, const std::vector<Latent>& latents,
                                           size_t per_batch, const char* latent_format = "raw",
                                           uint64_t first_index = 0) {
    gstvae::DecodeParams params;
    params.latent_format = gstvae::latent_format_by_name(latent_format);
    const gstvae::PixelFormat pf = pixel_format(format);
    std::vector<Pixels> out;
    for (size_t start = 0; start < latents.size(); start += per_batch) {
      const size_t n = std::min(per_batch, latents.size() - start);
      auto batch = engine_->new_batch(h, w, per_batch);
      for (size_t i = 0; i < n; ++i) batch->add(latents[start + i].data(), first_index + start + i);
      auto block = engine_->new_pixels(*batch, pf);
      engine_->decode(*batch, params, pf, *block);
      const size_t frame_bytes = engine_->frame_bytes(*batch, pf);
      for (size_t i = 0; i < n; ++i)
        out.emplace_back(block->data() + i * frame_bytes, block->data() + (i + 1) * frame_bytes);
    }
    return out;
  }

  // Frames first, first+1, ...: one each, in order, with the latent's PTS
  // and the engine's exact bytes.
  static void expect_frames(const std::vector<GstBuffer*>& out, const std::vector<Pixels>& expect,
                            guint64 first = 0) {
    ASSERT_EQ(out.size(), expect.size());
    for (size_t i = 0; i < out.size(); ++i) {
      EXPECT_EQ(GST_BUFFER_PTS(out[i]), (first + i) * kFrameDur) << "frame " << i;
      const Pixels got = bytes_of(out[i]);
      EXPECT_EQ(got, expect[i]) << "frame " << i << ": " << diff_summary(got, expect[i]);
    }
  }
};

std::shared_ptr<gstvae::Decoder> VaeDecodeTest::engine_;
std::string VaeDecodeTest::load_error_;

// 8 x 6 latents: 64 x 48 RGB frames.
constexpr int kW = 8, kH = 6;
constexpr size_t kRgbFrameBytes = kW * kUpscale * kH * kUpscale * 3;

/* ------------------------------------------------------------------ tests */

TEST_F(VaeDecodeTest, BatchReleasedWhenFullWithTimestampsAndCaps) {
  Harness t(make_element(4));
  t.caps(latent_caps(kW, kH));
  auto lat = make_latents(kW, kH, 8);
  auto discont = [](guint64 n) { return n == 0; };
  for (guint64 n = 0; n < 3; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n, discont(n))), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 0u) << "frames came out before the batch was full";
  ASSERT_EQ(t.push(latent_buffer(lat[3], 3, discont(3))), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 4u);
  for (guint64 n = 4; n < 7; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n, discont(n))), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 4u) << "the second batch came out before it was full";
  ASSERT_EQ(t.push(latent_buffer(lat[7], 7, discont(7))), GST_FLOW_OK);

  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 8u);
  for (guint64 n = 0; n < 8; ++n) {
    GstBuffer* b = out[n];
    SCOPED_TRACE("frame " + std::to_string(n));
    EXPECT_EQ(gst_buffer_get_size(b), kRgbFrameBytes);
    EXPECT_EQ(GST_BUFFER_PTS(b), n * kFrameDur);
    EXPECT_EQ(GST_BUFFER_DTS(b), n * kFrameDur);
    EXPECT_EQ(GST_BUFFER_DURATION(b), kFrameDur);
    EXPECT_EQ(GST_BUFFER_OFFSET(b), n);
    EXPECT_EQ(GST_BUFFER_OFFSET_END(b), n + 1);
    EXPECT_EQ(GST_BUFFER_FLAG_IS_SET(b, GST_BUFFER_FLAG_DISCONT) != 0, discont(n));
  }
  const auto caps = t.out_caps();
  EXPECT_EQ(caps.format, "RGB") << "the first format of the template when downstream takes any";
  EXPECT_EQ(caps.width, kW * kUpscale);
  EXPECT_EQ(caps.height, kH * kUpscale);
  EXPECT_EQ(caps.fps_n, 25);
  EXPECT_EQ(caps.fps_d, 1);
  expect_frames(out, engine_frames("RGB", kW, kH, lat, 4));
  unref_all(out);
}

// A Flux.2 VAE decoder (issue 21) takes ComfyUI's Flux.2 LATENT layout: 128
// channels, 16 pixels per latent cell; frames are the engine's exact bytes.
TEST_F(VaeDecodeTest, Flux2Takes128ChannelsAtSixteenPixelsPerCell) {
  TempDir dir;
  VaeSpec spec;
  spec.z = 32;
  spec.batch_norm = true;
  spec.layout = "flux2";
  spec.full_decoder = true;
  const std::string model = dir.file("flux2.safetensors");
  write_test_vae(model, spec);
  GstElement* e = gst_element_factory_make("vaedecode", nullptr);
  g_object_set(e, "model", model.c_str(), "device", "cpu", "per-batch", 2, nullptr);
  Harness t(e);
  t.caps(latent_caps(4, 2, "raw", 128));
  auto lat = make_latents(4, 2, 2, 100, 128);
  for (guint64 n = 0; n < 2; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 2u);
  const auto caps = t.out_caps();
  EXPECT_EQ(caps.width, 64);
  EXPECT_EQ(caps.height, 32);

  gstvae::ModelOptions options;
  options.device = "cpu";
  auto engine = gstvae::load_decoder(model, options);
  EXPECT_EQ(engine->info().family, "flux2");
  auto batch = engine->new_batch(2, 4, 2);
  for (guint64 n = 0; n < 2; ++n) batch->add(lat[n].data(), n);
  const gstvae::PixelFormat pf = pixel_format("RGB");
  auto block = engine->new_pixels(*batch, pf);
  engine->decode(*batch, gstvae::DecodeParams{}, pf, *block);
  const size_t frame_bytes = engine->frame_bytes(*batch, pf);
  ASSERT_EQ(frame_bytes, 64u * 32 * 3);
  for (size_t n = 0; n < 2; ++n)
    EXPECT_EQ(bytes_of(out[n]), Pixels(block->data() + n * frame_bytes, block->data() + (n + 1) * frame_bytes))
        << "frame " << n;
  unref_all(out);
}

// DISCONT on the third latent of a batch stays on the third frame (the base
// class would put it on the next buffer it is given).
TEST_F(VaeDecodeTest, DiscontMidBatchStaysOnItsFrame) {
  Harness t(make_element(4));
  t.caps(latent_caps(kW, kH));
  auto lat = make_latents(kW, kH, 4);
  for (guint64 n = 0; n < 4; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n, n == 2)), GST_FLOW_OK);
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 4u);
  for (guint64 n = 0; n < 4; ++n)
    EXPECT_EQ(GST_BUFFER_FLAG_IS_SET(out[n], GST_BUFFER_FLAG_DISCONT) != 0, n == 2) << "frame " << n;
  unref_all(out);
}

TEST_F(VaeDecodeTest, EosDrainsPartialBatchBeforeEos) {
  Harness t(make_element(4));
  Recorder rec;
  rec.attach(t.element);
  t.caps(latent_caps(kW, kH));
  auto lat = make_latents(kW, kH, 7);
  for (guint64 n = 0; n < 7; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 4u);
  rec.take();
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
  auto items = rec.take();
  ASSERT_EQ(items.size(), 4u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_TRUE(items[i].is_buffer) << "item " << i;
    EXPECT_EQ(items[i].pts, (4 + i) * kFrameDur);
  }
  EXPECT_EQ(items[3].event, GST_EVENT_EOS) << "EOS must follow the drained frames";
  auto out = t.pull_all();
  expect_frames(out, engine_frames("RGB", kW, kH, lat, 4));
  unref_all(out);
  auto events = t.pull_event_types();
  EXPECT_NE(std::find(events.begin(), events.end(), GST_EVENT_EOS), events.end());
}

// A latent size change drains the pending latents with the old output caps;
// the new latents come out at the new size.
TEST_F(VaeDecodeTest, CapsChangeDrainsWithOldCaps) {
  Harness t(make_element(4));
  Recorder rec;
  rec.attach(t.element);
  t.caps(latent_caps(kW, kH));
  auto old_lat = make_latents(kW, kH, 3);
  auto new_lat = make_latents(5, 4, 4, 500);
  for (guint64 n = 0; n < 3; ++n) ASSERT_EQ(t.push(latent_buffer(old_lat[n], n)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 0u);
  rec.take();

  t.caps(latent_caps(5, 4));
  EXPECT_EQ(t.queued(), 3u) << "the caps change must drain the pending latents";
  for (guint64 n = 3; n < 7; ++n) ASSERT_EQ(t.push(latent_buffer(new_lat[n - 3], n)), GST_FLOW_OK);
  t.settle();

  auto items = rec.take();
  std::vector<Recorder::Item> bufs;
  int caps_at = -1;
  for (size_t i = 0; i < items.size(); ++i) {
    if (items[i].is_buffer) bufs.push_back(items[i]);
    if (!items[i].is_buffer && items[i].event == GST_EVENT_CAPS && caps_at < 0) caps_at = static_cast<int>(i);
  }
  EXPECT_EQ(caps_at, 3) << "the new caps must come after the 3 old frames";
  ASSERT_EQ(bufs.size(), 7u);
  for (size_t i = 0; i < 7; ++i) {
    SCOPED_TRACE("frame " + std::to_string(i));
    const bool old = i < 3;
    EXPECT_EQ(bufs[i].pts, i * kFrameDur);
    EXPECT_EQ(bufs[i].size, old ? kRgbFrameBytes : 40u * 32 * 3);
    EXPECT_EQ(bufs[i].caps_width, old ? 64 : 40);
    EXPECT_EQ(bufs[i].caps_height, old ? 48 : 32);
  }
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 7u);
  auto expect_old = engine_frames("RGB", kW, kH, old_lat, 4);
  auto expect_new = engine_frames("RGB", 5, 4, new_lat, 4);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(bytes_of(out[i]), expect_old[i]) << "old frame " << i;
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(bytes_of(out[3 + i]), expect_new[i]) << "new frame " << i;
  unref_all(out);
  const auto caps = t.out_caps();
  EXPECT_EQ(caps.width, 40);
  EXPECT_EQ(caps.height, 32);
}

// A latent-format change mid-stream: the latents before it are decoded as
// the old format, those after as the new one.
TEST_F(VaeDecodeTest, LatentFormatChangeDecodesEachLatentInItsFormat) {
  Harness t(make_element(4));
  t.caps(latent_caps(kW, kH, "raw"));
  auto lat = make_latents(kW, kH, 4);
  for (guint64 n = 0; n < 2; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  t.caps(latent_caps(kW, kH, "sdxl"));
  EXPECT_EQ(t.queued(), 2u) << "the caps change must drain the pending latents";
  for (guint64 n = 2; n < 4; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 4u);
  auto raw = engine_frames("RGB", kW, kH, {lat[0], lat[1]}, 4, "raw");
  auto sdxl = engine_frames("RGB", kW, kH, {lat[2], lat[3]}, 4, "sdxl", 2);
  auto sdxl_as_raw = engine_frames("RGB", kW, kH, {lat[2], lat[3]}, 4, "raw", 2);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(bytes_of(out[i]), raw[i]) << "frame " << i;
    EXPECT_EQ(bytes_of(out[2 + i]), sdxl[i]) << "frame " << 2 + i;
    EXPECT_NE(sdxl[i], sdxl_as_raw[i]) << "sdxl and raw decode alike: the check above means nothing";
  }
  unref_all(out);
}

TEST_F(VaeDecodeTest, RepeatedIdenticalCapsDoNotDrain) {
  Harness t(make_element(4));
  t.caps(latent_caps(kW, kH));
  auto lat = make_latents(kW, kH, 4);
  for (guint64 n = 0; n < 2; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  GstCaps* same = gst_caps_from_string(latent_caps(kW, kH).c_str());
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_caps(same)));
  gst_caps_unref(same);
  EXPECT_EQ(t.queued(), 0u) << "resending the same caps must not cut the batch";
  for (guint64 n = 2; n < 4; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  auto out = t.pull_all();
  EXPECT_EQ(t.u64("batches"), 1u);
  expect_frames(out, engine_frames("RGB", kW, kH, lat, 4));
  unref_all(out);
}

// A downstream RECONFIGURE makes the base class call set_caps again (same
// caps) on the next buffer: latents already staged must survive it.
TEST_F(VaeDecodeTest, RenegotiationKeepsPendingLatents) {
  Harness t(make_element(4));
  t.caps(latent_caps(kW, kH));
  auto lat = make_latents(kW, kH, 4);
  for (guint64 n = 0; n < 2; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  ASSERT_TRUE(gst_harness_push_upstream_event(t.h, gst_event_new_reconfigure()));
  for (guint64 n = 2; n < 4; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 4u) << "the batch of 4 did not complete";
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 4u) << "latents were lost across the renegotiation";
  expect_frames(out, engine_frames("RGB", kW, kH, lat, 4));
  unref_all(out);
}

TEST_F(VaeDecodeTest, FlushDropsPendingLatents) {
  Harness t(make_element(4));
  t.caps(latent_caps(kW, kH));
  auto lat = make_latents(kW, kH, 7);
  for (guint64 n = 0; n < 3; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_flush_start()));
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_flush_stop(TRUE)));
  EXPECT_EQ(t.queued(), 0u) << "a flush must not push the pending latents";
  ASSERT_TRUE(t.segment());
  EXPECT_EQ(t.queued(), 0u) << "stale latents came out at the segment after the flush";
  for (guint64 i = 0; i < 3; ++i) ASSERT_EQ(t.push(latent_buffer(lat[3 + i], 100 + i)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 0u) << "the batch after the flush still held stale latents";
  ASSERT_EQ(t.push(latent_buffer(lat[6], 103)), GST_FLOW_OK);
  auto out = t.pull_all();
  std::vector<Latent> fresh(lat.begin() + 3, lat.end());
  expect_frames(out, engine_frames("RGB", kW, kH, fresh, 4, "raw", 3), 100);
  unref_all(out);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
  EXPECT_EQ(t.queued(), 0u);
}

// A flush while one batch is held downstream and another is decoded behind
// it: neither's remaining frames go out, the new latents do.
TEST_F(VaeDecodeTest, FlushWhileDecodingDropsStaleFrames) {
  Harness t(make_element(2));
  DownstreamGate gate(t.h);
  t.caps(latent_caps(kW, kH));
  auto lat = make_latents(kW, kH, 6);
  for (guint64 n = 0; n < 4; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  ASSERT_TRUE(gate.wait_arrived(1));
  EXPECT_EQ(t.u64("frames-in-flight"), 4u);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_flush_start()));
  gate.open();
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_flush_stop(TRUE)));
  ASSERT_TRUE(t.segment());
  EXPECT_TRUE(eventually([&] { return t.u64("frames-in-flight") == 0; })) << "the waiting batch survived the flush";
  for (guint64 i = 0; i < 2; ++i) ASSERT_EQ(t.push(latent_buffer(lat[4 + i], 100 + i)), GST_FLOW_OK);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
  auto out = t.pull_all();
  // Frame 0 was inside the downstream chain when the flush began.
  ASSERT_GE(out.size(), 2u);
  ASSERT_LE(out.size(), 3u);
  if (out.size() == 3) {
    EXPECT_EQ(GST_BUFFER_PTS(out[0]), 0u);
  }
  std::vector<GstBuffer*> fresh_out(out.end() - 2, out.end());
  std::vector<Latent> fresh(lat.begin() + 4, lat.end());
  expect_frames(fresh_out, engine_frames("RGB", kW, kH, fresh, 2, "raw", 4), 100);
  unref_all(out);
}

// A flush while a batch is being decoded: its frames are stale when the
// decode ends and never go out; the batch waiting behind it is dropped.
TEST_F(VaeDecodeTest, FlushDuringDecodeDropsItsFrames) {
  Harness t(make_element(2));
  // Large enough that a decode outlasts the flush by far.
  constexpr int big = 24;
  t.caps(latent_caps(big, big));
  auto lat = make_latents(big, big, 4);
  // Batch A (0, 1), then B (2, 3): B's hand-over returns once the work thread
  // has taken A, so A is decoding now.
  for (guint64 n = 0; n < 4; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_flush_start()));
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_flush_stop(TRUE)));
  ASSERT_EQ(t.u64("frames-in-flight"), 2u) << "batch A should still be decoding (and B dropped)";
  ASSERT_TRUE(t.segment());
  for (guint64 i = 0; i < 2; ++i) ASSERT_EQ(t.push(latent_buffer(lat[i], 100 + i)), GST_FLOW_OK);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(GST_BUFFER_PTS(out[0]), 100 * kFrameDur);
  EXPECT_EQ(GST_BUFFER_PTS(out[1]), 101 * kFrameDur);
  EXPECT_EQ(t.u64("batches"), 2u) << "batch A ran (its frames dropped), B never did, then the new one";
  unref_all(out);
}

TEST_F(VaeDecodeTest, GapAndSegmentDrainPendingLatentsFirst) {
  Harness t(make_element(4));
  Recorder rec;
  rec.attach(t.element);
  t.caps(latent_caps(kW, kH));
  auto lat = make_latents(kW, kH, 3);
  for (guint64 n = 0; n < 2; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  rec.take();
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_gap(2 * kFrameDur, kFrameDur)));
  auto items = rec.take();
  ASSERT_EQ(items.size(), 3u);
  EXPECT_TRUE(items[0].is_buffer && items[0].pts == 0);
  EXPECT_TRUE(items[1].is_buffer && items[1].pts == kFrameDur);
  EXPECT_EQ(items[2].event, GST_EVENT_GAP);

  ASSERT_EQ(t.push(latent_buffer(lat[2], 3)), GST_FLOW_OK);
  ASSERT_TRUE(t.segment(10 * GST_SECOND));
  items = rec.take();
  ASSERT_EQ(items.size(), 2u);
  EXPECT_TRUE(items[0].is_buffer && items[0].pts == 3 * kFrameDur);
  EXPECT_EQ(items[1].event, GST_EVENT_SEGMENT);
  EXPECT_EQ(t.queued(), 3u);
}

// The batch timer waits on the pipeline clock: with a GstTestClock the
// partial batch comes out when the clock passes batch-timeout, not before.
TEST_F(VaeDecodeTest, BatchTimeoutFollowsThePipelineClock) {
  GstElement* e = make_element(8);
  g_object_set(e, "batch-timeout", static_cast<guint64>(100 * GST_MSECOND), nullptr);
  Harness t(e);
  gst_harness_use_testclock(t.h);
  GstTestClock* clock = gst_harness_get_testclock(t.h);
  gst_test_clock_set_time(clock, 10 * GST_SECOND);
  gst_harness_set_live(t.h, TRUE);
  t.caps(latent_caps(kW, kH));
  auto lat = make_latents(kW, kH, 3);
  for (guint64 n = 0; n < 3; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  gst_test_clock_wait_for_next_pending_id(clock, nullptr);  // the batch timer waits
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(t.queued(), 0u) << "the partial batch came out on real time";
  gst_test_clock_set_time(clock, 10 * GST_SECOND + 99 * GST_MSECOND);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(t.queued(), 0u) << "the partial batch came out before batch-timeout";
  gst_test_clock_set_time(clock, 10 * GST_SECOND + 100 * GST_MSECOND);
  gst_test_clock_crank(clock);
  EXPECT_TRUE(eventually([&] { return t.u64("frames-out") >= 3; }));
  auto out = t.pull_all();
  expect_frames(out, engine_frames("RGB", kW, kH, lat, 8));
  unref_all(out);
  gst_object_unref(clock);
}

// On the system clock (the harness's default here): a partial batch comes
// out after batch-timeout of real time, not before.
TEST_F(VaeDecodeTest, BatchTimeoutReleasesPartialBatchInRealTime) {
  GstElement* e = make_element(8);
  g_object_set(e, "batch-timeout", static_cast<guint64>(100 * GST_MSECOND), nullptr);
  Harness t(e);
  gst_harness_set_live(t.h, TRUE);
  t.caps(latent_caps(kW, kH));
  auto lat = make_latents(kW, kH, 3);
  const auto start = std::chrono::steady_clock::now();
  for (guint64 n = 0; n < 3; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  std::vector<GstBuffer*> out;
  std::chrono::steady_clock::duration first_at{};
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (out.size() < 3 && std::chrono::steady_clock::now() < deadline) {
    if (GstBuffer* b = gst_harness_try_pull(t.h)) {
      if (out.empty()) first_at = std::chrono::steady_clock::now() - start;
      out.push_back(b);
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  ASSERT_EQ(out.size(), 3u) << "the partial batch did not come out after batch-timeout";
  EXPECT_GE(first_at, std::chrono::milliseconds(100)) << "frames came out before the timeout";
  for (guint64 n = 0; n < 3; ++n) EXPECT_EQ(GST_BUFFER_PTS(out[n]), n * kFrameDur);
  unref_all(out);
  EXPECT_EQ(t.u64("frames-out"), 3u);
}

// Lowering per-batch to the number of latents waiting releases them at once;
// the following batches have the new size.
TEST_F(VaeDecodeTest, PerBatchLoweredReleasesTheBatchNowFull) {
  Harness t(make_element(4));
  t.caps(latent_caps(kW, kH));
  auto lat = make_latents(kW, kH, 6);
  for (guint64 n = 0; n < 2; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 0u);
  g_object_set(t.element, "per-batch", 2u, nullptr);
  EXPECT_TRUE(eventually([&] { return t.queued() >= 2u; }));
  EXPECT_EQ(t.queued(), 2u) << "the 2 waiting latents are a full batch now";
  ASSERT_EQ(t.push(latent_buffer(lat[2], 2)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 2u);
  ASSERT_EQ(t.push(latent_buffer(lat[3], 3)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 4u);
  for (guint64 n = 4; n < 6; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  auto out = t.pull_all();
  expect_frames(out, engine_frames("RGB", kW, kH, lat, 2));
  unref_all(out);
  EXPECT_EQ(t.u64("batches"), 3u);
}

TEST_F(VaeDecodeTest, LatencyAddsBatchWaitAndDecodeTime) {
  constexpr GstClockTime upstream = 10 * GST_MSECOND;
  {
    Harness t(make_element(4));
    gst_harness_set_live(t.h, TRUE);
    gst_harness_set_upstream_latency(t.h, upstream);
    t.caps(latent_caps(kW, kH));
    EXPECT_EQ(gst_harness_query_latency(t.h), upstream + 3 * kFrameDur) << "no batch decoded yet";
    auto lat = make_latents(kW, kH, 4);
    for (guint64 n = 0; n < 4; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
    ASSERT_EQ(t.queued(), 4u);
    const GstClockTime decode = t.u64("last-batch-time");
    EXPECT_GT(decode, 0u);
    const GstClockTime after = gst_harness_query_latency(t.h);
    EXPECT_GE(after, upstream + 3 * kFrameDur + decode);
    EXPECT_LT(after, upstream + 3 * kFrameDur + decode + GST_SECOND);
  }
  {
    GstElement* e = make_element(4);
    g_object_set(e, "batch-timeout", static_cast<guint64>(50 * GST_MSECOND), nullptr);
    Harness t(e);
    gst_harness_set_live(t.h, TRUE);
    gst_harness_set_upstream_latency(t.h, upstream);
    t.caps(latent_caps(kW, kH));
    EXPECT_EQ(gst_harness_query_latency(t.h), upstream + 50 * GST_MSECOND);
  }
  {
    // 10/1 latents: the batch wait follows the latents' framerate.
    Harness t(make_element(3));
    gst_harness_set_live(t.h, TRUE);
    gst_harness_set_upstream_latency(t.h, upstream);
    t.caps(latent_caps(kW, kH, "raw", kChannels, 10, 1));
    EXPECT_EQ(gst_harness_query_latency(t.h), upstream + 200 * GST_MSECOND);
  }
}

TEST_F(VaeDecodeTest, ProgressMessageAfterEachBatch) {
  Harness t(make_element(4), /*with_bus=*/true);
  t.caps(latent_caps(kW, kH));
  auto lat = make_latents(kW, kH, 10);
  for (guint64 n = 0; n < 3; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  t.settle();
  EXPECT_TRUE(t.element_messages(kProgress).empty()) << "progress before any batch";
  ASSERT_EQ(t.push(latent_buffer(lat[3], 3)), GST_FLOW_OK);

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
    EXPECT_EQ(frames, t.u64("frames-out"));
    EXPECT_EQ(nbatches, batches);
    EXPECT_EQ(bf, batch_frames);
    EXPECT_GT(batch_time, 0u);
    EXPECT_GT(fps, 0.0);
    EXPECT_GT(avg, 0.0);
    for (GstStructure* m : msgs) gst_structure_free(m);
  };
  check(4, 1, 4);
  for (guint64 n = 4; n < 8; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  check(8, 2, 4);
  for (guint64 n = 8; n < 10; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
  check(10, 3, 2);
  auto out = t.pull_all();
  EXPECT_EQ(out.size(), 10u);
  unref_all(out);
  // No encoder's message name on a decoder.
  EXPECT_TRUE(t.element_messages("vaeencode-progress").empty());
}

// A flow return downstream reaches upstream at its next buffer: per-batch 1,
// latent 0's frame is refused with `ret`, latent 1 learns of it.
void expect_refusal_returned(Harness& t, DownstreamGate& gate, GstFlowReturn ret, const std::vector<Latent>& lat) {
  gate.refuse(ret);
  t.caps(latent_caps(kW, kH));
  EXPECT_EQ(t.push(latent_buffer(lat[0], 0)), GST_FLOW_OK);
  t.settle();
  EXPECT_EQ(gate.arrived(), 1);
  EXPECT_EQ(t.push(latent_buffer(lat[1], 1)), ret);
}

TEST_F(VaeDecodeTest, DownstreamNotLinkedReachesUpstreamOnce) {
  Harness t(make_element(1));
  DownstreamGate gate(t.h);
  auto lat = make_latents(kW, kH, 3);
  expect_refusal_returned(t, gate, GST_FLOW_NOT_LINKED, lat);
  gate.refuse(GST_FLOW_OK);  // relinked
  gate.open();
  t.settle();
  EXPECT_EQ(t.push(latent_buffer(lat[2], 2)), GST_FLOW_OK);
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(GST_BUFFER_PTS(out[0]), 2 * kFrameDur);
  unref_all(out);
}

TEST_F(VaeDecodeTest, DownstreamErrorStays) {
  Harness t(make_element(1));
  DownstreamGate gate(t.h);
  auto lat = make_latents(kW, kH, 4);
  expect_refusal_returned(t, gate, GST_FLOW_ERROR, lat);
  EXPECT_EQ(t.push(latent_buffer(lat[2], 2)), GST_FLOW_ERROR);
  EXPECT_EQ(t.push(latent_buffer(lat[3], 3)), GST_FLOW_ERROR);
}

// Stopping while a batch is held downstream and another waits behind it:
// the stop returns, nothing stale comes out, and a restart decodes again.
TEST_F(VaeDecodeTest, StopWhileDecodingDoesNotHangOrLeak) {
  Harness t(make_element(2));
  auto gate = std::make_unique<DownstreamGate>(t.h);
  t.caps(latent_caps(kW, kH));
  auto lat = make_latents(kW, kH, 6);
  for (guint64 n = 0; n < 4; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  ASSERT_TRUE(gate->wait_arrived(1));
  std::thread opener([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    gate->open();
  });
  ASSERT_EQ(gst_element_set_state(t.element, GST_STATE_READY), GST_STATE_CHANGE_SUCCESS);
  opener.join();
  gate.reset();
  EXPECT_EQ(t.u64("frames-in-flight"), 0u) << "inputs still counted in flight after stop";
  EXPECT_LE(t.queued(), 1u) << "frames pushed after the element stopped";
  auto stale = t.pull_all();
  unref_all(stale);

  ASSERT_EQ(gst_element_set_state(t.element, GST_STATE_PLAYING), GST_STATE_CHANGE_SUCCESS);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_stream_start("restarted")));
  t.caps(latent_caps(kW, kH));
  for (guint64 i = 0; i < 2; ++i) ASSERT_EQ(t.push(latent_buffer(lat[4 + i], 200 + i)), GST_FLOW_OK);
  auto out = t.pull_all();
  std::vector<Latent> fresh(lat.begin() + 4, lat.end());
  expect_frames(out, engine_frames("RGB", kW, kH, fresh, 2), 200);
  unref_all(out);
}

// READY -> PLAYING again: latents pending at the stop are dropped, the
// statistics restart, and the element decodes new latents (at a new size).
TEST_F(VaeDecodeTest, RestartDropsLatentsPendingBeforeStop) {
  Harness t(make_element(4));
  t.caps(latent_caps(kW, kH));
  auto lat = make_latents(kW, kH, 3);
  for (guint64 n = 0; n < 3; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  EXPECT_EQ(t.u64("frames-in"), 3u);
  ASSERT_NE(gst_element_set_state(t.element, GST_STATE_READY), GST_STATE_CHANGE_FAILURE);
  EXPECT_EQ(t.queued(), 0u) << "stopping must drop, not push, the pending latents";
  ASSERT_EQ(gst_element_set_state(t.element, GST_STATE_PLAYING), GST_STATE_CHANGE_SUCCESS);
  EXPECT_EQ(t.u64("frames-in"), 0u) << "statistics restart with the element";
  EXPECT_EQ(t.u64("frames-out"), 0u);

  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_stream_start("restarted")));
  t.caps(latent_caps(3, 5));
  auto fresh = make_latents(3, 5, 4, 700);
  for (guint64 i = 0; i < 3; ++i) ASSERT_EQ(t.push(latent_buffer(fresh[i], 200 + i)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 0u) << "the first batch after the restart held stale latents";
  ASSERT_EQ(t.push(latent_buffer(fresh[3], 203)), GST_FLOW_OK);
  auto out = t.pull_all();
  expect_frames(out, engine_frames("RGB", 3, 5, fresh, 4, "raw", 200), 200);
  unref_all(out);
  const auto caps = t.out_caps();
  EXPECT_EQ(caps.width, 24);
  EXPECT_EQ(caps.height, 40);
}

// Latents of another model (16 channels, SD3/Flux) refused, naming both counts.
TEST_F(VaeDecodeTest, WrongChannelCountErrorNamesBothCounts) {
  Harness t(make_element(1), true);
  t.caps(latent_caps(kW, kH, "sd3", 16));
  EXPECT_EQ(t.push(latent_buffer(make_latent(kW, kH, 1, 16), 0)), GST_FLOW_NOT_NEGOTIATED);
  const std::string error = bus_text(t.bus, GST_MESSAGE_ERROR);
  EXPECT_NE(error.find("16 channels"), std::string::npos) << error;
  EXPECT_NE(error.find("takes 4"), std::string::npos) << error;
  EXPECT_NE(error.find("taesd_decoder.safetensors"), std::string::npos) << error;
  EXPECT_EQ(t.queued(), 0u);
}

// Frames are packed rows (width x bytes per pixel), which need not be
// GStreamer's default stride (rows padded to 4 bytes): each carries a
// GstVideoMeta saying so, so that downstream maps it right.
TEST_F(VaeDecodeTest, FramesCarryTheirPackedStride) {
  for (auto [format, bpp] : {std::pair<const char*, int>{"RGB", 3}, {"BGRx", 4}}) {
    SCOPED_TRACE(format);
    Harness t(make_element(1));
    t.downstream(std::string("video/x-raw, format=(string)") + format);
    t.caps(latent_caps(kW, kH));
    ASSERT_EQ(t.push(latent_buffer(make_latent(kW, kH, 1), 0)), GST_FLOW_OK);
    auto out = t.pull_all();
    ASSERT_EQ(out.size(), 1u);
    GstVideoMeta* meta = gst_buffer_get_video_meta(out[0]);
    ASSERT_NE(meta, nullptr);
    EXPECT_EQ(meta->width, static_cast<guint>(kW * kUpscale));
    EXPECT_EQ(meta->height, static_cast<guint>(kH * kUpscale));
    EXPECT_EQ(meta->n_planes, 1u);
    EXPECT_EQ(meta->offset[0], 0u);
    EXPECT_EQ(meta->stride[0], kW * kUpscale * bpp);
    EXPECT_EQ(gst_buffer_get_size(out[0]), static_cast<size_t>(meta->stride[0]) * kH * kUpscale);
    unref_all(out);
  }
}

// NaN latents decode (to black) but say so: one warning per stream, naming
// the first such latent.
TEST_F(VaeDecodeTest, NonFiniteLatentsWarnOnce) {
  Harness t(make_element(1), true);
  t.caps(latent_caps(kW, kH));
  Latent bad = make_latent(kW, kH, 1);
  bad[5] = std::nanf("");
  ASSERT_EQ(t.push(latent_buffer(make_latent(kW, kH, 0), 0)), GST_FLOW_OK);
  ASSERT_EQ(t.push(latent_buffer(bad, 1)), GST_FLOW_OK);
  ASSERT_EQ(t.push(latent_buffer(bad, 2)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 3u);
  const std::string warning = bus_text(t.bus, GST_MESSAGE_WARNING);
  EXPECT_NE(warning.find("NaN"), std::string::npos) << warning;
  EXPECT_NE(warning.find("latent 1 "), std::string::npos) << warning;
  EXPECT_EQ(bus_text(t.bus, GST_MESSAGE_WARNING), "") << "warned more than once";
}

// A refused stream posts one error however often upstream offers the caps
// again (a source renegotiating) and pushes on.
TEST_F(VaeDecodeTest, RefusalPostedOnceWhileUpstreamRetries) {
  Harness t(make_element(1), true);
  for (int attempt = 0; attempt < 3; ++attempt) {
    t.caps(latent_caps(kW, kH, "sd3", 16));
    EXPECT_EQ(t.push(latent_buffer(make_latent(kW, kH, attempt, 16), attempt)), GST_FLOW_NOT_NEGOTIATED);
  }
  int errors = 0;
  std::string first;
  while (GstMessage* m = gst_bus_pop_filtered(t.bus, GST_MESSAGE_ERROR)) {
    GError* err = nullptr;
    gchar* debug = nullptr;
    gst_message_parse_error(m, &err, &debug);
    if (errors++ == 0) first = std::string(err->message) + "\n" + (debug ? debug : "");
    g_clear_error(&err);
    g_free(debug);
    gst_message_unref(m);
  }
  EXPECT_EQ(errors, 1) << first;
  EXPECT_NE(first.find("16 channels"), std::string::npos) << first;
}

// Video latents (Wan, TAEHV: one latent per 4 frames) need a temporal
// decoder, which vaedecode does not have yet: refused at caps, saying why.
TEST_F(VaeDecodeTest, VideoLatentsRefusedClearly) {
  Harness t(make_element(1), true);
  t.caps(latent_caps(kW, kH) + ", temporal-downscale=(int)4");
  EXPECT_EQ(t.push(latent_buffer(make_latent(kW, kH, 1), 0)), GST_FLOW_NOT_NEGOTIATED);
  const std::string error = bus_text(t.bus, GST_MESSAGE_ERROR);
  EXPECT_NE(error.find("Video latents need a video decoder"), std::string::npos) << error;
  EXPECT_NE(error.find("temporal-downscale=4"), std::string::npos) << error;
  EXPECT_NE(error.find("taesd_decoder.safetensors"), std::string::npos) << error;
  EXPECT_EQ(t.queued(), 0u);
}

// temporal-downscale=1 is what image latents are (the field is optional).
TEST_F(VaeDecodeTest, TemporalDownscaleOneIsAnImageLatent) {
  Harness t(make_element(1));
  t.caps(latent_caps(kW, kH) + ", temporal-downscale=(int)1");
  EXPECT_EQ(t.push(latent_buffer(make_latent(kW, kH, 1), 0)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 1u);
}

TEST_F(VaeDecodeTest, WrongBufferSizeErrorNamesSizes) {
  Harness t(make_element(1), true);
  t.caps(latent_caps(kW, kH));
  EXPECT_EQ(t.push(gst_buffer_new_allocate(nullptr, 100, nullptr)), GST_FLOW_ERROR);
  const std::string error = bus_text(t.bus, GST_MESSAGE_ERROR);
  EXPECT_NE(error.find("100 bytes"), std::string::npos) << error;
  EXPECT_NE(error.find("4x6x8"), std::string::npos) << error;
  EXPECT_NE(error.find("768 bytes"), std::string::npos) << error;
  EXPECT_EQ(t.queued(), 0u);
}

// One float too many is as wrong as too few.
TEST_F(VaeDecodeTest, OversizedBufferRefused) {
  Harness t(make_element(1), true);
  t.caps(latent_caps(kW, kH));
  Latent too_long = make_latent(kW, kH, 1);
  too_long.push_back(0.5f);
  EXPECT_EQ(t.push(latent_buffer(too_long, 0)), GST_FLOW_ERROR);
  const std::string error = bus_text(t.bus, GST_MESSAGE_ERROR);
  EXPECT_NE(error.find("772 bytes"), std::string::npos) << error;
  EXPECT_EQ(t.queued(), 0u);
}

class VaeDecodeFormatTest : public VaeDecodeTest, public ::testing::WithParamInterface<const char*> {};

// Each output format, asked by downstream, is negotiated and holds the
// engine's bytes for that format (alpha and padding 255).
TEST_P(VaeDecodeFormatTest, FramesEqualEngine) {
  const char* format = GetParam();
  Harness t(make_element(2));
  t.downstream(std::string("video/x-raw, format=(string)") + format);
  t.caps(latent_caps(kW, kH));
  auto lat = make_latents(kW, kH, 4);
  for (guint64 n = 0; n < 4; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  auto out = t.pull_all();
  EXPECT_EQ(t.out_caps().format, format);
  const gstvae::PixelLayout layout = gstvae::pixel_layout(pixel_format(format));
  ASSERT_EQ(out.size(), 4u);
  EXPECT_EQ(gst_buffer_get_size(out[0]), static_cast<size_t>(kW * kUpscale * kH * kUpscale * layout.bytes_per_pixel));
  expect_frames(out, engine_frames(format, kW, kH, lat, 2));
  // The element's bytes against the RGB decode, moved to this format's
  // offsets: the colour channels land where the format says.
  auto rgb = engine_frames("RGB", kW, kH, lat, 2);
  const Pixels got = bytes_of(out[1]);
  const size_t pixels = static_cast<size_t>(kW * kUpscale * kH * kUpscale);
  size_t wrong = 0;
  for (size_t p = 0; p < pixels && p * layout.bytes_per_pixel < got.size(); ++p) {
    const uint8_t* px = &got[p * layout.bytes_per_pixel];
    if (px[layout.r] != rgb[1][3 * p] || px[layout.g] != rgb[1][3 * p + 1] || px[layout.b] != rgb[1][3 * p + 2])
      ++wrong;
    for (int k = 0; k < layout.bytes_per_pixel; ++k)
      if (k != layout.r && k != layout.g && k != layout.b && px[k] != 255) ++wrong;
  }
  EXPECT_EQ(wrong, 0u) << "pixels whose colours or alpha/padding are not where " << format << " puts them";
  EXPECT_NE(bytes_of(out[0]), bytes_of(out[1])) << "different latents gave the same frame";
  unref_all(out);
}

INSTANTIATE_TEST_SUITE_P(Formats, VaeDecodeFormatTest,
                         ::testing::Values("RGB", "BGR", "RGBA", "BGRA", "ARGB", "ABGR", "RGBx", "BGRx", "xRGB",
                                           "xBGR"));

// Every known latent-format is accepted and undone before decoding; an
// unknown one, or none, is refused at the caps.
TEST_F(VaeDecodeTest, ScaledLatentFormatsDecodeAsTheEngine) {
  auto lat = make_latents(kW, kH, 2);
  auto raw = engine_frames("RGB", kW, kH, lat, 2, "raw");
  for (const char* lf : {"sd15", "sdxl", "sd3", "flux"}) {
    SCOPED_TRACE(lf);
    Harness t(make_element(2));
    t.caps(latent_caps(kW, kH, lf));
    for (guint64 n = 0; n < 2; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
    auto out = t.pull_all();
    auto expect = engine_frames("RGB", kW, kH, lat, 2, lf);
    expect_frames(out, expect);
    EXPECT_NE(expect[0], raw[0]) << "the latent format changed nothing";
    unref_all(out);
  }
}

TEST_F(VaeDecodeTest, AcceptCaps) {
  Harness t(make_element(4));
  GstPad* sink = gst_element_get_static_pad(t.element, "sink");
  auto accepts = [&](const std::string& s) {
    GstCaps* caps = gst_caps_from_string(s.c_str());
    EXPECT_NE(caps, nullptr) << s;
    const bool ok = caps && gst_pad_query_accept_caps(sink, caps);
    if (caps) gst_caps_unref(caps);
    return ok;
  };
  for (const char* lf : {"raw", "sd15", "sdxl", "sd3", "flux"}) EXPECT_TRUE(accepts(latent_caps(kW, kH, lf))) << lf;
  EXPECT_FALSE(accepts(latent_caps(kW, kH, "sdxl-turbo"))) << "an unknown latent-format";
  EXPECT_FALSE(accepts(latent_caps(kW, kH, "RAW"))) << "latent-format names are case-sensitive";
  EXPECT_FALSE(accepts("application/x-latent, format=(string)F16, channels=(int)4, width=(int)8, height=(int)6, "
                       "framerate=(fraction)25/1, latent-format=(string)raw"))
      << "only F32 latents";
  EXPECT_FALSE(accepts(latent_caps(0, kH))) << "a zero width";
  EXPECT_FALSE(accepts("video/x-raw, format=(string)RGB, width=(int)64, height=(int)48, framerate=(fraction)25/1"));
  gst_object_unref(sink);
}

// An unknown latent-format pushed anyway: not negotiated, nothing decoded.
TEST_F(VaeDecodeTest, UnknownLatentFormatNotNegotiated) {
  Harness t(make_element(1), true);
  GstCaps* caps = gst_caps_from_string(latent_caps(kW, kH, "sd9").c_str());
  gst_harness_push_event(t.h, gst_event_new_caps(caps));
  gst_caps_unref(caps);
  t.segment();
  EXPECT_EQ(t.push(latent_buffer(make_latent(kW, kH, 1), 0)), GST_FLOW_NOT_NEGOTIATED);
  EXPECT_EQ(t.queued(), 0u);
  EXPECT_EQ(t.u64("frames-out"), 0u);
}

// Downstream that insists on another frame size than latents x 8: refused
// at negotiation, nothing decoded into a wrong-sized buffer.
TEST_F(VaeDecodeTest, DownstreamSizeMismatchNotNegotiated) {
  Harness t(make_element(1), true);
  t.downstream("video/x-raw, width=(int)100, height=(int)48");
  t.caps(latent_caps(kW, kH));
  EXPECT_EQ(t.push(latent_buffer(make_latent(kW, kH, 1), 0)), GST_FLOW_NOT_NEGOTIATED);
  EXPECT_EQ(t.queued(), 0u);
  EXPECT_EQ(t.u64("frames-out"), 0u);
}

// The smallest latent (1 x 1 cell) gives an 8 x 8 frame; odd sizes too.
TEST_F(VaeDecodeTest, OneCellAndOddSizedLatents) {
  for (auto [w, h] : {std::pair<int, int>{1, 1}, {1, 7}, {7, 3}}) {
    SCOPED_TRACE(std::to_string(w) + "x" + std::to_string(h));
    Harness t(make_element(2));
    t.caps(latent_caps(w, h));
    auto lat = make_latents(w, h, 3);
    for (guint64 n = 0; n < 3; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
    ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
    auto out = t.pull_all();
    ASSERT_EQ(out.size(), 3u);
    EXPECT_EQ(gst_buffer_get_size(out[0]), static_cast<size_t>(w * 8 * h * 8 * 3));
    expect_frames(out, engine_frames("RGB", w, h, lat, 2));
    unref_all(out);
    const auto caps = t.out_caps();
    EXPECT_EQ(caps.width, w * 8);
    EXPECT_EQ(caps.height, h * 8);
  }
}

// The largest per-batch with a short stream: everything at EOS, one batch.
TEST_F(VaeDecodeTest, HugePerBatchOutputsAllAtEos) {
  Harness t(make_element(4096));
  t.caps(latent_caps(kW, kH));
  auto lat = make_latents(kW, kH, 5);
  for (guint64 n = 0; n < 5; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 0u);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
  auto out = t.pull_all();
  expect_frames(out, engine_frames("RGB", kW, kH, lat, 4096));
  unref_all(out);
  EXPECT_EQ(t.u64("batches"), 1u);
}

// frames-in counts latents received, frames-in-flight those of batches handed
// over and not yet pushed, frames-out the frames decoded.
TEST_F(VaeDecodeTest, FrameCountersWhileDownstreamHolds) {
  Harness t(make_element(2));
  auto gate = std::make_unique<DownstreamGate>(t.h);
  t.caps(latent_caps(kW, kH));
  EXPECT_EQ(t.u64("frames-in"), 0u);
  EXPECT_EQ(t.u64("frames-out"), 0u);
  auto lat = make_latents(kW, kH, 5);
  for (guint64 n = 0; n < 5; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  ASSERT_TRUE(gate->wait_arrived(1));
  // Batch 1 at the gate, batch 2 decoded behind it, latent 4 staged.
  EXPECT_TRUE(eventually([&] { return t.u64("frames-out") == 4; }));
  EXPECT_EQ(t.u64("frames-in"), 5u);
  EXPECT_EQ(t.u64("frames-in-flight"), 4u) << "latent 4 is staged, not in flight";
  EXPECT_EQ(t.u64("batches"), 2u);
  gate->open();
  EXPECT_TRUE(eventually([&] { return t.u64("frames-in-flight") == 0; }));
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
  gate.reset();
  EXPECT_EQ(t.u64("frames-out"), 5u);
  EXPECT_EQ(t.u64("frames-in"), 5u);
  EXPECT_EQ(t.u64("frames-in-flight"), 0u);
  gdouble fps = 0;
  g_object_get(t.element, "average-fps", &fps, nullptr);
  EXPECT_GT(fps, 0.0);
  auto out = t.pull_all();
  EXPECT_EQ(out.size(), 5u);
  unref_all(out);
}

// Downstream asks for another output format mid-stream (a RECONFIGURE with
// new caps): the latents staged for the batch being gathered are not lost,
// and come out in the new format.
TEST_F(VaeDecodeTest, DownstreamFormatChangeKeepsStagedLatents) {
  Harness t(make_element(4));
  Recorder rec;
  rec.attach(t.element);
  t.downstream("video/x-raw, format=(string)RGB");
  t.caps(latent_caps(kW, kH));
  auto lat = make_latents(kW, kH, 4);
  for (guint64 n = 0; n < 2; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  t.downstream("video/x-raw, format=(string)BGRx");
  ASSERT_TRUE(gst_harness_push_upstream_event(t.h, gst_event_new_reconfigure()));
  for (guint64 n = 2; n < 4; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
  auto out = t.pull_all();
  EXPECT_EQ(t.out_caps().format, "BGRx");
  EXPECT_EQ(t.u64("frames-out"), 4u) << "staged latents were lost at the renegotiation";
  expect_frames(out, engine_frames("BGRx", kW, kH, lat, 4));
  for (const auto& it : rec.take()) {
    if (it.is_buffer) {
      EXPECT_EQ(it.caps_format, "BGRx") << "frame at " << it.pts;
    }
  }
  unref_all(out);
}

// Downstream asks for another output format while decoded frames wait to be
// pushed: those frames go out before the new caps, each frame under caps
// that describe its bytes.
TEST_F(VaeDecodeTest, DownstreamFormatChangeKeepsFramesInFlightUnderTheirCaps) {
  Harness t(make_element(2));
  Recorder rec;
  rec.attach(t.element);
  auto gate = std::make_unique<DownstreamGate>(t.h);
  t.downstream("video/x-raw, format=(string)RGB");
  t.caps(latent_caps(kW, kH));
  auto lat = make_latents(kW, kH, 6);
  for (guint64 n = 0; n < 4; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  ASSERT_TRUE(gate->wait_arrived(1));
  EXPECT_TRUE(eventually([&] { return t.u64("frames-out") == 4; }));  // both batches decoded in RGB
  t.downstream("video/x-raw, format=(string)BGRx");
  ASSERT_TRUE(gst_harness_push_upstream_event(t.h, gst_event_new_reconfigure()));
  std::thread opener([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    gate->open();
  });
  for (guint64 n = 4; n < 6; ++n) ASSERT_EQ(t.push(latent_buffer(lat[n], n)), GST_FLOW_OK);
  opener.join();
  ASSERT_TRUE(gst_harness_push_event(t.h, gst_event_new_eos()));
  auto out = t.pull_all();
  gate.reset();
  ASSERT_EQ(out.size(), 6u);
  size_t mislabelled = 0;
  for (const auto& it : rec.take()) {
    if (!it.is_buffer) continue;
    const size_t bpp = it.caps_format == "RGB" ? 3 : 4;
    if (it.size != static_cast<size_t>(it.caps_width * it.caps_height) * bpp) ++mislabelled;
  }
  EXPECT_EQ(mislabelled, 0u) << "frames pushed under caps of another format";
  auto rgb = engine_frames("RGB", kW, kH, lat, 2);
  auto bgrx = engine_frames("BGRx", kW, kH, lat, 2);
  for (size_t n = 0; n < 4; ++n) EXPECT_EQ(bytes_of(out[n]), rgb[n]) << "frame " << n;
  for (size_t n = 4; n < 6; ++n) EXPECT_EQ(bytes_of(out[n]), bgrx[n]) << "frame " << n;
  unref_all(out);
}

// Good caps, then caps the decoder refuses (16 channels) whose buffers have
// the old byte size: those buffers are not decoded as the old latents.
TEST_F(VaeDecodeTest, RefusedCapsChangeDoesNotDecodeWithTheOldCaps) {
  Harness t(make_element(1), true);
  t.caps(latent_caps(kW, kH));
  ASSERT_EQ(t.push(latent_buffer(make_latent(kW, kH, 1), 0)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 1u);
  t.caps(latent_caps(2, kH, "sd3", 16));  // 16 x 6 x 2 floats: the byte size of 4 x 6 x 8
  EXPECT_NE(t.push(latent_buffer(make_latent(2, kH, 2, 16), 1)), GST_FLOW_OK);
  EXPECT_EQ(t.queued(), 1u) << "a 16-channel latent was decoded as a 4-channel one";
  const std::string error = bus_text(t.bus, GST_MESSAGE_ERROR);
  EXPECT_NE(error.find("16 channels"), std::string::npos) << error;
}

// A latent size whose frame size overflows int: refused at negotiation, not
// decoded into frames of a wrapped-around size.
TEST_F(VaeDecodeTest, LatentSizeBeyondFrameSizeLimitsRefused) {
  Harness t(make_element(1), true);
  GstCaps* huge = gst_caps_from_string(latent_caps(300000000, 1).c_str());
  gst_harness_push_event(t.h, gst_event_new_caps(huge));
  gst_caps_unref(huge);
  t.segment();
  EXPECT_EQ(t.push(latent_buffer(make_latent(1, 1, 1), 0)), GST_FLOW_NOT_NEGOTIATED);
  EXPECT_EQ(t.queued(), 0u);
  EXPECT_EQ(t.u64("frames-out"), 0u);
  EXPECT_NE(bus_text(t.bus, GST_MESSAGE_ERROR), "") << "refused without an error message";
}

}  // namespace
