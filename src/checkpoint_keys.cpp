#include "checkpoint_keys.h"

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

bool is_digit(char c) { return c >= '0' && c <= '9'; }

// Applies `rule` to `name`: true and the renamed name in `out` when it applies.
bool apply(const Rename& rule, const std::string& name, std::string& out) {
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
  out.clear();
  size_t next = 0;
  for (const char* r = rule.replacement; *r; ++r) {
    if (*r == '#')
      out += digits.at(next++);
    else
      out += *r;
  }
  out.append(name, i, std::string::npos);
  return true;
}

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

}  // namespace

NormalizedKeys normalize_vae_keys(const std::vector<std::string>& names, const std::string& label) {
  NormalizedKeys keys;
  bool found = false;
  for (const char* prefix : kPrefixes) {
    const std::string probe = std::string(prefix) + "encoder.conv_in.weight";
    for (const auto& n : names)
      if (n == probe) found = true;
    if (found) {
      keys.prefix = prefix;
      break;
    }
  }
  if (!found)
    throw CheckpointError("'" + label +
                          "' holds no VAE encoder: no tensor 'encoder.conv_in.weight' (nor under the "
                          "'first_stage_model.' or 'vae.' prefix)");

  bool diffusers = false;
  for (const auto& n : names)
    if (starts_with(n, keys.prefix + "encoder.down_blocks.") ||
        starts_with(n, keys.prefix + "encoder.mid_block."))
      diffusers = true;
  keys.layout = diffusers ? "diffusers" : "ldm";

  for (const auto& n : names) {
    if (!starts_with(n, keys.prefix)) continue;
    std::string local = n.substr(keys.prefix.size());
    if (!starts_with(local, "encoder.") && !starts_with(local, "quant_conv.")) continue;
    std::string canonical = local;
    if (diffusers) {
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
