#include "torch_model.h"

#include <ATen/Parallel.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/DeviceGuard.h>

#include <atomic>
#include <cstring>
#include <thread>

#include "errors.h"

namespace gstvae {

const std::vector<Precision>& all_precisions() {
  static const std::vector<Precision> all = {Precision::Auto, Precision::F32, Precision::F16, Precision::BF16};
  return all;
}

const char* precision_name(Precision precision) {
  switch (precision) {
    case Precision::Auto: return "auto";
    case Precision::F32: return "fp32";
    case Precision::F16: return "fp16";
    case Precision::BF16: return "bf16";
  }
  return "?";
}

Precision precision_by_name(const std::string& name) {
  for (Precision p : all_precisions())
    if (name == precision_name(p)) return p;
  throw VaeError("unknown precision '" + name + "' (auto, fp32, fp16, bf16)");
}

ComputeTarget resolve_target(const ModelOptions& options) {
  ComputeTarget target;
  const std::string& req = options.device;
  const bool has_cuda = at::hasCUDA();
  if (req == "auto") {
    target.device = has_cuda ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU);
  } else if (req == "cpu") {
    target.device = c10::Device(c10::kCPU);
  } else if (req == "cuda" || req.rfind("cuda:", 0) == 0) {
    int index = 0;
    if (req.size() >= 5) {
      const std::string digits = req.substr(5);
      if (digits.empty() || digits.size() > 3 || digits.find_first_not_of("0123456789") != std::string::npos)
        throw VaeError("device '" + req + "' is not valid: expected auto, cpu, cuda or cuda:N");
      index = std::stoi(digits);
    }
    if (!has_cuda)
      throw VaeError("device '" + req + "' requested, but " +
                     (cuda_built() ? "this LibTorch (" + std::string(libtorch_version()) +
                                         ", with CUDA) finds no CUDA device (no GPU, or no NVIDIA driver)"
                                   : "this LibTorch (" + std::string(libtorch_version()) + ") is a CPU-only build") +
                     "; use device=cpu or device=auto");
    const int count = at::detail::getCUDAHooks().getNumGPUs();
    if (index >= count)
      throw VaeError("device '" + req + "' requested, but only " + std::to_string(count) +
                        " CUDA device(s) are present");
    target.device = c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
  } else {
    throw VaeError("device '" + req + "' is not valid: expected auto, cpu, cuda or cuda:N");
  }

  target.precision = options.precision;
  if (target.precision == Precision::Auto) {
    target.precision = Precision::F32;
    if (target.device.is_cuda()) {
      // ComfyUI's rule: bf16 where the GPU computes it natively (compute capability >= 8.0).
      c10::DeviceGuard guard(target.device);
      if (at::detail::getCUDAHooks().supportsBFloat16ConvolutionWithCuDNNv8()) target.precision = Precision::BF16;
    }
  }
  switch (target.precision) {
    case Precision::F16: target.dtype = at::kHalf; break;
    case Precision::BF16: target.dtype = at::kBFloat16; break;
    default: target.dtype = at::kFloat; break;
  }
  target.levers = levers_in_effect(cuda_levers(), target.device.is_cuda(), target.precision);
  return target;
}

namespace {
std::atomic<int> configured_threads{0};
}  // namespace

void apply_thread_option(int threads) {
  int n = threads > 0 ? threads : static_cast<int>(std::thread::hardware_concurrency());
  if (n < 1) n = 1;
  configured_threads = n;
  use_configured_threads();
}

void use_configured_threads() {
  const int n = configured_threads.load();
  if (n > 0 && at::get_num_threads() != n) at::set_num_threads(n);
}

WeightReader::WeightReader(std::shared_ptr<const SafetensorsFile> file,
                           std::map<std::string, std::string> names, ComputeTarget target)
    : file_(std::move(file)), names_(std::move(names)), target_(target) {}

const TensorInfo& WeightReader::info(const std::string& name) const {
  auto it = names_.find(name);
  const TensorInfo* t = it == names_.end() ? nullptr : file_->find(it->second);
  if (!t) throw CheckpointError("'" + file_->path() + "' lacks tensor '" + name + "'");
  return *t;
}

std::vector<int64_t> WeightReader::shape(const std::string& name) const { return info(name).shape; }

at::Tensor WeightReader::get(const std::string& name, const std::vector<int64_t>& expected) {
  const TensorInfo& t = info(name);
  const std::string stored = names_.at(name);
  const std::string label = stored == name ? "'" + name + "'" : "'" + stored + "' (" + name + ")";
  std::vector<int64_t> shape = t.shape;
  const bool linear_as_conv = expected.size() == 4 && expected[2] == 1 && expected[3] == 1 &&
                              shape.size() == 2 && shape[0] == expected[0] && shape[1] == expected[1];
  if (shape != expected && !linear_as_conv)
    throw CheckpointError("'" + file_->path() + "': tensor " + label + " has shape " +
                          shape_string(shape) + ", expected " + shape_string(expected));
  at::ScalarType stored_type;
  switch (t.dtype) {
    case DType::F32: stored_type = at::kFloat; break;
    case DType::F16: stored_type = at::kHalf; break;
    case DType::BF16: stored_type = at::kBFloat16; break;
    default:
      throw CheckpointError("'" + file_->path() + "': tensor " + label + " has dtype " +
                            dtype_name(t.dtype) + "; only F32, F16 and BF16 weights are supported");
  }
  // Copy out of the mapping first: safetensors data offsets need not be aligned.
  at::Tensor host = at::empty(shape, at::TensorOptions().dtype(stored_type));
  std::memcpy(host.data_ptr(), file_->data(t), t.nbytes);
  file_->release(t);
  used_.insert(stored);
  if (linear_as_conv) host = host.reshape(expected);
  // Converted in fp32 first so that F16 -> BF16 (or back) rounds once.
  at::Tensor out = host.to(at::kFloat).to(target_.device, target_.dtype);
  out = out.dim() == 4 ? out.contiguous(activation_format(target_)) : out.contiguous();
  parameters_ += out.numel();
  return out;
}

namespace {
// shift and scale as tensors broadcasting over dim 1 of `like`.
std::pair<at::Tensor, at::Tensor> channel_terms(const at::Tensor& like, const LatentFormat& f) {
  const int64_t c = like.size(1);
  if (!f.fits(static_cast<size_t>(c)))
    throw VaeError("latent format '" + f.name + "' is defined for " + std::to_string(f.shifts.size()) +
                   " channels, but these latents have " + std::to_string(c));
  std::vector<int64_t> shape(like.dim(), 1);
  shape[1] = c;
  std::vector<float> shift(c), scale(c);
  for (int64_t i = 0; i < c; ++i) shift[i] = static_cast<float>(f.shift_of(i)), scale[i] = static_cast<float>(f.scale_of(i));
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  return {at::tensor(shift, opts).view(shape).to(like.device(), like.scalar_type()),
          at::tensor(scale, opts).view(shape).to(like.device(), like.scalar_type())};
}
}  // namespace

// A format whose statistics are a model's own (ltx2) and were not resolved
// by that model's family: refused rather than applied as the identity.
static void require_resolved(const LatentFormat& f) {
  if (f.from_model && !f.per_channel())
    throw VaeError("latent format '" + f.name + "' takes per-channel statistics from the model's own checkpoint (" +
                   "LTX-2's per_channel_statistics); this model has none: use another latent format");
}

at::Tensor raw_to_format(const at::Tensor& raw, const LatentFormat& f) {
  require_resolved(f);
  if (f.is_raw()) return raw;
  if (!f.per_channel()) return (raw - f.shift) * f.scale;
  auto [shift, scale] = channel_terms(raw, f);
  return (raw - shift) * scale;
}

at::Tensor format_to_raw(const at::Tensor& stored, const LatentFormat& f) {
  require_resolved(f);
  if (f.is_raw()) return stored;
  if (!f.per_channel()) return stored / f.scale + f.shift;
  auto [shift, scale] = channel_terms(stored, f);
  return stored / scale + shift;
}

void configure_cuda(const ComputeTarget& target) {
  if (!target.device.is_cuda()) return;
  // A stream keeps one frame size, so cuDNN's autotuning pays off. fp32 must
  // mean fp32 (the 1e-4 agreement with ComfyUI): no TF32 in convolutions or
  // matrix products. Both are process-wide LibTorch settings.
  at::globalContext().setBenchmarkCuDNN(target.levers.cudnn_benchmark);
  if (target.precision == Precision::F32) {
    at::globalContext().setAllowTF32CuDNN(false);
    at::globalContext().setFloat32MatmulPrecision("highest");
  }
}

at::MemoryFormat activation_format(const ComputeTarget& target) {
  return target.levers.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

bool use_onednn(const at::Tensor& x) {
  static const bool available = at::hasMKLDNN();
  return available && x.is_cpu() && x.scalar_type() == at::kFloat;
}

at::Tensor conv2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t stride,
                  int64_t padding) {
  const int64_t s[2] = {stride, stride};
  const int64_t p[2] = {padding, padding};
  const int64_t d[2] = {1, 1};
  // In the layout it comes in: oneDNN runs channels-last (NHWC) input natively.
  if (use_onednn(x)) return at::mkldnn_convolution(x.contiguous(x.suggest_memory_format()), weight, bias, p, s, d, 1);
  return at::conv2d(x, weight, bias, s, p);
}

}  // namespace gstvae
