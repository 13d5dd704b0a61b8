// Memory fallbacks for encode and decode: splitting a batch into sub-batches that are
// halved on out-of-memory, and, for a single frame that still does not fit,
// tiled encoding blended like ComfyUI's encode_tiled_ (512x512 tiles, 64-pixel
// overlap, linear feathering over the overlap, averaged over three tile
// shapes). LibTorch types, engine-internal.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <string>
#include <vector>

#include "encoder.h"

namespace gstvae {

// True for LibTorch's CUDA and CPU allocation failures (and std::bad_alloc).
bool is_out_of_memory(const std::exception& e);

struct Tile {
  int64_t y, x, h, w;  // pixels
};

// ComfyUI's tile positions: steps of (tile - overlap) from 0 while short of
// (size - overlap); a dimension no larger than the tile is one tile. Tiles at
// the right and bottom edges are clipped to the image.
std::vector<Tile> plan_tiles(int64_t height, int64_t width, int64_t tile_h, int64_t tile_w, int64_t overlap);

// h x w weights ramping linearly from 1/feather to 1 over `feather` cells on
// every side (ComfyUI's tiled_scale mask).
at::Tensor feather_mask(int64_t h, int64_t w, int64_t feather, const at::TensorOptions& options);

// Encodes one image x (1 x 3 x H x W, H and W multiples of `downscale`) tile by
// tile with `fn` (pixels -> latent-space tensor 1 x C x H/d x W/d) and blends
// the tiles. Three passes (tile x tile, 2*tile x tile/2, tile/2 x 2*tile) are
// averaged, as ComfyUI does. Returns fp32.
at::Tensor encode_tiled(const std::function<at::Tensor(const at::Tensor&)>& fn, const at::Tensor& x,
                        int64_t downscale, int64_t tile = 512, int64_t overlap = 64);

// The same for the decode (ComfyUI's decode_tiled_): z is 1 x C x h x w
// latents, tiles of 64 latent cells with a 16-cell overlap, fn gives
// 1 x 3 x h*upscale x w*upscale; passes (2t x t/2), (t/2 x 2t), (t x t), as
// height x width, averaged.
at::Tensor decode_tiled(const std::function<at::Tensor(const at::Tensor&)>& fn, const at::Tensor& z,
                        int64_t upscale, int64_t tile = 64, int64_t overlap = 16);

using FallbackReport = ComputeReport;

// Runs frames [0, n) through run_chunk(start, count) in order, in sub-batches
// of at most `sub_batch` (shared across calls: once halved it stays halved).
// On out-of-memory the sub-batch is halved and the chunk retried; a single
// frame that still fails goes to run_tiled(index). Other errors propagate.
// No frame is lost or reordered.
FallbackReport run_with_memory_fallback(int64_t n, std::atomic<int64_t>& sub_batch,
                                        const std::function<void(int64_t, int64_t)>& run_chunk,
                                        const std::function<void(int64_t)>& run_tiled,
                                        const std::string& verb = "encoding",
                                        const std::string& tiling = "tiled encoding (512x512 tiles, 64-pixel overlap)");

}  // namespace gstvae
