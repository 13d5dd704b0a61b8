/* The application/x-latent caps shared by the elements: building them from
 * video caps (and back) and reading them. See docs/latent-caps.md. */
#pragma once

#include <gst/gst.h>

#include <string>

#define GST_LATENT_CAPS_MEDIA_TYPE "application/x-latent"

/* Stream tag (string) naming the VAE model file the latents came from;
 * registered by the plugin, sent by vaeencode, stored by latentfilesink. */
#define GST_TAG_VAE_MODEL "vae-model"
void gst_vae_register_tags();

/* The latent-format enum (raw, sd15, sdxl, ...), built from the engine's
 * table of latent formats; shared by the elements. */
GType gst_vae_latent_format_get_type(void);
const char* gst_vae_latent_format_nick(gint value);

namespace gst_latent_caps {

// What the loaded model contributes to the caps.
struct Model {
  int downscale = 8;
  int channels = 0;  // 0: unknown yet (no model loaded): any
  std::string latent_format = "raw";
  // Input frames per latent frame: 1 for image models; N > 1 (video VAEs)
  // adds temporal-downscale=N to the latent caps and divides the framerate.
  int temporal_downscale = 1;
};

// video/x-raw -> application/x-latent (width and height divided by the
// downscale, rounding down as the crop does; framerate kept, or divided by a
// video model's temporal downscale, which the caps then carry as
// temporal-downscale; the video size kept as source-width and source-height).
GstCaps* video_to_latent(const GstCaps* video, const Model& model);
// application/x-latent -> video/x-raw in the accepted formats (each latent
// width w comes from video widths w*d .. w*d + d-1, or exactly source-width;
// the framerate multiplied by the temporal downscale; latents of another
// temporal-downscale than the model's left out).
GstCaps* latent_to_video(const GstCaps* latent, const Model& model);

// For a decoder: application/x-latent -> video/x-raw in the accepted formats,
// each latent width w giving exactly w*d pixels (any latent format), the
// framerate multiplied by the latents' temporal-downscale.
GstCaps* latent_to_decoded(const GstCaps* latent, const Model& model);
// ... and back: video widths that are multiples of d, divided by d; for a
// video decoder (model.temporal_downscale t > 1) video latents first
// (temporal-downscale=t, the framerate divided by t), then image latents.
GstCaps* decoded_to_latent(const GstCaps* video, const Model& model);

// The packed RGB formats the elements take and give, as caps list entries
// ("{ RGB, BGR, ... }"): one table (src/frame.h's all_pixel_formats()).
std::string video_format_list();
// The latent formats ("{ raw, sd15, ... }"), from src/latent_format.h's table.
std::string latent_format_list();

// The fixed fields of negotiated latent caps.
struct Info {
  int channels = 0, width = 0, height = 0;
  int fps_n = 0, fps_d = 1;
  int source_width = 0, source_height = 0;  // video frame size, when the caps say
  std::string latent_format = "raw";
  int temporal_downscale = 1;  // frames per latent (the caps' temporal-downscale, 1 when absent)
  size_t frame_bytes() const { return static_cast<size_t>(channels) * width * height * sizeof(float); }
};
// False when the caps are not fixed latent caps in F32.
bool parse(const GstCaps* caps, Info* info);

}  // namespace gst_latent_caps
