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
  // Per channel, for the video VAEs' normalisation (x - mean_c) / std_c:
  // stored_c = (raw_c - shifts[c]) * scales[c]. Empty: the scalars above.
  std::vector<double> shifts, scales;
  // The statistics are the model's own, read from its checkpoint (LTX-2's
  // per_channel_statistics): only a family that has them can resolve it
  // (into shifts and scales); anything else refuses it.
  bool from_model = false;

  bool is_raw() const { return scale == 1.0 && shift == 0.0 && shifts.empty() && !from_model; }
  bool per_channel() const { return !shifts.empty(); }
  // Channel c's scale and shift (the scalars when not per channel).
  double scale_of(size_t c) const { return per_channel() ? scales.at(c) : scale; }
  double shift_of(size_t c) const { return per_channel() ? shifts.at(c) : shift; }
  // Per-channel formats only fit latents with exactly that many channels.
  bool fits(size_t channels) const { return !per_channel() || shifts.size() == channels; }
};

// raw, sd15 (x0.18215), sdxl (x0.13025), sd3 ((x-0.0609)x1.5305),
// flux ((x-0.1159)x0.3611), wan21 ((x - mean_c) / std_c with Wan 2.1's 16
// channel means and standard deviations, as Wan 2.1, Wan 2.2 A14B and
// Qwen-Image feed their models), wan22 (the same with Wan 2.2 TI2V-5B's 48),
// ltx2 ((x - mean-of-means_c) / std-of-means_c from the LTX-2 checkpoint
// itself: from_model).
const std::vector<LatentFormat>& known_latent_formats();
// Throws VaeError listing the known names when `name` is unknown.
LatentFormat latent_format_by_name(const std::string& name);
LatentFormat custom_latent_format(double scale, double shift);

}  // namespace gstvae
