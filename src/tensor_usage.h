// No silent misloads: a loader must use every tensor in the part of a file it
// claims, or say which ones it did not. A file of another model that happens
// to share a family's key names (a Flux.2 VAE, whose `bn.*` statistics and
// `encoder.quant_conv` a plain KL loader would skip, is the case that prompted
// this) then fails to load, naming the tensors left over and the family the
// file was taken for, instead of giving wrong latents. Tensors a family leaves
// alone on purpose (the other half of a VAE, training-only loss networks,
// `num_batches_tracked`) are listed per family, never by a blanket ignore.
// No LibTorch here.
#pragma once

#include <set>
#include <string>
#include <vector>

#include "safetensors.h"

namespace gstvae {

struct TensorClaim {
  // The family and direction the file was taken for, as the error names it,
  // e.g. "KL VAE encoder (ldm layout)".
  std::string taken_for;
  // The namespace claimed: every tensor whose name starts with it ("" = the
  // whole file). A VAE inside a full checkpoint claims only its prefix.
  std::string prefix;
  // Tensors left unused on purpose, as patterns on the name after `prefix`;
  // '*' stands for any run of characters (dots included).
  std::vector<std::string> deliberately_unused;
};

// Whether `name` matches `pattern` ('*' = any run of characters, possibly
// empty; every other character stands for itself). Linear in practice, no
// recursion: names come from untrusted files.
bool matches_pattern(const std::string& pattern, const std::string& name);

// The tensors of `file` under `claim.prefix` that are neither in `used`
// (names as stored in the file) nor deliberately unused, in name order.
std::vector<std::string> unused_tensors(const SafetensorsFile& file, const TensorClaim& claim,
                                        const std::set<std::string>& used);

// Throws CheckpointError naming the file, what it was taken for and the
// unused tensors (the first few, and how many) when there are any.
void require_every_tensor_used(const SafetensorsFile& file, const TensorClaim& claim,
                               const std::set<std::string>& used);

}  // namespace gstvae
