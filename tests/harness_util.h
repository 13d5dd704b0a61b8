// Helpers shared by the GstHarness tests of vaeencode and vaedecode
// (test_vaeencode.cpp, test_vaeencode_video.cpp, test_vaedecode.cpp,
// test_vaedecode_video.cpp):
// gst_init for the whole executable, latent caps and buffers, reading
// buffers back, bus texts, and a harness owning a configured element.
// Header-only (inline), so an executable need not link anything more.
#pragma once

#include <gst/check/gstharness.h>
#include <gst/gst.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace gstvae::test {

constexpr GstClockTime kFrameDur = GST_SECOND / 25;  // 40 ms at 25/1

// gst_init once per executable that includes this header.
class GstEnvironment : public ::testing::Environment {
 public:
  void SetUp() override { gst_init(nullptr, nullptr); }
};
inline ::testing::Environment* const gst_env = ::testing::AddGlobalTestEnvironment(new GstEnvironment);

using Latent = std::vector<float>;
using Pixels = std::vector<uint8_t>;

// Caps of F32 latents, `channels` x h x w (4: TAESD's), at fps_n/fps_d.
inline std::string latent_caps(int w, int h, const char* latent_format = "raw", int channels = 4, int fps_n = 25,
                               int fps_d = 1) {
  return "application/x-latent, format=(string)F32, channels=(int)" + std::to_string(channels) + ", width=(int)" +
         std::to_string(w) + ", height=(int)" + std::to_string(h) + ", framerate=(fraction)" + std::to_string(fps_n) +
         "/" + std::to_string(fps_d) + ", latent-format=(string)" + latent_format;
}

// A deterministic latent of C x h x w values in about [-2, 2]: different
// seeds give visibly different frames.
inline Latent make_latent(int w, int h, uint64_t seed, int channels = 4) {
  Latent v(static_cast<size_t>(channels) * w * h);
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 12345;
  for (float& f : v) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    f = static_cast<float>((x >> 40) & 0xFFFF) / 16384.0f - 2.0f;
  }
  return v;
}

inline std::vector<Latent> make_latents(int w, int h, size_t n, uint64_t seed0 = 100, int channels = 4) {
  std::vector<Latent> out;
  for (size_t i = 0; i < n; ++i) out.push_back(make_latent(w, h, seed0 + i, channels));
  return out;
}

// Gives `b` the timestamps and offsets of frame number `n` at 25/1; returns it.
inline GstBuffer* stamp_frame(GstBuffer* b, guint64 n, bool discont = false) {
  GST_BUFFER_PTS(b) = n * kFrameDur;
  GST_BUFFER_DTS(b) = n * kFrameDur;
  GST_BUFFER_DURATION(b) = kFrameDur;
  GST_BUFFER_OFFSET(b) = n;
  GST_BUFFER_OFFSET_END(b) = n + 1;
  if (discont) GST_BUFFER_FLAG_SET(b, GST_BUFFER_FLAG_DISCONT);
  return b;
}

// A buffer of `latent` with the timestamps of frame number `n` at 25/1.
inline GstBuffer* latent_buffer(const Latent& latent, guint64 n, bool discont = false) {
  GstBuffer* b = gst_buffer_new_allocate(nullptr, latent.size() * sizeof(float), nullptr);
  gst_buffer_fill(b, 0, latent.data(), latent.size() * sizeof(float));
  return stamp_frame(b, n, discont);
}

inline std::vector<float> floats_of(GstBuffer* b) {
  std::vector<float> v(gst_buffer_get_size(b) / sizeof(float));
  gst_buffer_extract(b, 0, v.data(), v.size() * sizeof(float));
  return v;
}

inline Pixels bytes_of(GstBuffer* b) {
  Pixels v(gst_buffer_get_size(b));
  gst_buffer_extract(b, 0, v.data(), v.size());
  return v;
}

// Counts differing bytes for a readable failure message.
inline std::string diff_summary(const Pixels& a, const Pixels& b) {
  if (a.size() != b.size()) return "sizes " + std::to_string(a.size()) + " vs " + std::to_string(b.size());
  size_t n = 0;
  int worst = 0;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) {
      ++n;
      worst = std::max(worst, std::abs(int(a[i]) - int(b[i])));
    }
  return std::to_string(n) + " of " + std::to_string(a.size()) + " bytes differ, max |diff| " + std::to_string(worst);
}

// The first ERROR or WARNING on `bus`: its message and debug text, or "".
inline std::string bus_text(GstBus* bus, GstMessageType type) {
  GstMessage* m = gst_bus_pop_filtered(bus, type);
  if (!m) return "";
  GError* err = nullptr;
  gchar* debug = nullptr;
  if (type == GST_MESSAGE_ERROR)
    gst_message_parse_error(m, &err, &debug);
  else
    gst_message_parse_warning(m, &err, &debug);
  std::string text = std::string(err ? err->message : "") + "\n" + (debug ? debug : "");
  g_clear_error(&err);
  g_free(debug);
  gst_message_unref(m);
  return text;
}

inline std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& x : v) s += x + "\n----\n";
  return s;
}

inline std::string time_string(GstClockTime t) {
  gchar* s = g_strdup_printf("%" GST_TIME_FORMAT, GST_TIME_ARGS(t));
  std::string out(s);
  g_free(s);
  return out;
}

// Polls `ready` until it holds or 60 s have passed; returns its last value.
inline bool eventually(const std::function<bool()>& ready) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!ready() && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  return ready();
}

// Owns a harness around a configured vaeencode or vaedecode, and optionally
// a bus.
struct Harness {
  GstHarness* h = nullptr;
  GstElement* element = nullptr;  // owned by the harness
  GstBus* bus = nullptr;

  explicit Harness(GstElement* e, bool with_bus = false) {
    if (with_bus) {
      bus = gst_bus_new();
      gst_element_set_bus(e, bus);
    }
    h = gst_harness_new_with_element(e, "sink", "src");  // takes its own ref, starts PLAYING
    element = h->element;
    gst_object_unref(e);
    // The batch timer waits on the element's clock: real time for these
    // tests (the harness's GstTestClock only where a test asks for it).
    gst_harness_use_systemclock(h);
  }
  ~Harness() {
    gst_harness_teardown(h);
    if (bus) {
      gst_bus_set_flushing(bus, TRUE);
      gst_object_unref(bus);
    }
  }
  Harness(const Harness&) = delete;
  Harness& operator=(const Harness&) = delete;

  void caps(const std::string& s) { gst_harness_set_src_caps_str(h, s.c_str()); }
  // Downstream's caps (before the input caps): the output format it takes.
  void downstream(const std::string& s) { gst_harness_set_sink_caps_str(h, s.c_str()); }
  GstFlowReturn push(GstBuffer* b) { return gst_harness_push(h, b); }
  bool eos() { return gst_harness_push_event(h, gst_event_new_eos()); }
  guint queued() {
    settle();
    return gst_harness_buffers_in_queue(h);
  }

  bool segment(GstClockTime base = 0) {
    GstSegment seg;
    gst_segment_init(&seg, GST_FORMAT_TIME);
    seg.base = base;
    return gst_harness_push_event(h, gst_event_new_segment(&seg));
  }

  // Waits until the work thread has pushed the frames of every batch handed
  // to it (the batch being gathered stays), at most 60 s.
  void settle() {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (u64("frames-in-flight") != 0) {
      ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "the work thread did not finish";
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }

  std::vector<GstBuffer*> pull_all() {
    settle();
    std::vector<GstBuffer*> out;
    while (GstBuffer* b = gst_harness_try_pull(h)) out.push_back(b);
    return out;
  }

  std::vector<GstEventType> pull_event_types() {
    std::vector<GstEventType> out;
    while (GstEvent* e = gst_harness_try_pull_event(h)) {
      out.push_back(GST_EVENT_TYPE(e));
      gst_event_unref(e);
    }
    return out;
  }

  std::vector<GstStructure*> element_messages(const char* name) {
    std::vector<GstStructure*> out;
    while (GstMessage* m = gst_bus_pop_filtered(bus, GST_MESSAGE_ELEMENT)) {
      const GstStructure* s = gst_message_get_structure(m);
      if (s && gst_structure_has_name(s, name)) out.push_back(gst_structure_copy(s));
      gst_message_unref(m);
    }
    return out;
  }

  guint64 u64(const char* prop) {
    guint64 v = 0;
    g_object_get(element, prop, &v, nullptr);
    return v;
  }

  // The element's current output caps: format, width, height, framerate.
  struct OutCaps {
    std::string format;
    int width = 0, height = 0, fps_n = 0, fps_d = 0;
  };
  OutCaps out_caps() {
    OutCaps c;
    GstCaps* caps = gst_pad_get_current_caps(h->sinkpad);
    if (!caps) return c;
    const GstStructure* s = gst_caps_get_structure(caps, 0);
    if (const char* f = gst_structure_get_string(s, "format")) c.format = f;
    gst_structure_get_int(s, "width", &c.width);
    gst_structure_get_int(s, "height", &c.height);
    gst_structure_get_fraction(s, "framerate", &c.fps_n, &c.fps_d);
    gst_caps_unref(caps);
    return c;
  }
};

inline void unref_all(std::vector<GstBuffer*>& bufs) {
  for (GstBuffer* b : bufs) gst_buffer_unref(b);
  bufs.clear();
}

}  // namespace gstvae::test
