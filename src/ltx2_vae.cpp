// The LTX-2 video VAE (Lightricks' CausalVideoAutoencoder), encoder side,
// streamed exactly. See ../shared/notes/vae-families-2026.md section 2 and
// docs/video-vaes.md; in short: a 4x4 patchify (3 -> 48 channels, channel
// c*16 + column*4 + row), causal 3x3x3 convolutions whose time padding is two
// copies of the clip's first frame, PixelNorm residual blocks, space-to-depth
// downsamplings with a conv path and an averaging skip path (a time-stride
// block first duplicates the clip's first frame), PixelNorm -> SiLU -> a causal
// conv whose first latent_channels outputs are the mean.
//
// The block list comes from the checkpoint's metadata (`config` -> `vae`):
// implementations disagree on the defaults and the tensor shapes cannot tell
// a time from a space downsampling, so a file without it is refused.
//
// Time is the batch dimension: a chunk of T frames is T x C x H x W, a causal
// conv the sum of three 2-D convs over time-shifted views of [its last 2 input
// frames, this chunk]. Nothing mixes frames other than those convs and the
// time-stride blocks, so the session feeds frame 0 alone and then whole groups
// of (temporal factor) frames, every time-stride block then sees an even count
// (no frame is ever left unpaired inside the network), and any batching gives
// the latents of the official whole-clip forward.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>
#include <map>
#include <set>
#include <sstream>

#include "errors.h"
#include "families.h"
#include "frame_storage.h"
#include "torch_encoder.h"

namespace gstvae {

namespace {

// Latent groups encoded per forward pass at most: bounds the activations of a
// large batch; any number gives the same latents.
constexpr int64_t kMaxGroupsPerPass = 2;
constexpr double kPixelNormEps = 1e-8;  // LTX common/normalization.PixelNorm's default, which the VAE uses
constexpr double kConstantLogVar = -30.0;  // LTX VideoEncoder, latent_log_var "constant"

using gstvae::conv2d;

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

/* ------------------------------------------------------------- configuration */

enum class BlockKind { Res, Down };
struct BlockConfig {
  BlockKind kind = BlockKind::Res;
  std::string name;  // as in the config, for messages
  int layers = 0;          // Res
  int stride_t = 1, stride_s = 1;  // Down
  int multiplier = 2;      // Down
};
enum class LogVar { PerChannel, Uniform, Constant };
enum class Padding { Zeros, Reflect, Replicate };

struct Config {
  std::vector<BlockConfig> blocks;
  int64_t patch = 4;
  LogVar log_var = LogVar::Uniform;
  Padding padding = Padding::Zeros;
  std::string source;  // how each setting was decided, for info.architecture
};

// The `vae` object of the file's `config` metadata, or null when the file has none.
nlohmann::json vae_config(const SafetensorsFile& file) {
  const auto it = file.metadata().find("config");
  if (it == file.metadata().end()) return nullptr;
  nlohmann::json config;
  try {
    config = nlohmann::json::parse(it->second);
  } catch (const std::exception& e) {
    throw CheckpointError("'" + file.path() + "': its 'config' metadata is not JSON: " + e.what());
  }
  if (!config.is_object() || !config.contains("vae") || !config["vae"].is_object())
    throw CheckpointError("'" + file.path() + "': its 'config' metadata has no 'vae' object, which LTX-2 "
                          "checkpoints carry (the VAE's block list and settings)");
  return config["vae"];
}

// Parses what the encoder needs from the `vae` config `vae`; `path` for
// messages. Keys follow LTX model_configurator._prepare_video_encoder_kwargs:
// a nested `encoder` object (CausalDiffusionVAE) or the flat object itself.
Config parse_config(const nlohmann::json& vae, const std::string& path) {
  auto fail = [&](const std::string& what) -> CheckpointError {
    return CheckpointError("'" + path + "': LTX-2 VAE config (metadata config.vae): " + what);
  };
  const bool nested = vae.contains("encoder") && vae["encoder"].is_object();
  const nlohmann::json& enc = nested ? vae["encoder"] : vae;
  auto string_of = [&](const nlohmann::json& o, const char* key) -> std::string {
    if (!o.contains(key)) return "";
    if (!o[key].is_string()) throw fail(std::string("'") + key + "' is not a string");
    return o[key].get<std::string>();
  };
  auto int_of = [&](const nlohmann::json& o, const char* key, int64_t fallback) -> int64_t {
    if (!o.contains(key)) return fallback;
    if (!o[key].is_number_integer()) throw fail(std::string("'") + key + "' is not an integer");
    return o[key].get<int64_t>();
  };
  Config c;
  std::ostringstream source;
  if (vae.contains("_class_name")) {
    const std::string cls = string_of(vae, "_class_name");
    if (cls != "CausalVideoAutoencoder" && cls != "CausalDiffusionVAE")
      throw fail("_class_name '" + cls + "' is not an LTX video VAE (CausalVideoAutoencoder, CausalDiffusionVAE)");
  }
  if (int_of(enc, "dims", int_of(vae, "dims", 3)) != 3)
    throw fail("dims is not 3: the 2-D variant of the encoder is not supported");
  if (int_of(enc, "in_channels", 3) != 3) throw fail("in_channels is not 3: only RGB encoders are supported");
  if (vae.contains("causal_encoder") && !(vae["causal_encoder"].is_boolean() && vae["causal_encoder"].get<bool>()))
    throw fail("causal_encoder is not true: a non-causal encoder cannot be streamed");

  const char* blocks_key = nested && enc.contains("blocks") ? "blocks" : "encoder_blocks";
  if (!enc.contains(blocks_key) || !enc[blocks_key].is_array() || enc[blocks_key].empty())
    throw fail(std::string("no '") + blocks_key +
               "' list: the block list cannot be read off the tensor shapes (a [C/2, C] downsampling conv is "
               "compress_space_res x2 or compress_time_res x1), and implementations default differently");
  for (const auto& b : enc[blocks_key]) {
    if (!b.is_array() || b.size() != 2 || !b[0].is_string())
      throw fail("an entry of '" + std::string(blocks_key) + "' is not [name, parameters]: " + b.dump());
    BlockConfig block;
    block.name = b[0].get<std::string>();
    const nlohmann::json& p = b[1];
    auto param = [&](const char* key, int fallback) -> int {
      if (p.is_number_integer()) return std::string(key) == "num_layers" ? p.get<int>() : fallback;
      if (p.is_object() && p.contains(key)) {
        if (!p[key].is_number_integer() || p[key].get<int>() < 1)
          throw fail("block '" + block.name + "': '" + key + "' is not a positive integer");
        return p[key].get<int>();
      }
      if (!p.is_object()) throw fail("block '" + block.name + "': parameters " + p.dump() + " are not understood");
      return fallback;
    };
    // A parameter this encoder does not read would change the block unseen: refused by name.
    auto only = [&](std::initializer_list<const char*> known) {
      if (!p.is_object()) return;
      for (const auto& [key, value] : p.items()) {
        bool ok = false;
        for (const char* k : known) ok = ok || key == k;
        if (!ok) throw fail("block '" + block.name + "': parameter '" + key + "' is not understood by this encoder");
      }
    };
    if (block.name == "res_x") {
      only({"num_layers"});
      block.kind = BlockKind::Res;
      block.layers = param("num_layers", 0);
      if (block.layers < 1) throw fail("block 'res_x' without num_layers");
    } else if (block.name == "compress_space_res" || block.name == "compress_time_res" ||
               block.name == "compress_all_res") {
      block.kind = BlockKind::Down;
      only({"multiplier"});
      block.stride_t = block.name == "compress_space_res" ? 1 : 2;
      block.stride_s = block.name == "compress_time_res" ? 1 : 2;
      block.multiplier = param("multiplier", 2);
    } else if (block.name == "res_x_y") {
      throw fail("block 'res_x_y' is not supported: its shortcut normalises with GroupNorm over the whole clip "
                 "(statistics across frames), which no stream can reproduce");
    } else if (block.name == "compress_time" || block.name == "compress_space" || block.name == "compress_all" ||
               block.name == "compress_all_x_y" || block.name == "attn") {
      throw fail("block '" + block.name + "' is not implemented by this encoder (LTX-2 uses res_x and "
                 "compress_*_res only)");
    } else {
      throw fail("unknown block '" + block.name + "'");
    }
    c.blocks.push_back(block);
  }

  const std::string norm = string_of(enc, "norm_layer");
  if (norm == "group_norm")
    throw fail("norm_layer 'group_norm' is not supported: GroupNorm takes statistics over all frames of the clip, "
               "so no stream can reproduce it");
  if (!norm.empty() && norm != "pixel_norm") throw fail("unknown norm_layer '" + norm + "'");
  source << "norm " << (norm.empty() ? "pixel_norm (no norm tensors in the file)" : "pixel_norm (config)");

  const std::string log_var = string_of(enc, "latent_log_var");
  if (log_var == "per_channel") c.log_var = LogVar::PerChannel;
  else if (log_var == "uniform") c.log_var = LogVar::Uniform;
  else if (log_var == "constant") c.log_var = LogVar::Constant;
  else if (log_var == "none")
    throw fail("latent_log_var 'none' is not supported (the official encoder then takes half its output "
               "channels as the mean)");
  else if (!log_var.empty()) throw fail("unknown latent_log_var '" + log_var + "'");
  else c.log_var = LogVar::PerChannel;  // checked against conv_out's shape by the loader (2N: unique)

  // The official reader takes `spatial_padding_mode`, then
  // `encoder_spatial_padding_mode`; ComfyUI the latter only: refuse when they
  // disagree. Absent: zeros, every implementation's encoder default.
  const std::string p1 = string_of(enc, "spatial_padding_mode");
  const std::string p2 = string_of(vae, "encoder_spatial_padding_mode");
  if (!nested && !p1.empty() && !p2.empty() && p1 != p2)
    throw fail("spatial_padding_mode '" + p1 + "' and encoder_spatial_padding_mode '" + p2 +
               "' disagree (the official code uses the first for the encoder, ComfyUI the second)");
  const std::string padding = !p1.empty() ? p1 : !p2.empty() ? p2 : "zeros";
  if (padding == "zeros") c.padding = Padding::Zeros;
  else if (padding == "reflect") c.padding = Padding::Reflect;
  else if (padding == "replicate") c.padding = Padding::Replicate;
  else throw fail("spatial padding mode '" + padding + "' is not supported (zeros, reflect, replicate)");
  source << ", padding " << padding << (p1.empty() && p2.empty() ? " (no key: every implementation's default)" : "");

  c.patch = int_of(enc, "patch_size", 0);  // 0: from conv_in's shape
  if (c.patch < 0 || c.patch > 64) throw fail("patch_size " + std::to_string(c.patch) + " is out of range");
  c.source = source.str();
  if (!log_var.empty()) c.source += ", latent_log_var " + log_var;
  return c;
}

/* ------------------------------------------------------------------ layers */

// A causal 3x3x3 convolution: taps[k] applied to frame t - 2 + k.
struct CausalConv {
  std::vector<at::Tensor> taps;
  at::Tensor bias;
  int slot = 0;  // its state slot
};
struct Block {
  BlockConfig config;
  std::vector<std::pair<CausalConv, CausalConv>> res;  // Res: conv1, conv2 per layer
  CausalConv conv;                                      // Down: the conv path
  int64_t in = 0, out = 0, group = 1;                   // Down: channels, skip-path group size
};
struct Network {
  Config config;
  int64_t z = 128;
  CausalConv conv_in, conv_out;
  std::vector<Block> blocks;
  int slots = 0;
  int64_t temporal = 1, spatial = 1;  // downscale factors
};

// A stream's state: per causal conv the last 2 frames of its input (the
// clip's first frame twice before any other), and whether frame 0 was encoded.
struct StreamState {
  std::vector<at::Tensor> history;
  bool started = false;
  void reset(int slots) {
    history.assign(slots, at::Tensor());
    started = false;
  }
  size_t bytes() const {
    size_t n = 0;
    for (const auto& t : history)
      if (t.defined()) n += t.numel() * t.element_size();
    return n;
  }
};

at::Tensor pixel_norm_silu(const at::Tensor& x) {
  at::Tensor y = x * at::rsqrt(x.square().mean({1}, true).add_(kPixelNormEps));
  return at::silu_(y);
}

// Applies `c` to `x` (T x C x H x W) as the frames following `history`, and
// makes `history` the last 2 frames of [history, x]. A clip's first chunk is
// preceded by two copies of its first frame (LTX CausalConv3d), not zeros.
at::Tensor causal_conv(const CausalConv& c, const at::Tensor& x, at::Tensor& history, Padding padding) {
  const int64_t t = x.size(0);
  if (!history.defined()) history = x.narrow(0, 0, 1).expand({2, -1, -1, -1});
  at::Tensor full = at::cat({history, x}, 0);
  int64_t pad = 1;
  if (padding != Padding::Zeros) {
    full = at::pad(full, {1, 1, 1, 1}, padding == Padding::Reflect ? "reflect" : "replicate");
    pad = 0;
  }
  at::Tensor out = conv2d(full.narrow(0, 2, t), c.taps[2], c.bias, 1, pad);
  out.add_(conv2d(full.narrow(0, 1, t), c.taps[1], at::Tensor(), 1, pad));
  out.add_(conv2d(full.narrow(0, 0, t), c.taps[0], at::Tensor(), 1, pad));
  const at::Tensor last = at::cat({history, x.narrow(0, std::max<int64_t>(0, t - 2), std::min<int64_t>(t, 2))}, 0);
  history = last.narrow(0, last.size(0) - 2, 2).clone();
  return out;
}

// (T*st) x C x (H*ss) x (W*ss) -> T x (C*st*ss*ss) x H x W, channel
// c*st*ss*ss + (t offset)*ss*ss + (row offset)*ss + (column offset)
// (einops "b c (d p1) (h p2) (w p3) -> b (c p1 p2 p3) d h w").
at::Tensor space_to_depth(const at::Tensor& x, int64_t st, int64_t ss) {
  const int64_t t = x.size(0) / st, c = x.size(1), h = x.size(2) / ss, w = x.size(3) / ss;
  return x.contiguous()
      .view({t, st, c, h, ss, w, ss})
      .permute({0, 2, 1, 4, 6, 3, 5})
      .reshape({t, c * st * ss * ss, h, w});
}

// LTX SpaceToDepthDownsample. On a clip's first chunk a time-stride block
// duplicates the first frame (so frame 0 pairs with itself); the session's
// chunking (frame 0 alone, then whole groups) gives every later chunk an even
// frame count here.
at::Tensor downsample(const Block& b, at::Tensor x, StreamState& s, Padding padding, at::MemoryFormat format) {
  const int64_t st = b.config.stride_t, ss = b.config.stride_s;
  if (st == 2 && !s.started) x = at::cat({x.narrow(0, 0, 1), x}, 0);
  if (x.size(0) % st != 0)
    throw VaeError("internal: a time-stride block got " + std::to_string(x.size(0)) + " frames");
  const at::Tensor skip = space_to_depth(x, st, ss);
  const at::Tensor skip_mean =
      b.group == 1 ? skip
                   : skip.view({skip.size(0), b.out, b.group, skip.size(2), skip.size(3)}).mean(2);
  const at::Tensor main = space_to_depth(causal_conv(b.conv, x, s.history[b.conv.slot], padding), st, ss);
  return main.add_(skip_mean).contiguous(format);
}

// LTX patchify: p x p space-to-depth, channel c*p*p + column*p + row
// (einops "(c r q)" with q the row offset, r the column offset).
at::Tensor patchify(const at::Tensor& x, int64_t p) {
  if (p == 1) return x;
  const int64_t t = x.size(0), c = x.size(1), h = x.size(2) / p, w = x.size(3) / p;
  return x.contiguous().view({t, c, h, p, w, p}).permute({0, 1, 5, 3, 2, 4}).reshape({t, c * p * p, h, w});
}

// A chunk (frame 0 of a clip alone, or whole groups) -> its latents' raw
// mean and log-variance (float32, L x z x h x w).
std::pair<at::Tensor, at::Tensor> encode_chunk(const Network& net, const at::Tensor& frames, StreamState& s,
                                               at::MemoryFormat format) {
  const Padding padding = net.config.padding;
  const int64_t cell = net.config.patch * net.spatial;
  if (padding == Padding::Reflect && (frames.size(2) < 2 * cell || frames.size(3) < 2 * cell))
    // As in the official code: reflecting one pixel needs two at the deepest level.
    throw VaeError("frames of " + std::to_string(frames.size(3)) + "x" + std::to_string(frames.size(2)) +
                   " are too small for this LTX-2 encoder's reflect padding (its config): it needs at least " +
                   std::to_string(2 * cell) + " pixels per side");
  at::Tensor x = patchify(frames, net.config.patch).contiguous(format);
  x = causal_conv(net.conv_in, x, s.history[net.conv_in.slot], padding);
  for (const Block& b : net.blocks) {
    if (b.config.kind == BlockKind::Res) {
      for (const auto& layer : b.res) {
        at::Tensor h = causal_conv(layer.first, pixel_norm_silu(x), s.history[layer.first.slot], padding);
        h = causal_conv(layer.second, pixel_norm_silu(h), s.history[layer.second.slot], padding);
        x = h.add_(x);
      }
    } else {
      x = downsample(b, x, s, padding, format);
    }
  }
  x = causal_conv(net.conv_out, pixel_norm_silu(x), s.history[net.conv_out.slot], padding).to(at::kFloat);
  const at::Tensor mean = x.narrow(1, 0, net.z).contiguous();
  at::Tensor logvar;
  switch (net.config.log_var) {
    case LogVar::PerChannel: logvar = x.narrow(1, net.z, net.z); break;
    case LogVar::Uniform: logvar = x.narrow(1, net.z, 1).expand_as(mean); break;
    case LogVar::Constant: logvar = at::full_like(mean, kConstantLogVar); break;
  }
  return {mean, logvar.contiguous()};
}

/* ------------------------------------------------------------------ encoder */

class Ltx2Encoder final : public TorchEncoder {
 public:
  Ltx2Encoder(EncoderInfo info, ComputeTarget target, Network net, LatentFormat statistics)
      : TorchEncoder(std::move(info), target), net_(std::move(net)), statistics_(std::move(statistics)) {
    format_ = use_onednn(at::empty({0}, at::TensorOptions().device(target_.device).dtype(target_.dtype)))
                  ? at::MemoryFormat::ChannelsLast
                  : activation_format(target_);
    probe();
  }

  EncodeReport encode(const FrameBatch&, const EncodeParams&, float*) override { refuse(); }
  EncodeReport encode(const FrameBatch&, const EncodeParams&, LatentBlock&) override { refuse(); }
  std::unique_ptr<EncodeSession> open_session() override;

  std::pair<at::Tensor, at::Tensor> run(const at::Tensor& frames, StreamState& s) {
    return encode_chunk(net_, frames, s, format_);
  }
  const Network& network() const { return net_; }
  at::Tensor pixels(const FrameBatch& batch) const { return batch_pixels(batch); }
  // `f` with the checkpoint's statistics filled in when it asks for them (ltx2).
  const LatentFormat& resolve(const LatentFormat& f) const { return f.from_model ? statistics_ : f; }

 protected:
  // Each frame as a clip of its own (frame 0 = the image encode): probe() only.
  Moments forward(const at::Tensor& probe_pixels) override {
    // probe() passes one latent cell; reflect padding needs two per side.
    const at::Tensor pixels =
        net_.config.padding == Padding::Reflect ? probe_pixels.repeat({1, 1, 2, 2}) : probe_pixels;
    std::vector<at::Tensor> means, logvars;
    for (int64_t i = 0; i < pixels.size(0); ++i) {
      StreamState s;
      s.reset(net_.slots);
      auto m = encode_chunk(net_, pixels.narrow(0, i, 1), s, format_);
      means.push_back(m.first);
      logvars.push_back(m.second);
    }
    return {at::cat(means, 0), at::cat(logvars, 0)};
  }

 private:
  [[noreturn]] void refuse() const {
    throw VaeError("'" + info_.model_path + "' is a video VAE (" + info_.family +
                   "): its latents depend on the frames before them, so it encodes streams through a session "
                   "(Encoder::open_session), which regroups frames into its chunks");
  }

  Network net_;
  LatentFormat statistics_;
  at::MemoryFormat format_;
};

/* ------------------------------------------------------------------ session */

// The same protocol as the Wan session (wan_vae.cpp): frame 0 of a clip alone,
// then whole groups of net.temporal frames, the rest held for the next batch.
class Ltx2Session final : public EncodeSession {
 public:
  explicit Ltx2Session(std::shared_ptr<Ltx2Encoder> encoder)
      : encoder_(std::move(encoder)), group_(encoder_->network().temporal) {
    reset();
  }

  void reset() override {
    state_.reset(encoder_->network().slots);
    held_ = at::Tensor();
    held_indices_.clear();
  }
  size_t held_frames() const override { return held_indices_.size(); }
  size_t state_bytes() const override {
    return state_.bytes() + (held_.defined() ? held_.numel() * held_.element_size() : 0);
  }

  BatchResult encode(const FrameBatch& batch, const EncodeParams& params, LatentBlock& out) override {
    use_configured_threads();
    c10::InferenceMode guard;
    BatchResult result;
    result.report.sub_batch = kMaxGroupsPerPass * group_;
    std::vector<at::Tensor> means, logvars;
    try {
      const LatentFormat& format = encoder_->resolve(params.latent_format);
      at::Tensor frames = held_;
      std::vector<uint64_t> indices = held_indices_;
      if (!batch.empty()) {
        const at::Tensor pixels = encoder_->pixels(batch);
        if (frames.defined() && frames.sizes().slice(1).vec() != pixels.sizes().slice(1).vec())
          throw VaeError("frames of " + std::to_string(pixels.size(3)) + "x" + std::to_string(pixels.size(2)) +
                         " follow frames of " + std::to_string(frames.size(3)) + "x" +
                         std::to_string(frames.size(2)) + " in one clip");
        frames = frames.defined() ? at::cat({frames, pixels}, 0) : pixels;
        indices.insert(indices.end(), batch.indices().begin(), batch.indices().end());
      }
      int64_t used = 0;
      const int64_t available = static_cast<int64_t>(indices.size());
      auto run = [&](const at::Tensor& chunk, uint32_t frames_per_latent, uint32_t real) {
        auto m = encoder_->run(chunk, state_);
        means.push_back(m.first);
        logvars.push_back(m.second);
        for (int64_t i = 0; i < chunk.size(0); i += frames_per_latent)
          result.spans.push_back({indices[used + i], std::min<uint32_t>(frames_per_latent, real - i)});
        used += real;
      };
      if (!state_.started && available > 0) {
        run(frames.narrow(0, 0, 1), 1, 1);  // frame 0 alone: latent 0 goes out at once
        state_.started = true;
      }
      while (available - used >= group_) {
        const int64_t groups = std::min<int64_t>((available - used) / group_, kMaxGroupsPerPass);
        run(frames.narrow(0, used, groups * group_), static_cast<uint32_t>(group_),
            static_cast<uint32_t>(groups * group_));
      }
      const int64_t rest = available - used;
      if (params.end_of_clip && rest > 0) {
        if (params.pad_clip_end) {
          // Complete the group by repeating its last frame: one latent no reference gives.
          const at::Tensor last = frames.narrow(0, available - 1, 1);
          run(at::cat({frames.narrow(0, used, rest), last.expand({group_ - rest, -1, -1, -1})}, 0),
              static_cast<uint32_t>(group_), static_cast<uint32_t>(rest));
          result.padded_frames = static_cast<uint32_t>(group_ - rest);
        } else {
          result.dropped = {indices[used], static_cast<uint32_t>(rest)};
          used = available;
        }
      }
      if (params.end_of_clip) {
        reset();
      } else {
        held_ = rest > 0 ? frames.narrow(0, used, rest).clone() : at::Tensor();
        held_indices_.assign(indices.begin() + used, indices.end());
      }
      if (!means.empty()) write(result, means, logvars, params, format, out);
    } catch (const c10::Error& e) {
      reset();
      throw VaeError(std::string("encoding a batch of ") + std::to_string(batch.size()) + " frames with " +
                     encoder_->info().family + " on " + encoder_->info().device +
                     " failed: " + e.what_without_backtrace());
    } catch (...) {
      reset();
      throw;
    }
    return result;
  }

 private:
  void write(const BatchResult& result, const std::vector<at::Tensor>& means, const std::vector<at::Tensor>& logvars,
             const EncodeParams& params, const LatentFormat& format, LatentBlock& out) {
    at::Tensor latents = at::cat(means, 0);
    if (params.sample) {
      // Noise per latent, from (seed, the latent's first frame index).
      std::vector<at::Tensor> noise;
      for (const Span& span : result.spans) noise.push_back(frame_noise(params.seed, span.first, latents.sizes().slice(1)));
      const at::Tensor std = at::exp(0.5f * at::cat(logvars, 0).clamp(-30.0, 20.0));
      latents = latents + std * at::stack(noise).to(latents.device());
    }
    latents = raw_to_format(latents, format);
    const size_t needed = static_cast<size_t>(latents.numel());
    if (out.floats() < needed)
      throw VaeError("latent block of " + std::to_string(out.floats()) + " floats is too small for " +
                     std::to_string(result.spans.size()) + " latents (" + std::to_string(needed) + " floats)");
    const bool async = out.pinned() && latents.is_cuda();
    out.storage().values.narrow(0, 0, latents.numel()).view(latents.sizes()).copy_(latents, async);
    if (async) {
      c10::impl::VirtualGuardImpl impl(latents.device().type());
      impl.getStream(latents.device()).synchronize();
    }
  }

  std::shared_ptr<Ltx2Encoder> encoder_;
  const int64_t group_;
  StreamState state_;
  at::Tensor held_;  // the frames of the incomplete group, prepared
  std::vector<uint64_t> held_indices_;
};

std::unique_ptr<EncodeSession> Ltx2Encoder::open_session() {
  return std::make_unique<Ltx2Session>(std::static_pointer_cast<Ltx2Encoder>(shared_from_this()));
}

/* ------------------------------------------------------------------ loading */

// The prefix of the encoder's tensors: "vae." (official single-file
// checkpoints) or "" (ComfyUI's split VAE files), or null when the file has no
// LTX video encoder: its conv_in is a CausalConv3d (`.conv.weight`, 5-D).
const char* encoder_prefix(const SafetensorsFile& file) {
  for (const char* prefix : {"vae.", ""}) {
    const TensorInfo* t = file.find(std::string(prefix) + "encoder.conv_in.conv.weight");
    if (t && t->shape.size() == 5) return prefix;
  }
  return nullptr;
}

// A small vector of the file's values as float64 (statistics), whatever their float dtype.
std::vector<double> read_vector(const SafetensorsFile& file, const std::string& name, int64_t n) {
  const TensorInfo* t = file.find(name);
  if (!t) throw CheckpointError("'" + file.path() + "' lacks the LTX-2 latent statistics tensor '" + name + "'");
  if (t->shape != std::vector<int64_t>{n})
    throw CheckpointError("'" + file.path() + "': tensor '" + name + "' has shape " + shape_string(t->shape) +
                          ", expected [" + std::to_string(n) + "]");
  at::ScalarType type;
  switch (t->dtype) {
    case DType::F64: type = at::kDouble; break;
    case DType::F32: type = at::kFloat; break;
    case DType::F16: type = at::kHalf; break;
    case DType::BF16: type = at::kBFloat16; break;
    default:
      throw CheckpointError("'" + file.path() + "': tensor '" + name + "' has dtype " + dtype_name(t->dtype) +
                            "; expected a float type");
  }
  at::Tensor host = at::empty({n}, at::TensorOptions().dtype(type));
  std::memcpy(host.data_ptr(), file.data(*t), t->nbytes);
  host = host.to(at::kDouble);
  return std::vector<double>(host.data_ptr<double>(), host.data_ptr<double>() + n);
}

bool detect(const SafetensorsFile& file) { return encoder_prefix(file) != nullptr; }

std::shared_ptr<Encoder> load(std::shared_ptr<const SafetensorsFile> file, const ModelOptions& options) {
  const std::string& path = file->path();
  // Loaders are also called without detect() (tests force every family on every file).
  const char* found = encoder_prefix(*file);
  if (!found)
    throw CheckpointError("'" + path + "' is not an LTX video VAE encoder: no 5-D 'encoder.conv_in.conv.weight' "
                          "(nor under 'vae.')");
  const std::string prefix = found;
  const nlohmann::json vae = vae_config(*file);
  if (vae.is_null())
    throw CheckpointError("'" + path + "' holds an LTX video VAE encoder but no 'config' metadata: its block list "
                          "cannot be read off the tensor shapes (a [C/2, C] downsampling conv is compress_space_res "
                          "x2 or compress_time_res x1) and the official code and ComfyUI default differently, so "
                          "it is refused; use a checkpoint that keeps its metadata");
  Network net;
  net.config = parse_config(vae, path);

  // Encoder and statistics tensors by name without the prefix: which were
  // used is checked at the end.
  std::map<std::string, std::string> names;
  for (const auto& kv : file->tensors())
    if (starts_with(kv.first, prefix + "encoder.") || starts_with(kv.first, prefix + "per_channel_statistics."))
      names.emplace(kv.first.substr(prefix.size()), kv.first);
  auto shape_of = [&](const std::string& name) -> std::vector<int64_t> {
    const auto it = names.find(name);
    if (it == names.end()) throw CheckpointError("'" + path + "' lacks the LTX-2 encoder's tensor '" + prefix + name + "'");
    return file->find(it->second)->shape;
  };
  for (const char* norm : {"encoder.conv_norm_out.weight", "encoder.down_blocks.0.res_blocks.0.norm1.weight"})
    if (names.count(norm))
      throw CheckpointError("'" + path + "': tensor '" + prefix + norm +
                            "' belongs to a GroupNorm encoder, which is not supported (statistics across frames)");

  const std::vector<int64_t> conv_in = shape_of("encoder.conv_in.conv.weight");
  net.z = conv_in[0];  // the base width equals the latent width (LTX VideoEncoder)
  if (net.config.patch == 0) {
    // Not in the config: conv_in takes 3 * patch^2 channels, which fixes it.
    const int64_t p = static_cast<int64_t>(std::lround(std::sqrt(conv_in[1] / 3.0)));
    if (p < 1 || 3 * p * p != conv_in[1])
      throw CheckpointError("'" + path + "': encoder.conv_in takes " + std::to_string(conv_in[1]) +
                            " channels, not 3 x patch^2");
    net.config.patch = p;
    net.config.source += ", patch_size from conv_in's shape";
  }
  if (conv_in[1] != 3 * net.config.patch * net.config.patch)
    throw CheckpointError("'" + path + "': encoder.conv_in takes " + std::to_string(conv_in[1]) +
                          " channels, but patch_size " + std::to_string(net.config.patch) + " gives " +
                          std::to_string(3 * net.config.patch * net.config.patch));
  if (vae.contains("latent_channels") && vae["latent_channels"].is_number_integer() &&
      vae["latent_channels"].get<int64_t>() != net.z)
    throw CheckpointError("'" + path + "': config latent_channels " + vae["latent_channels"].dump() +
                          " but encoder.conv_in gives " + std::to_string(net.z) + " channels");

  const ComputeTarget target = resolve_target(options);
  apply_thread_option(options.threads);
  WeightReader reader(file, names, target);
  std::set<std::string> used;
  auto causal = [&](const std::string& name, int64_t out, int64_t in) {
    const at::Tensor w = reader.get(name + ".conv.weight", {out, in, 3, 3, 3});
    CausalConv c;
    for (int64_t i = 0; i < 3; ++i) c.taps.push_back(w.select(2, i).contiguous());
    c.bias = reader.get(name + ".conv.bias", {out});
    c.slot = net.slots++;
    used.insert(name + ".conv.weight");
    used.insert(name + ".conv.bias");
    return c;
  };
  net.conv_in = causal("encoder.conv_in", net.z, conv_in[1]);
  int64_t width = net.z;
  std::ostringstream arch;
  for (size_t i = 0; i < net.config.blocks.size(); ++i) {
    Block b;
    b.config = net.config.blocks[i];
    const std::string name = "encoder.down_blocks." + std::to_string(i);
    if (b.config.kind == BlockKind::Res) {
      for (int j = 0; j < b.config.layers; ++j) {
        const std::string layer = name + ".res_blocks." + std::to_string(j);
        CausalConv c1 = causal(layer + ".conv1", width, width);
        CausalConv c2 = causal(layer + ".conv2", width, width);
        b.res.emplace_back(std::move(c1), std::move(c2));
      }
      arch << " res_x " << b.config.layers << "@" << width;
    } else {
      const int64_t factor = b.config.stride_t * b.config.stride_s * b.config.stride_s;
      b.in = width;
      b.out = width * b.config.multiplier;
      if (b.out % factor != 0 || (b.in * factor) % b.out != 0)
        throw CheckpointError("'" + path + "': block " + std::to_string(i) + " (" + b.config.name + " x" +
                              std::to_string(b.config.multiplier) + ") cannot go from " + std::to_string(b.in) +
                              " to " + std::to_string(b.out) + " channels");
      b.group = b.in * factor / b.out;
      b.conv = causal(name + ".conv", b.out / factor, b.in);
      width = b.out;
      net.temporal *= b.config.stride_t;
      net.spatial *= b.config.stride_s;
      arch << " " << b.config.name << "->" << width;
    }
    net.blocks.push_back(std::move(b));
  }
  const int64_t out_channels = shape_of("encoder.conv_out.conv.weight").at(0);
  const int64_t expected_out = net.config.log_var == LogVar::PerChannel ? 2 * net.z : net.z + 1;
  if (out_channels != expected_out) {
    const bool no_key = net.config.source.find("latent_log_var") == std::string::npos;
    throw CheckpointError("'" + path + "': encoder.conv_out gives " + std::to_string(out_channels) + " channels; " +
                          (no_key ? "the config has no latent_log_var and " + std::to_string(out_channels) +
                                        " channels do not fix it (" + std::to_string(net.z + 1) +
                                        " is 'uniform' or 'constant')"
                                  : "expected " + std::to_string(expected_out) + " for its latent_log_var"));
  }
  net.conv_out = causal("encoder.conv_out", out_channels, width);
  for (const auto& kv : names)
    if (starts_with(kv.first, "encoder.") && !used.count(kv.first))
      throw CheckpointError("'" + path + "': tensor '" + kv.second + "' is not part of the encoder the config "
                            "describes (" + std::to_string(net.config.blocks.size()) + " blocks)");

  // The normalisation ComfyUI's LATENT and the official encode apply:
  // (mean - mean-of-means) / std-of-means. The file's other statistics
  // (mean-of-stds, mean-of-stds_over_std-of-means, channel) are not used.
  LatentFormat statistics;
  statistics.name = "ltx2";
  statistics.from_model = true;
  const std::string stats = prefix + "per_channel_statistics.";
  // Through the reader too (shape check, counted as used), then in float64:
  // the reader would round them to the compute precision.
  for (const char* s : {"mean-of-means", "std-of-means"}) reader.get(std::string("per_channel_statistics.") + s, {net.z});
  const std::vector<double> mean = read_vector(*file, stats + "mean-of-means", net.z);
  const std::vector<double> std = read_vector(*file, stats + "std-of-means", net.z);
  // Everything else under the prefix must have been read, except the
  // decoder and the statistics the encoder does not use (an official
  // single file's transformer, audio VAE etc. live outside 'vae.').
  const std::string layout = prefix.empty() ? "comfyui (split VAE)" : "official (under 'vae.')";
  reader.require_all_used({"LTX-2 video VAE encoder (" + layout + " layout)", prefix,
                           {"decoder.*", "per_channel_statistics.mean-of-stds",
                            "per_channel_statistics.mean-of-stds_over_std-of-means",
                            "per_channel_statistics.channel"}});
  for (int64_t c = 0; c < net.z; ++c) {
    if (!(std[c] > 0) || !std::isfinite(std[c]) || !std::isfinite(mean[c]))
      throw CheckpointError("'" + path + "': '" + stats + "std-of-means' or 'mean-of-means' channel " +
                            std::to_string(c) + " is not a finite positive standard deviation / finite mean");
    statistics.shifts.push_back(mean[c]);
    statistics.scales.push_back(1.0 / std[c]);
  }

  EncoderInfo info;
  info.family = "ltx2";
  info.model_path = path;
  info.layout = layout;
  info.downscale = static_cast<int>(net.spatial * net.config.patch);
  info.temporal_downscale = static_cast<int>(net.temporal);
  info.latent_channels = static_cast<int>(net.z);
  info.input_signed = true;
  info.native_format = LatentFormat();  // the forward pass gives the raw mean
  info.default_latent_format = "ltx2";   // ComfyUI's LATENT and the official encode: normalised
  info.parameters = reader.parameters_loaded();
  std::ostringstream os;
  os << "LTX-2 video VAE encoder, patch " << net.config.patch << ", blocks" << arch.str() << ", z=" << net.z
     << ", downscale " << info.downscale << "x" << info.downscale << " and " << net.temporal << " in time; "
     << net.config.source;
  info.architecture = os.str();
  return std::make_shared<Ltx2Encoder>(std::move(info), target, std::move(net), std::move(statistics));
}

}  // namespace

const EncoderFamily kLtx2EncoderFamily = {"ltx2", detect, load};

}  // namespace gstvae
