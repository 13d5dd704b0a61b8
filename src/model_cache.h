// The shared-weights cache behind load_encoder (src/registry.cpp).
//
// load_encoder() returns the same Encoder to every caller asking for the same
// model file on the same device in the same precision while one of them still
// holds it: four pipelines on one file hold one copy of the weights. The key is
// (canonical path, st_dev, st_ino, st_size, st_mtim, resolved device, resolved
// precision); a file rewritten or replaced in between gets a new encoder, and
// the last holder's release frees the weights (the cache keeps weak
// references only). Concurrent loads of one key load once. Encoder::encode is
// safe from several threads on one shared encoder (distinct batches). The
// `threads` option is LibTorch's process-wide setting; it is applied on every
// load_encoder call, cached or not.
#pragma once

#include <cstddef>

namespace gstvae {

// Encoders the cache currently holds that are still alive (some caller holds
// them). For tests and diagnostics.
size_t cached_encoder_count();

}  // namespace gstvae

// The same count under a plain C name. The engine is a static library: a test
// executable that links it and also loads the GStreamer plugin has two
// caches, and reaches the plugin's with dlsym(plugin module, this name).
extern "C" size_t gstvae_cached_encoder_count(void);
// Models read from disk since the process started (the cache's misses), e.g.
// for gst-vae-batch's "model loads" line.
extern "C" size_t gstvae_model_load_count(void);
