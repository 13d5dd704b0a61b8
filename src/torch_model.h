// LibTorch machinery shared by every family in both directions: device and
// precision resolution, thread settings and checked weight loading.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "latent_format.h"
#include "levers.h"
#include "model.h"
#include "safetensors.h"
#include "tensor_usage.h"

namespace gstvae {

struct ComputeTarget {
  c10::Device device = c10::Device(c10::kCPU);
  Precision precision = Precision::F32;
  at::ScalarType dtype = at::kFloat;
  // The CUDA speed levers that take effect for this device and precision,
  // read from the environment by resolve_target() (levers.h, docs/gpu.md).
  LeversInEffect levers;
};

// Resolves "auto"/"cpu"/"cuda"/"cuda:N" and the precision rule. An explicit CUDA
// request that cannot be met throws VaeError; there is no silent fallback.
// Also reads the levers (cuda_levers(): a bad value throws VaeError).
ComputeTarget resolve_target(const ModelOptions& options);

// Sets LibTorch's intra-op thread count (0 = all cores) for the process.
void apply_thread_option(int threads);
// ATen gives a thread the count once, when it first computes, and OpenMP keeps
// it per thread: encode() and prepare() call this so that a long-lived thread
// (the element's encode thread) follows a later apply_thread_option().
void use_configured_threads();

// Reads checkpoint tensors by canonical name onto the compute target, checking
// each shape. Weights are converted to the compute dtype once, here.
class WeightReader {
 public:
  WeightReader(std::shared_ptr<const SafetensorsFile> file, std::map<std::string, std::string> names,
               ComputeTarget target);

  bool has(const std::string& name) const { return names_.count(name) != 0; }
  // Shape as stored; throws CheckpointError naming the tensor when missing.
  std::vector<int64_t> shape(const std::string& name) const;
  // The tensor, which must have `expected` shape. A 2-D [O, I] Linear weight is
  // accepted for an expected [O, I, 1, 1] 1x1 convolution. 4-D weights are
  // channels-last when the target's channels_last lever is in effect.
  at::Tensor get(const std::string& name, const std::vector<int64_t>& expected);
  int64_t parameters_loaded() const { return parameters_; }
  const std::string& path() const { return file_->path(); }
  // The end of every load: throws CheckpointError when a tensor under
  // `claim.prefix` was neither read by get() nor listed as deliberately
  // unused (tensor_usage.h).
  void require_all_used(const TensorClaim& claim) const { require_every_tensor_used(*file_, claim, used_); }

 private:
  const TensorInfo& info(const std::string& name) const;

  std::shared_ptr<const SafetensorsFile> file_;
  std::map<std::string, std::string> names_;
  ComputeTarget target_;
  int64_t parameters_ = 0;
  std::set<std::string> used_;  // names in the file of the tensors get() read
};

// fp32 convolutions on the CPU go to oneDNN directly: at::conv2d would pick a
// different kernel for a single small frame than for a batch, so a stream's
// output would depend on how it was cut into batches. Every family's 2-D
// convolution goes through here.
at::Tensor conv2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t stride = 1,
                  int64_t padding = 0);
// Whether conv2d() sends `x` to oneDNN (fp32 on a CPU with oneDNN).
bool use_onednn(const at::Tensor& x);

// Latents (N x C x ...) from the raw space into format `f` ((raw - shift) *
// scale, per channel where `f` is) and back. Throw VaeError when a
// per-channel format does not have C channels.
at::Tensor raw_to_format(const at::Tensor& raw, const LatentFormat& f);
at::Tensor format_to_raw(const at::Tensor& stored, const LatentFormat& f);

// The memory format activations are kept in on `target` (its channels_last lever).
at::MemoryFormat activation_format(const ComputeTarget& target);

// Sets the process-wide CUDA settings a stream needs (cuDNN autotuning unless
// GSTVAE_CUDNN_BENCHMARK=0; no TF32 when fp32 is asked for, so that fp32 means
// fp32). Nothing on the CPU.
void configure_cuda(const ComputeTarget& target);

}  // namespace gstvae
