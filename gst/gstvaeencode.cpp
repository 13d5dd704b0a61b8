/**
 * SECTION:element-vaeencode
 * @title: vaeencode
 *
 * Gathers `per-batch` video frames, crops them to a multiple of the model's
 * downscale as ComfyUI does, encodes them with a VAE encoder (the KL
 * autoencoders of SD 1.x/2.x, SDXL, SD3 and Flux.1, or a TAESD-family tiny
 * autoencoder) and pushes one application/x-latent buffer per frame, with
 * that frame's timestamps. Batching, threads, events, latency and progress
 * come from GstVaeBatch (gstvaebatch.cpp); this file is the encode direction.
 *
 * Video VAEs (the causal Wan 2.1/2.2 VAEs, TAEHV: temporal-downscale N = 4;
 * the LTX-2 encoder: N = 8) give one latent per group of N frames instead
 * (Wan, LTX-2: frame 0 alone, then groups of N), whatever `per-batch` is: the model's session regroups the
 * frames across batches and holds an incomplete group until it completes. A
 * latent has the PTS, DTS, offset and DISCONT of the first frame it covers
 * and the summed duration of its frames; the caps say temporal-downscale=N
 * and the framerate divided by N. EOS, a new stream, a caps change and a
 * DISCONT frame (other than a clip's first) end the clip: an incomplete last
 * group is dropped with a warning naming its frames, as the reference encodes
 * do, or completed by repeating its last frame with `pad-clip-end`. Flushes
 * drop it silently. See docs/vaeencode.md, "Video VAEs: temporal models".
 *
 * ## Example launch line
 * |[
 * gst-launch-1.0 filesrc location=clip.mp4 ! decodebin ! videoconvert ! video/x-raw,format=RGB \
 *   ! vaeencode model=sdxl_vae.safetensors per-batch=16 ! latentfilesink location=clip.latent
 * ]|
 */
#include "gstvaeencode.h"

#include <gst/video/video.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "cuda_glue.h"
#include "encoder.h"
#include "errors.h"
#include "latent_caps.h"

GST_DEBUG_CATEGORY_STATIC(vae_encode_debug);
#define GST_CAT_DEFAULT vae_encode_debug

using gstvae::EncodeParams;
using gstvae::Encoder;
using gstvae::EncodeSession;
using gstvae::FrameBatch;
using gstvae::LatentBlock;

namespace {

enum {
  PROP_0,
  PROP_SAMPLE,
  PROP_SEED,
  PROP_LATENT_FORMAT,
  PROP_LATENT_SPACE,
  PROP_LATENTS_OUT,
  PROP_PAD_CLIP_END,
};

struct EncodeSettings {
  gboolean sample = FALSE;
  guint64 seed = 0;
  gint latent_format = 0;
  // Whether latent-format was set; if not, the loaded model's default (what
  // ComfyUI's LATENT holds for it: raw, or normalised for LTX-2) applies.
  gboolean latent_format_set = FALSE;
  std::string model_latent_format = "raw";
  std::string latent_space;
  gboolean pad_clip_end = FALSE;
};

// Staging batches the work thread is done with, for the next ones.
// The latent format in effect: the property when set, else the model's default.
std::string effective_latent_format(const EncodeSettings& s) {
  return s.latent_format_set ? gst_vae_latent_format_nick(s.latent_format) : s.model_latent_format;
}

struct SparePool {
  std::mutex mutex;
  std::vector<std::unique_ptr<FrameBatch>> batches;
};

class EncodeJob final : public gstvae_glue::Job {
 public:
  GstElement* element;
  std::shared_ptr<Encoder> encoder;
  std::shared_ptr<EncodeSession> session;
  bool reset_session = false;  // the stream restarted before this batch
  std::unique_ptr<FrameBatch> batch;
  EncodeParams params;
  std::shared_ptr<SparePool> spares;

  ~EncodeJob() override {
    if (!batch || !spares) return;
    batch->clear();
    std::lock_guard<std::mutex> lock(spares->mutex);
    if (spares->batches.size() < 2) spares->batches.push_back(std::move(batch));
  }

  std::vector<GstBuffer*> run() override {
    // The session, and the metadata of the frames it holds (HeldInputs), are
    // touched only here, on the work thread, in job order.
    if (reset_session) {
      session->reset();
      forget_held();
    }
    std::unique_ptr<LatentBlock> block = encoder->new_latents(*batch);
    gstvae::BatchResult result;
    try {
      result = session->encode(*batch, params, *block);
    } catch (...) {
      // What the session holds now is unknown: the next clip starts afresh.
      session->reset();
      forget_held();
      throw;
    }
    for (const std::string& note : result.report.notes) GST_WARNING_OBJECT(element, "%s", note.c_str());
    if (result.dropped.count) report_dropped(result.dropped);
    if (result.padded_frames && !result.spans.empty()) report_padded(result.spans.back(), result.padded_frames);
    const size_t latent_bytes = encoder->latent_floats_per_frame(*batch) * sizeof(float);
    LatentBlock* raw = block.release();
    GstMemory* memory =
        gst_memory_new_wrapped(static_cast<GstMemoryFlags>(0), raw->data(), raw->bytes(), 0,
                               result.spans.size() * latent_bytes, raw,
                               [](gpointer p) { delete static_cast<LatentBlock*>(p); });
    std::vector<GstBuffer*> out;
    try {
      out = outputs(memory, latent_bytes, result.spans, result.padded_frames);
    } catch (...) {
      keep_held(session->held_frames());
      throw;
    }
    keep_held(session->held_frames());
    // The latents may still be on their way from the GPU (download overlap):
    // the push thread waits for them; the buffers keep the block alive until
    // then. Without buffers the block is gone already (its destructor waited).
    if (!out.empty() && raw->has_pending_copy()) pending_copy_ = raw;
    return out;
  }

  std::function<void()> take_ready_wait() override {
    LatentBlock* block = std::exchange(pending_copy_, nullptr);
    if (!block) return {};
    return [block] { block->wait_ready(); };
  }

 private:
  LatentBlock* pending_copy_ = nullptr;  // owned by the outputs' memory

  // The PTS of the first of `span`'s frames and the end of its last known one.
  void time_range(const gstvae::Span& span, GstClockTime* start, GstClockTime* end) const {
    *start = *end = GST_CLOCK_TIME_NONE;
    if (const gstvae_glue::InputMeta* m = input_meta(span.first)) *start = m->pts;
    for (uint32_t k = span.count; k > 0; --k)
      if (const gstvae_glue::InputMeta* m = input_meta(span.first + k - 1)) {
        *end = GST_CLOCK_TIME_IS_VALID(m->pts) && GST_CLOCK_TIME_IS_VALID(m->duration) ? m->pts + m->duration
                                                                                     : m->pts;
        break;
      }
  }

  void report_dropped(const gstvae::Span& dropped) const {
    GstClockTime start, end;
    time_range(dropped, &start, &end);
    const int group = encoder->info().temporal_downscale;
    GST_ELEMENT_WARNING(element, STREAM, ENCODE,
                        ("Dropped %u frames at the end of a clip (PTS %" GST_TIME_FORMAT " to %" GST_TIME_FORMAT
                         "): too few for a latent",
                         dropped.count, GST_TIME_ARGS(start), GST_TIME_ARGS(end)),
                        ("frames %" G_GUINT64_FORMAT "..%" G_GUINT64_FORMAT " of the stream: the model (%s) "
                         "turns each complete group of %d frames into one latent and drops a clip's frames past "
                         "the last complete group (%s). Set pad-clip-end=true to encode them anyway by repeating "
                         "the last frame",
                         dropped.first, dropped.first + dropped.count - 1, encoder->info().family.c_str(), group,
                         pads_upstream() ? "upstream TAEHV pads them instead, as pad-clip-end=true does"
                                         : "as its official encode does; no reference pads"));
  }

  void report_padded(const gstvae::Span& last, uint32_t padded) const {
    GstClockTime start, end;
    time_range(last, &start, &end);
    // The span may or may not count the copies: its real frames are the known ones.
    uint32_t real = 1;
    while (real < last.count && input_meta(last.first + real)) ++real;
    GST_ELEMENT_INFO(element, STREAM, ENCODE,
                     ("Padded the end of a clip: the last latent (PTS %" GST_TIME_FORMAT " to %" GST_TIME_FORMAT
                      ") repeats the last frame %u times",
                      GST_TIME_ARGS(start), GST_TIME_ARGS(end), padded),
                     ("pad-clip-end=true: a group of %d frames was completed by repeating its last frame (frame "
                      "%" G_GUINT64_FORMAT "); %s",
                      encoder->info().temporal_downscale, last.first + real - 1,
                      pads_upstream() ? "upstream TAEHV's encode_video pads the same way"
                                      : "no reference encode does that, so this latent has no reference counterpart"));
  }

  // TAEHV's upstream encode pads a clip's end with copies of its last frame;
  // the Wan references drop the frames.
  bool pads_upstream() const { return encoder->info().family == "taehv"; }
};

class EncodeDirection final : public gstvae_glue::Direction {
 public:
  EncodeDirection(GstVaeEncode* element, std::shared_ptr<Encoder> encoder)
      : element_(element), encoder_(std::move(encoder)), session_(encoder_->open_session()) {}

  std::string model_path() const override { return encoder_->info().model_path; }
  int scale() const override { return encoder_->info().downscale; }
  int channels() const override { return encoder_->info().latent_channels; }
  int temporal_downscale() const override { return encoder_->info().temporal_downscale; }
  bool have_caps() const override { return have_info_; }

  bool accepts(GstCaps* incaps) override {
    GstVideoInfo info;
    gstvae::PixelFormat format;
    return fits(incaps, &info, &format);
  }

  // Whether frames in CUDA memory can be read where the encoder runs: its
  // device is a CUDA one and the CUDA driver loaded (gstvae_cuda::available).
  bool takes_cuda_memory() const {
    return encoder_->info().device.rfind("cuda", 0) == 0 && gstvae_cuda::available();
  }

  bool set_caps(GstCaps* incaps, GstCaps* /*outcaps*/) override {
    GstVideoInfo info;
    gstvae::PixelFormat format;
    if (!fits(incaps, &info, &format)) return false;
    if (GST_VIDEO_INFO_PAR_N(&info) != GST_VIDEO_INFO_PAR_D(&info) && GST_VIDEO_INFO_PAR_N(&info) > 0) {
      // Latents cover the stored pixels; a diffusion model assumes square ones.
      GST_ELEMENT_WARNING(element_, STREAM, FORMAT, ("Non-square pixels: the latents will look stretched"),
                          ("pixel-aspect-ratio %d/%d; the latents encode the %dx%d stored pixels as they are. To "
                           "encode square pixels, scale first: '... ! videoscale ! "
                           "video/x-raw,pixel-aspect-ratio=1/1 ! vaeencode ...'",
                           GST_VIDEO_INFO_PAR_N(&info), GST_VIDEO_INFO_PAR_D(&info), GST_VIDEO_INFO_WIDTH(&info),
                           GST_VIDEO_INFO_HEIGHT(&info)));
    }
    const gstvae::FrameMemory memory =
        gstvae_cuda::caps_in_cuda_memory(incaps) ? gstvae::FrameMemory::Device : gstvae::FrameMemory::Host;
    // The same caps again (downstream renegotiating): the staged frames and
    // the clip go on.
    if (have_info_ && gst_video_info_is_equal(&info, &info_) && memory == memory_) return true;
    // A different geometry, format or memory needs a new staging batch (drained already).
    batch_.reset();
    info_ = info;
    format_ = format;
    memory_ = memory;
    have_info_ = true;
    reset_pending_ = true;
    return true;
  }

  void add(GstBuffer* input, guint64 index, guint per_batch) override {
    if (memory_ == gstvae::FrameMemory::Device) {
      // Read where it is, on the GPU: the batch keeps the mapping (and the
      // buffer) until the encode that reads it has finished on the device.
      gstvae::DeviceFrame frame;
      std::shared_ptr<const void> keep;
      gstvae_cuda::map_frame(input, &info_, &frame, &keep);
      acquire_batch(per_batch);
      batch_->add_device(frame, index, std::move(keep));
      return;
    }
    GstVideoFrame frame;
    if (!gst_video_frame_map(&frame, &info_, input, GST_MAP_READ))
      throw gstvae::VaeError("buffer of " + std::to_string(gst_buffer_get_size(input)) + " bytes does not hold a " +
                             std::to_string(GST_VIDEO_INFO_WIDTH(&info_)) + "x" +
                             std::to_string(GST_VIDEO_INFO_HEIGHT(&info_)) + " " + GST_VIDEO_INFO_NAME(&info_) +
                             " frame");
    try {
      acquire_batch(per_batch);
      batch_->add(static_cast<const uint8_t*>(GST_VIDEO_FRAME_PLANE_DATA(&frame, 0)),
                  GST_VIDEO_FRAME_PLANE_STRIDE(&frame, 0), index);
    } catch (...) {
      gst_video_frame_unmap(&frame);
      throw;
    }
    gst_video_frame_unmap(&frame);
  }

  size_t staged() const override { return batch_ ? batch_->size() : 0; }
  bool staging_full() const override { return batch_ && batch_->full(); }
  void drop_staged() override {
    if (batch_) batch_->clear();
  }
  // Applied by the next job on the work thread, which alone uses the session.
  void reset() override { reset_pending_ = true; }

  std::unique_ptr<gstvae_glue::Job> take(bool end_of_clip) override {
    auto job = std::make_unique<EncodeJob>();
    job->element = GST_ELEMENT(element_);
    job->encoder = encoder_;
    job->session = session_;
    job->reset_session = reset_pending_;
    reset_pending_ = false;
    job->spares = spares_;
    GST_OBJECT_LOCK(element_);
    const EncodeSettings s = settings();
    GST_OBJECT_UNLOCK(element_);
    job->params.sample = s.sample;
    job->params.seed = s.seed;
    job->params.latent_format = gstvae::latent_format_by_name(effective_latent_format(s));
    job->params.end_of_clip = end_of_clip;
    job->params.pad_clip_end = s.pad_clip_end;
    job->batch = std::move(batch_);
    // A clip end with no frames staged: an empty batch of the clip's geometry.
    if (!job->batch) job->batch = empty_batch();
    // On GPUs this starts the upload, which then overlaps the encode in progress.
    if (!job->batch->empty()) encoder_->prepare(*job->batch);
    return job;
  }

 private:
  EncodeSettings settings() const;

  // Frames this encoder can take (posts the element error naming the cause
  // when not): video caps in a packed RGB format, at least one latent cell,
  // progressive.
  bool fits(GstCaps* incaps, GstVideoInfo* parsed, gstvae::PixelFormat* format) {
    GstVideoInfo& info = *parsed;
    if (!gst_video_info_from_caps(&info, incaps)) {
      GST_ELEMENT_ERROR(element_, CORE, NEGOTIATION, ("Invalid video caps"), ("%" GST_PTR_FORMAT, incaps));
      return false;
    }
    const char* name = gst_video_format_to_string(GST_VIDEO_INFO_FORMAT(&info));
    const bool cuda = gstvae_cuda::caps_in_cuda_memory(incaps);
    if (!gstvae::parse_pixel_format(name, format) || (!cuda && gstvae::pixel_format_planar(*format))) {
      GST_ELEMENT_ERROR(element_, CORE, NEGOTIATION, ("Unsupported video format %s", name), (nullptr));
      return false;
    }
    if (cuda && !takes_cuda_memory()) {
      GST_ELEMENT_ERROR(element_, CORE, NEGOTIATION, ("Frames in CUDA memory cannot be encoded here"),
                        ("caps %" GST_PTR_FORMAT " are in memory:CUDAMemory, but the encoder runs on %s%s; set "
                         "device=cuda, or put cudadownload before vaeencode",
                         incaps, encoder_->info().device.c_str(),
                         gstvae_cuda::available() ? "" : " and no CUDA driver or device is present"));
      return false;
    }
    const int d = scale();
    if (GST_VIDEO_INFO_WIDTH(&info) < d || GST_VIDEO_INFO_HEIGHT(&info) < d) {
      GST_ELEMENT_ERROR(element_, STREAM, FORMAT, ("Frames are too small for the model"),
                        ("frame of %dx%d is smaller than the model's %dx%d pixel minimum",
                         GST_VIDEO_INFO_WIDTH(&info), GST_VIDEO_INFO_HEIGHT(&info), d, d));
      return false;
    }
    if (GST_VIDEO_INFO_IS_INTERLACED(&info)) {
      // The encoder would see both fields woven into one frame: combing in the latents.
      GST_ELEMENT_ERROR(element_, STREAM, FORMAT, ("Interlaced video cannot be encoded"),
                        ("interlace-mode %s: put a deinterlacer before vaeencode, e.g. '... ! deinterlace ! "
                         "videoconvert ! vaeencode ...'",
                         gst_video_interlace_mode_to_string(GST_VIDEO_INFO_INTERLACE_MODE(&info))));
      return false;
    }
    return true;
  }

  // A staging batch for the current caps and per-batch, reusing one the work
  // thread is done with.
  void acquire_batch(guint per_batch) {
    if (batch_ && (!batch_->empty() || batch_->capacity() == per_batch)) return;
    const int width = GST_VIDEO_INFO_WIDTH(&info_), height = GST_VIDEO_INFO_HEIGHT(&info_);
    {
      std::lock_guard<std::mutex> lock(spares_->mutex);
      while (!spares_->batches.empty()) {
        std::unique_ptr<FrameBatch> b = std::move(spares_->batches.back());
        spares_->batches.pop_back();
        if (b->format() == format_ && b->memory() == memory_ && b->frame_width() == width &&
            b->frame_height() == height && b->capacity() == per_batch) {
          batch_ = std::move(b);
          return;
        }
      }
    }
    batch_ = encoder_->new_batch(format_, width, height, per_batch, memory_);
  }

  // An empty batch for the current caps, of any capacity.
  std::unique_ptr<FrameBatch> empty_batch() {
    const int width = GST_VIDEO_INFO_WIDTH(&info_), height = GST_VIDEO_INFO_HEIGHT(&info_);
    {
      std::lock_guard<std::mutex> lock(spares_->mutex);
      for (auto it = spares_->batches.begin(); it != spares_->batches.end(); ++it)
        if ((*it)->format() == format_ && (*it)->memory() == memory_ && (*it)->frame_width() == width &&
            (*it)->frame_height() == height) {
          std::unique_ptr<FrameBatch> b = std::move(*it);
          spares_->batches.erase(it);
          return b;
        }
    }
    return encoder_->new_batch(format_, width, height, 1, memory_);
  }

  GstVaeEncode* element_;
  std::shared_ptr<Encoder> encoder_;
  // Shared with the jobs in flight; image encoders keep no state in it.
  std::shared_ptr<EncodeSession> session_;
  bool reset_pending_ = false;
  GstVideoInfo info_;
  bool have_info_ = false;
  gstvae::PixelFormat format_ = gstvae::PixelFormat::RGB;
  gstvae::FrameMemory memory_ = gstvae::FrameMemory::Host;
  std::unique_ptr<FrameBatch> batch_;
  std::shared_ptr<SparePool> spares_ = std::make_shared<SparePool>();
};

}  // namespace

struct _GstVaeEncode {
  GstVaeBatch parent;
  EncodeSettings* settings;  // object lock
  // The CUDA context given to upstream (its own mutex, taken with no other
  // lock held: state changes, queries and set_context call it unlocked).
  gstvae_cuda::SharedContext* cuda;
};

G_DEFINE_TYPE(GstVaeEncode, gst_vae_encode, GST_TYPE_VAE_BATCH);
GST_ELEMENT_REGISTER_DEFINE(vaeencode, "vaeencode", GST_RANK_NONE, GST_TYPE_VAE_ENCODE);

EncodeSettings EncodeDirection::settings() const { return *element_->settings; }

static gstvae_glue::Direction* gst_vae_encode_open(GstVaeBatch* batch, const gstvae_glue::CommonSettings& s) {
  GstVaeEncode* self = GST_VAE_ENCODE(batch);
  gstvae::ModelOptions options;
  options.device = s.device;
  options.precision = static_cast<gstvae::Precision>(s.precision);
  options.threads = static_cast<int>(s.threads);
  GST_OBJECT_LOCK(self);
  options.latent_space = self->settings->latent_space;
  GST_OBJECT_UNLOCK(self);
  std::shared_ptr<Encoder> encoder = gstvae::load_encoder(s.model, options);
  const auto& info = encoder->info();
  GST_OBJECT_LOCK(self);
  self->settings->model_latent_format = info.default_latent_format;
  GST_OBJECT_UNLOCK(self);
  GST_INFO_OBJECT(self, "loaded '%s': %s (%s layout), %" G_GINT64_FORMAT " parameters, on %s in %s", s.model.c_str(),
                  info.architecture.c_str(), info.layout.c_str(), info.parameters, info.device.c_str(),
                  gstvae::precision_name(info.precision));
  return new EncodeDirection(self, std::move(encoder));
}

/* ------------------------------------------------------------------ caps */

// The formats vaeencode takes in CUDA memory: the packed ones and RGBP, BGRP.
static GValue device_format_list() {
  GValue list = G_VALUE_INIT;
  gst_value_list_init(&list, gstvae::device_pixel_formats().size());
  for (gstvae::PixelFormat f : gstvae::device_pixel_formats()) {
    GValue v = G_VALUE_INIT;
    g_value_init(&v, G_TYPE_STRING);
    g_value_set_string(&v, gstvae::pixel_format_name(f));
    gst_value_list_append_and_take_value(&list, &v);
  }
  return list;
}

static std::string device_format_string() {
  std::string out = "{ ";
  for (gstvae::PixelFormat f : gstvae::device_pixel_formats()) {
    if (out.size() > 2) out += ", ";
    out += gstvae::pixel_format_name(f);
  }
  return out + " }";
}

// The first `count` structures of `video` again, in CUDA memory with the
// device formats: what vaeencode takes first when it runs on CUDA.
static GstCaps* in_cuda_memory(const GstCaps* video, guint count) {
  GstCaps* out = gst_caps_new_empty();
  GValue formats = device_format_list();
  for (guint i = 0; i < count && i < gst_caps_get_size(video); ++i) {
    GstStructure* s = gst_structure_copy(gst_caps_get_structure(video, i));
    gst_structure_set_value(s, "format", &formats);
    out = gst_caps_merge_structure_full(out, s, gst_caps_features_new(gstvae_cuda::kFeature, nullptr));
  }
  g_value_unset(&formats);
  return out;
}

// Whether this element offers CUDA memory now (any thread; takes the object lock).
static bool offers_cuda_memory(GstVaeEncode* self) {
  gchar* device = nullptr;
  g_object_get(self, "device", &device, nullptr);
  const bool offered = device && gstvae_cuda::offered(device);
  g_free(device);
  return offered;
}

static GstCaps* gst_vae_encode_transform_caps(GstBaseTransform* trans, GstPadDirection direction, GstCaps* caps,
                                              GstCaps* filter) {
  GstVaeEncode* self = GST_VAE_ENCODE(trans);
  // Caps queries come from any thread: only object-locked facts are read.
  const bool cuda = direction == GST_PAD_SRC && offers_cuda_memory(self);
  gst_latent_caps::Model model;
  gst_vae_batch_model_facts(GST_VAE_BATCH(self), &model.downscale, &model.channels);
  model.temporal_downscale = gst_vae_batch_temporal_downscale(GST_VAE_BATCH(self));
  GST_OBJECT_LOCK(self);
  model.latent_format = effective_latent_format(*self->settings);
  GST_OBJECT_UNLOCK(self);
  // Frames smaller than one latent cell (a fixed width or height below the
  // downscale) are mapped as if they filled one cell, so that their caps
  // reach the element, which refuses them saying why (Direction::accepts);
  // without this no latent caps fit them and linking or negotiation fails
  // with nothing but not-negotiated. Larger frames map as they are.
  GstCaps* lifted = nullptr;
  if (direction == GST_PAD_SINK) {
    lifted = gst_caps_copy(caps);
    for (guint i = 0; i < gst_caps_get_size(lifted); ++i) {
      GstStructure* s = gst_caps_get_structure(lifted, i);
      for (const char* field : {"width", "height"}) {
        gint v;
        if (gst_structure_get_int(s, field, &v) && v < model.downscale)
          gst_structure_set(s, field, G_TYPE_INT, model.downscale, nullptr);
      }
    }
  }
  GstCaps* result = direction == GST_PAD_SINK ? gst_latent_caps::video_to_latent(lifted, model)
                                              : gst_latent_caps::latent_to_video(caps, model);
  if (lifted) gst_caps_unref(lifted);
  if (direction == GST_PAD_SRC) {
    // Last, frames too small for one latent cell: a source that can only
    // give those negotiates them and is refused by Direction::accepts with
    // the reason, instead of a bare not-negotiated. They come after every
    // size that fits, so an upstream videoscale still picks one of those.
    const int cell = std::max(1, model.downscale);
    const guint fitting = gst_caps_get_size(result);
    // First, when the element runs on CUDA, the same frames in CUDA memory
    // (a GPU decoder's or cudaconvert's, read in place); system memory after
    // them, so that negotiation falls back to it.
    if (cuda) result = gst_caps_merge(in_cuda_memory(result, fitting), result);
    for (guint i = 0; i < fitting && cell > 1; ++i) {
      for (const char* small : {"width", "height"}) {
        GstStructure* s = gst_structure_copy(gst_caps_get_structure(result, i));
        gst_structure_set(s, "width", GST_TYPE_INT_RANGE, 1, G_MAXINT, "height", GST_TYPE_INT_RANGE, 1, G_MAXINT,
                          nullptr);
        gst_structure_set(s, small, GST_TYPE_INT_RANGE, 1, cell - 1, nullptr);
        result = gst_caps_merge_structure(result, s);
      }
    }
  }
  if (filter) {
    GstCaps* tmp = gst_caps_intersect_full(filter, result, GST_CAPS_INTERSECT_FIRST);
    gst_caps_unref(result);
    result = tmp;
  }
  GST_DEBUG_OBJECT(self, "transformed %" GST_PTR_FORMAT " to %" GST_PTR_FORMAT, caps, result);
  return result;
}

/* ------------------------------------------------------------ properties */

static void gst_vae_encode_set_property(GObject* object, guint prop_id, const GValue* value, GParamSpec* pspec) {
  GstVaeEncode* self = GST_VAE_ENCODE(object);
  if (prop_id == PROP_LATENT_FORMAT || prop_id == PROP_LATENT_SPACE) {
    // Part of the caps / of the model: only in NULL/READY.
    GstState state = GST_STATE(self);
    if (state > GST_STATE_READY || GST_STATE_TARGET(self) > GST_STATE_READY) {
      g_warning("vaeencode: property '%s' can only be changed in the NULL or READY state", pspec->name);
      return;
    }
  }
  GST_OBJECT_LOCK(self);
  EncodeSettings& s = *self->settings;
  switch (prop_id) {
    case PROP_SAMPLE: s.sample = g_value_get_boolean(value); break;
    case PROP_SEED: s.seed = g_value_get_uint64(value); break;
    case PROP_LATENT_FORMAT:
      s.latent_format = g_value_get_enum(value);
      s.latent_format_set = TRUE;
      break;
    case PROP_LATENT_SPACE: s.latent_space = g_value_get_string(value) ? g_value_get_string(value) : ""; break;
    case PROP_PAD_CLIP_END: s.pad_clip_end = g_value_get_boolean(value); break;
    default: G_OBJECT_WARN_INVALID_PROPERTY_ID(object, prop_id, pspec); break;
  }
  GST_OBJECT_UNLOCK(self);
}

static void gst_vae_encode_get_property(GObject* object, guint prop_id, GValue* value, GParamSpec* pspec) {
  GstVaeEncode* self = GST_VAE_ENCODE(object);
  if (prop_id == PROP_LATENTS_OUT) {
    g_value_set_uint64(value, gst_vae_batch_outputs(GST_VAE_BATCH(self)));
    return;
  }
  GST_OBJECT_LOCK(self);
  const EncodeSettings& s = *self->settings;
  switch (prop_id) {
    case PROP_SAMPLE: g_value_set_boolean(value, s.sample); break;
    case PROP_SEED: g_value_set_uint64(value, s.seed); break;
    case PROP_LATENT_FORMAT: g_value_set_enum(value, s.latent_format); break;
    case PROP_LATENT_SPACE: g_value_set_string(value, s.latent_space.c_str()); break;
    case PROP_PAD_CLIP_END: g_value_set_boolean(value, s.pad_clip_end); break;
    default: G_OBJECT_WARN_INVALID_PROPERTY_ID(object, prop_id, pspec); break;
  }
  GST_OBJECT_UNLOCK(self);
}

/* ---------------------------------------------------- the CUDA context */

// Upstream CUDA elements (cudaupload, cudaconvert, nvh264dec...) look for a
// context with a gst.cuda.context query before they make their own. States
// change from the sink towards the source, so vaeencode has its context
// (the primary context of its device, LibTorch's) by the time they ask: their
// frames are then LibTorch's to read in place. Offered only where CUDA memory is.
static GstStateChangeReturn gst_vae_encode_change_state(GstElement* element, GstStateChange transition) {
  GstVaeEncode* self = GST_VAE_ENCODE(element);
  if (transition == GST_STATE_CHANGE_NULL_TO_READY && offers_cuda_memory(self)) {
    gchar* device = nullptr;
    g_object_get(self, "device", &device, nullptr);
    self->cuda->ensure(element, gstvae_cuda::device_index(device ? device : ""));
    g_free(device);
  }
  GstStateChangeReturn ret = GST_ELEMENT_CLASS(gst_vae_encode_parent_class)->change_state(element, transition);
  if (transition == GST_STATE_CHANGE_READY_TO_NULL) self->cuda->reset();
  return ret;
}

static void gst_vae_encode_set_context(GstElement* element, GstContext* context) {
  GST_VAE_ENCODE(element)->cuda->set(element, context);
  GST_ELEMENT_CLASS(gst_vae_encode_parent_class)->set_context(element, context);
}

static gboolean gst_vae_encode_query(GstBaseTransform* trans, GstPadDirection direction, GstQuery* query) {
  if (GST_QUERY_TYPE(query) == GST_QUERY_CONTEXT && GST_VAE_ENCODE(trans)->cuda->answer(GST_ELEMENT(trans), query))
    return TRUE;
  return GST_BASE_TRANSFORM_CLASS(gst_vae_encode_parent_class)->query(trans, direction, query);
}

// Frames in CUDA memory: a CUDA pool in the shared context (see SharedContext::propose_pool).
static gboolean gst_vae_encode_propose_allocation(GstBaseTransform* trans, GstQuery* decide_query, GstQuery* query) {
  if (GST_VAE_ENCODE(trans)->cuda->propose_pool(GST_ELEMENT(trans), query)) return TRUE;
  return GST_BASE_TRANSFORM_CLASS(gst_vae_encode_parent_class)->propose_allocation(trans, decide_query, query);
}

/* ------------------------------------------------------------- GObject */

static void gst_vae_encode_finalize(GObject* object) {
  GstVaeEncode* self = GST_VAE_ENCODE(object);
  G_OBJECT_CLASS(gst_vae_encode_parent_class)->finalize(object);
  delete self->settings;
  delete self->cuda;
}

static void gst_vae_encode_init(GstVaeEncode* self) {
  self->settings = new EncodeSettings();
  self->cuda = new gstvae_cuda::SharedContext();
}

static void gst_vae_encode_class_init(GstVaeEncodeClass* klass) {
  GObjectClass* gobject_class = G_OBJECT_CLASS(klass);
  GstElementClass* element_class = GST_ELEMENT_CLASS(klass);
  GstBaseTransformClass* trans_class = GST_BASE_TRANSFORM_CLASS(klass);
  GstVaeBatchClass* batch_class = GST_VAE_BATCH_CLASS(klass);

  gobject_class->set_property = gst_vae_encode_set_property;
  gobject_class->get_property = gst_vae_encode_get_property;
  gobject_class->finalize = gst_vae_encode_finalize;

  const auto rw = static_cast<GParamFlags>(G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);
  const auto rw_ready = static_cast<GParamFlags>(rw | GST_PARAM_MUTABLE_READY);
  const auto rw_playing = static_cast<GParamFlags>(rw | GST_PARAM_MUTABLE_PLAYING);
  const auto ro = static_cast<GParamFlags>(G_PARAM_READABLE | G_PARAM_STATIC_STRINGS);
  // GObject dispatches to the class that installed a property: ids may repeat the base's.
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
                        "output = (raw - shift) * scale; wan21/wan22 per channel, (raw - mean_c) / std_c; ltx2 "
                        "the same with the LTX-2 checkpoint's own statistics. Unset: what ComfyUI's LATENT holds "
                        "for the model, raw except for LTX-2 (ltx2, as ComfyUI's and the official encode normalise)",
                        gst_vae_latent_format_get_type(), 0, rw_ready));
  g_object_class_install_property(
      gobject_class, PROP_LATENT_SPACE,
      g_param_spec_string("latent-space", "Latent space",
                          "For a tiny autoencoder: the diffusion model's latent space it belongs to (TAESD family: "
                          "taesd, taesdxl, taesd3, taef1, taef2; TAEHV: taew2_1, taew2_2, taehv1_5, lighttaehy1_5, taeltx_2, taeltx2_3), overriding its file "
                          "name and metadata; empty = from the file. 'kl': use a Flux.2-shaped KL VAE file that lacks "
                          "its BatchNorm statistics as a plain KL VAE (refused otherwise)",
                          "", rw_ready));
  g_object_class_install_property(
      gobject_class, PROP_PAD_CLIP_END,
      g_param_spec_boolean("pad-clip-end", "Pad clip end",
                           "Video VAEs (temporal-downscale > 1): at a clip's end (EOS, new stream, caps change, "
                           "DISCONT) complete the last incomplete group of frames by repeating the last frame, "
                           "giving one more latent, instead of dropping those frames (with a warning) as every "
                           "Wan reference encode does; no Wan reference pads (upstream TAEHV does), so a padded Wan "
                           "latent has no reference counterpart. Applies from the next clip end. No effect on image models",
                           FALSE, rw_playing));
  g_object_class_install_property(
      gobject_class, PROP_LATENTS_OUT,
      g_param_spec_uint64("latents-out", "Latents out", "Latents produced since the element started", 0,
                          G_MAXUINT64, 0, ro));

  // Any size: frames smaller than the model's latent cell are refused when
  // their caps arrive, saying so (Direction::accepts), not at the pad. CUDA
  // memory where the build has libgstcuda: in the template always, offered
  // in caps queries only when the element runs on CUDA (transform_caps).
  const std::string video_fields = ", width = (int) [ 1, MAX ], height = (int) [ 1, MAX ], "
                                   "framerate = (fraction) [ 0/1, MAX ]";
  std::string sink_caps = "video/x-raw, format = (string) " + gst_latent_caps::video_format_list() + video_fields;
  if (gstvae_cuda::built())
    sink_caps = std::string("video/x-raw(") + gstvae_cuda::kFeature + "), format = (string) " +
                device_format_string() + video_fields + "; " + sink_caps;
  const std::string src_caps = std::string(GST_LATENT_CAPS_MEDIA_TYPE) +
                               ", format = (string) F32, channels = (int) [ 1, MAX ], width = (int) [ 1, MAX ], "
                               "height = (int) [ 1, MAX ], framerate = (fraction) [ 0/1, MAX ], "
                               "latent-format = (string) " + gst_latent_caps::latent_format_list();
  gst_vae_batch_class_add_pad_templates(batch_class, sink_caps.c_str(), src_caps.c_str());
  gst_element_class_set_static_metadata(
      element_class, "VAE encoder", "Filter/Converter/Video",
      "Encodes video frames in batches into the latents of a Stable-Diffusion-family VAE or a causal video "
      "VAE (Wan 2.1/2.2, TAEHV) (LibTorch)",
      "gst-vae developers");

  trans_class->transform_caps = GST_DEBUG_FUNCPTR(gst_vae_encode_transform_caps);
  trans_class->query = GST_DEBUG_FUNCPTR(gst_vae_encode_query);
  trans_class->propose_allocation = GST_DEBUG_FUNCPTR(gst_vae_encode_propose_allocation);
  element_class->change_state = GST_DEBUG_FUNCPTR(gst_vae_encode_change_state);
  element_class->set_context = GST_DEBUG_FUNCPTR(gst_vae_encode_set_context);
  batch_class->open = gst_vae_encode_open;
  batch_class->progress_message = GST_VAE_ENCODE_PROGRESS_MESSAGE;

  gst_type_mark_as_plugin_api(gst_vae_latent_format_get_type(), static_cast<GstPluginAPIFlags>(0));
  GST_DEBUG_CATEGORY_INIT(vae_encode_debug, "vaeencode", 0, "VAE encoder");
}
