// The KL autoencoder of Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux.1: the
// encoder (LDM `Encoder` + optional `quant_conv`) and the decoder (optional
// `post_quant_conv` + LDM `Decoder`), sharing one ResnetBlock and one
// attention implementation. The architecture is read from the weights: base
// width, levels and their widths, blocks per level, latent channels and
// quant_conv / post_quant_conv presence.
#include <ATen/ATen.h>
#include <torch/version.h>

#include <sstream>

#include "checkpoint_keys.h"
#include "errors.h"
#include "families.h"
#include "torch_decoder.h"
#include "torch_encoder.h"

namespace gstvae {

namespace {

constexpr int kGroups = 32;
constexpr double kNormEps = 1e-6;
// Released models have 4 levels (downscale 8); more than 8 is not a VAE we know.
constexpr int kMaxLevels = 8;

struct Conv {
  at::Tensor weight, bias;
};
struct Norm {
  at::Tensor weight, bias;
};
// The engine's conv2d (torch_model.h): without this, the overload below would
// hide it and argument-dependent lookup would pick at::conv2d, whose kernel
// for a lone small frame differs from a batch's.
using gstvae::conv2d;

at::Tensor conv2d(const at::Tensor& x, const Conv& c, int64_t stride = 1, int64_t padding = 0) {
  return conv2d(x, c.weight, c.bias, stride, padding);
}

struct ResBlock {
  Norm norm1, norm2;
  Conv conv1, conv2;
  Conv shortcut;  // undefined tensors when in == out
};
struct Level {
  std::vector<ResBlock> blocks;
  Conv downsample;  // undefined on the last level
};
struct Attention {
  Norm norm;
  Conv q, k, v, proj_out;
};

struct Architecture {
  int64_t base = 0;
  std::vector<int64_t> widths;  // per level
  int blocks = 0;
  int64_t z = 0;
  bool quant_conv = false;
};

int count_indices(const NormalizedKeys& keys, const std::string& prefix) {
  int n = 0;
  while (true) {
    const std::string p = prefix + std::to_string(n) + ".";
    bool any = false;
    for (auto it = keys.source.lower_bound(p); it != keys.source.end() && it->first.compare(0, p.size(), p) == 0; ++it)
      any = true;
    if (!any) return n;
    ++n;
  }
}

Conv conv(WeightReader& w, const std::string& name, int64_t out, int64_t in, int64_t k) {
  return {w.get(name + ".weight", {out, in, k, k}), w.get(name + ".bias", {out})};
}
Norm norm(WeightReader& w, const std::string& name, int64_t c) {
  if (c % kGroups != 0)
    throw CheckpointError("'" + w.path() + "': GroupNorm '" + name + "' has " + std::to_string(c) +
                          " channels, not a multiple of " + std::to_string(kGroups) + " groups");
  return {w.get(name + ".weight", {c}), w.get(name + ".bias", {c})};
}
ResBlock resblock(WeightReader& w, const std::string& p, int64_t in, int64_t out) {
  ResBlock b;
  b.norm1 = norm(w, p + ".norm1", in);
  b.conv1 = conv(w, p + ".conv1", out, in, 3);
  b.norm2 = norm(w, p + ".norm2", out);
  b.conv2 = conv(w, p + ".conv2", out, out, 3);
  if (in != out) b.shortcut = conv(w, p + ".nin_shortcut", out, in, 1);
  return b;
}

Attention attention(WeightReader& w, const std::string& p, int64_t c) {
  Attention a;
  a.norm = norm(w, p + ".norm", c);
  a.q = conv(w, p + ".q", c, c, 1);
  a.k = conv(w, p + ".k", c, c, 1);
  a.v = conv(w, p + ".v", c, c, 1);
  a.proj_out = conv(w, p + ".proj_out", c, c, 1);
  return a;
}

at::Tensor norm_silu(const Norm& n, const at::Tensor& x) {
  at::Tensor y = at::group_norm(x, kGroups, n.weight, n.bias, kNormEps);
  return at::silu_(y);
}
at::Tensor resblock_forward(const ResBlock& b, const at::Tensor& x) {
  at::Tensor h = conv2d(norm_silu(b.norm1, x), b.conv1, 1, 1);
  h = conv2d(norm_silu(b.norm2, h), b.conv2, 1, 1);
  // h is a fresh tensor: add the skip in place.
  return h.add_(b.shortcut.weight.defined() ? conv2d(x, b.shortcut) : x);
}
// The two attention products as 1x1 convolutions, one frame at a time.
// Debian's LibTorch has a generic BLAS whose bmm is ~10x slower than
// oneDNN here. For frame b with P = softmax_j(K^T Q):
//   P[j, i] = sum_c k[c, j] q[c, i]  (conv of q by the weight k^T, [hw, c, 1, 1])
//   out[c, i] = sum_j v[c, j] P[j, i]  (conv of P by the weight v, [c, hw, 1, 1])
// so no hw x hw matrix is ever transposed, and memory holds one frame's P.
at::Tensor attention_onednn(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  const int64_t n = q.size(0), c = q.size(1), hh = q.size(2), ww = q.size(3), hw = hh * ww;
  std::vector<at::Tensor> frames;
  frames.reserve(n);
  for (int64_t b = 0; b < n; ++b) {
    at::Tensor kt = k[b].reshape({c, hw}).t().mul(scale).reshape({hw, c, 1, 1});
    at::Tensor p = at::softmax(conv2d(q.narrow(0, b, 1), kt, at::Tensor()), 1);
    frames.push_back(conv2d(p, v[b].reshape({c, hw, 1, 1}), at::Tensor()));
  }
  return at::cat(frames, 0);
}

// Single head over all h*w positions, scale C^-0.5. `sdpa`: the target's
// GSTVAE_SDPA lever (levers.h), in effect only on CUDA.
at::Tensor attention_forward(const Attention& attn, const at::Tensor& x, bool sdpa) {
  const int64_t n = x.size(0), c = x.size(1), hh = x.size(2), ww = x.size(3);
  at::Tensor h = at::group_norm(x, kGroups, attn.norm.weight, attn.norm.bias, kNormEps);
  at::Tensor q = conv2d(h, attn.q), k = conv2d(h, attn.k), v = conv2d(h, attn.v);
  const double scale = 1.0 / std::sqrt(static_cast<double>(c));
  at::Tensor out;
  if (use_onednn(x)) {
    out = attention_onednn(q, k, v, scale);
  } else if (sdpa) {
    // One head of width C over h*w tokens, SDPA's default scale C^-0.5: the
    // fused (flash or memory-efficient) kernel never materialises the hw x hw
    // matrix.
    auto tokens = [&](const at::Tensor& t) { return t.reshape({n, 1, c, hh * ww}).transpose(2, 3); };
    out = at::scaled_dot_product_attention(tokens(q), tokens(k), tokens(v))
              .transpose(2, 3)
              .reshape({n, c, hh, ww});
  } else {
    q = q.reshape({n, c, hh * ww}).transpose(1, 2);
    at::Tensor weights = at::softmax(at::bmm(q, k.reshape({n, c, hh * ww})).mul_(scale), -1);
    out = at::bmm(v.reshape({n, c, hh * ww}), weights.transpose(1, 2)).reshape({n, c, hh, ww});
  }
  return conv2d(out, attn.proj_out).add_(x);
}

class KLEncoder final : public TorchEncoder {
 public:
  KLEncoder(EncoderInfo info, ComputeTarget target) : TorchEncoder(std::move(info), target) {}

  void load(WeightReader& w, const Architecture& arch, const TensorClaim& claim) {
    arch_ = arch;
    conv_in_ = conv(w, "encoder.conv_in", arch.base, 3, 3);
    int64_t in = arch.base;
    for (size_t i = 0; i < arch.widths.size(); ++i) {
      Level level;
      const int64_t out = arch.widths[i];
      const std::string p = "encoder.down." + std::to_string(i);
      for (int j = 0; j < arch.blocks; ++j) {
        level.blocks.push_back(resblock(w, p + ".block." + std::to_string(j), in, out));
        in = out;
      }
      if (i + 1 < arch.widths.size()) level.downsample = conv(w, p + ".downsample.conv", out, out, 3);
      levels_.push_back(std::move(level));
    }
    mid1_ = resblock(w, "encoder.mid.block_1", in, in);
    attn_ = attention(w, "encoder.mid.attn_1", in);
    mid2_ = resblock(w, "encoder.mid.block_2", in, in);
    norm_out_ = norm(w, "encoder.norm_out", in);
    conv_out_ = conv(w, "encoder.conv_out", 2 * arch.z, in, 3);
    if (arch.quant_conv) quant_conv_ = conv(w, "quant_conv", 2 * arch.z, 2 * arch.z, 1);
    w.require_all_used(claim);
    info_.parameters = w.parameters_loaded();
    probe();
  }

 protected:
  Moments forward(const at::Tensor& pixels) override {
    at::Tensor h = conv2d(pixels, conv_in_, 1, 1);
    for (const Level& level : levels_) {
      for (const ResBlock& b : level.blocks) h = resblock_forward(b, h);
      if (level.downsample.weight.defined()) {
        // Asymmetric: zero-pad right and bottom only, then a stride-2 3x3 conv.
        h = at::constant_pad_nd(h, {0, 1, 0, 1}, 0);
        h = conv2d(h, level.downsample, 2, 0);
      }
    }
    h = resblock_forward(mid1_, h);
    h = attention_forward(attn_, h, target_.levers.sdpa);
    h = resblock_forward(mid2_, h);
    h = conv2d(norm_silu(norm_out_, h), conv_out_, 1, 1);
    if (quant_conv_.weight.defined()) h = conv2d(h, quant_conv_);
    auto parts = h.chunk(2, 1);
    return {parts[0], parts[1]};
  }

 private:
  Architecture arch_;
  Conv conv_in_;
  std::vector<Level> levels_;
  ResBlock mid1_, mid2_;
  Attention attn_;
  Norm norm_out_;
  Conv conv_out_, quant_conv_;
};

// What a KL encoder or decoder claims: everything under the VAE's prefix
// (the whole file for a standalone VAE; a full checkpoint's UNet and text
// encoders lie outside it). Left alone on purpose: the other half of the VAE,
// and the loss networks (LPIPS, discriminator) of LDM training checkpoints.
std::string layout_text(const NormalizedKeys& keys) {
  return keys.layout + (keys.prefix.empty() ? "" : " under '" + keys.prefix + "'");
}
TensorClaim encoder_claim(const NormalizedKeys& keys) {
  return {"KL VAE encoder (" + layout_text(keys) + " layout)", keys.prefix,
          {"decoder.*", "post_quant_conv.*", "loss.*"}};
}
TensorClaim decoder_claim(const NormalizedKeys& keys) {
  return {"KL VAE decoder (" + layout_text(keys) + " layout)", keys.prefix,
          {"encoder.*", "quant_conv.*", "loss.*"}};
}

Architecture infer_architecture(const WeightReader& w, const NormalizedKeys& keys) {
  Architecture a;
  const auto conv_in = w.shape("encoder.conv_in.weight");
  if (conv_in.size() != 4 || conv_in[1] != 3)
    throw CheckpointError("'" + w.path() + "': tensor 'encoder.conv_in.weight' has shape " +
                          shape_string(conv_in) + ", expected [C, 3, 3, 3]");
  a.base = conv_in[0];
  const int levels = count_indices(keys, "encoder.down.");
  if (levels == 0) throw CheckpointError("'" + w.path() + "' has no encoder levels ('encoder.down.0.*')");
  if (levels > kMaxLevels)
    throw CheckpointError("'" + w.path() + "' has " + std::to_string(levels) + " encoder levels; at most " +
                          std::to_string(kMaxLevels) + " (a downscale of " + std::to_string(1 << (kMaxLevels - 1)) +
                          ") are supported");
  a.blocks = count_indices(keys, "encoder.down.0.block.");
  if (a.blocks == 0) throw CheckpointError("'" + w.path() + "' has no residual blocks in 'encoder.down.0'");
  for (int i = 0; i < levels; ++i) {
    const std::string name = "encoder.down." + std::to_string(i) + ".block.0.conv1.weight";
    const auto s = w.shape(name);
    if (s.empty())
      throw CheckpointError("'" + w.path() + "': tensor '" + name + "' has no dimensions");
    a.widths.push_back(s[0]);
  }
  const auto conv_out = w.shape("encoder.conv_out.weight");
  if (conv_out.size() != 4 || conv_out[0] % 2 != 0 || conv_out[0] == 0)
    throw CheckpointError("'" + w.path() + "': tensor 'encoder.conv_out.weight' has shape " +
                          shape_string(conv_out) + ", expected [2*z, C, 3, 3]");
  a.z = conv_out[0] / 2;
  a.quant_conv = keys.has("quant_conv.weight");
  return a;
}

bool detect(const SafetensorsFile& file) {
  for (const char* prefix : {"", "first_stage_model.", "vae."}) {
    if (file.find(std::string(prefix) + "encoder.conv_in.weight") &&
        (file.find(std::string(prefix) + "encoder.mid.attn_1.norm.weight") ||
         file.find(std::string(prefix) + "encoder.mid_block.attentions.0.group_norm.weight")))
      return true;
  }
  return false;
}

std::shared_ptr<Encoder> load(std::shared_ptr<const SafetensorsFile> file, const ModelOptions& options) {
  std::vector<std::string> names;
  for (const auto& kv : file->tensors()) names.push_back(kv.first);
  NormalizedKeys keys = normalize_vae_keys(names, file->path());
  ComputeTarget target = resolve_target(options);
  apply_thread_option(options.threads);
  WeightReader reader(file, keys.source, target);
  Architecture arch = infer_architecture(reader, keys);

  EncoderInfo info;
  info.family = "kl";
  info.model_path = file->path();
  info.layout = layout_text(keys);
  info.downscale = 1 << (arch.widths.size() - 1);
  info.latent_channels = static_cast<int>(arch.z);
  info.input_signed = true;
  std::ostringstream os;
  os << "AutoencoderKL encoder: base width " << arch.base << ", levels [";
  for (size_t i = 0; i < arch.widths.size(); ++i) os << (i ? ", " : "") << arch.widths[i];
  os << "], " << arch.blocks << " blocks per level, z=" << arch.z
     << (arch.quant_conv ? ", quant_conv" : ", no quant_conv");
  info.architecture = os.str();

  auto encoder = std::make_shared<KLEncoder>(std::move(info), target);
  encoder->load(reader, arch, encoder_claim(keys));
  return encoder;
}

/* ---------------------------------------------------------------- decoder */

struct DecoderArchitecture {
  std::vector<int64_t> widths;  // per level, level 0 the shallowest (full resolution)
  int blocks = 0;               // ResnetBlocks per level (num_res_blocks + 1 in LDM terms)
  int64_t z = 0;
  bool post_quant_conv = false;
};

class KLDecoder final : public TorchDecoder {
 public:
  KLDecoder(DecoderInfo info, ComputeTarget target) : TorchDecoder(std::move(info), target) {}

  void load(WeightReader& w, const DecoderArchitecture& arch, const TensorClaim& claim) {
    const int64_t deepest = arch.widths.back();
    if (arch.post_quant_conv) post_quant_conv_ = conv(w, "post_quant_conv", arch.z, arch.z, 1);
    conv_in_ = conv(w, "decoder.conv_in", deepest, arch.z, 3);
    mid1_ = resblock(w, "decoder.mid.block_1", deepest, deepest);
    attn_ = attention(w, "decoder.mid.attn_1", deepest);
    mid2_ = resblock(w, "decoder.mid.block_2", deepest, deepest);
    // Stored by level index; run from the deepest level up.
    levels_.resize(arch.widths.size());
    int64_t in = deepest;
    for (size_t i = arch.widths.size(); i-- > 0;) {
      Level& level = levels_[i];
      const int64_t out = arch.widths[i];
      const std::string p = "decoder.up." + std::to_string(i);
      for (int j = 0; j < arch.blocks; ++j) {
        level.blocks.push_back(resblock(w, p + ".block." + std::to_string(j), in, out));
        in = out;
      }
      if (i != 0) level.upsample = conv(w, p + ".upsample.conv", out, out, 3);
    }
    norm_out_ = norm(w, "decoder.norm_out", in);
    conv_out_ = conv(w, "decoder.conv_out", 3, in, 3);
    w.require_all_used(claim);
    info_.parameters = w.parameters_loaded();
    probe();
  }

 protected:
  at::Tensor forward(const at::Tensor& z) override {
    at::Tensor h = post_quant_conv_.weight.defined() ? conv2d(z, post_quant_conv_) : z;
    h = conv2d(h, conv_in_, 1, 1);
    h = resblock_forward(mid1_, h);
    h = attention_forward(attn_, h, target_.levers.sdpa);
    h = resblock_forward(mid2_, h);
    for (size_t i = levels_.size(); i-- > 0;) {
      const Level& level = levels_[i];
      for (const ResBlock& b : level.blocks) h = resblock_forward(b, h);
      if (level.upsample.weight.defined()) {
        // Nearest neighbour x2 (each cell becomes a 2x2 block), then a 3x3 conv.
        h = at::upsample_nearest2d(h, {h.size(2) * 2, h.size(3) * 2});
        h = conv2d(h, level.upsample, 1, 1);
      }
    }
    return conv2d(norm_silu(norm_out_, h), conv_out_, 1, 1);
  }

 private:
  struct Level {
    std::vector<ResBlock> blocks;
    Conv upsample;  // undefined on level 0
  };

  Conv post_quant_conv_, conv_in_;
  ResBlock mid1_, mid2_;
  Attention attn_;
  std::vector<Level> levels_;
  Norm norm_out_;
  Conv conv_out_;
};

DecoderArchitecture infer_decoder_architecture(const WeightReader& w, const NormalizedKeys& keys) {
  DecoderArchitecture a;
  const auto conv_in = w.shape("decoder.conv_in.weight");
  if (conv_in.size() != 4 || conv_in[1] == 0)
    throw CheckpointError("'" + w.path() + "': tensor 'decoder.conv_in.weight' has shape " +
                          shape_string(conv_in) + ", expected [C, z, 3, 3]");
  a.z = conv_in[1];
  const int levels = count_indices(keys, "decoder.up.");
  if (levels == 0) throw CheckpointError("'" + w.path() + "' has no decoder levels ('decoder.up.0.*')");
  if (levels > kMaxLevels)
    throw CheckpointError("'" + w.path() + "' has " + std::to_string(levels) + " decoder levels; at most " +
                          std::to_string(kMaxLevels) + " (an upscale of " + std::to_string(1 << (kMaxLevels - 1)) +
                          ") are supported");
  for (int i = 0; i < levels; ++i) {
    const std::string level = "decoder.up." + std::to_string(i);
    const int blocks = count_indices(keys, level + ".block.");
    if (blocks == 0) throw CheckpointError("'" + w.path() + "' has no residual blocks in '" + level + "'");
    if (i == 0) a.blocks = blocks;
    if (blocks != a.blocks)
      throw CheckpointError("'" + w.path() + "': '" + level + "' has " + std::to_string(blocks) +
                            " residual blocks, 'decoder.up.0' has " + std::to_string(a.blocks) +
                            "; every level must have the same number");
    const std::string name = level + ".block.0.conv1.weight";
    const auto s = w.shape(name);
    if (s.empty()) throw CheckpointError("'" + w.path() + "': tensor '" + name + "' has no dimensions");
    a.widths.push_back(s[0]);
  }
  a.post_quant_conv = keys.has("post_quant_conv.weight");
  return a;
}

bool detect_decoder(const SafetensorsFile& file) {
  for (const char* prefix : {"", "first_stage_model.", "vae."}) {
    const std::string p = prefix;
    if (!file.find(p + "decoder.conv_in.weight")) continue;
    for (const char* attention : {"decoder.mid.attn_1.norm.weight", "decoder.mid.attn_1.q.weight",
                                  "decoder.mid_block.attentions.0.group_norm.weight",
                                  "decoder.mid_block.attentions.0.to_q.weight",
                                  "decoder.mid_block.attentions.0.query.weight"})
      if (file.find(p + attention)) return true;
  }
  return false;
}

std::shared_ptr<Decoder> load_decoder_weights(std::shared_ptr<const SafetensorsFile> file,
                                              const ModelOptions& options) {
  std::vector<std::string> names;
  for (const auto& kv : file->tensors()) names.push_back(kv.first);
  NormalizedKeys keys = normalize_vae_keys(names, file->path(), VaePart::Decoder);
  ComputeTarget target = resolve_target(options);
  apply_thread_option(options.threads);
  WeightReader reader(file, keys.source, target);
  DecoderArchitecture arch = infer_decoder_architecture(reader, keys);

  DecoderInfo info;
  info.family = "kl";
  info.model_path = file->path();
  info.layout = layout_text(keys);
  info.upscale = 1 << (arch.widths.size() - 1);
  info.latent_channels = static_cast<int>(arch.z);
  info.native_format = LatentFormat();  // raw
  info.output_signed = true;
  std::ostringstream os;
  os << "AutoencoderKL decoder: levels [";
  for (size_t i = 0; i < arch.widths.size(); ++i) os << (i ? ", " : "") << arch.widths[i];
  os << "], " << arch.blocks << " blocks per level, z=" << arch.z
     << (arch.post_quant_conv ? ", post_quant_conv" : ", no post_quant_conv");
  info.architecture = os.str();

  auto decoder = std::make_shared<KLDecoder>(std::move(info), target);
  decoder->load(reader, arch, decoder_claim(keys));
  return decoder;
}

}  // namespace

const EncoderFamily kKLFamily = {"kl", detect, load};
const DecoderFamily kKLDecoderFamily = {"kl", detect_decoder, load_decoder_weights};

}  // namespace gstvae
