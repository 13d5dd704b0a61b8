#include "torch_encoder.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <atomic>
#include <cstring>
#include <thread>

#include "errors.h"
#include "frame_storage.h"
#include "tiling.h"

namespace gstvae {

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
  for (Precision p : {Precision::Auto, Precision::F32, Precision::F16, Precision::BF16})
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
      throw VaeError("device '" + req +
                        "' requested, but this LibTorch has no usable CUDA device (CPU-only build or no GPU); "
                        "use device=cpu or device=auto");
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
  if (linear_as_conv) host = host.reshape(expected);
  // Converted in fp32 first so that F16 -> BF16 (or back) rounds once.
  at::Tensor out = host.to(at::kFloat).to(target_.device, target_.dtype).contiguous();
  parameters_ += out.numel();
  return out;
}

TorchEncoder::TorchEncoder(EncoderInfo info, ComputeTarget target)
    : info_(std::move(info)), target_(target) {
  info_.device = target_.device.str();
  info_.precision = target_.precision;
  if (target_.device.is_cuda()) {
    // A stream keeps one frame size, so cuDNN's autotuning pays off. fp32 must
    // mean fp32 (the 1e-4 agreement with ComfyUI): no TF32 in convolutions or
    // matrix products. Both are process-wide LibTorch settings.
    at::globalContext().setBenchmarkCuDNN(true);
    if (target_.precision == Precision::F32) {
      at::globalContext().setAllowTF32CuDNN(false);
      at::globalContext().setFloat32MatmulPrecision("highest");
    }
  }
}

void TorchEncoder::probe() {
  c10::InferenceMode guard;
  const int64_t side = info_.downscale;
  at::Tensor x = at::zeros({1, 3, side, side}, at::TensorOptions().device(target_.device).dtype(target_.dtype));
  try {
    Moments m = forward(x);
    if (m.mean.size(1) != info_.latent_channels)
      throw VaeError("model produced " + std::to_string(m.mean.size(1)) + " latent channels, expected " +
                        std::to_string(info_.latent_channels));
  } catch (const c10::Error& e) {
    throw VaeError(std::string("precision ") + precision_name(target_.precision) +
                      " does not run on device " + target_.device.str() + " with this LibTorch: " +
                      e.what_without_backtrace());
  }
}

at::Tensor prepare_pixels(const FrameBatch& batch, const ComputeTarget& target, bool signed_range) {
  const PixelLayout layout = pixel_layout(batch.format());
  at::Tensor staged = batch.storage().pixels.narrow(0, 0, static_cast<int64_t>(batch.size()));
  at::Tensor u8 = staged.to(target.device, /*non_blocking=*/batch.pinned());
  // N x H x W x bpp -> N x 3 x H x W in R, G, B order (views, then one copy).
  at::Tensor rgb = at::stack({u8.select(3, layout.r), u8.select(3, layout.g), u8.select(3, layout.b)}, 1);
  // ComfyUI: pixels = u8 / 255 in fp32, then 2 * pixels - 1, then the VAE dtype.
  at::Tensor x = rgb.to(at::kFloat).div_(255.0f);
  if (signed_range) x.mul_(2.0f).sub_(1.0f);
  // NCHW, kept by every layer after it. Not channels-last, though eager bf16
  // runs 22 % faster so on this project's CPU: Debian's LibTorch 1.13 CPU
  // GroupNorm gives wrong bf16 values on channels-last input (max error 4.75
  // against 0.077 in NCHW), and in fp32 channels-last is 1.5x slower here.
  return x.to(target.dtype).contiguous();
}

void TorchEncoder::prepare(FrameBatch& batch) {
  if (batch.empty()) return;
  use_configured_threads();
  c10::InferenceMode guard;
  FrameBatch::Storage& storage = batch.storage();
  storage.forget_prepared();
  try {
    if (target_.device.is_cuda()) {
      // A side stream, so that the upload overlaps the encode running on the
      // compute stream; encode() makes the compute stream wait for the event.
      c10::impl::VirtualGuardImpl impl(target_.device.type());
      c10::StreamGuard on_side_stream(impl.getStreamFromGlobalPool(target_.device));
      storage.prepared = prepare_pixels(batch, target_, info_.input_signed);
      storage.prepared_ready = std::make_unique<c10::Event>(target_.device.type());
      storage.prepared_ready->record(impl.getStream(target_.device));
    } else {
      storage.prepared = prepare_pixels(batch, target_, info_.input_signed);
    }
  } catch (const c10::Error& e) {
    storage.forget_prepared();
    throw VaeError(std::string("preparing a batch of ") + std::to_string(batch.size()) + " frames for " +
                      target_.device.str() + " failed: " + e.what_without_backtrace());
  }
}

namespace {

// SplitMix64: decorrelates per-frame seeds derived from (seed, frame index).
uint64_t mix_seed(uint64_t seed, uint64_t index) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (index + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

at::Tensor TorchEncoder::encode_on_device(const FrameBatch& batch, const EncodeParams& params,
                                          EncodeReport& report) {
  at::Tensor pixels;
  if (batch.storage().prepared.defined()) {
    pixels = batch.storage().prepared;
    if (const auto& ready = batch.storage().prepared_ready) {
      // Made on a side stream: the compute stream waits for it, and the
      // caching allocator learns that the compute stream uses its memory.
      c10::impl::VirtualGuardImpl impl(target_.device.type());
      const c10::Stream compute = impl.getStream(target_.device);
      ready->block(compute);
      impl.recordDataPtrOnStream(pixels.storage().data_ptr(), compute);
    }
  } else {
    pixels = prepare_pixels(batch, target_, info_.input_signed);
  }
  std::vector<at::Tensor> means, logvars;
  auto keep = [&](const Moments& m) {
    means.push_back(m.mean.to(at::kFloat));
    if (m.logvar.defined()) logvars.push_back(m.logvar.to(at::kFloat));
  };
  report = run_with_memory_fallback(
      pixels.size(0), sub_batch_,
      [&](int64_t start, int64_t count) { keep(forward(pixels.narrow(0, start, count))); },
      [&](int64_t index) {
        // Mean and log-variance are blended together, then split again.
        const int64_t z = info_.latent_channels;
        auto moments = [&](const at::Tensor& tile) {
          Moments m = forward(tile);
          return m.logvar.defined() ? at::cat({m.mean, m.logvar}, 1) : m.mean;
        };
        at::Tensor blended = encode_tiled(moments, pixels.narrow(0, index, 1), info_.downscale);
        keep({blended.narrow(1, 0, z), blended.size(1) > z ? blended.narrow(1, z, z) : at::Tensor()});
      });
  at::Tensor latents = at::cat(means, 0);
  if (params.sample && logvars.size() == means.size()) {
    // Noise is drawn per frame on the CPU from (seed, frame index), so a
    // sample does not depend on the batch size or the device.
    std::vector<at::Tensor> noise;
    const auto sizes = latents.sizes().slice(1);
    for (uint64_t index : batch.indices()) {
      auto gen = at::detail::createCPUGenerator(mix_seed(params.seed, index));
      noise.push_back(at::randn(sizes, gen, at::TensorOptions().dtype(at::kFloat)));
    }
    at::Tensor eps = at::stack(noise).to(target_.device);
    at::Tensor std = at::exp(0.5f * at::cat(logvars, 0).clamp(-30.0, 20.0));
    latents = latents + std * eps;
  }
  const LatentFormat& lf = params.latent_format;
  if (!lf.is_raw()) latents = (latents - lf.shift) * lf.scale;
  return latents;
}

EncodeReport TorchEncoder::encode_into(const FrameBatch& batch, const EncodeParams& params, at::Tensor host) {
  EncodeReport report{sub_batch_.load(), 0, {}};
  if (batch.empty()) return report;
  use_configured_threads();
  c10::InferenceMode guard;
  try {
    at::Tensor latents = encode_on_device(batch, params, report);
    // One device->host copy per batch; asynchronous into page-locked memory,
    // so wait for it (and everything before it on the stream) here.
    const bool async = host.is_pinned() && target_.device.is_cuda();
    host.narrow(0, 0, latents.numel()).view(latents.sizes()).copy_(latents, /*non_blocking=*/async);
    if (async) {
      c10::impl::VirtualGuardImpl impl(target_.device.type());
      impl.getStream(target_.device).synchronize();
    }
  } catch (const c10::Error& e) {
    throw VaeError(std::string("encoding a batch of ") + std::to_string(batch.size()) + " frames of " +
                      std::to_string(batch.crop().width) + "x" + std::to_string(batch.crop().height) + " on " +
                      target_.device.str() + " failed: " + e.what_without_backtrace());
  }
  return report;
}

EncodeReport TorchEncoder::encode(const FrameBatch& batch, const EncodeParams& params, float* out) {
  const auto floats = static_cast<int64_t>(batch.size() * latent_floats_per_frame(batch));
  return encode_into(batch, params, at::from_blob(out, {floats}, at::TensorOptions().dtype(at::kFloat)));
}

EncodeReport TorchEncoder::encode(const FrameBatch& batch, const EncodeParams& params, LatentBlock& out) {
  const size_t needed = batch.size() * latent_floats_per_frame(batch);
  if (out.floats() < needed)
    throw VaeError("latent block of " + std::to_string(out.floats()) + " floats is too small for " +
                      std::to_string(batch.size()) + " frames (" + std::to_string(needed) + " floats)");
  return encode_into(batch, params, out.storage().values);
}

namespace {
// Host buffers of GPU encoders are page-locked.
bool pinned_host(const EncoderInfo& info) { return info.device.rfind("cuda", 0) == 0; }
}  // namespace

std::unique_ptr<FrameBatch> Encoder::new_batch(PixelFormat format, int width, int height,
                                               size_t capacity) const {
  return std::make_unique<FrameBatch>(format, width, height, info().downscale, capacity, pinned_host(info()));
}

std::unique_ptr<LatentBlock> Encoder::new_latents(const FrameBatch& batch) const {
  return std::make_unique<LatentBlock>(batch.size() * latent_floats_per_frame(batch), pinned_host(info()));
}

size_t Encoder::latent_floats_per_frame(const FrameBatch& batch) const {
  const int d = info().downscale;
  return static_cast<size_t>(info().latent_channels) * (batch.crop().height / d) * (batch.crop().width / d);
}

}  // namespace gstvae
