/* The `vae` plugin: registers the elements. */
#include <gst/gst.h>

#include "gstlatentfilesink.h"
#include "gstlatentfilesrc.h"
#include "gstvaedecode.h"
#include "gstvaeencode.h"
#include "latent_caps.h"

#ifndef PACKAGE
#define PACKAGE "gst-vae"
#endif

static gboolean plugin_init(GstPlugin* plugin) {
  gst_vae_register_tags();
  gboolean ok = FALSE;
  ok |= GST_ELEMENT_REGISTER(vaeencode, plugin);
  ok |= GST_ELEMENT_REGISTER(vaedecode, plugin);
  ok |= GST_ELEMENT_REGISTER(latentfilesink, plugin);
  ok |= GST_ELEMENT_REGISTER(latentfilesrc, plugin);
  return ok;
}

GST_PLUGIN_DEFINE(GST_VERSION_MAJOR, GST_VERSION_MINOR, vae,
                  "Stable-Diffusion-family VAE encoding and decoding of video (LibTorch)", plugin_init, "0.1.0",
                  "LGPL", "gst-vae", "https://github.com/gst-vae/gst-vae")
