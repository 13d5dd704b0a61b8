// gst-vae-encode-file: encodes raw packed 8-bit frames from a file into raw
// float32 latents with the engine alone (no GStreamer). Used by the
// cross-check against the Python reference and by benchmarks.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "encoder.h"
#include "errors.h"
#include "levers.h"

using namespace gstvae;

namespace {

int usage() {
  std::cerr << "usage: gst-vae-encode-file --model M --frames F --n N --width W --height H --format FMT\n"
               "         [--stride BYTES] --out OUT.f32 [--device auto|cpu|cuda[:N]] [--precision auto|fp32|fp16|bf16]\n"
               "         [--latent-format raw|sd15|sdxl|sd3|flux|wan21|wan22|ltx2] [--sample --seed K] [--per-batch B] [--threads T]\n"
               "         [--pad-clip-end] (video VAEs: complete the last group by repeating the last frame)\n"
               "         [--latent-space taesd|taesdxl|taesd3|taef1|taef2|taesana|taehv1_5|lighttaehy1_5|taeltx_2|...]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> args;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0) return usage();
    a = a.substr(2);
    if (a == "sample" || a == "pad-clip-end") {
      args[a] = "1";
    } else if (i + 1 < argc) {
      args[a] = argv[++i];
    } else {
      return usage();
    }
  }
  for (const char* required : {"model", "frames", "n", "width", "height", "format", "out"})
    if (!args.count(required)) return usage();
  try {
    PixelFormat format;
    if (!parse_pixel_format(args["format"], &format)) throw VaeError("unknown format '" + args["format"] + "'");
    const int width = std::stoi(args["width"]), height = std::stoi(args["height"]);
    const size_t n = std::stoul(args["n"]);
    const size_t bpp = pixel_layout(format).bytes_per_pixel;
    const size_t stride = args.count("stride") ? std::stoul(args["stride"]) : width * bpp;
    const size_t per_batch = args.count("per-batch") ? std::stoul(args["per-batch"]) : 16;

    ModelOptions options;
    if (args.count("device")) options.device = args["device"];
    if (args.count("precision")) options.precision = precision_by_name(args["precision"]);
    if (args.count("threads")) options.threads = std::stoi(args["threads"]);
    if (args.count("latent-space")) options.latent_space = args["latent-space"];
    EncodeParams params;
    params.sample = args.count("sample") != 0;
    params.pad_clip_end = args.count("pad-clip-end") != 0;
    if (args.count("seed")) params.seed = std::stoull(args["seed"]);
    if (args.count("latent-format")) params.latent_format = latent_format_by_name(args["latent-format"]);

    std::ifstream in(args["frames"], std::ios::binary);
    if (!in) throw VaeError("cannot open frames file '" + args["frames"] + "'");
    std::vector<uint8_t> pixels(n * height * stride);
    in.read(reinterpret_cast<char*>(pixels.data()), static_cast<std::streamsize>(pixels.size()));
    if (static_cast<size_t>(in.gcount()) != pixels.size())
      throw VaeError("frames file '" + args["frames"] + "' holds fewer than " + std::to_string(n) + " frames");

    auto encoder = load_encoder(args["model"], options);
    const EncoderInfo& info = encoder->info();
    // No --latent-format: what ComfyUI's LATENT holds for this model (raw, or LTX-2's normalised latents).
    if (!args.count("latent-format")) params.latent_format = latent_format_by_name(info.default_latent_format);
    std::cerr << info.architecture << " on " << info.device << " in " << precision_name(info.precision) << "\n"
              << describe_levers(cuda_levers(), info.device, info.precision) << "\n";
    // Through a session, as the element does: batches of --per-batch frames
    // form one stream, and the stream ends after the last frame (a video
    // model drops the frames of an incomplete last group, as the reference does).
    auto batch = encoder->new_batch(format, width, height, per_batch);
    auto session = encoder->open_session();
    const size_t per_frame = encoder->latent_floats_per_frame(*batch);
    std::vector<float> latents;
    size_t produced = 0, state_bytes = 0;
    auto start = std::chrono::steady_clock::now();
    for (size_t i = 0; i < n; ++i) {
      batch->add(pixels.data() + i * height * stride, stride, i);
      if (batch->full() || i + 1 == n) {
        params.end_of_clip = i + 1 == n;
        auto block = encoder->new_latents(*batch);
        const BatchResult result = session->encode(*batch, params, *block);
        latents.insert(latents.end(), block->data(), block->data() + result.spans.size() * per_frame);
        produced += result.spans.size();
        state_bytes = std::max(state_bytes, session->state_bytes());
        if (result.dropped.count)
          std::cerr << "dropped the last " << result.dropped.count << " frames (from frame " << result.dropped.first
                    << "): they do not complete a group of " << info.temporal_downscale << "\n";
        if (result.padded_frames)
          std::cerr << "padded the last group with " << result.padded_frames << " copies of the last frame\n";
        batch->clear();
      }
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::ofstream out(args["out"], std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(latents.data()), static_cast<std::streamsize>(latents.size() * 4));
    if (!out) throw VaeError("cannot write '" + args["out"] + "'");
    const int d = info.downscale;
    std::cerr << "encoded " << n << " frames to " << produced << " latents of " << info.latent_channels << "x" << batch->crop().height / d << "x"
              << batch->crop().width / d << " latents in " << seconds << " s (" << n / seconds << " frames/s)\n";
    if (state_bytes)
      std::cerr << "stream state: " << state_bytes << " bytes at most ("
                << static_cast<double>(state_bytes) / (batch->crop().width * batch->crop().height)
                << " bytes per input pixel)\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
