// The causal video VAEs of Wan: Wan 2.1 (also Wan 2.2 A14B and Qwen-Image)
// and Wan 2.2 (TI2V-5B), encoder side, streamed exactly. See
// ../shared/notes/video-vae-semantics.md for the architecture; in short:
// RMS-normalised residual blocks of causal 3x3x3 convolutions, spatial
// downsampling after levels 0-2 and temporal downsampling (by 2) after levels
// 1 and 2, per-frame attention in the middle, and a 1x1x1 conv whose first z
// channels are the latent mean. Wan 2.2 adds a 2x2 patchify in front and
// parameter-free averaging shortcuts around each level.
//
// Time is the batch dimension here: a chunk of T frames is a T x C x H x W
// tensor, and a causal 3-tap convolution is the sum of three 2-D
// convolutions over time-shifted views of [the last 2 input frames of the
// previous chunk, this chunk]. The official encode cuts a clip into frame 0
// alone and then groups of 4; every layer's state (2 frames per causal conv,
// 1 frame per temporal downsampling) lives in the session, so a stream cut
// into batches in any way gives the latents of the whole-clip encode.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <cmath>
#include <cstring>
#include <map>
#include <sstream>

#include "errors.h"
#include "families.h"
#include "frame_storage.h"
#include "torch_decoder.h"
#include "torch_encoder.h"

namespace gstvae {

namespace {

constexpr int kLevels = 4;
constexpr int kBlocksPerLevel = 2;    // encoder
constexpr int kUpBlocksPerLevel = 3;  // decoder
constexpr int kFramesPerLatent = 4;
// Latent groups encoded per forward pass at most: bounds the activations of a
// large batch; any number gives the same latents.
constexpr int64_t kMaxGroupsPerPass = 4;
// Attention scores of one block of queries, in elements (128 MiB in fp32).
constexpr int64_t kMaxScoreElements = int64_t(32) << 20;
constexpr double kNormEps = 1e-12;

using gstvae::conv2d;

/* ---------------------------------------------------------- checkpoint keys */

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

bool all_digits(const std::string& s) {
  if (s.empty()) return false;
  for (char c : s)
    if (c < '0' || c > '9') return false;
  return true;
}

std::vector<std::string> split_dots(const std::string& s) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (;;) {
    const size_t dot = s.find('.', start);
    parts.push_back(s.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
    if (dot == std::string::npos) return parts;
    start = dot + 1;
  }
}

std::string join_dots(const std::vector<std::string>& parts, size_t from) {
  std::string s;
  for (size_t i = from; i < parts.size(); ++i) s += (i == from ? "" : ".") + parts[i];
  return s;
}

// Names inside a residual block, diffusers -> official.
std::string official_block_tail(const std::string& tail) {
  static const std::pair<const char*, const char*> kRenames[] = {
      {"norm1.", "residual.0."}, {"conv1.", "residual.2."}, {"norm2.", "residual.3."},
      {"conv2.", "residual.6."}, {"conv_shortcut.", "shortcut."},
  };
  for (const auto& r : kRenames)
    if (starts_with(tail, r.first)) return r.second + tail.substr(std::strlen(r.first));
  return tail;
}

// The diffusers names both halves share (`half` "encoder" or "decoder"):
// conv_in, norm_out, conv_out, the middle, and the half's VAE-level 1x1x1
// conv (quant_conv = conv1, post_quant_conv = conv2). True when `name` is
// one of them, with *official its official name ("" for a malformed one).
bool official_shared_name(const std::string& name, const std::string& half, const char* vae_conv,
                          const char* vae_conv_official, bool* diffusers, std::string* official) {
  const std::pair<std::string, std::string> top[] = {
      {half + ".conv_in.", half + ".conv1."}, {half + ".norm_out.", half + ".head.0."},
      {half + ".conv_out.", half + ".head.2."}, {vae_conv, vae_conv_official},
      {half + ".mid_block.attentions.0.", half + ".middle.1."},
  };
  for (const auto& r : top)
    if (starts_with(name, r.first)) {
      *diffusers = true;
      *official = r.second + name.substr(r.first.size());
      return true;
    }
  if (!starts_with(name, half + ".mid_block.resnets.")) return false;
  *diffusers = true;
  const std::vector<std::string> p = split_dots(name);  // half mid_block resnets J tail...
  *official = p.size() < 5 || (p[3] != "0" && p[3] != "1")
                  ? ""
                  : half + ".middle." + (p[3] == "0" ? "0." : "2.") + official_block_tail(join_dots(p, 4));
  return true;
}

// One encoder-side name (prefix removed) in the official naming, or "" when
// it is not part of the encoder. Official and ComfyUI names pass unchanged.
std::string official_encoder_name(const std::string& name, bool* diffusers) {
  std::string official;
  if (official_shared_name(name, "encoder", "quant_conv.", "conv1.", diffusers, &official)) return official;
  if (starts_with(name, "encoder.down_blocks.")) {
    *diffusers = true;
    const std::vector<std::string> p = split_dots(name);  // encoder down_blocks I ...
    if (p.size() < 5 || !all_digits(p[2])) return "";
    const std::string level = "encoder.downsamples." + p[2] + ".";
    if (p[3] == "resnets" && p.size() >= 6 && all_digits(p[4]))  // Wan 2.2: nested levels
      return level + "downsamples." + p[4] + "." + official_block_tail(join_dots(p, 5));
    if (p[3] == "downsampler")  // Wan 2.2: the level's Resample follows its blocks
      return level + "downsamples." + std::to_string(kBlocksPerLevel) + "." + join_dots(p, 4);
    return level + official_block_tail(join_dots(p, 3));  // Wan 2.1: the flat list
  }
  if (starts_with(name, "encoder.") || starts_with(name, "conv1.")) return name;
  return "";
}

// The decoder's counterpart. diffusers groups the decoder's flat list
// (Wan 2.1: `upsamples.{k}`) as `up_blocks.{k div 4}.resnets.{k mod 4}` and
// `.upsamplers.0`; Wan 2.2's nested `upsamples.{i}.upsamples.{j}` becomes
// `up_blocks.{i}.resnets.{j}` and `.upsampler`. `nested`: the file is Wan
// 2.2's (its last level alone cannot tell).
std::string official_decoder_name(const std::string& name, bool nested, bool* diffusers) {
  std::string official;
  if (official_shared_name(name, "decoder", "post_quant_conv.", "conv2.", diffusers, &official)) return official;
  if (starts_with(name, "decoder.up_blocks.")) {
    *diffusers = true;
    const std::vector<std::string> p = split_dots(name);  // decoder up_blocks I ...
    if (p.size() < 5 || !all_digits(p[2]) || p[2].size() > 4) return "";
    const int level = std::stoi(p[2]);
    const int stride = kUpBlocksPerLevel + 1;  // the blocks, then the Resample
    if (p[3] == "resnets" && p.size() >= 6 && all_digits(p[4]) && p[4].size() <= 4) {
      const std::string tail = official_block_tail(join_dots(p, 5));
      return nested ? "decoder.upsamples." + p[2] + ".upsamples." + p[4] + "." + tail
                    : "decoder.upsamples." + std::to_string(level * stride + std::stoi(p[4])) + "." + tail;
    }
    if (p[3] == "upsampler" && nested)
      return "decoder.upsamples." + p[2] + ".upsamples." + std::to_string(kUpBlocksPerLevel) + "." + join_dots(p, 4);
    if (p[3] == "upsamplers" && p[4] == "0" && p.size() >= 6 && !nested)
      return "decoder.upsamples." + std::to_string(level * stride + kUpBlocksPerLevel) + "." + join_dots(p, 5);
    return "";
  }
  if (starts_with(name, "decoder.") || starts_with(name, "conv2.")) return name;
  return "";
}

struct WanKeys {
  std::string prefix;  // "" or "vae."
  bool diffusers = false;
  std::map<std::string, std::string> source;  // official name -> name in the file
};

// The prefix ("" or "vae.") of a Wan encoder (`half` "encoder") or decoder
// ("decoder"), or null: its first conv is 5-D, image VAEs' conv_in 4-D.
const char* half_prefix(const SafetensorsFile& file, const std::string& half) {
  for (const char* prefix : {"", "vae."})
    for (const char* conv : {".conv1.weight", ".conv_in.weight"}) {
      const TensorInfo* t = file.find(std::string(prefix) + half + conv);
      if (t && t->shape.size() == 5) return prefix;
    }
  return nullptr;
}
const char* encoder_prefix(const SafetensorsFile& file) { return half_prefix(file, "encoder"); }
const char* decoder_prefix(const SafetensorsFile& file) { return half_prefix(file, "decoder"); }

// Both halves' tensors under `prefix`, by official name. A null `prefix` (no
// 5-D first conv of `half`: loaders are also called without detect()) is an error.
WanKeys normalize_keys(const SafetensorsFile& file, const char* prefix, const char* half) {
  if (!prefix)
    throw CheckpointError("'" + file.path() + "' is not a Wan VAE " + half + ": no 5-D '" + half + ".conv1.weight' or '" +
                          half + ".conv_in.weight' (nor under 'vae.')");
  WanKeys keys;
  keys.prefix = prefix;
  bool nested = false;  // a diffusers Wan 2.2 decoder
  for (const auto& kv : file.tensors())
    nested = nested || (starts_with(kv.first, keys.prefix + "decoder.up_blocks.") &&
                        kv.first.find(".upsampler.") != std::string::npos);
  for (const auto& kv : file.tensors()) {
    if (!starts_with(kv.first, keys.prefix)) continue;
    bool diffusers = false;
    const std::string name = kv.first.substr(keys.prefix.size());
    std::string official = official_encoder_name(name, &diffusers);
    if (official.empty()) official = official_decoder_name(name, nested, &diffusers);
    if (official.empty()) continue;
    keys.diffusers = keys.diffusers || diffusers;
    auto [it, inserted] = keys.source.emplace(official, kv.first);
    if (!inserted)
      throw CheckpointError("'" + file.path() + "': tensors '" + it->second + "' and '" + kv.first +
                            "' are both the Wan VAE's '" + official + "'");
  }
  return keys;
}

// A Wan encoder or decoder claims everything under its prefix and leaves the
// other half alone on purpose: official `decoder.*` + `conv2.*` (the
// decoder's 1x1 conv) or diffusers `decoder.*` + `post_quant_conv.*` for the
// encoder, and the mirror for the decoder.
TensorClaim wan_claim(const WanKeys& keys, bool decoder) {
  const std::string layout = std::string(keys.diffusers ? "diffusers" : "official") +
                             (keys.prefix.empty() ? "" : " under '" + keys.prefix + "'");
  if (decoder)
    return {"Wan VAE decoder (" + layout + " layout)", keys.prefix, {"encoder.*", "conv1.*", "quant_conv.*"}};
  return {"Wan VAE encoder (" + layout + " layout)", keys.prefix, {"decoder.*", "conv2.*", "post_quant_conv.*"}};
}

/* ------------------------------------------------------------------ layers */

// A causal convolution: `taps` 2-D kernels, taps[k] applied to frame t - (K-1) + k.
struct CausalConv {
  std::vector<at::Tensor> taps;
  at::Tensor bias;
  int64_t padding = 1;
};
struct Conv2 {
  at::Tensor weight, bias;
};
struct ResBlock {
  at::Tensor gamma1, gamma2;  // C x 1 x 1 (sqrt(C) folded in)
  CausalConv conv1, conv2;
  Conv2 shortcut;  // undefined when in == out
  int slot1 = 0, slot2 = 0;  // state slots of conv1, conv2
};
struct Resample {
  bool present = false;
  bool temporal = false;
  Conv2 spatial;       // 3x3 stride 2 after a right/bottom zero pad
  CausalConv time;     // 3 taps of 1x1, stride 2 in time
  int slot = 0;        // state slot of the temporal step
};
struct Level {
  std::vector<ResBlock> blocks;
  Resample resample;
  int64_t out = 0;  // channels
  bool average_shortcut = false;  // Wan 2.2
};
struct Attention {
  at::Tensor gamma;
  Conv2 qkv, proj;
};

struct Network {
  bool wan22 = false;
  int64_t in_channels = 3;  // after patchify for Wan 2.2
  int64_t z = 16;
  CausalConv conv_in;
  int conv_in_slot = 0;
  std::vector<Level> levels;
  ResBlock mid1, mid2;
  Attention attention;
  at::Tensor head_gamma;
  CausalConv head;
  int head_slot = 0;
  Conv2 moments;  // the VAE-level conv1: 2z -> 2z, 1x1x1
  int slots = 0;  // causal-conv states
  int time_slots = 0;  // temporal-downsampling states
};

// A stream's state: for each causal conv the last (up to) 2 frames of its
// input (fewer at the start of a clip: the missing ones are zeros), for each
// temporal downsampling the last frame of its input; plus whether frame 0
// has been encoded.
struct StreamState {
  std::vector<at::Tensor> history;  // per slot: k x C x H x W, k <= 2, or undefined
  std::vector<at::Tensor> last;     // per time slot: 1 x C x H x W, or undefined
  bool started = false;

  void reset(int slots, int time_slots = 0) {
    history.assign(slots, at::Tensor());
    last.assign(time_slots, at::Tensor());
    started = false;
  }
  size_t bytes() const {
    size_t n = 0;
    for (const auto& t : history)
      if (t.defined()) n += t.numel() * t.element_size();
    for (const auto& t : last)
      if (t.defined()) n += t.numel() * t.element_size();
    return n;
  }
};

at::Tensor rms_norm_silu(const at::Tensor& x, const at::Tensor& gamma) {
  // F.normalize over channels: x / max(||x||, eps), then * sqrt(C) * gamma.
  at::Tensor norm = x.norm(2, {1}, /*keepdim=*/true).clamp_min_(kNormEps);
  return at::silu_(x.div(norm).mul_(gamma));
}

// Applies `c` to `x` (T x C x H x W) as frames following `history`, and makes
// `history` the last taps-1 frames of [history, x].
at::Tensor causal_conv(const CausalConv& c, const at::Tensor& x, at::Tensor& history) {
  const int64_t taps = static_cast<int64_t>(c.taps.size());
  const int64_t keep = taps - 1;
  const int64_t t = x.size(0);
  const int64_t held = history.defined() ? history.size(0) : 0;
  const at::Tensor full = held ? at::cat({history, x}, 0) : x;
  const int64_t zeros = keep - held;  // zero frames in front of `full`
  // Tap k sees frame j = out + k of [zeros, full]: the last tap covers every output.
  at::Tensor out = conv2d(x, c.taps[keep], c.bias, 1, c.padding);
  for (int64_t k = 0; k < keep; ++k) {
    const int64_t first_out = std::max<int64_t>(0, zeros - k);  // outputs whose tap-k frame is real
    if (first_out >= t) continue;
    const at::Tensor in = full.narrow(0, first_out + k - zeros, t - first_out);
    out.narrow(0, first_out, t - first_out).add_(conv2d(in, c.taps[k], at::Tensor(), 1, c.padding));
  }
  const int64_t total = held + t;
  const int64_t kept = std::min(keep, total);
  history = full.narrow(0, total - kept, kept).clone();
  return out;
}

at::Tensor residual_block(const ResBlock& b, const at::Tensor& x, StreamState& s) {
  at::Tensor h = causal_conv(b.conv1, rms_norm_silu(x, b.gamma1), s.history[b.slot1]);
  h = causal_conv(b.conv2, rms_norm_silu(h, b.gamma2), s.history[b.slot2]);
  const at::Tensor skip = b.shortcut.weight.defined() ? conv2d(x, b.shortcut.weight, b.shortcut.bias) : x;
  return h.add_(skip);
}

// The spatial step of a Resample: zero-pad one column right and one row
// bottom, then a 3x3 convolution of stride 2.
at::Tensor spatial_down(const Conv2& c, const at::Tensor& x) {
  return conv2d(at::constant_pad_nd(x, {0, 1, 0, 1}, 0), c.weight, c.bias, 2, 0);
}

// The temporal step: the first chunk of a clip passes unchanged; afterwards
// each pair of frames, with the frame before it, gives one frame:
// y_k = conv(x_{2k-2}, x_{2k-1}, x_{2k}) over the whole clip.
at::Tensor temporal_down(const CausalConv& c, const at::Tensor& x, at::Tensor& last) {
  const int64_t t = x.size(0);
  if (!last.defined()) {
    last = x.narrow(0, t - 1, 1).clone();
    return x;
  }
  if (t % 2 != 0)
    throw VaeError("internal: a temporal downsampling got " + std::to_string(t) + " frames after the first chunk");
  const at::Tensor full = at::cat({last, x}, 0);
  const int64_t n = t / 2;
  auto frames = [&](int64_t k) { return full.narrow(0, k, 2 * n - 1).slice(0, 0, 2 * n - 1, 2); };
  at::Tensor out = conv2d(frames(2), c.taps[2], c.bias);
  out.add_(conv2d(frames(0), c.taps[0], at::Tensor()));
  out.add_(conv2d(frames(1), c.taps[1], at::Tensor()));
  last = x.narrow(0, t - 1, 1).clone();
  return out;
}

// Wan 2.2's AvgDown3D: space-to-depth by 2x2 (and by 2 frames where the
// level downsamples time, a lone frame paired with a zero frame in front),
// then the mean of each run of `group` consecutive channels.
at::Tensor average_down(const at::Tensor& x, int64_t out_channels, bool space, bool time) {
  at::Tensor v = x;
  const int64_t ft = time ? 2 : 1, fs = space ? 2 : 1;
  if (ft == 1 && fs == 1) {
    if (x.size(1) != out_channels) throw VaeError("internal: identity shortcut with a channel change");
    return x;
  }
  if (time && v.size(0) % 2 != 0) v = at::cat({at::zeros_like(v.narrow(0, 0, 1)), v}, 0);
  const int64_t t = v.size(0) / ft, c = v.size(1), h = v.size(2) / fs, w = v.size(3) / fs;
  // (t ft) c (h fs) (w fs) -> t (c ft fs fs) h w
  v = v.contiguous().view({t, ft, c, h, fs, w, fs}).permute({0, 2, 1, 4, 6, 3, 5});
  const int64_t factor = ft * fs * fs;
  const int64_t group = c * factor / out_channels;
  return v.reshape({t, out_channels, group, h, w}).mean(2);
}

at::Tensor attention(const Attention& a, const at::Tensor& x) {
  const int64_t t = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), n = h * w;
  const at::Tensor normed = x.div(x.norm(2, {1}, true).clamp_min_(kNormEps)).mul_(a.gamma);
  const at::Tensor qkv = conv2d(normed, a.qkv.weight, a.qkv.bias).reshape({t, 3 * c, n});
  const at::Tensor q = qkv.narrow(1, 0, c).transpose(1, 2);  // t x n x c
  const at::Tensor k = qkv.narrow(1, c, c);                  // t x c x n
  const at::Tensor v = qkv.narrow(1, 2 * c, c).transpose(1, 2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(c));
  // Queries in blocks, so that no t x n x n score matrix is built at large sizes.
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(n, kMaxScoreElements / std::max<int64_t>(1, t * n)));
  at::Tensor out = at::empty({t, n, c}, x.options());
  for (int64_t start = 0; start < n; start += block) {
    const int64_t len = std::min(block, n - start);
    at::Tensor scores = at::bmm(q.narrow(1, start, len), k).mul_(scale).softmax(-1);
    out.narrow(1, start, len).copy_(at::bmm(scores, v));
  }
  at::Tensor y = out.transpose(1, 2).reshape({t, c, h, w}).contiguous(x.suggest_memory_format());
  return conv2d(y, a.proj.weight, a.proj.bias).add_(x);
}

// Wan 2.2's 2x2 patchify: channel c*4 + column*2 + row at half the size.
at::Tensor patchify(const at::Tensor& x) {
  const int64_t t = x.size(0), c = x.size(1), h = x.size(2) / 2, w = x.size(3) / 2;
  return x.contiguous().view({t, c, h, 2, w, 2}).permute({0, 1, 5, 3, 2, 4}).reshape({t, c * 4, h, w});
}

// A chunk of frames (frame 0 of a clip alone, or whole groups of 4) ->
// its latents' mean and log-variance (float32, L x z x h x w).
std::pair<at::Tensor, at::Tensor> encode_chunk(const Network& net, at::Tensor x, StreamState& s,
                                               at::MemoryFormat format) {
  if (net.wan22) x = patchify(x);
  x = x.contiguous(format);
  x = causal_conv(net.conv_in, x, s.history[net.conv_in_slot]);
  for (const Level& level : net.levels) {
    const at::Tensor level_in = x;
    for (const ResBlock& b : level.blocks) x = residual_block(b, x, s);
    if (level.resample.present) {
      x = spatial_down(level.resample.spatial, x);
      if (level.resample.temporal) x = temporal_down(level.resample.time, x, s.last[level.resample.slot]);
    }
    if (level.average_shortcut)
      x = x.add_(average_down(level_in, level.out, level.resample.present, level.resample.temporal)
                     .contiguous(format));
  }
  x = residual_block(net.mid1, x, s);
  x = attention(net.attention, x);
  x = residual_block(net.mid2, x, s);
  x = causal_conv(net.head, rms_norm_silu(x, net.head_gamma), s.history[net.head_slot]);
  const at::Tensor moments = conv2d(x, net.moments.weight, net.moments.bias).to(at::kFloat).contiguous();
  return {moments.narrow(1, 0, net.z), moments.narrow(1, net.z, net.z)};
}

/* ------------------------------------------------------------------ loading */

// Reads layers by official name; numbers the state slots of the causal
// convs (`slots`) and temporal downsamplings (`time_slots`) it loads.
class Loader {
 public:
  Loader(WeightReader& reader, int& slots, int& time_slots) : r_(reader), slots_(slots), time_slots_(time_slots) {}

  CausalConv causal(const std::string& name, int64_t out, int64_t in, int64_t k, int64_t space_k, int64_t padding) {
    const at::Tensor w = r_.get(name + ".weight", {out, in, k, space_k, space_k});
    CausalConv c;
    for (int64_t i = 0; i < k; ++i) c.taps.push_back(w.select(2, i).contiguous());
    c.bias = r_.get(name + ".bias", {out});
    c.padding = padding;
    return c;
  }
  Conv2 conv(const std::string& name, int64_t out, int64_t in, int64_t k) {
    return {r_.get(name + ".weight", {out, in, k, k}), r_.get(name + ".bias", {out})};
  }
  // A 1x1x1 conv as a 1x1 2-D one.
  Conv2 pointwise(const std::string& name, int64_t out, int64_t in) {
    return {r_.get(name + ".weight", {out, in, 1, 1, 1}).view({out, in, 1, 1}), r_.get(name + ".bias", {out})};
  }
  at::Tensor gamma(const std::string& name, int64_t c, int spatial_dims) {
    std::vector<int64_t> shape{c};
    for (int i = 0; i < spatial_dims; ++i) shape.push_back(1);
    return r_.get(name, shape).view({1, c, 1, 1}) * std::sqrt(static_cast<double>(c));
  }
  ResBlock block(const std::string& name, int64_t in, int64_t out) {
    ResBlock b;
    b.gamma1 = gamma(name + ".residual.0.gamma", in, 3);
    b.conv1 = causal(name + ".residual.2", out, in, 3, 3, 1);
    b.gamma2 = gamma(name + ".residual.3.gamma", out, 3);
    b.conv2 = causal(name + ".residual.6", out, out, 3, 3, 1);
    if (in != out) b.shortcut = pointwise(name + ".shortcut", out, in);
    b.slot1 = slots_++;
    b.slot2 = slots_++;
    return b;
  }
  Resample resample(const std::string& name, int64_t c, bool temporal) {
    Resample r;
    r.present = true;
    r.temporal = temporal;
    r.spatial = conv(name + ".resample.1", c, c, 3);
    if (temporal) {
      r.time = causal(name + ".time_conv", c, c, 3, 1, 0);
      r.slot = time_slots_++;
    }
    return r;
  }

 private:
  WeightReader& r_;
  int& slots_;
  int& time_slots_;
};

int64_t dim_of(const std::vector<int64_t>& shape, size_t i) { return shape.size() > i ? shape[i] : 0; }

class WanEncoder final : public TorchEncoder {
 public:
  WanEncoder(EncoderInfo info, ComputeTarget target, Network net)
      : TorchEncoder(std::move(info), target), net_(std::move(net)) {
    // Channels-last runs oneDNN's fastest fp32 kernels on the CPU; elsewhere
    // the channels-last lever decides (GSTVAE_CHANNELS_LAST, docs/gpu.md).
    format_ = use_onednn(at::empty({0}, at::TensorOptions().device(target_.device).dtype(target_.dtype)))
                  ? at::MemoryFormat::ChannelsLast
                  : activation_format(target_);
    probe();
  }

  EncodeReport encode(const FrameBatch&, const EncodeParams&, float*) override { refuse(); }
  EncodeReport encode(const FrameBatch&, const EncodeParams&, LatentBlock&) override { refuse(); }
  std::unique_ptr<EncodeSession> open_session() override;

  // Frames (T x 3 x H x W, compute dtype) -> mean and log-variance, state carried in `s`.
  std::pair<at::Tensor, at::Tensor> run(const at::Tensor& frames, StreamState& s) {
    return encode_chunk(net_, frames, s, format_);
  }
  const Network& network() const { return net_; }
  at::Tensor pixels(const FrameBatch& batch) const { return batch_pixels(batch); }

 protected:
  // Each frame as a clip of its own (frame 0 of a clip = the image encode):
  // used by probe() only.
  Moments forward(const at::Tensor& pixels) override {
    std::vector<at::Tensor> means, logvars;
    for (int64_t i = 0; i < pixels.size(0); ++i) {
      StreamState s;
      s.reset(net_.slots, net_.time_slots);
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
  at::MemoryFormat format_;
};

/* ------------------------------------------------------------------ session */

class WanSession final : public EncodeSession {
 public:
  explicit WanSession(std::shared_ptr<WanEncoder> encoder) : encoder_(std::move(encoder)) { reset(); }

  void reset() override {
    state_.reset(encoder_->network().slots, encoder_->network().time_slots);
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
    result.report.sub_batch = kMaxGroupsPerPass * kFramesPerLatent;
    std::vector<at::Tensor> means, logvars;
    try {
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
      auto run = [&](int64_t count, uint32_t frames_per_latent) {
        auto m = encoder_->run(frames.narrow(0, used, count), state_);
        means.push_back(m.first);
        logvars.push_back(m.second);
        for (int64_t i = 0; i < count; i += frames_per_latent)
          result.spans.push_back({indices[used + i], frames_per_latent});
        used += count;
      };
      if (!state_.started && available > 0) {
        run(1, 1);  // frame 0 alone: latent 0 goes out at once
        state_.started = true;
      }
      while (available - used >= kFramesPerLatent) {
        const int64_t groups = std::min<int64_t>((available - used) / kFramesPerLatent, kMaxGroupsPerPass);
        run(groups * kFramesPerLatent, kFramesPerLatent);
      }
      const int64_t rest = available - used;
      if (params.end_of_clip && rest > 0) {
        if (params.pad_clip_end) {
          // Complete the group by repeating its last frame: one latent no reference gives.
          const at::Tensor last = frames.narrow(0, available - 1, 1);
          at::Tensor group = at::cat({frames.narrow(0, used, rest), last.expand({kFramesPerLatent - rest, -1, -1, -1})}, 0);
          auto m = encoder_->run(group, state_);
          means.push_back(m.first);
          logvars.push_back(m.second);
          result.spans.push_back({indices[used], static_cast<uint32_t>(rest)});
          result.padded_frames = static_cast<uint32_t>(kFramesPerLatent - rest);
        } else {
          result.dropped = {indices[used], static_cast<uint32_t>(rest)};
        }
        used = available;
      }
      if (params.end_of_clip) {
        reset();
      } else {
        held_ = rest > 0 ? frames.narrow(0, used, rest).clone() : at::Tensor();
        held_indices_.assign(indices.begin() + used, indices.end());
      }
      if (!means.empty()) write(result, means, logvars, params, out);
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
             const EncodeParams& params, LatentBlock& out) {
    at::Tensor latents = at::cat(means, 0);
    if (params.sample) {
      // Noise per latent, from (seed, the latent's first frame index).
      std::vector<at::Tensor> noise;
      for (const Span& span : result.spans) noise.push_back(frame_noise(params.seed, span.first, latents.sizes().slice(1)));
      const at::Tensor std = at::exp(0.5f * at::cat(logvars, 0).clamp(-30.0, 20.0));
      latents = latents + std * at::stack(noise).to(latents.device());
    }
    latents = raw_to_format(latents, params.latent_format);
    const size_t needed = static_cast<size_t>(latents.numel());
    if (out.floats() < needed)
      throw VaeError("latent block of " + std::to_string(out.floats()) + " floats is too small for " +
                     std::to_string(result.spans.size()) + " latents (" + std::to_string(needed) + " floats)");
    // One copy back per batch: asynchronous into page-locked memory, waited for here.
    const bool async = out.pinned() && latents.is_cuda();
    out.storage().values.narrow(0, 0, latents.numel()).view(latents.sizes()).copy_(latents, async);
    if (async) {
      c10::impl::VirtualGuardImpl impl(latents.device().type());
      impl.getStream(latents.device()).synchronize();
    }
  }

  std::shared_ptr<WanEncoder> encoder_;
  StreamState state_;
  at::Tensor held_;  // the frames of the incomplete group, prepared
  std::vector<uint64_t> held_indices_;
};

std::unique_ptr<EncodeSession> WanEncoder::open_session() {
  return std::make_unique<WanSession>(std::static_pointer_cast<WanEncoder>(shared_from_this()));
}

/* ------------------------------------------------------------------ decoder */

// The decoder mirrors the encoder: conv1, the middle (blocks and per-frame
// attention), four levels of 3 residual blocks, each of the first three
// ending in an upsampling Resample (levels 0 and 1 also in time), the head.
// Wan 2.2 adds the DupUp3D shortcut around each upsampling level and a 2x2
// unpatchify at the end. The official decode feeds one latent at a time; the
// states below make any number per pass give the same frames, except that a
// clip's first latent goes alone (it gives 1 frame, not 4).
struct UpResample {
  bool present = false;
  bool temporal = false;
  CausalConv time;   // C -> 2C: each frame becomes two
  int time_slot = 0;
  Conv2 spatial;     // 3x3 after a nearest 2x upsampling
};
struct UpLevel {
  std::vector<ResBlock> blocks;
  UpResample resample;
  bool duplicate_shortcut = false;  // Wan 2.2's DupUp3D of the level's input
  int64_t out = 0;
};
struct DecoderNetwork {
  bool wan22 = false;
  int64_t z = 16;
  Conv2 unscale;  // the VAE-level conv2, z -> z, 1x1x1
  CausalConv conv_in;
  int conv_in_slot = 0;
  ResBlock mid1, mid2;
  Attention attention;
  std::vector<UpLevel> levels;
  at::Tensor head_gamma;
  CausalConv head;
  int head_slot = 0;
  int slots = 0;
  int time_slots = 0;  // none: the upsamplings' time convs are causal convs with slots of their own
};

// The time step of an upsampling: nothing on a clip's first chunk (its frame
// passes as it is, and does not enter the conv's history: upstream marks the
// cache 'Rep'); afterwards a causal 3-tap conv to 2C channels whose halves
// are two consecutive frames.
at::Tensor temporal_up(const UpResample& r, const at::Tensor& x, StreamState& s) {
  if (!s.started) return x;
  const at::Tensor y = causal_conv(r.time, x, s.history[r.time_slot]).contiguous();
  const int64_t t = y.size(0), c = y.size(1) / 2;
  return y.view({t, 2, c, y.size(2), y.size(3)}).reshape({2 * t, c, y.size(2), y.size(3)});
}

// Wan 2.2's DupUp3D: each input channel repeated, the copies spread over
// 2 frames (where the level upsamples time) and 2x2 pixels; on a clip's
// first chunk the first of each frame pair is dropped, as the main path
// passes that frame through.
at::Tensor duplicate_up(const at::Tensor& x, int64_t out_channels, bool time, bool first_chunk) {
  const int64_t ft = time ? 2 : 1, fs = 2;
  const int64_t t = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t repeats = out_channels * ft * fs * fs / c;
  // channel o*ft*fs*fs + a*fs*fs + b*fs + d of the repeated input -> frame
  // t*ft + a, row y*fs + b, column x*fs + d of output channel o.
  at::Tensor v = x.contiguous().repeat_interleave(repeats, 1).view({t, out_channels, ft, fs, fs, h, w});
  v = v.permute({0, 2, 1, 5, 3, 6, 4}).reshape({t * ft, out_channels, h * fs, w * fs});
  return first_chunk && ft > 1 ? v.narrow(0, ft - 1, t * ft - (ft - 1)) : v;
}

// Wan 2.2's unpatchify, the inverse of patchify(): channel c*4 + column*2 + row.
at::Tensor unpatchify(const at::Tensor& x) {
  const int64_t t = x.size(0), c = x.size(1) / 4, h = x.size(2), w = x.size(3);
  return x.contiguous().view({t, c, 2, 2, h, w}).permute({0, 1, 4, 3, 5, 2}).reshape({t, c, 2 * h, 2 * w});
}

// Raw latents (L x z x h x w, compute dtype) after what `s` saw -> frames
// in [-1, 1] before the clamp, N x 3 x H x W: 1 for a clip's first latent
// (which must come alone), 4 for every later one.
at::Tensor decode_chunk(const DecoderNetwork& net, const at::Tensor& z, StreamState& s, at::MemoryFormat format) {
  at::Tensor x = conv2d(z.contiguous(format), net.unscale.weight, net.unscale.bias);
  x = causal_conv(net.conv_in, x, s.history[net.conv_in_slot]);
  x = residual_block(net.mid1, x, s);
  x = attention(net.attention, x);
  x = residual_block(net.mid2, x, s);
  for (const UpLevel& level : net.levels) {
    const at::Tensor level_in = x;
    for (const ResBlock& b : level.blocks) x = residual_block(b, x, s);
    if (level.resample.present) {
      if (level.resample.temporal) x = temporal_up(level.resample, x, s);
      x = at::upsample_nearest2d(x.contiguous(format), {2 * x.size(2), 2 * x.size(3)});
      x = conv2d(x, level.resample.spatial.weight, level.resample.spatial.bias, 1, 1);
    }
    if (level.duplicate_shortcut)
      x = x.add_(duplicate_up(level_in, level.out, level.resample.temporal, !s.started).contiguous(format));
  }
  x = causal_conv(net.head, rms_norm_silu(x, net.head_gamma), s.history[net.head_slot]);
  s.started = true;
  return net.wan22 ? unpatchify(x) : x.contiguous();
}

class WanDecoder final : public TorchDecoder {
 public:
  WanDecoder(DecoderInfo info, ComputeTarget target, DecoderNetwork net)
      : TorchDecoder(std::move(info), target), net_(std::move(net)) {
    format_ = use_onednn(at::empty({0}, at::TensorOptions().device(target_.device).dtype(target_.dtype)))
                  ? at::MemoryFormat::ChannelsLast
                  : activation_format(target_);
    probe();
  }

  struct State final : StreamState {
    gstvae::StreamState s;
    size_t bytes() const override { return s.bytes(); }
  };
  std::unique_ptr<StreamState> new_stream_state() const override {
    auto state = std::make_unique<State>();
    state->s.reset(net_.slots, net_.time_slots);
    return state;
  }
  at::Tensor forward_stream(const at::Tensor& z, StreamState& state) override {
    State& st = static_cast<State&>(state);
    if (!st.s.started && z.size(0) != 1)
      throw VaeError("internal: a clip's first latent must be decoded alone");
    return decode_chunk(net_, z, st.s, format_);
  }

 protected:
  // Each latent as a clip of its own: the image decode (Qwen-Image's use).
  at::Tensor forward(const at::Tensor& z) override {
    std::vector<at::Tensor> frames;
    for (int64_t i = 0; i < z.size(0); ++i) {
      gstvae::StreamState s;
      s.reset(net_.slots, net_.time_slots);
      frames.push_back(decode_chunk(net_, z.narrow(0, i, 1), s, format_));
    }
    return at::cat(frames, 0);
  }

 private:
  DecoderNetwork net_;
  at::MemoryFormat format_;
};

bool detect_decoder(const SafetensorsFile& file) { return decoder_prefix(file) != nullptr; }

std::shared_ptr<Decoder> load_decoder(std::shared_ptr<const SafetensorsFile> file, const ModelOptions& options) {
  const WanKeys keys = normalize_keys(*file, decoder_prefix(*file), "decoder");
  const std::string& path = file->path();
  auto has = [&](const std::string& name) { return keys.source.count(name) != 0; };
  auto shape_of = [&](const std::string& name) -> std::vector<int64_t> {
    auto it = keys.source.find(name);
    const TensorInfo* t = it == keys.source.end() ? nullptr : file->find(it->second);
    if (!t) throw CheckpointError("'" + path + "' lacks the Wan decoder's tensor '" + name + "'");
    return t->shape;
  };
  DecoderNetwork net;
  net.wan22 = has("decoder.upsamples.0.upsamples.0.residual.2.weight");
  const std::vector<int64_t> conv_in = shape_of("decoder.conv1.weight");
  const int64_t width = dim_of(conv_in, 0);
  net.z = dim_of(conv_in, 1);
  const int64_t pixels_out = net.wan22 ? 12 : 3;
  const int64_t head_out = dim_of(shape_of("decoder.head.2.weight"), 0);
  if (head_out != pixels_out)
    throw CheckpointError("'" + path + "': the Wan decoder's head gives " + std::to_string(head_out) +
                          " channels, expected " + std::to_string(pixels_out) +
                          (net.wan22 ? " (RGB in 2x2 patches)" : " (RGB)") +
                          "; other variants (RGBA, 2x upscaling decoders) are not supported");

  const ComputeTarget target = resolve_target(options);
  apply_thread_option(options.threads);
  WeightReader reader(file, keys.source, target);
  Loader l(reader, net.slots, net.time_slots);
  net.unscale = l.pointwise("conv2", net.z, net.z);
  net.conv_in = l.causal("decoder.conv1", width, net.z, 3, 3, 1);
  net.conv_in_slot = net.slots++;
  net.mid1 = l.block("decoder.middle.0", width, width);
  net.attention.gamma = l.gamma("decoder.middle.1.norm.gamma", width, 2);
  net.attention.qkv = l.conv("decoder.middle.1.to_qkv", 3 * width, width, 1);
  net.attention.proj = l.conv("decoder.middle.1.proj", width, width, 1);
  net.mid2 = l.block("decoder.middle.2", width, width);
  int64_t in = width;
  int upsamplings = 0;
  std::ostringstream widths;
  for (int level = 0; level < kLevels; ++level) {
    UpLevel lv;
    auto name = [&](int j) {
      return net.wan22 ? "decoder.upsamples." + std::to_string(level) + ".upsamples." + std::to_string(j)
                       : "decoder.upsamples." + std::to_string(level * (kUpBlocksPerLevel + 1) + j);
    };
    const int64_t level_in = in;
    lv.out = dim_of(shape_of(name(0) + ".residual.2.weight"), 0);
    for (int b = 0; b < kUpBlocksPerLevel; ++b) {
      lv.blocks.push_back(l.block(name(b), in, lv.out));
      in = lv.out;
    }
    const std::string resample = name(kUpBlocksPerLevel);
    // Upsampling after levels 0-2, in time too after levels 0 and 1 (the
    // loaders' temperal_upsample [True, True, False]): required tensors.
    if (level < kLevels - 1) {
      UpResample& r = lv.resample;
      r.present = true;
      r.temporal = level < 2;
      if (r.temporal) {
        r.time = l.causal(resample + ".time_conv", 2 * in, in, 3, 1, 0);
        r.time_slot = net.slots++;
      }
      const int64_t out = dim_of(shape_of(resample + ".resample.1.weight"), 0);
      r.spatial = l.conv(resample + ".resample.1", out, in, 3);
      in = out;
      ++upsamplings;
      if (net.wan22) {
        lv.duplicate_shortcut = true;
        const int64_t factor = (r.temporal ? 2 : 1) * 4;
        if ((in * factor) % level_in != 0)
          throw CheckpointError("'" + path + "': Wan 2.2 decoder level " + std::to_string(level) + " goes from " +
                                std::to_string(level_in) + " to " + std::to_string(in) +
                                " channels, which its duplicating shortcut cannot spread");
        lv.out = in;
      }
    }
    widths << " " << in;
    net.levels.push_back(std::move(lv));
  }
  net.head_gamma = l.gamma("decoder.head.0.gamma", in, 3);
  net.head = l.causal("decoder.head.2", pixels_out, in, 3, 3, 1);
  net.head_slot = net.slots++;
  reader.require_all_used(wan_claim(keys, true));

  DecoderInfo info;
  info.family = net.wan22 ? "wan2.2" : "wan2.1";
  info.model_path = path;
  info.layout = std::string(keys.diffusers ? "diffusers" : "official") +
                (keys.prefix.empty() ? "" : " under '" + keys.prefix + "'");
  info.upscale = (1 << upsamplings) * (net.wan22 ? 2 : 1);
  info.latent_channels = static_cast<int>(net.z);
  info.native_format = LatentFormat();  // raw, as ComfyUI's LATENT holds them
  info.output_signed = true;
  info.temporal_upscale = kFramesPerLatent;
  info.parameters = reader.parameters_loaded();
  std::ostringstream os;
  os << (net.wan22 ? "Wan 2.2 video VAE decoder" : "Wan 2.1 video VAE decoder") << ", width " << width
     << ", widths after each level" << widths.str() << ", z=" << net.z << ", upscale " << info.upscale << "x"
     << info.upscale << " and 4 in time (a clip's first latent gives 1 frame)";
  info.architecture = os.str();
  return std::make_shared<WanDecoder>(std::move(info), target, std::move(net));
}

/* ------------------------------------------------------------------- family */

bool detect(const SafetensorsFile& file) { return encoder_prefix(file) != nullptr; }

std::shared_ptr<Encoder> load(std::shared_ptr<const SafetensorsFile> file, const ModelOptions& options) {
  const WanKeys keys = normalize_keys(*file, encoder_prefix(*file), "encoder");
  const std::string& path = file->path();
  auto shape_of = [&](const std::string& name) -> std::vector<int64_t> {
    auto it = keys.source.find(name);
    const TensorInfo* t = it == keys.source.end() ? nullptr : file->find(it->second);
    if (!t) throw CheckpointError("'" + path + "' lacks the Wan encoder's tensor '" + name + "'");
    return t->shape;
  };
  Network net;
  net.wan22 = keys.source.count("encoder.downsamples.0.downsamples.0.residual.0.gamma") != 0;
  const std::vector<int64_t> conv_in = shape_of("encoder.conv1.weight");
  const int64_t dim = dim_of(conv_in, 0);
  net.in_channels = dim_of(conv_in, 1);
  const int64_t pixels_in = net.wan22 ? net.in_channels / 4 : net.in_channels;
  if (pixels_in != 3 || (net.wan22 && net.in_channels % 4 != 0))
    throw CheckpointError("'" + path + "': the Wan encoder takes " + std::to_string(net.in_channels) +
                          " input channels" + (net.wan22 ? " after its 2x2 patchify" : "") +
                          "; only RGB models (3 channels) are supported (4-channel RGBA variants exist, e.g. "
                          "Qwen-Image-Layered)");
  const std::vector<int64_t> moments = shape_of("conv1.weight");
  if (dim_of(moments, 0) % 2 != 0 || dim_of(moments, 0) == 0)
    throw CheckpointError("'" + path + "': conv1 has " + std::to_string(dim_of(moments, 0)) +
                          " output channels, expected 2 x the latent channels");
  net.z = dim_of(moments, 0) / 2;

  const ComputeTarget target = resolve_target(options);
  apply_thread_option(options.threads);
  WeightReader reader(file, keys.source, target);
  Loader l(reader, net.slots, net.time_slots);
  net.conv_in = l.causal("encoder.conv1", dim, net.in_channels, 3, 3, 1);
  net.conv_in_slot = net.slots++;
  // Widths per level from each level's first block's first conv.
  std::vector<int64_t> widths;
  int64_t in = dim;
  for (int level = 0; level < kLevels; ++level) {
    Level lv;
    const std::string base = net.wan22 ? "encoder.downsamples." + std::to_string(level) + ".downsamples."
                                       : "encoder.downsamples.";
    const int first = net.wan22 ? 0 : level * (kBlocksPerLevel + 1);
    const int64_t out = dim_of(shape_of(base + std::to_string(first) + ".residual.2.weight"), 0);
    for (int b = 0; b < kBlocksPerLevel; ++b) {
      lv.blocks.push_back(l.block(base + std::to_string(first + b), b == 0 ? in : out, out));
    }
    if (level < kLevels - 1)  // temporal downsampling after levels 1 and 2 (the loaders' [False, True, True])
      lv.resample = l.resample(base + std::to_string(first + kBlocksPerLevel), out, level >= 1);
    lv.out = out;
    lv.average_shortcut = net.wan22;
    if (net.wan22) {
      const int64_t factor = (lv.resample.present ? 4 : 1) * (lv.resample.temporal ? 2 : 1);
      if ((in * factor) % out != 0)
        throw CheckpointError("'" + path + "': Wan 2.2 level " + std::to_string(level) + " goes from " +
                              std::to_string(in) + " to " + std::to_string(out) +
                              " channels, which its averaging shortcut cannot group");
    }
    widths.push_back(out);
    net.levels.push_back(std::move(lv));
    in = out;
  }
  net.mid1 = l.block("encoder.middle.0", in, in);
  net.attention.gamma = l.gamma("encoder.middle.1.norm.gamma", in, 2);
  net.attention.qkv = l.conv("encoder.middle.1.to_qkv", 3 * in, in, 1);
  net.attention.proj = l.conv("encoder.middle.1.proj", in, in, 1);
  net.mid2 = l.block("encoder.middle.2", in, in);
  net.head_gamma = l.gamma("encoder.head.0.gamma", in, 3);
  net.head = l.causal("encoder.head.2", 2 * net.z, in, 3, 3, 1);
  net.head_slot = net.slots++;
  net.moments = l.pointwise("conv1", 2 * net.z, 2 * net.z);
  reader.require_all_used(wan_claim(keys, false));

  EncoderInfo info;
  info.family = net.wan22 ? "wan2.2" : "wan2.1";
  info.model_path = path;
  info.layout = std::string(keys.diffusers ? "diffusers" : "official") +
                (keys.prefix.empty() ? "" : " under '" + keys.prefix + "'");
  info.downscale = net.wan22 ? 16 : 8;
  info.temporal_downscale = kFramesPerLatent;
  info.latent_channels = static_cast<int>(net.z);
  info.input_signed = true;
  info.native_format = LatentFormat();  // raw, as ComfyUI's LATENT holds them
  info.parameters = reader.parameters_loaded();
  std::ostringstream os;
  os << (net.wan22 ? "Wan 2.2 video VAE encoder" : "Wan 2.1 video VAE encoder") << ", widths";
  for (int64_t w : widths) os << " " << w;
  os << ", z=" << net.z << ", downscale " << info.downscale << "x" << info.downscale << " and 4 in time";
  info.architecture = os.str();
  return std::make_shared<WanEncoder>(std::move(info), target, std::move(net));
}

}  // namespace

const EncoderFamily kWanEncoderFamily = {"wan", detect, load};
const DecoderFamily kWanDecoderFamily = {"wan", detect_decoder, load_decoder};

}  // namespace gstvae
