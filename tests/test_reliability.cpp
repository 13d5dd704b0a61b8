// Reliability of vaeencode in a process: four pipelines sharing one copy of the
// weights (memory measured), state cycles with frames mid-batch (no stale
// frame after a restart or a flush, no error, no leak), and a soak of many
// frames (frames in == latents out, flat RSS).
//
// The engine is a static library linked both into this test (for reference
// latents) and into the plugin: the two have separate encoder caches. The
// plugin's cache is the one the pipelines use; it is read through its C
// accessor, gstvae_cached_encoder_count, looked up in the plugin module.
//
// Environment: GSTVAE_SOAK_FRAMES (default 10000) sets the soak length;
// GSTVAE_STATE_CYCLES (default 100) the number of state cycles.
#include <dlfcn.h>
#include <malloc.h>

#include <gst/check/gstharness.h>
#include <gst/gst.h>
#include <gst/video/video.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "encoder.h"
#include "fixtures.h"
#include "model_cache.h"

namespace {

using gstvae::test::TempDir;
using gstvae::test::VaeSpec;
using Clock = std::chrono::steady_clock;

constexpr GstClockTime kFrameDur = GST_SECOND / 25;

/* ---------------------------------------------------------------- process */

// GLib warnings and criticals (from GStreamer or the element) counted over
// the whole run: a test checks that its own part added none.
std::mutex g_log_mutex;
int g_log_problems = 0;
std::string g_last_log_problem;

void count_log(const gchar* domain, GLogLevelFlags level, const gchar* message, gpointer) {
  if (level & (G_LOG_LEVEL_WARNING | G_LOG_LEVEL_CRITICAL | G_LOG_LEVEL_ERROR)) {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    ++g_log_problems;
    g_last_log_problem = std::string(domain ? domain : "") + ": " + (message ? message : "");
  }
  g_log_default_handler(domain, level, message, nullptr);
}

int log_problems() {
  std::lock_guard<std::mutex> lock(g_log_mutex);
  return g_log_problems;
}

class GstEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    gst_init(nullptr, nullptr);
    g_log_set_default_handler(count_log, nullptr);
  }
};
::testing::Environment* const gst_env = ::testing::AddGlobalTestEnvironment(new GstEnvironment);

// VmRSS of this process, in KiB.
long rss_kib() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::strtol(line.c_str() + 6, nullptr, 10);
  return -1;
}

// RSS after handing freed heap memory back to the kernel, so that what a
// previous step freed does not hide (or inflate) what the next one costs.
long trimmed_rss_kib() {
  malloc_trim(0);
  return rss_kib();
}

double mib(long kib) { return kib / 1024.0; }

long env_long(const char* name, long fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  return (end && *end == '\0' && n > 0) ? n : fallback;
}

// The encoder count of the plugin's cache (not this executable's copy).
size_t plugin_cache_count() {
  static size_t (*fn)(void) = [] {
    GstPlugin* plugin = gst_plugin_load_by_name("vae");
    if (!plugin) throw std::runtime_error("the 'vae' plugin is not found: is GST_PLUGIN_PATH set?");
    const std::string file = gst_plugin_get_filename(plugin);
    gst_object_unref(plugin);
    void* module = dlopen(file.c_str(), RTLD_NOW | RTLD_NOLOAD);
    if (!module) throw std::runtime_error("the plugin '" + file + "' is not loaded: " + dlerror());
    auto f = reinterpret_cast<size_t (*)(void)>(dlsym(module, "gstvae_cached_encoder_count"));
    if (!f) throw std::runtime_error("the plugin '" + file + "' lacks gstvae_cached_encoder_count");
    return f;
  }();
  return fn();
}

/* ----------------------------------------------------------------- frames */

std::string rgb_caps(int w, int h) {
  return "video/x-raw,format=RGB,width=" + std::to_string(w) + ",height=" + std::to_string(h) + ",framerate=25/1";
}

// Packed RGB with a row stride of w * 3 (GStreamer's for widths where that is a multiple of 4).
std::vector<uint8_t> rgb_pixels(int w, int h, uint64_t seed) {
  if ((w * 3) % 4 != 0) throw std::invalid_argument("rgb_pixels: w * 3 must be a multiple of 4");
  return gstvae::test::make_frame(w, h, 3, static_cast<size_t>(w) * 3, seed);
}

GstBuffer* frame_buffer(const std::vector<uint8_t>& pixels, guint64 n) {
  GstBuffer* b = gst_buffer_new_allocate(nullptr, pixels.size(), nullptr);
  gst_buffer_fill(b, 0, pixels.data(), pixels.size());
  GST_BUFFER_PTS(b) = n * kFrameDur;
  GST_BUFFER_DTS(b) = n * kFrameDur;
  GST_BUFFER_DURATION(b) = kFrameDur;
  GST_BUFFER_OFFSET(b) = n;
  GST_BUFFER_OFFSET_END(b) = n + 1;
  return b;
}

std::vector<float> floats_of(GstBuffer* b) {
  std::vector<float> v(gst_buffer_get_size(b) / sizeof(float));
  gst_buffer_extract(b, 0, v.data(), v.size() * sizeof(float));
  return v;
}

// The engine's latents of `frames` encoded as one batch, split per frame.
std::vector<std::vector<float>> engine_latents(gstvae::Encoder& enc, int w, int h,
                                               const std::vector<std::vector<uint8_t>>& frames) {
  auto batch = enc.new_batch(gstvae::PixelFormat::RGB, w, h, frames.size());
  for (size_t i = 0; i < frames.size(); ++i) batch->add(frames[i].data(), static_cast<size_t>(w) * 3, i);
  const size_t per = enc.latent_floats_per_frame(*batch);
  std::vector<float> all(per * frames.size());
  enc.encode(*batch, gstvae::EncodeParams{}, all.data());
  std::vector<std::vector<float>> out;
  for (size_t i = 0; i < frames.size(); ++i) out.emplace_back(all.begin() + i * per, all.begin() + (i + 1) * per);
  return out;
}

bool close_to(const std::vector<float>& a, const std::vector<float>& b, double tol = 1e-4) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (!(std::fabs(a[i] - b[i]) <= tol * std::max(1.0, static_cast<double>(std::fabs(b[i]))))) return false;
  return true;
}

VaeSpec small_spec() {
  VaeSpec s;
  s.ch = 32;
  s.mult = {1, 1, 2, 2};
  s.blocks = 1;
  s.include_decoder = false;
  return s;
}

gstvae::ModelOptions cpu() {
  gstvae::ModelOptions o;
  o.device = "cpu";
  return o;
}

/* --------------------------------------------------------------- pipeline */

// Latents arriving at a fakesink (handoff signal), with their data.
struct Sink {
  struct Latent {
    GstClockTime pts;
    std::vector<float> data;
  };
  std::mutex mutex;
  std::condition_variable cond;
  std::vector<Latent> latents;

  static void on_handoff(GstElement*, GstBuffer* b, GstPad*, gpointer self_ptr) {
    auto* self = static_cast<Sink*>(self_ptr);
    Latent l{GST_BUFFER_PTS(b), floats_of(b)};
    std::lock_guard<std::mutex> lock(self->mutex);
    self->latents.push_back(std::move(l));
    self->cond.notify_all();
  }
  bool wait_for(size_t n, std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mutex);
    return cond.wait_for(lock, timeout, [&] { return latents.size() >= n; });
  }
  std::vector<Latent> take() {
    std::lock_guard<std::mutex> lock(mutex);
    std::vector<Latent> out;
    out.swap(latents);
    return out;
  }
};

// appsrc ! vaeencode ! fakesink, driven through appsrc's action signals.
struct Pipeline {
  GstElement* pipeline = nullptr;
  GstElement* src = nullptr;
  GstElement* enc = nullptr;
  GstElement* sink = nullptr;
  Sink received;

  Pipeline(const std::string& model, guint per_batch, int w, int h, bool live, guint threads = 0) {
    const std::string desc = std::string("appsrc name=src format=time is-live=") + (live ? "true" : "false") +
                             " caps=\"" + rgb_caps(w, h) +
                             "\" ! vaeencode name=enc device=cpu ! "
                             "fakesink name=sink sync=false signal-handoffs=true" +
                             (live ? " async=false" : "");
    GError* err = nullptr;
    pipeline = gst_parse_launch(desc.c_str(), &err);
    if (!pipeline) throw std::runtime_error(std::string("gst_parse_launch: ") + (err ? err->message : "?"));
    src = gst_bin_get_by_name(GST_BIN(pipeline), "src");
    enc = gst_bin_get_by_name(GST_BIN(pipeline), "enc");
    sink = gst_bin_get_by_name(GST_BIN(pipeline), "sink");
    g_object_set(enc, "model", model.c_str(), "per-batch", per_batch, "threads", threads, nullptr);
    g_signal_connect(sink, "handoff", G_CALLBACK(Sink::on_handoff), &received);
  }
  ~Pipeline() {
    gst_element_set_state(pipeline, GST_STATE_NULL);
    gst_object_unref(src);
    gst_object_unref(enc);
    gst_object_unref(sink);
    gst_object_unref(pipeline);
  }
  Pipeline(const Pipeline&) = delete;
  Pipeline& operator=(const Pipeline&) = delete;

  // Sets the state and waits for it; false on failure.
  bool set_state(GstState state) {
    if (gst_element_set_state(pipeline, state) == GST_STATE_CHANGE_FAILURE) return false;
    GstState current = GST_STATE_VOID_PENDING;
    const GstStateChangeReturn r = gst_element_get_state(pipeline, &current, nullptr, 10 * GST_SECOND);
    return r != GST_STATE_CHANGE_FAILURE && r != GST_STATE_CHANGE_ASYNC && current == state;
  }
  GstFlowReturn push(const std::vector<uint8_t>& pixels, guint64 n) {
    GstBuffer* b = frame_buffer(pixels, n);
    GstFlowReturn ret = GST_FLOW_ERROR;
    g_signal_emit_by_name(src, "push-buffer", b, &ret);
    gst_buffer_unref(b);
    return ret;
  }
  void end_of_stream() {
    GstFlowReturn ret;
    g_signal_emit_by_name(src, "end-of-stream", &ret);
  }
  guint64 frames_in() {
    guint64 v = 0;
    g_object_get(enc, "frames-in", &v, nullptr);
    return v;
  }
  bool wait_frames_in(guint64 n, std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
    const auto deadline = Clock::now() + timeout;
    while (frames_in() < n) {
      if (Clock::now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    return frames_in() == n;
  }
  // "ERROR: text" / "WARNING: text" for each such message on the bus.
  std::vector<std::string> bus_problems() {
    std::vector<std::string> out;
    GstBus* bus = gst_element_get_bus(pipeline);
    while (GstMessage* m = gst_bus_pop_filtered(bus, static_cast<GstMessageType>(GST_MESSAGE_ERROR |
                                                                                   GST_MESSAGE_WARNING))) {
      GError* err = nullptr;
      gchar* debug = nullptr;
      const bool error = GST_MESSAGE_TYPE(m) == GST_MESSAGE_ERROR;
      if (error)
        gst_message_parse_error(m, &err, &debug);
      else
        gst_message_parse_warning(m, &err, &debug);
      out.push_back(std::string(error ? "ERROR: " : "WARNING: ") + (err ? err->message : "") + " (" +
                    (debug ? debug : "") + ")");
      g_clear_error(&err);
      g_free(debug);
      gst_message_unref(m);
    }
    gst_object_unref(bus);
    return out;
  }
  // Waits for EOS (true) or an error (false).
  bool wait_eos(GstClockTime timeout = 120 * GST_SECOND) {
    GstBus* bus = gst_element_get_bus(pipeline);
    GstMessage* m = gst_bus_timed_pop_filtered(bus, timeout,
                                               static_cast<GstMessageType>(GST_MESSAGE_EOS | GST_MESSAGE_ERROR));
    gst_object_unref(bus);
    const bool eos = m && GST_MESSAGE_TYPE(m) == GST_MESSAGE_EOS;
    if (m && !eos) {
      GError* err = nullptr;
      gchar* debug = nullptr;
      gst_message_parse_error(m, &err, &debug);
      ADD_FAILURE() << "pipeline error: " << (err ? err->message : "?") << " (" << (debug ? debug : "") << ")";
      g_clear_error(&err);
      g_free(debug);
    }
    if (m) gst_message_unref(m);
    return eos;
  }
};

class Reliability : public ::testing::Test {
 protected:
  void SetUp() override {
    GstElementFactory* f = gst_element_factory_find("vaeencode");
    ASSERT_NE(f, nullptr) << "vaeencode not found: is GST_PLUGIN_PATH set to the build's gst folder?";
    gst_object_unref(f);
    ASSERT_NO_THROW(plugin_cache_count());
  }
};

/* ---------------------------------------------------------- shared weights */

// Runs `models.size()` pipelines at once, one thread each, on 64x64 frames.
// RSS is sampled before, once every pipeline has started (encoder loaded: the
// weights alone) and once every pipeline has reached EOS (weights plus what
// encoding left: activations in allocator caches, kernels); the pipelines
// still hold their encoders at both points.
struct SharedRun {
  long rss_before_kib = 0, rss_loaded_kib = 0, rss_encoded_kib = 0;
  size_t cache_count_loaded = 0, cache_count_encoded = 0;
  std::vector<std::vector<Sink::Latent>> latents;
};

SharedRun run_concurrent_pipelines(const std::vector<std::string>& models,
                                   const std::vector<std::vector<std::vector<uint8_t>>>& inputs, guint per_batch) {
  SharedRun run;
  std::vector<std::unique_ptr<Pipeline>> pipes;
  // One intra-op thread each: four pipelines already keep the cores busy, and
  // OpenMP teams of 2 per pipeline on 2 cores would spin against each other.
  for (const auto& m : models) pipes.push_back(std::make_unique<Pipeline>(m, per_batch, 64, 64, false, 1));
  run.rss_before_kib = trimmed_rss_kib();
  auto in_parallel = [&](auto&& body) {
    std::vector<std::thread> threads;
    for (size_t p = 0; p < pipes.size(); ++p) threads.emplace_back([&, p] { body(p, *pipes[p]); });
    for (auto& t : threads) t.join();
  };
  // Started together: the elements load (or share) their encoders concurrently.
  // READY -> PAUSED loads the model synchronously; prerolling stays pending.
  std::vector<int> started(pipes.size(), 0), ok(pipes.size(), 0);
  in_parallel([&](size_t p, Pipeline& pipe) {
    started[p] = gst_element_set_state(pipe.pipeline, GST_STATE_PAUSED) != GST_STATE_CHANGE_FAILURE;
  });
  run.rss_loaded_kib = rss_kib();
  run.cache_count_loaded = plugin_cache_count();
  in_parallel([&](size_t p, Pipeline& pipe) {
    if (!started[p] || gst_element_set_state(pipe.pipeline, GST_STATE_PLAYING) == GST_STATE_CHANGE_FAILURE) return;
    for (size_t i = 0; i < inputs[p].size(); ++i)
      if (pipe.push(inputs[p][i], i) != GST_FLOW_OK) return;
    pipe.end_of_stream();
    ok[p] = pipe.wait_eos();
  });
  for (size_t p = 0; p < pipes.size(); ++p) {
    EXPECT_TRUE(ok[p]) << "pipeline " << p << " did not reach EOS";
    for (const auto& problem : pipes[p]->bus_problems()) ADD_FAILURE() << "pipeline " << p << ": " << problem;
  }
  run.rss_encoded_kib = rss_kib();
  run.cache_count_encoded = plugin_cache_count();
  for (auto& pipe : pipes) run.latents.push_back(pipe->received.take());
  pipes.clear();
  return run;
}

TEST_F(Reliability, FourPipelinesShareOneCopyOfTheWeights) {
  constexpr int kPipelines = 4;
  constexpr size_t kFrames = 4;
  constexpr guint kPerBatch = 2;
  TempDir dir;
  const std::string model = dir.file("big-vae.safetensors");
  // The size of the released SD/SDXL encoders: 128 wide, levels x1,2,4,4, 2 blocks.
  VaeSpec spec;
  spec.ch = 128;
  spec.mult = {1, 2, 4, 4};
  spec.blocks = 2;
  spec.include_decoder = false;
  auto t = Clock::now();
  auto lap = [&t] {
    const double s = std::chrono::duration<double>(Clock::now() - t).count();
    t = Clock::now();
    return s;
  };
  gstvae::test::write_test_vae(model, spec);
  const double t_write = lap();

  std::vector<std::vector<std::vector<uint8_t>>> inputs(kPipelines);
  for (int p = 0; p < kPipelines; ++p)
    for (size_t i = 0; i < kFrames; ++i) inputs[p].push_back(rgb_pixels(64, 64, 1000 * (p + 1) + i));

  ASSERT_EQ(plugin_cache_count(), 0u);
  // Warm-up, not measured: one pipeline, so that one-time costs (LibTorch and
  // oneDNN initialisation, kernels for these shapes, thread pools) are paid
  // before either measurement.
  const SharedRun warmup = run_concurrent_pipelines({model}, {inputs[0]}, kPerBatch);
  EXPECT_EQ(warmup.cache_count_encoded, 1u);
  const double t_warm = lap();
  const SharedRun shared = run_concurrent_pipelines(std::vector<std::string>(kPipelines, model), inputs, kPerBatch);
  EXPECT_EQ(shared.cache_count_loaded, 1u) << "four pipelines on one file must hold one encoder";
  EXPECT_EQ(shared.cache_count_encoded, 1u);
  EXPECT_EQ(plugin_cache_count(), 0u) << "the encoder outlived its pipelines";
  const double t_shared = lap();

  // The same four pipelines, each on its own name of the file (hard links:
  // no extra disk, but other paths, so other cache keys): four copies.
  std::vector<std::string> links;
  for (int p = 0; p < kPipelines; ++p) {
    links.push_back(dir.file("link" + std::to_string(p) + ".safetensors"));
    ASSERT_EQ(::link(model.c_str(), links.back().c_str()), 0);
  }
  const SharedRun separate = run_concurrent_pipelines(links, inputs, kPerBatch);
  EXPECT_EQ(separate.cache_count_loaded, static_cast<size_t>(kPipelines));
  EXPECT_EQ(separate.cache_count_encoded, static_cast<size_t>(kPipelines));
  EXPECT_EQ(plugin_cache_count(), 0u);
  const double t_separate = lap();

  // Latents: each pipeline's, in both runs, equal the engine's for its frames
  // batched as the element batches them.
  gstvae::ModelOptions one_thread = cpu();
  one_thread.threads = 1;
  auto reference = gstvae::load_encoder(model, one_thread);
  const double weights_mib = reference->info().parameters * 4.0 / (1 << 20);
  for (int p = 0; p < kPipelines; ++p) {
    SCOPED_TRACE("pipeline " + std::to_string(p));
    std::vector<std::vector<float>> expect;
    for (size_t start = 0; start < kFrames; start += kPerBatch) {
      std::vector<std::vector<uint8_t>> batch(inputs[p].begin() + start, inputs[p].begin() + start + kPerBatch);
      for (auto& l : engine_latents(*reference, 64, 64, batch)) expect.push_back(std::move(l));
    }
    for (const auto* run : {&shared, &separate}) {
      const auto& got = run->latents[p];
      ASSERT_EQ(got.size(), kFrames);
      for (size_t i = 0; i < kFrames; ++i) {
        EXPECT_EQ(got[i].pts, i * kFrameDur);
        EXPECT_EQ(got[i].data, expect[i]) << "latent " << i << (run == &shared ? " (shared)" : " (separate)");
      }
    }
  }

  const double t_reference = lap();
  std::printf("[ timing   ] write %.1f s, warm-up %.1f s, shared %.1f s, separate %.1f s, reference %.1f s\n",
              t_write, t_warm, t_shared, t_separate, t_reference);
  auto grown = [](long from, long to) { return mib(to - from); };
  const double shared_loaded = grown(shared.rss_before_kib, shared.rss_loaded_kib);
  const double shared_encoded = grown(shared.rss_before_kib, shared.rss_encoded_kib);
  const double separate_loaded = grown(separate.rss_before_kib, separate.rss_loaded_kib);
  const double separate_encoded = grown(separate.rss_before_kib, separate.rss_encoded_kib);
  std::printf("[ memory   ] encoder weights %.1f MiB (%lld parameters, F32); 4 copies %.1f MiB\n", weights_mib,
              static_cast<long long>(reference->info().parameters), 4 * weights_mib);
  std::printf("[ memory   ] RSS growth        after load   after encoding %zu frames each\n", kFrames);
  std::printf("[ memory   ] 4 pipelines, shared:   %+8.1f MiB   %+8.1f MiB   (from %.1f MiB)\n", shared_loaded,
              shared_encoded, mib(shared.rss_before_kib));
  std::printf("[ memory   ] 4 pipelines, separate: %+8.1f MiB   %+8.1f MiB   (from %.1f MiB)\n", separate_loaded,
              separate_encoded, mib(separate.rss_before_kib));
  std::printf("[ memory   ] saved by sharing:      %8.1f MiB   %8.1f MiB\n", separate_loaded - shared_loaded,
              separate_encoded - shared_encoded);
  std::fflush(stdout);
  // Loaded: one copy of the weights, not four. Encoding adds working memory
  // that depends on timing and the allocator: checked loosely.
  EXPECT_LT(shared_loaded, 1.5 * weights_mib);
  EXPECT_GT(separate_loaded - shared_loaded, 2.5 * weights_mib);
  EXPECT_GT(separate_encoded - shared_encoded, 1.5 * weights_mib);
}

/* ----------------------------------------------------------- state cycles */

class StateCycles : public Reliability {
 protected:
  static constexpr int kW = 32, kH = 32;
  static constexpr guint kPerBatch = 4;

  void SetUp() override {
    Reliability::SetUp();
    dir_ = std::make_unique<TempDir>();
    model_ = dir_->file("small-vae.safetensors");
    gstvae::test::write_test_vae(model_, small_spec());
    for (int i = 0; i < 8; ++i) frames_.push_back(rgb_pixels(kW, kH, 500 + i));
    auto engine = gstvae::load_encoder(model_, cpu());
    // The latents of a full batch of frames_[0..3], the batch pushed after every restart.
    fresh_batch_ = engine_latents(*engine, kW, kH, {frames_.begin(), frames_.begin() + kPerBatch});
  }

  // Checks that exactly `pts` came out, in order, and (when given) with `data`.
  void expect_latents(Sink& sink, const std::vector<guint64>& frame_numbers,
                      const std::vector<std::vector<float>>* data, const std::string& where) {
    const bool all = sink.wait_for(frame_numbers.size(), std::chrono::seconds(20));
    std::this_thread::sleep_for(std::chrono::milliseconds(1));  // room for an extra one to show up
    const auto got = sink.take();
    ASSERT_TRUE(all) << where << ": only " << got.size() << " of " << frame_numbers.size() << " latents came out";
    ASSERT_EQ(got.size(), frame_numbers.size()) << where << ": unexpected extra latents";
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got[i].pts, frame_numbers[i] * kFrameDur)
          << where << ": latent " << i << " is of frame " << got[i].pts / kFrameDur << ", expected "
          << frame_numbers[i] << " (a stale frame?)";
      if (data) {
        EXPECT_EQ(got[i].data, (*data)[i]) << where << ": latent " << i << " has other values";
      }
    }
  }

  std::unique_ptr<TempDir> dir_;
  std::string model_;
  std::vector<std::vector<uint8_t>> frames_;
  std::vector<std::vector<float>> fresh_batch_;
};

// PLAYING -> PAUSED -> READY -> NULL -> PLAYING, N times, with 1-3 frames
// waiting in a partial batch at each downward change. A restart starts an
// empty batch: the first full batch after it holds only frames pushed after
// it. PAUSED keeps the partial batch (the stream goes on when PLAYING again).
TEST_F(StateCycles, PlayPauseReadyNullWithFramesMidBatch) {
  const long cycles = env_long("GSTVAE_STATE_CYCLES", 100);
  Pipeline pipe(model_, kPerBatch, kW, kH, /*live=*/true);
  const int log_before = log_problems();
  long rss_after_10 = 0;
  const auto t0 = Clock::now();
  for (long c = 0; c < cycles; ++c) {
    const std::string where = "cycle " + std::to_string(c);
    SCOPED_TRACE(where);
    const guint64 base = static_cast<guint64>(c) * 1000;  // frame numbers of this cycle: base + j
    guint64 next = base;
    const int k = 1 + static_cast<int>(c % 3);  // frames left mid-batch

    ASSERT_TRUE(pipe.set_state(GST_STATE_PLAYING)) << where << ": PLAYING";
    ASSERT_EQ(plugin_cache_count(), 1u);
    // A full batch of fresh frames: exactly these come out, with the reference values.
    std::vector<guint64> expect;
    for (guint i = 0; i < kPerBatch; ++i) {
      ASSERT_EQ(pipe.push(frames_[i], next), GST_FLOW_OK);
      expect.push_back(next++);
    }
    expect_latents(pipe.received, expect, &fresh_batch_, where + ", first batch after the start");
    if (HasFatalFailure()) return;

    // k frames mid-batch, then PAUSED and back: they stay and complete the next batch.
    expect.clear();
    for (int i = 0; i < k; ++i) {
      ASSERT_EQ(pipe.push(frames_[4 + i], next), GST_FLOW_OK);
      expect.push_back(next++);
    }
    ASSERT_TRUE(pipe.wait_frames_in(kPerBatch + k)) << where;
    ASSERT_TRUE(pipe.set_state(GST_STATE_PAUSED)) << where << ": PAUSED";
    ASSERT_TRUE(pipe.set_state(GST_STATE_PLAYING)) << where << ": PLAYING again";
    for (guint i = k; i < kPerBatch; ++i) {
      ASSERT_EQ(pipe.push(frames_[4 + i], next), GST_FLOW_OK);
      expect.push_back(next++);
    }
    expect_latents(pipe.received, expect, nullptr, where + ", batch across a pause");
    if (HasFatalFailure()) return;

    // k frames mid-batch again, then all the way down, pushing more on the way.
    for (int i = 0; i < k; ++i) ASSERT_EQ(pipe.push(frames_[i], next++), GST_FLOW_OK);
    ASSERT_TRUE(pipe.wait_frames_in(2 * kPerBatch + k)) << where;
    ASSERT_TRUE(pipe.set_state(GST_STATE_PAUSED)) << where << ": PAUSED";
    // Queued in the (live, paused) source, dropped when it stops.
    for (int i = 0; i < k; ++i) pipe.push(frames_[i], next++);
    ASSERT_TRUE(pipe.set_state(GST_STATE_READY)) << where << ": READY";
    EXPECT_EQ(plugin_cache_count(), 0u) << where << ": the stopped element still holds its encoder";
    // Refused by the stopped source.
    for (int i = 0; i < k; ++i) EXPECT_NE(pipe.push(frames_[i], next++), GST_FLOW_OK);
    for (const auto& problem : pipe.bus_problems()) ADD_FAILURE() << where << ": " << problem;
    ASSERT_TRUE(pipe.set_state(GST_STATE_NULL)) << where << ": NULL";
    EXPECT_TRUE(pipe.received.take().empty()) << where << ": latents came out while stopping";
    if (c == 9) rss_after_10 = trimmed_rss_kib();
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_EQ(log_problems(), log_before) << "GLib warnings or criticals, last: " << g_last_log_problem;
  EXPECT_EQ(plugin_cache_count(), 0u);
  if (cycles >= 20) {
    const long rss_end = trimmed_rss_kib();
    std::printf("[ cycles   ] %ld cycles in %.1f s; RSS after 10 cycles %.1f MiB, after %ld: %.1f MiB (%+.2f%%)\n",
                cycles, seconds, mib(rss_after_10), cycles, mib(rss_end),
                100.0 * (rss_end - rss_after_10) / rss_after_10);
    std::fflush(stdout);
    // No leak: flat within 5% (and 2 MiB for allocator noise on a small process).
    EXPECT_LT(rss_end - rss_after_10, std::max(rss_after_10 / 20, 2048L))
        << "RSS grew from " << rss_after_10 << " KiB to " << rss_end << " KiB";
  }
}

// A flush with 1-3 frames mid-batch drops them: the next full batch holds only
// frames sent after the flush.
TEST_F(StateCycles, FlushMidBatchDropsThePartialBatch) {
  const long cycles = env_long("GSTVAE_STATE_CYCLES", 100);
  GstElement* e = gst_element_factory_make("vaeencode", nullptr);
  g_object_set(e, "model", model_.c_str(), "per-batch", kPerBatch, "device", "cpu", nullptr);
  GstHarness* h = gst_harness_new_with_element(e, "sink", "src");
  gst_harness_use_systemclock(h);  // batch-timeout in real time
  gst_object_unref(e);
  gst_harness_set_src_caps_str(h, rgb_caps(kW, kH).c_str());
  const int log_before = log_problems();
  guint64 pushed = 0;
  for (long c = 0; c < cycles; ++c) {
    const std::string where = "flush " + std::to_string(c);
    SCOPED_TRACE(where);
    const guint64 base = static_cast<guint64>(c) * 1000;
    const int k = 1 + static_cast<int>(c % 3);
    for (int i = 0; i < k; ++i) ASSERT_EQ(gst_harness_push(h, frame_buffer(frames_[4 + i], base + i)), GST_FLOW_OK);
    pushed += k + kPerBatch;
    EXPECT_EQ(gst_harness_buffers_in_queue(h), 0u) << where << ": a partial batch came out";
    ASSERT_TRUE(gst_harness_push_event(h, gst_event_new_flush_start()));
    ASSERT_TRUE(gst_harness_push_event(h, gst_event_new_flush_stop(TRUE)));
    GstSegment segment;
    gst_segment_init(&segment, GST_FORMAT_TIME);
    ASSERT_TRUE(gst_harness_push_event(h, gst_event_new_segment(&segment)));
    for (guint i = 0; i < kPerBatch; ++i)
      ASSERT_EQ(gst_harness_push(h, frame_buffer(frames_[i], base + 100 + i)), GST_FLOW_OK);
    // The encode thread pushes them; a stale latent would come first.
    for (guint i = 0; i < kPerBatch; ++i) {
      GstBuffer* b = gst_harness_pull(h);
      ASSERT_NE(b, nullptr) << where << ": latent " << i << " did not come out within 60 s";
      EXPECT_EQ(GST_BUFFER_PTS(b), (base + 100 + i) * kFrameDur) << where << ": latent " << i << " is stale";
      EXPECT_EQ(floats_of(b), fresh_batch_[i]) << where << ": latent " << i << " has other values";
      gst_buffer_unref(b);
    }
    while (GstEvent* ev = gst_harness_try_pull_event(h)) gst_event_unref(ev);
  }
  guint64 frames_in = 0, latents_out = 0;
  g_object_get(h->element, "frames-in", &frames_in, "latents-out", &latents_out, nullptr);
  EXPECT_EQ(latents_out, static_cast<guint64>(cycles) * kPerBatch);
  EXPECT_EQ(frames_in, pushed);
  gst_harness_teardown(h);
  EXPECT_EQ(log_problems(), log_before) << "GLib warnings or criticals, last: " << g_last_log_problem;
  EXPECT_EQ(plugin_cache_count(), 0u);
}

// Stopping while the batch-timeout thread is about to hand a partial batch
// over: the base class calls stop() outside the stream lock, so stop() must
// stop that thread before it clears the streaming state (ASan, in CI, turns a
// lost race into a report). Each cycle: one frame, a timeout of 1 ms, and a
// stop at another moment around it.
TEST_F(StateCycles, StopRacesTheBatchTimeout) {
  const long cycles = 2 * env_long("GSTVAE_STATE_CYCLES", 129);
  GstElement* e = gst_element_factory_make("vaeencode", nullptr);
  g_object_set(e, "model", model_.c_str(), "per-batch", kPerBatch, "device", "cpu", "batch-timeout",
               static_cast<guint64>(GST_MSECOND), nullptr);
  GstHarness* h = gst_harness_new_with_element(e, "sink", "src");
  gst_harness_use_systemclock(h);  // batch-timeout in real time
  gst_object_unref(e);
  const int log_before = log_problems();
  // How long one frame takes from push to latent here (sanitizers and a busy
  // machine make it several times slower): the sweep of stop moments below
  // covers twice that, so that some stops come after the latent is out.
  GstClockTime span = 32 * GST_MSECOND;
  {
    gst_harness_set_src_caps_str(h, rgb_caps(kW, kH).c_str());
    const auto t0 = std::chrono::steady_clock::now();
    ASSERT_EQ(gst_harness_push(h, frame_buffer(frames_[0], 0)), GST_FLOW_OK);
    GstBuffer* b = gst_harness_pull(h);  // waits (60 s at most)
    ASSERT_NE(b, nullptr);
    gst_buffer_unref(b);
    const GstClockTime took =
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
    span = std::max(span, 2 * took);
    ASSERT_EQ(gst_element_set_state(h->element, GST_STATE_READY), GST_STATE_CHANGE_SUCCESS);
    while (GstEvent* ev = gst_harness_try_pull_event(h)) gst_event_unref(ev);
    ASSERT_EQ(gst_element_set_state(h->element, GST_STATE_PLAYING), GST_STATE_CHANGE_SUCCESS);
    ASSERT_TRUE(gst_harness_push_event(h, gst_event_new_stream_start("warm-up done")));
  }
  guint64 latents = 0;
  for (long c = 0; c < cycles; ++c) {
    const std::string where = "cycle " + std::to_string(c);
    if (c > 0) {
      ASSERT_EQ(gst_element_set_state(h->element, GST_STATE_PLAYING), GST_STATE_CHANGE_SUCCESS) << where;
      ASSERT_TRUE(gst_harness_push_event(h, gst_event_new_stream_start(where.c_str())));
    }
    gst_harness_set_src_caps_str(h, rgb_caps(kW, kH).c_str());
    ASSERT_EQ(gst_harness_push(h, frame_buffer(frames_[c % 8], c)), GST_FLOW_OK) << where;
    // 0 to `span`: before the timer fires, while it hands the batch over,
    // during the encode, after the latent is out.
    std::this_thread::sleep_for(std::chrono::nanoseconds(span / 128 * (c % 129)));
    ASSERT_EQ(gst_element_set_state(h->element, GST_STATE_READY), GST_STATE_CHANGE_SUCCESS) << where;
    while (GstBuffer* b = gst_harness_try_pull(h)) {
      EXPECT_EQ(GST_BUFFER_PTS(b), static_cast<guint64>(c) * kFrameDur) << where << ": a latent of another cycle";
      ++latents;
      gst_buffer_unref(b);
    }
    while (GstEvent* ev = gst_harness_try_pull_event(h)) gst_event_unref(ev);
  }
  std::printf("[ cycles   ] %ld stops racing a 1 ms batch-timeout over 0-%.0f ms: %" G_GUINT64_FORMAT
              " latents out before their stop, the other frames dropped\n",
              cycles, span / 1e6, latents);
  if (cycles >= 258) {  // the full sweep of stop moments
    EXPECT_GT(latents, 0u) << "no stop came after an encode: the test covers less than it says";
    EXPECT_LT(latents, static_cast<guint64>(cycles)) << "no stop came before a push: the test covers less than it says";
  }
  gst_harness_teardown(h);
  EXPECT_EQ(log_problems(), log_before) << "GLib warnings or criticals, last: " << g_last_log_problem;
  EXPECT_EQ(plugin_cache_count(), 0u);
}

/* ------------------------------------------------------------------- soak */

// GSTVAE_SOAK_FRAMES frames of 16x16 (default 10000) through the small model,
// 16 per batch: every frame gives one latent, with its timestamp and the
// engine's values, and RSS after the first 2000 frames and at the end agree
// within 5%.
TEST_F(Reliability, SoakFramesInEqualsLatentsOutWithFlatMemory) {
  const long total = env_long("GSTVAE_SOAK_FRAMES", 10000);
  const long warm = std::min(2000L, total / 2);
  constexpr int kW = 16, kH = 16;
  constexpr guint kPerBatch = 16;
  constexpr size_t kDistinct = 17;  // frames cycle with a period prime to the batch size
  TempDir dir;
  const std::string model = dir.file("small-vae.safetensors");
  gstvae::test::write_test_vae(model, small_spec());
  std::vector<std::vector<uint8_t>> frames;
  for (size_t i = 0; i < kDistinct; ++i) frames.push_back(rgb_pixels(kW, kH, 9000 + i));
  std::vector<std::vector<float>> reference;
  {
    auto engine = gstvae::load_encoder(model, cpu());
    reference = engine_latents(*engine, kW, kH, frames);
  }

  GstElement* e = gst_element_factory_make("vaeencode", nullptr);
  // One intra-op thread: a 16x16 batch is too small to split, and OpenMP's
  // spinning workers only slow it down (badly so on a busy 2-core machine).
  g_object_set(e, "model", model.c_str(), "per-batch", kPerBatch, "device", "cpu", "threads", 1u, nullptr);
  GstHarness* h = gst_harness_new_with_element(e, "sink", "src");
  gst_harness_use_systemclock(h);  // batch-timeout in real time
  gst_object_unref(e);
  gst_harness_set_src_caps_str(h, rgb_caps(kW, kH).c_str());
  const int log_before = log_problems();

  long out = 0, wrong_pts = 0, wrong_values = 0;
  long rss_warm = 0;
  auto drain = [&] {
    while (GstBuffer* b = gst_harness_try_pull(h)) {
      if (GST_BUFFER_PTS(b) != static_cast<GstClockTime>(out) * kFrameDur) ++wrong_pts;
      if (!close_to(floats_of(b), reference[out % kDistinct])) ++wrong_values;
      ++out;
      gst_buffer_unref(b);
    }
  };
  const auto t0 = Clock::now();
  for (long n = 0; n < total; ++n) {
    ASSERT_EQ(gst_harness_push(h, frame_buffer(frames[n % kDistinct], n)), GST_FLOW_OK) << "frame " << n;
    drain();
    while (GstEvent* ev = gst_harness_try_pull_event(h)) gst_event_unref(ev);
    if (n + 1 == warm) rss_warm = trimmed_rss_kib();
  }
  ASSERT_TRUE(gst_harness_push_event(h, gst_event_new_eos()));  // the last partial batch
  drain();
  const long rss_end = trimmed_rss_kib();
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();

  guint64 frames_in = 0, latents_out = 0;
  g_object_get(h->element, "frames-in", &frames_in, "latents-out", &latents_out, nullptr);
  gst_harness_teardown(h);

  EXPECT_EQ(frames_in, static_cast<guint64>(total));
  EXPECT_EQ(latents_out, static_cast<guint64>(total));
  EXPECT_EQ(out, total) << "latents pulled";
  EXPECT_EQ(wrong_pts, 0);
  EXPECT_EQ(wrong_values, 0);
  EXPECT_EQ(log_problems(), log_before) << "GLib warnings or criticals, last: " << g_last_log_problem;
  std::printf("[ soak     ] %ld frames of %dx%d in %.1f s (%.0f frames/s); RSS after %ld frames %.1f MiB, "
              "at the end %.1f MiB (%+.2f%%)\n",
              total, kW, kH, seconds, total / seconds, warm, mib(rss_warm), mib(rss_end),
              100.0 * (rss_end - rss_warm) / rss_warm);
  std::fflush(stdout);
  EXPECT_LE(std::labs(rss_end - rss_warm), rss_warm / 20)
      << "RSS moved by more than 5%: " << rss_warm << " KiB -> " << rss_end << " KiB";
}

}  // namespace
