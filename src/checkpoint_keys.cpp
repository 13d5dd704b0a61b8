#include "checkpoint_keys.h"

#include <algorithm>
#include <cstddef>

#include "errors.h"

namespace gstvae {

namespace {

// Prefixes under which full checkpoints hold their VAE, tried in order.
const char* const kPrefixes[] = {"first_stage_model.", "vae.", ""};

// diffusers AutoencoderKL encoder names -> LDM names. Both attention
// generations are listed (to_q/to_k/to_v/to_out.0 and query/key/value/proj_attn).
// A rule applies when the name starts with `pattern`, in which '#' stands for
// one or more ASCII digits; that prefix is replaced by `replacement`, whose
// '#'s take the digits matched, in order. The first rule that applies wins.
//
// This used to be std::regex (`^encoder\.down_blocks\.(\d+)\.`...), but
// libstdc++'s regex executor recurses once per character matched by `\d+`: a
// tensor name with ~100k digits (a 100 KB file) overflowed the stack and
// crashed the process (found running fuzz/fuzz_checkpoint on long names; the
// fuzzer's 16 KB inputs stay below the ~25k digits needed). The matcher below is
// iterative and equivalent (after `#` always comes a '.', never a digit, so
// greedy matching needs no backtracking).
struct Rename {
  const char* pattern;
  const char* replacement;
};

constexpr Rename kDiffusersRenames[] = {
    {"encoder.down_blocks.#.resnets.#.conv_shortcut.", "encoder.down.#.block.#.nin_shortcut."},
    {"encoder.down_blocks.#.resnets.#.", "encoder.down.#.block.#."},
    {"encoder.down_blocks.#.downsamplers.0.conv.", "encoder.down.#.downsample.conv."},
    {"encoder.mid_block.resnets.0.conv_shortcut.", "encoder.mid.block_1.nin_shortcut."},
    {"encoder.mid_block.resnets.1.conv_shortcut.", "encoder.mid.block_2.nin_shortcut."},
    {"encoder.mid_block.resnets.0.", "encoder.mid.block_1."},
    {"encoder.mid_block.resnets.1.", "encoder.mid.block_2."},
    {"encoder.mid_block.attentions.0.group_norm.", "encoder.mid.attn_1.norm."},
    {"encoder.mid_block.attentions.0.to_q.", "encoder.mid.attn_1.q."},
    {"encoder.mid_block.attentions.0.query.", "encoder.mid.attn_1.q."},
    {"encoder.mid_block.attentions.0.to_k.", "encoder.mid.attn_1.k."},
    {"encoder.mid_block.attentions.0.key.", "encoder.mid.attn_1.k."},
    {"encoder.mid_block.attentions.0.to_v.", "encoder.mid.attn_1.v."},
    {"encoder.mid_block.attentions.0.value.", "encoder.mid.attn_1.v."},
    {"encoder.mid_block.attentions.0.to_out.0.", "encoder.mid.attn_1.proj_out."},
    {"encoder.mid_block.attentions.0.proj_attn.", "encoder.mid.attn_1.proj_out."},
    {"encoder.conv_norm_out.", "encoder.norm_out."},
};

// The decoder's. In a replacement, '~' takes the digits matched like '#' but
// writes the level counted from the other end (N - 1 - i): diffusers lists the
// decoder's up blocks from the deepest level, LDM from the shallowest.
constexpr Rename kDiffusersDecoderRenames[] = {
    {"decoder.up_blocks.#.resnets.#.conv_shortcut.", "decoder.up.~.block.#.nin_shortcut."},
    {"decoder.up_blocks.#.resnets.#.", "decoder.up.~.block.#."},
    {"decoder.up_blocks.#.upsamplers.0.conv.", "decoder.up.~.upsample.conv."},
    {"decoder.mid_block.resnets.0.conv_shortcut.", "decoder.mid.block_1.nin_shortcut."},
    {"decoder.mid_block.resnets.1.conv_shortcut.", "decoder.mid.block_2.nin_shortcut."},
    {"decoder.mid_block.resnets.0.", "decoder.mid.block_1."},
    {"decoder.mid_block.resnets.1.", "decoder.mid.block_2."},
    {"decoder.mid_block.attentions.0.group_norm.", "decoder.mid.attn_1.norm."},
    {"decoder.mid_block.attentions.0.to_q.", "decoder.mid.attn_1.q."},
    {"decoder.mid_block.attentions.0.query.", "decoder.mid.attn_1.q."},
    {"decoder.mid_block.attentions.0.to_k.", "decoder.mid.attn_1.k."},
    {"decoder.mid_block.attentions.0.key.", "decoder.mid.attn_1.k."},
    {"decoder.mid_block.attentions.0.to_v.", "decoder.mid.attn_1.v."},
    {"decoder.mid_block.attentions.0.value.", "decoder.mid.attn_1.v."},
    {"decoder.mid_block.attentions.0.to_out.0.", "decoder.mid.attn_1.proj_out."},
    {"decoder.mid_block.attentions.0.proj_attn.", "decoder.mid.attn_1.proj_out."},
    {"decoder.conv_norm_out.", "decoder.norm_out."},
};

// Up-block indices beyond this are not a VAE (released ones have 4 levels);
// the bound also keeps the reversal's arithmetic in range.
constexpr int kMaxUpBlocks = 64;

bool is_digit(char c) { return c >= '0' && c <= '9'; }

// Applies `rule` to `name`: true and the renamed name in `out` when it applies.
// `levels` is N for the '~' replacements (see kDiffusersDecoderRenames).
bool apply(const Rename& rule, const std::string& name, std::string& out, int levels = 0) {
  std::vector<std::string> digits;
  size_t i = 0;
  for (const char* p = rule.pattern; *p; ++p) {
    if (*p == '#') {
      const size_t begin = i;
      while (i < name.size() && is_digit(name[i])) ++i;
      if (i == begin) return false;
      digits.push_back(name.substr(begin, i - begin));
    } else {
      if (i >= name.size() || name[i] != *p) return false;
      ++i;
    }
  }
  std::string result;  // `out` is left alone unless the rule applies
  size_t next = 0;
  for (const char* r = rule.replacement; *r; ++r) {
    if (*r == '#') {
      result += digits.at(next++);
    } else if (*r == '~') {
      // Digit strings were bounded by up_block_count(), which found N.
      const std::string& d = digits.at(next++);
      const int index = d.size() <= 4 ? std::stoi(d) : kMaxUpBlocks;
      if (index >= levels) return false;
      result += std::to_string(levels - 1 - index);
    } else {
      result += *r;
    }
  }
  result.append(name, i, std::string::npos);
  out = std::move(result);
  return true;
}

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

// N for the reversal: one more than the largest `decoder.up_blocks.{i}` index
// under `prefix`.
int up_block_count(const std::vector<std::string>& names, const std::string& prefix, const std::string& label) {
  const std::string head = prefix + "decoder.up_blocks.";
  int count = 0;
  for (const auto& n : names) {
    if (!starts_with(n, head)) continue;
    size_t end = head.size();
    while (end < n.size() && is_digit(n[end])) ++end;
    const std::string digits = n.substr(head.size(), end - head.size());
    if (digits.empty() || end >= n.size() || n[end] != '.') continue;
    if (digits.size() > 4 || std::stoi(digits) >= kMaxUpBlocks)
      throw CheckpointError("'" + label + "': tensor '" + (n.size() > 200 ? n.substr(0, 200) + "..." : n) +
                            "' names up block " + (digits.size() > 20 ? digits.substr(0, 20) + "..." : digits) +
                            "; at most " + std::to_string(kMaxUpBlocks) + " are supported");
    count = std::max(count, std::stoi(digits) + 1);
  }
  return count;
}

}  // namespace

NormalizedKeys normalize_vae_keys(const std::vector<std::string>& names, const std::string& label, VaePart part) {
  const bool decoder = part == VaePart::Decoder;
  const std::string side = decoder ? "decoder." : "encoder.";
  const std::string conv = decoder ? "post_quant_conv." : "quant_conv.";
  NormalizedKeys keys;
  bool found = false;
  for (const char* prefix : kPrefixes) {
    const std::string probe = std::string(prefix) + side + "conv_in.weight";
    for (const auto& n : names)
      if (n == probe) found = true;
    if (found) {
      keys.prefix = prefix;
      break;
    }
  }
  if (!found)
    throw CheckpointError("'" + label + "' holds no VAE " + (decoder ? "decoder" : "encoder") + ": no tensor '" +
                          side + "conv_in.weight' (nor under the 'first_stage_model.' or 'vae.' prefix)");

  bool diffusers = false;
  for (const auto& n : names)
    if (starts_with(n, keys.prefix + side + (decoder ? "up_blocks." : "down_blocks.")) ||
        starts_with(n, keys.prefix + side + "mid_block."))
      diffusers = true;
  keys.layout = diffusers ? "diffusers" : "ldm";
  const int levels = diffusers && decoder ? up_block_count(names, keys.prefix, label) : 0;

  for (const auto& n : names) {
    if (!starts_with(n, keys.prefix)) continue;
    std::string local = n.substr(keys.prefix.size());
    if (!starts_with(local, side) && !starts_with(local, conv)) continue;
    std::string canonical = local;
    // Flux.2's official file keeps the quant convs inside the encoder and the
    // decoder (`encoder.quant_conv`, `decoder.post_quant_conv`); ComfyUI
    // renames them to the top-level names every other layout uses.
    const std::string nested_conv = side + conv;
    if (starts_with(local, nested_conv)) {
      canonical = conv + local.substr(nested_conv.size());
    } else if (diffusers && decoder) {
      for (const auto& r : kDiffusersDecoderRenames)
        if (apply(r, local, canonical, levels)) break;
    } else if (diffusers) {
      for (const auto& r : kDiffusersRenames)
        if (apply(r, local, canonical)) break;
    }
    auto [it, inserted] = keys.source.emplace(canonical, n);
    if (!inserted)
      throw CheckpointError("'" + label + "': tensors '" + it->second + "' and '" + n +
                            "' both map to '" + canonical + "'");
  }
  return keys;
}

}  // namespace gstvae
