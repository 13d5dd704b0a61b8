// vaeencode and frames in GStreamer's CUDA memory, as far as they can be
// tested without a GPU: the sink template, which caps are offered for which
// device setting (a test lever, GSTVAE_TEST_PRETEND_CUDA=1, pretends a device
// where a test needs one; it is used only for caps, never for frames),
// negotiation falling back to system memory, the refusal of CUDA caps that
// cannot be read, and the plugin loading and encoding on a machine whose
// libcuda cannot be loaded (this one). Frames in CUDA memory themselves are
// the GPU check's (scripts/gpu-check.sh).
#include <dlfcn.h>
#include <gst/check/gstharness.h>
#include <gst/gst.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "fixtures.h"
#include "harness_util.h"

using namespace gstvae::test;

namespace {

const char* const kFeature = "memory:CUDAMemory";

std::string video(const char* format, int w = 64, int h = 48, bool cuda = false) {
  return std::string("video/x-raw") + (cuda ? "(memory:CUDAMemory)" : "") + ", format=(string)" + format +
         ", width=(int)" + std::to_string(w) + ", height=(int)" + std::to_string(h) +
         ", framerate=(fraction)25/1, interlace-mode=(string)progressive, pixel-aspect-ratio=(fraction)1/1";
}

bool has_cuda_feature(const GstCaps* caps, guint i) {
  GstCapsFeatures* f = gst_caps_get_features(caps, i);
  return f && gst_caps_features_contains(f, kFeature);
}

// Whether any structure of `caps` is in CUDA memory.
bool any_cuda(const GstCaps* caps) {
  for (guint i = 0; i < gst_caps_get_size(caps); ++i)
    if (has_cuda_feature(caps, i)) return true;
  return false;
}

// libcuda cannot be loaded here: the machine these tests are about.
bool no_driver() {
  void* h = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
  if (h) dlclose(h);
  return h == nullptr;
}

class VaeEncodeCuda : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    model_ = dir_->file("vae.safetensors");
    gstvae::test::write_test_vae(model_, VaeSpec{});
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  void TearDown() override { unsetenv("GSTVAE_TEST_PRETEND_CUDA"); }

  static GstElement* make(const char* device) {
    GstElement* e = gst_element_factory_make("vaeencode", nullptr);
    EXPECT_NE(e, nullptr) << "vaeencode not found: is GST_PLUGIN_PATH set to the build's gst folder?";
    g_object_set(e, "model", model_.c_str(), "per-batch", 1u, "device", device, nullptr);
    return e;
  }

  // What the sink pad offers upstream for `filter` (null: everything), in NULL state.
  static GstCaps* sink_caps(const char* device, const char* filter = nullptr) {
    GstElement* e = make(device);
    gst_object_ref_sink(e);
    GstPad* sink = gst_element_get_static_pad(e, "sink");
    GstCaps* f = filter ? gst_caps_from_string(filter) : nullptr;
    GstCaps* caps = gst_pad_query_caps(sink, f);
    if (f) gst_caps_unref(f);
    gst_object_unref(sink);
    gst_object_unref(e);
    return caps;
  }

  static bool accepts(const char* device, const std::string& caps_string) {
    GstElement* e = make(device);
    gst_object_ref_sink(e);
    GstPad* sink = gst_element_get_static_pad(e, "sink");
    GstCaps* caps = gst_caps_from_string(caps_string.c_str());
    const bool ok = gst_pad_query_accept_caps(sink, caps);
    gst_caps_unref(caps);
    gst_object_unref(sink);
    gst_object_unref(e);
    return ok;
  }

  static TempDir* dir_;
  static std::string model_;
};
TempDir* VaeEncodeCuda::dir_ = nullptr;
std::string VaeEncodeCuda::model_;

}  // namespace

TEST_F(VaeEncodeCuda, SinkTemplateHasCudaMemoryFirst) {
  GstElementFactory* factory = gst_element_factory_find("vaeencode");
  ASSERT_NE(factory, nullptr);
  GstCaps* tmpl = nullptr;
  for (const GList* l = gst_element_factory_get_static_pad_templates(factory); l; l = l->next) {
    auto* t = static_cast<GstStaticPadTemplate*>(l->data);
    if (t->direction == GST_PAD_SINK) tmpl = gst_static_pad_template_get_caps(t);
  }
  gst_object_unref(factory);
  ASSERT_NE(tmpl, nullptr);
#if GSTVAE_HAVE_GST_CUDA
  ASSERT_EQ(gst_caps_get_size(tmpl), 2u) << gst_caps_to_string(tmpl);
  EXPECT_TRUE(has_cuda_feature(tmpl, 0));
  EXPECT_FALSE(has_cuda_feature(tmpl, 1));
  // cudaconvert's RGB family, planar ones included, in CUDA memory only.
  for (const char* f : {"RGBA", "RGBx", "BGRA", "BGRx", "RGBP", "BGRP"}) {
    GstCaps* c = gst_caps_from_string(video(f, 64, 48, true).c_str());
    EXPECT_TRUE(gst_caps_can_intersect(c, tmpl)) << f;
    gst_caps_unref(c);
  }
  for (const char* f : {"RGBP", "BGRP"}) {
    GstCaps* c = gst_caps_from_string(video(f).c_str());
    EXPECT_FALSE(gst_caps_can_intersect(c, tmpl)) << f << " in system memory";
    gst_caps_unref(c);
  }
#else
  EXPECT_FALSE(any_cuda(tmpl)) << "built without libgstcuda";
#endif
  gst_caps_unref(tmpl);
}

TEST_F(VaeEncodeCuda, NotOfferedWithoutADriverNegotiatesSystemMemory) {
  if (!no_driver()) GTEST_SKIP() << "libcuda loads here: this test is for machines without a CUDA driver";
  for (const char* device : {"auto", "cpu", "cuda"}) {
    SCOPED_TRACE(device);
    GstCaps* caps = sink_caps(device);
    EXPECT_FALSE(any_cuda(caps)) << gst_caps_to_string(caps);
    EXPECT_FALSE(gst_caps_is_empty(caps));
    gst_caps_unref(caps);
    // (Accept-caps follows the template, as for every caps of this element:
    // CUDA caps forced on it are refused when they arrive, saying why, see
    // CudaCapsThatCannotBeReadAreRefusedSayingWhy.)
    EXPECT_TRUE(accepts(device, video("RGBA")));
  }
  // An upstream that could give either (cudaconvert after cudaupload, say)
  // is left only system memory.
  GstCaps* both = sink_caps("auto", (video("RGBA", 64, 48, true) + "; " + video("RGBA")).c_str());
  ASSERT_EQ(gst_caps_get_size(both), 1u) << gst_caps_to_string(both);
  EXPECT_FALSE(has_cuda_feature(both, 0));
  gst_caps_unref(both);
}

TEST_F(VaeEncodeCuda, PluginLoadsAndEncodesWithoutLibcuda) {
  if (!no_driver()) GTEST_SKIP() << "libcuda loads here: this test is for machines without a CUDA driver";
  // The plugin file itself loads (it links neither libcuda nor libgstcuda)...
  GstPlugin* plugin = gst_registry_find_plugin(gst_registry_get(), "vae");
  ASSERT_NE(plugin, nullptr);
  const std::string file = gst_plugin_get_filename(plugin);
  gst_object_unref(plugin);
  GError* error = nullptr;
  GstPlugin* loaded = gst_plugin_load_file(file.c_str(), &error);
  ASSERT_NE(loaded, nullptr) << (error ? error->message : "");
  gst_object_unref(loaded);
  // ...and encodes system-memory frames with device=auto, the CUDA caps
  // not having been offered.
  Harness t(make("auto"));
  t.caps(video("RGBA", 16, 16));
  GstBuffer* b = gst_buffer_new_allocate(nullptr, 16 * 16 * 4, nullptr);
  gst_buffer_memset(b, 0, 100, 16 * 16 * 4);
  ASSERT_EQ(t.push(stamp_frame(b, 0)), GST_FLOW_OK);
  auto out = t.pull_all();
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(gst_buffer_get_size(out[0]), 4u * 2 * 2 * sizeof(float));
  unref_all(out);
  // libcuda was not loaded behind our back either.
  EXPECT_TRUE(no_driver());
}

TEST_F(VaeEncodeCuda, OfferedFirstOnlyWhenRunningOnCuda) {
#if !GSTVAE_HAVE_GST_CUDA
  GTEST_SKIP() << "built without libgstcuda";
#endif
  setenv("GSTVAE_TEST_PRETEND_CUDA", "1", 1);
  for (const char* device : {"auto", "cuda", "cuda:0"}) {
    SCOPED_TRACE(device);
    GstCaps* caps = sink_caps(device);
    ASSERT_GT(gst_caps_get_size(caps), 1u);
    EXPECT_TRUE(has_cuda_feature(caps, 0)) << "CUDA memory comes first: " << gst_caps_to_string(caps);
    EXPECT_FALSE(has_cuda_feature(caps, gst_caps_get_size(caps) - 1)) << "system memory stays as the fallback";
    gst_caps_unref(caps);
    EXPECT_TRUE(accepts(device, video("RGBA", 64, 48, true)));
    EXPECT_TRUE(accepts(device, video("BGRP", 64, 48, true)));
    EXPECT_FALSE(accepts(device, video("BGRP"))) << "planar only in CUDA memory";
    EXPECT_FALSE(accepts(device, video("I420", 64, 48, true)));
    EXPECT_TRUE(accepts(device, video("RGBA")));
    // Upstream offering both (cudaconvert: CUDA memory first): both stay, in its order.
    GstCaps* both = sink_caps(device, (video("RGBA", 64, 48, true) + "; " + video("RGBA")).c_str());
    ASSERT_EQ(gst_caps_get_size(both), 2u) << gst_caps_to_string(both);
    EXPECT_TRUE(has_cuda_feature(both, 0));
    EXPECT_FALSE(has_cuda_feature(both, 1));
    gst_caps_unref(both);
  }
  // device=cpu never offers them, device present or not: upstream is left system memory.
  GstCaps* cpu = sink_caps("cpu");
  EXPECT_FALSE(any_cuda(cpu)) << gst_caps_to_string(cpu);
  gst_caps_unref(cpu);
  GstCaps* cpu_both = sink_caps("cpu", (video("RGBA", 64, 48, true) + "; " + video("RGBA")).c_str());
  ASSERT_EQ(gst_caps_get_size(cpu_both), 1u) << gst_caps_to_string(cpu_both);
  EXPECT_FALSE(has_cuda_feature(cpu_both, 0));
  gst_caps_unref(cpu_both);
  // The output is latents in system memory whatever the input's memory.
  GstElement* e = make("auto");
  gst_object_ref_sink(e);
  GstPad* src = gst_element_get_static_pad(e, "src");
  GstCaps* out = gst_pad_query_caps(src, nullptr);
  EXPECT_FALSE(any_cuda(out)) << gst_caps_to_string(out);
  gst_caps_unref(out);
  gst_object_unref(src);
  gst_object_unref(e);
}

TEST_F(VaeEncodeCuda, CudaCapsThatCannotBeReadAreRefusedSayingWhy) {
#if !GSTVAE_HAVE_GST_CUDA
  GTEST_SKIP() << "built without libgstcuda";
#endif
  // Pretended at the caps level, the model still loads on the CPU
  // (device=cpu, or auto without a device): a stream in CUDA memory forced
  // on it is refused when its caps arrive, with the reason.
  setenv("GSTVAE_TEST_PRETEND_CUDA", "1", 1);
  for (const char* device : {"cpu", "auto"}) {
    SCOPED_TRACE(device);
    if (std::string(device) == "auto" && !no_driver()) continue;  // a real device would take them
    Harness t(make(device), /*with_bus=*/true);
    gst_harness_set_src_caps_str(t.h, video("RGBA", 64, 48, true).c_str());
    GstBuffer* b = gst_buffer_new_allocate(nullptr, 64 * 48 * 4, nullptr);
    EXPECT_NE(t.push(stamp_frame(b, 0)), GST_FLOW_OK);
    const std::string errors = bus_text(t.bus, GST_MESSAGE_ERROR);
    EXPECT_NE(errors.find("Frames in CUDA memory cannot be encoded here"), std::string::npos) << errors;
    EXPECT_NE(errors.find("runs on cpu"), std::string::npos) << errors;
  }
}

TEST_F(VaeEncodeCuda, NoContextOrPoolIsMadeUpWithoutADevice) {
  if (!no_driver()) GTEST_SKIP() << "a real device answers with its primary context";
  // Even with CUDA memory pretended for caps, the context and the pool need
  // the driver: upstream's gst.cuda.context query stays unanswered (it then
  // makes its own), and the allocation query gets no CUDA pool.
  setenv("GSTVAE_TEST_PRETEND_CUDA", "1", 1);
  GstElement* e = make("auto");
  gst_object_ref_sink(e);
  ASSERT_EQ(gst_element_set_state(e, GST_STATE_READY), GST_STATE_CHANGE_SUCCESS);
  GstPad* sink = gst_element_get_static_pad(e, "sink");
  GstQuery* q = gst_query_new_context("gst.cuda.context");
  EXPECT_FALSE(gst_pad_query(sink, q));
  GstContext* answered = nullptr;
  gst_query_parse_context(q, &answered);
  EXPECT_EQ(answered, nullptr);
  gst_query_unref(q);
  // A context of another type passes through set_context untouched.
  GstContext* other = gst_context_new("gst.other.context", TRUE);
  gst_element_set_context(e, other);
  GstContext* kept = gst_element_get_context(e, "gst.other.context");
  EXPECT_NE(kept, nullptr);
  if (kept) gst_context_unref(kept);
  gst_context_unref(other);
  GstCaps* caps = gst_caps_from_string(video("RGBA", 64, 48, true).c_str());
  GstQuery* alloc = gst_query_new_allocation(caps, TRUE);
  gst_pad_query(sink, alloc);
  EXPECT_EQ(gst_query_get_n_allocation_pools(alloc), 0u);
  gst_query_unref(alloc);
  gst_caps_unref(caps);
  gst_object_unref(sink);
  gst_element_set_state(e, GST_STATE_NULL);
  gst_object_unref(e);
}
