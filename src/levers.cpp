#include "levers.h"

#include <ATen/Context.h>
#include <torch/version.h>

#include <atomic>
#include <cstdlib>

#include "errors.h"

namespace gstvae {

namespace {

// -1: unset or empty (the default); 0 or 1; 2 for `always` when allowed.
int read_switch(const char* name, bool allow_always = false) {
  const char* raw = std::getenv(name);
  if (!raw || !*raw) return -1;
  const std::string v = raw;
  if (v == "0" || v == "off" || v == "false" || v == "no") return 0;
  if (v == "1" || v == "on" || v == "true" || v == "yes") return 1;
  if (allow_always && v == "always") return 2;
  throw VaeError(std::string(name) + "='" + v + "' is not valid: expected 0 or 1" +
                 (allow_always ? " or always" : "") + " (docs/gpu.md)");
}

void read_bool(const char* name, bool& value) {
  const int v = read_switch(name);
  if (v >= 0) value = v == 1;
}

}  // namespace

CudaLevers cuda_levers() {
  CudaLevers l;
  read_bool("GSTVAE_CUDNN_BENCHMARK", l.cudnn_benchmark);
  read_bool("GSTVAE_PINNED_STAGING", l.pinned_staging);
  read_bool("GSTVAE_UPLOAD_OVERLAP", l.upload_overlap);
  switch (read_switch("GSTVAE_CHANNELS_LAST", /*allow_always=*/true)) {
    case 0: l.channels_last = ChannelsLast::Off; break;
    case 1: l.channels_last = ChannelsLast::Half; break;
    case 2: l.channels_last = ChannelsLast::Always; break;
    default: break;
  }
  read_bool("GSTVAE_SDPA", l.sdpa);
  read_bool("GSTVAE_CUDA_GRAPHS", l.cuda_graphs);
  read_bool("GSTVAE_DOWNLOAD_OVERLAP", l.download_overlap);
  return l;
}

bool sdpa_built() { return true; }

bool cuda_built() { return GSTVAE_TORCH_HAS_CUDA; }

const char* libtorch_version() { return TORCH_VERSION; }

std::string no_cuda_device_note() {
  if (!cuda_built() || at::hasCUDA()) return {};
  return std::string("LibTorch ") + libtorch_version() +
         " has CUDA (libtorch_cuda is linked) but finds no CUDA device (no GPU, or no NVIDIA driver): "
         "device=auto runs on the CPU";
}

bool cuda_device_present() { return at::hasCUDA(); }

std::string take_no_cuda_device_note() {
  static std::atomic<bool> said{false};
  if (said.exchange(true)) return {};
  return no_cuda_device_note();
}

LeversInEffect levers_in_effect(const CudaLevers& levers, bool cuda, Precision precision) {
  LeversInEffect e;
  const bool half = precision == Precision::F16 || precision == Precision::BF16;
  e.cudnn_benchmark = cuda && levers.cudnn_benchmark;
  e.pinned_staging = cuda && levers.pinned_staging;
  e.upload_overlap = cuda && levers.upload_overlap;
  e.channels_last = levers.channels_last == ChannelsLast::Always ||
                    (levers.channels_last == ChannelsLast::Half && cuda && half);
  e.sdpa = cuda && levers.sdpa && sdpa_built();
  e.cuda_graphs = cuda && levers.cuda_graphs && cuda_built();
  e.download_overlap = cuda && levers.download_overlap && cuda_built();
  return e;
}

std::string describe_levers(const CudaLevers& levers, const std::string& device, Precision precision) {
  auto b = [](bool v) { return v ? "1" : "0"; };
  const char* cl = levers.channels_last == ChannelsLast::Always ? "always"
                   : levers.channels_last == ChannelsLast::Half ? "1"
                                                                 : "0";
  std::string s = std::string("levers: GSTVAE_CUDNN_BENCHMARK=") + b(levers.cudnn_benchmark) +
                  " GSTVAE_PINNED_STAGING=" + b(levers.pinned_staging) +
                  " GSTVAE_UPLOAD_OVERLAP=" + b(levers.upload_overlap) + " GSTVAE_CHANNELS_LAST=" + cl +
                  " GSTVAE_SDPA=" + b(levers.sdpa) + " GSTVAE_CUDA_GRAPHS=" + b(levers.cuda_graphs) +
                  " GSTVAE_DOWNLOAD_OVERLAP=" + b(levers.download_overlap) + " (LibTorch " + libtorch_version() +
                  ", SDPA " + (sdpa_built() ? "built" : "not built") + ", CUDA code " +
                  (cuda_built() ? "built" : "not built") + "); in effect on " + device + " " +
                  precision_name(precision) + ":";
  const LeversInEffect e = levers_in_effect(levers, device.rfind("cuda", 0) == 0, precision);
  std::string on;
  if (e.cudnn_benchmark) on += " cudnn_benchmark";
  if (e.pinned_staging) on += " pinned_staging";
  if (e.upload_overlap) on += " upload_overlap";
  if (e.channels_last) on += " channels_last";
  if (e.sdpa) on += " sdpa";
  if (e.cuda_graphs) on += " cuda_graphs";
  if (e.download_overlap) on += " download_overlap";
  return s + (on.empty() ? " none" : on);
}

}  // namespace gstvae
