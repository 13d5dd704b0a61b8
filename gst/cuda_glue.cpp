#include "cuda_glue.h"

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

#include "errors.h"
#include "levers.h"

#if GSTVAE_HAVE_GST_CUDA
#include <gmodule.h>
#include <gst/cuda/gstcudacontext.h>
#include <gst/cuda/gstcudaloader.h>
#include <gst/cuda/gstcudamemory.h>
#include <gst/cuda/gstcudautils.h>
// The driver entry points libgstcuda 1.22 loads (CuInit, CuDeviceGet, ...).
#include <gst/cuda/cuda-gst.h>
#endif

GST_DEBUG_CATEGORY_STATIC(vae_cuda_debug);
#define GST_CAT_DEFAULT vae_cuda_debug

namespace gstvae_cuda {

const char* const kFeature = "memory:CUDAMemory";

namespace {

[[maybe_unused]] void init_debug() {
  static std::once_flag once;
  std::call_once(once, [] { GST_DEBUG_CATEGORY_INIT(vae_cuda_debug, "vaecuda", 0, "gst-vae CUDA memory"); });
}

[[maybe_unused]] bool pretend() {
  const char* v = std::getenv("GSTVAE_TEST_PRETEND_CUDA");
  return v && std::strcmp(v, "1") == 0;
}

}  // namespace

bool caps_in_cuda_memory(const GstCaps* caps) {
  if (!caps || gst_caps_is_empty(caps) || gst_caps_is_any(caps)) return false;
  GstCapsFeatures* f = gst_caps_get_features(caps, 0);
  return f && gst_caps_features_contains(f, kFeature);
}

int device_index(const std::string& device) {
  if (device == "auto" || device == "cuda") return 0;
  if (device.rfind("cuda:", 0) == 0 && device.size() > 5 && device.size() <= 8 &&
      device.find_first_not_of("0123456789", 5) == std::string::npos)
    return std::atoi(device.c_str() + 5);
  return -1;
}

bool offered(const std::string& device) {
  if (!built() || device_index(device) < 0) return false;
  return available();
}

#if GSTVAE_HAVE_GST_CUDA

bool built() { return true; }

namespace {

// libgstcuda-1.0 is opened at run time, not linked: it links GL, EGL, X11,
// Wayland, gbm and udev, which a GPU server may lack, and the plugin must
// load (and take system memory) wherever they or the NVIDIA driver are
// missing. Its headers give the types; these are the functions used.
struct GstCudaApi {
  gboolean (*load_library)(void);
  gboolean (*is_cuda_memory)(GstMemory*);
  GType (*context_get_type)(void);
  GstCudaContext* (*context_new_wrapped)(CUcontext, CUdevice);
  gpointer (*context_get_handle)(GstCudaContext*);
  gboolean (*handle_context_query)(GstElement*, GstQuery*, GstCudaContext*);
  GstBufferPool* (*buffer_pool_new)(GstCudaContext*);
  CUresult (*init)(unsigned int);
  CUresult (*device_get)(CUdevice*, int);
  CUresult (*device_get_count)(int*);
};

template <typename F>
bool look_up(GModule* module, const char* name, F* fn) {
  gpointer sym = nullptr;
  if (!g_module_symbol(module, name, &sym) || !sym) return false;
  *fn = reinterpret_cast<F>(sym);
  return true;
}

// Null when libgstcuda-1.0.so.0 (or one of its symbols) is missing.
const GstCudaApi* api() {
  static const GstCudaApi* loaded = []() -> const GstCudaApi* {
    init_debug();
    GModule* module = g_module_open("libgstcuda-1.0.so.0", static_cast<GModuleFlags>(G_MODULE_BIND_LAZY |
                                                                                      G_MODULE_BIND_LOCAL));
    if (!module) {
      GST_INFO("libgstcuda-1.0.so.0 could not be loaded (%s): CUDA memory is not offered", g_module_error());
      return nullptr;
    }
    static GstCudaApi a;
    const bool ok = look_up(module, "gst_cuda_load_library", &a.load_library) &&
                    look_up(module, "gst_is_cuda_memory", &a.is_cuda_memory) &&
                    look_up(module, "gst_cuda_context_get_type", &a.context_get_type) &&
                    look_up(module, "gst_cuda_context_new_wrapped", &a.context_new_wrapped) &&
                    look_up(module, "gst_cuda_context_get_handle", &a.context_get_handle) &&
                    look_up(module, "gst_cuda_handle_context_query", &a.handle_context_query) &&
                    look_up(module, "gst_cuda_buffer_pool_new", &a.buffer_pool_new) &&
                    look_up(module, "CuInit", &a.init) && look_up(module, "CuDeviceGet", &a.device_get) &&
                    look_up(module, "CuDeviceGetCount", &a.device_get_count);
    if (!ok) {
      GST_WARNING("libgstcuda-1.0.so.0 lacks a function gst-vae uses: CUDA memory is not offered");
      g_module_close(module);
      return nullptr;
    }
    // Kept open for the process: its types are registered with GObject.
    g_module_make_resident(module);
    return &a;
  }();
  return loaded;
}

// cuDevicePrimaryCtxRetain, which libgstcuda 1.22's loader does not load:
// from the same libcuda it opened (already resident, so this only looks the
// symbol up). Null where there is none.
using PrimaryCtxRetain = CUresult (*)(CUcontext*, CUdevice);
PrimaryCtxRetain primary_ctx_retain() {
  static PrimaryCtxRetain fn = []() -> PrimaryCtxRetain {
    GModule* module = g_module_open("libcuda.so.1", G_MODULE_BIND_LAZY);
    if (!module) return nullptr;
    gpointer sym = nullptr;
    if (!g_module_symbol(module, "cuDevicePrimaryCtxRetain", &sym)) {
      g_module_close(module);
      return nullptr;
    }
    // Kept open for the process, as libgstcuda keeps its own handle.
    return reinterpret_cast<PrimaryCtxRetain>(sym);
  }();
  return fn;
}

// The device's primary context, retained once for the process (LibTorch
// retains it too; it lives as long as the process uses the device).
bool primary_context(int device, CUcontext* ctx, CUdevice* dev) {
  static std::mutex mutex;
  static std::map<int, std::pair<CUcontext, CUdevice>> retained;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = retained.find(device);
  if (it == retained.end()) {
    PrimaryCtxRetain retain = primary_ctx_retain();
    CUdevice d;
    CUcontext c = nullptr;
    if (!retain || !api() || api()->device_get(&d, device) != CUDA_SUCCESS || retain(&c, d) != CUDA_SUCCESS || !c)
      return false;
    it = retained.emplace(device, std::make_pair(c, d)).first;
  }
  *ctx = it->second.first;
  *dev = it->second.second;
  return true;
}

struct MappedFrame {
  GstVideoFrame frame;
};

}  // namespace

bool available() {
  init_debug();
  if (pretend()) return true;
  static const bool yes = [] {
    if (!gstvae::cuda_device_present()) {
      GST_INFO("LibTorch finds no CUDA device: CUDA memory is not offered");
      return false;
    }
    const GstCudaApi* a = api();
    if (!a) return false;
    // libcuda itself, at run time, as libgstcuda's own elements load it.
    if (!a->load_library()) {
      GST_INFO("libcuda could not be loaded: CUDA memory is not offered");
      return false;
    }
    int count = 0;
    if (a->init(0) != CUDA_SUCCESS || a->device_get_count(&count) != CUDA_SUCCESS || count < 1) {
      GST_INFO("the CUDA driver finds no device: CUDA memory is not offered");
      return false;
    }
    return true;
  }();
  return yes;
}

void map_frame(GstBuffer* buffer, const GstVideoInfo* info, gstvae::DeviceFrame* out,
               std::shared_ptr<const void>* keep) {
  GstMemory* mem = gst_buffer_n_memory(buffer) > 0 ? gst_buffer_peek_memory(buffer, 0) : nullptr;
  if (!mem || !available() || !api() || !api()->is_cuda_memory(mem))
    throw gstvae::VaeError(
        "the caps say video/x-raw(memory:CUDAMemory) but the buffer holds no CUDA memory" +
        std::string(pretend() ? " (GSTVAE_TEST_PRETEND_CUDA is set: CUDA memory is only pretended)" : ""));
  GstCudaContext* context = GST_CUDA_MEMORY_CAST(mem)->context;
  guint device = 0;
  g_object_get(context, "cuda-device-id", &device, nullptr);
  auto mapped = std::make_shared<MappedFrame>();
  if (!gst_video_frame_map(&mapped->frame, info, buffer, static_cast<GstMapFlags>(GST_MAP_READ | GST_MAP_CUDA)))
    throw gstvae::VaeError("a frame in CUDA memory could not be mapped for the device (GST_MAP_CUDA)");
  // From here the mapping (and its buffer reference) is released by `keep`.
  std::shared_ptr<MappedFrame> holder(mapped.get(), [mapped](MappedFrame* f) { gst_video_frame_unmap(&f->frame); });
  for (guint p = 0; p < GST_VIDEO_FRAME_N_PLANES(&mapped->frame) && p < 3; ++p) {
    out->planes[p] = GST_VIDEO_FRAME_PLANE_DATA(&mapped->frame, p);
    out->strides[p] = static_cast<size_t>(GST_VIDEO_FRAME_PLANE_STRIDE(&mapped->frame, p));
  }
  out->device = static_cast<int>(device);
  CUcontext primary;
  CUdevice dev;
  const bool have_primary = primary_context(static_cast<int>(device), &primary, &dev);
  // Another context's memory may not be read by LibTorch's kernels: the
  // engine copies it device to device.
  out->foreign_context = !have_primary || api()->context_get_handle(context) != primary;
  *keep = holder;
}

struct SharedContext::Impl {
  mutable std::mutex mutex;
  GstCudaContext* context = nullptr;  // wraps the primary context of `device`
  int device = -1;
};

SharedContext::SharedContext() : impl_(std::make_unique<Impl>()) {}
SharedContext::~SharedContext() { reset(); }

bool SharedContext::ensure(GstElement* element, int device) {
  if (device < 0 || !available() || pretend()) return false;
  std::lock_guard<std::mutex> lock(impl_->mutex);
  if (impl_->context && impl_->device == device) return true;
  CUcontext primary;
  CUdevice dev;
  if (!primary_context(device, &primary, &dev)) {
    GST_WARNING_OBJECT(element, "no primary CUDA context for device %d: upstream's frames will be copied", device);
    return false;
  }
  GstCudaContext* wrapped = api()->context_new_wrapped(primary, dev);
  if (!wrapped) return false;
  if (impl_->context) gst_object_unref(impl_->context);
  impl_->context = wrapped;
  impl_->device = device;
  GST_INFO_OBJECT(element, "sharing the primary CUDA context of device %d with upstream", device);
  return true;
}

bool SharedContext::answer(GstElement* element, GstQuery* query) {
  GstCudaContext* context = nullptr;
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    if (impl_->context) context = static_cast<GstCudaContext*>(gst_object_ref(impl_->context));
  }
  if (!context) return false;
  const gboolean ok = api()->handle_context_query(element, query, context);
  gst_object_unref(context);
  return ok;
}

bool SharedContext::set(GstElement* element, GstContext* context) {
  if (!context || g_strcmp0(gst_context_get_context_type(context), GST_CUDA_CONTEXT_TYPE) != 0) return false;
  if (!available() || !api() || pretend()) return false;
  GstCudaContext* theirs = nullptr;
  const GstStructure* s = gst_context_get_structure(context);
  if (!gst_structure_get(s, GST_CUDA_CONTEXT_TYPE, api()->context_get_type(), &theirs, nullptr) || !theirs)
    return false;
  bool taken = false;
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    guint device = 0;
    g_object_get(theirs, "cuda-device-id", &device, nullptr);
    CUcontext primary;
    CUdevice dev;
    if (impl_->device == static_cast<int>(device) && primary_context(impl_->device, &primary, &dev) &&
        api()->context_get_handle(theirs) == primary) {
      if (impl_->context) gst_object_unref(impl_->context);
      impl_->context = static_cast<GstCudaContext*>(gst_object_ref(theirs));
      taken = true;
    }
  }
  if (!taken)
    GST_INFO_OBJECT(element, "a CUDA context that is not the device's primary one was set: kept ours; frames "
                             "made in it are copied device to device");
  gst_object_unref(theirs);
  return taken;
}

bool SharedContext::propose_pool(GstElement* element, GstQuery* query) {
  GstCaps* caps = nullptr;
  gboolean need_pool = FALSE;
  gst_query_parse_allocation(query, &caps, &need_pool);
  if (!caps || !caps_in_cuda_memory(caps)) return false;
  GstVideoInfo info;
  if (!gst_video_info_from_caps(&info, caps)) return false;
  GstCudaContext* context = nullptr;
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    if (impl_->context) context = static_cast<GstCudaContext*>(gst_object_ref(impl_->context));
  }
  if (!context) return false;
  gst_query_add_allocation_meta(query, GST_VIDEO_META_API_TYPE, nullptr);
  bool ok = true;
  if (need_pool) {
    GstBufferPool* pool = api()->buffer_pool_new(context);
    GstStructure* config = gst_buffer_pool_get_config(pool);
    gst_buffer_pool_config_set_params(config, caps, GST_VIDEO_INFO_SIZE(&info), 0, 0);
    gst_buffer_pool_config_add_option(config, GST_BUFFER_POOL_OPTION_VIDEO_META);
    ok = gst_buffer_pool_set_config(pool, config);
    if (ok) {
      // The pool may have changed the size to its pitched layout's.
      config = gst_buffer_pool_get_config(pool);
      guint size = 0;
      gst_buffer_pool_config_get_params(config, nullptr, &size, nullptr, nullptr);
      gst_structure_free(config);
      gst_query_add_allocation_pool(query, pool, size, 0, 0);
    } else {
      GST_WARNING_OBJECT(element, "the CUDA buffer pool refused its configuration");
    }
    gst_object_unref(pool);
  }
  gst_object_unref(context);
  return ok;
}

void SharedContext::reset() {
  GstCudaContext* old = nullptr;
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    old = impl_->context;
    impl_->context = nullptr;
    impl_->device = -1;
  }
  if (old) gst_object_unref(old);
}

bool SharedContext::has() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->context != nullptr;
}

#else  // no libgstcuda: nothing is offered

bool built() { return false; }
bool available() { return false; }
void map_frame(GstBuffer*, const GstVideoInfo*, gstvae::DeviceFrame*, std::shared_ptr<const void>*) {
  throw gstvae::VaeError("this build has no CUDA memory support (libgstcuda-1.0 was not found)");
}
struct SharedContext::Impl {};
SharedContext::SharedContext() : impl_(std::make_unique<Impl>()) {}
SharedContext::~SharedContext() = default;
bool SharedContext::ensure(GstElement*, int) { return false; }
bool SharedContext::answer(GstElement*, GstQuery*) { return false; }
bool SharedContext::set(GstElement*, GstContext*) { return false; }
bool SharedContext::propose_pool(GstElement*, GstQuery*) { return false; }
void SharedContext::reset() {}
bool SharedContext::has() const { return false; }

#endif

}  // namespace gstvae_cuda
