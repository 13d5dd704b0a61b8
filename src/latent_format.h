// Latent formats: how raw VAE latents are scaled for a diffusion model,
// stored = (raw - shift) * scale.
#pragma once

#include <string>
#include <vector>

namespace gstvae {

struct LatentFormat {
  std::string name = "raw";
  double scale = 1.0;
  double shift = 0.0;

  bool is_raw() const { return scale == 1.0 && shift == 0.0; }
};

// raw, sd15 (x0.18215), sdxl (x0.13025), sd3 ((x-0.0609)x1.5305),
// flux ((x-0.1159)x0.3611).
const std::vector<LatentFormat>& known_latent_formats();
// Throws VaeError listing the known names when `name` is unknown.
LatentFormat latent_format_by_name(const std::string& name);
LatentFormat custom_latent_format(double scale, double shift);

}  // namespace gstvae
