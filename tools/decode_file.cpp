// gst-vae-decode-file: decodes a latent file (.npy, .latent or .safetensors;
// float32 N x C x h x w) into raw 8-bit RGB frames (F x H x W x 3) with the
// engine alone (no GStreamer), through a session as vaedecode does. With
// --float it writes what the 8 bits are rounded from instead: float32
// F x 3 x H x W in [0, 1], ComfyUI's clamp((x + 1) / 2) of the decoder
// output. A video decoder (Wan, TAEHV) decodes the file as one clip, F =
// 1 + 4 (N - 1), unless --images decodes each latent alone (F = N). Used by
// the cross-checks against the Python references and by benchmarks.
#include <algorithm>
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
  std::cerr << "usage: gst-vae-decode-file --model M --latents IN.npy|IN.latent|IN.safetensors --out OUT\n"
               "         [--device auto|cpu|cuda[:N]] [--precision auto|fp32|fp16|bf16]\n"
               "         [--latent-format raw|sd15|sdxl|sd3|flux|wan21|wan22] [--per-batch B] [--threads T] [--float]\n"
               "         [--warmup] [--images]  (a video decoder: each latent alone, not one clip)\n"
               "         [--latent-space taesd|taesdxl|taesd3|taef1|taef2]  (a TAESD file's latent space;\n"
               "                          taehv1_5|lighttaehy1_5|taeltx_2|taeltx2_3|...: a TAEHV file's)\n"
               "         [--test-memory-limit CELLS]  (forward passes over more latent cells fail as out of memory)\n"
               "  OUT: F x H x W x 3 bytes (RGB), or with --float F x 3 x H x W little-endian float32 in [0, 1]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> args;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0) return usage();
    a = a.substr(2);
    if (a == "float" || a == "warmup" || a == "images") {
      args[a] = "1";
    } else if (i + 1 < argc) {
      args[a] = argv[++i];
    } else {
      return usage();
    }
  }
  for (const char* required : {"model", "latents", "out"})
    if (!args.count(required)) return usage();
  try {
    const bool float_output = args.count("float") != 0;
    const size_t per_batch = args.count("per-batch") ? std::stoul(args["per-batch"]) : 4;
    if (per_batch == 0) throw VaeError("--per-batch must be at least 1");
    ModelOptions options;
    if (args.count("device")) options.device = args["device"];
    if (args.count("precision")) options.precision = precision_by_name(args["precision"]);
    if (args.count("threads")) options.threads = std::stoi(args["threads"]);
    if (args.count("latent-space")) options.latent_space = args["latent-space"];
    DecodeParams params;
    if (args.count("latent-format")) params.latent_format = latent_format_by_name(args["latent-format"]);

    const LatentArray latents = read_latent_file(args["latents"]);
    if (!args.count("latent-format")) {
      // What latentfilesrc announces: a .safetensors file's latent_format
      // metadata says what its values are; a .latent (ComfyUI's rule) and a
      // .npy (latentfilesink stores raw values there) hold raw latents.
      const LatentFileLayout layout = LatentFileReader(args["latents"]).layout();
      const auto recorded = latents.metadata.find("latent_format");
      if (layout.format == LatentFileFormat::Safetensors && !layout.npy && recorded != latents.metadata.end()) {
        params.latent_format = latent_format_by_name(recorded->second);
        std::cerr << "latent format " << recorded->second << " (the file's latent_format metadata)\n";
      }
    }
    auto decoder = load_decoder(args["model"], options);
    const DecoderInfo& info = decoder->info();
    std::cerr << info.architecture << " (" << info.layout << ") on " << info.device << " in "
              << precision_name(info.precision) << "\n";
    if (latents.channels != info.latent_channels)
      throw VaeError("'" + args["latents"] + "' holds latents of " + std::to_string(latents.channels) +
                     " channels; the decoder '" + args["model"] + "' takes " + std::to_string(info.latent_channels));
    const int h = static_cast<int>(latents.height), w = static_cast<int>(latents.width);
    const size_t n = static_cast<size_t>(latents.frames);
    const size_t H = static_cast<size_t>(h) * info.upscale, W = static_cast<size_t>(w) * info.upscale;

    if (args.count("test-memory-limit")) decoder->set_test_memory_limit(std::stoll(args["test-memory-limit"]));
    const int frames_per_latent = args.count("images") ? 1 : info.temporal_upscale;
    auto batch = decoder->new_batch(h, w, per_batch);
    const size_t per_latent = batch->floats_per_latent();
    const size_t frame_bytes = float_output ? 3 * H * W * sizeof(float) : decoder->frame_bytes(*batch, PixelFormat::RGB);
    std::vector<uint8_t> frames(n * frames_per_latent * frame_bytes);
    auto run = [&](DecodeSession& session, uint8_t* dest) {
      if (float_output) return session.decode_float(*batch, params, reinterpret_cast<float*>(dest));
      PixelBlock block(batch->size() * frames_per_latent * frame_bytes, false);
      BatchResult r = session.decode(*batch, params, PixelFormat::RGB, block);
      std::copy(block.data(), block.data() + r.spans.size() * frame_bytes, dest);
      return r;
    };
    if (args.count("warmup") && n > 0) {
      // One untimed batch first, in a session of its own: oneDNN builds its
      // kernels for a shape on first use.
      auto warm = decoder->open_session(frames_per_latent);
      for (size_t i = 0; i < std::min(n, per_batch); ++i) batch->add(latents.values.data() + i * per_latent, i);
      run(*warm, frames.data());
      batch->clear();
    }
    auto session = decoder->open_session(frames_per_latent);
    auto start = std::chrono::steady_clock::now();
    size_t done = 0;
    size_t tiled = 0;
    for (size_t i = 0; i < n; ++i) {
      batch->add(latents.values.data() + i * per_latent, i);
      if (batch->full() || i + 1 == n) {
        const BatchResult r = run(*session, frames.data() + done * frame_bytes);
        for (const std::string& note : r.report.notes) std::cerr << note << "\n";
        tiled += static_cast<size_t>(r.report.tiled_frames);
        done += r.spans.size();
        batch->clear();
      }
    }
    frames.resize(done * frame_bytes);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::ofstream out(args["out"], std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(frames.data()), static_cast<std::streamsize>(frames.size()));
    if (!out) throw VaeError("cannot write '" + args["out"] + "'");
    std::cerr << "decoded " << n << " latents to " << done << " frames of " << W << "x" << H << " in " << seconds
              << " s (" << done / seconds << " frames/s)" << (tiled ? ", " + std::to_string(tiled) + " tiled" : "");
    if (frames_per_latent > 1) std::cerr << ", stream state " << session->state_bytes() << " bytes";
    std::cerr << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
