/* latentfilesrc: .latent/.safetensors/.npy latent files to an application/x-latent stream. */
#pragma once

#include <gst/base/gstbasesrc.h>
#include <gst/gst.h>

G_BEGIN_DECLS

#define GST_TYPE_LATENT_FILE_SRC (gst_latent_file_src_get_type())
G_DECLARE_FINAL_TYPE(GstLatentFileSrc, gst_latent_file_src, GST, LATENT_FILE_SRC, GstBaseSrc)

GST_ELEMENT_REGISTER_DECLARE(latentfilesrc);

G_END_DECLS
