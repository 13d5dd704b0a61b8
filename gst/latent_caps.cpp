#include "latent_caps.h"

#include <algorithm>
#include <vector>

#include "frame.h"
#include "latent_format.h"

namespace gst_latent_caps {

namespace {

gint clamp_int(gint64 v) { return static_cast<gint>(std::min<gint64>(std::max<gint64>(v, 1), G_MAXINT)); }

GValue string_list(const std::vector<std::string>& items) {
  GValue list = G_VALUE_INIT;
  g_value_init(&list, GST_TYPE_LIST);
  for (const std::string& item : items) {
    GValue v = G_VALUE_INIT;
    g_value_init(&v, G_TYPE_STRING);
    g_value_set_string(&v, item.c_str());
    gst_value_list_append_and_take_value(&list, &v);
  }
  return list;
}

std::vector<std::string> video_formats() {
  std::vector<std::string> names;
  for (gstvae::PixelFormat f : gstvae::all_pixel_formats()) names.push_back(gstvae::pixel_format_name(f));
  return names;
}

std::vector<std::string> latent_formats() {
  std::vector<std::string> names;
  for (const gstvae::LatentFormat& f : gstvae::known_latent_formats()) names.push_back(f.name);
  return names;
}

std::string braced(const std::vector<std::string>& items) {
  std::string s = "{ ";
  for (size_t i = 0; i < items.size(); ++i) s += (i ? ", " : "") + items[i];
  return s + " }";
}

// A GST_TYPE_LIST mapped item by item with `map_item(in, out)`; false when
// no item maps. Every value mapper below handles lists through this.
template <typename MapItem>
bool map_list(const GValue* in, GValue* out, MapItem map_item) {
  g_value_init(out, GST_TYPE_LIST);
  for (guint i = 0; i < gst_value_list_get_size(in); ++i) {
    GValue item = G_VALUE_INIT;
    if (map_item(gst_value_list_get_value(in, i), &item)) gst_value_list_append_and_take_value(out, &item);
  }
  if (gst_value_list_get_size(out) == 0) {
    g_value_unset(out);
    return false;
  }
  return true;
}

// Decoder sizes: latent w <-> exactly w*d pixels.
bool map_exact(const GValue* in, GValue* out, bool to_latent, int d) {
  if (G_VALUE_HOLDS_INT(in)) {
    const gint v = g_value_get_int(in);
    if (to_latent && v % d != 0) return false;
    g_value_init(out, G_TYPE_INT);
    g_value_set_int(out, to_latent ? v / d : clamp_int(gint64(v) * d));
    return true;
  }
  if (GST_VALUE_HOLDS_INT_RANGE(in)) {
    const gint lo = gst_value_get_int_range_min(in), hi = gst_value_get_int_range_max(in);
    if (to_latent) {
      const gint a = std::max(1, (lo + d - 1) / d), b = hi / d;
      if (a > b) return false;
      g_value_init(out, GST_TYPE_INT_RANGE);
      if (a == b) {
        g_value_unset(out);
        g_value_init(out, G_TYPE_INT);
        g_value_set_int(out, a);
      } else {
        gst_value_set_int_range(out, a, b);
      }
    } else {
      const gint a = std::max(1, lo), b = std::max(a, std::min(hi, G_MAXINT / d));
      g_value_init(out, GST_TYPE_INT_RANGE);
      if (a == b) {
        g_value_unset(out);
        g_value_init(out, G_TYPE_INT);
        g_value_set_int(out, a * d);
      } else {
        gst_value_set_int_range_step(out, a * d, b * d, d);
      }
    }
    return true;
  }
  if (GST_VALUE_HOLDS_LIST(in))
    return map_list(in, out, [&](const GValue* v, GValue* o) { return map_exact(v, o, to_latent, d); });
  return false;
}

bool copy_exact_dimensions(const GstStructure* in, GstStructure* out, bool to_latent, int d) {
  for (const char* field : {"width", "height"}) {
    const GValue* v = gst_structure_get_value(in, field);
    GValue mapped = G_VALUE_INIT;
    if (!v) {
      g_value_init(&mapped, GST_TYPE_INT_RANGE);
      if (to_latent)
        gst_value_set_int_range(&mapped, 1, G_MAXINT / d);
      else
        gst_value_set_int_range_step(&mapped, d, (G_MAXINT / d) * d, d);
    } else if (!map_exact(v, &mapped, to_latent, d)) {
      return false;
    }
    gst_structure_take_value(out, field, &mapped);
  }
  return true;
}


// Maps one width/height value (int, int range or list of them). Returns false
// for value types that cannot be mapped.
bool map_dimension(const GValue* in, GValue* out, bool to_latent, int d) {
  if (G_VALUE_HOLDS_INT(in)) {
    const gint v = g_value_get_int(in);
    if (to_latent) {
      if (v < d) return false;
      g_value_init(out, G_TYPE_INT);
      g_value_set_int(out, v / d);
    } else {
      g_value_init(out, GST_TYPE_INT_RANGE);
      gst_value_set_int_range(out, clamp_int(gint64(v) * d), clamp_int(gint64(v) * d + d - 1));
    }
    return true;
  }
  if (GST_VALUE_HOLDS_INT_RANGE(in)) {
    const gint lo = gst_value_get_int_range_min(in), hi = gst_value_get_int_range_max(in);
    gint64 a, b;
    if (to_latent) {
      if (hi < d) return false;
      a = std::max(lo, d) / d;
      b = hi / d;
    } else {
      a = gint64(lo) * d;
      b = gint64(hi) * d + d - 1;
    }
    if (clamp_int(a) == clamp_int(b)) {
      g_value_init(out, G_TYPE_INT);
      g_value_set_int(out, clamp_int(a));
    } else {
      g_value_init(out, GST_TYPE_INT_RANGE);
      gst_value_set_int_range(out, clamp_int(a), clamp_int(b));
    }
    return true;
  }
  if (GST_VALUE_HOLDS_LIST(in))
    return map_list(in, out, [&](const GValue* v, GValue* o) { return map_dimension(v, o, to_latent, d); });
  return false;
}

bool copy_dimensions(const GstStructure* in, GstStructure* out, bool to_latent, int d) {
  for (const char* field : {"width", "height"}) {
    const char* source_field = g_str_equal(field, "width") ? "source-width" : "source-height";
    const GValue* v = gst_structure_get_value(in, field);
    if (to_latent && v) gst_structure_set_value(out, source_field, v);
    GValue mapped = G_VALUE_INIT;
    if (!v) {
      g_value_init(&mapped, GST_TYPE_INT_RANGE);
      if (to_latent)
        gst_value_set_int_range(&mapped, 1, G_MAXINT / d);
      else
        gst_value_set_int_range(&mapped, d, G_MAXINT);
    } else if (!map_dimension(v, &mapped, to_latent, d)) {
      return false;
    }
    // Latent to video: the frame size must fit both the latent size and, when
    // given, the source size (downstream caps often carry both, a fixed width
    // next to the source-width range this element announced earlier).
    const GValue* source = to_latent ? nullptr : gst_structure_get_value(in, source_field);
    if (source) {
      GValue both = G_VALUE_INIT;
      const bool fits = gst_value_intersect(&both, &mapped, source);
      g_value_unset(&mapped);
      if (!fits) return false;
      gst_structure_take_value(out, field, &both);
    } else {
      gst_structure_take_value(out, field, &mapped);
    }
  }
  return true;
}

void copy_framerate(const GstStructure* in, GstStructure* out) {
  if (const GValue* fr = gst_structure_get_value(in, "framerate"))
    gst_structure_set_value(out, "framerate", fr);
  else
    gst_structure_set(out, "framerate", GST_TYPE_FRACTION_RANGE, 0, 1, G_MAXINT, 1, nullptr);
}

// n/d scaled by `mul` / `div`; an overflow saturates at G_MAXINT/1 (the top
// of the caps' framerate ranges). 0/1 stays 0/1.
void scale_fraction(gint n, gint d, gint mul, gint div, gint* rn, gint* rd) {
  if (n == 0) {
    *rn = 0, *rd = 1;
  } else if (!gst_util_fraction_multiply(n, d, mul, div, rn, rd)) {
    *rn = G_MAXINT, *rd = 1;
  }
}

// Maps a framerate value (fraction, fraction range or list of them); false
// for other value types.
bool map_framerate(const GValue* in, GValue* out, gint mul, gint div) {
  if (GST_VALUE_HOLDS_FRACTION(in)) {
    gint n, d;
    scale_fraction(gst_value_get_fraction_numerator(in), gst_value_get_fraction_denominator(in), mul, div, &n, &d);
    g_value_init(out, GST_TYPE_FRACTION);
    gst_value_set_fraction(out, n, d);
    return true;
  }
  if (GST_VALUE_HOLDS_FRACTION_RANGE(in)) {
    const GValue* lo = gst_value_get_fraction_range_min(in);
    const GValue* hi = gst_value_get_fraction_range_max(in);
    gint ln, ld, hn, hd;
    scale_fraction(gst_value_get_fraction_numerator(lo), gst_value_get_fraction_denominator(lo), mul, div, &ln, &ld);
    scale_fraction(gst_value_get_fraction_numerator(hi), gst_value_get_fraction_denominator(hi), mul, div, &hn, &hd);
    if (gst_util_fraction_compare(ln, ld, hn, hd) >= 0) {  // saturated to one value
      g_value_init(out, GST_TYPE_FRACTION);
      gst_value_set_fraction(out, hn, hd);
    } else {
      g_value_init(out, GST_TYPE_FRACTION_RANGE);
      gst_value_set_fraction_range_full(out, ln, ld, hn, hd);
    }
    return true;
  }
  if (GST_VALUE_HOLDS_LIST(in))
    return map_list(in, out, [&](const GValue* v, GValue* o) { return map_framerate(v, o, mul, div); });
  return false;
}

// The framerate through a video model's temporal downscale `t`: divided on
// the way to latents, multiplied on the way back. t = 1: copied.
bool copy_framerate_scaled(const GstStructure* in, GstStructure* out, int t, bool to_latent) {
  const GValue* fr = gst_structure_get_value(in, "framerate");
  if (t <= 1 || !fr) {
    copy_framerate(in, out);
    return true;
  }
  GValue mapped = G_VALUE_INIT;
  if (!map_framerate(fr, &mapped, to_latent ? 1 : t, to_latent ? t : 1)) return false;
  gst_structure_take_value(out, "framerate", &mapped);
  return true;
}

// Whether latent caps `in` may carry the temporal downscale `t` (a field
// that is absent, or whose value allows t; absent means 1 for fixed caps).
bool temporal_fits(const GstStructure* in, int t) {
  const GValue* v = gst_structure_get_value(in, "temporal-downscale");
  if (!v) return true;
  GValue want = G_VALUE_INIT;
  g_value_init(&want, G_TYPE_INT);
  g_value_set_int(&want, t);
  const bool fits = gst_value_intersect(nullptr, v, &want);
  g_value_unset(&want);
  return fits;
}

}  // namespace

GstCaps* video_to_latent(const GstCaps* video, const Model& model) {
  GstCaps* out = gst_caps_new_empty();
  for (guint i = 0; i < gst_caps_get_size(video); ++i) {
    const GstStructure* in = gst_caps_get_structure(video, i);
    GstStructure* s = gst_structure_new(GST_LATENT_CAPS_MEDIA_TYPE, "format", G_TYPE_STRING, "F32", nullptr);
    if (model.channels > 0)
      gst_structure_set(s, "channels", G_TYPE_INT, model.channels, nullptr);
    else
      gst_structure_set(s, "channels", GST_TYPE_INT_RANGE, 1, G_MAXINT, nullptr);
    if (!copy_dimensions(in, s, true, model.downscale)) {
      gst_structure_free(s);
      continue;
    }
    if (!copy_framerate_scaled(in, s, model.temporal_downscale, true)) {
      gst_structure_free(s);
      continue;
    }
    gst_structure_set(s, "latent-format", G_TYPE_STRING, model.latent_format.c_str(), nullptr);
    // Image models' caps carry no temporal-downscale (1 is implied).
    if (model.temporal_downscale > 1)
      gst_structure_set(s, "temporal-downscale", G_TYPE_INT, model.temporal_downscale, nullptr);
    out = gst_caps_merge_structure(out, s);
  }
  return out;
}

GstCaps* latent_to_video(const GstCaps* latent, const Model& model) {
  GstCaps* out = gst_caps_new_empty();
  GValue formats = string_list(video_formats());
  for (guint i = 0; i < gst_caps_get_size(latent); ++i) {
    const GstStructure* in = gst_caps_get_structure(latent, i);
    // Latents of another model or format cannot come from this element.
    gint channels;
    if (model.channels > 0 && gst_structure_get_int(in, "channels", &channels) && channels != model.channels) continue;
    const char* lf = gst_structure_get_string(in, "latent-format");
    if (lf && model.latent_format != lf) continue;
    if (!temporal_fits(in, std::max(1, model.temporal_downscale))) continue;
    GstStructure* s = gst_structure_new_empty("video/x-raw");
    gst_structure_set_value(s, "format", &formats);
    if (!copy_dimensions(in, s, false, model.downscale) ||
        !copy_framerate_scaled(in, s, model.temporal_downscale, false)) {
      gst_structure_free(s);
      continue;
    }
    out = gst_caps_merge_structure(out, s);
  }
  g_value_unset(&formats);
  return out;
}

GstCaps* latent_to_decoded(const GstCaps* latent, const Model& model) {
  GstCaps* out = gst_caps_new_empty();
  GValue formats = string_list(video_formats());
  for (guint i = 0; i < gst_caps_get_size(latent); ++i) {
    // Latents with the wrong channel count are let through to set_caps,
    // which names both counts (a failed negotiation would not).
    const GstStructure* in = gst_caps_get_structure(latent, i);
    GstStructure* s = gst_structure_new_empty("video/x-raw");
    gst_structure_set_value(s, "format", &formats);
    // Video latents (temporal-downscale t) decode to t frames each.
    int t = 1;
    if (!gst_structure_get_int(in, "temporal-downscale", &t) || t < 1) t = 1;
    if (!copy_exact_dimensions(in, s, false, model.downscale) || !copy_framerate_scaled(in, s, t, false)) {
      gst_structure_free(s);
      continue;
    }
    out = gst_caps_merge_structure(out, s);
  }
  g_value_unset(&formats);
  return out;
}

GstCaps* decoded_to_latent(const GstCaps* video, const Model& model) {
  GstCaps* out = gst_caps_new_empty();
  GValue formats = string_list(latent_formats());
  for (guint i = 0; i < gst_caps_get_size(video); ++i) {
    const GstStructure* in = gst_caps_get_structure(video, i);
    GstStructure* s = gst_structure_new(GST_LATENT_CAPS_MEDIA_TYPE, "format", G_TYPE_STRING, "F32", nullptr);
    if (model.channels > 0)
      gst_structure_set(s, "channels", G_TYPE_INT, model.channels, nullptr);
    else
      gst_structure_set(s, "channels", GST_TYPE_INT_RANGE, 1, G_MAXINT, nullptr);
    if (!copy_exact_dimensions(in, s, true, model.downscale)) {
      gst_structure_free(s);
      continue;
    }
    copy_framerate(in, s);
    gst_structure_set_value(s, "latent-format", &formats);
    // A video decoder also takes video latents, t frames each.
    GstStructure* video = nullptr;
    if (model.temporal_downscale > 1) {
      video = gst_structure_copy(s);
      gst_structure_set(video, "temporal-downscale", G_TYPE_INT, model.temporal_downscale, nullptr);
      gst_structure_remove_field(video, "framerate");
      if (!copy_framerate_scaled(in, video, model.temporal_downscale, true)) {
        gst_structure_free(video);
        video = nullptr;
      }
    }
    if (video) out = gst_caps_merge_structure(out, video);
    out = gst_caps_merge_structure(out, s);
  }
  g_value_unset(&formats);
  return out;
}

std::string video_format_list() { return braced(video_formats()); }
std::string latent_format_list() { return braced(latent_formats()); }

bool parse(const GstCaps* caps, Info* info) {
  if (!caps || !gst_caps_is_fixed(caps)) return false;
  const GstStructure* s = gst_caps_get_structure(caps, 0);
  if (!gst_structure_has_name(s, GST_LATENT_CAPS_MEDIA_TYPE)) return false;
  const char* format = gst_structure_get_string(s, "format");
  if (!format || g_strcmp0(format, "F32") != 0) return false;
  if (!gst_structure_get_int(s, "channels", &info->channels) || !gst_structure_get_int(s, "width", &info->width) ||
      !gst_structure_get_int(s, "height", &info->height))
    return false;
  if (info->channels < 1 || info->width < 1 || info->height < 1) return false;
  if (!gst_structure_get_fraction(s, "framerate", &info->fps_n, &info->fps_d)) {
    info->fps_n = 0;
    info->fps_d = 1;
  }
  const char* lf = gst_structure_get_string(s, "latent-format");
  info->latent_format = lf ? lf : "raw";
  if (!gst_structure_get_int(s, "temporal-downscale", &info->temporal_downscale) || info->temporal_downscale < 1)
    info->temporal_downscale = 1;
  if (!gst_structure_get_int(s, "source-width", &info->source_width) ||
      !gst_structure_get_int(s, "source-height", &info->source_height))
    info->source_width = info->source_height = 0;
  return true;
}

}  // namespace gst_latent_caps

GType gst_vae_latent_format_get_type(void) {
  static GType type = 0;
  if (g_once_init_enter(&type)) {
    const auto& formats = gstvae::known_latent_formats();
    // Registered once for the process, so never freed.
    GEnumValue* values = g_new0(GEnumValue, formats.size() + 1);
    for (size_t i = 0; i < formats.size(); ++i) {
      const gstvae::LatentFormat& f = formats[i];
      gchar* description =
          f.is_raw() ? g_strdup("Raw latents, as ComfyUI's VAE Encode returns them")
          : f.from_model ? g_strdup_printf("%s: per channel (x - mean_c) / std_c, the model checkpoint's statistics",
                                           f.name.c_str())
          : f.per_channel() ? g_strdup_printf("%s: per channel (x - mean_c) / std_c", f.name.c_str())
          : f.shift == 0.0 ? g_strdup_printf("%s scaling: x * %g", f.name.c_str(), f.scale)
                           : g_strdup_printf("%s scaling: (x - %g) * %g", f.name.c_str(), f.shift, f.scale);
      values[i].value = static_cast<gint>(i);
      values[i].value_name = description;
      values[i].value_nick = g_strdup(f.name.c_str());
    }
    g_once_init_leave(&type, g_enum_register_static("GstVaeLatentFormat", values));
  }
  return type;
}

const char* gst_vae_latent_format_nick(gint value) {
  const auto& formats = gstvae::known_latent_formats();
  return value >= 0 && static_cast<size_t>(value) < formats.size() ? formats[value].name.c_str() : "raw";
}

void gst_vae_register_tags() {
  gst_tag_register_static(GST_TAG_VAE_MODEL, GST_TAG_FLAG_META, G_TYPE_STRING, "VAE model",
                          "file name of the VAE model that produced the latents", gst_tag_merge_use_first);
}
