// GstHarness tests of vaeencode with the LTX-2 video VAE encoder (a random
// checkpoint written by tests/python/ltx2_reference.py at test time): caps
// (temporal-downscale=8, 32x32 cells, latent-format ltx2 by default), the
// latents' times (frame 0 alone, then 8k-7..8k), the dropped tail with its
// warning, values equal to the engine's session whatever per-batch is,
// latent-format=raw, DISCONT starting a new clip.
#include <gst/check/gstharness.h>
#include <gst/gst.h>
#include <gst/video/video.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "encoder.h"
#include "fixtures.h"
#include "harness_util.h"

namespace {

using gstvae::test::floats_of;
using gstvae::test::kFrameDur;
using gstvae::test::TempDir;

constexpr int kW = 96, kH = 64;  // 3 x 2 latent cells
constexpr int kChannels = 8;
constexpr size_t kLatentFloats = size_t(kChannels) * (kH / 32) * (kW / 32);

std::string video_caps(int fps_n = 24) {
  return "video/x-raw, format=(string)RGB, width=(int)" + std::to_string(kW) + ", height=(int)" + std::to_string(kH) +
         ", framerate=(fraction)" + std::to_string(fps_n) + "/1";
}

std::vector<uint8_t> pixels(uint64_t seed) { return gstvae::test::make_frame(kW, kH, 3, kW * 3, seed); }

GstBuffer* frame_buffer(guint64 n, uint64_t seed, bool discont = false) {
  const std::vector<uint8_t> p = pixels(seed);
  GstBuffer* b = gst_buffer_new_allocate(nullptr, p.size(), nullptr);
  gst_buffer_fill(b, 0, p.data(), p.size());
  return gstvae::test::stamp_frame(b, n, discont);
}

double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size() || a.empty()) return INFINITY;
  double diff = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(double(a[i]) - b[i]));
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return scale > 0 ? diff / scale : diff;
}

struct Out {
  GstClockTime pts, duration;
  std::vector<float> values;
};

struct Harness : gstvae::test::Harness {
  explicit Harness(GstElement* e) : gstvae::test::Harness(e, true) {}
  std::vector<Out> pull_all() {
    std::vector<Out> out;
    while (GstBuffer* b = gst_harness_try_pull(h)) {
      out.push_back(Out{GST_BUFFER_PTS(b), GST_BUFFER_DURATION(b), floats_of(b)});
      gst_buffer_unref(b);
    }
    return out;
  }
  std::vector<std::string> warnings() {
    std::vector<std::string> out;
    while (GstMessage* m = gst_bus_pop(bus)) {
      if (GST_MESSAGE_TYPE(m) == GST_MESSAGE_WARNING) {
        GError* err = nullptr;
        gchar* debug = nullptr;
        gst_message_parse_warning(m, &err, &debug);
        out.push_back(std::string(err->message) + "\n" + (debug ? debug : ""));
        g_clear_error(&err);
        g_free(debug);
      }
      gst_message_unref(m);
    }
    return out;
  }
};

class Ltx2ElementTest : public ::testing::Test {
 protected:
  static TempDir* dir_;
  static std::string model_;
  static std::string failure_;

  static void SetUpTestSuite() {
    dir_ = new TempDir();
    model_ = dir_->file("ltx2.safetensors");
    const std::string cmd = std::string(GSTVAE_PYTHON) + " '" GSTVAE_SOURCE_DIR "/tests/python/ltx2_reference.py' " +
                            "--write '" + model_ + "' --width 8 --seed 3 > /dev/null";
    if (std::system(cmd.c_str()) != 0) failure_ = "could not write an LTX-2 checkpoint: " + cmd;
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  void SetUp() override { ASSERT_TRUE(failure_.empty()) << failure_; }

  static GstElement* make_element(guint per_batch, const char* latent_format = nullptr) {
    GstElement* e = gst_element_factory_make("vaeencode", nullptr);
    EXPECT_NE(e, nullptr) << "vaeencode not found: is GST_PLUGIN_PATH set?";
    g_object_set(e, "model", model_.c_str(), "per-batch", per_batch, nullptr);
    if (latent_format) gst_util_set_object_arg(G_OBJECT(e), "latent-format", latent_format);
    return e;
  }

  // The engine's session on frames (seeds seed0 + i), one clip, in one batch.
  static std::vector<std::vector<float>> engine_latents(size_t n, uint64_t seed0, const std::string& format) {
    gstvae::ModelOptions options;
    options.device = "cpu";
    auto enc = gstvae::load_encoder(model_, options);
    auto session = enc->open_session();
    auto batch = enc->new_batch(gstvae::PixelFormat::RGB, kW, kH, n);
    std::vector<std::vector<uint8_t>> frames;
    for (size_t i = 0; i < n; ++i) frames.push_back(pixels(seed0 + i));
    for (size_t i = 0; i < n; ++i) batch->add(frames[i].data(), kW * 3, i);
    gstvae::EncodeParams params;
    params.end_of_clip = true;
    params.latent_format = gstvae::latent_format_by_name(format);
    auto block = enc->new_latents(*batch);
    const gstvae::BatchResult r = session->encode(*batch, params, *block);
    const size_t per = enc->latent_floats_per_frame(*batch);
    std::vector<std::vector<float>> out;
    for (size_t i = 0; i < r.spans.size(); ++i) out.emplace_back(block->data() + i * per, block->data() + (i + 1) * per);
    return out;
  }
};

TempDir* Ltx2ElementTest::dir_ = nullptr;
std::string Ltx2ElementTest::model_;
std::string Ltx2ElementTest::failure_;

TEST_F(Ltx2ElementTest, CapsCarryTheModelsFactsAndTheNormalisedFormat) {
  Harness t(make_element(1));
  t.caps(video_caps(24));
  ASSERT_EQ(t.push(frame_buffer(0, 100, true)), GST_FLOW_OK);
  GstCaps* caps = gst_pad_get_current_caps(t.h->sinkpad);
  ASSERT_NE(caps, nullptr);
  const GstStructure* s = gst_caps_get_structure(caps, 0);
  int td = 0, fps_n = 0, fps_d = 0, channels = 0, width = 0, height = 0;
  EXPECT_TRUE(gst_structure_get_int(s, "temporal-downscale", &td));
  EXPECT_EQ(td, 8);
  EXPECT_TRUE(gst_structure_get_fraction(s, "framerate", &fps_n, &fps_d));
  EXPECT_EQ(fps_n, 3);
  EXPECT_EQ(fps_d, 1);
  gst_structure_get_int(s, "channels", &channels);
  gst_structure_get_int(s, "width", &width);
  gst_structure_get_int(s, "height", &height);
  EXPECT_EQ(channels, kChannels);
  EXPECT_EQ(width, kW / 32);
  EXPECT_EQ(height, kH / 32);
  const char* lf = gst_structure_get_string(s, "latent-format");
  EXPECT_STREQ(lf, "ltx2") << "ComfyUI's LATENT for LTX-2 is normalised";
  gst_caps_unref(caps);
}

// 20 frames: latents from frame 0, 1..8, 9..16 at their times, frames 17..19
// dropped with a warning; the values are the engine's whole-clip ones for
// per-batch 1, 3 and 20.
TEST_F(Ltx2ElementTest, LatentsTimesAndDroppedTailForAnyPerBatch) {
  const auto ref = engine_latents(20, 200, "ltx2");
  ASSERT_EQ(ref.size(), 3u);
  for (guint per_batch : {1u, 3u, 20u}) {
    SCOPED_TRACE("per-batch " + std::to_string(per_batch));
    Harness t(make_element(per_batch));
    t.caps(video_caps(25));
    for (guint64 n = 0; n < 20; ++n) ASSERT_EQ(t.push(frame_buffer(n, 200 + n, n == 0)), GST_FLOW_OK);
    ASSERT_TRUE(t.eos());
    const auto out = t.pull_all();
    ASSERT_EQ(out.size(), 3u);
    const guint64 first[] = {0, 1, 9}, count[] = {1, 8, 8};
    for (size_t k = 0; k < 3; ++k) {
      EXPECT_EQ(out[k].pts, first[k] * kFrameDur) << "latent " << k;
      EXPECT_EQ(out[k].duration, count[k] * kFrameDur) << "latent " << k;
      ASSERT_EQ(out[k].values.size(), kLatentFloats);
      EXPECT_LE(rel_diff(out[k].values, ref[k]), 1e-5) << "latent " << k;
    }
    const auto warnings = t.warnings();
    ASSERT_EQ(warnings.size(), 1u);
    EXPECT_NE(warnings[0].find("17"), std::string::npos) << warnings[0];
  }
}

TEST_F(Ltx2ElementTest, RawFormatOnRequest) {
  const auto raw = engine_latents(9, 300, "raw");
  const auto norm = engine_latents(9, 300, "ltx2");
  ASSERT_EQ(raw.size(), 2u);
  ASSERT_GT(rel_diff(norm[1], raw[1]), 1e-3) << "the file's statistics are not the identity";
  Harness t(make_element(4, "raw"));
  t.caps(video_caps(25));
  for (guint64 n = 0; n < 9; ++n) ASSERT_EQ(t.push(frame_buffer(n, 300 + n, n == 0)), GST_FLOW_OK);
  ASSERT_TRUE(t.eos());
  GstCaps* caps = gst_pad_get_current_caps(t.h->sinkpad);
  ASSERT_NE(caps, nullptr);
  EXPECT_STREQ(gst_structure_get_string(gst_caps_get_structure(caps, 0), "latent-format"), "raw");
  gst_caps_unref(caps);
  const auto out = t.pull_all();
  ASSERT_EQ(out.size(), 2u);
  for (size_t k = 0; k < 2; ++k) EXPECT_LE(rel_diff(out[k].values, raw[k]), 1e-5) << "latent " << k;
}

// A DISCONT frame is a new frame 0: two clips of 9 frames give 2 + 2 latents,
// the second clip's equal to a fresh encode of its frames.
TEST_F(Ltx2ElementTest, DiscontStartsANewClip) {
  const auto ref = engine_latents(9, 400, "ltx2");
  Harness t(make_element(5));
  t.caps(video_caps(25));
  for (guint64 n = 0; n < 9; ++n) ASSERT_EQ(t.push(frame_buffer(n, 500 + n, n == 0)), GST_FLOW_OK);
  for (guint64 n = 0; n < 9; ++n) ASSERT_EQ(t.push(frame_buffer(9 + n, 400 + n, n == 0)), GST_FLOW_OK);
  ASSERT_TRUE(t.eos());
  const auto out = t.pull_all();
  ASSERT_EQ(out.size(), 4u);
  EXPECT_EQ(out[2].pts, 9 * kFrameDur);
  EXPECT_EQ(out[2].duration, kFrameDur);
  for (size_t k = 0; k < 2; ++k) EXPECT_LE(rel_diff(out[2 + k].values, ref[k]), 1e-5) << "latent " << k;
}

}  // namespace
