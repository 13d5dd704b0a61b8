/* latentfilesink: application/x-latent streams to .latent/.safetensors/.npy files. */
#pragma once

#include <gst/base/gstbasesink.h>
#include <gst/gst.h>

G_BEGIN_DECLS

#define GST_TYPE_LATENT_FILE_SINK (gst_latent_file_sink_get_type())
G_DECLARE_FINAL_TYPE(GstLatentFileSink, gst_latent_file_sink, GST, LATENT_FILE_SINK, GstBaseSink)

GST_ELEMENT_REGISTER_DECLARE(latentfilesink);

G_END_DECLS
