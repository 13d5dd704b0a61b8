// Test fixtures: random-weight KL-VAE checkpoints in the layouts found in the
// wild, scratch directories and synthetic frames. No LibTorch here: weights are
// drawn with <random> and written with gstvae::write_safetensors.
#include "fixtures.h"

#include "errors.h"
#include "families.h"

#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <stdexcept>
#include <utility>

namespace gstvae::test {

namespace {

// ---------------------------------------------------------------- dtypes

uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  // Round to nearest, ties to even, on the 16 bits dropped.
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

uint16_t float_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u)  // Inf or NaN
    return static_cast<uint16_t>(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0u));
  if (absx >= 0x477ff000u)  // >= 65520 rounds to Inf
    return static_cast<uint16_t>(sign | 0x7c00u);
  const int e = static_cast<int>(absx >> 23);  // biased float exponent
  const uint32_t mant = absx & 0x7fffffu;
  if (e >= 113) {  // normal half (>= 2^-14)
    uint32_t bits = (static_cast<uint32_t>(e - 112) << 10) | (mant >> 13);
    const uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (bits & 1u))) ++bits;  // carry may bump the exponent
    return static_cast<uint16_t>(sign | bits);
  }
  if (e < 102) return static_cast<uint16_t>(sign);  // below half the smallest subnormal
  // Subnormal half: value = m * 2^(e-150) = hm * 2^-24  =>  hm = m >> (126 - e).
  const uint32_t m = mant | 0x800000u;
  const int shift = 126 - e;  // 14..24
  uint32_t r = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1);
  if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
  return static_cast<uint16_t>(sign | r);
}

// Raw little-endian bytes of `values` in `dtype` (F32, F16 or BF16).
std::vector<uint8_t> encode_floats(const std::vector<float>& values, DType dtype) {
  std::vector<uint8_t> out;
  if (dtype == DType::F32) {
    out.resize(values.size() * 4);
    std::memcpy(out.data(), values.data(), out.size());
    return out;
  }
  if (dtype != DType::F16 && dtype != DType::BF16)
    throw std::invalid_argument("write_test_vae: dtype must be F32, F16 or BF16");
  out.resize(values.size() * 2);
  for (size_t i = 0; i < values.size(); ++i) {
    const uint16_t h = dtype == DType::F16 ? float_to_f16(values[i]) : float_to_bf16(values[i]);
    out[2 * i] = static_cast<uint8_t>(h & 0xff);
    out[2 * i + 1] = static_cast<uint8_t>(h >> 8);
  }
  return out;
}

// ---------------------------------------------------------------- weights

enum class Init { ConvWeight, Bias, NormWeight, NormBias };

struct Canonical {
  std::string name;  // LDM name
  std::vector<int64_t> shape;
  Init init;
};

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// Each tensor has its own stream seeded from (seed, name), so that the same
// seed gives the same weights whatever the layout, drops or reshapes.
std::vector<float> random_values(uint64_t seed, const std::string& name, const std::vector<int64_t>& shape,
                                 Init init) {
  std::mt19937_64 rng(seed * 0x9e3779b97f4a7c15ull ^ fnv1a(name));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t n = numel(shape);
  float scale = 1.0f, offset = 0.0f;
  switch (init) {
    case Init::ConvWeight: {
      int64_t fan_in = 1;
      for (size_t i = 1; i < shape.size(); ++i) fan_in *= shape[i];
      if (shape.size() < 2) fan_in = std::max<int64_t>(1, n);
      scale = 1.0f / std::sqrt(static_cast<float>(std::max<int64_t>(1, fan_in)));
      break;
    }
    case Init::Bias: scale = 0.05f; break;
    case Init::NormWeight: scale = 0.1f; offset = 1.0f; break;
    case Init::NormBias: scale = 0.1f; break;
  }
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = offset + scale * normal(rng);
  return v;
}

void add_conv(std::vector<Canonical>& out, const std::string& name, int64_t o, int64_t i, int64_t k) {
  out.push_back({name + ".weight", {o, i, k, k}, Init::ConvWeight});
  out.push_back({name + ".bias", {o}, Init::Bias});
}

void add_norm(std::vector<Canonical>& out, const std::string& name, int64_t c) {
  out.push_back({name + ".weight", {c}, Init::NormWeight});
  out.push_back({name + ".bias", {c}, Init::NormBias});
}

void add_resblock(std::vector<Canonical>& out, const std::string& p, int64_t in, int64_t o) {
  add_norm(out, p + ".norm1", in);
  add_conv(out, p + ".conv1", o, in, 3);
  add_norm(out, p + ".norm2", o);
  add_conv(out, p + ".conv2", o, o, 3);
  if (in != o) add_conv(out, p + ".nin_shortcut", o, in, 1);
}

std::vector<Canonical> canonical_encoder(const VaeSpec& spec) {
  std::vector<Canonical> t;
  const int64_t ch = spec.ch;
  add_conv(t, "encoder.conv_in", ch, 3, 3);
  int64_t in = ch;
  for (size_t i = 0; i < spec.mult.size(); ++i) {
    const int64_t width = ch * spec.mult[i];
    const std::string p = "encoder.down." + std::to_string(i);
    for (int j = 0; j < spec.blocks; ++j) {
      add_resblock(t, p + ".block." + std::to_string(j), in, width);
      in = width;
    }
    if (i + 1 < spec.mult.size()) add_conv(t, p + ".downsample.conv", width, width, 3);
  }
  add_resblock(t, "encoder.mid.block_1", in, in);
  add_norm(t, "encoder.mid.attn_1.norm", in);
  for (const char* n : {"q", "k", "v", "proj_out"}) add_conv(t, std::string("encoder.mid.attn_1.") + n, in, in, 1);
  add_resblock(t, "encoder.mid.block_2", in, in);
  add_norm(t, "encoder.norm_out", in);
  add_conv(t, "encoder.conv_out", 2 * spec.z, in, 3);
  if (spec.quant_conv) add_conv(t, "quant_conv", 2 * spec.z, 2 * spec.z, 1);
  return t;
}

// The whole decoder, LDM names: post_quant_conv, conv_in, mid, up levels from
// the deepest, norm_out, conv_out.
std::vector<Canonical> canonical_decoder(const VaeSpec& spec) {
  std::vector<Canonical> t;
  const int64_t ch = spec.ch;
  const int64_t deepest = ch * spec.mult.back();
  if (spec.quant_conv) add_conv(t, "post_quant_conv", spec.z, spec.z, 1);
  add_conv(t, "decoder.conv_in", deepest, spec.z, 3);
  add_resblock(t, "decoder.mid.block_1", deepest, deepest);
  add_norm(t, "decoder.mid.attn_1.norm", deepest);
  for (const char* n : {"q", "k", "v", "proj_out"}) add_conv(t, std::string("decoder.mid.attn_1.") + n, deepest, deepest, 1);
  add_resblock(t, "decoder.mid.block_2", deepest, deepest);
  int64_t in = deepest;
  for (size_t i = spec.mult.size(); i-- > 0;) {
    const int64_t width = ch * spec.mult[i];
    const std::string p = "decoder.up." + std::to_string(i);
    for (int j = 0; j < spec.blocks + 1; ++j) {
      add_resblock(t, p + ".block." + std::to_string(j), in, width);
      in = width;
    }
    if (i != 0) add_conv(t, p + ".upsample.conv", width, width, 3);
  }
  add_norm(t, "decoder.norm_out", in);
  add_conv(t, "decoder.conv_out", 3, in, 3);
  return t;
}

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

bool replace_prefix(std::string& s, const std::string& from, const std::string& to) {
  if (!starts_with(s, from)) return false;
  s = to + s.substr(from.size());
  return true;
}

// LDM name -> diffusers name (new or old attention naming). `levels` numbers
// the decoder's up blocks, which diffusers counts from the deepest level.
std::string diffusers_name(const std::string& ldm, bool old_attention, size_t levels = 0) {
  std::string s = ldm;
  if (starts_with(s, "decoder.up.")) {
    const size_t i_end = s.find('.', 11);
    const size_t i = std::stoul(s.substr(11, i_end - 11));
    std::string rest = s.substr(i_end + 1);
    const std::string block = "decoder.up_blocks." + std::to_string(levels - 1 - i) + ".";
    if (starts_with(rest, "block.")) {
      const size_t j_end = rest.find('.', 6);
      std::string tail = rest.substr(j_end + 1);
      replace_prefix(tail, "nin_shortcut.", "conv_shortcut.");
      return block + "resnets." + rest.substr(6, j_end - 6) + "." + tail;
    }
    if (replace_prefix(rest, "upsample.conv.", "upsamplers.0.conv.")) return block + rest;
    return s;
  }
  if (starts_with(s, "decoder.")) {
    // The mid block, attention and norm_out are named as in the encoder.
    std::string as_encoder = "encoder." + s.substr(8);
    std::string mapped = diffusers_name(as_encoder, old_attention, levels);
    return mapped == as_encoder ? s : "decoder." + mapped.substr(8);
  }
  if (starts_with(s, "encoder.down.")) {
    // encoder.down.{i}.block.{j}.X / encoder.down.{i}.downsample.conv.X
    const size_t i_end = s.find('.', 13);
    const std::string i = s.substr(13, i_end - 13);
    std::string rest = s.substr(i_end + 1);
    if (starts_with(rest, "block.")) {
      const size_t j_end = rest.find('.', 6);
      const std::string j = rest.substr(6, j_end - 6);
      std::string tail = rest.substr(j_end + 1);
      replace_prefix(tail, "nin_shortcut.", "conv_shortcut.");
      return "encoder.down_blocks." + i + ".resnets." + j + "." + tail;
    }
    if (replace_prefix(rest, "downsample.conv.", "downsamplers.0.conv."))
      return "encoder.down_blocks." + i + "." + rest;
    return s;
  }
  for (int b = 1; b <= 2; ++b) {
    const std::string from = "encoder.mid.block_" + std::to_string(b) + ".";
    if (starts_with(s, from)) {
      std::string tail = s.substr(from.size());
      replace_prefix(tail, "nin_shortcut.", "conv_shortcut.");
      return "encoder.mid_block.resnets." + std::to_string(b - 1) + "." + tail;
    }
  }
  const std::string a = "encoder.mid_block.attentions.0.";
  if (replace_prefix(s, "encoder.mid.attn_1.norm.", a + "group_norm.")) return s;
  if (replace_prefix(s, "encoder.mid.attn_1.q.", a + (old_attention ? "query." : "to_q."))) return s;
  if (replace_prefix(s, "encoder.mid.attn_1.k.", a + (old_attention ? "key." : "to_k."))) return s;
  if (replace_prefix(s, "encoder.mid.attn_1.v.", a + (old_attention ? "value." : "to_v."))) return s;
  if (replace_prefix(s, "encoder.mid.attn_1.proj_out.", a + (old_attention ? "proj_attn." : "to_out.0."))) return s;
  if (replace_prefix(s, "encoder.norm_out.", "encoder.conv_norm_out.")) return s;
  return s;
}

struct Pending {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

}  // namespace

void write_test_vae(const std::string& path, const VaeSpec& spec) {
  if (spec.mult.empty()) throw std::invalid_argument("write_test_vae: mult is empty");
  std::string prefix;
  bool diffusers = false, old_attention = false, flux2 = false;
  if (spec.layout == "ldm") {
  } else if (spec.layout == "first_stage_model") {
    prefix = "first_stage_model.";
  } else if (spec.layout == "vae") {
    prefix = "vae.";
  } else if (spec.layout == "diffusers") {
    diffusers = true;
  } else if (spec.layout == "diffusers_old") {
    diffusers = old_attention = true;
  } else if (spec.layout == "flux2") {
    flux2 = true;
  } else {
    throw std::invalid_argument("write_test_vae: unknown layout '" + spec.layout + "'");
  }

  std::vector<Pending> out;
  std::vector<Canonical> parts;
  if (spec.include_encoder) parts = canonical_encoder(spec);
  if (spec.include_decoder && spec.full_decoder) {
    const std::vector<Canonical> dec = canonical_decoder(spec);
    parts.insert(parts.end(), dec.begin(), dec.end());
  }
  for (const Canonical& c : parts) {
    bool dropped = false;
    for (const auto& d : spec.drop)
      if (d == c.name) dropped = true;
    if (dropped) continue;
    std::vector<int64_t> shape = c.shape;
    auto r = spec.reshape.find(c.name);
    const bool reshaped = r != spec.reshape.end();
    if (reshaped) shape = r->second;
    std::vector<float> values = random_values(spec.seed, c.name, shape, c.init);
    std::string name = c.name;
    if (diffusers) {
      name = diffusers_name(c.name, old_attention, spec.mult.size());
      // diffusers stores the attention projections as Linear [C, C].
      if (!reshaped && (starts_with(name, "encoder.mid_block.attentions.0.") ||
                        starts_with(name, "decoder.mid_block.attentions.0.")) && shape.size() == 4 &&
          shape[2] == 1 && shape[3] == 1)
        shape = {shape[0], shape[1]};
    }
    if (flux2 && !replace_prefix(name, "quant_conv.", "encoder.quant_conv."))
      replace_prefix(name, "post_quant_conv.", "decoder.post_quant_conv.");
    out.push_back({prefix + name, spec.dtype, shape, encode_floats(values, spec.dtype)});
  }

  if (spec.batch_norm) {
    const int64_t c = 4 * spec.z;
    const std::vector<float> mean = random_values(spec.seed, "bn.running_mean", {c}, Init::NormBias);
    std::vector<float> var = random_values(spec.seed, "bn.running_var", {c}, Init::Bias);
    for (float& v : var) v = 1.0f + std::max(-0.5f, std::min(0.5f, 10.0f * v));
    out.push_back({prefix + "bn.running_mean", spec.dtype, {c}, encode_floats(mean, spec.dtype)});
    out.push_back({prefix + "bn.running_var", spec.dtype, {c}, encode_floats(var, spec.dtype)});
    std::vector<uint8_t> tracked(8, 0);
    tracked[0] = 42;
    out.push_back({prefix + "bn.num_batches_tracked", DType::I64, {}, std::move(tracked)});
  }

  if (spec.include_decoder && !spec.full_decoder) {
    const int64_t ch = spec.ch;
    const int64_t top = ch * spec.mult.back();
    std::vector<Canonical> dec;
    if (diffusers) {
      add_conv(dec, "decoder.conv_in", top, spec.z, 3);
      add_norm(dec, "decoder.up_blocks.0.resnets.0.norm1", top);
      add_conv(dec, "decoder.up_blocks.0.resnets.0.conv1", top, top, 3);
      add_conv(dec, "decoder.mid_block.attentions.0.to_q", top, top, 1);
      add_conv(dec, "decoder.conv_out", 3, ch, 3);
    } else {
      add_conv(dec, "decoder.conv_in", top, spec.z, 3);
      add_norm(dec, "decoder.up.0.block.0.norm1", ch);
      add_conv(dec, "decoder.up.0.block.0.conv1", ch, ch, 3);
      add_conv(dec, "decoder.mid.attn_1.q", top, top, 1);
      add_conv(dec, "decoder.conv_out", 3, ch, 3);
    }
    if (spec.quant_conv) add_conv(dec, "post_quant_conv", spec.z, spec.z, 1);
    for (const Canonical& c : dec) {
      std::vector<int64_t> shape = c.shape;
      if (diffusers && starts_with(c.name, "decoder.mid_block.attentions.") && shape.size() == 4)
        shape = {shape[0], shape[1]};
      std::string name = c.name;
      if (flux2) replace_prefix(name, "post_quant_conv.", "decoder.post_quant_conv.");
      out.push_back({prefix + name, spec.dtype, shape,
                     encode_floats(random_values(spec.seed, c.name, shape, c.init), spec.dtype)});
    }
  }

  if (spec.layout == "first_stage_model") {
    // Unrelated parts of a full checkpoint; one of them I64, which the encoder
    // must not care about.
    std::vector<int64_t> s1 = {8, 4, 3, 3}, s2 = {8};
    out.push_back({"model.diffusion_model.input_blocks.0.0.weight", spec.dtype, s1,
                   encode_floats(random_values(spec.seed, "unet.w", s1, Init::ConvWeight), spec.dtype)});
    out.push_back({"model.diffusion_model.input_blocks.0.0.bias", spec.dtype, s2,
                   encode_floats(random_values(spec.seed, "unet.b", s2, Init::Bias), spec.dtype)});
    std::vector<uint8_t> ids(77 * 8);
    for (int64_t i = 0; i < 77; ++i) std::memcpy(ids.data() + i * 8, &i, 8);
    out.push_back({"cond_stage_model.transformer.text_model.embeddings.position_ids", DType::I64, {1, 77},
                   std::move(ids)});
  }

  std::vector<TensorToWrite> tensors;
  tensors.reserve(out.size());
  for (const auto& p : out) tensors.push_back({p.name, p.dtype, p.shape, p.bytes.data()});
  write_safetensors(path, tensors, {{"format", "pt"}, {"gstvae_test_layout", spec.layout}});
}

// ---------------------------------------------------------------- misloads

void copy_with_extra_tensor(const std::string& from, const std::string& to, const std::string& name) {
  SafetensorsFile source(from);
  std::vector<TensorToWrite> tensors;
  for (const auto& kv : source.tensors())
    tensors.push_back({kv.first, kv.second.dtype, kv.second.shape, source.data(kv.second)});
  const float stray = 0.5f;
  tensors.push_back({name, DType::F32, {1}, &stray});
  write_safetensors(to, tensors, source.metadata());
}

namespace {
template <typename Family>
std::vector<std::string> forced_loads(const std::vector<const Family*>& families, const std::string& path,
                                      const ModelOptions& options, std::vector<std::string>* faults) {
  auto file = std::make_shared<const SafetensorsFile>(path);
  std::vector<std::string> loaded;
  for (const Family* family : families) {
    try {
      if (family->load(file, options)) loaded.push_back(family->name);
    } catch (const CheckpointError&) {
    } catch (const std::exception& e) {
      faults->push_back(std::string(family->name) + ": " + e.what());
    }
  }
  return loaded;
}
}  // namespace

std::vector<std::string> families_that_load(const std::string& path, bool decoder, const ModelOptions& options,
                                            std::vector<std::string>* faults) {
  return decoder ? forced_loads(decoder_families(), path, options, faults)
                 : forced_loads(encoder_families(), path, options, faults);
}

std::vector<std::string> families_that_detect(const std::string& path, bool decoder) {
  SafetensorsFile file(path);
  std::vector<std::string> found;
  if (decoder) {
    for (const DecoderFamily* family : decoder_families())
      if (family->detect(file)) found.push_back(family->name);
  } else {
    for (const EncoderFamily* family : encoder_families())
      if (family->detect(file)) found.push_back(family->name);
  }
  return found;
}

// ---------------------------------------------------------------- TempDir

TempDir::TempDir() {
  const char* tmp = std::getenv("TMPDIR");
  std::string base = (tmp && *tmp) ? tmp : "/tmp";
  std::string templ = base + "/gstvae-test-XXXXXX";
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  if (!::mkdtemp(buf.data())) throw std::runtime_error("mkdtemp failed under " + base);
  path_ = buf.data();
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

// ---------------------------------------------------------------- frames

std::vector<uint8_t> make_frame(int width, int height, int bytes_per_pixel, size_t stride, uint64_t seed) {
  if (stride < static_cast<size_t>(width) * bytes_per_pixel)
    throw std::invalid_argument("make_frame: stride shorter than a row");
  std::vector<uint8_t> f(stride * static_cast<size_t>(height), 0xA5);  // row padding stays 0xA5
  std::mt19937_64 rng(seed ^ 0x5eed5eed5eedull);
  std::uniform_real_distribution<double> phase(0.0, 6.283185307179586);
  std::uniform_real_distribution<double> freq(0.05, 0.4);
  std::uniform_int_distribution<int> noise(-6, 6);
  struct Wave {
    double fx, fy, px, py;
  };
  std::vector<Wave> waves(static_cast<size_t>(bytes_per_pixel));
  for (auto& w : waves) w = {freq(rng), freq(rng), phase(rng), phase(rng)};
  for (int y = 0; y < height; ++y) {
    uint8_t* row = f.data() + static_cast<size_t>(y) * stride;
    for (int x = 0; x < width; ++x) {
      for (int c = 0; c < bytes_per_pixel; ++c) {
        const Wave& w = waves[static_cast<size_t>(c)];
        const double v = 128.0 + 70.0 * std::sin(w.fx * x + w.px) + 45.0 * std::cos(w.fy * y + w.py) + noise(rng);
        row[static_cast<size_t>(x) * bytes_per_pixel + c] =
            static_cast<uint8_t>(std::lround(std::min(255.0, std::max(0.0, v))));
      }
    }
  }
  return f;
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw std::runtime_error("cannot create '" + path + "'");
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  f.flush();
  if (!f) throw std::runtime_error("cannot write '" + path + "'");
}

}  // namespace gstvae::test
