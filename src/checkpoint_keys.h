// Maps the tensor names of VAE checkpoints found in the wild onto one canonical
// naming: the LDM (original Stable Diffusion) names, e.g.
// `encoder.down.1.block.0.nin_shortcut.weight`. Only encoder-side tensors
// (`encoder.*`, `quant_conv.*`) are mapped; everything else is ignored.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace gstvae {

struct NormalizedKeys {
  std::string prefix;  // "", "first_stage_model." or "vae."
  std::string layout;  // "ldm" or "diffusers"
  // canonical LDM name -> name in the file
  std::map<std::string, std::string> source;

  bool has(const std::string& canonical) const { return source.count(canonical) != 0; }
};

// Throws CheckpointError (naming `label`) when no VAE encoder is found or two
// file names map onto one canonical name.
NormalizedKeys normalize_vae_keys(const std::vector<std::string>& names, const std::string& label);

}  // namespace gstvae
