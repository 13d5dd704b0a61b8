// Maps the tensor names of VAE checkpoints found in the wild onto one canonical
// naming: the LDM (original Stable Diffusion) names, e.g.
// `encoder.down.1.block.0.nin_shortcut.weight`. One side is mapped at a time:
// the encoder's tensors (`encoder.*`, `quant_conv.*`) or the decoder's
// (`decoder.*`, `post_quant_conv.*`); everything else is ignored.
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

enum class VaePart { Encoder, Decoder };

// Throws CheckpointError (naming `label`) when the part is not found (no
// `encoder.conv_in.weight` / `decoder.conv_in.weight`), or two file names map
// onto one canonical name. diffusers numbers the decoder's `up_blocks` from the
// deepest level: `decoder.up_blocks.{i}` is LDM's `decoder.up.{N-1-i}`, N the
// number of up blocks in the file. Flux.2's `encoder.quant_conv.*` and
// `decoder.post_quant_conv.*` map to `quant_conv.*` and `post_quant_conv.*`.
NormalizedKeys normalize_vae_keys(const std::vector<std::string>& names, const std::string& label,
                                  VaePart part = VaePart::Encoder);

}  // namespace gstvae
