#include "checkpoint_keys.h"

#include <regex>

#include "errors.h"

namespace gstvae {

namespace {

// Prefixes under which full checkpoints hold their VAE, tried in order.
const char* const kPrefixes[] = {"first_stage_model.", "vae.", ""};

struct Rename {
  std::regex pattern;
  const char* replacement;
};

// diffusers AutoencoderKL encoder names -> LDM names. Both attention
// generations are listed (to_q/to_k/to_v/to_out.0 and query/key/value/proj_attn).
const std::vector<Rename>& diffusers_renames() {
  static const std::vector<Rename> table = [] {
    const std::pair<const char*, const char*> rules[] = {
        {R"(^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.)", "encoder.down.$1.block.$2.nin_shortcut."},
        {R"(^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.)", "encoder.down.$1.block.$2."},
        {R"(^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.)", "encoder.down.$1.downsample.conv."},
        {R"(^encoder\.mid_block\.resnets\.0\.conv_shortcut\.)", "encoder.mid.block_1.nin_shortcut."},
        {R"(^encoder\.mid_block\.resnets\.1\.conv_shortcut\.)", "encoder.mid.block_2.nin_shortcut."},
        {R"(^encoder\.mid_block\.resnets\.0\.)", "encoder.mid.block_1."},
        {R"(^encoder\.mid_block\.resnets\.1\.)", "encoder.mid.block_2."},
        {R"(^encoder\.mid_block\.attentions\.0\.group_norm\.)", "encoder.mid.attn_1.norm."},
        {R"(^encoder\.mid_block\.attentions\.0\.(to_q|query)\.)", "encoder.mid.attn_1.q."},
        {R"(^encoder\.mid_block\.attentions\.0\.(to_k|key)\.)", "encoder.mid.attn_1.k."},
        {R"(^encoder\.mid_block\.attentions\.0\.(to_v|value)\.)", "encoder.mid.attn_1.v."},
        {R"(^encoder\.mid_block\.attentions\.0\.(to_out\.0|proj_attn)\.)", "encoder.mid.attn_1.proj_out."},
        {R"(^encoder\.conv_norm_out\.)", "encoder.norm_out."},
    };
    std::vector<Rename> out;
    for (const auto& r : rules) out.push_back({std::regex(r.first), r.second});
    return out;
  }();
  return table;
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
      for (const auto& r : diffusers_renames()) {
        if (std::regex_search(local, r.pattern)) {
          canonical = std::regex_replace(local, r.pattern, r.replacement,
                                         std::regex_constants::format_first_only);
          break;
        }
      }
    }
    auto [it, inserted] = keys.source.emplace(canonical, n);
    if (!inserted)
      throw CheckpointError("'" + label + "': tensors '" + it->second + "' and '" + n +
                            "' both map to '" + canonical + "'");
  }
  return keys;
}

}  // namespace gstvae
