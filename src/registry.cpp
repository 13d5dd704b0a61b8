// load_encoder: refuses pickle checkpoints, opens the safetensors file and
// hands it to the first family that recognises its tensor names.
#include <cstdio>
#include <string>

#include "errors.h"
#include "families.h"

namespace gstvae {

namespace {

const EncoderFamily* const kFamilies[] = {
    &kKLFamily,
};

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// PyTorch's .ckpt/.pt/.pth/.bin files are pickles (often inside a zip): loading
// one runs whatever code it carries, so they are refused before anything else.
void refuse_pickle(const std::string& path) {
  bool pickle = false;
  for (const char* ext : {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
    if (ends_with(path, ext)) pickle = true;
  if (FILE* f = std::fopen(path.c_str(), "rb")) {
    unsigned char magic[2] = {0, 0};
    const size_t n = std::fread(magic, 1, 2, f);
    std::fclose(f);
    // zip archive (torch.save since 1.6) or a raw pickle protocol 2+ stream.
    if (n == 2 && ((magic[0] == 'P' && magic[1] == 'K') || (magic[0] == 0x80 && magic[1] >= 2 && magic[1] <= 5)))
      pickle = true;
  }
  if (pickle)
    throw CheckpointError("'" + path +
                          "' looks like a PyTorch pickle checkpoint (.ckpt/.pt): those can run arbitrary code "
                          "when loaded and are not supported; convert it to .safetensors first");
}

}  // namespace

std::shared_ptr<Encoder> load_encoder(const std::string& path, const EncoderOptions& options) {
  if (path.empty()) throw CheckpointError("no model file given");
  refuse_pickle(path);
  auto file = std::make_shared<const SafetensorsFile>(path);
  for (const EncoderFamily* family : kFamilies)
    if (family->detect(*file)) return family->load(file, options);
  throw CheckpointError("'" + path + "' holds no supported VAE encoder (" +
                        std::to_string(file->tensors().size()) +
                        " tensors; expected the encoder of an AutoencoderKL, e.g. 'encoder.conv_in.weight' "
                        "and 'encoder.mid.attn_1.*', possibly under 'first_stage_model.' or 'vae.')");
}

}  // namespace gstvae
