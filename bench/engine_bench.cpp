// gst-vae-engine-bench: frames/s of the engine alone (no GStreamer) on
// synthetic frames, for several batch sizes and precisions.
//   gst-vae-engine-bench MODEL [--size 512] [--batches 1,4,16] [--precisions fp32,bf16]
//                              [--device auto] [--iters 3] [--threads 0]
// Each configuration runs one warm-up batch (cuDNN autotuning, allocator), then
// `iters` timed batches twice: serially, and overlapped as in the element (the
// next batch prepared by another thread while one encodes). frames/s = frames /
// wall time, including the upload and the device->host copy of the latents.
// Before each precision's rows, a "levers:" line says which CUDA speed levers
// (GSTVAE_* variables, docs/gpu.md) were set and which took effect.
#include <chrono>
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "encoder.h"
#include "levers.h"

using namespace gstvae;

namespace {

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(item);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: gst-vae-engine-bench MODEL [--size 512] [--batches 1,4,16] [--precisions fp32,bf16] "
                 "[--device auto] [--iters 3] [--threads 0]\n";
    return 2;
  }
  std::string model = argv[1], device = "auto", batches = "1,4,16", precisions = "fp32,bf16";
  int size = 512, iters = 3, threads = 0;
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--size") size = std::stoi(v);
    else if (k == "--batches") batches = v;
    else if (k == "--precisions") precisions = v;
    else if (k == "--device") device = v;
    else if (k == "--iters") iters = std::stoi(v);
    else if (k == "--threads") threads = std::stoi(v);
  }
  std::vector<uint8_t> frame(static_cast<size_t>(size) * size * 3);
  for (size_t i = 0; i < frame.size(); ++i) frame[i] = static_cast<uint8_t>((i * 2654435761u) >> 24);

  std::printf("%-6s %-5s %6s %10s %12s %12s\n", "size", "prec", "batch", "ms/batch", "frames/s", "overlapped");
  for (const std::string& p : split(precisions)) {
    ModelOptions options;
    options.device = device;
    options.threads = threads;
    std::shared_ptr<Encoder> encoder;
    try {
      options.precision = precision_by_name(p);
      encoder = load_encoder(model, options);
    } catch (const std::exception& e) {
      std::printf("%-6d %-5s skipped: %s\n", size, p.c_str(), e.what());
      continue;
    }
    // Which CUDA speed levers ran (environment variables, docs/gpu.md).
    std::printf("%s\n", describe_levers(cuda_levers(), encoder->info().device, encoder->info().precision).c_str());
    for (const std::string& b : split(batches)) {
      const size_t n = std::stoul(b);
      // Two staging batches, as the element keeps one gathering while one encodes.
      std::unique_ptr<FrameBatch> staged[2];
      for (auto& batch : staged) {
        batch = encoder->new_batch(PixelFormat::RGB, size, size, n);
        for (size_t i = 0; i < n; ++i) batch->add(frame.data(), static_cast<size_t>(size) * 3, i);
      }
      // As the element does: prepare (upload), then encode into a block from
      // new_latents() (page-locked on GPUs: one async copy back per batch).
      auto out = encoder->new_latents(*staged[0]);
      EncodeParams params;
      auto timed = [&](auto&& body) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < iters; ++i) body(i);
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      };
      try {
        encoder->prepare(*staged[0]);
        encoder->encode(*staged[0], params, *out);  // warm-up (cuDNN autotuning, allocator)
        // Serial: prepare, then encode, batch after batch.
        const double serial = timed([&](int) {
          encoder->prepare(*staged[0]);
          encoder->encode(*staged[0], params, *out);
        });
        // Overlapped, as in the element: batch k+1 is prepared (on GPUs:
        // uploaded on a side stream) by another thread while batch k encodes.
        encoder->prepare(*staged[0]);
        const double overlapped = timed([&](int i) {
          std::thread next([&] { encoder->prepare(*staged[(i + 1) % 2]); });
          encoder->encode(*staged[i % 2], params, *out);
          next.join();
        });
        std::printf("%-6d %-5s %6zu %10.1f %12.2f %12.2f   (%s on %s)\n", size, p.c_str(), n,
                    serial / iters * 1000, n * iters / serial, n * iters / overlapped,
                    precision_name(encoder->info().precision), encoder->info().device.c_str());
      } catch (const std::exception& e) {
        std::printf("%-6d %-5s %6zu failed: %s\n", size, p.c_str(), n, e.what());
      }
      std::fflush(stdout);
    }
  }
  return 0;
}
