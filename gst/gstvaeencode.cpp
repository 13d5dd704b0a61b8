/* vaeencode: gathers `per-batch` video frames, encodes them with a
 * Stable-Diffusion-family VAE encoder and pushes one latent buffer per frame.
 *
 * Four threads meet here. The streaming thread copies each frame into the
 * batch being gathered and, once it is full, prepares it (on GPUs: starts its
 * upload) and hands it to the encode thread, which encodes it and hands its
 * latents to the push thread, which pushes them downstream. So batch k+1 is
 * gathered, and upstream keeps running, while batch k encodes, and batch k
 * encodes while the latents of batch k-1 wait downstream (a sink syncing to
 * the clock, or one prerolling in PAUSED). While downstream holds one batch
 * for less than about three encodes, the streaming thread waits only for
 * encodes, never for downstream: an application can send EOS to a pipeline
 * that is prerolling (gst_element_send_event holds the state lock while it
 * waits for the source's stream lock) and get it back within one encode.
 * Downstream holding latents longer (a pipeline kept in PAUSED) fills the
 * bounded queues and then holds upstream back, as a full `queue` would.
 * The batch-timeout thread hands over partial batches. Drain events (EOS,
 * caps, segments...) wait until every latent before them is out; other
 * serialized events (tags) travel through the queues behind those latents,
 * pushed by the push thread. A flush drops what is queued and fences off the
 * latents of the batch being encoded or pushed.
 *
 * Settings (properties, under the object lock) are kept apart from the
 * streaming state (touched only with the sink pad's stream lock held: by the
 * streaming thread, serialized events, and the batch-timeout thread) and from
 * the worker queues (their own mutex). The encode itself never runs with a
 * lock held.
 *
 * Lock order (take left before right, never the reverse):
 *   sink pad stream lock -> EncodeWorker::push_mutex -> EncodeWorker::mutex
 *   sink pad stream lock -> BatchTimer::mutex (released before the stream
 *                           lock is taken by the timer thread)
 *   object lock: a leaf, never held while another lock is taken.
 * No C++ exception leaves this file: each vmethod catches and posts an
 * element error. */
#include "gstvaeencode.h"

#include <gst/video/video.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "encoder.h"
#include "errors.h"
#include "latent_caps.h"

GST_DEBUG_CATEGORY_STATIC(vae_encode_debug);
#define GST_CAT_DEFAULT vae_encode_debug

using gstvae::EncodeParams;
using gstvae::Encoder;
using gstvae::ModelOptions;
using gstvae::FrameBatch;
using gstvae::LatentBlock;
using gstvae::Precision;

namespace {

constexpr guint kDefaultPerBatch = 16;
// Batches handed over and waiting while another encodes: one keeps the
// encoder busy; more would only add latency and memory.
constexpr size_t kMaxWaitingBatches = 1;
// Encoded batches waiting while the latents of another are pushed: one lets
// the encoder start the next batch while a syncing sink holds the last one.
constexpr size_t kMaxWaitingOutputs = 1;
// Batch times the latency estimate looks back over: a slow first (warm-up)
// batch stops counting after this many.
constexpr size_t kLatencyWindow = 8;
constexpr const char* kDefaultDevice = "auto";

enum {
  PROP_0,
  PROP_MODEL,
  PROP_PER_BATCH,
  PROP_DEVICE,
  PROP_PRECISION,
  PROP_SAMPLE,
  PROP_SEED,
  PROP_LATENT_FORMAT,
  PROP_BATCH_TIMEOUT,
  PROP_THREADS,
  PROP_FRAMES_IN,
  PROP_LATENTS_OUT,
  PROP_BATCHES,
  PROP_LAST_BATCH_TIME,
  PROP_AVERAGE_FPS,
  PROP_FRAMES_IN_FLIGHT,
};

GType precision_get_type() {
  static GType type = 0;
  if (g_once_init_enter(&type)) {
    static const GEnumValue values[] = {
        {static_cast<gint>(Precision::Auto), "bf16 on CUDA devices of compute capability >= 8.0, else fp32",
         "auto"},
        {static_cast<gint>(Precision::F32), "32-bit float", "fp32"},
        {static_cast<gint>(Precision::F16), "16-bit float (the SDXL VAE overflows in fp16)", "fp16"},
        {static_cast<gint>(Precision::BF16), "bfloat16", "bf16"},
        {0, nullptr, nullptr}};
    g_once_init_leave(&type, g_enum_register_static("GstVaePrecision", values));
  }
  return type;
}

GType latent_format_get_type() {
  static GType type = 0;
  if (g_once_init_enter(&type)) {
    static const GEnumValue values[] = {
        {0, "Raw latents, as ComfyUI's VAE Encode returns them", "raw"},
        {1, "SD 1.x/2.x scaling: x * 0.18215", "sd15"},
        {2, "SDXL scaling: x * 0.13025", "sdxl"},
        {3, "SD3 scaling: (x - 0.0609) * 1.5305", "sd3"},
        {4, "Flux.1 scaling: (x - 0.1159) * 0.3611", "flux"},
        {0, nullptr, nullptr}};
    g_once_init_leave(&type, g_enum_register_static("GstVaeLatentFormat", values));
  }
  return type;
}

const char* latent_format_nick(gint value) {
  GEnumClass* klass = static_cast<GEnumClass*>(g_type_class_ref(latent_format_get_type()));
  GEnumValue* v = g_enum_get_value(klass, value);
  const char* nick = v ? v->value_nick : "raw";
  g_type_class_unref(klass);
  return nick;
}

struct Settings {
  std::string model;
  guint per_batch = kDefaultPerBatch;
  std::string device = kDefaultDevice;
  Precision precision = Precision::Auto;
  gboolean sample = FALSE;
  guint64 seed = 0;
  gint latent_format = 0;
  guint64 batch_timeout = 0;
  guint threads = 0;
};

struct Stats {
  guint64 frames_in = 0;
  guint64 latents_out = 0;
  guint64 batches = 0;
  GstClockTime last_batch_time = 0;
  GstClockTime total_encode_time = 0;
  guint64 frames_encoded = 0;
  // Time from a batch's hand-over to its latents being ready (preparing it
  // and encoding it), for the last kLatencyWindow batches.
  GstClockTime recent[kLatencyWindow] = {};
  guint64 recent_count = 0;

  double average_fps() const {
    return total_encode_time ? frames_encoded * static_cast<double>(GST_SECOND) / total_encode_time : 0.0;
  }
  void add_batch_time(GstClockTime t) { recent[recent_count++ % kLatencyWindow] = t; }
  // What a latency query reports as the processing part: the slowest recent
  // batch, so that a latent is not late whenever a batch is a little slower
  // than the mean, and an early slow batch is forgotten.
  GstClockTime processing_estimate() const {
    GstClockTime m = 0;
    for (guint64 i = 0; i < std::min<guint64>(recent_count, kLatencyWindow); ++i) m = std::max(m, recent[i]);
    return m;
  }
};

// What a latent buffer inherits from its frame.
struct FrameMeta {
  GstClockTime pts, dts, duration;
  guint64 offset, offset_end;
  bool discont;
};

struct Streaming {
  std::shared_ptr<Encoder> encoder;
  GstVideoInfo in_info;
  bool have_info = false;
  gstvae::PixelFormat format = gstvae::PixelFormat::RGB;
  std::unique_ptr<FrameBatch> batch;  // being gathered
  std::vector<FrameMeta> pending;     // its frames' metadata
  std::chrono::steady_clock::time_point oldest_arrival;
  guint64 frame_index = 0;
  GstFlowReturn timer_flow = GST_FLOW_OK;  // a failed hand-over by the timer thread
  bool tags_sent = false;

  void drop_pending() {
    if (batch) batch->clear();
    pending.clear();
  }
};

// A full (or drained) batch on its way through the encode thread, or a
// serialized event that must follow the latents of the batches before it.
struct EncodeJob {
  GstEvent* event = nullptr;  // owned; an event job has no batch
  std::shared_ptr<Encoder> encoder;
  std::unique_ptr<FrameBatch> batch;
  std::vector<FrameMeta> frames;
  EncodeParams params;
  guint64 generation = 0;
  GstClockTime prepare_time = 0;  // spent in prepare() by the streaming thread
};

// An encoded batch's latents (or an event) on their way through the push thread.
struct PushJob {
  std::vector<GstBuffer*> latents;
  GstEvent* event = nullptr;  // owned
  guint64 generation = 0;

  void drop() {
    for (GstBuffer* b : latents) gst_buffer_unref(b);
    latents.clear();
    if (event) gst_event_unref(event);
    event = nullptr;
  }
};

// The encode and push threads and their queues.
struct EncodeWorker {
  std::thread thread;       // encodes
  std::thread push_thread;  // pushes latents downstream
  std::mutex mutex;         // everything below but push_mutex
  std::condition_variable cond;
  std::deque<EncodeJob> queue;  // waiting, at most kMaxWaitingBatches
  bool busy = false;            // a job is being encoded (or its latents queued)
  std::deque<PushJob> out;      // encoded, waiting to be pushed, at most kMaxWaitingOutputs
  bool pushing = false;         // latents are being pushed
  bool flushing = false;        // between FLUSH_START and FLUSH_STOP, or stopping
  bool quit = false;
  guint64 generation = 0;  // a flush bumps it: latents of older jobs are dropped
  GstFlowReturn flow = GST_FLOW_OK;  // first failure of an encode or a push
  guint64 frames_in_flight = 0;      // handed over, latents not pushed (or dropped) yet
  std::vector<std::unique_ptr<FrameBatch>> spare;  // encoded batches, for reuse
  // Held while latents are pushed; FLUSH_STOP takes it, so that no latent of a
  // batch from before the flush goes out after it. Recursive: an application
  // may (against advice) seek from a probe inside our push, on this thread.
  std::recursive_mutex push_mutex;

  // Drops the batches waiting to be encoded and the latents waiting to be pushed.
  void drop_queue() {
    for (EncodeJob& job : queue) {
      frames_in_flight -= job.frames.size();
      if (job.event) gst_event_unref(job.event);
    }
    queue.clear();
    for (PushJob& job : out) {
      frames_in_flight -= job.latents.size();
      job.drop();
    }
    out.clear();
  }
  bool idle() const { return queue.empty() && !busy && out.empty() && !pushing; }
  // Batches (not events) waiting: the bounds count only these.
  size_t waiting_batches() const {
    return std::count_if(queue.begin(), queue.end(), [](const EncodeJob& j) { return !j.event; });
  }
  size_t waiting_outputs() const {
    return std::count_if(out.begin(), out.end(), [](const PushJob& j) { return !j.event; });
  }
  // An encode or a push failed for good: what is still queued is not wanted.
  bool failed() const { return flow != GST_FLOW_OK && flow <= GST_FLOW_NOT_NEGOTIATED; }
};

// What queries (any thread) need to know of the streaming side.
struct Facts {
  int downscale = 8;
  int channels = 0;  // 0 until a model is loaded
  int fps_n = 0, fps_d = 1;
  GstClockTime reported_latency = 0;  // processing part last announced
};

// Wakes up when the oldest pending frame has waited `batch-timeout`.
struct BatchTimer {
  std::thread thread;
  std::mutex mutex;
  std::condition_variable cond;
  bool quit = false;
  bool armed = false;
  std::chrono::steady_clock::time_point deadline;
};

}  // namespace

struct _GstVaeEncode {
  GstBaseTransform parent;
  Settings* settings;  // object lock
  Stats* stats;        // object lock
  Facts* facts;        // object lock
  Streaming* state;    // sink stream lock
  EncodeWorker* worker;
  BatchTimer* timer;
  // Threads of ours that stopped the element themselves (an application
  // changing state from a pad probe or a sync bus handler running on them):
  // a thread cannot join itself, so the next start, or finalize, joins them.
  // Touched only by state changes and finalize.
  std::vector<std::thread>* deferred;
};

G_DEFINE_TYPE(GstVaeEncode, gst_vae_encode, GST_TYPE_BASE_TRANSFORM);
GST_ELEMENT_REGISTER_DEFINE(vaeencode, "vaeencode", GST_RANK_NONE, GST_TYPE_VAE_ENCODE);

static GstStaticPadTemplate sink_template = GST_STATIC_PAD_TEMPLATE(
    "sink", GST_PAD_SINK, GST_PAD_ALWAYS,
    GST_STATIC_CAPS("video/x-raw, format = (string) { RGB, BGR, RGBA, BGRA, ARGB, ABGR, RGBx, BGRx, xRGB, xBGR }, "
                    "width = (int) [ 8, MAX ], height = (int) [ 8, MAX ], framerate = (fraction) [ 0/1, MAX ]"));

static GstStaticPadTemplate src_template = GST_STATIC_PAD_TEMPLATE(
    "src", GST_PAD_SRC, GST_PAD_ALWAYS,
    GST_STATIC_CAPS(GST_LATENT_CAPS_MEDIA_TYPE ", format = (string) F32, channels = (int) [ 1, MAX ], "
                    "width = (int) [ 1, MAX ], height = (int) [ 1, MAX ], framerate = (fraction) [ 0/1, MAX ], "
                    "latent-format = (string) { raw, sd15, sdxl, sd3, flux }"));

static Settings settings_snapshot(GstVaeEncode* self) {
  GST_OBJECT_LOCK(self);
  Settings s = *self->settings;
  GST_OBJECT_UNLOCK(self);
  return s;
}

/* ---------------------------------------------------------------- encode */

static void post_progress(GstVaeEncode* self, guint batch_frames, GstClockTime batch_time) {
  GST_OBJECT_LOCK(self);
  Stats st = *self->stats;
  GST_OBJECT_UNLOCK(self);
  const double fps = batch_time ? batch_frames * static_cast<double>(GST_SECOND) / batch_time : 0.0;
  GST_INFO_OBJECT(self, "batch %" G_GUINT64_FORMAT ": %u frames in %.3f s (%.2f frames/s), %" G_GUINT64_FORMAT
                  " frames done, %.2f frames/s on average",
                  st.batches, batch_frames, batch_time / 1e9, fps, st.latents_out, st.average_fps());
  GstStructure* s = gst_structure_new(GST_VAE_ENCODE_PROGRESS_MESSAGE, "frames", G_TYPE_UINT64, st.latents_out,
                                      "batches", G_TYPE_UINT64, st.batches, "batch-frames", G_TYPE_UINT,
                                      batch_frames, "batch-time", G_TYPE_UINT64, batch_time, "fps", G_TYPE_DOUBLE,
                                      fps, "average-fps", G_TYPE_DOUBLE, st.average_fps(), nullptr);
  gst_element_post_message(GST_ELEMENT(self), gst_message_new_element(GST_OBJECT(self), s));
}

// Re-announces latency when the processing estimate moved by more than a
// quarter (and a millisecond) from what the last latency query reported.
static void maybe_post_latency(GstVaeEncode* self) {
  GST_OBJECT_LOCK(self);
  const GstClockTime estimate = self->stats->processing_estimate();
  const GstClockTime old = self->facts->reported_latency;
  const GstClockTime diff = estimate > old ? estimate - old : old - estimate;
  const bool changed = diff > GST_MSECOND && diff * 4 > old;
  if (changed) self->facts->reported_latency = estimate;
  GST_OBJECT_UNLOCK(self);
  if (changed) {
    gst_element_post_message(GST_ELEMENT(self), gst_message_new_latency(GST_OBJECT(self)));
  }
}

static GstMemory* wrap_latents(std::unique_ptr<LatentBlock> block) {
  LatentBlock* raw = block.release();
  return gst_memory_new_wrapped(static_cast<GstMemoryFlags>(0), raw->data(), raw->bytes(), 0, raw->bytes(), raw,
                                [](gpointer p) { delete static_cast<LatentBlock*>(p); });
}

// Push thread: pushes a batch's latents unless a flush came after the batch
// was handed over.
static void push_latents(GstVaeEncode* self, PushJob& job) {
  EncodeWorker& w = *self->worker;
  std::lock_guard<std::recursive_mutex> fence(w.push_mutex);
  // Flushed since the job was handed over, or (for latents) an error came
  // first: downstream would see latents after a hole.
  auto is_stale = [&] {
    std::lock_guard<std::mutex> lock(w.mutex);
    return w.flushing || job.generation != w.generation || (!job.event && w.failed());
  };
  if (job.event) {
    GstEvent* event = job.event;
    job.event = nullptr;
    if (is_stale())
      gst_event_unref(event);
    else
      gst_pad_push_event(GST_BASE_TRANSFORM_SRC_PAD(self), event);
    return;
  }
  bool stale = false;
  GstFlowReturn ret = GST_FLOW_OK;
  for (GstBuffer* b : job.latents) {
    if (ret == GST_FLOW_OK && !stale && is_stale()) {
      stale = true;
      GST_DEBUG_OBJECT(self, "flushed or failed: dropping latents of a batch from before");
    }
    if (ret == GST_FLOW_OK && !stale)
      ret = gst_pad_push(GST_BASE_TRANSFORM_SRC_PAD(self), b);
    else
      gst_buffer_unref(b);
  }
  job.latents.clear();
  if (ret != GST_FLOW_OK && !stale) {
    GST_DEBUG_OBJECT(self, "pushing latents: %s", gst_flow_get_name(ret));
    std::lock_guard<std::mutex> lock(w.mutex);
    if (w.flow == GST_FLOW_OK) w.flow = ret;
  }
}

// Encode thread: encodes one job into per-frame latent buffers. Returns no
// latents when the encode failed (the error is posted here).
static std::vector<GstBuffer*> run_job(GstVaeEncode* self, EncodeJob& job) {
  const size_t n = job.batch->size();
  const auto start = std::chrono::steady_clock::now();
  std::unique_ptr<LatentBlock> block;
  std::string error;
  gstvae::EncodeReport report;
  try {
    block = job.encoder->new_latents(*job.batch);
    report = job.encoder->encode(*job.batch, job.params, *block);
  } catch (const std::exception& e) {
    error = e.what();
  }
  for (const std::string& note : report.notes) GST_WARNING_OBJECT(self, "%s", note.c_str());
  const GstClockTime elapsed =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
  std::vector<GstBuffer*> latents;
  if (!error.empty()) {
    EncodeWorker& w = *self->worker;
    std::unique_lock<std::mutex> lock(w.mutex);
    if (w.flushing || job.generation != w.generation) {
      // Frames the application flushed away: no reason to stop the new stream.
      lock.unlock();
      GST_WARNING_OBJECT(self, "encoding a flushed batch failed: %s", error.c_str());
      return latents;
    }
    if (w.flow == GST_FLOW_OK) w.flow = GST_FLOW_ERROR;
    lock.unlock();
    GST_ELEMENT_ERROR(self, STREAM, FAILED, ("VAE encoding failed"), ("%s", error.c_str()));
    return latents;
  }
  const size_t frame_bytes = block->bytes() / n;
  GstBuffer* all = gst_buffer_new();
  gst_buffer_append_memory(all, wrap_latents(std::move(block)));
  for (size_t i = 0; i < n; ++i) {
    // Each latent shares the batch's memory: no copy.
    GstBuffer* out = gst_buffer_copy_region(all, GST_BUFFER_COPY_MEMORY, i * frame_bytes, frame_bytes);
    const FrameMeta& m = job.frames[i];
    GST_BUFFER_PTS(out) = m.pts;
    GST_BUFFER_DTS(out) = m.dts;
    GST_BUFFER_DURATION(out) = m.duration;
    GST_BUFFER_OFFSET(out) = m.offset;
    GST_BUFFER_OFFSET_END(out) = m.offset_end;
    if (m.discont) GST_BUFFER_FLAG_SET(out, GST_BUFFER_FLAG_DISCONT);
    latents.push_back(out);
  }
  gst_buffer_unref(all);

  GST_OBJECT_LOCK(self);
  self->stats->batches++;
  self->stats->latents_out += n;
  self->stats->frames_encoded += n;
  self->stats->last_batch_time = elapsed;
  self->stats->total_encode_time += elapsed;
  self->stats->add_batch_time(job.prepare_time + elapsed);
  GST_OBJECT_UNLOCK(self);
  post_progress(self, static_cast<guint>(n), elapsed);
  maybe_post_latency(self);
  return latents;
}

static void worker_loop(GstVaeEncode* self) {
  EncodeWorker& w = *self->worker;
  std::unique_lock<std::mutex> lock(w.mutex);
  for (;;) {
    w.cond.wait(lock, [&] { return w.quit || !w.queue.empty(); });
    if (w.quit) break;
    EncodeJob job = std::move(w.queue.front());
    w.queue.pop_front();
    if (job.event) {
      // In order behind the latents queued before it; events are not bounded.
      PushJob out;
      out.event = job.event;
      out.generation = job.generation;
      w.out.push_back(std::move(out));
      w.cond.notify_all();
      continue;
    }
    w.busy = true;
    w.cond.notify_all();  // a slot is free for the next batch
    lock.unlock();
    PushJob out;
    out.latents = run_job(self, job);
    out.generation = job.generation;
    job.batch->clear();
    lock.lock();
    if (w.spare.size() < 2) w.spare.push_back(std::move(job.batch));
    // Wait for room behind the latents being pushed; downstream holds them
    // for as long as it likes (a syncing sink, a prerolled one), the encoder
    // does not wait for more than that one batch.
    w.cond.wait(lock, [&] { return w.waiting_outputs() < kMaxWaitingOutputs || w.flushing || w.quit; });
    if (out.latents.empty() || w.flushing || w.quit || out.generation != w.generation) {
      w.frames_in_flight -= job.frames.size();
      out.drop();
    } else {
      w.out.push_back(std::move(out));
    }
    w.busy = false;
    w.cond.notify_all();
  }
}

static void push_loop(GstVaeEncode* self) {
  EncodeWorker& w = *self->worker;
  std::unique_lock<std::mutex> lock(w.mutex);
  for (;;) {
    w.cond.wait(lock, [&] { return w.quit || !w.out.empty(); });
    if (w.quit) break;
    PushJob job = std::move(w.out.front());
    w.out.pop_front();
    const size_t n = job.latents.size();  // 0 for an event
    w.pushing = true;
    w.cond.notify_all();  // room for the next encoded batch
    lock.unlock();
    push_latents(self, job);
    lock.lock();
    w.pushing = false;
    w.frames_in_flight -= std::min<guint64>(n, w.frames_in_flight);  // 0 already if we were stopped meanwhile
    w.cond.notify_all();
  }
}

// Joins `t`, or, when this is `t` itself, leaves it to join_deferred(); says
// whether it was joined. The thread returns once its caller (the application's
// probe or handler) does, and then sees its quit flag.
static bool join_or_defer(GstVaeEncode* self, std::thread& t) {
  if (!t.joinable()) return true;
  if (t.get_id() != std::this_thread::get_id()) {
    t.join();
    return true;
  }
  GST_WARNING_OBJECT(self, "stopped from one of its own threads (a state change in a probe or a sync bus handler): "
                           "that thread ends when the handler returns");
  self->deferred->push_back(std::move(t));
  return false;
}

// Joins the threads join_or_defer() left (they have quit or are about to),
// except the calling one, if it is one of them.
static void join_deferred(GstVaeEncode* self) {
  std::vector<std::thread> keep;
  for (std::thread& t : *self->deferred) {
    if (t.get_id() == std::this_thread::get_id())
      keep.push_back(std::move(t));
    else if (t.joinable())
      t.join();
  }
  *self->deferred = std::move(keep);
}

static void worker_start(GstVaeEncode* self) {
  join_deferred(self);  // before quit is cleared: they must see it to end
  EncodeWorker& w = *self->worker;
  std::lock_guard<std::mutex> lock(w.mutex);
  w.quit = false;
  w.flushing = false;
  w.flow = GST_FLOW_OK;
  w.generation++;
  w.frames_in_flight = 0;
  w.thread = std::thread(worker_loop, self);
  w.push_thread = std::thread(push_loop, self);
}

// Drops the queues and joins the threads, the encode thread after the batch it
// is encoding (a LibTorch forward pass cannot be interrupted). Its latents are
// not pushed. Our pads are inactive by then, so the push thread pushes nothing
// new, but a push already inside downstream's chain returns only when
// downstream lets it go (as for a `queue`); in a pipeline the sinks have
// stopped first, so it has.
static void worker_stop(GstVaeEncode* self) {
  EncodeWorker& w = *self->worker;
  {
    std::lock_guard<std::mutex> lock(w.mutex);
    w.quit = true;
    w.flushing = true;
    w.drop_queue();
    w.cond.notify_all();
  }
  join_or_defer(self, w.thread);
  join_or_defer(self, w.push_thread);
  std::lock_guard<std::mutex> lock(w.mutex);
  w.drop_queue();
  w.spare.clear();
  w.frames_in_flight = 0;
}

// Streaming side: a staging batch for the current caps and `per-batch`,
// reusing one the encode thread is done with.
static void acquire_batch(GstVaeEncode* self, guint per_batch) {
  Streaming& st = *self->state;
  if (st.batch && (!st.batch->empty() || st.batch->capacity() == per_batch)) return;
  const int width = GST_VIDEO_INFO_WIDTH(&st.in_info), height = GST_VIDEO_INFO_HEIGHT(&st.in_info);
  EncodeWorker& w = *self->worker;
  {
    std::lock_guard<std::mutex> lock(w.mutex);
    while (!w.spare.empty()) {
      std::unique_ptr<FrameBatch> b = std::move(w.spare.back());
      w.spare.pop_back();
      if (b->format() == st.format && b->frame_width() == width && b->frame_height() == height &&
          b->capacity() == per_batch) {
        st.batch = std::move(b);
        return;
      }
    }
  }
  st.batch = st.encoder->new_batch(st.format, width, height, per_batch);
}

// Streaming side: prepares the gathered batch and hands it to the encode
// thread, waiting while another batch is already waiting there.
static GstFlowReturn hand_over(GstVaeEncode* self) {
  Streaming& st = *self->state;
  if (!st.batch || st.batch->empty()) return GST_FLOW_OK;
  const Settings s = settings_snapshot(self);
  EncodeJob job;
  job.encoder = st.encoder;
  job.params.sample = s.sample;
  job.params.seed = s.seed;
  job.params.latent_format = gstvae::latent_format_by_name(latent_format_nick(s.latent_format));
  job.frames = std::move(st.pending);
  job.batch = std::move(st.batch);
  st.pending.clear();
  const auto prepare_start = std::chrono::steady_clock::now();
  try {
    // On GPUs this starts the upload, which then overlaps the encode in progress.
    job.encoder->prepare(*job.batch);
    job.prepare_time =
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - prepare_start).count();
  } catch (const std::exception& e) {
    GST_ELEMENT_ERROR(self, STREAM, FAILED, ("VAE encoding failed"), ("%s", e.what()));
    return GST_FLOW_ERROR;
  }
  const size_t n = job.frames.size();
  EncodeWorker& w = *self->worker;
  std::unique_lock<std::mutex> lock(w.mutex);
  w.cond.wait(lock, [&] { return w.waiting_batches() < kMaxWaitingBatches || w.flushing; });
  if (w.flushing) {
    GST_DEBUG_OBJECT(self, "flushing: dropping a batch of %zu frames", n);
    return GST_FLOW_FLUSHING;
  }
  if (w.failed()) {
    GST_DEBUG_OBJECT(self, "%s before: dropping a batch of %zu frames", gst_flow_get_name(w.flow), n);
    return w.flow;
  }
  job.generation = w.generation;
  w.frames_in_flight += n;
  w.queue.push_back(std::move(job));
  w.cond.notify_all();
  // A non-fatal downstream return (NOT_LINKED, EOS, FLUSHING) goes upstream once.
  const GstFlowReturn flow = w.flow;
  if (flow > GST_FLOW_NOT_NEGOTIATED) w.flow = GST_FLOW_OK;
  return flow;
}

// Streaming side: puts a serialized event behind the latents in flight,
// without waiting for them (a TAG from a parser must not hold the streaming
// thread while a prerolling sink holds a latent). Returns false when there is
// nothing in flight: the caller then forwards it at once.
static bool queue_event(GstVaeEncode* self, GstEvent* event) {
  EncodeWorker& w = *self->worker;
  std::lock_guard<std::mutex> lock(w.mutex);
  if (w.idle() || w.flushing) return false;
  EncodeJob job;
  job.event = event;
  job.generation = w.generation;
  w.queue.push_back(std::move(job));
  w.cond.notify_all();
  return true;
}

// Streaming side: waits until every batch handed over is encoded and pushed.
static GstFlowReturn wait_idle(GstVaeEncode* self) {
  EncodeWorker& w = *self->worker;
  std::unique_lock<std::mutex> lock(w.mutex);
  w.cond.wait(lock, [&] { return w.idle() || w.flushing; });
  return w.flushing ? GST_FLOW_FLUSHING : w.flow;
}

// Encodes and pushes whatever is pending (EOS, caps change, serialized events).
static GstFlowReturn drain(GstVaeEncode* self) {
  GstFlowReturn ret = hand_over(self);
  GstFlowReturn idle = wait_idle(self);
  return ret != GST_FLOW_OK ? ret : idle;
}

/* ----------------------------------------------------------- batch timer */

static void timer_arm(GstVaeEncode* self, std::chrono::steady_clock::time_point deadline) {
  BatchTimer& t = *self->timer;
  std::lock_guard<std::mutex> lock(t.mutex);
  t.armed = true;
  t.deadline = deadline;
  t.cond.notify_all();
}

static void timer_disarm(GstVaeEncode* self) {
  BatchTimer& t = *self->timer;
  std::lock_guard<std::mutex> lock(t.mutex);
  t.armed = false;
}

static void timer_loop(GstVaeEncode* self) {
  BatchTimer& t = *self->timer;
  std::unique_lock<std::mutex> lock(t.mutex);
  while (!t.quit) {
    if (!t.armed) {
      t.cond.wait(lock);
      continue;
    }
    if (t.cond.wait_until(lock, t.deadline) != std::cv_status::timeout) continue;
    if (t.quit || !t.armed || std::chrono::steady_clock::now() < t.deadline) continue;
    t.armed = false;
    lock.unlock();
    // The streaming thread may be inside chain; take its lock like it would.
    GST_PAD_STREAM_LOCK(GST_BASE_TRANSFORM_SINK_PAD(self));
    bool quit;
    {
      std::lock_guard<std::mutex> g(t.mutex);
      quit = t.quit;
    }
    Streaming& st = *self->state;
    if (!quit && st.encoder && !st.pending.empty()) {
      const Settings s = settings_snapshot(self);
      const guint64 timeout = s.batch_timeout;
      const auto age = std::chrono::steady_clock::now() - st.oldest_arrival;
      if (st.pending.size() >= s.per_batch) {
        // per-batch was lowered while frames waited: that batch is full now.
        GST_DEBUG_OBJECT(self, "per-batch lowered to %u: encoding the %zu waiting frames", s.per_batch,
                         st.pending.size());
        GstFlowReturn ret = hand_over(self);
        if (ret != GST_FLOW_OK && st.timer_flow == GST_FLOW_OK) st.timer_flow = ret;
      } else if (timeout && age >= std::chrono::nanoseconds(timeout)) {
        GST_DEBUG_OBJECT(self, "batch-timeout: encoding a partial batch of %zu frames", st.pending.size());
        GstFlowReturn ret = hand_over(self);
        if (ret != GST_FLOW_OK && st.timer_flow == GST_FLOW_OK) st.timer_flow = ret;
      } else if (timeout) {
        // batch-timeout was raised (or set) after the oldest frame came.
        timer_arm(self, st.oldest_arrival + std::chrono::nanoseconds(timeout));
      }
    }
    GST_PAD_STREAM_UNLOCK(GST_BASE_TRANSFORM_SINK_PAD(self));
    lock.lock();
  }
}

static void timer_stop(GstVaeEncode* self) {
  BatchTimer& t = *self->timer;
  {
    std::lock_guard<std::mutex> lock(t.mutex);
    t.quit = true;
    t.cond.notify_all();
  }
  // quit stays set: a deferred timer thread must see it to end; timer_start
  // clears it once every old thread has been joined.
  join_or_defer(self, t.thread);
}

static void timer_start(GstVaeEncode* self) {
  BatchTimer& t = *self->timer;
  if (t.thread.joinable()) timer_stop(self);
  join_deferred(self);
  {
    std::lock_guard<std::mutex> lock(t.mutex);
    t.quit = false;
    t.armed = false;
  }
  t.thread = std::thread(timer_loop, self);
}

/* ------------------------------------------------------------- lifecycle */

static gboolean gst_vae_encode_start(GstBaseTransform* trans) {
  GstVaeEncode* self = GST_VAE_ENCODE(trans);
  const Settings s = settings_snapshot(self);
  if (s.model.empty()) {
    GST_ELEMENT_ERROR(self, RESOURCE, NOT_FOUND, ("No VAE model given"),
                      ("set the 'model' property to a .safetensors VAE or full checkpoint"));
    return FALSE;
  }
  ModelOptions options;
  options.device = s.device;
  options.precision = s.precision;
  options.threads = static_cast<int>(s.threads);
  try {
    self->state->encoder = gstvae::load_encoder(s.model, options);
  } catch (const gstvae::VaeError& e) {
    GST_ELEMENT_ERROR(self, RESOURCE, SETTINGS, ("Could not use VAE model '%s'", s.model.c_str()), ("%s", e.what()));
    return FALSE;
  } catch (const std::exception& e) {
    GST_ELEMENT_ERROR(self, RESOURCE, OPEN_READ, ("Could not load VAE model '%s'", s.model.c_str()),
                      ("%s", e.what()));
    return FALSE;
  }
  const auto& info = self->state->encoder->info();
  GST_INFO_OBJECT(self, "loaded '%s': %s (%s layout), %" G_GINT64_FORMAT " parameters, on %s in %s",
                  s.model.c_str(), info.architecture.c_str(), info.layout.c_str(), info.parameters,
                  info.device.c_str(), gstvae::precision_name(info.precision));
  self->state->frame_index = 0;
  self->state->timer_flow = GST_FLOW_OK;
  self->state->tags_sent = false;
  GST_OBJECT_LOCK(self);
  *self->stats = Stats();
  *self->facts = Facts();
  self->facts->downscale = info.downscale;
  self->facts->channels = info.latent_channels;
  GST_OBJECT_UNLOCK(self);
  timer_start(self);
  if (self->worker->thread.joinable()) worker_stop(self);
  worker_start(self);
  return TRUE;
}

static gboolean gst_vae_encode_stop(GstBaseTransform* trans) {
  GstVaeEncode* self = GST_VAE_ENCODE(trans);
  // Pending frames are dropped, not pushed: the pipeline is shutting down.
  // The base class calls this after taking and releasing the stream lock, not
  // under it, so the batch-timeout thread (which takes that lock) could still
  // hand a batch over: wake it if it waits for a slot, and join it before the
  // streaming state is touched. The pads are inactive, so nothing the encode
  // thread pushes gets through; it needs no stream lock and is joined next.
  {
    std::lock_guard<std::mutex> lock(self->worker->mutex);
    self->worker->flushing = true;
    self->worker->cond.notify_all();
  }
  timer_stop(self);
  worker_stop(self);
  self->state->drop_pending();
  self->state->batch.reset();
  self->state->encoder.reset();
  self->state->have_info = false;
  GST_OBJECT_LOCK(self);
  *self->facts = Facts();
  GST_OBJECT_UNLOCK(self);
  return TRUE;
}

static GstStateChangeReturn gst_vae_encode_change_state(GstElement* element, GstStateChange transition) {
  GstVaeEncode* self = GST_VAE_ENCODE(element);
  GstStateChangeReturn ret = GST_ELEMENT_CLASS(gst_vae_encode_parent_class)->change_state(element, transition);
  // stop() joins the timer thread; a failed start does not reach stop().
  if (transition == GST_STATE_CHANGE_PAUSED_TO_READY || ret == GST_STATE_CHANGE_FAILURE) timer_stop(self);
  return ret;
}

/* ------------------------------------------------------------------ caps */

static int current_downscale(GstVaeEncode* self) {
  GST_OBJECT_LOCK(self);
  const int d = self->facts->downscale;
  GST_OBJECT_UNLOCK(self);
  return d;
}

static GstCaps* gst_vae_encode_transform_caps(GstBaseTransform* trans, GstPadDirection direction, GstCaps* caps,
                                              GstCaps* filter) {
  GstVaeEncode* self = GST_VAE_ENCODE(trans);
  // Caps queries come from any thread: only object-locked facts are read.
  gst_latent_caps::Model model;
  GST_OBJECT_LOCK(self);
  model.downscale = self->facts->downscale;
  model.channels = self->facts->channels;
  model.latent_format = latent_format_nick(self->settings->latent_format);
  GST_OBJECT_UNLOCK(self);
  GstCaps* result = direction == GST_PAD_SINK ? gst_latent_caps::video_to_latent(caps, model)
                                              : gst_latent_caps::latent_to_video(caps, model);
  if (filter) {
    GstCaps* tmp = gst_caps_intersect_full(filter, result, GST_CAPS_INTERSECT_FIRST);
    gst_caps_unref(result);
    result = tmp;
  }
  GST_DEBUG_OBJECT(self, "transformed %" GST_PTR_FORMAT " to %" GST_PTR_FORMAT, caps, result);
  return result;
}

static gboolean gst_vae_encode_set_caps(GstBaseTransform* trans, GstCaps* incaps, GstCaps* outcaps) {
  GstVaeEncode* self = GST_VAE_ENCODE(trans);
  Streaming& st = *self->state;
  GstVideoInfo info;
  if (!gst_video_info_from_caps(&info, incaps)) {
    GST_ELEMENT_ERROR(self, CORE, NEGOTIATION, ("Invalid video caps"), ("%" GST_PTR_FORMAT, incaps));
    return FALSE;
  }
  if (!gstvae::parse_pixel_format(gst_video_format_to_string(GST_VIDEO_INFO_FORMAT(&info)), &st.format)) {
    GST_ELEMENT_ERROR(self, CORE, NEGOTIATION, ("Unsupported video format %s",
                                                gst_video_format_to_string(GST_VIDEO_INFO_FORMAT(&info))),
                      (nullptr));
    return FALSE;
  }
  const int d = current_downscale(self);
  if (GST_VIDEO_INFO_WIDTH(&info) < d || GST_VIDEO_INFO_HEIGHT(&info) < d) {
    GST_ELEMENT_ERROR(self, STREAM, FORMAT, ("Frames are too small for the model"),
                      ("frame of %dx%d is smaller than the model's %dx%d pixel minimum", GST_VIDEO_INFO_WIDTH(&info),
                       GST_VIDEO_INFO_HEIGHT(&info), d, d));
    return FALSE;
  }
  if (GST_VIDEO_INFO_IS_INTERLACED(&info)) {
    // The encoder would see both fields woven into one frame: combing in the latents.
    GST_ELEMENT_ERROR(self, STREAM, FORMAT, ("Interlaced video cannot be encoded"),
                      ("interlace-mode %s: put a deinterlacer before vaeencode, e.g. '... ! deinterlace ! "
                       "videoconvert ! vaeencode ...'",
                       gst_video_interlace_mode_to_string(GST_VIDEO_INFO_INTERLACE_MODE(&info))));
    return FALSE;
  }
  if (GST_VIDEO_INFO_PAR_N(&info) != GST_VIDEO_INFO_PAR_D(&info) && GST_VIDEO_INFO_PAR_N(&info) > 0) {
    // Latents cover the stored pixels; a diffusion model assumes square ones.
    GST_ELEMENT_WARNING(self, STREAM, FORMAT, ("Non-square pixels: the latents will look stretched"),
                        ("pixel-aspect-ratio %d/%d; the latents encode the %dx%d stored pixels as they are. To "
                         "encode square pixels, scale first: '... ! videoscale ! "
                         "video/x-raw,pixel-aspect-ratio=1/1 ! vaeencode ...'",
                         GST_VIDEO_INFO_PAR_N(&info), GST_VIDEO_INFO_PAR_D(&info), GST_VIDEO_INFO_WIDTH(&info),
                         GST_VIDEO_INFO_HEIGHT(&info)));
  }
  // A different geometry or format needs a new staging batch (drained already).
  st.batch.reset();
  st.in_info = info;
  st.have_info = true;
  GST_OBJECT_LOCK(self);
  self->facts->fps_n = GST_VIDEO_INFO_FPS_N(&info);
  self->facts->fps_d = GST_VIDEO_INFO_FPS_D(&info);
  GST_OBJECT_UNLOCK(self);
  GST_INFO_OBJECT(self, "input %" GST_PTR_FORMAT ", output %" GST_PTR_FORMAT, incaps, outcaps);
  return TRUE;
}

/* --------------------------------------------------------------- buffers */

static GstFlowReturn gst_vae_encode_submit_input_buffer(GstBaseTransform* trans, gboolean /*is_discont*/,
                                                        GstBuffer* input) {
  GstVaeEncode* self = GST_VAE_ENCODE(trans);
  Streaming& st = *self->state;
  if (st.timer_flow != GST_FLOW_OK) {
    GstFlowReturn ret = st.timer_flow;
    st.timer_flow = GST_FLOW_OK;
    gst_buffer_unref(input);
    return ret;
  }
  {
    // A failed encode or push in the encode thread reaches upstream here. An
    // error stays; NOT_LINKED, FLUSHING and EOS are returned once, as the pad
    // would return them, so that a relinked or restarted downstream recovers.
    std::lock_guard<std::mutex> lock(self->worker->mutex);
    const GstFlowReturn flow = self->worker->flow;
    if (flow != GST_FLOW_OK) {
      if (flow > GST_FLOW_NOT_NEGOTIATED) self->worker->flow = GST_FLOW_OK;
      gst_buffer_unref(input);
      return flow;
    }
  }
  if (!st.have_info || !st.encoder) {
    gst_buffer_unref(input);
    GST_ELEMENT_ERROR(self, CORE, NEGOTIATION, ("Received a buffer before caps"), (nullptr));
    return GST_FLOW_NOT_NEGOTIATED;
  }
  // Overriding submit_input_buffer means renegotiating here (downstream may ask).
  if (!gst_base_transform_reconfigure(trans)) {
    gst_buffer_unref(input);
    return GST_PAD_IS_FLUSHING(GST_BASE_TRANSFORM_SRC_PAD(trans)) ? GST_FLOW_FLUSHING : GST_FLOW_NOT_NEGOTIATED;
  }
  if (!st.tags_sent) {
    // Provenance for sinks such as latentfilesink: the model's file name.
    gchar* base = g_path_get_basename(st.encoder->info().model_path.c_str());
    gst_pad_push_event(GST_BASE_TRANSFORM_SRC_PAD(trans),
                       gst_event_new_tag(gst_tag_list_new(GST_TAG_VAE_MODEL, base, nullptr)));
    g_free(base);
    st.tags_sent = true;
  }
  const Settings s = settings_snapshot(self);
  GstVideoFrame frame;
  if (!gst_video_frame_map(&frame, &st.in_info, input, GST_MAP_READ)) {
    const gsize size = gst_buffer_get_size(input);
    gst_buffer_unref(input);
    GST_ELEMENT_ERROR(self, STREAM, FORMAT, ("Could not map the input frame"),
                      ("buffer of %zu bytes does not hold a %dx%d %s frame", size,
                       GST_VIDEO_INFO_WIDTH(&st.in_info), GST_VIDEO_INFO_HEIGHT(&st.in_info),
                       GST_VIDEO_INFO_NAME(&st.in_info)));
    return GST_FLOW_ERROR;
  }
  try {
    acquire_batch(self, s.per_batch);
    st.batch->add(static_cast<const uint8_t*>(GST_VIDEO_FRAME_PLANE_DATA(&frame, 0)),
                  GST_VIDEO_FRAME_PLANE_STRIDE(&frame, 0), st.frame_index++);
  } catch (const std::exception& e) {
    gst_video_frame_unmap(&frame);
    gst_buffer_unref(input);
    GST_ELEMENT_ERROR(self, STREAM, FAILED, ("Could not stage the input frame"), ("%s", e.what()));
    return GST_FLOW_ERROR;
  }
  gst_video_frame_unmap(&frame);
  st.pending.push_back(FrameMeta{GST_BUFFER_PTS(input), GST_BUFFER_DTS(input), GST_BUFFER_DURATION(input),
                                 GST_BUFFER_OFFSET(input), GST_BUFFER_OFFSET_END(input),
                                 GST_BUFFER_FLAG_IS_SET(input, GST_BUFFER_FLAG_DISCONT) != 0});
  // The frame now lives in the batch: give the buffer back to its pool at once
  // (live sources such as v4l2src have only a few).
  gst_buffer_unref(input);
  GST_OBJECT_LOCK(self);
  self->stats->frames_in++;
  GST_OBJECT_UNLOCK(self);

  // per-batch may have been lowered below the staging batch's capacity.
  if (st.batch->full() || st.pending.size() >= s.per_batch) {
    timer_disarm(self);
    return hand_over(self);
  }
  if (st.pending.size() == 1) {
    st.oldest_arrival = std::chrono::steady_clock::now();
    if (s.batch_timeout) timer_arm(self, st.oldest_arrival + std::chrono::nanoseconds(s.batch_timeout));
  }
  return GST_FLOW_OK;
}

// Latents are pushed by the encode thread as soon as their batch is encoded, never
// handed to the base class here: it would mark its pending DISCONT on whatever
// buffer came out next, a batch later than the frame that carried it.
static GstFlowReturn gst_vae_encode_generate_output(GstBaseTransform*, GstBuffer** outbuf) {
  *outbuf = nullptr;
  return GST_FLOW_OK;
}

/* ---------------------------------------------------------------- events */

static gboolean gst_vae_encode_sink_event(GstBaseTransform* trans, GstEvent* event) {
  GstVaeEncode* self = GST_VAE_ENCODE(trans);
  Streaming& st = *self->state;
  switch (GST_EVENT_TYPE(event)) {
    case GST_EVENT_CAPS: {
      // Upstream may resend the caps it already set: nothing changes then.
      GstCaps* caps;
      gst_event_parse_caps(event, &caps);
      GstCaps* current = gst_pad_get_current_caps(GST_BASE_TRANSFORM_SINK_PAD(trans));
      const bool same = current && gst_caps_is_equal(current, caps);
      if (current) gst_caps_unref(current);
      if (same) break;
    }
      /* fall through */
    case GST_EVENT_EOS:
    case GST_EVENT_SEGMENT:
    case GST_EVENT_STREAM_START:
    case GST_EVENT_GAP:
    case GST_EVENT_SEGMENT_DONE:
    case GST_EVENT_STREAM_GROUP_DONE:
    case GST_EVENT_CUSTOM_DOWNSTREAM:
    {
      // Latents of the frames before this event go out first, with the old caps.
      timer_disarm(self);
      GST_DEBUG_OBJECT(self, "draining %zu pending frames before %s", st.pending.size(), GST_EVENT_TYPE_NAME(event));
      GstFlowReturn ret = drain(self);
      if (ret != GST_FLOW_OK && ret != GST_FLOW_FLUSHING)
        GST_WARNING_OBJECT(self, "draining before %s: %s", GST_EVENT_TYPE_NAME(event), gst_flow_get_name(ret));
      // A new stream drops the sticky tags of the last one: announce the model again.
      if (GST_EVENT_TYPE(event) == GST_EVENT_STREAM_START) st.tags_sent = false;
      break;
    }
    case GST_EVENT_FLUSH_START: {
      // Any thread. Wakes a streaming thread waiting on the encode thread; the
      // batch being encoded cannot be stopped, its latents will be dropped.
      EncodeWorker& w = *self->worker;
      std::lock_guard<std::mutex> lock(w.mutex);
      GST_DEBUG_OBJECT(self, "flush start: dropping %zu queued batches", w.queue.size());
      w.flushing = true;
      w.drop_queue();
      w.cond.notify_all();
      break;
    }
    case GST_EVENT_FLUSH_STOP: {
      timer_disarm(self);
      GST_DEBUG_OBJECT(self, "flush: dropping %zu pending frames", st.pending.size());
      st.drop_pending();
      st.timer_flow = GST_FLOW_OK;
      // The src pad is still flushing here, so a push in progress returns at
      // once; after this, latents of batches from before the flush are stale.
      EncodeWorker& w = *self->worker;
      std::lock_guard<std::recursive_mutex> fence(w.push_mutex);
      std::lock_guard<std::mutex> lock(w.mutex);
      w.drop_queue();
      w.generation++;
      w.flushing = false;
      w.flow = GST_FLOW_OK;
      break;
    }
    default:
      // Other serialized events (tags, which decoders send often, and the
      // rest) must not overtake the latents of batches already handed over,
      // but do not cut the batch being gathered; the push thread sends them
      // after those latents.
      if (GST_EVENT_IS_SERIALIZED(event) && queue_event(self, event)) return TRUE;
      break;
  }
  return GST_BASE_TRANSFORM_CLASS(gst_vae_encode_parent_class)->sink_event(trans, event);
}

/* --------------------------------------------------------------- queries */

static gboolean gst_vae_encode_query(GstBaseTransform* trans, GstPadDirection direction, GstQuery* query) {
  GstVaeEncode* self = GST_VAE_ENCODE(trans);
  if (direction != GST_PAD_SRC || GST_QUERY_TYPE(query) != GST_QUERY_LATENCY)
    return GST_BASE_TRANSFORM_CLASS(gst_vae_encode_parent_class)->query(trans, direction, query);

  GstPad* peer = gst_pad_get_peer(GST_BASE_TRANSFORM_SINK_PAD(trans));
  if (!peer) return FALSE;
  gboolean ok = gst_pad_query(peer, query);
  gst_object_unref(peer);
  if (!ok) return FALSE;

  gboolean live;
  GstClockTime min, max;
  gst_query_parse_latency(query, &live, &min, &max);
  const Settings s = settings_snapshot(self);
  GST_OBJECT_LOCK(self);
  const GstClockTime encode_time = self->stats->processing_estimate();
  const gint fps_n = self->facts->fps_n, fps_d = self->facts->fps_d;
  self->facts->reported_latency = encode_time;
  GST_OBJECT_UNLOCK(self);

  // A frame waits for the (per-batch - 1) frames after it, bounded by batch-timeout.
  GstClockTime wait = GST_CLOCK_TIME_NONE;
  if (fps_n > 0 && fps_d > 0) wait = gst_util_uint64_scale(static_cast<guint64>(s.per_batch) - 1, GST_SECOND * fps_d, fps_n);
  if (s.per_batch == 1) wait = 0;
  if (s.batch_timeout && (wait == GST_CLOCK_TIME_NONE || wait > s.batch_timeout)) wait = s.batch_timeout;

  const GstClockTime added_min = (wait == GST_CLOCK_TIME_NONE ? 0 : wait) + encode_time;
  min += added_min;
  if (max != GST_CLOCK_TIME_NONE) max = wait == GST_CLOCK_TIME_NONE ? GST_CLOCK_TIME_NONE : max + wait + encode_time;
  GST_DEBUG_OBJECT(self, "latency: batch wait %" GST_TIME_FORMAT " + encode %" GST_TIME_FORMAT
                   " -> min %" GST_TIME_FORMAT " max %" GST_TIME_FORMAT,
                   GST_TIME_ARGS(wait), GST_TIME_ARGS(encode_time), GST_TIME_ARGS(min), GST_TIME_ARGS(max));
  gst_query_set_latency(query, live, min, max);
  return TRUE;
}

/* ------------------------------------------------------------ properties */

static void gst_vae_encode_set_property(GObject* object, guint prop_id, const GValue* value, GParamSpec* pspec) {
  GstVaeEncode* self = GST_VAE_ENCODE(object);
  if (prop_id == PROP_MODEL || prop_id == PROP_DEVICE || prop_id == PROP_PRECISION || prop_id == PROP_THREADS ||
      prop_id == PROP_LATENT_FORMAT) {
    // The model is loaded when the element starts and the latent format is
    // part of the caps: these only apply in NULL/READY.
    GstState state = GST_STATE(self);
    if (state > GST_STATE_READY || GST_STATE_TARGET(self) > GST_STATE_READY) {
      g_warning("vaeencode: property '%s' can only be changed in the NULL or READY state", pspec->name);
      return;
    }
  }
  GST_OBJECT_LOCK(self);
  Settings& s = *self->settings;
  switch (prop_id) {
    case PROP_MODEL: s.model = g_value_get_string(value) ? g_value_get_string(value) : ""; break;
    case PROP_PER_BATCH: s.per_batch = g_value_get_uint(value); break;
    case PROP_DEVICE: s.device = g_value_get_string(value) ? g_value_get_string(value) : kDefaultDevice; break;
    case PROP_PRECISION: s.precision = static_cast<Precision>(g_value_get_enum(value)); break;
    case PROP_SAMPLE: s.sample = g_value_get_boolean(value); break;
    case PROP_SEED: s.seed = g_value_get_uint64(value); break;
    case PROP_LATENT_FORMAT: s.latent_format = g_value_get_enum(value); break;
    case PROP_BATCH_TIMEOUT: s.batch_timeout = g_value_get_uint64(value); break;
    case PROP_THREADS: s.threads = g_value_get_uint(value); break;
    default: G_OBJECT_WARN_INVALID_PROPERTY_ID(object, prop_id, pspec); break;
  }
  const bool look_now = (prop_id == PROP_BATCH_TIMEOUT && s.batch_timeout != 0) || prop_id == PROP_PER_BATCH;
  GST_OBJECT_UNLOCK(self);
  // Frames may be waiting already: let the timer thread look at them now (it
  // hands them over if per-batch fell to their number, else re-arms for their
  // own deadline); this thread may not touch them.
  if (look_now) timer_arm(self, std::chrono::steady_clock::now());
}

static void gst_vae_encode_get_property(GObject* object, guint prop_id, GValue* value, GParamSpec* pspec) {
  GstVaeEncode* self = GST_VAE_ENCODE(object);
  GST_OBJECT_LOCK(self);
  const Settings& s = *self->settings;
  const Stats& st = *self->stats;
  switch (prop_id) {
    case PROP_MODEL: g_value_set_string(value, s.model.c_str()); break;
    case PROP_PER_BATCH: g_value_set_uint(value, s.per_batch); break;
    case PROP_DEVICE: g_value_set_string(value, s.device.c_str()); break;
    case PROP_PRECISION: g_value_set_enum(value, static_cast<gint>(s.precision)); break;
    case PROP_SAMPLE: g_value_set_boolean(value, s.sample); break;
    case PROP_SEED: g_value_set_uint64(value, s.seed); break;
    case PROP_LATENT_FORMAT: g_value_set_enum(value, s.latent_format); break;
    case PROP_BATCH_TIMEOUT: g_value_set_uint64(value, s.batch_timeout); break;
    case PROP_THREADS: g_value_set_uint(value, s.threads); break;
    case PROP_FRAMES_IN: g_value_set_uint64(value, st.frames_in); break;
    case PROP_LATENTS_OUT: g_value_set_uint64(value, st.latents_out); break;
    case PROP_BATCHES: g_value_set_uint64(value, st.batches); break;
    case PROP_LAST_BATCH_TIME: g_value_set_uint64(value, st.last_batch_time); break;
    case PROP_AVERAGE_FPS: g_value_set_double(value, st.average_fps()); break;
    case PROP_FRAMES_IN_FLIGHT: break;
    default: G_OBJECT_WARN_INVALID_PROPERTY_ID(object, prop_id, pspec); break;
  }
  GST_OBJECT_UNLOCK(self);
  if (prop_id == PROP_FRAMES_IN_FLIGHT) {
    std::lock_guard<std::mutex> lock(self->worker->mutex);
    g_value_set_uint64(value, self->worker->frames_in_flight);
  }
}

/* ------------------------------------------------------------- GObject */

static void gst_vae_encode_finalize(GObject* object) {
  GstVaeEncode* self = GST_VAE_ENCODE(object);
  timer_stop(self);
  worker_stop(self);
  join_deferred(self);
  for (std::thread& t : *self->deferred) t.detach();  // finalized from that very thread: nothing else can join it
  delete self->deferred;
  self->state->drop_pending();
  delete self->state;
  delete self->worker;
  delete self->stats;
  delete self->facts;
  delete self->settings;
  delete self->timer;
  G_OBJECT_CLASS(gst_vae_encode_parent_class)->finalize(object);
}

static void gst_vae_encode_init(GstVaeEncode* self) {
  self->settings = new Settings();
  self->stats = new Stats();
  self->facts = new Facts();
  self->state = new Streaming();
  self->timer = new BatchTimer();
  self->worker = new EncodeWorker();
  self->deferred = new std::vector<std::thread>();
  gst_base_transform_set_passthrough(GST_BASE_TRANSFORM(self), FALSE);
  gst_base_transform_set_in_place(GST_BASE_TRANSFORM(self), FALSE);
  gst_base_transform_set_qos_enabled(GST_BASE_TRANSFORM(self), FALSE);
}

static void gst_vae_encode_class_init(GstVaeEncodeClass* klass) {
  GObjectClass* gobject_class = G_OBJECT_CLASS(klass);
  GstElementClass* element_class = GST_ELEMENT_CLASS(klass);
  GstBaseTransformClass* trans_class = GST_BASE_TRANSFORM_CLASS(klass);

  gobject_class->set_property = gst_vae_encode_set_property;
  gobject_class->get_property = gst_vae_encode_get_property;
  gobject_class->finalize = gst_vae_encode_finalize;

  const auto rw = static_cast<GParamFlags>(G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);
  const auto rw_ready = static_cast<GParamFlags>(rw | GST_PARAM_MUTABLE_READY);
  const auto rw_playing = static_cast<GParamFlags>(rw | GST_PARAM_MUTABLE_PLAYING);
  const auto ro = static_cast<GParamFlags>(G_PARAM_READABLE | G_PARAM_STATIC_STRINGS);

  g_object_class_install_property(
      gobject_class, PROP_MODEL,
      g_param_spec_string("model", "Model",
                          "Path to a .safetensors VAE (LDM or diffusers layout) or a full checkpoint holding one "
                          "under 'first_stage_model.' or 'vae.'; loaded when the element starts",
                          nullptr, rw_ready));
  g_object_class_install_property(
      gobject_class, PROP_PER_BATCH,
      g_param_spec_uint("per-batch", "Frames per batch",
                        "Frames gathered and encoded together. Lowered to (or below) the number of frames waiting: they are "
                        "encoded at once; raised: applies from the next batch", 1, 4096,
                        kDefaultPerBatch, rw_playing));
  g_object_class_install_property(
      gobject_class, PROP_DEVICE,
      g_param_spec_string("device", "Device",
                          "Compute device: auto (CUDA when LibTorch has a GPU, else CPU), cpu, cuda or cuda:N. "
                          "An explicit CUDA request that cannot be met is an error",
                          kDefaultDevice, rw_ready));
  g_object_class_install_property(
      gobject_class, PROP_PRECISION,
      g_param_spec_enum("precision", "Precision", "Compute precision of the encoder; latents are always float32",
                        precision_get_type(), static_cast<gint>(Precision::Auto), rw_ready));
  g_object_class_install_property(
      gobject_class, PROP_SAMPLE,
      g_param_spec_boolean("sample", "Sample",
                           "Output a sample mean + sigma * noise instead of the Gaussian mean (ComfyUI's default)",
                           FALSE, rw_playing));
  g_object_class_install_property(
      gobject_class, PROP_SEED,
      g_param_spec_uint64("seed", "Seed",
                          "Noise seed when sampling; frame i's noise depends only on (seed, i), i counted from "
                          "the start of the stream",
                          0, G_MAXUINT64, 0, rw_playing));
  g_object_class_install_property(
      gobject_class, PROP_LATENT_FORMAT,
      g_param_spec_enum("latent-format", "Latent format",
                        "Raw latents (as ComfyUI returns them) or scaled for a diffusion model family: "
                        "output = (raw - shift) * scale",
                        latent_format_get_type(), 0, rw_ready));
  g_object_class_install_property(
      gobject_class, PROP_BATCH_TIMEOUT,
      g_param_spec_uint64("batch-timeout", "Batch timeout",
                          "Encode a partial batch once its oldest frame has waited this long, in nanoseconds "
                          "(0 = always wait for a full batch or the end of the stream)",
                          0, G_MAXUINT64, 0, rw_playing));
  g_object_class_install_property(
      gobject_class, PROP_THREADS,
      g_param_spec_uint("threads", "CPU threads",
                        "Intra-op CPU threads of LibTorch (process-wide), 0 = all cores", 0, 1024, 0, rw_ready));
  g_object_class_install_property(
      gobject_class, PROP_FRAMES_IN,
      g_param_spec_uint64("frames-in", "Frames in", "Frames received since the element started", 0, G_MAXUINT64, 0,
                          ro));
  g_object_class_install_property(
      gobject_class, PROP_LATENTS_OUT,
      g_param_spec_uint64("latents-out", "Latents out", "Latents produced since the element started", 0,
                          G_MAXUINT64, 0, ro));
  g_object_class_install_property(
      gobject_class, PROP_BATCHES,
      g_param_spec_uint64("batches", "Batches", "Batches encoded since the element started", 0, G_MAXUINT64, 0, ro));
  g_object_class_install_property(
      gobject_class, PROP_LAST_BATCH_TIME,
      g_param_spec_uint64("last-batch-time", "Last batch time", "Time the last batch took to encode, in nanoseconds",
                          0, G_MAXUINT64, 0, ro));
  g_object_class_install_property(
      gobject_class, PROP_AVERAGE_FPS,
      g_param_spec_double("average-fps", "Average frames/s",
                          "Frames encoded per second of encode time since the element started", 0, G_MAXDOUBLE, 0,
                          ro));
  g_object_class_install_property(
      gobject_class, PROP_FRAMES_IN_FLIGHT,
      g_param_spec_uint64("frames-in-flight", "Frames in flight",
                          "Frames of full (or drained) batches handed to the encode thread whose latents have "
                          "not been pushed yet (waiting, encoding, or queued for the push thread); frames of the "
                          "batch being gathered are not counted",
                          0, G_MAXUINT64, 0, ro));

  gst_element_class_set_static_metadata(
      element_class, "VAE encoder", "Filter/Converter/Video",
      "Encodes video frames in batches into the latents of a Stable-Diffusion-family VAE (LibTorch)",
      "gst-vae developers");
  gst_element_class_add_static_pad_template(element_class, &sink_template);
  gst_element_class_add_static_pad_template(element_class, &src_template);
  element_class->change_state = gst_vae_encode_change_state;

  trans_class->start = gst_vae_encode_start;
  trans_class->stop = gst_vae_encode_stop;
  trans_class->transform_caps = gst_vae_encode_transform_caps;
  trans_class->set_caps = gst_vae_encode_set_caps;
  trans_class->submit_input_buffer = gst_vae_encode_submit_input_buffer;
  trans_class->generate_output = gst_vae_encode_generate_output;
  trans_class->sink_event = gst_vae_encode_sink_event;
  trans_class->query = gst_vae_encode_query;
  trans_class->passthrough_on_same_caps = FALSE;

  gst_type_mark_as_plugin_api(precision_get_type(), static_cast<GstPluginAPIFlags>(0));
  gst_type_mark_as_plugin_api(latent_format_get_type(), static_cast<GstPluginAPIFlags>(0));
  GST_DEBUG_CATEGORY_INIT(vae_encode_debug, "vaeencode", 0, "VAE encoder");
}
