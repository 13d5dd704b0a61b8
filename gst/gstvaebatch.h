/* GstVaeBatch: the abstract base of gst-vae's model elements (vaeencode,
 * vaedecode). It owns what they share: the properties model, device,
 * precision, threads, per-batch and batch-timeout and the statistics;
 * gathering inputs into batches and handing them to a BatchWorker; the batch
 * timer; events, flushes, latency and progress messages. A subclass supplies a
 * Direction per stream (load the model, parse the caps, stage an input, make
 * a job of the staged inputs) and its caps transform. GObject glue only: no
 * LibTorch here. */
#pragma once

#include <gst/base/gstbasetransform.h>
#include <gst/gst.h>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "batch_worker.h"

G_BEGIN_DECLS

#define GST_TYPE_VAE_BATCH (gst_vae_batch_get_type())
G_DECLARE_DERIVABLE_TYPE(GstVaeBatch, gst_vae_batch, GST, VAE_BATCH, GstBaseTransform)

G_END_DECLS

namespace gstvae { struct Span; }

namespace gstvae_glue {

// The shared settings, as a Direction sees them when its stream opens.
struct CommonSettings {
  std::string model;
  guint per_batch = 16;
  std::string device = "auto";
  int precision = 0;  // gstvae::Precision
  guint64 batch_timeout = 0;
  guint threads = 0;
};

// What an output inherits from the inputs it covers.
struct InputMeta {
  GstClockTime pts, dts, duration;
  guint64 offset, offset_end;
  bool discont;
};

// The metadata of the inputs a stream's session holds from earlier jobs (a
// temporal model's incomplete group), so that an output whose span reaches
// back into them gets their timestamps. One per stream, shared by its jobs.
//
// Thread rule: `metas` and `first_index` are touched only on the work thread,
// by the jobs' run(), in job order, as the session they mirror is (a job
// resolves its spans against them, then keeps what the session still holds,
// and forgets them when it resets the session). `held` is their count as of
// the last job that ran: written there, read by the streaming thread (after
// waiting for the worker to be idle, when it decides whether a clip end needs
// a job of its own).
struct HeldInputs {
  std::vector<InputMeta> metas;  // of inputs first_index, first_index + 1, ...
  guint64 first_index = 0;
  std::atomic<size_t> held{0};
};

// A batch of staged inputs and their metadata, ready for the worker. A job
// that ends a temporal model's clip may have no inputs: it makes the session
// drop (or pad) the frames it holds.
class Job : public BatchJob {
 public:
  size_t inputs() const override { return metas.size(); }
  std::vector<InputMeta> metas;  // of inputs first_index, first_index + 1, ...
  guint64 first_index = 0;
  GstClockTime prepare_time = 0;  // spent preparing it on the streaming thread
  bool end_of_clip = false;       // the clip ends after these inputs
  std::shared_ptr<HeldInputs> held;  // the stream's; may be null (nothing held)
  // A video decoder's frame duration from its output caps: the duration of
  // each of its frames whose latent has none. NONE elsewhere.
  GstClockTime frame_duration = GST_CLOCK_TIME_NONE;

 protected:
  // Wraps `memory` (holding the outputs back to back, `output_bytes` each)
  // into one buffer per span, sharing the memory. An output's PTS, DTS,
  // offset and DISCONT come from the first input it covers; its duration is
  // the sum of the durations of the inputs it covers, which may be inputs of
  // earlier jobs the session held. An output that is part k of n of one
  // input (a video decoder's frames of a latent) gets the k-th n-th of that
  // input's time, offset + k, and DISCONT only as part 0. A span of a padded clip end may reach up
  // to `padded` inputs past the last one: those copies add no time. Takes
  // `memory`. Throws VaeError for a span over unknown inputs. Work thread.
  std::vector<GstBuffer*> outputs(GstMemory* memory, size_t output_bytes, const std::vector<gstvae::Span>& spans,
                                  uint32_t padded = 0) const;
  // Work thread, in run(): the metadata of input `index` (this job's or one
  // the session held), or null.
  const InputMeta* input_meta(guint64 index) const;
  // Work thread, at the end of run(): the session now holds the last
  // `held_frames` inputs it was given; keep their metadata for later jobs.
  void keep_held(size_t held_frames);
  // Work thread: the session was reset; what it held is gone.
  void forget_held();
};

// One stream of a GstVaeBatch subclass: its model, caps and staging. Made by
// the class's `open` at start, destroyed at stop. Called only with the sink
// pad's stream lock held (streaming thread, serialized events, batch timer),
// except where noted.
class Direction {
 public:
  virtual ~Direction() = default;
  // The model's file (the vae-model tag), its scale (pixels per latent cell)
  // and its latent channels, for caps queries.
  virtual std::string model_path() const = 0;
  virtual int scale() const = 0;
  virtual int channels() const = 0;
  // Inputs per output of a temporal model (4 for the causal video VAEs'
  // encoders), whose session regroups inputs across jobs and which makes an
  // output wait for the rest of its group; 1 otherwise.
  virtual int temporal_downscale() const { return 1; }
  // Whether the session carries state from input to input within a clip (a
  // video model, either direction): then clip ends (EOS, a new stream, new
  // caps, a DISCONT input) reach it as jobs with end_of_clip.
  virtual bool has_clips() const { return temporal_downscale() > 1; }
  // Whether the stream can take these input caps, asked when a caps event
  // arrives, before the base class negotiates the output: a refusal during
  // negotiation would only say not-negotiated, so the cause (too few
  // pixels, another model's latents...) is named here. Posts its own element
  // error and returns false when it cannot take them. The sink pad accepts
  // any caps of its template, so this is where a stream is refused.
  virtual bool accepts(GstCaps* incaps) = 0;
  // New input caps (the worker is drained). Posts its own element error and
  // returns false when it cannot take them.
  virtual bool set_caps(GstCaps* incaps, GstCaps* outcaps) = 0;
  virtual bool have_caps() const = 0;
  // Stages one input; `index` counts inputs from the start of the stream.
  // Throws std::exception with a message naming what is wrong.
  virtual void add(GstBuffer* input, guint64 index, guint per_batch) = 0;
  virtual size_t staged() const = 0;
  virtual bool staging_full() const = 0;
  // The staged inputs as a job (prepared where the model can do that ahead).
  // With `end_of_clip` (temporal models only) the job ends the clip, and may
  // then have no inputs. Throws std::exception.
  virtual std::unique_ptr<Job> take(bool end_of_clip) = 0;
  virtual void drop_staged() = 0;
  // The next input starts a new clip (flush, new stream, a clip ended).
  virtual void reset() = 0;
};

}  // namespace gstvae_glue

struct _GstVaeBatchClass {
  GstBaseTransformClass parent_class;
  // Name of the element message posted after every batch.
  const char* progress_message;
  // Loads the model and opens a stream. Throws gstvae::VaeError for a bad
  // setting, other std::exceptions for a model that cannot be loaded.
  gstvae_glue::Direction* (*open)(GstVaeBatch* self, const gstvae_glue::CommonSettings& settings);
};

// Outputs produced since the element started (for a subclass's property).
guint64 gst_vae_batch_outputs(GstVaeBatch* self);
// The loaded model's scale and latent channels (8 and 0 before one is
// loaded), for caps transforms on any thread.
void gst_vae_batch_model_facts(GstVaeBatch* self, int* scale, int* channels);
// The loaded model's inputs per output (1 before one is loaded, and for image
// models), for caps transforms on any thread.
int gst_vae_batch_temporal_downscale(GstVaeBatch* self);
// Adds the always sink and src pad templates of these caps.
void gst_vae_batch_class_add_pad_templates(GstVaeBatchClass* klass, const char* sink_caps, const char* src_caps);
GType gst_vae_precision_get_type(void);
