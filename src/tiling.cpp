#include "tiling.h"

#include <algorithm>
#include <new>

#include "errors.h"

namespace gstvae {

bool is_out_of_memory(const std::exception& e) {
  if (dynamic_cast<const std::bad_alloc*>(&e)) return true;
  const std::string what = e.what();
  return what.find("out of memory") != std::string::npos || what.find("can't allocate memory") != std::string::npos;
}

std::vector<Tile> plan_tiles(int64_t height, int64_t width, int64_t tile_h, int64_t tile_w, int64_t overlap) {
  if (tile_h <= overlap || tile_w <= overlap)
    throw VaeError("tile of " + std::to_string(tile_w) + "x" + std::to_string(tile_h) +
                      " is not larger than its overlap of " + std::to_string(overlap));
  auto positions = [overlap](int64_t size, int64_t tile) {
    std::vector<int64_t> p;
    if (size <= tile) return std::vector<int64_t>{0};
    for (int64_t v = 0; v < size - overlap; v += tile - overlap) p.push_back(v);
    return p;
  };
  std::vector<Tile> tiles;
  for (int64_t y : positions(height, tile_h))
    for (int64_t x : positions(width, tile_w))
      tiles.push_back({y, x, std::min(tile_h, height - y), std::min(tile_w, width - x)});
  return tiles;
}

at::Tensor feather_mask(int64_t h, int64_t w, int64_t feather, const at::TensorOptions& options) {
  at::Tensor mask = at::ones({h, w}, options);
  for (int64_t t = 0; t < feather; ++t) {
    const double f = static_cast<double>(t + 1) / feather;
    if (t < h) {
      mask.select(0, t).mul_(f);
      mask.select(0, h - 1 - t).mul_(f);
    }
    if (t < w) {
      mask.select(1, t).mul_(f);
      mask.select(1, w - 1 - t).mul_(f);
    }
  }
  return mask;
}

namespace {

// One pass of ComfyUI's tiled_scale: output positions are input positions
// times num/den (1/8 to encode, 8 to decode); the feather is the overlap in
// output cells.
at::Tensor tiled_pass(const std::function<at::Tensor(const at::Tensor&)>& fn, const at::Tensor& x, int64_t num,
                      int64_t den, int64_t tile_h, int64_t tile_w, int64_t overlap) {
  const int64_t H = x.size(2), W = x.size(3);
  const int64_t feather = overlap * num / den;
  at::Tensor out, weight;
  for (const Tile& t : plan_tiles(H, W, tile_h, tile_w, overlap)) {
    at::Tensor part = fn(x.narrow(2, t.y, t.h).narrow(3, t.x, t.w)).to(at::kFloat);
    if (!out.defined()) {
      out = at::zeros({1, part.size(1), H * num / den, W * num / den}, part.options());
      weight = at::zeros({H * num / den, W * num / den}, part.options());
    }
    const int64_t oy = t.y * num / den, ox = t.x * num / den, oh = part.size(2), ow = part.size(3);
    at::Tensor mask = feather_mask(oh, ow, feather, part.options());
    out.narrow(2, oy, oh).narrow(3, ox, ow).add_(part * mask);
    weight.narrow(0, oy, oh).narrow(1, ox, ow).add_(mask);
  }
  return out / weight;
}

}  // namespace

at::Tensor encode_tiled(const std::function<at::Tensor(const at::Tensor&)>& fn, const at::Tensor& x,
                        int64_t downscale, int64_t tile, int64_t overlap) {
  at::Tensor sum = tiled_pass(fn, x, 1, downscale, tile, tile, overlap);
  sum.add_(tiled_pass(fn, x, 1, downscale, tile * 2, tile / 2, overlap));
  sum.add_(tiled_pass(fn, x, 1, downscale, tile / 2, tile * 2, overlap));
  return sum.div_(3.0);
}

at::Tensor decode_tiled(const std::function<at::Tensor(const at::Tensor&)>& fn, const at::Tensor& z,
                        int64_t upscale, int64_t tile, int64_t overlap) {
  // ComfyUI's decode_tiled_ sums (w/2 x 2h), (2w x h/2), (w x h) in that order.
  at::Tensor sum = tiled_pass(fn, z, upscale, 1, tile * 2, tile / 2, overlap);
  sum.add_(tiled_pass(fn, z, upscale, 1, tile / 2, tile * 2, overlap));
  sum.add_(tiled_pass(fn, z, upscale, 1, tile, tile, overlap));
  return sum.div_(3.0);
}

FallbackReport run_with_memory_fallback(int64_t n, std::atomic<int64_t>& sub_batch,
                                        const std::function<void(int64_t, int64_t)>& run_chunk,
                                        const std::function<void(int64_t)>& run_tiled, const std::string& verb,
                                        const std::string& tiling) {
  FallbackReport report;
  int64_t start = 0;
  while (start < n) {
    const int64_t count = std::max<int64_t>(1, std::min(sub_batch.load(), n - start));
    try {
      run_chunk(start, count);
      start += count;
      continue;
    } catch (const std::exception& e) {
      if (!is_out_of_memory(e)) throw;
      if (count > 1) {
        const int64_t half = count / 2;
        sub_batch.store(half);
        report.notes.push_back("out of memory " + verb + " " + std::to_string(count) + " items: sub-batch halved to " +
                               std::to_string(half));
        continue;
      }
    }
    report.notes.push_back("out of memory " + verb + " item " + std::to_string(start) + " alone: falling back to " +
                           tiling);
    run_tiled(start);
    report.tiled_frames++;
    start += 1;
  }
  report.sub_batch = sub_batch.load();
  return report;
}

}  // namespace gstvae
