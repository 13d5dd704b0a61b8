#include "latent_format.h"

#include "errors.h"

namespace gstvae {

const std::vector<LatentFormat>& known_latent_formats() {
  static const std::vector<LatentFormat> formats = {
      {"raw", 1.0, 0.0},
      {"sd15", 0.18215, 0.0},
      {"sdxl", 0.13025, 0.0},
      {"sd3", 1.5305, 0.0609},
      {"flux", 0.3611, 0.1159},
  };
  return formats;
}

LatentFormat latent_format_by_name(const std::string& name) {
  std::string names;
  for (const auto& f : known_latent_formats()) {
    if (f.name == name) return f;
    names += (names.empty() ? "" : ", ") + f.name;
  }
  throw VaeError("unknown latent format '" + name + "' (known: " + names + ")");
}

LatentFormat custom_latent_format(double scale, double shift) {
  return LatentFormat{"custom", scale, shift};
}

}  // namespace gstvae
