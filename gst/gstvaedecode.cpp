/**
 * SECTION:element-vaedecode
 * @title: vaedecode
 *
 * Gathers `per-batch` latents (application/x-latent, as vaeencode and
 * latentfilesrc give them), decodes them with a VAE decoder (the KL
 * autoencoders of SD 1.x/2.x, SDXL, SD3 and Flux.1, a TAESD-family tiny
 * autoencoder, or a video VAE: Wan 2.1, Wan 2.2, TAEHV) as ComfyUI's VAE
 * Decode does, and pushes one 8-bit video frame per latent with that
 * latent's timestamps. Scaled latents (the caps' latent-format) are turned
 * back into raw ones first. Batching, threads, events, latency and progress
 * come from GstVaeBatch.
 *
 * Video latents (caps temporal-downscale=4, as vaeencode gives them for a
 * video VAE) are decoded as a stream: the decoder's causal state is carried
 * from latent to latent, so any per-batch gives the frames of the official
 * whole-clip decode (to fp32 rounding: a byte may move by 1/255 with the
 * batching). A clip's first latent gives 1 frame, every later one 4,
 * each with its share of the latent's time; the output framerate is the
 * latents' times 4. A clip ends (the state resets) at EOS, a new stream, new
 * caps, a flush and a DISCONT latent. Latents without temporal-downscale
 * decode one by one, each as a clip's first (Qwen-Image's use of the Wan 2.1
 * VAE). See docs/vaedecode.md.
 *
 * ## Example launch lines
 * |[
 * gst-launch-1.0 latentfilesrc location=x.latent framerate=8/1 ! vaedecode model=sdxl_vae.safetensors \
 *   ! videoconvert ! x264enc ! mp4mux ! filesink location=x.mp4
 * gst-launch-1.0 videotestsrc ! video/x-raw,format=RGB,width=256,height=256 \
 *   ! vaeencode model=taesd_encoder.safetensors ! vaedecode model=taesd_decoder.safetensors \
 *   ! videoconvert ! autovideosink
 * gst-launch-1.0 videotestsrc num-buffers=33 ! video/x-raw,format=RGB,width=256,height=256,framerate=16/1 \
 *   ! vaeencode model=wan_2.1_vae.safetensors per-batch=4 ! vaedecode model=wan_2.1_vae.safetensors \
 *   ! videoconvert ! autovideosink
 * ]|
 */
#include "gstvaedecode.h"

#include <gst/video/video.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "decoder.h"
#include "errors.h"
#include "latent_caps.h"

GST_DEBUG_CATEGORY_STATIC(vae_decode_debug);
#define GST_CAT_DEFAULT vae_decode_debug

using gstvae::DecodeParams;
using gstvae::Decoder;
using gstvae::DecodeSession;
using gstvae::LatentBatch;
using gstvae::PixelBlock;

namespace {

enum {
  PROP_0,
  PROP_LATENT_SPACE,
  PROP_FRAMES_OUT,
};

struct DecodeSettings {
  std::string latent_space;
  // The loaded decoder's frames per video latent (1 before one is loaded),
  // for caps transforms on any thread.
  std::atomic<int> video_frames{1};
};

class DecodeJob final : public gstvae_glue::Job {
 public:
  GstElement* element;
  std::shared_ptr<Decoder> decoder;
  std::shared_ptr<DecodeSession> session;
  bool reset_session = false;  // the stream restarted before this batch
  std::unique_ptr<LatentBatch> batch;  // null for a clip end with nothing staged
  DecodeParams params;
  gstvae::PixelFormat format;
  int frames_per_latent = 1;  // the session's: a video decoder's temporal upscale on video latents
  GstVideoInfo out_info{};    // the output caps'

  std::vector<GstBuffer*> run() override {
    // The session is touched only here, on the work thread, in job order.
    if (reset_session && session) session->reset();
    // A clip's end reaches the session as the next job's reset (the element
    // resets its direction after handing this job over): nothing to do here.
    if (!batch || batch->empty()) return {};
    std::unique_ptr<PixelBlock> block = decoder->new_pixels(*batch, format, frames_per_latent);
    gstvae::BatchResult result = session->decode(*batch, params, format, *block);
    for (const std::string& note : result.report.notes) GST_WARNING_OBJECT(element, "%s", note.c_str());
    const size_t frame_bytes = decoder->frame_bytes(*batch, format);
    PixelBlock* raw = block.release();
    GstMemory* memory = gst_memory_new_wrapped(static_cast<GstMemoryFlags>(0), raw->data(), raw->bytes(), 0,
                                               result.spans.size() * frame_bytes, raw,
                                               [](gpointer p) { delete static_cast<PixelBlock*>(p); });
    std::vector<GstBuffer*> frames = outputs(memory, frame_bytes, result.spans);
    // The rows are packed (width x bytes per pixel), not padded to
    // GStreamer's default 4-byte strides: say so, or an RGB/BGR frame whose
    // row is not a multiple of 4 bytes is refused downstream (videoconvert:
    // buffer too small for its caps).
    const guint width = GST_VIDEO_INFO_WIDTH(&out_info), height = GST_VIDEO_INFO_HEIGHT(&out_info);
    if (width > 0 && height > 0 && frame_bytes % (static_cast<size_t>(width) * height) == 0) {
      gsize offsets[GST_VIDEO_MAX_PLANES] = {0};
      gint strides[GST_VIDEO_MAX_PLANES] = {static_cast<gint>(frame_bytes / height)};
      for (GstBuffer* frame : frames)
        gst_buffer_add_video_meta_full(frame, GST_VIDEO_FRAME_FLAG_NONE, GST_VIDEO_INFO_FORMAT(&out_info), width,
                                       height, 1, offsets, strides);
    }
    return frames;
  }
};

class DecodeDirection final : public gstvae_glue::Direction {
 public:
  DecodeDirection(GstVaeDecode* element, std::shared_ptr<Decoder> decoder)
      : element_(element), decoder_(std::move(decoder)) {}

  std::string model_path() const override { return decoder_->info().model_path; }
  int scale() const override { return decoder_->info().upscale; }
  int channels() const override { return decoder_->info().latent_channels; }
  bool have_caps() const override { return have_caps_; }

  // Latents this decoder can take (posts the element error naming the cause
  // when not): their caps, channels, temporal-downscale and latent format.
  bool fits(GstCaps* incaps, gst_latent_caps::Info* parsed) {
    gst_latent_caps::Info& in = *parsed;
    if (!gst_latent_caps::parse(incaps, &in)) {
      GST_ELEMENT_ERROR(element_, CORE, NEGOTIATION, ("Invalid latent caps"), ("%" GST_PTR_FORMAT, incaps));
      return false;
    }
    const int video_frames = decoder_->info().temporal_upscale;
    if (in.temporal_downscale > 1 && in.temporal_downscale != video_frames) {
      // Video latents (one per group of frames) need that video decoder.
      if (video_frames == 1)
        GST_ELEMENT_ERROR(element_, CORE, NEGOTIATION, ("Video latents need a video decoder"),
                          ("the latents have temporal-downscale=%d (each covers %d frames, from a video VAE such "
                           "as Wan); the decoder '%s' (%s) decodes one image per latent; use the decoder of the "
                           "video VAE that made them",
                           in.temporal_downscale, in.temporal_downscale, model_path().c_str(),
                           decoder_->info().family.c_str()));
      else
        GST_ELEMENT_ERROR(element_, CORE, NEGOTIATION, ("Latents do not fit the decoder"),
                          ("the latents have temporal-downscale=%d; the video decoder '%s' makes %d frames per "
                           "latent",
                           in.temporal_downscale, model_path().c_str(), video_frames));
      return false;
    }
    if (in.channels != channels()) {
      GST_ELEMENT_ERROR(element_, STREAM, FORMAT, ("Latents do not fit the decoder"),
                        ("the latents have %d channels, the decoder '%s' takes %d", in.channels,
                         model_path().c_str(), channels()));
      return false;
    }
    try {
      gstvae::latent_format_by_name(in.latent_format);
    } catch (const std::exception& e) {
      GST_ELEMENT_ERROR(element_, STREAM, FORMAT, ("Unknown latent format"), ("%s", e.what()));
      return false;
    }
    return true;
  }

  bool accepts(GstCaps* incaps) override {
    gst_latent_caps::Info in;
    return fits(incaps, &in);
  }

  bool set_caps(GstCaps* incaps, GstCaps* outcaps) override {
    gst_latent_caps::Info in;
    if (!fits(incaps, &in)) return false;
    const int video_frames = decoder_->info().temporal_upscale;
    latent_format_ = gstvae::latent_format_by_name(in.latent_format);  // known: fits() checked
    GstVideoInfo out;
    if (!gst_video_info_from_caps(&out, outcaps) ||
        !gstvae::parse_pixel_format(gst_video_format_to_string(GST_VIDEO_INFO_FORMAT(&out)), &format_)) {
      GST_ELEMENT_ERROR(element_, CORE, NEGOTIATION, ("Unsupported output caps"), ("%" GST_PTR_FORMAT, outcaps));
      return false;
    }
    if (GST_VIDEO_INFO_WIDTH(&out) != in.width * scale() || GST_VIDEO_INFO_HEIGHT(&out) != in.height * scale()) {
      GST_ELEMENT_ERROR(element_, CORE, NEGOTIATION, ("Output size does not match the latents"),
                        ("%dx%d latents decode to %dx%d frames, not %dx%d", in.width, in.height,
                         in.width * scale(), in.height * scale(), GST_VIDEO_INFO_WIDTH(&out),
                         GST_VIDEO_INFO_HEIGHT(&out)));
      return false;
    }
    // Downstream renegotiating the output format (same latents) comes here
    // without a drain: the staged latents do not depend on the output format
    // and stay. New latents come with a caps event, drained already.
    const bool same_latents = have_caps_ && in.channels == in_.channels && in.width == in_.width &&
                              in.height == in_.height && in.latent_format == in_.latent_format &&
                              in.temporal_downscale == in_.temporal_downscale;
    // Video latents go through a video session (the decoder's causal state
    // carried from latent to latent); image latents decode one by one, a
    // video decoder's each as a clip's first latent.
    const int frames_per_latent = in.temporal_downscale > 1 ? video_frames : 1;
    if (!session_ || frames_per_latent != frames_per_latent_) {
      try {
        session_ = decoder_->open_session(frames_per_latent);
      } catch (const std::exception& e) {
        GST_ELEMENT_ERROR(element_, CORE, NEGOTIATION, ("Latents do not fit the decoder"), ("%s", e.what()));
        return false;
      }
      frames_per_latent_ = frames_per_latent;
    }
    frame_duration_ = GST_VIDEO_INFO_FPS_N(&out) > 0
                          ? gst_util_uint64_scale_int(GST_SECOND, GST_VIDEO_INFO_FPS_D(&out), GST_VIDEO_INFO_FPS_N(&out))
                          : GST_CLOCK_TIME_NONE;
    in_ = in;
    out_info_ = out;
    have_caps_ = true;
    if (!same_latents) {
      batch_.reset();
      reset_pending_ = true;
    }
    return true;
  }

  void add(GstBuffer* input, guint64 index, guint per_batch) override {
    GstMapInfo map;
    if (!gst_buffer_map(input, &map, GST_MAP_READ))
      throw gstvae::VaeError("could not map a latent buffer of " + std::to_string(gst_buffer_get_size(input)) +
                             " bytes");
    const size_t want = in_.frame_bytes();
    if (map.size != want) {
      const size_t got = map.size;
      gst_buffer_unmap(input, &map);
      throw gstvae::VaeError("latent buffer of " + std::to_string(got) + " bytes does not hold one " +
                             std::to_string(in_.channels) + "x" + std::to_string(in_.height) + "x" +
                             std::to_string(in_.width) + " float32 latent (" + std::to_string(want) + " bytes)");
    }
    if (!warned_non_finite_) warn_if_non_finite(map.data, map.size, index);
    try {
      if (!batch_ || (batch_->empty() && batch_->capacity() != per_batch))
        batch_ = decoder_->new_batch(in_.height, in_.width, per_batch);
      // Copied bytewise: a buffer's data need not be float-aligned.
      batch_->add(map.data, index);
    } catch (...) {
      gst_buffer_unmap(input, &map);
      throw;
    }
    gst_buffer_unmap(input, &map);
  }

  size_t staged() const override { return batch_ ? batch_->size() : 0; }
  bool staging_full() const override { return batch_ && batch_->full(); }
  void drop_staged() override {
    if (batch_) batch_->clear();
  }
  // Applied by the next job on the work thread, which alone uses the session.
  void reset() override { reset_pending_ = true; }

  // A video decoder's session carries state from latent to latent.
  bool has_clips() const override { return decoder_->info().temporal_upscale > 1; }

  std::unique_ptr<gstvae_glue::Job> take(bool /*end_of_clip: the reset() that follows ends the clip*/) override {
    auto job = std::make_unique<DecodeJob>();
    job->frames_per_latent = frames_per_latent_;
    // Image latents keep what they carry; a video stream's frames fall back to the output framerate.
    job->frame_duration = frames_per_latent_ > 1 ? frame_duration_ : GST_CLOCK_TIME_NONE;
    job->element = GST_ELEMENT(element_);
    job->decoder = decoder_;
    job->session = session_;
    job->reset_session = reset_pending_;
    reset_pending_ = false;
    job->params.latent_format = latent_format_;
    job->format = format_;
    job->out_info = out_info_;
    job->batch = std::move(batch_);
    return job;
  }

 private:
  // NaN or infinite latents decode to black (or garbage) frames without
  // any failure: say so once per stream (the element's start to stop),
  // naming the first such latent. Streaming thread.
  void warn_if_non_finite(const guint8* data, size_t bytes, guint64 index) {
    size_t bad = 0;
    for (size_t off = 0; off + sizeof(float) <= bytes; off += sizeof(float)) {
      float v;
      std::memcpy(&v, data + off, sizeof v);  // a buffer's data need not be float-aligned
      if (!std::isfinite(v)) ++bad;
    }
    if (!bad) return;
    warned_non_finite_ = true;
    GST_ELEMENT_WARNING(element_, STREAM, DECODE, ("Latents hold NaN or infinite values: their frames will be wrong"),
                        ("latent %" G_GUINT64_FORMAT " holds %zu NaN or infinite values of %zu (an overflow upstream, "
                         "e.g. a model run in fp16); they decode to black or garbage frames. Said once per stream",
                         index, bad, bytes / sizeof(float)));
  }

  bool warned_non_finite_ = false;
  GstVaeDecode* element_;
  std::shared_ptr<Decoder> decoder_;
  std::shared_ptr<DecodeSession> session_;  // opened for the caps' kind of latents
  int frames_per_latent_ = 1;
  GstClockTime frame_duration_ = GST_CLOCK_TIME_NONE;  // from the output caps' framerate
  bool reset_pending_ = false;
  gst_latent_caps::Info in_;
  GstVideoInfo out_info_{};  // the output caps'
  gstvae::LatentFormat latent_format_;
  gstvae::PixelFormat format_ = gstvae::PixelFormat::RGB;
  bool have_caps_ = false;
  std::unique_ptr<LatentBatch> batch_;
};

}  // namespace

struct _GstVaeDecode {
  GstVaeBatch parent;
  DecodeSettings* settings;  // object lock
};

G_DEFINE_TYPE(GstVaeDecode, gst_vae_decode, GST_TYPE_VAE_BATCH);
GST_ELEMENT_REGISTER_DEFINE(vaedecode, "vaedecode", GST_RANK_NONE, GST_TYPE_VAE_DECODE);

static gstvae_glue::Direction* gst_vae_decode_open(GstVaeBatch* batch, const gstvae_glue::CommonSettings& s) {
  GstVaeDecode* self = GST_VAE_DECODE(batch);
  gstvae::ModelOptions options;
  options.device = s.device;
  options.precision = static_cast<gstvae::Precision>(s.precision);
  options.threads = static_cast<int>(s.threads);
  GST_OBJECT_LOCK(self);
  options.latent_space = self->settings->latent_space;
  GST_OBJECT_UNLOCK(self);
  std::shared_ptr<Decoder> decoder = gstvae::load_decoder(s.model, options);
  const auto& info = decoder->info();
  self->settings->video_frames = info.temporal_upscale;
  GST_INFO_OBJECT(self, "loaded '%s': %s (%s layout), %" G_GINT64_FORMAT " parameters, on %s in %s", s.model.c_str(),
                  info.architecture.c_str(), info.layout.c_str(), info.parameters, info.device.c_str(),
                  gstvae::precision_name(info.precision));
  return new DecodeDirection(self, std::move(decoder));
}

static GstCaps* gst_vae_decode_transform_caps(GstBaseTransform* trans, GstPadDirection direction, GstCaps* caps,
                                              GstCaps* filter) {
  GstVaeDecode* self = GST_VAE_DECODE(trans);
  gst_latent_caps::Model model;
  gst_vae_batch_model_facts(GST_VAE_BATCH(self), &model.downscale, &model.channels);
  model.temporal_downscale = self->settings->video_frames.load();
  GstCaps* result = direction == GST_PAD_SINK ? gst_latent_caps::latent_to_decoded(caps, model)
                                              : gst_latent_caps::decoded_to_latent(caps, model);
  if (direction == GST_PAD_SRC) {
    // Last, latents this decoder cannot take: any channel count, any
    // temporal-downscale (and so any framerate). A source of another model's
    // latents (a file) negotiates them and is refused by Direction::accepts
    // naming the cause, instead of a bare not-negotiated.
    const guint fitting = gst_caps_get_size(result);
    for (guint i = 0; i < fitting; ++i) {
      GstStructure* s = gst_structure_copy(gst_caps_get_structure(result, i));
      gst_structure_set(s, "channels", GST_TYPE_INT_RANGE, 1, G_MAXINT, nullptr);
      gst_structure_remove_fields(s, "framerate", "temporal-downscale", nullptr);
      result = gst_caps_merge_structure(result, s);
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

static void gst_vae_decode_set_property(GObject* object, guint prop_id, const GValue* value, GParamSpec* pspec) {
  GstVaeDecode* self = GST_VAE_DECODE(object);
  GstState state = GST_STATE(self);
  if (state > GST_STATE_READY || GST_STATE_TARGET(self) > GST_STATE_READY) {
    g_warning("vaedecode: property '%s' can only be changed in the NULL or READY state", pspec->name);
    return;
  }
  GST_OBJECT_LOCK(self);
  switch (prop_id) {
    case PROP_LATENT_SPACE:
      self->settings->latent_space = g_value_get_string(value) ? g_value_get_string(value) : "";
      break;
    default: G_OBJECT_WARN_INVALID_PROPERTY_ID(object, prop_id, pspec); break;
  }
  GST_OBJECT_UNLOCK(self);
}

static void gst_vae_decode_get_property(GObject* object, guint prop_id, GValue* value, GParamSpec* pspec) {
  GstVaeDecode* self = GST_VAE_DECODE(object);
  switch (prop_id) {
    case PROP_FRAMES_OUT: g_value_set_uint64(value, gst_vae_batch_outputs(GST_VAE_BATCH(self))); break;
    case PROP_LATENT_SPACE:
      GST_OBJECT_LOCK(self);
      g_value_set_string(value, self->settings->latent_space.c_str());
      GST_OBJECT_UNLOCK(self);
      break;
    default: G_OBJECT_WARN_INVALID_PROPERTY_ID(object, prop_id, pspec); break;
  }
}

static void gst_vae_decode_finalize(GObject* object) {
  GstVaeDecode* self = GST_VAE_DECODE(object);
  G_OBJECT_CLASS(gst_vae_decode_parent_class)->finalize(object);
  delete self->settings;
}

static void gst_vae_decode_init(GstVaeDecode* self) { self->settings = new DecodeSettings(); }

static void gst_vae_decode_class_init(GstVaeDecodeClass* klass) {
  GObjectClass* gobject_class = G_OBJECT_CLASS(klass);
  GstElementClass* element_class = GST_ELEMENT_CLASS(klass);
  GstBaseTransformClass* trans_class = GST_BASE_TRANSFORM_CLASS(klass);
  GstVaeBatchClass* batch_class = GST_VAE_BATCH_CLASS(klass);

  gobject_class->set_property = gst_vae_decode_set_property;
  gobject_class->get_property = gst_vae_decode_get_property;
  gobject_class->finalize = gst_vae_decode_finalize;

  const auto rw_ready = static_cast<GParamFlags>(G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS | GST_PARAM_MUTABLE_READY);
  const auto ro = static_cast<GParamFlags>(G_PARAM_READABLE | G_PARAM_STATIC_STRINGS);
  g_object_class_install_property(
      gobject_class, PROP_LATENT_SPACE,
      g_param_spec_string("latent-space", "Latent space",
                          "For a tiny autoencoder: the diffusion model's latent space it belongs to (TAESD family: "
                          "taesd, taesdxl, taesd3, taef1, taef2; TAEHV: taew2_1, taew2_2, taehv1_5, lighttaehy1_5, "
                          "taeltx_2, taeltx2_3), overriding its file name and metadata; empty = from "
                          "the file. 'kl': use a Flux.2-shaped KL VAE file that lacks its BatchNorm statistics as "
                          "a plain KL VAE (refused otherwise)",
                          "", rw_ready));
  g_object_class_install_property(
      gobject_class, PROP_FRAMES_OUT,
      g_param_spec_uint64("frames-out", "Frames out", "Frames produced since the element started", 0, G_MAXUINT64, 0,
                          ro));

  const std::string sink_caps = std::string(GST_LATENT_CAPS_MEDIA_TYPE) +
                                ", format = (string) F32, channels = (int) [ 1, MAX ], width = (int) [ 1, MAX ], "
                                "height = (int) [ 1, MAX ], framerate = (fraction) [ 0/1, MAX ], "
                                "latent-format = (string) " + gst_latent_caps::latent_format_list();
  const std::string src_caps = "video/x-raw, format = (string) " + gst_latent_caps::video_format_list() +
                               ", width = (int) [ 1, MAX ], height = (int) [ 1, MAX ], "
                               "framerate = (fraction) [ 0/1, MAX ]";
  gst_vae_batch_class_add_pad_templates(batch_class, sink_caps.c_str(), src_caps.c_str());
  gst_element_class_set_static_metadata(
      element_class, "VAE decoder", "Filter/Converter/Video",
      "Decodes the latents of a Stable-Diffusion-family or video VAE (Wan 2.1/2.2, TAEHV; streamed with "
      "their causal state) in batches into video frames (LibTorch)",
      "gst-vae developers");

  trans_class->transform_caps = GST_DEBUG_FUNCPTR(gst_vae_decode_transform_caps);
  batch_class->open = gst_vae_decode_open;
  batch_class->progress_message = GST_VAE_DECODE_PROGRESS_MESSAGE;
  GST_DEBUG_CATEGORY_INIT(vae_decode_debug, "vaedecode", 0, "VAE decoder");
}
