/* GstVaeBatch: gathers `per-batch` inputs, hands them to a BatchWorker as one
 * job, and lets the worker's threads run the model and push the outputs.
 *
 * Four threads meet here. The streaming thread stages each input in the batch
 * being gathered and, once it is full, makes it a job (on GPUs: starts its
 * upload) and hands it to the work thread, which runs it and hands its
 * outputs to the push thread, which pushes them downstream. So batch k+1 is
 * gathered, and upstream keeps running, while batch k runs, and batch k runs
 * while the outputs of batch k-1 wait downstream (a sink syncing to the clock,
 * or one prerolling in PAUSED). While downstream holds one batch for less than
 * about three batch times, the streaming thread waits only for the model,
 * never for downstream: an application can send EOS to a pipeline that is
 * prerolling (gst_element_send_event holds the state lock while it waits for
 * the source's stream lock) and get it back within one batch. Downstream
 * holding outputs longer (a pipeline kept in PAUSED) fills the bounded queues
 * and then holds upstream back, as a full `queue` would. The batch-timeout
 * thread hands over partial batches. Drain events (EOS, caps, segments...)
 * wait until every output before them is out; other serialized events (tags)
 * travel through the queues behind those outputs, pushed by the push thread.
 * A flush drops what is queued and fences off the outputs of the batch being
 * run or pushed.
 *
 * Settings (properties, under the object lock) are kept apart from the
 * streaming state (touched only with the sink pad's stream lock held: by the
 * streaming thread, serialized events, and the batch-timeout thread) and from
 * the worker (its own locks, see batch_worker.h). The model never runs with a
 * lock held.
 *
 * Lock order (take left before right, never the reverse):
 *   sink pad stream lock -> BatchWorker::push_mutex_ -> BatchWorker::mutex_
 *   sink pad stream lock -> BatchTimer::mutex_ (released before the timer
 *                           thread takes the stream lock)
 *   object lock: a leaf, never held while another lock is taken.
 * Temporal models (a video VAE whose session regroups inputs, e.g. frame 0
 * alone then groups of 4): a job's outputs may cover inputs of earlier jobs
 * that the session held. Their metadata lives in the stream's HeldInputs
 * (gstvaebatch.h), which, like the session, only the work thread touches, in
 * job order; the streaming side only reads its atomic count. The streaming
 * side tracks the clip (Streaming::clip_open, stream lock) and ends it with a
 * job flagged end_of_clip, possibly of no inputs (end_clip()).
 *
 * No C++ exception leaves this file: each vmethod catches and posts an
 * element error. */
#include "gstvaebatch.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "errors.h"
#include "latent_caps.h"
#include "levers.h"
#include "model.h"

GST_DEBUG_CATEGORY_STATIC(vae_batch_debug);
#define GST_CAT_DEFAULT vae_batch_debug

using gstvae::Precision;
using gstvae_glue::BatchTimer;
using gstvae_glue::BatchWorker;
using gstvae_glue::CommonSettings;
using gstvae_glue::DeferredJoins;
using gstvae_glue::Direction;
using gstvae_glue::HeldInputs;
using gstvae_glue::InputMeta;
using gstvae_glue::Job;

namespace {

constexpr guint kDefaultPerBatch = 16;
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
  PROP_BATCH_TIMEOUT,
  PROP_THREADS,
  PROP_FRAMES_IN,
  PROP_BATCHES,
  PROP_LAST_BATCH_TIME,
  PROP_AVERAGE_FPS,
  PROP_FRAMES_IN_FLIGHT,
};

struct Stats {
  guint64 inputs = 0;
  guint64 outputs = 0;
  guint64 batches = 0;
  GstClockTime last_batch_time = 0;
  GstClockTime total_time = 0;
  guint64 inputs_done = 0;
  // Time from a batch's hand-over to its outputs being ready (preparing it
  // and running it), for the last kLatencyWindow batches.
  GstClockTime recent[kLatencyWindow] = {};
  guint64 recent_count = 0;

  double average_fps() const {
    return total_time ? inputs_done * static_cast<double>(GST_SECOND) / total_time : 0.0;
  }
  void add_batch_time(GstClockTime t) { recent[recent_count++ % kLatencyWindow] = t; }
  // What a latency query reports as the processing part: the slowest recent
  // batch, so that an output is not late whenever a batch is a little slower
  // than the mean, and an early slow batch is forgotten.
  GstClockTime processing_estimate() const {
    GstClockTime m = 0;
    for (guint64 i = 0; i < std::min<guint64>(recent_count, kLatencyWindow); ++i) m = std::max(m, recent[i]);
    return m;
  }
};

struct Streaming {
  std::unique_ptr<Direction> direction;
  // The session carries state across inputs (a video model): clip ends
  // (EOS, a new stream, new caps, a DISCONT input) must reach it.
  bool clips = false;
  // Temporal models: inputs were staged since the clip began (the next clip
  // end must reach the session), so a DISCONT input starts a new clip.
  bool clip_open = false;
  // What the session holds, shared with the jobs (work thread; see HeldInputs).
  std::shared_ptr<HeldInputs> held;
  std::vector<InputMeta> pending;  // metadata of the staged inputs
  guint64 first_pending_index = 0;
  // When the oldest staged input came, on the clock the batch timer uses.
  GstClockTime oldest_arrival = 0;
  GstClock* arrival_clock = nullptr;  // owned

  void set_arrival(GstClock* clock, GstClockTime t) {
    if (arrival_clock) gst_object_unref(arrival_clock);
    arrival_clock = clock;
    oldest_arrival = t;
  }
  ~Streaming() {
    set_arrival(nullptr, 0);
    gst_caps_replace(&refused_caps, nullptr);
  }
  guint64 input_index = 0;
  GstFlowReturn timer_flow = GST_FLOW_OK;  // a failed hand-over by the timer thread
  bool tags_sent = false;
  // Input caps this stream refused, its error posted. Upstream offers them
  // again and again (a source renegotiates after not-negotiated; the pad
  // re-sends a refused sticky caps event with every buffer), from its
  // streaming thread, maybe while the pipeline is still going to PAUSED:
  // each gets the same refusal and no further error, so the application
  // sees one. Forgotten when the stream restarts (start, stop, flush).
  GstCaps* refused_caps = nullptr;  // owned
  // A negotiation error was posted for this stream: buffers without caps
  // are refused with not-negotiated, silently.
  bool negotiation_error_posted = false;

  bool refused(GstCaps* caps) const { return refused_caps && gst_caps_is_equal(refused_caps, caps); }
  void refuse(GstCaps* caps) {
    gst_caps_replace(&refused_caps, caps);
    negotiation_error_posted = true;
  }
  void forget_refusals() {
    gst_caps_replace(&refused_caps, nullptr);
    negotiation_error_posted = false;
  }

  void drop_pending() {
    if (direction) direction->drop_staged();
    pending.clear();
  }
};

// What queries (any thread) need to know of the streaming side.
struct Facts {
  int scale = 8;
  int channels = 0;  // 0 until a model is loaded
  int temporal = 1;  // inputs per output
  int fps_n = 0, fps_d = 1;
  GstClockTime reported_latency = 0;  // processing part last announced
};

struct Private {
  CommonSettings settings;  // object lock
  Stats stats;              // object lock
  Facts facts;              // object lock
  Streaming state;          // sink stream lock
  DeferredJoins joins;
  std::unique_ptr<BatchWorker> worker;
  std::unique_ptr<BatchTimer> timer;
};

}  // namespace

struct _GstVaeBatchPrivate {
  Private* p;
};
typedef struct _GstVaeBatchPrivate GstVaeBatchPrivate;

G_DEFINE_ABSTRACT_TYPE_WITH_PRIVATE(GstVaeBatch, gst_vae_batch, GST_TYPE_BASE_TRANSFORM)

static Private& priv(GstVaeBatch* self) {
  return *static_cast<GstVaeBatchPrivate*>(gst_vae_batch_get_instance_private(self))->p;
}

static GstVaeBatchClass* klass_of(GstVaeBatch* self) { return GST_VAE_BATCH_GET_CLASS(self); }

GType gst_vae_precision_get_type(void) {
  static GType type = 0;
  if (g_once_init_enter(&type)) {
    static GEnumValue values[8] = {};
    size_t i = 0;
    for (Precision p : gstvae::all_precisions()) {
      const char* description = "";
      switch (p) {
        case Precision::Auto: description = "bf16 on CUDA devices of compute capability >= 8.0, else fp32"; break;
        case Precision::F32: description = "32-bit float"; break;
        case Precision::F16: description = "16-bit float (the SDXL VAE overflows in fp16)"; break;
        case Precision::BF16: description = "bfloat16"; break;
      }
      values[i++] = {static_cast<gint>(p), description, gstvae::precision_name(p)};
    }
    g_once_init_leave(&type, g_enum_register_static("GstVaePrecision", values));
  }
  return type;
}

static CommonSettings settings_snapshot(GstVaeBatch* self) {
  GST_OBJECT_LOCK(self);
  CommonSettings s = priv(self).settings;
  GST_OBJECT_UNLOCK(self);
  return s;
}

void gst_vae_batch_model_facts(GstVaeBatch* self, int* scale, int* channels) {
  GST_OBJECT_LOCK(self);
  *scale = priv(self).facts.scale;
  *channels = priv(self).facts.channels;
  GST_OBJECT_UNLOCK(self);
}

void gst_vae_batch_class_add_pad_templates(GstVaeBatchClass* klass, const char* sink_caps, const char* src_caps) {
  GstElementClass* element_class = GST_ELEMENT_CLASS(klass);
  for (int i = 0; i < 2; ++i) {
    GstCaps* caps = gst_caps_from_string(i == 0 ? sink_caps : src_caps);
    gst_element_class_add_pad_template(element_class, gst_pad_template_new(i == 0 ? "sink" : "src",
                                                                           i == 0 ? GST_PAD_SINK : GST_PAD_SRC,
                                                                           GST_PAD_ALWAYS, caps));
    gst_caps_unref(caps);
  }
}

int gst_vae_batch_temporal_downscale(GstVaeBatch* self) {
  GST_OBJECT_LOCK(self);
  const int n = priv(self).facts.temporal;
  GST_OBJECT_UNLOCK(self);
  return n;
}

guint64 gst_vae_batch_outputs(GstVaeBatch* self) {
  GST_OBJECT_LOCK(self);
  const guint64 n = priv(self).stats.outputs;
  GST_OBJECT_UNLOCK(self);
  return n;
}

/* ------------------------------------------------------------------ jobs */

const InputMeta* Job::input_meta(guint64 index) const {
  if (held && index >= held->first_index && index - held->first_index < held->metas.size())
    return &held->metas[index - held->first_index];
  if (index >= first_index && index - first_index < metas.size()) return &metas[index - first_index];
  return nullptr;
}

std::vector<GstBuffer*> Job::outputs(GstMemory* memory, size_t output_bytes, const std::vector<gstvae::Span>& spans,
                                     uint32_t padded) const {
  GstBuffer* all = gst_buffer_new();
  gst_buffer_append_memory(all, memory);
  std::vector<GstBuffer*> out;
  auto fail = [&](size_t i, const gstvae::Span& span) {
    for (GstBuffer* b : out) gst_buffer_unref(b);
    gst_buffer_unref(all);
    std::string known = std::to_string(first_index) + "+" + std::to_string(metas.size());
    if (held && !held->metas.empty())
      known = std::to_string(held->first_index) + "+" + std::to_string(held->metas.size()) + " (held) and " + known;
    throw gstvae::VaeError("output " + std::to_string(i) + " covers inputs " + std::to_string(span.first) + "+" +
                           std::to_string(span.count) + ", outside the inputs known to the batch, " + known);
  };
  for (size_t i = 0; i < spans.size(); ++i) {
    const gstvae::Span& span = spans[i];
    const InputMeta* first = span.count ? input_meta(span.first) : nullptr;
    if (!first) fail(i, span);
    // The last span of a padded clip end may name the copies of the last
    // frame: they add no time.
    const uint32_t copies = i + 1 == spans.size() ? std::min<uint32_t>(padded, span.count - 1) : 0;
    const InputMeta* last = first;
    GstClockTime duration = first->duration;
    for (uint32_t k = 1; k < span.count; ++k) {
      const InputMeta* m = input_meta(span.first + k);
      if (!m) {
        if (k < span.count - copies) fail(i, span);
        break;
      }
      last = m;
      if (duration != GST_CLOCK_TIME_NONE)
        duration = m->duration == GST_CLOCK_TIME_NONE ? GST_CLOCK_TIME_NONE : duration + m->duration;
    }
    // Each output shares the batch's memory: no copy.
    GstBuffer* b = gst_buffer_copy_region(all, GST_BUFFER_COPY_MEMORY, i * output_bytes, output_bytes);
    if (span.parts <= 1) {
      GST_BUFFER_PTS(b) = first->pts;
      GST_BUFFER_DTS(b) = first->dts;
      GST_BUFFER_DURATION(b) = duration != GST_CLOCK_TIME_NONE ? duration : frame_duration;
      GST_BUFFER_OFFSET(b) = first->offset;
      GST_BUFFER_OFFSET_END(b) = last->offset_end;
      if (first->discont) GST_BUFFER_FLAG_SET(b, GST_BUFFER_FLAG_DISCONT);
    } else {
      // Part k of a latent's n frames: the k-th n-th of its time (or of
      // frame_duration each where the latent has no duration), frame offsets
      // from its first.
      GstClockTime start = GST_CLOCK_TIME_NONE, length = GST_CLOCK_TIME_NONE;
      if (duration != GST_CLOCK_TIME_NONE) {
        start = gst_util_uint64_scale(duration, span.part, span.parts);
        length = gst_util_uint64_scale(duration, span.part + 1, span.parts) - start;
      } else if (frame_duration != GST_CLOCK_TIME_NONE) {
        start = frame_duration * span.part;
        length = frame_duration;
      } else if (span.part == 0) {
        start = 0;
      }
      auto shifted = [&](GstClockTime t) {
        return t == GST_CLOCK_TIME_NONE || start == GST_CLOCK_TIME_NONE ? GST_CLOCK_TIME_NONE : t + start;
      };
      GST_BUFFER_PTS(b) = shifted(first->pts);
      GST_BUFFER_DTS(b) = shifted(first->dts);
      GST_BUFFER_DURATION(b) = length;
      GST_BUFFER_OFFSET(b) = first->offset == GST_BUFFER_OFFSET_NONE ? GST_BUFFER_OFFSET_NONE : first->offset + span.part;
      GST_BUFFER_OFFSET_END(b) =
          first->offset == GST_BUFFER_OFFSET_NONE ? GST_BUFFER_OFFSET_NONE : first->offset + span.part + 1;
      // DISCONT on the first frame made of the input, which need not be
      // part 0: TAEHV gives a clip's first latent only its last quarter.
      // (All of a latent's frames come from one job.)
      const bool first_of_input = span.part == 0 || i == 0 || spans[i - 1].first != span.first;
      if (first->discont && first_of_input) GST_BUFFER_FLAG_SET(b, GST_BUFFER_FLAG_DISCONT);
    }
    out.push_back(b);
  }
  gst_buffer_unref(all);
  return out;
}

void Job::keep_held(size_t held_frames) {
  if (!held) return;
  HeldInputs& h = *held;
  if (!metas.empty()) {
    if (!h.metas.empty() && h.first_index + h.metas.size() != first_index) {
      // Not the inputs that came right before: the session cannot hold those.
      GST_WARNING("held inputs %" G_GUINT64_FORMAT "+%zu do not precede this batch's %" G_GUINT64_FORMAT
                  ": forgetting them",
                  h.first_index, h.metas.size(), first_index);
      h.metas.clear();
    }
    if (h.metas.empty()) h.first_index = first_index;
    h.metas.insert(h.metas.end(), metas.begin(), metas.end());
  }
  if (held_frames < h.metas.size()) {
    const size_t drop = h.metas.size() - held_frames;
    h.metas.erase(h.metas.begin(), h.metas.begin() + drop);
    h.first_index += drop;
  }
  h.held.store(h.metas.size());
}

void Job::forget_held() {
  if (!held) return;
  held->metas.clear();
  held->first_index = first_index;
  held->held.store(0);
}

/* ------------------------------------------------------ worker callbacks */

static void post_progress(GstVaeBatch* self, guint batch_inputs, GstClockTime batch_time) {
  GST_OBJECT_LOCK(self);
  Stats st = priv(self).stats;
  GST_OBJECT_UNLOCK(self);
  const double fps = batch_time ? batch_inputs * static_cast<double>(GST_SECOND) / batch_time : 0.0;
  GST_INFO_OBJECT(self, "batch %" G_GUINT64_FORMAT ": %u inputs in %.3f s (%.2f/s), %" G_GUINT64_FORMAT
                  " outputs done, %.2f/s on average",
                  st.batches, batch_inputs, batch_time / 1e9, fps, st.outputs, st.average_fps());
  GstStructure* s = gst_structure_new(klass_of(self)->progress_message, "frames", G_TYPE_UINT64, st.outputs,
                                      "batches", G_TYPE_UINT64, st.batches, "batch-frames", G_TYPE_UINT,
                                      batch_inputs, "batch-time", G_TYPE_UINT64, batch_time, "fps", G_TYPE_DOUBLE,
                                      fps, "average-fps", G_TYPE_DOUBLE, st.average_fps(), nullptr);
  gst_element_post_message(GST_ELEMENT(self), gst_message_new_element(GST_OBJECT(self), s));
}

// Re-announces latency when the processing estimate moved by more than a
// quarter (and a millisecond) from what the last latency query reported.
static void maybe_post_latency(GstVaeBatch* self) {
  GST_OBJECT_LOCK(self);
  Private& p = priv(self);
  const GstClockTime estimate = p.stats.processing_estimate();
  const GstClockTime old = p.facts.reported_latency;
  const GstClockTime diff = estimate > old ? estimate - old : old - estimate;
  const bool changed = diff > GST_MSECOND && diff * 4 > old;
  if (changed) p.facts.reported_latency = estimate;
  GST_OBJECT_UNLOCK(self);
  if (changed) gst_element_post_message(GST_ELEMENT(self), gst_message_new_latency(GST_OBJECT(self)));
}

static void job_done(GstVaeBatch* self, gstvae_glue::BatchJob& base_job, size_t outputs, GstClockTime elapsed) {
  Job& job = static_cast<Job&>(base_job);
  const size_t n = job.inputs();
  GST_OBJECT_LOCK(self);
  Stats& st = priv(self).stats;
  st.batches++;
  st.outputs += outputs;
  st.inputs_done += n;
  st.last_batch_time = elapsed;
  st.total_time += elapsed;
  st.add_batch_time(job.prepare_time + elapsed);
  GST_OBJECT_UNLOCK(self);
  post_progress(self, static_cast<guint>(n), elapsed);
  maybe_post_latency(self);
}

static BatchWorker::Callbacks worker_callbacks(GstVaeBatch* self) {
  BatchWorker::Callbacks cb;
  cb.push = [self](GstBuffer* b) { return gst_pad_push(GST_BASE_TRANSFORM_SRC_PAD(self), b); };
  cb.push_event = [self](GstEvent* e) { gst_pad_push_event(GST_BASE_TRANSFORM_SRC_PAD(self), e); };
  cb.failed = [self](const std::string& error) {
    GST_ELEMENT_ERROR(self, STREAM, FAILED, ("%s failed", GST_ELEMENT_NAME(self)), ("%s", error.c_str()));
  };
  cb.failed_flushed = [self](const std::string& error) {
    GST_WARNING_OBJECT(self, "a flushed batch failed: %s", error.c_str());
  };
  cb.done = [self](gstvae_glue::BatchJob& job, size_t outputs, GstClockTime elapsed) {
    job_done(self, job, outputs, elapsed);
  };
  return cb;
}

/* ------------------------------------------------------- streaming side */

// Makes a job of the staged inputs and hands it to the worker, waiting while
// another job is already waiting there. With `end_of_clip` (temporal models)
// the job ends the clip, even with no inputs.
static GstFlowReturn hand_over(GstVaeBatch* self, bool end_of_clip = false) {
  Streaming& st = priv(self).state;
  if (!st.direction || (st.pending.empty() && !end_of_clip)) return GST_FLOW_OK;
  std::unique_ptr<Job> job;
  const auto start = std::chrono::steady_clock::now();
  try {
    job = st.direction->take(end_of_clip);
  } catch (const std::exception& e) {
    st.drop_pending();
    GST_ELEMENT_ERROR(self, STREAM, FAILED, ("%s failed", GST_ELEMENT_NAME(self)), ("%s", e.what()));
    return GST_FLOW_ERROR;
  }
  job->prepare_time =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
  job->metas = std::move(st.pending);
  job->first_index = job->metas.empty() ? st.input_index : st.first_pending_index;
  job->end_of_clip = end_of_clip;
  job->held = st.held;
  st.pending.clear();
  st.first_pending_index = st.input_index;
  return priv(self).worker->submit(std::move(job));
}

// A temporal model's clip ends (EOS, a new stream, a caps change, a DISCONT
// input): the staged inputs go to the session as the clip's last job, or,
// with none staged, a job of no inputs when the session may still hold frames
// of the clip (an incomplete group, to drop or pad). The next input starts a
// new clip. `may_wait`: the caller drains anyway, so it may wait for the jobs
// in flight to learn whether the session holds anything; otherwise a job of no
// inputs is sent unless the worker is idle with nothing held. Image models:
// only hands the staged inputs over.
static GstFlowReturn end_clip(GstVaeBatch* self, bool may_wait) {
  Private& p = priv(self);
  Streaming& st = p.state;
  if (!st.clips || !st.direction) return hand_over(self);
  if (!st.clip_open) return GST_FLOW_OK;  // nothing staged since the last clip end or reset
  st.clip_open = false;
  GstFlowReturn ret = GST_FLOW_OK;
  bool needed = !st.pending.empty();
  if (!needed && may_wait) {
    ret = p.worker->wait_idle();
    needed = ret == GST_FLOW_OK && st.held->held.load() > 0;
  } else if (!needed) {
    needed = p.worker->busy() || st.held->held.load() > 0;
  }
  if (needed) {
    GST_DEBUG_OBJECT(self, "clip ends after %zu staged inputs (the session held %zu before)", st.pending.size(),
                     st.held->held.load());
    ret = hand_over(self, true);
  }
  st.direction->reset();
  return ret;
}

// Timer thread: the oldest staged input has waited batch-timeout, or
// per-batch or batch-timeout changed while inputs waited.
static void timer_expired(GstVaeBatch* self) {
  // The streaming thread may be inside chain; take its lock like it would.
  GST_PAD_STREAM_LOCK(GST_BASE_TRANSFORM_SINK_PAD(self));
  Private& p = priv(self);
  Streaming& st = p.state;
  if (!p.timer->stopping() && st.direction && !st.pending.empty()) {
    const CommonSettings s = settings_snapshot(self);
    const GstClockTime now = st.arrival_clock ? gst_clock_get_time(st.arrival_clock) : 0;
    const GstClockTime age = now > st.oldest_arrival ? now - st.oldest_arrival : 0;
    GstFlowReturn ret = GST_FLOW_OK;
    if (st.pending.size() >= s.per_batch) {
      // per-batch was lowered while inputs waited: that batch is full now.
      GST_DEBUG_OBJECT(self, "per-batch lowered to %u: running the %zu waiting inputs", s.per_batch,
                       st.pending.size());
      ret = hand_over(self);
    } else if (s.batch_timeout && st.arrival_clock && age >= s.batch_timeout) {
      GST_DEBUG_OBJECT(self, "batch-timeout: running a partial batch of %zu inputs", st.pending.size());
      ret = hand_over(self);
    } else if (s.batch_timeout) {
      // batch-timeout was raised (or set) after the oldest input came.
      p.timer->arm(st.arrival_clock, st.oldest_arrival + s.batch_timeout);
    }
    if (ret != GST_FLOW_OK && st.timer_flow == GST_FLOW_OK) st.timer_flow = ret;
  }
  GST_PAD_STREAM_UNLOCK(GST_BASE_TRANSFORM_SINK_PAD(self));
}

/* ------------------------------------------------------- refusal errors */

// Set while the streaming thread decides whether this stream's caps can be
// taken (caps event, set_caps, a buffer without caps): an error posted then
// is a refusal of the stream (see post_message below).
namespace {

thread_local bool checking_stream = false;

struct CheckingStream {
  CheckingStream() { checking_stream = true; }
  ~CheckingStream() { checking_stream = false; }
};

}  // namespace

// How long a refusal waits after the pipeline's state change returned, so
// that the application is listening (see wait_for_listener()).
constexpr auto kRefusalGrace = std::chrono::milliseconds(100);
// The longest a refusal waits for the pipeline's set_state() to return.
constexpr auto kRefusalMaxWait = std::chrono::seconds(5);

// A stream is refused on its first caps, on the streaming thread, usually
// while the application's gst_element_set_state() that started streaming is
// still running or has only just returned (the pipeline prerolling). An
// application that quits its main loop from a bus handler then misses an
// error posted before its loop runs (gst-launch-1.0's sync handler quits a
// loop not yet running, and waits forever). So a refusal waits until the
// top-level element's state lock is free (its set_state() returned) and,
// while a state change is still pending, a little longer, before its error
// is posted; meanwhile the refused data waits too, so the source's own
// not-negotiated error comes after it. Never waits once the pad flushes
// (the pipeline stopping), nor for a set_state() this thread is inside.
static void wait_for_listener(GstVaeBatch* self) {
  GstElement* top = GST_ELEMENT(gst_object_ref(self));
  while (GstObject* parent = gst_object_get_parent(GST_OBJECT(top))) {
    gst_object_unref(top);
    top = GST_ELEMENT(parent);
  }
  GstPad* sink = GST_BASE_TRANSFORM_SINK_PAD(self);
  const auto start = std::chrono::steady_clock::now();
  bool waited = false;
  while (!GST_PAD_IS_FLUSHING(sink) && std::chrono::steady_clock::now() - start < kRefusalMaxWait) {
    if (g_rec_mutex_trylock(GST_STATE_GET_LOCK(top))) {
      g_rec_mutex_unlock(GST_STATE_GET_LOCK(top));
      break;
    }
    waited = true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  GST_OBJECT_LOCK(top);
  const bool pending = GST_STATE_PENDING(top) != GST_STATE_VOID_PENDING;
  GST_OBJECT_UNLOCK(top);
  if (waited || pending) {
    const auto until = std::chrono::steady_clock::now() + kRefusalGrace;
    while (!GST_PAD_IS_FLUSHING(sink) && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  gst_object_unref(top);
}

static gboolean gst_vae_batch_post_message(GstElement* element, GstMessage* message) {
  if (GST_MESSAGE_TYPE(message) == GST_MESSAGE_ERROR && checking_stream) wait_for_listener(GST_VAE_BATCH(element));
  return GST_ELEMENT_CLASS(gst_vae_batch_parent_class)->post_message(element, message);
}

/* ------------------------------------------------------------- lifecycle */

static gboolean gst_vae_batch_start(GstBaseTransform* trans) {
  GstVaeBatch* self = GST_VAE_BATCH(trans);
  Private& p = priv(self);
  const CommonSettings s = settings_snapshot(self);
  if (s.model.empty()) {
    GST_ELEMENT_ERROR(self, RESOURCE, NOT_FOUND, ("No VAE model given"),
                      ("set the 'model' property to a .safetensors VAE or full checkpoint"));
    return FALSE;
  }
  try {
    p.state.direction.reset(klass_of(self)->open(self, s));
  } catch (const gstvae::VaeError& e) {
    GST_ELEMENT_ERROR(self, RESOURCE, SETTINGS, ("Could not use VAE model '%s'", s.model.c_str()), ("%s", e.what()));
    return FALSE;
  } catch (const std::exception& e) {
    GST_ELEMENT_ERROR(self, RESOURCE, OPEN_READ, ("Could not load VAE model '%s'", s.model.c_str()),
                      ("%s", e.what()));
    return FALSE;
  }
  if (s.device == "auto") {
    // A CUDA build without a GPU or driver: said once per process, by the
    // first element that loads a model, not once per element.
    const std::string note = gstvae::take_no_cuda_device_note();
    if (!note.empty())
      GST_ELEMENT_INFO(self, RESOURCE, SETTINGS, ("No CUDA device: running on the CPU"), ("%s", note.c_str()));
  }
  p.state.pending.clear();
  p.state.clips = p.state.direction->has_clips();
  p.state.clip_open = false;
  p.state.held = std::make_shared<HeldInputs>();
  p.state.input_index = 0;
  p.state.first_pending_index = 0;
  p.state.timer_flow = GST_FLOW_OK;
  p.state.tags_sent = false;
  p.state.forget_refusals();
  GST_OBJECT_LOCK(self);
  p.stats = Stats();
  p.facts = Facts();
  p.facts.scale = p.state.direction->scale();
  p.facts.channels = p.state.direction->channels();
  p.facts.temporal = std::max(1, p.state.direction->temporal_downscale());
  GST_OBJECT_UNLOCK(self);
  p.timer->start([self] { timer_expired(self); },
                 [self] {
                   // The pipeline's clock once it has one (PLAYING; a
                   // GstTestClock in tests), the system clock before.
                   GstClock* clock = gst_element_get_clock(GST_ELEMENT(self));
                   return clock ? clock : gst_system_clock_obtain();
                 });
  p.worker->start();
  return TRUE;
}

static gboolean gst_vae_batch_stop(GstBaseTransform* trans) {
  GstVaeBatch* self = GST_VAE_BATCH(trans);
  Private& p = priv(self);
  // Staged inputs are dropped, not run: the pipeline is shutting down. The
  // base class calls this after taking and releasing the stream lock, not
  // under it, so the batch-timeout thread (which takes that lock) could still
  // hand a batch over: wake it if it waits for a slot, and join it before the
  // streaming state is touched. The pads are inactive, so nothing the worker
  // pushes gets through; it needs no stream lock and is joined next.
  p.worker->set_flushing();
  p.timer->stop();
  p.worker->stop();
  p.state.drop_pending();
  p.state.direction.reset();
  p.state.forget_refusals();
  GST_OBJECT_LOCK(self);
  p.facts = Facts();
  GST_OBJECT_UNLOCK(self);
  return TRUE;
}

static GstStateChangeReturn gst_vae_batch_change_state(GstElement* element, GstStateChange transition) {
  GstVaeBatch* self = GST_VAE_BATCH(element);
  GstStateChangeReturn ret = GST_ELEMENT_CLASS(gst_vae_batch_parent_class)->change_state(element, transition);
  // stop() joins the timer thread; a failed start does not reach stop().
  if (transition == GST_STATE_CHANGE_PAUSED_TO_READY || ret == GST_STATE_CHANGE_FAILURE) priv(self).timer->stop();
  return ret;
}

/* ------------------------------------------------------------------ caps */

static gboolean gst_vae_batch_set_caps(GstBaseTransform* trans, GstCaps* incaps, GstCaps* outcaps) {
  GstVaeBatch* self = GST_VAE_BATCH(trans);
  Streaming& st = priv(self).state;
  if (!st.direction) return FALSE;
  if (st.refused(incaps)) return FALSE;  // its error is on the bus already
  CheckingStream checking;
  // A renegotiation asked by downstream (RECONFIGURE) comes here from
  // submit_input_buffer, not after a drain: outputs already handed to the
  // worker were made for the current output caps and go out before the base
  // class sets the new ones on the src pad. (After a caps event's drain there
  // is nothing to wait for.)
  priv(self).worker->wait_idle();
  if (!st.direction->set_caps(incaps, outcaps)) {
    st.refuse(incaps);
    return FALSE;
  }
  GstStructure* s = gst_caps_get_structure(incaps, 0);
  gint fps_n = 0, fps_d = 1;
  if (!gst_structure_get_fraction(s, "framerate", &fps_n, &fps_d)) fps_n = 0, fps_d = 1;
  GST_OBJECT_LOCK(self);
  priv(self).facts.fps_n = fps_n;
  priv(self).facts.fps_d = fps_d;
  GST_OBJECT_UNLOCK(self);
  GST_INFO_OBJECT(self, "input %" GST_PTR_FORMAT ", output %" GST_PTR_FORMAT, incaps, outcaps);
  return TRUE;
}

// The sink pad accepts any caps its template allows: whether this stream can
// take them (its model's channels, a large enough frame...) is decided when
// they arrive (Direction::accepts), where a refusal can say why. The default
// check, against a caps query through the transform, refuses them at the
// pad before the element sees them, leaving only not-negotiated on the bus.
static gboolean gst_vae_batch_accept_caps(GstBaseTransform* trans, GstPadDirection direction, GstCaps* caps) {
  if (direction != GST_PAD_SINK)
    return GST_BASE_TRANSFORM_CLASS(gst_vae_batch_parent_class)->accept_caps(trans, direction, caps);
  GstCaps* allowed = gst_pad_get_pad_template_caps(GST_BASE_TRANSFORM_SINK_PAD(trans));
  const gboolean ok = gst_caps_is_subset(caps, allowed);
  gst_caps_unref(allowed);
  GST_DEBUG_OBJECT(trans, "accept caps %" GST_PTR_FORMAT ": %d", caps, ok);
  return ok;
}

/* --------------------------------------------------------------- buffers */

static GstFlowReturn gst_vae_batch_submit_input_buffer(GstBaseTransform* trans, gboolean /*is_discont*/,
                                                       GstBuffer* input) {
  GstVaeBatch* self = GST_VAE_BATCH(trans);
  Private& p = priv(self);
  Streaming& st = p.state;
  if (st.timer_flow != GST_FLOW_OK) {
    GstFlowReturn ret = st.timer_flow;
    st.timer_flow = GST_FLOW_OK;
    gst_buffer_unref(input);
    return ret;
  }
  // A failed batch or push reaches upstream here.
  const GstFlowReturn flow = p.worker->take_flow();
  if (flow != GST_FLOW_OK) {
    gst_buffer_unref(input);
    return flow;
  }
  if (!st.direction || !st.direction->have_caps()) {
    gst_buffer_unref(input);
    CheckingStream checking;
    // After a refusal (its error posted) upstream may push on: one error
    // per stream.
    if (!st.negotiation_error_posted) {
      st.negotiation_error_posted = true;
      GST_ELEMENT_ERROR(self, CORE, NEGOTIATION, ("Received a buffer before caps"), (nullptr));
    }
    return GST_FLOW_NOT_NEGOTIATED;
  }
  // Overriding submit_input_buffer means renegotiating here (downstream may ask).
  if (!gst_base_transform_reconfigure(trans)) {
    gst_buffer_unref(input);
    return GST_PAD_IS_FLUSHING(GST_BASE_TRANSFORM_SRC_PAD(trans)) ? GST_FLOW_FLUSHING : GST_FLOW_NOT_NEGOTIATED;
  }
  if (!st.tags_sent) {
    // Provenance for sinks such as latentfilesink: the model's file name.
    gchar* base = g_path_get_basename(st.direction->model_path().c_str());
    gst_pad_push_event(GST_BASE_TRANSFORM_SRC_PAD(trans),
                       gst_event_new_tag(gst_tag_list_new(GST_TAG_VAE_MODEL, base, nullptr)));
    g_free(base);
    st.tags_sent = true;
  }
  if (st.clips && st.clip_open && GST_BUFFER_FLAG_IS_SET(input, GST_BUFFER_FLAG_DISCONT)) {
    // A discontinuity inside a clip: the frames before it end the old clip,
    // this one is frame 0 of a new one.
    p.timer->disarm();
    GST_DEBUG_OBJECT(self, "DISCONT at %" GST_TIME_FORMAT ": the clip ends before it",
                     GST_TIME_ARGS(GST_BUFFER_PTS(input)));
    const GstFlowReturn ret = end_clip(self, false);
    if (ret != GST_FLOW_OK) {
      gst_buffer_unref(input);
      return ret;
    }
  }
  const CommonSettings s = settings_snapshot(self);
  if (st.pending.empty()) st.first_pending_index = st.input_index;
  try {
    st.direction->add(input, st.input_index, s.per_batch);
  } catch (const std::exception& e) {
    gst_buffer_unref(input);
    GST_ELEMENT_ERROR(self, STREAM, FAILED, ("Could not stage the input"), ("%s", e.what()));
    return GST_FLOW_ERROR;
  }
  st.input_index++;
  st.clip_open = true;
  st.pending.push_back(InputMeta{GST_BUFFER_PTS(input), GST_BUFFER_DTS(input), GST_BUFFER_DURATION(input),
                                 GST_BUFFER_OFFSET(input), GST_BUFFER_OFFSET_END(input),
                                 GST_BUFFER_FLAG_IS_SET(input, GST_BUFFER_FLAG_DISCONT) != 0});
  // The input now lives in the staging batch: give the buffer back to its
  // pool at once (live sources such as v4l2src have only a few).
  gst_buffer_unref(input);
  GST_OBJECT_LOCK(self);
  p.stats.inputs++;
  GST_OBJECT_UNLOCK(self);

  // per-batch may have been lowered below the staging batch's capacity.
  if (st.direction->staging_full() || st.pending.size() >= s.per_batch) {
    p.timer->disarm();
    return hand_over(self);
  }
  if (st.pending.size() == 1) {
    GstClock* clock = nullptr;
    const GstClockTime now = p.timer->now(&clock);
    st.set_arrival(clock, now);
    if (s.batch_timeout) p.timer->arm(clock, now + s.batch_timeout);
  }
  return GST_FLOW_OK;
}

// Outputs are pushed by the push thread as soon as their batch is done, never
// handed to the base class here: it would mark its pending DISCONT on
// whatever buffer came out next, a batch later than the input that carried it.
static GstFlowReturn gst_vae_batch_generate_output(GstBaseTransform*, GstBuffer** outbuf) {
  *outbuf = nullptr;
  return GST_FLOW_OK;
}

/* ---------------------------------------------------------------- events */

static gboolean gst_vae_batch_sink_event(GstBaseTransform* trans, GstEvent* event) {
  GstVaeBatch* self = GST_VAE_BATCH(trans);
  Private& p = priv(self);
  Streaming& st = p.state;
  switch (GST_EVENT_TYPE(event)) {
    case GST_EVENT_CAPS: {
      // Upstream may resend the caps it already set: nothing changes then.
      GstCaps* caps;
      gst_event_parse_caps(event, &caps);
      GstCaps* current = gst_pad_get_current_caps(GST_BASE_TRANSFORM_SINK_PAD(trans));
      const bool same = current && gst_caps_is_equal(current, caps);
      if (current) gst_caps_unref(current);
      if (same) break;
      // Refused here, naming the cause, rather than in the negotiation that
      // follows (which says only not-negotiated); refused once (see
      // Streaming::refused_caps).
      if (st.refused(caps)) {
        GST_DEBUG_OBJECT(self, "caps refused already: %" GST_PTR_FORMAT, caps);
        gst_event_unref(event);
        return FALSE;
      }
      CheckingStream checking;
      if (st.direction && !st.direction->accepts(caps)) {
        st.refuse(caps);
        gst_event_unref(event);
        return FALSE;
      }
    }
      /* fall through */
    case GST_EVENT_EOS:
    case GST_EVENT_SEGMENT:
    case GST_EVENT_STREAM_START:
    case GST_EVENT_GAP:
    case GST_EVENT_SEGMENT_DONE:
    case GST_EVENT_STREAM_GROUP_DONE:
    case GST_EVENT_CUSTOM_DOWNSTREAM: {
      // Outputs of the inputs before this event go out first, with the old
      // caps. EOS, a new stream and new caps end a temporal model's clip.
      p.timer->disarm();
      GST_DEBUG_OBJECT(self, "draining %zu pending inputs before %s", st.pending.size(), GST_EVENT_TYPE_NAME(event));
      const GstEventType type = GST_EVENT_TYPE(event);
      const bool ends_clip = type == GST_EVENT_EOS || type == GST_EVENT_STREAM_START || type == GST_EVENT_CAPS;
      GstFlowReturn ret = ends_clip ? end_clip(self, true) : hand_over(self);
      const GstFlowReturn idle = p.worker->wait_idle();
      if (ret == GST_FLOW_OK) ret = idle;
      if (ret != GST_FLOW_OK && ret != GST_FLOW_FLUSHING)
        GST_WARNING_OBJECT(self, "draining before %s: %s", GST_EVENT_TYPE_NAME(event), gst_flow_get_name(ret));
      if (GST_EVENT_TYPE(event) == GST_EVENT_STREAM_START) {
        // A new stream drops the sticky tags of the last one: announce the
        // model again. Its first input starts a new clip.
        st.tags_sent = false;
        if (st.direction) st.direction->reset();
        st.clip_open = false;
      }
      break;
    }
    case GST_EVENT_FLUSH_START:
      // Any thread. Wakes a streaming thread waiting on the worker; the batch
      // being run cannot be stopped, its outputs will be dropped.
      p.worker->flush_start();
      break;
    case GST_EVENT_FLUSH_STOP:
      p.timer->disarm();
      GST_DEBUG_OBJECT(self, "flush: dropping %zu pending inputs", st.pending.size());
      st.drop_pending();
      if (st.direction) st.direction->reset();
      st.clip_open = false;
      st.timer_flow = GST_FLOW_OK;
      st.forget_refusals();
      p.worker->flush_stop();
      break;
    default:
      // Other serialized events (tags, which decoders send often, and the
      // rest) must not overtake the outputs of batches already handed over,
      // but do not cut the batch being gathered; the push thread sends them
      // after those outputs.
      if (GST_EVENT_IS_SERIALIZED(event) && p.worker->queue_event(event)) return TRUE;
      break;
  }
  return GST_BASE_TRANSFORM_CLASS(gst_vae_batch_parent_class)->sink_event(trans, event);
}

/* --------------------------------------------------------------- queries */

static gboolean gst_vae_batch_query(GstBaseTransform* trans, GstPadDirection direction, GstQuery* query) {
  GstVaeBatch* self = GST_VAE_BATCH(trans);
  if (direction != GST_PAD_SRC || GST_QUERY_TYPE(query) != GST_QUERY_LATENCY)
    return GST_BASE_TRANSFORM_CLASS(gst_vae_batch_parent_class)->query(trans, direction, query);

  GstPad* peer = gst_pad_get_peer(GST_BASE_TRANSFORM_SINK_PAD(trans));
  if (!peer) return FALSE;
  gboolean ok = gst_pad_query(peer, query);
  gst_object_unref(peer);
  if (!ok) return FALSE;

  gboolean live;
  GstClockTime min, max;
  gst_query_parse_latency(query, &live, &min, &max);
  const CommonSettings s = settings_snapshot(self);
  GST_OBJECT_LOCK(self);
  Private& p = priv(self);
  const GstClockTime batch_time = p.stats.processing_estimate();
  const gint fps_n = p.facts.fps_n, fps_d = p.facts.fps_d;
  const int temporal = p.facts.temporal;
  p.facts.reported_latency = batch_time;
  GST_OBJECT_UNLOCK(self);

  // An input waits for the (per-batch - 1) inputs after it, bounded by batch-timeout.
  GstClockTime wait = GST_CLOCK_TIME_NONE;
  if (fps_n > 0 && fps_d > 0)
    wait = gst_util_uint64_scale(static_cast<guint64>(s.per_batch) - 1, GST_SECOND * fps_d, fps_n);
  if (s.per_batch == 1) wait = 0;
  if (s.batch_timeout && (wait == GST_CLOCK_TIME_NONE || wait > s.batch_timeout)) wait = s.batch_timeout;
  // A temporal model's output also waits for the rest of its group: up to
  // (temporal - 1) inputs after its first, whatever the batching.
  if (temporal > 1) {
    const GstClockTime group = fps_n > 0 && fps_d > 0
                                   ? gst_util_uint64_scale(static_cast<guint64>(temporal) - 1, GST_SECOND * fps_d, fps_n)
                                   : GST_CLOCK_TIME_NONE;
    wait = wait == GST_CLOCK_TIME_NONE || group == GST_CLOCK_TIME_NONE ? GST_CLOCK_TIME_NONE : wait + group;
  }

  min += (wait == GST_CLOCK_TIME_NONE ? 0 : wait) + batch_time;
  if (max != GST_CLOCK_TIME_NONE) max = wait == GST_CLOCK_TIME_NONE ? GST_CLOCK_TIME_NONE : max + wait + batch_time;
  GST_DEBUG_OBJECT(self, "latency: batch (and group) wait %" GST_TIME_FORMAT " + processing %" GST_TIME_FORMAT
                   " -> min %" GST_TIME_FORMAT " max %" GST_TIME_FORMAT,
                   GST_TIME_ARGS(wait), GST_TIME_ARGS(batch_time), GST_TIME_ARGS(min), GST_TIME_ARGS(max));
  gst_query_set_latency(query, live, min, max);
  return TRUE;
}

/* ------------------------------------------------------------ properties */

static void gst_vae_batch_set_property(GObject* object, guint prop_id, const GValue* value, GParamSpec* pspec) {
  GstVaeBatch* self = GST_VAE_BATCH(object);
  if (prop_id == PROP_MODEL || prop_id == PROP_DEVICE || prop_id == PROP_PRECISION || prop_id == PROP_THREADS) {
    // The model is loaded when the element starts: these only apply in NULL/READY.
    GstState state = GST_STATE(self);
    if (state > GST_STATE_READY || GST_STATE_TARGET(self) > GST_STATE_READY) {
      g_warning("%s: property '%s' can only be changed in the NULL or READY state", GST_ELEMENT_NAME(self),
                pspec->name);
      return;
    }
  }
  GST_OBJECT_LOCK(self);
  CommonSettings& s = priv(self).settings;
  switch (prop_id) {
    case PROP_MODEL: s.model = g_value_get_string(value) ? g_value_get_string(value) : ""; break;
    case PROP_PER_BATCH: s.per_batch = g_value_get_uint(value); break;
    case PROP_DEVICE: s.device = g_value_get_string(value) ? g_value_get_string(value) : kDefaultDevice; break;
    case PROP_PRECISION: s.precision = g_value_get_enum(value); break;
    case PROP_BATCH_TIMEOUT: s.batch_timeout = g_value_get_uint64(value); break;
    case PROP_THREADS: s.threads = g_value_get_uint(value); break;
    default: G_OBJECT_WARN_INVALID_PROPERTY_ID(object, prop_id, pspec); break;
  }
  const bool look_now = (prop_id == PROP_BATCH_TIMEOUT && s.batch_timeout != 0) || prop_id == PROP_PER_BATCH;
  GST_OBJECT_UNLOCK(self);
  // Inputs may be waiting already: let the timer thread look at them now (it
  // hands them over if per-batch fell to their number, else re-arms for their
  // own deadline); this thread may not touch them.
  if (look_now) priv(self).timer->arm_now();
}

static void gst_vae_batch_get_property(GObject* object, guint prop_id, GValue* value, GParamSpec* pspec) {
  GstVaeBatch* self = GST_VAE_BATCH(object);
  if (prop_id == PROP_FRAMES_IN_FLIGHT) {
    g_value_set_uint64(value, priv(self).worker->inputs_in_flight());
    return;
  }
  GST_OBJECT_LOCK(self);
  const CommonSettings& s = priv(self).settings;
  const Stats& st = priv(self).stats;
  switch (prop_id) {
    case PROP_MODEL: g_value_set_string(value, s.model.c_str()); break;
    case PROP_PER_BATCH: g_value_set_uint(value, s.per_batch); break;
    case PROP_DEVICE: g_value_set_string(value, s.device.c_str()); break;
    case PROP_PRECISION: g_value_set_enum(value, s.precision); break;
    case PROP_BATCH_TIMEOUT: g_value_set_uint64(value, s.batch_timeout); break;
    case PROP_THREADS: g_value_set_uint(value, s.threads); break;
    case PROP_FRAMES_IN: g_value_set_uint64(value, st.inputs); break;
    case PROP_BATCHES: g_value_set_uint64(value, st.batches); break;
    case PROP_LAST_BATCH_TIME: g_value_set_uint64(value, st.last_batch_time); break;
    case PROP_AVERAGE_FPS: g_value_set_double(value, st.average_fps()); break;
    default: G_OBJECT_WARN_INVALID_PROPERTY_ID(object, prop_id, pspec); break;
  }
  GST_OBJECT_UNLOCK(self);
}

/* ------------------------------------------------------------- GObject */

static void gst_vae_batch_finalize(GObject* object) {
  GstVaeBatch* self = GST_VAE_BATCH(object);
  Private* p = &priv(self);
  p->timer->stop();
  p->worker->stop();
  p->state.drop_pending();
  p->state.direction.reset();
  p->worker.reset();
  p->timer.reset();
  delete p;  // the DeferredJoins last: it joins (or detaches) the threads left
  G_OBJECT_CLASS(gst_vae_batch_parent_class)->finalize(object);
}

static void gst_vae_batch_init(GstVaeBatch* self) {
  Private* p = new Private();
  static_cast<GstVaeBatchPrivate*>(gst_vae_batch_get_instance_private(self))->p = p;
  p->worker = std::make_unique<BatchWorker>(worker_callbacks(self), p->joins);
  p->timer = std::make_unique<BatchTimer>(p->joins);
  gst_base_transform_set_passthrough(GST_BASE_TRANSFORM(self), FALSE);
  gst_base_transform_set_in_place(GST_BASE_TRANSFORM(self), FALSE);
  gst_base_transform_set_qos_enabled(GST_BASE_TRANSFORM(self), FALSE);
}

static void gst_vae_batch_class_init(GstVaeBatchClass* klass) {
  GObjectClass* gobject_class = G_OBJECT_CLASS(klass);
  GstElementClass* element_class = GST_ELEMENT_CLASS(klass);
  GstBaseTransformClass* trans_class = GST_BASE_TRANSFORM_CLASS(klass);

  gobject_class->set_property = gst_vae_batch_set_property;
  gobject_class->get_property = gst_vae_batch_get_property;
  gobject_class->finalize = gst_vae_batch_finalize;

  const auto rw = static_cast<GParamFlags>(G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);
  const auto rw_ready = static_cast<GParamFlags>(rw | GST_PARAM_MUTABLE_READY);
  const auto rw_playing = static_cast<GParamFlags>(rw | GST_PARAM_MUTABLE_PLAYING);
  const auto ro = static_cast<GParamFlags>(G_PARAM_READABLE | G_PARAM_STATIC_STRINGS);

  g_object_class_install_property(
      gobject_class, PROP_MODEL,
      g_param_spec_string("model", "Model",
                          "Path to a .safetensors VAE (LDM or diffusers layout, or a TAESD-family file) or a full "
                          "checkpoint holding one under 'first_stage_model.' or 'vae.'; loaded when the element "
                          "starts",
                          nullptr, rw_ready));
  g_object_class_install_property(
      gobject_class, PROP_PER_BATCH,
      g_param_spec_uint("per-batch", "Inputs per batch",
                        "Inputs gathered and run together. Lowered to (or below) the number of inputs waiting: "
                        "they are run at once; raised: applies from the next batch",
                        1, 4096, kDefaultPerBatch, rw_playing));
  g_object_class_install_property(
      gobject_class, PROP_DEVICE,
      g_param_spec_string("device", "Device",
                          "Compute device: auto (CUDA when LibTorch has a GPU, else CPU), cpu, cuda or cuda:N. "
                          "An explicit CUDA request that cannot be met is an error",
                          kDefaultDevice, rw_ready));
  g_object_class_install_property(
      gobject_class, PROP_PRECISION,
      g_param_spec_enum("precision", "Precision", "Compute precision of the model; latents are always float32",
                        gst_vae_precision_get_type(), static_cast<gint>(Precision::Auto), rw_ready));
  g_object_class_install_property(
      gobject_class, PROP_BATCH_TIMEOUT,
      g_param_spec_uint64("batch-timeout", "Batch timeout",
                          "Run a partial batch once its oldest input has waited this long, in nanoseconds "
                          "(0 = always wait for a full batch or the end of the stream)",
                          0, G_MAXUINT64, 0, rw_playing));
  g_object_class_install_property(
      gobject_class, PROP_THREADS,
      g_param_spec_uint("threads", "CPU threads", "Intra-op CPU threads of LibTorch (process-wide), 0 = all cores",
                        0, 1024, 0, rw_ready));
  g_object_class_install_property(
      gobject_class, PROP_FRAMES_IN,
      g_param_spec_uint64("frames-in", "Inputs in", "Inputs (frames or latents) received since the element started",
                          0, G_MAXUINT64, 0, ro));
  g_object_class_install_property(
      gobject_class, PROP_BATCHES,
      g_param_spec_uint64("batches", "Batches", "Batches run since the element started", 0, G_MAXUINT64, 0, ro));
  g_object_class_install_property(
      gobject_class, PROP_LAST_BATCH_TIME,
      g_param_spec_uint64("last-batch-time", "Last batch time", "Time the last batch took to run, in nanoseconds", 0,
                          G_MAXUINT64, 0, ro));
  g_object_class_install_property(
      gobject_class, PROP_AVERAGE_FPS,
      g_param_spec_double("average-fps", "Average inputs/s",
                          "Inputs processed per second of model time since the element started", 0, G_MAXDOUBLE, 0,
                          ro));
  g_object_class_install_property(
      gobject_class, PROP_FRAMES_IN_FLIGHT,
      g_param_spec_uint64("frames-in-flight", "Inputs in flight",
                          "Inputs of full (or drained) batches handed to the work thread whose outputs have not "
                          "been pushed yet (waiting, running, or queued for the push thread); inputs of the batch "
                          "being gathered are not counted",
                          0, G_MAXUINT64, 0, ro));

  element_class->change_state = GST_DEBUG_FUNCPTR(gst_vae_batch_change_state);
  element_class->post_message = GST_DEBUG_FUNCPTR(gst_vae_batch_post_message);
  trans_class->start = GST_DEBUG_FUNCPTR(gst_vae_batch_start);
  trans_class->stop = GST_DEBUG_FUNCPTR(gst_vae_batch_stop);
  trans_class->set_caps = GST_DEBUG_FUNCPTR(gst_vae_batch_set_caps);
  trans_class->accept_caps = GST_DEBUG_FUNCPTR(gst_vae_batch_accept_caps);
  trans_class->submit_input_buffer = GST_DEBUG_FUNCPTR(gst_vae_batch_submit_input_buffer);
  trans_class->generate_output = GST_DEBUG_FUNCPTR(gst_vae_batch_generate_output);
  trans_class->sink_event = GST_DEBUG_FUNCPTR(gst_vae_batch_sink_event);
  trans_class->query = GST_DEBUG_FUNCPTR(gst_vae_batch_query);
  trans_class->passthrough_on_same_caps = FALSE;
  klass->progress_message = "vae-progress";

  gst_type_mark_as_plugin_api(gst_vae_precision_get_type(), static_cast<GstPluginAPIFlags>(0));
  gst_type_mark_as_plugin_api(GST_TYPE_VAE_BATCH, static_cast<GstPluginAPIFlags>(0));
  GST_DEBUG_CATEGORY_INIT(vae_batch_debug, "vaebatch", 0, "gst-vae batching element base");
}
