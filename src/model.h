// What the encoder and decoder interfaces share: load options, precision,
// what a batch had to do to fit in memory, and the span of input frames each
// output of a batch covers. No LibTorch and no GStreamer here.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace gstvae {

enum class Precision { Auto, F32, F16, BF16 };
const char* precision_name(Precision precision);
// "auto", "fp32", "fp16" or "bf16"; throws VaeError listing them otherwise.
Precision precision_by_name(const std::string& name);
// Every precision, Auto first: the one table that names and GEnums are built from.
const std::vector<Precision>& all_precisions();

struct ModelOptions {
  // "auto" (CUDA when LibTorch has a device, else CPU), "cpu", "cuda", "cuda:N".
  std::string device = "auto";
  // Auto: bf16 on CUDA devices of compute capability >= 8.0, else fp32.
  Precision precision = Precision::Auto;
  // Intra-op CPU threads; 0 = all cores. LibTorch's setting is per process.
  int threads = 0;
  // Which diffusion model's latent space a tiny autoencoder belongs to
  // ("taesd", "taesdxl", "taesd3", "taef1", "taef2"), for files whose name and
  // metadata do not say; "" = from the file. Ignored by other families.
  std::string latent_space;
};

// What a batch had to do to fit in memory (see tiling.h).
struct ComputeReport {
  int64_t sub_batch = 0;     // items per forward pass in use at the end
  int64_t tiled_frames = 0;  // items computed tile by tile
  std::vector<std::string> notes;  // one line per fallback taken, for logs
};
using EncodeReport = ComputeReport;
using DecodeReport = ComputeReport;

// The input frames an output covers, by stream index (FrameBatch::indices()
// for frames, the order of arrival for latents). Image models map one input
// to one output; temporal models cover several inputs, possibly from an
// earlier batch, and may emit nothing for a batch.
//
// A video decoder makes several frames of one latent: each frame's span names
// that latent (count 1) and which of its `parts` equal shares of the
// latent's time the frame is (`part`, from 0).
struct Span {
  uint64_t first = 0;
  uint32_t count = 1;
  uint32_t part = 0;
  uint32_t parts = 1;
};

struct BatchResult {
  std::vector<Span> spans;  // one per output, in output order
  ComputeReport report;
  // A temporal model's clip end: the frames of an incomplete group that were
  // dropped (count 0: none), or, when padding was asked for, how many copies
  // of the last frame completed the group of the last span.
  Span dropped{0, 0};
  uint32_t padded_frames = 0;
};

}  // namespace gstvae
