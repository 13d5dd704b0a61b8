/* vaedecode: VAE latents in, video frames out. A GstVaeBatch subclass.
 * GObject glue only: the engine lives in src/ and LibTorch stays out of here. */
#pragma once

#include "gstvaebatch.h"

G_BEGIN_DECLS

#define GST_TYPE_VAE_DECODE (gst_vae_decode_get_type())
G_DECLARE_FINAL_TYPE(GstVaeDecode, gst_vae_decode, GST, VAE_DECODE, GstVaeBatch)

GST_ELEMENT_REGISTER_DECLARE(vaedecode);

/* Name of the element message posted after every batch. */
#define GST_VAE_DECODE_PROGRESS_MESSAGE "vaedecode-progress"

G_END_DECLS
