/* latentfilesink: writes application/x-latent streams to ComfyUI .latent,
 * .safetensors or .npy files, streaming, with atomic renames and optional
 * segmentation by frame count or duration. The file handling lives in
 * src/latent_file.cpp; this is the GObject glue. */
#include "gstlatentfilesink.h"

#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "latent_caps.h"
#include "latent_file.h"
#include "latent_format.h"

GST_DEBUG_CATEGORY_STATIC(latent_file_sink_debug);
#define GST_CAT_DEFAULT latent_file_sink_debug

using gstvae::LatentFileFormat;
using gstvae::LatentFileWriter;

namespace {

enum {
  PROP_0,
  PROP_LOCATION,
  PROP_FORMAT,
  PROP_MAX_FRAMES,
  PROP_MAX_DURATION,
  PROP_START_INDEX,
  PROP_FRAMES_WRITTEN,
  PROP_FILES_WRITTEN,
  PROP_METADATA,
};

enum FormatChoice { FORMAT_AUTO = 0, FORMAT_LATENT, FORMAT_SAFETENSORS, FORMAT_NPY };

GType format_choice_get_type() {
  static GType type = 0;
  if (g_once_init_enter(&type)) {
    static const GEnumValue values[] = {
        {FORMAT_AUTO, "From the extension: .npy, .safetensors, anything else .latent", "auto"},
        {FORMAT_LATENT, "ComfyUI latent (safetensors: latent_tensor + latent_format_version_0)", "latent"},
        {FORMAT_SAFETENSORS, "safetensors, same content as .latent", "safetensors"},
        {FORMAT_NPY, "NumPy .npy 1.0, float32 (N, C, h, w)", "npy"},
        {0, nullptr, nullptr}};
    g_once_init_leave(&type, g_enum_register_static("GstLatentFileSinkFormat", values));
  }
  return type;
}

struct Settings {
  std::string location;
  gint format = FORMAT_AUTO;
  guint64 max_frames = 0;
  guint64 max_duration = 0;
  guint start_index = 0;
  // Application fields added to every file's metadata (the `metadata` property).
  std::map<std::string, std::string> extra;
};

// A location is either a plain path or a pattern with exactly one integer
// conversion (%d, %05d, ...). User text is never passed to printf.
struct Location {
  std::string prefix, suffix;
  int width = 0;
  bool pattern = false;

  std::string expand(guint index) const {
    if (!pattern) return prefix;
    std::string n = std::to_string(index);
    if (static_cast<int>(n.size()) < width) n.insert(0, width - n.size(), '0');
    return prefix + n + suffix;
  }
};

// Returns an empty string on success, else what is wrong with `text`.
std::string parse_location(const std::string& text, Location* out) {
  Location loc;
  std::string literal;
  int conversions = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '%') {
      literal += text[i];
      continue;
    }
    if (i + 1 < text.size() && text[i + 1] == '%') {
      literal += '%';
      ++i;
      continue;
    }
    size_t j = i + 1;
    int width = 0;
    while (j < text.size() && g_ascii_isdigit(text[j]) && width < 100) width = width * 10 + (text[j++] - '0');
    if (j >= text.size() || (text[j] != 'd' && text[j] != 'i' && text[j] != 'u'))
      return "only one integer conversion such as %05d is allowed in a location pattern";
    if (++conversions > 1) return "a location pattern may hold only one integer conversion";
    loc.prefix = literal;
    literal.clear();
    loc.width = width;
    loc.pattern = true;
    i = j;
  }
  if (loc.pattern)
    loc.suffix = literal;
  else
    loc.prefix = literal;
  *out = loc;
  return "";
}

// A run of latents in one file with the same caps and continuous timestamps.
// A file written to a plain location can hold several (a caps change that
// keeps the latent size, a flushing seek); with a pattern each starts a file.
struct Range {
  guint64 first_frame = 0;
  gst_latent_caps::Info caps;
  GstClockTime first_pts = GST_CLOCK_TIME_NONE;
  GstClockTime end_pts = GST_CLOCK_TIME_NONE;
  const char* after = "start";  // what began it: "start", "caps" or "flush"
};

struct Streaming {
  Location location;
  LatentFileFormat format = LatentFileFormat::Latent;
  guint next_index = 0;
  gst_latent_caps::Info caps;
  bool have_caps = false;
  std::unique_ptr<LatentFileWriter> writer;
  GstClockTime first_pts = GST_CLOCK_TIME_NONE;
  GstClockTime end_pts = GST_CLOCK_TIME_NONE;
  std::vector<Range> ranges;          // of the open file, in order
  const char* new_range = nullptr;    // the next latent starts a range: "caps" or "flush"
  std::string model;  // from the vae-model tag
  bool failed = false;
  std::map<std::string, std::string> extra;  // from Settings at start
  // .latent files hold raw latents (ComfyUI's LoadLatent scales them itself):
  // scaled input is turned back with raw = x / scale + shift.
  gstvae::LatentFormat to_raw;
  std::set<std::string> converted;  // scaled formats turned to raw in the open file
};

struct Stats {
  guint64 frames_written = 0;
  guint files_written = 0;
};

}  // namespace

struct _GstLatentFileSink {
  GstBaseSink parent;
  Settings* settings;  // object lock
  Stats* stats;        // object lock
  Streaming* state;    // streaming thread
};

G_DEFINE_TYPE(GstLatentFileSink, gst_latent_file_sink, GST_TYPE_BASE_SINK);
GST_ELEMENT_REGISTER_DEFINE(latentfilesink, "latentfilesink", GST_RANK_NONE, GST_TYPE_LATENT_FILE_SINK);

static GstStaticPadTemplate sink_template =
    GST_STATIC_PAD_TEMPLATE("sink", GST_PAD_SINK, GST_PAD_ALWAYS,
                            GST_STATIC_CAPS(GST_LATENT_CAPS_MEDIA_TYPE ", format = (string) F32, "
                                            "channels = (int) [ 1, MAX ], width = (int) [ 1, MAX ], "
                                            "height = (int) [ 1, MAX ]"));

static Settings settings_snapshot(GstLatentFileSink* self) {
  GST_OBJECT_LOCK(self);
  Settings s = *self->settings;
  GST_OBJECT_UNLOCK(self);
  return s;
}

static std::string timestamp_string(GstClockTime t) {
  return GST_CLOCK_TIME_IS_VALID(t) ? std::to_string(t) : std::string("none");
}

// Crop offsets follow from the source and latent sizes: the downscale is the
// power of two that maps one onto the other (8 for every released model).
static std::string crop_string(const gst_latent_caps::Info& c) {
  if (c.source_width <= 0 || c.source_height <= 0) return "";
  for (int d = 1; d <= 64; d *= 2) {
    if (c.source_width / d == c.width && c.source_height / d == c.height) {
      const int cw = c.width * d, ch = c.height * d;
      return std::to_string((c.source_width - cw) / 2) + "," + std::to_string((c.source_height - ch) / 2) + "," +
             std::to_string(cw) + "," + std::to_string(ch);
    }
  }
  return "";
}

static std::string framerate_string(const gst_latent_caps::Info& c) {
  return std::to_string(c.fps_n) + "/" + std::to_string(c.fps_d);
}

// The caps fields that the metadata records besides the latent size, which a
// file cannot change (see set_caps).
static bool same_recorded_caps(const gst_latent_caps::Info& a, const gst_latent_caps::Info& b) {
  return a.source_width == b.source_width && a.source_height == b.source_height && a.fps_n == b.fps_n &&
         a.fps_d == b.fps_d && a.latent_format == b.latent_format && a.temporal_downscale == b.temporal_downscale;
}

// One entry of the "ranges" metadata (compact JSON, see docs/latent-files.md).
static std::string range_json(const Range& r, guint64 frames) {
  auto timestamp = [](GstClockTime t) { return GST_CLOCK_TIME_IS_VALID(t) ? nlohmann::json(t) : nlohmann::json(); };
  nlohmann::ordered_json j = {{"first_frame", r.first_frame},
                              {"frames", frames},
                              {"first_pts_ns", timestamp(r.first_pts)},
                              {"end_pts_ns", timestamp(r.end_pts)}};
  if (r.caps.source_width > 0) {
    j["source_width"] = r.caps.source_width;
    j["source_height"] = r.caps.source_height;
    const std::string crop = crop_string(r.caps);
    if (!crop.empty()) j["crop_x_y_w_h"] = crop;
  }
  j["framerate"] = framerate_string(r.caps);
  j["latent_format"] = r.caps.latent_format;
  // Video latents only (image ranges' entries stay as they always were).
  if (r.caps.temporal_downscale > 1) j["temporal_downscale"] = r.caps.temporal_downscale;
  j["after"] = r.after;
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// The metadata of the open file. Top-level keys hold for every frame: one that
// differs between ranges is left out, and "ranges" then tells each range's.
// Returns how many ranges could not be recorded for want of header room.
static size_t file_metadata(const Streaming& st, const LatentFileWriter& writer,
                            std::map<std::string, std::string>* out) {
  const guint64 frames = writer.frames();
  const Range& first = st.ranges.front();
  std::map<std::string, std::string> meta = {
      {"created_by", "gst-vae latentfilesink"},
      {"frame_count", std::to_string(frames)},
      {"channels", std::to_string(first.caps.channels)},
      {"height", std::to_string(first.caps.height)},
      {"width", std::to_string(first.caps.width)},
      {"first_pts_ns", timestamp_string(st.first_pts)},
      {"end_pts_ns", timestamp_string(st.end_pts)},
      {"segment", std::to_string(st.next_index - 1)},
  };
  bool same_source = true, same_rate = true, same_format = true, same_temporal = true;
  for (const Range& r : st.ranges) {
    same_source = same_source && r.caps.source_width == first.caps.source_width &&
                  r.caps.source_height == first.caps.source_height;
    same_rate = same_rate && r.caps.fps_n == first.caps.fps_n && r.caps.fps_d == first.caps.fps_d;
    same_format = same_format && r.caps.latent_format == first.caps.latent_format;
    same_temporal = same_temporal && r.caps.temporal_downscale == first.caps.temporal_downscale;
  }
  if (same_rate) meta["framerate"] = framerate_string(first.caps);
  // Frames per latent of a video VAE (Wan, TAEHV): the latents are one clip
  // decoded causally, not images. Absent for image latents (1).
  if (same_temporal && first.caps.temporal_downscale > 1)
    meta["temporal_downscale"] = std::to_string(first.caps.temporal_downscale);
  if (same_format) meta["latent_format"] = first.caps.latent_format;
  if (same_source && first.caps.source_width > 0) {
    meta["source_width"] = std::to_string(first.caps.source_width);
    meta["source_height"] = std::to_string(first.caps.source_height);
    const std::string crop = crop_string(first.caps);
    if (!crop.empty()) meta["crop_x_y_w_h"] = crop;
  }
  if (!st.model.empty()) meta["model"] = st.model;
  if (!st.converted.empty()) {
    std::string from;
    for (const std::string& f : st.converted) from += (from.empty() ? "" : ",") + f;
    meta["converted_from_latent_format"] = from;
  }
  for (const auto& kv : st.extra) meta.emplace(kv.first, kv.second);  // never over the sink's own keys
  size_t unrecorded = 0;
  if (st.ranges.size() > 1) {
    // The header's room is fixed when the file is opened (the latents follow
    // it), about 15 ranges: keep the first ones that fit and say from which
    // frame on the rest are not recorded, rather than cut the JSON. An entry
    // takes over 100 bytes, so no more than 64 can fit in 4096: a stream
    // whose caps change at every frame costs no more at close than others.
    const size_t n = st.ranges.size();
    std::vector<std::string> entries;
    for (size_t i = 0; i < n && i < 64; ++i) {
      const guint64 end = i + 1 < n ? st.ranges[i + 1].first_frame : frames;
      entries.push_back(range_json(st.ranges[i], end - st.ranges[i].first_frame));
    }
    for (size_t kept = entries.size();; --kept) {
      std::string json = "[";
      for (size_t i = 0; i < kept; ++i) json += (i ? "," : "") + entries[i];
      if (kept < n)
        json += std::string(kept ? "," : "") + "{\"first_frame\":" + std::to_string(st.ranges[kept].first_frame) +
                ",\"unrecorded_ranges\":" + std::to_string(n - kept) + "}";
      meta["ranges"] = json + "]";
      unrecorded = n - kept;
      if (kept == 0 || writer.header_fits(meta)) break;
    }
  }
  *out = std::move(meta);
  return unrecorded;
}

// Finalises the open file (header, fsync, rename) and announces it.
static bool close_file(GstLatentFileSink* self) {
  Streaming& st = *self->state;
  if (!st.writer) return true;
  std::unique_ptr<LatentFileWriter> writer = std::move(st.writer);
  const guint64 frames = writer->frames();
  const std::string path = writer->final_path();
  std::map<std::string, std::string> meta;
  size_t unrecorded = 0;
  if (!st.ranges.empty()) unrecorded = file_metadata(st, *writer, &meta);
  try {
    writer->finish(meta);
  } catch (const std::exception& e) {  // LatentFileError, or the JSON library's or allocation errors
    st.failed = true;
    GST_ELEMENT_ERROR(self, RESOURCE, WRITE, ("Could not finish latent file '%s'", path.c_str()), ("%s", e.what()));
    return false;
  }
  if (st.ranges.size() > 1 && st.format == LatentFileFormat::Npy) {
    GST_ELEMENT_WARNING(self, STREAM, FORMAT,
                        ("'%s' holds %zu ranges (caps changes or flushes) that a .npy file cannot record",
                         path.c_str(), st.ranges.size()),
                        ("use a location pattern (a new file at each change) or a .latent or .safetensors file "
                         "(whose 'ranges' metadata records them)"));
  } else if (unrecorded > 0) {
    GST_ELEMENT_WARNING(self, STREAM, FORMAT,
                        ("The metadata of '%s' records only %zu of its %zu ranges", path.c_str(),
                         st.ranges.size() - unrecorded, st.ranges.size()),
                        ("the reserved header has no room for more; the last 'ranges' entry says from which "
                         "frame on the ranges (caps changes, flushes) are not recorded; a location pattern starts "
                         "a new file at each change instead"));
  }
  GST_INFO_OBJECT(self, "wrote %" G_GUINT64_FORMAT " latents to '%s'", frames, path.c_str());
  GST_OBJECT_LOCK(self);
  self->stats->files_written++;
  GST_OBJECT_UNLOCK(self);
  GstStructure* s = gst_structure_new("latentfilesink-file-closed", "location", G_TYPE_STRING, path.c_str(),
                                      "frames", G_TYPE_UINT64, frames, "first-pts", G_TYPE_UINT64, st.first_pts,
                                      "end-pts", G_TYPE_UINT64, st.end_pts, nullptr);
  gst_element_post_message(GST_ELEMENT(self), gst_message_new_element(GST_OBJECT(self), s));
  return true;
}

static bool open_file(GstLatentFileSink* self) {
  Streaming& st = *self->state;
  const std::string path = st.location.expand(st.next_index);
  try {
    st.writer = std::make_unique<LatentFileWriter>(path, st.format, st.caps.channels, st.caps.height, st.caps.width);
  } catch (const std::exception& e) {
    st.failed = true;
    GST_ELEMENT_ERROR(self, RESOURCE, OPEN_WRITE, ("Could not open latent file '%s' for writing", path.c_str()),
                      ("%s", e.what()));
    return false;
  }
  st.next_index++;
  st.first_pts = GST_CLOCK_TIME_NONE;
  st.end_pts = GST_CLOCK_TIME_NONE;
  st.converted.clear();
  st.ranges.assign(1, Range());
  st.ranges[0].caps = st.caps;
  st.new_range = nullptr;
  GST_DEBUG_OBJECT(self, "writing '%s' through '%s'", path.c_str(), st.writer->temp_path().c_str());
  return true;
}

static std::string dir_part(const std::string& path) {
  gchar* d = g_path_get_dirname(path.c_str());
  std::string out = d;
  g_free(d);
  return out;
}

static std::string base_part(const std::string& path) {
  gchar* b = g_path_get_basename(path.c_str());
  std::string out = b;
  g_free(b);
  return out;
}

// Temporary files of our final names left by a process that was killed: not
// deleted (on a shared filesystem another process may still be writing one),
// only reported, so that they do not pile up unseen.
static void warn_leftover_temp_files(GstLatentFileSink* self, const Location& loc, guint start_index) {
  // A pattern in the file name matches every segment; one in a directory
  // name (dir-%d/clip.latent) only the first segment's directory is looked at.
  const bool in_name = loc.pattern && loc.suffix.find('/') == std::string::npos;
  const std::string first = loc.expand(start_index);
  const std::string dir = in_name ? dir_part(loc.prefix) : dir_part(first);
  const std::string prefix = in_name ? base_part(loc.prefix) : base_part(first);
  const std::string suffix = in_name ? loc.suffix : "";
  GDir* d = g_dir_open(dir.c_str(), 0, nullptr);
  if (!d) return;  // a missing directory is reported when the first file is opened
  guint count = 0;
  std::string example;
  while (const gchar* entry = g_dir_read_name(d)) {
    const std::string target = gstvae::latent_temp_file_target(entry);
    if (target.empty()) continue;
    bool match = target == prefix;
    if (in_name && target.size() > prefix.size() + suffix.size() && target.compare(0, prefix.size(), prefix) == 0 &&
        target.compare(target.size() - suffix.size(), suffix.size(), suffix) == 0) {
      match = true;
      for (size_t i = prefix.size(); i < target.size() - suffix.size(); ++i)
        match = match && g_ascii_isdigit(target[i]);
    }
    if (!match) continue;
    if (count++ == 0 || std::string(entry) < base_part(example)) example = dir + "/" + entry;
  }
  g_dir_close(d);
  if (count > 0)
    GST_ELEMENT_WARNING(self, RESOURCE, WRITE,
                        ("%u leftover temporary file%s of latentfilesink in '%s', e.g. '%s'", count,
                         count == 1 ? "" : "s", dir.c_str(), example.c_str()),
                        ("left by a process killed before it finished (or still being written by another process "
                         "on a shared filesystem); not deleted: remove them once no pipeline writes them, see "
                         "docs/latent-files.md"));
}

static gboolean gst_latent_file_sink_start(GstBaseSink* sink) {
  GstLatentFileSink* self = GST_LATENT_FILE_SINK(sink);
  const Settings s = settings_snapshot(self);
  Streaming& st = *self->state;
  st = Streaming();
  if (s.location.empty()) {
    GST_ELEMENT_ERROR(self, RESOURCE, NOT_FOUND, ("No file name given"), ("set the 'location' property"));
    return FALSE;
  }
  const std::string problem = parse_location(s.location, &st.location);
  if (!problem.empty()) {
    GST_ELEMENT_ERROR(self, RESOURCE, SETTINGS, ("Invalid location '%s'", s.location.c_str()), ("%s", problem.c_str()));
    return FALSE;
  }
  if ((s.max_frames || s.max_duration) && !st.location.pattern) {
    GST_ELEMENT_ERROR(self, RESOURCE, SETTINGS, ("max-frames and max-duration need a location pattern"),
                      ("location '%s' has no integer conversion such as clip-%%05d.latent", s.location.c_str()));
    return FALSE;
  }
  // Later segments are checked as they are opened (by the writer).
  const std::string first_path = st.location.expand(s.start_index);
  const std::string problem_path = gstvae::latent_file_target_problem(first_path);
  if (!problem_path.empty()) {
    GST_ELEMENT_ERROR(self, RESOURCE, OPEN_WRITE, ("Could not open latent file '%s' for writing", first_path.c_str()),
                      ("%s", problem_path.c_str()));
    return FALSE;
  }
  warn_leftover_temp_files(self, st.location, s.start_index);
  st.extra = s.extra;
  switch (s.format) {
    case FORMAT_LATENT: st.format = LatentFileFormat::Latent; break;
    case FORMAT_SAFETENSORS: st.format = LatentFileFormat::Safetensors; break;
    case FORMAT_NPY: st.format = LatentFileFormat::Npy; break;
    default: st.format = gstvae::latent_file_format_for(st.location.suffix.empty() ? st.location.prefix
                                                                                   : st.location.suffix);
  }
  st.next_index = s.start_index;
  GST_OBJECT_LOCK(self);
  *self->stats = Stats();
  GST_OBJECT_UNLOCK(self);
  return TRUE;
}

static gboolean gst_latent_file_sink_stop(GstBaseSink* sink) {
  GstLatentFileSink* self = GST_LATENT_FILE_SINK(sink);
  Streaming& st = *self->state;
  // Stopped without EOS (e.g. Ctrl-C without -e, or an error elsewhere such as
  // a size change without a pattern): every frame written so far is whole, so
  // the file is finished rather than thrown away. After a failed write the
  // temporary file is deleted instead.
  if (st.writer && !st.failed && st.writer->frames() > 0) {
    GST_INFO_OBJECT(self, "stopped before EOS: finishing '%s'", st.writer->final_path().c_str());
    close_file(self);
  }
  st.writer.reset();
  return TRUE;
}

static gboolean gst_latent_file_sink_set_caps(GstBaseSink* sink, GstCaps* caps) {
  GstLatentFileSink* self = GST_LATENT_FILE_SINK(sink);
  Streaming& st = *self->state;
  gst_latent_caps::Info info;
  if (!gst_latent_caps::parse(caps, &info)) {
    GST_ELEMENT_ERROR(self, CORE, NEGOTIATION, ("Invalid latent caps"), ("%" GST_PTR_FORMAT, caps));
    return FALSE;
  }
  st.to_raw = gstvae::LatentFormat();
  if ((st.format == LatentFileFormat::Latent || st.format == LatentFileFormat::Npy) && info.latent_format != "raw") {
    // ComfyUI's LoadLatent takes a .latent with the version marker as raw and
    // scales it itself: scaled values there would be scaled twice. A .npy
    // has no metadata to say they are scaled, and every reader (latentfilesrc,
    // gst-vae-decode-file, numpy users) takes its values as raw: it gets raw
    // values too. Only a .safetensors keeps scaled values, recording
    // latent_format.
    const char* container = st.format == LatentFileFormat::Npy ? ".npy" : ".latent";
    try {
      st.to_raw = gstvae::latent_format_by_name(info.latent_format);
    } catch (const std::exception& e) {
      GST_ELEMENT_ERROR(self, STREAM, FORMAT, ("Cannot store latent-format '%s' in a %s file",
                                                info.latent_format.c_str(), container),
                        ("a %s file holds raw latents and this format cannot be turned back (%s); write "
                         ".safetensors, which keeps the values as they come and records latent_format",
                         container, e.what()));
      return FALSE;
    }
    if (st.to_raw.from_model) {
      // ltx2: the statistics are in the VAE checkpoint, which this element never sees.
      GST_ELEMENT_ERROR(self, STREAM, FORMAT, ("Cannot store latent-format '%s' in a %s file",
                                                info.latent_format.c_str(), container),
                        ("a %s file holds raw latents, and '%s' values can only be turned back with the VAE "
                         "checkpoint's own statistics; write .safetensors (which records latent_format), or set "
                         "vaeencode latent-format=raw",
                         container, info.latent_format.c_str()));
      return FALSE;
    }
    if (!st.to_raw.fits(static_cast<size_t>(info.channels))) {
      GST_ELEMENT_ERROR(self, STREAM, FORMAT, ("Latent format '%s' does not fit %d channels",
                                                info.latent_format.c_str(), info.channels),
                        ("the format normalises %zu channels one by one", st.to_raw.shifts.size()));
      return FALSE;
    }
    info.latent_format = "raw";  // what the file will hold, for every record of it
  }
  if (st.writer && (info.channels != st.caps.channels || info.width != st.caps.width ||
                    info.height != st.caps.height)) {
    if (!st.location.pattern) {
      GST_ELEMENT_ERROR(self, STREAM, FORMAT, ("Latent size changed mid-stream"),
                        ("from %dx%dx%d to %dx%dx%d; a file holds one size: use a location pattern such as "
                         "clip-%%05d.latent to start a new file at each change",
                         st.caps.channels, st.caps.height, st.caps.width, info.channels, info.height, info.width));
      return FALSE;
    }
    if (!close_file(self)) return FALSE;
  } else if (st.writer && !same_recorded_caps(info, st.caps)) {
    // Same latent size, but another source size (so another crop), frame
    // rate, latent format or temporal downscale: the metadata must stay true
    // for every frame.
    if (st.location.pattern) {
      if (!close_file(self)) return FALSE;
    } else if (!st.new_range) {
      st.new_range = "caps";
    }
  }
  st.caps = info;
  st.have_caps = true;
  return TRUE;
}

static GstFlowReturn gst_latent_file_sink_render(GstBaseSink* sink, GstBuffer* buffer) {
  GstLatentFileSink* self = GST_LATENT_FILE_SINK(sink);
  Streaming& st = *self->state;
  if (st.failed) return GST_FLOW_ERROR;
  const Settings s = settings_snapshot(self);
  const GstClockTime pts = GST_BUFFER_PTS(buffer);
  // Only a pattern is split: segments of a plain location would all be
  // renamed onto the same name, each replacing the one before (set_property
  // refuses such a change, this guards against any other way in).
  if (st.writer && st.location.pattern) {
    const bool frames_full = s.max_frames && st.writer->frames() >= s.max_frames;
    const bool time_full = s.max_duration && GST_CLOCK_TIME_IS_VALID(pts) && GST_CLOCK_TIME_IS_VALID(st.first_pts) &&
                           pts >= st.first_pts && pts - st.first_pts >= s.max_duration;
    if ((frames_full || time_full) && !close_file(self)) return GST_FLOW_ERROR;
  }
  if (!st.writer && !open_file(self)) return GST_FLOW_ERROR;
  if (st.new_range) {
    // A flush always starts a range (the timeline jumps); a caps change only
    // when the caps differ from the range's at this latent (not A, B, A).
    if (std::strcmp(st.new_range, "flush") == 0 || !same_recorded_caps(st.caps, st.ranges.back().caps)) {
      Range r;
      r.first_frame = st.writer->frames();
      r.caps = st.caps;
      r.after = st.new_range;
      st.ranges.push_back(r);
    }
    st.new_range = nullptr;
  }

  GstMapInfo map;
  if (!gst_buffer_map(buffer, &map, GST_MAP_READ)) {
    GST_ELEMENT_ERROR(self, STREAM, FAILED, ("Could not map a latent buffer"), (nullptr));
    return GST_FLOW_ERROR;
  }
  const size_t expected = st.caps.frame_bytes();
  std::string error;
  if (map.size != expected) {
    error = "buffer of " + std::to_string(map.size) + " bytes, expected " + std::to_string(expected) + " (" +
            std::to_string(st.caps.channels) + "x" + std::to_string(st.caps.height) + "x" +
            std::to_string(st.caps.width) + " float32)";
  } else {
    try {
      if (st.to_raw.is_raw()) {
        st.writer->append(map.data, map.size);
      } else {
        std::vector<float> raw(map.size / sizeof(float));
        std::memcpy(raw.data(), map.data, map.size);
        // Frame-major C x h x w: channel c is the c-th run of h * w values.
        const size_t plane = static_cast<size_t>(st.caps.height) * st.caps.width;
        for (size_t i = 0; i < raw.size(); ++i) {
          const size_t c = i / plane;
          raw[i] = static_cast<float>(raw[i] / st.to_raw.scale_of(c) + st.to_raw.shift_of(c));
        }
        st.writer->append(raw.data(), map.size);
        st.converted.insert(st.to_raw.name);
      }
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  gst_buffer_unmap(buffer, &map);
  if (!error.empty()) {
    st.failed = true;
    const std::string path = st.writer->final_path();
    st.writer.reset();  // deletes the temporary file: no corrupt result
    GST_ELEMENT_ERROR(self, RESOURCE, WRITE, ("Could not write latent file '%s'", path.c_str()), ("%s", error.c_str()));
    return GST_FLOW_ERROR;
  }
  if (!GST_CLOCK_TIME_IS_VALID(st.first_pts)) st.first_pts = pts;
  Range& range = st.ranges.back();
  if (!GST_CLOCK_TIME_IS_VALID(range.first_pts)) range.first_pts = pts;
  if (GST_CLOCK_TIME_IS_VALID(pts)) {
    st.end_pts = pts + (GST_BUFFER_DURATION_IS_VALID(buffer) ? GST_BUFFER_DURATION(buffer) : 0);
    range.end_pts = st.end_pts;
  }
  GST_OBJECT_LOCK(self);
  self->stats->frames_written++;
  GST_OBJECT_UNLOCK(self);
  return GST_FLOW_OK;
}

static gboolean gst_latent_file_sink_event(GstBaseSink* sink, GstEvent* event) {
  GstLatentFileSink* self = GST_LATENT_FILE_SINK(sink);
  Streaming& st = *self->state;
  switch (GST_EVENT_TYPE(event)) {
    case GST_EVENT_EOS:
      if (st.writer && !close_file(self)) {
        gst_event_unref(event);
        return FALSE;
      }
      if (st.next_index == settings_snapshot(self).start_index && !st.failed)
        GST_ELEMENT_WARNING(self, STREAM, FAILED, ("No latents received: no file written"), (nullptr));
      break;
    case GST_EVENT_FLUSH_STOP:
      // After a flushing seek the latents may repeat or skip a stretch of the
      // stream: with a pattern they go to a new file, else to a new range
      // (recorded in the metadata). Serialized, so never during render(). On
      // a failure the error is posted; the base class must still see the
      // event, or the sink would stay flushing.
      if (st.writer) {
        if (st.location.pattern)
          close_file(self);
        else
          st.new_range = "flush";
      }
      break;
    case GST_EVENT_TAG: {
      GstTagList* tags;
      gst_event_parse_tag(event, &tags);
      gchar* model = nullptr;
      if (gst_tag_list_get_string(tags, GST_TAG_VAE_MODEL, &model)) {
        st.model = model;
        g_free(model);
      }
      break;
    }
    default:
      break;
  }
  return GST_BASE_SINK_CLASS(gst_latent_file_sink_parent_class)->event(sink, event);
}

static void gst_latent_file_sink_set_property(GObject* object, guint prop_id, const GValue* value,
                                              GParamSpec* pspec) {
  GstLatentFileSink* self = GST_LATENT_FILE_SINK(object);
  const bool running = GST_STATE(self) > GST_STATE_READY || GST_STATE_TARGET(self) > GST_STATE_READY;
  if (prop_id == PROP_LOCATION || prop_id == PROP_FORMAT || prop_id == PROP_START_INDEX || prop_id == PROP_METADATA) {
    if (running) {
      g_warning("latentfilesink: property '%s' can only be changed in the NULL or READY state", pspec->name);
      return;
    }
  }
  if ((prop_id == PROP_MAX_FRAMES || prop_id == PROP_MAX_DURATION) && running && g_value_get_uint64(value) != 0) {
    // start() refuses a limit without a pattern; while running, the location
    // cannot change, so the check is here: each segment would be renamed onto
    // the same name and replace the one before. Any thread may call this;
    // GST_ELEMENT_WARNING only posts a message.
    Location loc;
    const std::string location = settings_snapshot(self).location;
    if (!parse_location(location, &loc).empty() || !loc.pattern) {
      GST_ELEMENT_WARNING(self, RESOURCE, SETTINGS,
                          ("Not applying %s=%" G_GUINT64_FORMAT ": location '%s' is not a pattern", pspec->name,
                           g_value_get_uint64(value), location.c_str()),
                          ("every segment would be renamed onto the same file, replacing the one before; %s needs "
                           "a location with an integer conversion such as clip-%%05d.latent, set before the "
                           "pipeline starts. %s keeps its value",
                           pspec->name, pspec->name));
      return;
    }
  }
  GST_OBJECT_LOCK(self);
  Settings& s = *self->settings;
  switch (prop_id) {
    case PROP_LOCATION: s.location = g_value_get_string(value) ? g_value_get_string(value) : ""; break;
    case PROP_FORMAT: s.format = g_value_get_enum(value); break;
    case PROP_MAX_FRAMES: s.max_frames = g_value_get_uint64(value); break;
    case PROP_MAX_DURATION: s.max_duration = g_value_get_uint64(value); break;
    case PROP_START_INDEX: s.start_index = g_value_get_uint(value); break;
    case PROP_METADATA: {
      s.extra.clear();
      const GstStructure* st = gst_value_get_structure(value);
      for (gint i = 0; st && i < gst_structure_n_fields(st); ++i) {
        const gchar* name = gst_structure_nth_field_name(st, i);
        const GValue* v = gst_structure_get_value(st, name);
        gchar* text = G_VALUE_HOLDS_STRING(v) ? g_value_dup_string(v) : gst_value_serialize(v);
        s.extra[name] = text ? text : "";
        g_free(text);
      }
      break;
    }
    default: G_OBJECT_WARN_INVALID_PROPERTY_ID(object, prop_id, pspec); break;
  }
  GST_OBJECT_UNLOCK(self);
}

static void gst_latent_file_sink_get_property(GObject* object, guint prop_id, GValue* value, GParamSpec* pspec) {
  GstLatentFileSink* self = GST_LATENT_FILE_SINK(object);
  GST_OBJECT_LOCK(self);
  const Settings& s = *self->settings;
  switch (prop_id) {
    case PROP_LOCATION: g_value_set_string(value, s.location.c_str()); break;
    case PROP_FORMAT: g_value_set_enum(value, s.format); break;
    case PROP_MAX_FRAMES: g_value_set_uint64(value, s.max_frames); break;
    case PROP_MAX_DURATION: g_value_set_uint64(value, s.max_duration); break;
    case PROP_START_INDEX: g_value_set_uint(value, s.start_index); break;
    case PROP_METADATA: {
      GstStructure* st = gst_structure_new_empty("metadata");
      for (const auto& kv : s.extra) gst_structure_set(st, kv.first.c_str(), G_TYPE_STRING, kv.second.c_str(), nullptr);
      g_value_take_boxed(value, st);
      break;
    }
    case PROP_FRAMES_WRITTEN: g_value_set_uint64(value, self->stats->frames_written); break;
    case PROP_FILES_WRITTEN: g_value_set_uint(value, self->stats->files_written); break;
    default: G_OBJECT_WARN_INVALID_PROPERTY_ID(object, prop_id, pspec); break;
  }
  GST_OBJECT_UNLOCK(self);
}

static void gst_latent_file_sink_finalize(GObject* object) {
  GstLatentFileSink* self = GST_LATENT_FILE_SINK(object);
  delete self->state;  // an unfinished writer deletes its temporary file
  delete self->stats;
  delete self->settings;
  G_OBJECT_CLASS(gst_latent_file_sink_parent_class)->finalize(object);
}

static void gst_latent_file_sink_init(GstLatentFileSink* self) {
  self->settings = new Settings();
  self->stats = new Stats();
  self->state = new Streaming();
  gst_base_sink_set_sync(GST_BASE_SINK(self), FALSE);
}

static void gst_latent_file_sink_class_init(GstLatentFileSinkClass* klass) {
  GObjectClass* gobject_class = G_OBJECT_CLASS(klass);
  GstElementClass* element_class = GST_ELEMENT_CLASS(klass);
  GstBaseSinkClass* sink_class = GST_BASE_SINK_CLASS(klass);

  gobject_class->set_property = gst_latent_file_sink_set_property;
  gobject_class->get_property = gst_latent_file_sink_get_property;
  gobject_class->finalize = gst_latent_file_sink_finalize;

  const auto rw_ready = static_cast<GParamFlags>(G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS | GST_PARAM_MUTABLE_READY);
  const auto rw_playing =
      static_cast<GParamFlags>(G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS | GST_PARAM_MUTABLE_PLAYING);
  const auto ro = static_cast<GParamFlags>(G_PARAM_READABLE | G_PARAM_STATIC_STRINGS);

  g_object_class_install_property(
      gobject_class, PROP_LOCATION,
      g_param_spec_string("location", "Location",
                          "File to write; with max-frames/max-duration, caps changes or flushing seeks, a pattern "
                          "holding one integer conversion (e.g. clip-%05d.latent) numbers the segments (a plain "
                          "name records caps changes and flushes in its 'ranges' metadata). Written under a hidden "
                          "temporary name (.NAME.partial-XXXXXX) in the same directory and renamed when complete",
                          nullptr, rw_ready));
  g_object_class_install_property(
      gobject_class, PROP_FORMAT,
      g_param_spec_enum("format", "Format", "File format", format_choice_get_type(), FORMAT_AUTO, rw_ready));
  g_object_class_install_property(
      gobject_class, PROP_MAX_FRAMES,
      g_param_spec_uint64("max-frames", "Max frames",
                          "Start a new file after this many latents (0 = no limit); needs a location pattern (with a plain location, a change while playing is refused with a warning)", 0,
                          G_MAXUINT64, 0, rw_playing));
  g_object_class_install_property(
      gobject_class, PROP_MAX_DURATION,
      g_param_spec_uint64("max-duration", "Max duration",
                          "Start a new file once a latent's PTS is this far (in nanoseconds) past the file's first "
                          "(0 = no limit); needs a location pattern (with a plain location, a change while playing is refused with a warning)",
                          0, G_MAXUINT64, 0, rw_playing));
  g_object_class_install_property(
      gobject_class, PROP_START_INDEX,
      g_param_spec_uint("start-index", "Start index", "Number of the first file of a location pattern", 0, G_MAXUINT,
                        0, rw_ready));
  g_object_class_install_property(
      gobject_class, PROP_METADATA,
      g_param_spec_boxed("metadata", "Metadata",
                         "Fields added to the metadata of every .latent/.safetensors file written, as strings "
                         "(e.g. metadata=\"meta,dataset=(string)clips,item=(string)42\"); a field named like one "
                         "of the sink's own keys (frame_count, model, ...) is ignored. Not written to .npy",
                         GST_TYPE_STRUCTURE, rw_ready));
  g_object_class_install_property(
      gobject_class, PROP_FRAMES_WRITTEN,
      g_param_spec_uint64("frames-written", "Frames written", "Latents written since the element started", 0,
                          G_MAXUINT64, 0, ro));
  g_object_class_install_property(
      gobject_class, PROP_FILES_WRITTEN,
      g_param_spec_uint("files-written", "Files written", "Files completed since the element started", 0, G_MAXUINT,
                        0, ro));

  gst_element_class_set_static_metadata(
      element_class, "Latent file sink", "Sink/File",
      "Writes VAE latents to ComfyUI .latent, .safetensors or NumPy .npy files", "gst-vae developers");
  gst_element_class_add_static_pad_template(element_class, &sink_template);

  sink_class->start = gst_latent_file_sink_start;
  sink_class->stop = gst_latent_file_sink_stop;
  sink_class->set_caps = gst_latent_file_sink_set_caps;
  sink_class->render = gst_latent_file_sink_render;
  sink_class->event = gst_latent_file_sink_event;

  gst_type_mark_as_plugin_api(format_choice_get_type(), static_cast<GstPluginAPIFlags>(0));
  GST_DEBUG_CATEGORY_INIT(latent_file_sink_debug, "latentfilesink", 0, "Latent file sink");
}
