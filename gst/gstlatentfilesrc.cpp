/* latentfilesrc: reads a latent file (ComfyUI .latent, .safetensors, NumPy
 * .npy) back into an application/x-latent stream, one buffer per frame. The
 * file handling lives in src/latent_file.cpp (gstvae::LatentFileReader); this
 * is the GObject glue: caps from the file's shape and metadata, timestamps,
 * seeking, ComfyUI's LoadLatent rule. */

/**
 * SECTION:element-latentfilesrc
 * @title: latentfilesrc
 *
 * Reads the latents of a `.latent` (ComfyUI SaveLatent), `.safetensors` or
 * `.npy` file (what latentfilesink writes) and pushes one
 * `application/x-latent` buffer per frame: C x h x w float32, the layout
 * vaeencode produces. F16 and BF16 files are converted to float32. A `.latent`
 * file without the `latent_format_version_0` marker is multiplied by
 * 1/0.18215, as ComfyUI's Load Latent node does.
 *
 * Video latents (Wan, TAEHV, Hunyuan): a file whose metadata says
 * `temporal_downscale` N > 1 (latentfilesink records it), or a ComfyUI video
 * LATENT (a 5-D 1 x C x T x h x w `latent_tensor`, taken as 4x), gives caps
 * with `temporal-downscale=N`, so that vaedecode decodes the latents as one
 * clip; the `temporal-downscale` property overrides.
 *
 * ## Example launch line
 * |[
 * gst-launch-1.0 latentfilesrc location=clip.latent framerate=24/1 ! vaedecode model=vae.safetensors \
 *   ! videoconvert ! x264enc ! mp4mux ! filesink location=clip.mp4
 * ]|
 */
#include "gstlatentfilesrc.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "latent_caps.h"
#include "latent_file.h"
#include "latent_format.h"

GST_DEBUG_CATEGORY_STATIC(latent_file_src_debug);
#define GST_CAT_DEFAULT latent_file_src_debug

namespace {

enum {
  PROP_0,
  PROP_LOCATION,
  PROP_FRAMERATE,
  PROP_LATENT_FORMAT,
  PROP_START_INDEX,
  PROP_NUM_FRAMES,
  PROP_TEMPORAL_DOWNSCALE,
};

// ComfyUI's LoadLatent: files saved before the `latent_format_version_0`
// marker existed held SD1.5-scaled latents, so it multiplies them by this.
constexpr double kLegacyLatentMultiplier = 1.0 / 0.18215;
// Every released VAE downscales by 8; latentfilesink does not record it.
constexpr int kDefaultDownscale = 8;
// ComfyUI's video LATENTs (5-D) come from VAEs that take 4 frames per latent
// (Wan 2.1/2.2, Hunyuan Video; the first latent covers one frame).
constexpr int kVideoLatentTemporalDownscale = 4;
// The largest temporal-downscale accepted (the property's maximum).
constexpr int kMaxTemporalDownscale = 64;

struct Settings {
  std::string location;
  gint fps_n = 0, fps_d = 1;  // 0/1: the file's framerate metadata, else 1/1
  std::string latent_format;  // "": from the file
  guint64 start_index = 0;
  gint64 num_frames = -1;  // -1: to the end of the file
  gint temporal_downscale = 0;  // 0: from the file; 1: image latents; N >= 2: video latents
};

// What the stream is, fixed at start(). Read by queries from any thread:
// under the object lock.
struct Timing {
  bool open = false;
  gint64 frames = 0;  // in the stream (after start-index/num-frames)
  gint fps_n = 1, fps_d = 1;  // the latents' rate (a video VAE's: the video's / temporal)
  // Video frames per latent (the caps' temporal-downscale). Above 1, the
  // latents are a causal video VAE's clip: latent 0 covers one video frame,
  // every later one `temporal` (as vaeencode makes them), and each gets the
  // time, duration and offsets of the video frames it covers.
  gint temporal = 1;

  // The first video frame latent `frame` covers (image latents: the latent
  // itself).
  guint64 first_video_frame(gint64 frame) const {
    if (temporal <= 1 || frame <= 0) return static_cast<guint64>(frame);
    return 1 + static_cast<guint64>(frame - 1) * static_cast<guint64>(temporal);
  }
  // PTS of video frame `f`, at the video's rate (the latents' times temporal).
  GstClockTime video_pts(guint64 f) const {
    return gst_util_uint64_scale(f, static_cast<guint64>(fps_d) * GST_SECOND,
                                 static_cast<guint64>(fps_n) * static_cast<guint64>(std::max(1, temporal)));
  }
  GstClockTime pts(gint64 frame) const { return video_pts(first_video_frame(frame)); }
  // The frame shown at `t`: the last one whose PTS is <= t (PTS rounds down,
  // so the plain quotient can fall one short of a frame's own PTS).
  gint64 frame_at(GstClockTime t) const {
    const guint64 video = gst_util_uint64_scale(
        t, static_cast<guint64>(fps_n) * static_cast<guint64>(std::max(1, temporal)),
        static_cast<guint64>(fps_d) * GST_SECOND);
    gint64 frame = temporal <= 1 ? static_cast<gint64>(video)
                   : video == 0  ? 0
                                 : 1 + static_cast<gint64>((video - 1) / static_cast<guint64>(temporal));
    while (frame > 0 && pts(frame) > t) --frame;
    while (pts(frame + 1) <= t) ++frame;
    return frame;
  }
};

// The streaming thread's state (start/stop run while it is stopped).
struct Reading {
  std::unique_ptr<gstvae::LatentFileReader> reader;
  GstCaps* caps = nullptr;
  gint64 first_file_frame = 0;  // file frame of stream frame 0
  gint64 next = 0;              // stream frame pushed next
  bool discont = true;
  float multiplier = 1.0f;      // 1/0.18215 under the LoadLatent rule
  size_t frame_bytes = 0;
  std::string model;            // metadata `model`: sent as the vae-model tag
  bool tags_sent = false;
};

}  // namespace

struct _GstLatentFileSrc {
  GstBaseSrc parent;
  Settings* settings;  // object lock
  Timing* timing;      // object lock
  Reading* state;      // streaming thread
};

G_DEFINE_TYPE(GstLatentFileSrc, gst_latent_file_src, GST_TYPE_BASE_SRC);
GST_ELEMENT_REGISTER_DEFINE(latentfilesrc, "latentfilesrc", GST_RANK_NONE, GST_TYPE_LATENT_FILE_SRC);

static GstStaticPadTemplate src_template =
    GST_STATIC_PAD_TEMPLATE("src", GST_PAD_SRC, GST_PAD_ALWAYS,
                            GST_STATIC_CAPS(GST_LATENT_CAPS_MEDIA_TYPE ", format = (string) F32, "
                                            "channels = (int) [ 1, MAX ], width = (int) [ 1, MAX ], "
                                            "height = (int) [ 1, MAX ], framerate = (fraction) [ 0/1, MAX ]"));

static Settings settings_snapshot(GstLatentFileSrc* self) {
  GST_OBJECT_LOCK(self);
  Settings s = *self->settings;
  GST_OBJECT_UNLOCK(self);
  return s;
}

static Timing timing_snapshot(GstLatentFileSrc* self) {
  GST_OBJECT_LOCK(self);
  Timing t = *self->timing;
  GST_OBJECT_UNLOCK(self);
  return t;
}

static bool parse_fraction(const std::string& text, gint* n, gint* d) {
  int a = 0, b = 0;
  char rest = 0;
  if (std::sscanf(text.c_str(), "%d/%d%c", &a, &b, &rest) != 2 || a <= 0 || b <= 0) return false;
  *n = a;
  *d = b;
  return true;
}

static bool parse_positive_int(const std::string& text, gint* out) {
  int v = 0;
  char rest = 0;
  if (std::sscanf(text.c_str(), "%d%c", &v, &rest) != 1 || v <= 0) return false;
  *out = v;
  return true;
}

// What the file says about the stream besides its shape: latentfilesink's
// metadata (top-level keys, or the first entry of `ranges` when the file
// holds several ranges and leaves the differing keys out).
struct FileFacts {
  std::string framerate, latent_format, source_width, source_height, temporal_downscale;
  size_t ranges = 0;
};

static FileFacts file_facts(const std::map<std::string, std::string>& meta) {
  FileFacts f;
  auto get = [&](const char* key) {
    auto it = meta.find(key);
    return it == meta.end() ? std::string() : it->second;
  };
  f.framerate = get("framerate");
  f.latent_format = get("latent_format");
  f.source_width = get("source_width");
  f.source_height = get("source_height");
  f.temporal_downscale = get("temporal_downscale");
  const std::string ranges = get("ranges");
  if (!ranges.empty()) {
    const nlohmann::json j = nlohmann::json::parse(ranges, nullptr, /*allow_exceptions=*/false);
    if (j.is_array() && !j.empty() && j[0].is_object()) {
      f.ranges = j.size();
      const nlohmann::json& first = j[0];
      auto take = [&](std::string* field, const char* key) {
        if (!field->empty() || !first.contains(key)) return;
        const nlohmann::json& v = first[key];
        if (v.is_string()) *field = v.get<std::string>();
        if (v.is_number_integer()) *field = std::to_string(v.get<long long>());
      };
      take(&f.framerate, "framerate");
      take(&f.latent_format, "latent_format");
      take(&f.source_width, "source_width");
      take(&f.source_height, "source_height");
      // Video ranges only carry it; an image range's absence means 1, so the
      // top-level key (absent when ranges differ) is not looked for further.
      take(&f.temporal_downscale, "temporal_downscale");
    }
  }
  return f;
}

static void post_error_text(GstLatentFileSrc* self, const std::string& path, gstvae::LatentFileError::Kind kind,
                            const char* reason);

static void post_error(GstLatentFileSrc* self, const std::string& path, const gstvae::LatentFileError& e) {
  // The reason may quote the file's bytes (metadata that is not UTF-8):
  // GStreamer drops an error's debug text that is not valid UTF-8, and with
  // it the reason, so invalid sequences become U+FFFD.
  gchar* reason = g_utf8_make_valid(e.what(), -1);
  post_error_text(self, path, e.kind(), reason);
  g_free(reason);
}

static void post_error_text(GstLatentFileSrc* self, const std::string& path, gstvae::LatentFileError::Kind kind,
                            const char* reason) {
  using Kind = gstvae::LatentFileError::Kind;
  switch (kind) {
    case Kind::NotFound:
      GST_ELEMENT_ERROR(self, RESOURCE, NOT_FOUND, ("Latent file '%s' not found", path.c_str()), ("%s", reason));
      break;
    case Kind::CannotOpen:
      GST_ELEMENT_ERROR(self, RESOURCE, OPEN_READ, ("Could not open latent file '%s' for reading", path.c_str()),
                        ("%s", reason));
      break;
    case Kind::ReadFailed:
      GST_ELEMENT_ERROR(self, RESOURCE, READ, ("Could not read latent file '%s'", path.c_str()), ("%s", reason));
      break;
    default:
      GST_ELEMENT_ERROR(self, STREAM, FORMAT, ("'%s' is not a usable latent file", path.c_str()), ("%s", reason));
      break;
  }
}

// Opens the file and works out caps, timing and the LoadLatent rule. Posts an
// error and returns false when it cannot.
static bool open_stream(GstLatentFileSrc* self, const Settings& s) {
  Reading& st = *self->state;
  const std::string& path = s.location;
  std::unique_ptr<gstvae::LatentFileReader> reader;
  try {
    reader = std::make_unique<gstvae::LatentFileReader>(path);
  } catch (const gstvae::LatentFileError& e) {
    post_error(self, path, e);
    return false;
  }
  const gstvae::LatentFileLayout& layout = reader->layout();
  const FileFacts facts = file_facts(layout.metadata);

  // Stream range.
  if (s.start_index > static_cast<guint64>(layout.frames)) {
    GST_ELEMENT_ERROR(self, RESOURCE, SETTINGS,
                      ("start-index %" G_GUINT64_FORMAT " is past the end of '%s'", s.start_index, path.c_str()),
                      ("the file holds %" G_GINT64_FORMAT " frames", static_cast<gint64>(layout.frames)));
    return false;
  }
  gint64 frames = layout.frames - static_cast<gint64>(s.start_index);
  if (s.num_frames >= 0 && s.num_frames < frames) frames = s.num_frames;

  // Latent format and ComfyUI's LoadLatent rule. A .latent file holds raw
  // latents (ComfyUI applies the model's scaling itself); one without the
  // marker is an old SD1.5-scaled file that LoadLatent multiplies by 1/0.18215.
  const bool comfy_file = layout.format == gstvae::LatentFileFormat::Latent && !layout.npy;
  const bool legacy = comfy_file && !layout.has_version_marker;
  std::string latent_format = "raw";
  if (!s.latent_format.empty()) {
    latent_format = s.latent_format;
  } else if (!comfy_file && !facts.latent_format.empty()) {
    latent_format = facts.latent_format;
  }
  try {
    latent_format = gstvae::latent_format_by_name(latent_format).name;
  } catch (const std::exception& e) {
    if (!s.latent_format.empty()) {
      GST_ELEMENT_ERROR(self, RESOURCE, SETTINGS, ("Unknown latent-format '%s'", s.latent_format.c_str()),
                        ("%s", e.what()));
      return false;
    }
    GST_ELEMENT_WARNING(self, STREAM, FORMAT,
                        ("'%s' records the unknown latent format '%s': announcing raw", path.c_str(),
                         latent_format.c_str()),
                        ("%s; set latent-format to say what the values are", e.what()));
    latent_format = "raw";
  }
  if (comfy_file && !facts.latent_format.empty() && facts.latent_format != "raw")
    GST_WARNING_OBJECT(self, "'%s' records latent_format '%s', but a .latent file holds raw latents (ComfyUI's "
                       "rule): announcing %s", path.c_str(), facts.latent_format.c_str(), latent_format.c_str());
  if (legacy)
    GST_INFO_OBJECT(self, "'%s' has no latent_format_version_0 marker: multiplying its values by 1/0.18215 as "
                    "ComfyUI's LoadLatent does (an old file of SD1.5-scaled latents)", path.c_str());

  // Frame rate: the property, else the file's, else 1/1.
  gint fps_n = 1, fps_d = 1;
  const char* fps_from = "default";
  if (s.fps_n > 0 && s.fps_d > 0) {
    fps_n = s.fps_n;
    fps_d = s.fps_d;
    fps_from = "property";
  } else if (parse_fraction(facts.framerate, &fps_n, &fps_d)) {
    fps_from = "file";
  }

  // Source size: recorded by latentfilesink, else latent size x 8 (kept only
  // when it maps onto this latent size, as the caps require).
  gint source_w = 0, source_h = 0;
  if (!parse_positive_int(facts.source_width, &source_w) || !parse_positive_int(facts.source_height, &source_h) ||
      source_w / kDefaultDownscale != layout.width || source_h / kDefaultDownscale != layout.height) {
    source_w = static_cast<gint>(std::min<gint64>(layout.width * kDefaultDownscale, G_MAXINT));
    source_h = static_cast<gint>(std::min<gint64>(layout.height * kDefaultDownscale, G_MAXINT));
  }

  // Frames per latent: the property, else the file's temporal_downscale
  // metadata (latentfilesink), else 4 for a 5-D ComfyUI video latent, else 1
  // (image latents).
  gint temporal = 1;
  const char* temporal_from = "default";
  gint recorded = 0;
  if (s.temporal_downscale > 0) {
    temporal = s.temporal_downscale;
    temporal_from = "property";
  } else if (!facts.temporal_downscale.empty()) {
    if (parse_positive_int(facts.temporal_downscale, &recorded) && recorded <= kMaxTemporalDownscale) {
      temporal = recorded;
      temporal_from = "file";
    } else {
      GST_ELEMENT_WARNING(self, STREAM, FORMAT,
                          ("'%s' records an invalid temporal_downscale '%s': reading image latents", path.c_str(),
                           facts.temporal_downscale.c_str()),
                          ("set the temporal-downscale property to say how many frames each latent covers "
                           "(1 .. %d)", kMaxTemporalDownscale));
    }
  } else if (layout.stored_dims == 5) {
    temporal = kVideoLatentTemporalDownscale;
    temporal_from = "5-d";
  }

  // The caps vaeencode would give frames of the source size (the same helper,
  // so the fields stay those of docs/latent-caps.md).
  GstCaps* video = gst_caps_new_simple("video/x-raw", "width", G_TYPE_INT, source_w, "height", G_TYPE_INT, source_h,
                                       "framerate", GST_TYPE_FRACTION, fps_n, fps_d, nullptr);
  gst_latent_caps::Model model;
  model.downscale = kDefaultDownscale;
  model.channels = static_cast<int>(layout.channels);
  model.latent_format = latent_format;
  GstCaps* caps = gst_latent_caps::video_to_latent(video, model);
  gst_caps_unref(video);
  // The framerate stays the file's (the latents' rate, as vaeencode's caps
  // carry it): only the field is added, where video_to_latent puts it.
  if (temporal > 1 && !gst_caps_is_empty(caps))
    gst_caps_set_simple(caps, "temporal-downscale", G_TYPE_INT, temporal, nullptr);
  gst_latent_caps::Info info;
  if (!gst_latent_caps::parse(caps, &info) || info.width != layout.width || info.height != layout.height ||
      info.channels != layout.channels) {
    GST_ELEMENT_ERROR(self, STREAM, FORMAT, ("Could not describe '%s' as latent caps", path.c_str()),
                      ("%" GST_PTR_FORMAT " for %" G_GINT64_FORMAT "x%" G_GINT64_FORMAT "x%" G_GINT64_FORMAT, caps,
                       static_cast<gint64>(layout.channels), static_cast<gint64>(layout.height),
                       static_cast<gint64>(layout.width)));
    gst_caps_unref(caps);
    return false;
  }

  GST_INFO_OBJECT(self, "'%s': %" G_GINT64_FORMAT " frames of %" G_GINT64_FORMAT "x%" G_GINT64_FORMAT
                  "x%" G_GINT64_FORMAT " %s (%s, %d-D), streaming %" G_GINT64_FORMAT " from frame %" G_GUINT64_FORMAT
                  " at %d/%d fps (%s), %d frames per latent (%s); caps %" GST_PTR_FORMAT,
                  path.c_str(), static_cast<gint64>(layout.frames), static_cast<gint64>(layout.channels),
                  static_cast<gint64>(layout.height), static_cast<gint64>(layout.width),
                  gstvae::latent_element_name(layout.element), layout.npy ? "npy" : "safetensors",
                  layout.stored_dims, frames, s.start_index, fps_n, fps_d, fps_from, temporal, temporal_from, caps);

  GST_OBJECT_LOCK(self);  // get_caps() may run on another thread
  if (st.caps) gst_caps_unref(st.caps);
  st.caps = caps;
  GST_OBJECT_UNLOCK(self);
  st.first_file_frame = static_cast<gint64>(s.start_index);
  st.next = 0;
  st.discont = true;
  st.multiplier = legacy ? static_cast<float>(kLegacyLatentMultiplier) : 1.0f;
  st.frame_bytes = static_cast<size_t>(layout.values_per_frame()) * sizeof(float);
  auto model_it = layout.metadata.find("model");
  st.model = model_it == layout.metadata.end() ? "" : model_it->second;
  st.tags_sent = false;

  GstStructure* msg = gst_structure_new(
      "latentfilesrc-opened", "location", G_TYPE_STRING, path.c_str(), "container", G_TYPE_STRING,
      layout.npy ? "npy" : "safetensors", "dtype", G_TYPE_STRING, gstvae::latent_element_name(layout.element),
      "file-frames", G_TYPE_INT64, static_cast<gint64>(layout.frames), "frames", G_TYPE_INT64, frames, "channels",
      G_TYPE_INT, info.channels, "height", G_TYPE_INT, info.height, "width", G_TYPE_INT, info.width, "framerate",
      GST_TYPE_FRACTION, fps_n, fps_d, "framerate-from", G_TYPE_STRING, fps_from, "latent-format", G_TYPE_STRING,
      latent_format.c_str(), "legacy-scale", G_TYPE_BOOLEAN, legacy, "multiplier", G_TYPE_DOUBLE,
      legacy ? kLegacyLatentMultiplier : 1.0, "stored-dims", G_TYPE_INT, layout.stored_dims, "temporal-downscale",
      G_TYPE_INT, temporal, "temporal-downscale-from", G_TYPE_STRING, temporal_from, nullptr);
  if (legacy)
    gst_structure_set(msg, "note", G_TYPE_STRING,
                      "no latent_format_version_0 marker: values multiplied by 1/0.18215 (ComfyUI LoadLatent rule)",
                      nullptr);
  if (facts.ranges > 1)
    GST_ELEMENT_WARNING(self, STREAM, FORMAT,
                        ("'%s' holds %zu ranges; the caps describe the first", path.c_str(), facts.ranges),
                        ("latentfilesrc announces one frame rate, source size and latent format for the whole file"));
  st.reader = std::move(reader);

  GST_OBJECT_LOCK(self);
  self->timing->open = true;
  self->timing->frames = frames;
  self->timing->fps_n = fps_n;
  self->timing->fps_d = fps_d;
  self->timing->temporal = temporal;
  GstBaseSrc* base = GST_BASE_SRC(self);
  base->segment.duration = static_cast<gint64>(self->timing->pts(frames));
  GST_OBJECT_UNLOCK(self);

  gst_element_post_message(GST_ELEMENT(self), gst_message_new_element(GST_OBJECT(self), msg));
  return true;
}

static gboolean gst_latent_file_src_start(GstBaseSrc* src) {
  GstLatentFileSrc* self = GST_LATENT_FILE_SRC(src);
  try {
    const Settings s = settings_snapshot(self);
    if (s.location.empty()) {
      GST_ELEMENT_ERROR(self, RESOURCE, NOT_FOUND, ("No file name given"), ("set the 'location' property"));
      return FALSE;
    }
    return open_stream(self, s) ? TRUE : FALSE;
  } catch (const std::exception& e) {  // allocation or JSON library failures: never into GStreamer
    GST_ELEMENT_ERROR(self, LIBRARY, FAILED, ("latentfilesrc could not start"), ("%s", e.what()));
    return FALSE;
  }
}

static gboolean gst_latent_file_src_stop(GstBaseSrc* src) {
  GstLatentFileSrc* self = GST_LATENT_FILE_SRC(src);
  Reading& st = *self->state;
  st.reader.reset();
  GST_OBJECT_LOCK(self);
  if (st.caps) gst_caps_unref(st.caps);
  st.caps = nullptr;
  *self->timing = Timing();
  GST_OBJECT_UNLOCK(self);
  return TRUE;
}

static GstCaps* gst_latent_file_src_get_caps(GstBaseSrc* src, GstCaps* filter) {
  GstLatentFileSrc* self = GST_LATENT_FILE_SRC(src);
  // Fixed by the file once started (start() runs before negotiation).
  GST_OBJECT_LOCK(self);
  GstCaps* caps = self->state->caps ? gst_caps_ref(self->state->caps) : nullptr;
  GST_OBJECT_UNLOCK(self);
  if (!caps) caps = gst_pad_get_pad_template_caps(GST_BASE_SRC_PAD(src));
  if (filter) {
    GstCaps* both = gst_caps_intersect_full(filter, caps, GST_CAPS_INTERSECT_FIRST);
    gst_caps_unref(caps);
    caps = both;
  }
  return caps;
}

static gboolean gst_latent_file_src_is_seekable(GstBaseSrc*) { return TRUE; }

static gboolean gst_latent_file_src_do_seek(GstBaseSrc* src, GstSegment* segment) {
  GstLatentFileSrc* self = GST_LATENT_FILE_SRC(src);
  if (segment->format != GST_FORMAT_TIME) return FALSE;
  if (segment->rate < 0) {  // refused before the flush by gst_latent_file_src_event(); kept for safety
    GST_WARNING_OBJECT(self, "reverse playback is not supported");
    return FALSE;
  }
  const Timing t = timing_snapshot(self);
  if (!t.open) return TRUE;  // before start: the first frame
  const GstClockTime at = GST_CLOCK_TIME_IS_VALID(segment->position) ? segment->position : segment->start;
  const gint64 frame = std::min<gint64>(t.frame_at(at), t.frames);
  GST_DEBUG_OBJECT(self, "seek to %" GST_TIME_FORMAT ": frame %" G_GINT64_FORMAT, GST_TIME_ARGS(at), frame);
  self->state->next = frame;
  self->state->discont = true;
  segment->time = segment->start;
  return TRUE;
}

// A seek this element cannot perform is refused here, before GstBaseSrc
// flushes downstream: basesrc only asks do_seek() after its flush, and a
// refusal there leaves the restarted stream with no segment event
// ("Got data flow before segment event"). Reverse playback is the one such
// seek (every format is converted to TIME before do_seek()).
static gboolean gst_latent_file_src_event(GstBaseSrc* src, GstEvent* event) {
  if (GST_EVENT_TYPE(event) == GST_EVENT_SEEK) {
    gdouble rate = 1.0;
    gst_event_parse_seek(event, &rate, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
    if (rate < 0) {
      GST_WARNING_OBJECT(src, "reverse playback (rate %g) is not supported: seek refused", rate);
      return FALSE;
    }
  }
  return GST_BASE_SRC_CLASS(gst_latent_file_src_parent_class)->event(src, event);
}

static GstFlowReturn gst_latent_file_src_create(GstBaseSrc* src, guint64, guint, GstBuffer** out) {
  GstLatentFileSrc* self = GST_LATENT_FILE_SRC(src);
  Reading& st = *self->state;
  const Timing t = timing_snapshot(self);
  if (!st.reader || st.next >= t.frames) return GST_FLOW_EOS;
  const GstClockTime pts = t.pts(st.next);
  GST_OBJECT_LOCK(self);
  const GstSegment segment = src->segment;
  GST_OBJECT_UNLOCK(self);
  if (GST_CLOCK_TIME_IS_VALID(segment.stop) && pts >= segment.stop) return GST_FLOW_EOS;

  if (!st.tags_sent) {
    st.tags_sent = true;
    if (!st.model.empty()) {
      GstTagList* tags = gst_tag_list_new(GST_TAG_VAE_MODEL, st.model.c_str(), nullptr);
      gst_tag_list_set_scope(tags, GST_TAG_SCOPE_STREAM);
      gst_pad_push_event(GST_BASE_SRC_PAD(src), gst_event_new_tag(tags));
    }
  }

  GstBuffer* buffer = gst_buffer_new_allocate(nullptr, st.frame_bytes, nullptr);
  if (!buffer) {
    GST_ELEMENT_ERROR(self, RESOURCE, NO_SPACE_LEFT, ("Could not allocate a latent buffer"),
                      ("%zu bytes", st.frame_bytes));
    return GST_FLOW_ERROR;
  }
  GstMapInfo map;
  if (!gst_buffer_map(buffer, &map, GST_MAP_WRITE)) {
    gst_buffer_unref(buffer);
    GST_ELEMENT_ERROR(self, RESOURCE, READ, ("Could not map a latent buffer"), (nullptr));
    return GST_FLOW_ERROR;
  }
  float* values = reinterpret_cast<float*>(map.data);
  try {
    st.reader->read_frame(st.first_file_frame + st.next, values);
  } catch (const gstvae::LatentFileError& e) {
    gst_buffer_unmap(buffer, &map);
    gst_buffer_unref(buffer);
    post_error(self, st.reader->path(), e);
    return GST_FLOW_ERROR;
  } catch (const std::exception& e) {
    gst_buffer_unmap(buffer, &map);
    gst_buffer_unref(buffer);
    GST_ELEMENT_ERROR(self, RESOURCE, READ, ("Could not read latent file '%s'", st.reader->path().c_str()),
                      ("%s", e.what()));
    return GST_FLOW_ERROR;
  }
  if (st.multiplier != 1.0f) {
    const size_t n = st.frame_bytes / sizeof(float);
    for (size_t i = 0; i < n; ++i) values[i] *= st.multiplier;
  }
  gst_buffer_unmap(buffer, &map);

  GST_BUFFER_PTS(buffer) = pts;
  GST_BUFFER_DURATION(buffer) = t.pts(st.next + 1) - pts;
  // Video latents: the video frames covered, as vaeencode gives them.
  GST_BUFFER_OFFSET(buffer) = t.first_video_frame(st.next);
  GST_BUFFER_OFFSET_END(buffer) = t.first_video_frame(st.next + 1);
  if (st.discont) {
    GST_BUFFER_FLAG_SET(buffer, GST_BUFFER_FLAG_DISCONT);
    st.discont = false;
  }
  st.next++;
  *out = buffer;
  return GST_FLOW_OK;
}

// Frames are the stream's natural unit: BUFFERS and DEFAULT both count them.
static bool is_frame_format(GstFormat f) { return f == GST_FORMAT_BUFFERS || f == GST_FORMAT_DEFAULT; }

static bool convert(const Timing& t, GstFormat from, gint64 value, GstFormat to, gint64* out) {
  if (from == to || value == -1) {
    *out = value;
    return true;
  }
  if (value < 0) return false;
  if (from == GST_FORMAT_TIME && is_frame_format(to)) {
    *out = t.frame_at(static_cast<GstClockTime>(value));
    return true;
  }
  if (is_frame_format(from) && to == GST_FORMAT_TIME) {
    *out = static_cast<gint64>(t.pts(value));
    return true;
  }
  if (is_frame_format(from) && is_frame_format(to)) {
    *out = value;
    return true;
  }
  return false;
}

static gboolean gst_latent_file_src_query(GstBaseSrc* src, GstQuery* query) {
  GstLatentFileSrc* self = GST_LATENT_FILE_SRC(src);
  const Timing t = timing_snapshot(self);
  switch (GST_QUERY_TYPE(query)) {
    case GST_QUERY_DURATION: {
      GstFormat format;
      gst_query_parse_duration(query, &format, nullptr);
      if (!t.open || (format != GST_FORMAT_TIME && !is_frame_format(format))) break;
      gint64 duration = 0;
      if (!convert(t, GST_FORMAT_BUFFERS, t.frames, format, &duration)) return FALSE;
      gst_query_set_duration(query, format, duration);
      return TRUE;
    }
    case GST_QUERY_CONVERT: {
      GstFormat from, to;
      gint64 value, result;
      gst_query_parse_convert(query, &from, &value, &to, nullptr);
      if (!t.open) break;
      if (!convert(t, from, value, to, &result)) break;
      gst_query_set_convert(query, from, value, to, result);
      return TRUE;
    }
    case GST_QUERY_SEEKING: {
      GstFormat format;
      gst_query_parse_seeking(query, &format, nullptr, nullptr, nullptr);
      if (!t.open || (format != GST_FORMAT_TIME && !is_frame_format(format))) break;
      gint64 duration = 0;
      convert(t, GST_FORMAT_BUFFERS, t.frames, format, &duration);
      gst_query_set_seeking(query, format, TRUE, 0, duration);
      return TRUE;
    }
    default:
      break;
  }
  return GST_BASE_SRC_CLASS(gst_latent_file_src_parent_class)->query(src, query);
}

static void gst_latent_file_src_set_property(GObject* object, guint prop_id, const GValue* value, GParamSpec* pspec) {
  GstLatentFileSrc* self = GST_LATENT_FILE_SRC(object);
  if (GST_STATE(self) > GST_STATE_READY || GST_STATE_TARGET(self) > GST_STATE_READY) {
    g_warning("latentfilesrc: property '%s' can only be changed in the NULL or READY state", pspec->name);
    return;
  }
  GST_OBJECT_LOCK(self);
  Settings& s = *self->settings;
  switch (prop_id) {
    case PROP_LOCATION: s.location = g_value_get_string(value) ? g_value_get_string(value) : ""; break;
    case PROP_FRAMERATE:
      s.fps_n = gst_value_get_fraction_numerator(value);
      s.fps_d = gst_value_get_fraction_denominator(value);
      break;
    case PROP_LATENT_FORMAT: s.latent_format = g_value_get_string(value) ? g_value_get_string(value) : ""; break;
    case PROP_START_INDEX: s.start_index = g_value_get_uint64(value); break;
    case PROP_NUM_FRAMES: s.num_frames = g_value_get_int64(value); break;
    case PROP_TEMPORAL_DOWNSCALE: s.temporal_downscale = g_value_get_int(value); break;
    default: G_OBJECT_WARN_INVALID_PROPERTY_ID(object, prop_id, pspec); break;
  }
  GST_OBJECT_UNLOCK(self);
}

static void gst_latent_file_src_get_property(GObject* object, guint prop_id, GValue* value, GParamSpec* pspec) {
  GstLatentFileSrc* self = GST_LATENT_FILE_SRC(object);
  GST_OBJECT_LOCK(self);
  const Settings& s = *self->settings;
  switch (prop_id) {
    case PROP_LOCATION: g_value_set_string(value, s.location.empty() ? nullptr : s.location.c_str()); break;
    case PROP_FRAMERATE: gst_value_set_fraction(value, s.fps_n, s.fps_d); break;
    case PROP_LATENT_FORMAT:
      g_value_set_string(value, s.latent_format.empty() ? nullptr : s.latent_format.c_str());
      break;
    case PROP_START_INDEX: g_value_set_uint64(value, s.start_index); break;
    case PROP_NUM_FRAMES: g_value_set_int64(value, s.num_frames); break;
    case PROP_TEMPORAL_DOWNSCALE: g_value_set_int(value, s.temporal_downscale); break;
    default: G_OBJECT_WARN_INVALID_PROPERTY_ID(object, prop_id, pspec); break;
  }
  GST_OBJECT_UNLOCK(self);
}

static void gst_latent_file_src_finalize(GObject* object) {
  GstLatentFileSrc* self = GST_LATENT_FILE_SRC(object);
  if (self->state->caps) gst_caps_unref(self->state->caps);
  delete self->state;
  delete self->timing;
  delete self->settings;
  G_OBJECT_CLASS(gst_latent_file_src_parent_class)->finalize(object);
}

static void gst_latent_file_src_init(GstLatentFileSrc* self) {
  self->settings = new Settings();
  self->timing = new Timing();
  self->state = new Reading();
  gst_base_src_set_format(GST_BASE_SRC(self), GST_FORMAT_TIME);
}

static void gst_latent_file_src_class_init(GstLatentFileSrcClass* klass) {
  GObjectClass* gobject_class = G_OBJECT_CLASS(klass);
  GstElementClass* element_class = GST_ELEMENT_CLASS(klass);
  GstBaseSrcClass* src_class = GST_BASE_SRC_CLASS(klass);

  gobject_class->set_property = gst_latent_file_src_set_property;
  gobject_class->get_property = gst_latent_file_src_get_property;
  gobject_class->finalize = gst_latent_file_src_finalize;

  const auto rw_ready = static_cast<GParamFlags>(G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS | GST_PARAM_MUTABLE_READY);
  g_object_class_install_property(
      gobject_class, PROP_LOCATION,
      g_param_spec_string("location", "Location",
                          "Latent file to read: ComfyUI .latent, .safetensors (latent_tensor, F32/F16/BF16, "
                          "N x C x h x w, C x h x w, or a video's 1 x C x T x h x w read as T latents) or NumPy "
                          ".npy ('<f4'/'<f2', the same shapes); the content decides, the extension .latent "
                          "enables ComfyUI's LoadLatent rule",
                          nullptr, rw_ready));
  g_object_class_install_property(
      gobject_class, PROP_FRAMERATE,
      gst_param_spec_fraction("framerate", "Frame rate",
                              "Frame rate of the stream (PTS = frame / framerate); 0/1: the file's 'framerate' "
                              "metadata (written by latentfilesink), else 1/1",
                              0, 1, G_MAXINT, 1, 0, 1, rw_ready));
  g_object_class_install_property(
      gobject_class, PROP_LATENT_FORMAT,
      g_param_spec_string("latent-format", "Latent format",
                          "What the file's values are (raw, sd15, sdxl, sd3, flux), for the caps' latent-format; "
                          "unset: 'raw' for .latent files, else the file's 'latent_format' metadata, else raw. "
                          "Nothing is converted",
                          nullptr, rw_ready));
  g_object_class_install_property(
      gobject_class, PROP_START_INDEX,
      g_param_spec_uint64("start-index", "Start index",
                          "First frame of the file to stream (it gets PTS 0)", 0, G_MAXUINT64, 0, rw_ready));
  g_object_class_install_property(
      gobject_class, PROP_NUM_FRAMES,
      g_param_spec_int64("num-frames", "Number of frames",
                         "Frames to stream from start-index (-1: to the end of the file)", -1, G_MAXINT64, -1,
                         rw_ready));
  g_object_class_install_property(
      gobject_class, PROP_TEMPORAL_DOWNSCALE,
      g_param_spec_int("temporal-downscale", "Temporal downscale",
                       "Video frames per latent, for the caps' temporal-downscale: 0 = from the file (its "
                       "'temporal_downscale' metadata, written by latentfilesink; else 4 for a 5-D ComfyUI video "
                       "latent 1 x C x T x h x w; else 1), 1 = image latents (decoded one by one), N >= 2 = the "
                       "latents of a video VAE (Wan, TAEHV: 4), decoded as one clip. The framerate stays the "
                       "latents'",
                       0, kMaxTemporalDownscale, 0, rw_ready));

  gst_element_class_set_static_metadata(
      element_class, "Latent file source", "Source/File",
      "Reads VAE latents from ComfyUI .latent, .safetensors or NumPy .npy files", "gst-vae developers");
  gst_element_class_add_static_pad_template(element_class, &src_template);

  src_class->start = GST_DEBUG_FUNCPTR(gst_latent_file_src_start);
  src_class->stop = GST_DEBUG_FUNCPTR(gst_latent_file_src_stop);
  src_class->get_caps = GST_DEBUG_FUNCPTR(gst_latent_file_src_get_caps);
  src_class->is_seekable = GST_DEBUG_FUNCPTR(gst_latent_file_src_is_seekable);
  src_class->do_seek = GST_DEBUG_FUNCPTR(gst_latent_file_src_do_seek);
  src_class->event = GST_DEBUG_FUNCPTR(gst_latent_file_src_event);
  src_class->create = GST_DEBUG_FUNCPTR(gst_latent_file_src_create);
  src_class->query = GST_DEBUG_FUNCPTR(gst_latent_file_src_query);

  GST_DEBUG_CATEGORY_INIT(latent_file_src_debug, "latentfilesrc", 0, "Latent file source");
}
