/* Frames in GStreamer's CUDA memory (video/x-raw(memory:CUDAMemory)) for
 * vaeencode: whether to offer them, mapping them for the engine, and the CUDA
 * context shared with upstream. Uses Debian 12's libgstcuda-1.0 (GStreamer
 * 1.22, unstable API) when the build found it (GSTVAE_HAVE_GST_CUDA), which
 * loads libcuda at run time (gst_cuda_load_library): on a machine without an
 * NVIDIA driver everything here says "no" and the plugin works on system
 * memory. No LibTorch and no CUDA headers in this header. */
#pragma once

#include <gst/gst.h>
#include <gst/video/video.h>

#include <memory>
#include <string>

#include "frame.h"

namespace gstvae_cuda {

// Whether this build can take CUDA memory at all (found libgstcuda).
bool built();

// Whether libcuda loads and sees at least one device (asked once per
// process). GSTVAE_TEST_PRETEND_CUDA=1 makes it true without a driver: a
// test lever for caps negotiation only (frames in CUDA memory cannot be
// mapped then, and a stream in them fails with an error saying so).
bool available();

// Whether an element with this `device` setting (auto, cpu, cuda, cuda:N)
// offers CUDA memory: a CUDA device (cuda, cuda:N), or auto with a device
// present; never cpu, never without available().
bool offered(const std::string& device);

// The CUDA device index a `device` setting names (auto and cuda: 0), or -1 for cpu / a bad setting.
int device_index(const std::string& device);

// The caps feature, for caps strings and structures.
extern const char* const kFeature;  // "memory:CUDAMemory"

// Whether these caps' first structure carries the CUDA memory feature.
bool caps_in_cuda_memory(const GstCaps* caps);

// Maps `buffer` (described by `info`) with GST_MAP_CUDA and describes its
// planes for FrameBatch::add_device: device pointers, pitches, the device,
// and whether its CUDA context is another than the device's primary one
// (LibTorch's). `keep` holds the mapping (and so the buffer) until released.
// Throws gstvae::VaeError when the buffer is not CUDA memory or cannot be
// mapped.
void map_frame(GstBuffer* buffer, const GstVideoInfo* info, gstvae::DeviceFrame* frame,
               std::shared_ptr<const void>* keep);

// The element-side CUDA context: a GstCudaContext wrapping the primary
// context of one device, given to upstream CUDA elements through the
// gst.cuda.context query and set_context, so that their frames are LibTorch's
// to read without a copy. One per element; thread-safe.
// Lock order: the element's callers hold no lock of theirs (state changes,
// queries, set_context); then SharedContext's mutex; then the process-wide
// mutex of the retained primary contexts (cuda_glue.cpp). Under its mutex it
// calls only libgstcuda functions that take no lock of ours
// (gst_cuda_context_new_wrapped, g_object_get); it lets go of it before
// answering a query or configuring a pool, which may reach other elements.
class SharedContext {
 public:
  SharedContext();
  ~SharedContext();
  SharedContext(const SharedContext&) = delete;
  SharedContext& operator=(const SharedContext&) = delete;

  // Makes (once) the wrapped primary context of `device` (a CUDA index);
  // false, with nothing made, where no device or driver is present.
  bool ensure(GstElement* element, int device);
  // Answers a context query of type gst.cuda.context with it; false for
  // other queries, or when none was made.
  bool answer(GstElement* element, GstQuery* query);
  // A context set on the element (GstElement::set_context): a CUDA context
  // of our device is kept as is only when it wraps the primary context; any
  // other is refused (ours stays), and that element's frames are copied
  // device to device. Returns whether it was taken.
  bool set(GstElement* element, GstContext* context);
  // Upstream asks where to put frames for caps in CUDA memory: a CUDA
  // buffer pool in our context, unbounded (the element holds a batch's
  // frames until their encode ends, so a bounded upstream pool could stall),
  // with video meta. False when the caps are not CUDA memory or no context is held.
  bool propose_pool(GstElement* element, GstQuery* query);
  // Drops the context (READY -> NULL).
  void reset();
  // Whether a context is held.
  bool has() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace gstvae_cuda
