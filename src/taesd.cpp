// The tiny autoencoders of madebyollin/taesd (TAESD, TAESDXL, TAESD3, TAEF1,
// TAEF2; the TAESana encoder): plain nn.Sequential stacks of 3x3 convs, ReLUs
// and residual Blocks, with tensor names that are the Sequential indices
// (`1.conv.0.weight`). Widths and latent channels are read from the shapes;
// TAEF2's pool branches are used wherever their tensors are present.
//
// Their latents live in the diffusion model's *scaled* space, and the shapes
// do not say which one (SD and SDXL files are identical in shape), so the
// latent space comes from ModelOptions::latent_space, else ComfyUI's file-name
// rule (taesd_*, taesdxl_*, ...), else the safetensors metadata; otherwise
// loading fails and says how to name it.
#include <ATen/ATen.h>

#include <cctype>
#include <sstream>

#include "errors.h"
#include "families.h"
#include "name_rules.h"
#include "torch_decoder.h"
#include "torch_encoder.h"

namespace gstvae {

namespace {

// TAEF2's pool branch normalises 256 channels in 4 groups (nn.GroupNorm's
// default eps).
constexpr int64_t kPoolGroups = 4;
constexpr double kPoolNormEps = 1e-5;

/* ------------------------------------------------------------ latent spaces */

struct LatentSpace {
  const char* name;     // ComfyUI's file-name prefix without the '_'
  const char* model;    // the diffusion model whose latents these are
  const char* format;   // the LatentFormat of that model's scaled space ("raw": none)
  int channels;
  bool f32_encoder;     // the TAESana layout (two stride-2 convs before the first Block)
  const char* note;     // appended to the architecture summary
};

const LatentSpace kLatentSpaces[] = {
    {"taesd", "SD 1.x/2.x", "sd15", 4, false, ""},
    {"taesdxl", "SDXL", "sdxl", 4, false, ""},
    {"taesd3", "SD3", "sd3", 16, false, ""},
    {"taef1", "FLUX.1", "flux", 16, false, ""},
    // ComfyUI packs FLUX.2 latents 2x2 into 128 channels at H/16; this family
    // takes and gives the unpacked 32 x H/8 x W/8 latents.
    {"taef2", "FLUX.2", "raw", 32, false,
     "; unpacked 32-channel latents, not ComfyUI's 2x2-packed 128-channel FLUX.2 ones"},
    // Sana's scaling factor has not been checked against TAESana: raw as it comes.
    {"taesana", "Sana (DC-AE f32c32)", "raw", 32, true, "; relation to Sana's scaling factor not verified"},
};

std::string known_space_names() {
  std::string names;
  for (const LatentSpace& s : kLatentSpaces) names += (names.empty() ? "" : ", ") + std::string(s.name);
  return names;
}

const LatentSpace* space_by_name(const std::string& name) {
  for (const LatentSpace& s : kLatentSpaces)
    if (name == s.name) return &s;
  return nullptr;
}

// ComfyUI's rule: a file whose name starts with "taesdxl_" belongs to SDXL,
// and so on. Case is ignored ("TAESDXL_encoder.safetensors" is SDXL too).
const LatentSpace* space_from_file_name(const std::string& path) {
  const std::string base = lowercase(basename_of(path));
  for (const LatentSpace& s : kLatentSpaces)
    if (base.rfind(std::string(s.name) + "_", 0) == 0) return &s;
  return nullptr;
}

// "taesdxl", "taesdxl encoder", "taesdxl/decoder": the leading word names it.
const LatentSpace* space_from_word(const std::string& value) {
  const std::string v = lowercase(value);
  size_t end = 0;
  while (end < v.size() && std::isalnum(static_cast<unsigned char>(v[end]))) ++end;
  return space_by_name(v.substr(0, end));
}

struct ResolvedSpace {
  const LatentSpace* space;
  std::string source;  // how it was told, for the architecture summary
};

// The option wins over everything, then the file name, then the metadata.
ResolvedSpace resolve_space(const SafetensorsFile& file, const ModelOptions& options, const char* what,
                            int channels) {
  if (!options.latent_space.empty()) {
    const LatentSpace* s = space_by_name(lowercase(options.latent_space));
    if (!s)
      throw VaeError("unknown TAESD latent space '" + options.latent_space + "' (known: " + known_space_names() +
                     ")");
    return {s, "set by the latent-space option"};
  }
  if (const LatentSpace* s = space_from_file_name(file.path())) return {s, "from the file name"};
  const auto& meta = file.metadata();
  for (const char* key : {"latent_space", "modelspec.architecture", "model"}) {
    auto it = meta.find(key);
    if (it == meta.end()) continue;
    if (const LatentSpace* s = space_from_word(it->second))
      return {s, std::string("from the metadata '") + key + "'"};
  }
  auto it = meta.find("source_path");  // where the file was converted from
  if (it != meta.end())
    if (const LatentSpace* s = space_from_file_name(it->second)) return {s, "from the metadata 'source_path'"};
  throw CheckpointError("'" + file.path() + "' is a TAESD " + what + " (" + std::to_string(channels) +
                        " latent channels) whose latent space cannot be told from its name or metadata: SD 1.x "
                        "(taesd) and SDXL (taesdxl) files have identical shapes, as do SD3 (taesd3) and FLUX.1 "
                        "(taef1). Name the file as ComfyUI expects (taesd_*, taesdxl_*, taesd3_*, taef1_*, "
                        "taef2_* or taesana_*) or set the latent-space property to one of " +
                        known_space_names());
}

LatentFormat native_format_of(const LatentSpace& space) {
  return std::string(space.format) == "raw" ? LatentFormat{} : latent_format_by_name(space.format);
}

// "SDXL (latent space taesdxl from the file name: scale 0.13025, shift 0)"
std::string describe_space(const ResolvedSpace& r) {
  std::ostringstream os;
  const LatentFormat f = native_format_of(*r.space);
  os << r.space->model << " (latent space " << r.space->name << " " << r.source << ": ";
  if (f.is_raw())
    os << "no scale or shift";
  else
    os << "scale " << f.scale << ", shift " << f.shift;
  os << r.space->note << ")";
  return os.str();
}

/* ------------------------------------------------------------------ layers */

enum class Op { Conv, Block, ReLU, Clamp, Upsample };

// One step of the Sequential: its index is the prefix of its tensor names.
struct Step {
  Op op;
  int index;
  int64_t stride = 1;
};

struct Conv {
  at::Tensor weight, bias;  // bias undefined for the stride-2 convs
  int64_t stride = 1;
};

struct Pool {
  at::Tensor expand, norm_weight, norm_bias, project;
};

struct Block {
  Conv conv0, conv2, conv4;
  at::Tensor skip;  // 1x1, no bias; undefined when widths agree (every released file)
  bool has_pool = false;
  Pool pool;
};

struct Layer {
  Op op;
  Conv conv;
  Block block;
};

// The encoder of TAESD..TAEF2: conv, Block, then three stages of a stride-2
// conv and three Blocks, then the conv to the latent channels.
std::vector<Step> f8_encoder_plan() {
  std::vector<Step> plan = {{Op::Conv, 0}, {Op::Block, 1}};
  for (int stage = 0; stage < 3; ++stage) {
    const int first = 2 + 4 * stage;
    plan.push_back({Op::Conv, first, 2});
    for (int b = 1; b <= 3; ++b) plan.push_back({Op::Block, first + b});
  }
  plan.push_back({Op::Conv, 14});
  return plan;
}

// TAESana's F32Encoder: two stride-2 convs with ReLUs before the first Block.
std::vector<Step> f32_encoder_plan() {
  std::vector<Step> plan = {{Op::Conv, 0, 2}, {Op::ReLU, 1}, {Op::Conv, 2, 2}, {Op::ReLU, 3}, {Op::Block, 4}};
  for (int stage = 0; stage < 3; ++stage) {
    const int first = 5 + 4 * stage;
    plan.push_back({Op::Conv, first, 2});
    for (int b = 1; b <= 3; ++b) plan.push_back({Op::Block, first + b});
  }
  plan.push_back({Op::Conv, 17});
  return plan;
}

// Clamp, conv + ReLU, then three stages of three Blocks, a x2 upsample and a
// conv, then a Block and the conv to RGB.
std::vector<Step> decoder_plan() {
  std::vector<Step> plan = {{Op::Clamp, 0}, {Op::Conv, 1}, {Op::ReLU, 2}};
  for (int stage = 0; stage < 3; ++stage) {
    const int first = 3 + 5 * stage;
    for (int b = 0; b < 3; ++b) plan.push_back({Op::Block, first + b});
    plan.push_back({Op::Upsample, first + 3});
    plan.push_back({Op::Conv, first + 4});
  }
  plan.push_back({Op::Block, 18});
  plan.push_back({Op::Conv, 19});
  return plan;
}

// Loads the layers of `plan`, following the channel count from `in_channels`
// through the shapes in the file, so widths are never assumed.
class SequentialLoader {
 public:
  SequentialLoader(WeightReader& w, int64_t in_channels) : w_(w), channels_(in_channels) {}

  std::vector<Layer> load(const std::vector<Step>& plan) {
    std::vector<Layer> layers;
    for (const Step& step : plan) {
      Layer layer{step.op, {}, {}};
      const std::string p = std::to_string(step.index);
      if (step.op == Op::Conv) layer.conv = conv(p, 3, step.stride, true);
      if (step.op == Op::Block) layer.block = block(p);
      layers.push_back(std::move(layer));
    }
    return layers;
  }

  int64_t channels() const { return channels_; }
  const std::vector<int>& pooled_blocks() const { return pooled_; }

 private:
  // A conv from the current channel count to what its weight says.
  Conv conv(const std::string& p, int64_t kernel, int64_t stride, bool optional_bias) {
    const std::string name = p + ".weight";
    const std::vector<int64_t> s = w_.shape(name);
    if (s.size() != 4 || s[0] < 1)
      throw CheckpointError("'" + w_.path() + "': tensor '" + name + "' has shape " + shape_string(s) +
                            ", expected [out, " + std::to_string(channels_) + ", " + std::to_string(kernel) + ", " +
                            std::to_string(kernel) + "]");
    Conv c;
    c.weight = w_.get(name, {s[0], channels_, kernel, kernel});
    if (optional_bias && w_.has(p + ".bias")) c.bias = w_.get(p + ".bias", {s[0]});
    c.stride = stride;
    channels_ = s[0];
    return c;
  }

  Block block(const std::string& p) {
    Block b;
    const int64_t in = channels_;
    if (w_.has(p + ".pool.0.weight")) {
      const std::vector<int64_t> s = w_.shape(p + ".pool.0.weight");
      const int64_t hidden = s.empty() ? 0 : s[0];
      if (hidden < 1 || hidden % kPoolGroups != 0)
        throw CheckpointError("'" + w_.path() + "': tensor '" + p + ".pool.0.weight' has shape " + shape_string(s) +
                              ", expected [hidden, " + std::to_string(in) + ", 1, 1] with hidden a multiple of " +
                              std::to_string(kPoolGroups) + " (GroupNorm groups)");
      b.has_pool = true;
      b.pool.expand = w_.get(p + ".pool.0.weight", {hidden, in, 1, 1});
      b.pool.norm_weight = w_.get(p + ".pool.1.weight", {hidden});
      b.pool.norm_bias = w_.get(p + ".pool.1.bias", {hidden});
      b.pool.project = w_.get(p + ".pool.3.weight", {in, hidden, 1, 1});
      pooled_.push_back(std::stoi(p));
    }
    b.conv0 = conv(p + ".conv.0", 3, 1, true);
    b.conv2 = conv(p + ".conv.2", 3, 1, true);
    b.conv4 = conv(p + ".conv.4", 3, 1, true);
    if (channels_ != in) b.skip = w_.get(p + ".skip.weight", {channels_, in, 1, 1});
    return b;
  }

  WeightReader& w_;
  int64_t channels_;
  std::vector<int> pooled_;
};

at::Tensor block_forward(const Block& b, at::Tensor x) {
  if (b.has_pool) {
    at::Tensor p = conv2d(x, b.pool.expand, at::Tensor());
    // GroupNorm in NCHW: LibTorch 1.13's CPU GroupNorm is not to be trusted on
    // channels-last input (wrong bf16 values, see prepare_pixels).
    p = at::group_norm(p.contiguous(), kPoolGroups, b.pool.norm_weight, b.pool.norm_bias, kPoolNormEps);
    x = x + conv2d(at::relu_(p), b.pool.project, at::Tensor());
  }
  at::Tensor h = conv2d(x, b.conv0.weight, b.conv0.bias, 1, 1).relu_();
  h = conv2d(h, b.conv2.weight, b.conv2.bias, 1, 1).relu_();
  h = conv2d(h, b.conv4.weight, b.conv4.bias, 1, 1);
  // h is a fresh tensor: add the skip and apply the fusing ReLU in place.
  h.add_(b.skip.defined() ? conv2d(x, b.skip, at::Tensor()) : x);
  return at::relu_(h);
}

at::Tensor run_layers(const std::vector<Layer>& layers, at::Tensor x) {
  // fp32 on the CPU runs channels-last: oneDNN's NHWC convolutions skip the
  // layout reorders around every conv of these 64-channel layers (1.24x at
  // 256², docs/performance.md), as ComfyUI's eager path does by accident of
  // its movedim. Other targets keep NCHW.
  const bool nhwc = use_onednn(x);
  if (nhwc) x = x.contiguous(at::MemoryFormat::ChannelsLast);
  for (const Layer& l : layers) {
    switch (l.op) {
      case Op::Conv: x = conv2d(x, l.conv.weight, l.conv.bias, l.conv.stride, 1); break;
      case Op::Block: x = block_forward(l.block, x); break;
      // Every ReLU follows a conv, whose output no one else holds.
      case Op::ReLU: x = at::relu_(x); break;
      case Op::Clamp: x = at::tanh(x / 3.0) * 3.0; break;
      case Op::Upsample: x = at::upsample_nearest2d(x, {x.size(2) * 2, x.size(3) * 2}); break;
    }
  }
  return nhwc ? x.contiguous() : x;
}

std::string pools_text(const std::vector<int>& pooled) {
  if (pooled.empty()) return "no";
  std::string s = "Blocks";
  for (size_t i = 0; i < pooled.size(); ++i) s += (i ? ", " : " ") + std::to_string(pooled[i]);
  return s;
}

/* ---------------------------------------------------------------- file keys */

// Upstream's TAESD module holds `encoder` and `decoder`; ComfyUI's holds
// `taesd_encoder` and `taesd_decoder`; the released files have no prefix.
// Returns the prefix under which `first` (a [W, cin, 3, 3] conv with cin ==
// `in_channels` when it is > 0) and `second` exist, or nullptr.
const char* find_prefix(const SafetensorsFile& file, const std::vector<const char*>& prefixes, const char* first,
                        int64_t in_channels, const char* second) {
  for (const char* prefix : prefixes) {
    const TensorInfo* t = file.find(std::string(prefix) + first);
    if (!t || !file.find(std::string(prefix) + second)) continue;
    if (t->shape.size() != 4 || t->shape[2] != 3 || t->shape[3] != 3) continue;
    if (in_channels > 0 && t->shape[1] != in_channels) continue;
    return prefix;
  }
  return nullptr;
}

const std::vector<const char*> kEncoderPrefixes = {"", "encoder.", "taesd_encoder."};
const std::vector<const char*> kDecoderPrefixes = {"", "decoder.", "taesd_decoder."};

// Encoder layouts: TAESD ("0" conv from RGB, "1" a Block) or TAESana ("0" and
// "2" convs, "4" the first Block).
const char* f8_encoder_prefix(const SafetensorsFile& f) {
  return find_prefix(f, kEncoderPrefixes, "0.weight", 3, "1.conv.0.weight");
}
const char* f32_encoder_prefix(const SafetensorsFile& f) {
  const char* p = find_prefix(f, kEncoderPrefixes, "0.weight", 3, "4.conv.0.weight");
  return p && f.find(std::string(p) + "2.weight") && !f.find(std::string(p) + "1.conv.0.weight") ? p : nullptr;
}
const char* decoder_prefix(const SafetensorsFile& f) {
  return find_prefix(f, kDecoderPrefixes, "1.weight", 0, "3.conv.0.weight");
}

// Canonical (unprefixed) name -> name in the file, for every tensor under `prefix`.
std::map<std::string, std::string> names_under(const SafetensorsFile& file, const std::string& prefix) {
  std::map<std::string, std::string> names;
  for (const auto& kv : file.tensors())
    if (kv.first.compare(0, prefix.size(), prefix) == 0) names[kv.first.substr(prefix.size())] = kv.first;
  return names;
}

// A TAESD file is claimed whole: a standalone encoder or decoder file is all
// of it, and the module files of upstream (`encoder.*`, `decoder.*`) and
// ComfyUI (`taesd_encoder.*`, `taesd_decoder.*`) hold the other half, which is
// left alone on purpose. `other` is that half's prefix for a `prefix` of this
// half ("" for a standalone file).
TensorClaim taesd_claim(const std::string& what, const std::string& prefix, const std::string& other) {
  TensorClaim claim{what + " (" + (prefix.empty() ? "taesd layout" : "taesd layout under '" + prefix + "'") + ")",
                    "", {}};
  if (!prefix.empty()) claim.deliberately_unused.push_back(other + "*");
  return claim;
}

std::string layout_text(const std::string& prefix) {
  return prefix.empty() ? "taesd" : "taesd under '" + prefix + "'";
}

void check_channels(const std::string& path, const ResolvedSpace& r, int64_t channels) {
  if (channels != r.space->channels)
    throw CheckpointError("'" + path + "' has " + std::to_string(channels) + " latent channels, but its latent space " +
                          r.space->name + " (" + r.source + ", " + r.space->model + ") has " +
                          std::to_string(r.space->channels));
}

/* ------------------------------------------------------------------ encoder */

class TaesdEncoder final : public TorchEncoder {
 public:
  TaesdEncoder(EncoderInfo info, ComputeTarget target, std::vector<Layer> layers)
      : TorchEncoder(std::move(info), target), layers_(std::move(layers)) {
    probe();
  }

 protected:
  // Deterministic: the latent itself, no variance.
  Moments forward(const at::Tensor& pixels) override { return {run_layers(layers_, pixels), at::Tensor()}; }

 private:
  std::vector<Layer> layers_;
};

bool detect_encoder(const SafetensorsFile& file) { return f8_encoder_prefix(file) || f32_encoder_prefix(file); }

std::shared_ptr<Encoder> load_encoder_file(std::shared_ptr<const SafetensorsFile> file, const ModelOptions& options) {
  const char* f8 = f8_encoder_prefix(*file);
  const bool f32 = !f8;
  // Loaders are also called without detect() (tests force every family on
  // every file): a file of another family is an error, not a null prefix.
  if (!f8 && !f32_encoder_prefix(*file))
    throw CheckpointError("'" + file->path() + "' is not a TAESD-family encoder: no RGB conv '0.weight' followed "
                          "by a Block ('1.conv.0.weight') or a TAESana stem ('2.weight', '4.conv.0.weight'), "
                          "nor under 'encoder.' or 'taesd_encoder.'");
  const std::string prefix = f8 ? f8 : f32_encoder_prefix(*file);
  const std::vector<Step> plan = f32 ? f32_encoder_plan() : f8_encoder_plan();
  const int64_t channels_out = [&] {
    const TensorInfo* last = file->find(prefix + std::to_string(plan.back().index) + ".weight");
    return last && !last->shape.empty() ? last->shape[0] : 0;
  }();
  const ResolvedSpace space = resolve_space(*file, options, "encoder", static_cast<int>(channels_out));
  if (space.space->f32_encoder != f32)
    throw CheckpointError("'" + file->path() + "' has the layout of " +
                          (f32 ? "a TAESana (f32) encoder" : "a TAESD (f8) encoder") + ", but its latent space " +
                          space.space->name + " (" + space.source + ") belongs to " +
                          (space.space->f32_encoder ? "a TAESana encoder" : "a TAESD (f8) encoder"));

  const ComputeTarget target = resolve_target(options);
  apply_thread_option(options.threads);
  WeightReader reader(file, names_under(*file, prefix), target);
  SequentialLoader loader(reader, 3);
  std::vector<Layer> layers = loader.load(plan);
  check_channels(file->path(), space, loader.channels());
  reader.require_all_used(taesd_claim(f32 ? "TAESana encoder" : "TAESD encoder", prefix,
                                      prefix == "taesd_encoder." ? "taesd_decoder." : "decoder."));

  EncoderInfo info;
  info.family = "taesd";
  info.model_path = file->path();
  info.layout = layout_text(prefix);
  int downscale = 1;
  for (const Step& s : plan) downscale *= static_cast<int>(s.stride);
  info.downscale = downscale;
  info.latent_channels = static_cast<int>(loader.channels());
  info.input_signed = false;  // TAESD takes RGB in [0, 1]
  info.native_format = native_format_of(*space.space);
  info.parameters = reader.parameters_loaded();
  std::ostringstream os;
  os << (f32 ? "TAESana encoder" : "TAESD encoder") << " for " << describe_space(space) << ", "
     << layers.front().conv.weight.size(0) << " wide, C=" << info.latent_channels << ", downscale " << downscale
     << ", pool branches: " << pools_text(loader.pooled_blocks());
  info.architecture = os.str();
  return std::make_shared<TaesdEncoder>(std::move(info), target, std::move(layers));
}

/* ------------------------------------------------------------------ decoder */

class TaesdDecoder final : public TorchDecoder {
 public:
  TaesdDecoder(DecoderInfo info, ComputeTarget target, std::vector<Layer> layers)
      : TorchDecoder(std::move(info), target), layers_(std::move(layers)) {
    probe();
  }

 protected:
  at::Tensor forward(const at::Tensor& z) override { return run_layers(layers_, z); }

 private:
  std::vector<Layer> layers_;
};

bool detect_decoder(const SafetensorsFile& file) { return decoder_prefix(file) != nullptr; }

std::shared_ptr<Decoder> load_decoder_file(std::shared_ptr<const SafetensorsFile> file, const ModelOptions& options) {
  if (!decoder_prefix(*file))
    throw CheckpointError("'" + file->path() + "' is not a TAESD decoder: no 3x3 conv '1.weight' followed by a "
                          "Block ('3.conv.0.weight'), nor under 'decoder.' or 'taesd_decoder.'");
  const std::string prefix = decoder_prefix(*file);
  const int64_t channels_in = file->find(prefix + "1.weight")->shape[1];
  const ResolvedSpace space = resolve_space(*file, options, "decoder", static_cast<int>(channels_in));
  if (space.space->f32_encoder)
    throw CheckpointError("'" + file->path() + "': no TAESana decoder is supported (latent space " +
                          space.space->name + ", " + space.source + "); only its encoder is");
  check_channels(file->path(), space, channels_in);

  const ComputeTarget target = resolve_target(options);
  apply_thread_option(options.threads);
  WeightReader reader(file, names_under(*file, prefix), target);
  SequentialLoader loader(reader, channels_in);
  const std::vector<Step> plan = decoder_plan();
  std::vector<Layer> layers = loader.load(plan);
  if (loader.channels() != 3)
    throw CheckpointError("'" + file->path() + "': tensor '" + prefix + "19.weight' gives " +
                          std::to_string(loader.channels()) + " output channels, expected 3 (RGB)");
  reader.require_all_used(
      taesd_claim("TAESD decoder", prefix, prefix == "taesd_decoder." ? "taesd_encoder." : "encoder."));

  DecoderInfo info;
  info.family = "taesd";
  info.model_path = file->path();
  info.layout = layout_text(prefix);
  int upscale = 1;
  for (const Step& s : plan)
    if (s.op == Op::Upsample) upscale *= 2;
  info.upscale = upscale;
  info.latent_channels = static_cast<int>(channels_in);
  info.native_format = native_format_of(*space.space);
  info.output_signed = false;  // RGB in about [0, 1]
  info.parameters = reader.parameters_loaded();
  std::ostringstream os;
  os << "TAESD decoder for " << describe_space(space) << ", " << layers[1].conv.weight.size(0)
     << " wide, C=" << info.latent_channels << ", pool branches: " << pools_text(loader.pooled_blocks());
  info.architecture = os.str();
  return std::make_shared<TaesdDecoder>(std::move(info), target, std::move(layers));
}

}  // namespace

const EncoderFamily kTaesdEncoderFamily = {"taesd", detect_encoder, load_encoder_file};
const DecoderFamily kTaesdDecoderFamily = {"taesd", detect_decoder, load_decoder_file};

}  // namespace gstvae
