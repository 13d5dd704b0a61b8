// gst-vae-decode-file: decodes a latent file (.npy, .latent or .safetensors,
// N x C x h x w float32) into raw packed 8-bit frames with the engine alone
// (no GStreamer). Used by the cross-check against the Python reference and by
// the round-trip PSNR test.
#include <chrono>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "decoder.h"
#include "errors.h"
#include "latent_file.h"

using namespace gstvae;

namespace {

int usage() {
  std::cerr << "usage: gst-vae-decode-file --model M --latents L.npy --out OUT.rgb [--format RGB|RGBA|...]\n"
               "         [--device auto|cpu|cuda[:N]] [--precision auto|fp32|fp16|bf16]\n"
               "         [--latent-format raw|sd15|sdxl|sd3|flux] [--per-batch B] [--threads T]\n"
               "         [--latent-space taesd|taesdxl|taesd3|taef1|taef2]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> args;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0 || i + 1 >= argc) return usage();
    args[a.substr(2)] = argv[++i];
  }
  for (const char* required : {"model", "latents", "out"})
    if (!args.count(required)) return usage();
  try {
    PixelFormat format = PixelFormat::RGB;
    if (args.count("format") && !parse_pixel_format(args["format"], &format))
      throw VaeError("unknown format '" + args["format"] + "'");
    const size_t per_batch = args.count("per-batch") ? std::stoul(args["per-batch"]) : 4;
    ModelOptions options;
    if (args.count("device")) options.device = args["device"];
    if (args.count("precision")) options.precision = precision_by_name(args["precision"]);
    if (args.count("threads")) options.threads = std::stoi(args["threads"]);
    if (args.count("latent-space")) options.latent_space = args["latent-space"];
    DecodeParams params;
    if (args.count("latent-format")) params.latent_format = latent_format_by_name(args["latent-format"]);

    const LatentArray latents = read_latent_file(args["latents"]);
    auto decoder = load_decoder(args["model"], options);
    const DecoderInfo& info = decoder->info();
    std::cerr << info.architecture << " on " << info.device << " in " << precision_name(info.precision) << "\n";
    auto batch = decoder->new_batch(static_cast<int>(latents.height), static_cast<int>(latents.width), per_batch);
    if (latents.channels != batch->channels())
      throw VaeError("'" + args["latents"] + "' holds " + std::to_string(latents.channels) +
                     "-channel latents, but the decoder takes " + std::to_string(batch->channels()));
    const size_t frame_bytes = decoder->frame_bytes(*batch, format);
    std::vector<uint8_t> pixels(latents.frames * frame_bytes);
    size_t done = 0;
    const auto start = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < latents.frames; ++i) {
      batch->add(latents.values.data() + i * batch->floats_per_latent(), static_cast<uint64_t>(i));
      if (batch->full() || i + 1 == latents.frames) {
        decoder->decode(*batch, params, format, pixels.data() + done * frame_bytes);
        done += batch->size();
        batch->clear();
      }
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::ofstream out(args["out"], std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(pixels.data()), static_cast<std::streamsize>(pixels.size()));
    if (!out) throw VaeError("cannot write '" + args["out"] + "'");
    std::cerr << "decoded " << latents.frames << " latents to " << latents.width * info.upscale << "x"
              << latents.height * info.upscale << " frames in " << seconds << " s\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
