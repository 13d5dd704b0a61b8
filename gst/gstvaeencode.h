/* vaeencode: video frames in, VAE latents out. A GstVaeBatch subclass.
 * GObject glue only: the engine lives in src/ and LibTorch stays out of here. */
#pragma once

#include "gstvaebatch.h"

G_BEGIN_DECLS

#define GST_TYPE_VAE_ENCODE (gst_vae_encode_get_type())
G_DECLARE_FINAL_TYPE(GstVaeEncode, gst_vae_encode, GST, VAE_ENCODE, GstVaeBatch)

GST_ELEMENT_REGISTER_DECLARE(vaeencode);

/* Name of the element message posted after every batch. */
#define GST_VAE_ENCODE_PROGRESS_MESSAGE "vaeencode-progress"

G_END_DECLS
