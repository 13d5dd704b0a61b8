// gst-vae-latent-info: prints the shape and metadata of a .latent,
// .safetensors or .npy latent file; with --raw OUT, dumps its values as raw
// little-endian float32 (N x C x h x w), the same bytes vaeencode streams.
#include <fstream>
#include <iostream>
#include <string>

#include "latent_file.h"

static const char* const kUsage = "usage: gst-vae-latent-info FILE [--raw OUT.f32]\n";

int main(int argc, char** argv) {
  // Asked for: usage on stdout, success (a file named "--help" is ./--help).
  if (argc == 2 && (std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h")) {
    std::cout << kUsage;
    return 0;
  }
  if (argc != 2 && !(argc == 4 && std::string(argv[2]) == "--raw")) {
    std::cerr << kUsage;
    return 2;
  }
  try {
    const gstvae::LatentArray a = gstvae::read_latent_file(argv[1]);
    std::cout << "shape " << a.frames << "x" << a.channels << "x" << a.height << "x" << a.width
              << " float32 (frames x channels x height x width)\n";
    std::cout << "comfyui-marker " << (a.has_version_marker ? "yes" : "no") << "\n";
    for (const auto& kv : a.metadata) std::cout << "meta " << kv.first << " = " << kv.second << "\n";
    if (argc == 4) {
      std::ofstream out(argv[3], std::ios::binary | std::ios::trunc);
      out.write(reinterpret_cast<const char*>(a.values.data()),
                static_cast<std::streamsize>(a.values.size() * sizeof(float)));
      if (!out) throw gstvae::LatentFileError(std::string("cannot write '") + argv[3] + "'");
    }
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
