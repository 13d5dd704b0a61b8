// The CUDA speed levers (docs/gpu.md, issue 14), each switchable by an
// environment variable read when a model loads (the page-locked staging also
// when buffers are made). Their defaults stay conservative until a GPU run
// measures them. On the CPU none of them takes effect, so none changes a CPU
// result; GSTVAE_CHANNELS_LAST=always, a test of the layout path, is the one
// exception. No LibTorch here.
#pragma once

#include <string>

#include "model.h"

namespace gstvae {

enum class ChannelsLast {
  Off,     // 0 (default): NCHW everywhere
  Half,    // 1: NHWC activations and convolution weights for bf16/fp16 on CUDA
  Always,  // always: on every device and precision (tests the layout path; on
           // the CPU in fp32; see docs/gpu.md for bf16)
};

// What the environment asks for. Values: 0/1 (also off/on, false/true, no/yes;
// unset or empty = the default); GSTVAE_CHANNELS_LAST also takes `always`.
struct CudaLevers {
  bool cudnn_benchmark = true;  // GSTVAE_CUDNN_BENCHMARK: cuDNN autotuning (cudnn.benchmark)
  bool pinned_staging = true;   // GSTVAE_PINNED_STAGING: page-locked host frames and latents
  bool upload_overlap = true;   // GSTVAE_UPLOAD_OVERLAP: prepare() uploads on a side stream
  ChannelsLast channels_last = ChannelsLast::Off;  // GSTVAE_CHANNELS_LAST
  bool sdpa = false;  // GSTVAE_SDPA: fused attention in the KL VAE
  // GSTVAE_CUDA_GRAPHS: the image encoders' forward pass captured as a CUDA
  // graph per input shape and precision after warm-up, then replayed
  // (cuda_graphs.h). Off until a GPU run measures it.
  bool cuda_graphs = false;
  // GSTVAE_DOWNLOAD_OVERLAP: the latents' copy to the host no longer ends the
  // encode with a synchronisation; the element waits on an event before
  // pushing them, while the next batch is already being encoded. Off until a
  // GPU run measures it.
  bool download_overlap = false;
};

// What takes effect for one model (device and resolved precision).
struct LeversInEffect {
  bool cudnn_benchmark = false;
  bool pinned_staging = false;
  bool upload_overlap = false;
  bool channels_last = false;
  bool sdpa = false;
  bool cuda_graphs = false;
  bool download_overlap = false;
  bool operator<(const LeversInEffect& o) const { return bits() < o.bits(); }
  bool operator==(const LeversInEffect& o) const { return bits() == o.bits(); }
  int bits() const {
    return cudnn_benchmark | pinned_staging << 1 | upload_overlap << 2 | channels_last << 3 | sdpa << 4 |
           cuda_graphs << 5 | download_overlap << 6;
  }
};

// Reads the variables now; throws VaeError naming a variable whose value is
// not one of the above.
CudaLevers cuda_levers();
LeversInEffect levers_in_effect(const CudaLevers& levers, bool cuda, Precision precision);
// Whether this build has the fused attention (always: LibTorch >= 2.0 is required).
bool sdpa_built();
// Whether this build has the CUDA-only code (CUDA graphs, download events):
// built against a LibTorch with libtorch_cuda.
bool cuda_built();
// Whether LibTorch finds a CUDA device here (false in CPU-only builds).
bool cuda_device_present();
// A CUDA build on a machine where LibTorch finds no CUDA device (no GPU, or
// no NVIDIA driver): the sentence that says so and that device=auto runs on
// the CPU; empty otherwise (a CPU-only build, or a device found). The
// elements and tools say it once per process: take_no_cuda_device_note()
// gives it to the first caller only.
std::string no_cuda_device_note();
std::string take_no_cuda_device_note();
// The LibTorch this was compiled against, e.g. "2.11.0".
const char* libtorch_version();
// One line for logs and the GPU check's summary: each variable with its value,
// then what takes effect on `device` (a resolved name, e.g. "cpu", "cuda:0")
// in `precision`.
std::string describe_levers(const CudaLevers& levers, const std::string& device, Precision precision);

}  // namespace gstvae
