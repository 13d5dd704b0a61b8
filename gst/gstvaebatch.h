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

// A batch of staged inputs and their metadata, ready for the worker.
class Job : public BatchJob {
 public:
  size_t inputs() const override { return metas.size(); }
  std::vector<InputMeta> metas;  // of inputs first_index, first_index + 1, ...
  guint64 first_index = 0;
  GstClockTime prepare_time = 0;  // spent preparing it on the streaming thread

 protected:
  // Wraps `memory` (holding the outputs back to back, `output_bytes` each)
  // into one buffer per span, sharing the memory. An output's PTS, DTS,
  // offset and DISCONT come from the first input it covers; its duration is
  // the sum of the durations of the inputs it covers. Takes `memory`.
  std::vector<GstBuffer*> outputs(GstMemory* memory, size_t output_bytes,
                                  const std::vector<gstvae::Span>& spans) const;
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
  // Throws std::exception.
  virtual std::unique_ptr<Job> take() = 0;
  virtual void drop_staged() = 0;
  // The next input starts a new clip (flush, new stream).
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
// Adds the always sink and src pad templates of these caps.
void gst_vae_batch_class_add_pad_templates(GstVaeBatchClass* klass, const char* sink_caps, const char* src_caps);
GType gst_vae_precision_get_type(void);
