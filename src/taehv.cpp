// The TAEHV tiny video autoencoders of madebyollin/taehv, both halves:
// taew2_1 (Wan 2.1 latents, 16 channels) and taew2_2 (Wan 2.2, 48 channels,
// 2x2 space-to-depth input). An nn.Sequential named by index (`encoder.0.weight`,
// `encoder.2.conv.weight`, `encoder.4.conv.0.weight`): 3x3 convs, TPools that
// stack frames along channels, and MemBlocks that see the previous frame's
// input. Four frames 4k..4k+3 make latent k; see docs/video-vaes.md.
//
// The encoder outputs the Wan model's normalised space; the latents leave as
// raw Wan latents (x * std + mean, the Wan VAE family's output), then in the
// latent format asked for. Only sessions encode: the MemBlocks carry state.
// The decoder mirrors it (TGrows make 4 frames of a latent) and takes that
// normalised space; a video session carries its MemBlocks' state, and each
// latent decoded alone (an image stream) keeps its last frame, as a clip's
// first latent does.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <cctype>
#include <deque>
#include <map>
#include <sstream>

#include "errors.h"
#include "families.h"
#include "name_rules.h"
#include "frame_storage.h"
#include "torch_decoder.h"
#include "torch_encoder.h"

namespace gstvae {

namespace {

/* ------------------------------------------------------------ latent spaces */

struct Variant {
  const char* name;   // upstream's file name
  const char* model;  // whose latent space
  const char* space;  // that normalised space, a per-channel LatentFormat (latent_format.cpp)
  int64_t patch;      // space-to-depth of the input
  int64_t channels;
};

const Variant kVariants[] = {
    {"taew2_1", "Wan 2.1", "wan21", 1, 16},
    {"taew2_2", "Wan 2.2", "wan22", 2, 48},
};

// Files of upstream's other latent spaces, some with taew2_1's very shapes.
const char* const kOtherSpaces[] = {"taehv1_5", "taehv", "taecvx", "taeltx"};

/* ------------------------------------------------------------------ layers */

// The Sequential, by index: 0 conv, 1 ReLU, then three stages of TPool,
// stride-2 conv and three MemBlocks (first index 2, 7, 12), then 17 conv.
constexpr int kStageFirst[3] = {2, 7, 12};
constexpr int kLastConv = 17;

struct Conv {
  at::Tensor weight, bias;  // bias undefined where the layer has none
  int64_t stride = 1;
  int64_t padding = 1;
};

struct MemBlock {
  Conv conv0, conv2, conv4;
  at::Tensor skip;  // 1x1, no bias; undefined (the identity) when widths agree, as in every released file
};

struct Stage {
  Conv pool;              // TPool's 1x1 conv over `pool_frames` frames stacked along channels
  int64_t pool_frames = 1;
  Conv down;              // 3x3, stride 2
  MemBlock blocks[3];
};

struct Network {
  int64_t patch = 1;
  int64_t width = 0;
  Conv first;  // followed by a ReLU
  Stage stages[3];
  Conv last;
  int64_t frames_per_latent = 1;
};

at::Tensor run_conv(const Conv& c, const at::Tensor& x) { return conv2d(x, c.weight, c.bias, c.stride, c.padding); }

// x: T x C x h x w, frames of one clip in order; past: the block's input at
// the frame before x[0] (undefined: the clip's start, zeros). Every frame's
// past is an input, so the T frames go through together.
at::Tensor memblock_forward(const MemBlock& b, const at::Tensor& x, const at::Tensor& past) {
  const int64_t t = x.size(0);
  at::Tensor before = past.defined() ? past : at::zeros_like(x.narrow(0, 0, 1));
  at::Tensor pasts = t > 1 ? at::cat({before, x.narrow(0, 0, t - 1)}, 0) : before;
  at::Tensor h = run_conv(b.conv0, at::cat({x, pasts}, 1)).relu_();
  h = run_conv(b.conv2, h).relu_();
  h = run_conv(b.conv4, h);
  h.add_(b.skip.defined() ? conv2d(x, b.skip, at::Tensor()) : x);
  return at::relu_(h);
}

// The state a clip carries: the last input of each MemBlock.
struct ClipState {
  at::Tensor memory[3][3];
  void clear() {
    for (auto& stage : memory)
      for (auto& m : stage) m = at::Tensor();
  }
};

// pixels: T x 3 x H x W in [0, 1], T a multiple of frames_per_latent; returns
// T / frames_per_latent normalised latents (compute dtype) and updates state.
at::Tensor network_forward(const Network& net, at::Tensor x, ClipState& state) {
  if (net.patch > 1) x = at::pixel_unshuffle(x, net.patch);
  // fp32 on the CPU runs channels-last, as the TAESD family does (oneDNN's
  // NHWC convolutions skip the reorders around every conv).
  const bool nhwc = use_onednn(x);
  if (nhwc) x = x.contiguous(at::MemoryFormat::ChannelsLast);
  x = run_conv(net.first, x).relu_();
  for (int s = 0; s < 3; ++s) {
    const Stage& stage = net.stages[s];
    const int64_t k = stage.pool_frames;
    if (k > 1) {
      // Frames j, j + k, ... side by side: frame g*k + j at channels j*C..(j+1)*C-1.
      std::vector<at::Tensor> parts;
      for (int64_t j = 0; j < k; ++j) parts.push_back(x.slice(0, j, x.size(0), k));
      x = at::cat(parts, 1);
      if (nhwc) x = x.contiguous(at::MemoryFormat::ChannelsLast);
    }
    x = run_conv(stage.pool, x);
    x = run_conv(stage.down, x);
    for (int b = 0; b < 3; ++b) {
      at::Tensor next_past = x.narrow(0, x.size(0) - 1, 1).clone();
      x = memblock_forward(stage.blocks[b], x, state.memory[s][b]);
      state.memory[s][b] = next_past;
    }
  }
  x = run_conv(net.last, x);
  return nhwc ? x.contiguous() : x;
}

/* ------------------------------------------------------------------ loading */

// Reads one half of the Sequential (`half`: "encoder" or "decoder"), layer
// by layer, tracking the width the next layer takes.
class SequentialLoader {
 public:
  SequentialLoader(WeightReader& w, const char* half) : w_(w), half_(half) {}

  int64_t channels() const { return channels_; }
  void set_channels(int64_t c) { channels_ = c; }

  std::vector<int64_t> shape(const std::string& name, size_t dims) {
    std::vector<int64_t> s = w_.shape(name);
    if (s.size() != dims || s[0] < 1) fail(name, s, std::to_string(dims) + " dimensions");
    return s;
  }

  [[noreturn]] void fail(const std::string& name, const std::vector<int64_t>& s, const std::string& expected) {
    throw CheckpointError("'" + w_.path() + "': tensor '" + half_ + "." + name + "' has shape " + shape_string(s) +
                          ", expected " + expected);
  }

  // A conv from the current width to what its weight says; bias only when the
  // layer has one (an unexpected bias is an error: the layout is not TAEHV's).
  Conv conv(const std::string& p, int64_t kernel, int64_t stride, int64_t padding, bool bias) {
    const std::string name = p + ".weight";
    const std::vector<int64_t> s = shape(name, 4);
    Conv c;
    c.weight = w_.get(name, {s[0], channels_, kernel, kernel});
    if (bias) c.bias = w_.get(p + ".bias", {s[0]});
    else if (w_.has(p + ".bias"))
      throw CheckpointError("'" + w_.path() + "': tensor '" + half_ + "." + p + ".bias' is not part of a TAEHV " +
                            half_);
    c.stride = stride;
    c.padding = padding;
    channels_ = s[0];
    return c;
  }

  MemBlock memblock(const std::string& p) {
    MemBlock b;
    const int64_t in = channels_;
    // conv.0 sees the frame and its past side by side.
    const std::vector<int64_t> s = shape(p + ".conv.0.weight", 4);
    if (s[1] != 2 * in) fail(p + ".conv.0.weight", s, "[W, " + std::to_string(2 * in) + ", 3, 3] (frame and past)");
    channels_ = 2 * in;
    b.conv0 = conv(p + ".conv.0", 3, 1, 1, true);
    b.conv2 = conv(p + ".conv.2", 3, 1, 1, true);
    b.conv4 = conv(p + ".conv.4", 3, 1, 1, true);
    if (w_.has(p + ".skip.weight"))
      b.skip = w_.get(p + ".skip.weight", {channels_, in, 1, 1});
    else if (channels_ != in)
      throw CheckpointError("'" + w_.path() + "': MemBlock '" + half_ + "." + p + "' changes the width from " +
                            std::to_string(in) + " to " + std::to_string(channels_) + " but has no skip.weight");
    return b;
  }

  const std::string& path() const { return w_.path(); }

 private:
  WeightReader& w_;
  std::string half_;
  int64_t channels_ = 0;
};

int64_t patch_from(SequentialLoader& l, const std::string& name, int64_t channels, const char* what) {
  for (int64_t p = 1; p <= 8; ++p)
    if (3 * p * p == channels) return p;
  throw CheckpointError("'" + l.path() + "': tensor '" + name + "' " + what + " " + std::to_string(channels) +
                        " channels, expected 3 * p * p (RGB in p x p patches)");
}

// The encoder's layers; the latent channels are l.channels() afterwards.
Network load_encoder_network(SequentialLoader& l) {
  Network net;
  const std::vector<int64_t> s0 = l.shape("0.weight", 4);
  net.width = s0[0];
  net.patch = patch_from(l, "encoder.0.weight", s0[1], "takes");
  l.set_channels(s0[1]);
  net.first = l.conv("0", 3, 1, 1, true);
  net.frames_per_latent = 1;
  for (int s = 0; s < 3; ++s) {
    const std::string p = std::to_string(kStageFirst[s]);
    Stage& stage = net.stages[s];
    const int64_t before = l.channels();
    const std::vector<int64_t> ps = l.shape(p + ".conv.weight", 4);
    if (ps[1] % before != 0 || ps[1] / before < 1)
      l.fail(p + ".conv.weight", ps, "[W, k*" + std::to_string(before) + ", 1, 1] (a TPool over k frames)");
    stage.pool_frames = ps[1] / before;
    l.set_channels(before * stage.pool_frames);
    stage.pool = l.conv(p + ".conv", 1, 1, 0, false);
    if (l.channels() != before) l.fail(p + ".conv.weight", ps, "a TPool keeping the width " + std::to_string(before));
    net.frames_per_latent *= stage.pool_frames;
    stage.down = l.conv(std::to_string(kStageFirst[s] + 1), 3, 2, 1, false);
    for (int b = 0; b < 3; ++b) stage.blocks[b] = l.memblock(std::to_string(kStageFirst[s] + 2 + b));
  }
  net.last = l.conv(std::to_string(kLastConv), 3, 1, 1, true);
  return net;
}

/* ------------------------------------------------------------------ encoder */

class TaehvEncoder final : public TorchEncoder {
 public:
  TaehvEncoder(EncoderInfo info, ComputeTarget target, Network net)
      : TorchEncoder(std::move(info), target), net_(std::move(net)) {
    probe();
  }

  EncodeReport encode(const FrameBatch&, const EncodeParams&, float*) override { refuse(); }
  EncodeReport encode(const FrameBatch&, const EncodeParams&, LatentBlock&) override { refuse(); }
  std::unique_ptr<EncodeSession> open_session() override;

  // A session's work, under its own state.
  const Network& network() const { return net_; }
  at::Tensor pixels(const FrameBatch& batch) const { return batch_pixels(batch); }
  // Normalised latents (compute dtype) -> raw Wan latents (x * std + mean), float32.
  at::Tensor to_raw(const at::Tensor& x) const { return format_to_raw(x.to(at::kFloat), info_.native_format); }

 protected:
  // For probe(): one frame repeated into a whole group, a fresh clip.
  Moments forward(const at::Tensor& pixels) override {
    ClipState state;
    at::Tensor group = pixels.narrow(0, 0, 1).expand({net_.frames_per_latent, -1, -1, -1}).contiguous();
    return {network_forward(net_, group, state), at::Tensor()};
  }

 private:
  [[noreturn]] void refuse() const {
    throw VaeError("'" + info_.model_path + "' is a temporal model (TAEHV, " +
                   std::to_string(info_.temporal_downscale) +
                   " frames per latent): encode through a session (Encoder::open_session), which keeps the "
                   "frames and state between batches");
  }

  Network net_;
};

// Pixels (frames x height x width) per forward pass: 8 frames of 512x512
// (512 MiB for the first layer's output in fp32 at the real width of 64).
constexpr int64_t kPassPixels = int64_t{8} * 512 * 512;

// One stream: the prepared pixels of an incomplete group and the MemBlocks'
// last inputs. Every complete group of frames_per_latent frames gives a latent.

class TaehvSession final : public EncodeSession {
 public:
  explicit TaehvSession(std::shared_ptr<TaehvEncoder> encoder) : encoder_(std::move(encoder)) {}

  void reset() override {
    held_.clear();
    held_indices_.clear();
    state_.clear();
  }

  size_t held_frames() const override { return held_.size(); }

  BatchResult encode(const FrameBatch& batch, const EncodeParams& params, LatentBlock& out) override {
    const EncoderInfo& info = encoder_->info();
    const int64_t group = encoder_->network().frames_per_latent;
    BatchResult result;
    result.report.sub_batch = 0;  // frames per forward pass, once one ran
    use_configured_threads();
    c10::InferenceMode guard;
    try {
      if (!batch.empty()) {
        at::Tensor pixels = encoder_->pixels(batch);
        if (!held_.empty() && !held_.front().sizes().slice(1).equals(pixels.sizes().slice(1)))
          throw VaeError("frames of " + std::to_string(batch.crop().width) + "x" +
                         std::to_string(batch.crop().height) +
                         " arrived while frames of another size are held: a new size starts a new clip, "
                         "reset() the session first");
        check_room(held_.size() + batch.size(), params, batch, out);
        for (int64_t i = 0; i < pixels.size(0); ++i) held_.push_back(pixels.narrow(0, i, 1));
        held_indices_.insert(held_indices_.end(), batch.indices().begin(), batch.indices().end());
      } else {
        check_room(held_.size(), params, batch, out);
      }
      const int64_t complete = static_cast<int64_t>(held_.size()) / group * group;
      std::vector<at::Tensor> latents;
      if (complete > 0) latents.push_back(run(complete, group, result));
      if (params.end_of_clip) {
        const auto left = static_cast<uint32_t>(held_.size());
        if (left > 0 && params.pad_clip_end) {
          result.padded_frames = static_cast<uint32_t>(group) - left;
          for (uint32_t i = 0; i < result.padded_frames; ++i) held_.push_back(held_.back());
          latents.push_back(run(group, group, result));
        } else if (left > 0) {
          result.dropped = {held_indices_.front(), left};
        }
        reset();
      }
      // What stays held: copies, so that the batch's pixels are not kept alive.
      for (at::Tensor& frame : held_) frame = frame.clone();
      if (!latents.empty()) write(at::cat(latents, 0), params, out);
    } catch (const c10::Error& e) {
      reset();  // the state may be half updated: the next frame starts a new clip
      throw VaeError(std::string("encoding a batch of ") + std::to_string(batch.size()) + " frames of " +
                     std::to_string(batch.crop().width) + "x" + std::to_string(batch.crop().height) + " with " +
                     info.model_path + " on " + info.device + " failed: " + e.what_without_backtrace());
    }
    return result;
  }

 private:
  // The first `count` held frames (whole groups) through the network; their
  // spans into result. Returns raw float32 latents.
  at::Tensor run(int64_t count, int64_t group, BatchResult& result) {
    // Whole groups per pass, as many as fit kPassPixels (at least one): the
    // first layer's output is 64 channels at full resolution for every frame
    // of the pass. Passes chain through the MemBlock state, so the numbers do
    // not depend on how the groups are cut.
    const int64_t frame_pixels = held_.front().size(2) * held_.front().size(3);
    const int64_t per_pass = std::max<int64_t>(1, kPassPixels / (group * frame_pixels)) * group;
    std::vector<at::Tensor> passes;
    for (int64_t start = 0; start < count; start += per_pass) {
      const int64_t n = std::min(per_pass, count - start);
      std::vector<at::Tensor> frames(held_.begin() + start, held_.begin() + start + n);
      passes.push_back(network_forward(encoder_->network(), at::cat(frames, 0), state_));
    }
    at::Tensor normalised = passes.size() == 1 ? passes.front() : at::cat(passes, 0);
    result.report.sub_batch = per_pass;
    for (int64_t g = 0; g < count; g += group)
      result.spans.push_back({held_indices_[static_cast<size_t>(g)], static_cast<uint32_t>(group)});
    held_.erase(held_.begin(), held_.begin() + count);
    // Padding copies have no index of their own: at most the held ones go.
    const auto indexed = std::min<size_t>(static_cast<size_t>(count), held_indices_.size());
    held_indices_.erase(held_indices_.begin(), held_indices_.begin() + static_cast<std::ptrdiff_t>(indexed));
    return encoder_->to_raw(normalised);
  }

  // Before anything changes: `out` must hold what `frames` held frames give.
  void check_room(size_t frames, const EncodeParams& params, const FrameBatch& batch, const LatentBlock& out) const {
    const auto group = static_cast<size_t>(encoder_->network().frames_per_latent);
    size_t latents = frames / group;
    if (params.end_of_clip && params.pad_clip_end && frames % group) ++latents;
    const size_t needed = latents * encoder_->latent_floats_per_frame(batch);
    if (out.floats() < needed)
      throw VaeError("latent block of " + std::to_string(out.floats()) + " floats is too small for " +
                     std::to_string(latents) + " latents (" + std::to_string(needed) +
                     " floats; Encoder::new_latents(batch) gives room for max(batch size, 1))");
  }

  void write(const at::Tensor& raw, const EncodeParams& params, LatentBlock& out) {
    at::Tensor latents = raw_to_format(raw, params.latent_format).contiguous();
    at::Tensor host = out.storage().values;
    const bool async = host.is_pinned() && latents.device().is_cuda();
    host.narrow(0, 0, latents.numel()).view(latents.sizes()).copy_(latents, /*non_blocking=*/async);
    if (async) {
      c10::impl::VirtualGuardImpl impl(latents.device().type());
      impl.getStream(latents.device()).synchronize();
    }
  }

  std::shared_ptr<TaehvEncoder> encoder_;
  std::deque<at::Tensor> held_;           // 1 x 3 x H x W each, prepared, on the device
  std::deque<uint64_t> held_indices_;
  ClipState state_;
};

std::unique_ptr<EncodeSession> TaehvEncoder::open_session() {
  return std::make_unique<TaehvSession>(std::static_pointer_cast<TaehvEncoder>(shared_from_this()));
}

/* ---------------------------------------------------------------- detection */

const char* const kPrefix = "encoder.";

bool is_conv(const TensorInfo* t, int64_t kernel) {
  return t && t->shape.size() == 4 && t->shape[2] == kernel && t->shape[3] == kernel && t->shape[0] > 0;
}

// encoder.0 a 3x3 conv from RGB (space-to-depth'ed), encoder.2 a TPool (1x1
// conv, no 3x3 weight of its own), encoder.4 a MemBlock over frame and past.
// TAESD (`encoder.1.conv.0.weight`, `encoder.2.weight`) and the Wan VAE
// (`encoder.conv1.weight`, 5-D) never match.
bool detect_encoder(const SafetensorsFile& file) {
  const TensorInfo* first = file.find("encoder.0.weight");
  const TensorInfo* pool = file.find("encoder.2.conv.weight");
  const TensorInfo* mem = file.find("encoder.4.conv.0.weight");
  if (!is_conv(first, 3) || !is_conv(pool, 1) || !is_conv(mem, 3)) return false;
  const int64_t in = first->shape[1];
  bool rgb = false;
  for (int64_t p = 1; p <= 8; ++p) rgb = rgb || in == 3 * p * p;
  return rgb && !file.find("encoder.1.conv.0.weight") && !file.find("encoder.2.weight");
}

const Variant* variant_by_name(const std::string& name) {
  for (const Variant& v : kVariants)
    if (name == v.name) return &v;
  return nullptr;
}

std::string variant_names() {
  std::string names;
  for (const Variant& v : kVariants) names += (names.empty() ? "" : ", ") + std::string(v.name);
  return names;
}

// From the shapes; the option and the file name may only confirm it.
const Variant& resolve_variant(const SafetensorsFile& file, const ModelOptions& options, int64_t patch,
                               int64_t channels, int64_t frames) {
  const Variant* by_shape = nullptr;
  for (const Variant& v : kVariants)
    if (v.patch == patch && v.channels == channels && frames == 4) by_shape = &v;
  std::ostringstream shapes;
  shapes << channels << " latent channels, " << patch << "x" << patch << " input patches, " << frames
         << " frames per latent";
  if (!by_shape)
    throw CheckpointError("'" + file.path() + "' is a TAEHV model with " + shapes.str() +
                          ": only " + variant_names() +
                          " (Wan 2.1: 16 channels, no patches; Wan 2.2: 48 channels, 2x2 patches; both 4 frames "
                          "per latent) are supported");
  if (!options.latent_space.empty()) {
    const Variant* asked = variant_by_name(lowercase(options.latent_space));
    if (asked != by_shape)
      throw CheckpointError("'" + file.path() + "' is a TAEHV model whose shapes say " + by_shape->name +
                            " (" + shapes.str() + "), but the latent space '" + options.latent_space +
                            "' was asked for (TAEHV files: " + variant_names() + ")");
  }
  const std::string base = lowercase(basename_of(file.path()));
  for (const char* other : kOtherSpaces)
    if (base.rfind(other, 0) == 0 && !variant_by_name(lowercase(options.latent_space)))
      throw CheckpointError("'" + file.path() + "' is named like upstream's '" + other +
                            "' TAEHV file, whose latent space is not supported (only " + variant_names() +
                            "; some share their shapes); set the latent-space option to " + by_shape->name +
                            " if the file really is one");
  return *by_shape;
}

std::map<std::string, std::string> names_under(const SafetensorsFile& file, const std::string& prefix) {
  std::map<std::string, std::string> names;
  for (const auto& kv : file.tensors())
    if (kv.first.compare(0, prefix.size(), prefix) == 0) names[kv.first.substr(prefix.size())] = kv.first;
  return names;
}

std::shared_ptr<Encoder> load_encoder_file(std::shared_ptr<const SafetensorsFile> file, const ModelOptions& options) {
  const ComputeTarget target = resolve_target(options);
  apply_thread_option(options.threads);
  WeightReader reader(file, names_under(*file, kPrefix), target);
  SequentialLoader loader(reader, "encoder");
  Network net = load_encoder_network(loader);
  // The whole file is the TAEHV module: its decoder is left alone on purpose.
  reader.require_all_used({"TAEHV encoder (taehv layout)", "", {"decoder.*"}});
  const Variant& variant = resolve_variant(*file, options, net.patch, loader.channels(), net.frames_per_latent);

  EncoderInfo info;
  info.family = "taehv";
  info.model_path = file->path();
  info.layout = "taehv";
  info.downscale = static_cast<int>(8 * net.patch);
  info.latent_channels = static_cast<int>(loader.channels());
  info.temporal_downscale = static_cast<int>(net.frames_per_latent);
  info.input_signed = false;  // RGB in [0, 1]
  // The network's output is the Wan model's normalised space; this family
  // turns it into raw latents itself (per channel), so the generic path has
  // nothing left to undo.
  info.native_format = latent_format_by_name(variant.space);
  info.parameters = reader.parameters_loaded();
  std::ostringstream os;
  os << "TAEHV encoder " << variant.name << " for " << variant.model << " latents (from the shapes), " << net.width
     << " wide, C=" << info.latent_channels << ", downscale " << info.downscale << ", " << net.frames_per_latent
     << " frames per latent (groups 4k..4k+3), output de-normalised to raw " << variant.model << " latents";
  info.architecture = os.str();
  return std::make_shared<TaehvEncoder>(std::move(info), target, std::move(net));
}

/* ------------------------------------------------------------------ decoder */

// The decoder Sequential, by index: 0 Clamp (tanh(x / 3) * 3), 1 conv, 2 ReLU,
// then three stages of three MemBlocks, a nearest 2x upsampling, a TGrow
// (1x1 conv to `stride` frames' channels) and a 3x3 conv without bias (first
// index 3, 9, 15), then 21 ReLU and 22 conv. A clip's first latent gives
// frames_per_latent frames of which upstream keeps the last: decode_video
// trims frames_per_latent - 1 from the clip's start.
constexpr int kDecoderStageFirst[3] = {3, 9, 15};
constexpr int kDecoderLastConv = 22;

struct DecoderStage {
  MemBlock blocks[3];
  Conv grow;  // 1x1, no bias: n -> n * grow_frames
  int64_t grow_frames = 1;
  Conv conv;  // 3x3, no bias
};

struct DecoderNetwork {
  int64_t patch = 1;
  int64_t latent_channels = 0;
  Conv first;
  DecoderStage stages[3];
  Conv last;
  int64_t frames_per_latent = 1;
};

struct DecoderMemory {
  at::Tensor memory[3][3];  // each MemBlock's last input
  bool started = false;
  size_t bytes() const {
    size_t n = 0;
    for (const auto& stage : memory)
      for (const auto& m : stage)
        if (m.defined()) n += m.numel() * m.element_size();
    return n;
  }
};

// L normalised latents (compute dtype) of one clip, after what `state` saw ->
// their frames in [0, 1] before the clamp, L * frames_per_latent of them
// (the trim is the caller's).
at::Tensor decoder_forward(const DecoderNetwork& net, const at::Tensor& z, DecoderMemory& state) {
  const bool nhwc = use_onednn(z);
  auto layout = [&](const at::Tensor& t) { return nhwc ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous(); };
  at::Tensor x = layout(at::tanh(z / 3.0) * 3.0);
  x = run_conv(net.first, x).relu_();
  for (int s = 0; s < 3; ++s) {
    const DecoderStage& stage = net.stages[s];
    for (int b = 0; b < 3; ++b) {
      at::Tensor next_past = x.narrow(0, x.size(0) - 1, 1).clone();
      x = memblock_forward(stage.blocks[b], x, state.memory[s][b]);
      state.memory[s][b] = next_past;
    }
    x = at::upsample_nearest2d(x, {2 * x.size(2), 2 * x.size(3)});
    x = run_conv(stage.grow, x).contiguous();
    // Frame t's channels [k*n, (k+1)*n) become frame t * grow_frames + k.
    const int64_t n = x.size(1) / stage.grow_frames;
    x = layout(x.view({x.size(0) * stage.grow_frames, n, x.size(2), x.size(3)}));
    x = run_conv(stage.conv, x);
  }
  x = run_conv(net.last, x.relu_()).contiguous();
  return net.patch > 1 ? at::pixel_shuffle(x, net.patch) : x;
}

DecoderNetwork load_decoder_network(SequentialLoader& l) {
  DecoderNetwork net;
  const std::vector<int64_t> s1 = l.shape("1.weight", 4);
  net.latent_channels = s1[1];
  l.set_channels(s1[1]);
  net.first = l.conv("1", 3, 1, 1, true);
  for (int s = 0; s < 3; ++s) {
    DecoderStage& stage = net.stages[s];
    const int first = kDecoderStageFirst[s];
    for (int b = 0; b < 3; ++b) stage.blocks[b] = l.memblock(std::to_string(first + b));
    const std::string grow = std::to_string(first + 4) + ".conv";
    const int64_t n = l.channels();
    const std::vector<int64_t> gs = l.shape(grow + ".weight", 4);
    if (gs[0] % n != 0)
      l.fail(grow + ".weight", gs, "[k*" + std::to_string(n) + ", " + std::to_string(n) + ", 1, 1] (a TGrow to k frames)");
    stage.grow_frames = gs[0] / n;
    stage.grow = l.conv(grow, 1, 1, 0, false);
    l.set_channels(n);  // each grown frame has the width again
    net.frames_per_latent *= stage.grow_frames;
    stage.conv = l.conv(std::to_string(first + 5), 3, 1, 1, false);
  }
  const std::string last = std::to_string(kDecoderLastConv);
  const std::vector<int64_t> sl = l.shape(last + ".weight", 4);
  net.last = l.conv(last, 3, 1, 1, true);
  net.patch = patch_from(l, "decoder." + last + ".weight", sl[0], "gives");
  return net;
}

class TaehvDecoder final : public TorchDecoder {
 public:
  TaehvDecoder(DecoderInfo info, ComputeTarget target, DecoderNetwork net)
      : TorchDecoder(std::move(info), target), net_(std::move(net)) {
    probe();
  }

  struct State final : StreamState {
    DecoderMemory memory;
    size_t bytes() const override { return memory.bytes(); }
  };
  std::unique_ptr<StreamState> new_stream_state() const override { return std::make_unique<State>(); }
  at::Tensor forward_stream(const at::Tensor& z, StreamState& state) override {
    DecoderMemory& memory = static_cast<State&>(state).memory;
    at::Tensor frames = decoder_forward(net_, z, memory);
    if (!memory.started) {
      memory.started = true;
      const int64_t trim = net_.frames_per_latent - 1;
      frames = frames.narrow(0, trim, frames.size(0) - trim);
    }
    return frames;
  }

 protected:
  // Each latent as a clip of its own: its one kept frame.
  at::Tensor forward(const at::Tensor& z) override {
    std::vector<at::Tensor> frames;
    for (int64_t i = 0; i < z.size(0); ++i) {
      DecoderMemory memory;
      frames.push_back(decoder_forward(net_, z.narrow(0, i, 1), memory).narrow(0, net_.frames_per_latent - 1, 1));
    }
    return at::cat(frames, 0);
  }

 private:
  DecoderNetwork net_;
};

// decoder.1 a 3x3 conv from the latents, decoder.3 a MemBlock over frame and
// past, decoder.7 a TGrow (1x1). TAESD's decoder has a plain conv at 7
// (`decoder.7.weight`) and Blocks of one frame.
bool detect_decoder(const SafetensorsFile& file) {
  const TensorInfo* first = file.find("decoder.1.weight");
  const TensorInfo* mem = file.find("decoder.3.conv.0.weight");
  const TensorInfo* grow = file.find("decoder.7.conv.weight");
  return is_conv(first, 3) && is_conv(mem, 3) && is_conv(grow, 1) && mem->shape[1] == 2 * first->shape[0];
}

std::shared_ptr<Decoder> load_decoder_file(std::shared_ptr<const SafetensorsFile> file, const ModelOptions& options) {
  const ComputeTarget target = resolve_target(options);
  apply_thread_option(options.threads);
  WeightReader reader(file, names_under(*file, "decoder."), target);
  SequentialLoader loader(reader, "decoder");
  DecoderNetwork net = load_decoder_network(loader);
  reader.require_all_used({"TAEHV decoder (taehv layout)", "", {"encoder.*"}});
  const Variant& variant = resolve_variant(*file, options, net.patch, net.latent_channels, net.frames_per_latent);

  DecoderInfo info;
  info.family = "taehv";
  info.model_path = file->path();
  info.layout = "taehv";
  info.upscale = static_cast<int>(8 * net.patch);
  info.latent_channels = static_cast<int>(net.latent_channels);
  info.native_format = latent_format_by_name(variant.space);  // takes the Wan model's normalised space
  info.output_signed = false;  // [0, 1]
  info.temporal_upscale = static_cast<int>(net.frames_per_latent);
  info.first_latent_keeps_last = true;  // upstream trims the first 3 frames of a clip
  info.parameters = reader.parameters_loaded();
  std::ostringstream os;
  os << "TAEHV decoder " << variant.name << " for " << variant.model << " latents (from the shapes), C="
     << info.latent_channels << ", upscale " << info.upscale << ", " << net.frames_per_latent
     << " frames per latent (a clip's first latent keeps its last frame)";
  info.architecture = os.str();
  return std::make_shared<TaehvDecoder>(std::move(info), target, std::move(net));
}

}  // namespace

const EncoderFamily kTaehvEncoderFamily = {"taehv", detect_encoder, load_encoder_file};
const DecoderFamily kTaehvDecoderFamily = {"taehv", detect_decoder, load_decoder_file};

}  // namespace gstvae
