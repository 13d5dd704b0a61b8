// Small text helpers for the families that tell a model's latent space from
// its file name (ComfyUI's rule: taesdxl_*, taew2_1_*, ...). No LibTorch here.
#pragma once

#include <cctype>
#include <string>

namespace gstvae {

inline std::string lowercase(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// The last component of a path ("a/b/taesd_encoder.safetensors" -> "taesd_encoder.safetensors").
inline std::string basename_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

}  // namespace gstvae
