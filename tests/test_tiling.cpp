// The memory fallbacks of the engine (tiling.h): sub-batch halving on
// out-of-memory, tile planning, feathered blending. The CUDA out-of-memory
// path cannot be provoked on a CPU machine, so the driver is tested with
// chunk functions that fail like LibTorch does.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <stdexcept>
#include <vector>

#include "tiling.h"

namespace gstvae {
namespace {

std::runtime_error cuda_oom() {
  return std::runtime_error("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)");
}

TEST(OutOfMemory, RecognisesLibTorchMessages) {
  EXPECT_TRUE(is_out_of_memory(cuda_oom()));
  EXPECT_TRUE(is_out_of_memory(std::runtime_error("DefaultCPUAllocator: can't allocate memory: you tried")));
  EXPECT_TRUE(is_out_of_memory(std::bad_alloc()));
  EXPECT_FALSE(is_out_of_memory(std::runtime_error("shape mismatch")));
}

TEST(MemoryFallback, HalvesTheSubBatchUntilItFitsAndKeepsOrder) {
  std::atomic<int64_t> sub_batch{std::numeric_limits<int64_t>::max()};
  std::vector<std::pair<int64_t, int64_t>> done;
  auto chunk = [&](int64_t start, int64_t count) {
    if (count > 2) throw cuda_oom();
    done.emplace_back(start, count);
  };
  auto tiled = [&](int64_t) { FAIL() << "no frame needs tiling"; };
  EncodeReport r = run_with_memory_fallback(8, sub_batch, chunk, tiled);
  const std::vector<std::pair<int64_t, int64_t>> expected = {{0, 2}, {2, 2}, {4, 2}, {6, 2}};
  EXPECT_EQ(done, expected);
  EXPECT_EQ(r.sub_batch, 2);
  EXPECT_EQ(sub_batch.load(), 2);
  EXPECT_EQ(r.notes.size(), 2u);  // 8 -> 4 -> 2
  EXPECT_EQ(r.tiled_frames, 0);

  // The lowered sub-batch is kept for the next batch: no new failure, no note.
  done.clear();
  r = run_with_memory_fallback(5, sub_batch, chunk, tiled);
  const std::vector<std::pair<int64_t, int64_t>> next = {{0, 2}, {2, 2}, {4, 1}};
  EXPECT_EQ(done, next);
  EXPECT_TRUE(r.notes.empty());
}

TEST(MemoryFallback, LoneFrameThatDoesNotFitIsTiledInPlace) {
  std::atomic<int64_t> sub_batch{4};
  std::vector<int64_t> order;
  auto chunk = [&](int64_t start, int64_t count) {
    if (start <= 5 && 5 < start + count) throw cuda_oom();  // frame 5 never fits whole
    for (int64_t i = start; i < start + count; ++i) order.push_back(i);
  };
  std::vector<int64_t> tiled_frames;
  auto tiled = [&](int64_t index) {
    tiled_frames.push_back(index);
    order.push_back(index);
  };
  EncodeReport r = run_with_memory_fallback(8, sub_batch, chunk, tiled);
  EXPECT_EQ(tiled_frames, std::vector<int64_t>{5});
  EXPECT_EQ(r.tiled_frames, 1);
  std::vector<int64_t> all = {0, 1, 2, 3, 4, 5, 6, 7};
  EXPECT_EQ(order, all);  // nothing lost, nothing reordered
  EXPECT_EQ(sub_batch.load(), 1);
}

TEST(MemoryFallback, OtherErrorsPropagate) {
  std::atomic<int64_t> sub_batch{4};
  auto chunk = [&](int64_t, int64_t) { throw std::runtime_error("shape mismatch"); };
  EXPECT_THROW(run_with_memory_fallback(3, sub_batch, chunk, [](int64_t) {}), std::runtime_error);
  EXPECT_EQ(sub_batch.load(), 4);
}

TEST(Tiles, PositionsFollowComfyUI) {
  // range(0, 1024 - 64, 512 - 64) = 0, 448, 896; the last tile is clipped.
  auto t = plan_tiles(1024, 1024, 512, 512, 64);
  ASSERT_EQ(t.size(), 9u);
  EXPECT_EQ(t[0].x, 0);
  EXPECT_EQ(t[1].x, 448);
  EXPECT_EQ(t[2].x, 896);
  EXPECT_EQ(t[2].w, 128);
  EXPECT_EQ(t[8].y, 896);
  EXPECT_EQ(t[8].h, 128);
  auto one = plan_tiles(512, 320, 512, 512, 64);
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].h, 512);
  EXPECT_EQ(one[0].w, 320);
  auto wide = plan_tiles(256, 600, 256, 512, 64);  // width: range(0, 536, 448) = 0, 448
  ASSERT_EQ(wide.size(), 2u);
  EXPECT_EQ(wide[1].x, 448);
  EXPECT_EQ(wide[1].w, 152);
  EXPECT_THROW(plan_tiles(256, 256, 64, 64, 64), std::exception);
}

TEST(Tiles, FeatherMaskRampsOnEverySide) {
  at::Tensor m = feather_mask(6, 10, 2, at::TensorOptions().dtype(at::kDouble));
  EXPECT_DOUBLE_EQ(m[0][0].item<double>(), 0.25);
  EXPECT_DOUBLE_EQ(m[0][5].item<double>(), 0.5);
  EXPECT_DOUBLE_EQ(m[1][1].item<double>(), 1.0);
  EXPECT_DOUBLE_EQ(m[3][5].item<double>(), 1.0);
  EXPECT_DOUBLE_EQ(m[5][9].item<double>(), 0.25);
  EXPECT_TRUE(at::equal(m, m.flip({0, 1})));
}

// An encoder that is exactly local (the mean of each 8x8 block): tiles blend
// back into the untiled result whatever the tile layout.
at::Tensor block_mean(const at::Tensor& x) { return at::avg_pool2d(x, {8, 8}); }

TEST(Tiles, BlendingReproducesALocalEncoder) {
  at::Tensor x = at::rand({1, 3, 96, 136}, at::TensorOptions().dtype(at::kFloat));
  at::Tensor direct = block_mean(x);
  at::Tensor tiled = encode_tiled(block_mean, x, 8, /*tile=*/64, /*overlap=*/16);
  ASSERT_EQ(tiled.sizes(), direct.sizes());
  EXPECT_LT((tiled - direct).abs().max().item<float>(), 1e-6f);
}

TEST(Tiles, BlendsOverlapsAsAWeightedMean) {
  // Each tile returns a constant equal to its own x offset: where tiles overlap
  // the result must lie between the two constants, and equal one where only
  // one tile covers a cell.
  at::Tensor x = at::zeros({1, 3, 64, 200}, at::TensorOptions().dtype(at::kFloat));
  int64_t calls = 0;
  auto constant = [&](const at::Tensor& tile) {
    ++calls;
    return at::full({1, 1, tile.size(2) / 8, tile.size(3) / 8}, static_cast<float>(tile.size(3)));
  };
  at::Tensor out = encode_tiled(constant, x, 8, 64, 16);
  EXPECT_GT(calls, 3);
  EXPECT_EQ(out.size(3), 25);
  EXPECT_TRUE(at::isfinite(out).all().item<bool>());
  EXPECT_GE(out.min().item<float>(), 0.0f);
  EXPECT_LE(out.max().item<float>(), 128.0f);
}

TEST(Tiles, SingleTileIsTheDirectEncode) {
  at::Tensor x = at::rand({1, 3, 64, 64}, at::TensorOptions().dtype(at::kFloat));
  auto fn = [](const at::Tensor& t) { return at::avg_pool2d(t * t, {8, 8}) + 1.0; };
  at::Tensor tiled = encode_tiled(fn, x, 8, 512, 64);
  EXPECT_LT((tiled - fn(x)).abs().max().item<float>(), 1e-6f);
}

// ---------------------------------------------------------------- decode

// A decoder that is a pure per-cell function: every latent cell becomes an
// 8x8 block of (a mix of) its channel values.
at::Tensor cell_decoder(const at::Tensor& z) {
  at::Tensor rgb = at::tanh(z.narrow(1, 0, 3) * 0.7 + z.narrow(1, 3, 1) * 0.2);
  return at::upsample_nearest2d(rgb, {z.size(2) * 8, z.size(3) * 8});
}

// A decoder whose output depends on the whole tile (its mean), so that how
// tiles are placed, feathered and averaged shows in the result.
at::Tensor tile_dependent_decoder(const at::Tensor& z) {
  return cell_decoder(z) + z.mean() * 0.5 + static_cast<double>(z.size(3)) / 64.0;
}

// ComfyUI's tiled_scale (tiled_scale_multidim, 2-D, upscale 8) written out
// with plain loops over doubles, for one pass with tiles of tile_h x tile_w
// latent cells.
std::vector<double> comfy_tiled_pass(const at::Tensor& z, int64_t tile_h, int64_t tile_w, int64_t overlap,
                                     const std::function<at::Tensor(const at::Tensor&)>& fn) {
  const int64_t h = z.size(2), w = z.size(3), up = 8, H = h * up, W = w * up;
  std::vector<double> out(3 * H * W, 0.0), div(3 * H * W, 0.0);
  if (h <= tile_h && w <= tile_w) {
    at::Tensor all = fn(z).to(at::kDouble).contiguous();
    return std::vector<double>(all.data_ptr<double>(), all.data_ptr<double>() + all.numel());
  }
  auto positions = [&](int64_t size, int64_t tile) {
    std::vector<int64_t> p;
    if (size <= tile) return std::vector<int64_t>{0};
    for (int64_t v = 0; v < size - overlap; v += tile - overlap) p.push_back(v);
    return p;
  };
  const int64_t feather = overlap * up;
  for (int64_t y0 : positions(h, tile_h))
    for (int64_t x0 : positions(w, tile_w)) {
      const int64_t y = std::max<int64_t>(0, std::min(h - overlap, y0));
      const int64_t x = std::max<int64_t>(0, std::min(w - overlap, x0));
      const int64_t th = std::min(tile_h, h - y), tw = std::min(tile_w, w - x);
      at::Tensor part = fn(z.narrow(2, y, th).narrow(3, x, tw)).to(at::kDouble).contiguous();
      const int64_t ph = part.size(2), pw = part.size(3);
      const double* v = part.data_ptr<double>();
      // Mask: per dimension, ramps of (t + 1) / feather on both ends, unless
      // the feather is not smaller than the tile along that dimension.
      auto ramp = [&](int64_t n) {
        std::vector<double> m(static_cast<size_t>(n), 1.0);
        if (feather >= n) return m;
        for (int64_t t = 0; t < feather; ++t) {
          m[static_cast<size_t>(t)] *= (t + 1.0) / feather;
          m[static_cast<size_t>(n - 1 - t)] *= (t + 1.0) / feather;
        }
        return m;
      };
      const std::vector<double> rows = ramp(ph), cols = ramp(pw);
      for (int64_t c = 0; c < 3; ++c)
        for (int64_t i = 0; i < ph; ++i)
          for (int64_t j = 0; j < pw; ++j) {
            const double m = rows[static_cast<size_t>(i)] * cols[static_cast<size_t>(j)];
            const int64_t o = (c * H + y * up + i) * W + x * up + j;
            out[o] += v[(c * ph + i) * pw + j] * m;
            div[o] += m;
          }
    }
  for (size_t i = 0; i < out.size(); ++i) out[i] /= div[i];
  return out;
}

// ComfyUI's decode_tiled_: (w/2, 2h), (2w, h/2), (w, h) passes as
// tiled_scale(tile_x, tile_y) calls, i.e. (h=128, w=32), (h=32, w=128),
// (64, 64) as height x width, averaged.
std::vector<double> comfy_decode_tiled(const at::Tensor& z, const std::function<at::Tensor(const at::Tensor&)>& fn) {
  const std::vector<double> a = comfy_tiled_pass(z, 128, 32, 16, fn);
  const std::vector<double> b = comfy_tiled_pass(z, 32, 128, 16, fn);
  const std::vector<double> c = comfy_tiled_pass(z, 64, 64, 16, fn);
  std::vector<double> out(a.size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = (a[i] + b[i] + c[i]) / 3.0;
  return out;
}

double max_abs_diff(const at::Tensor& t, const std::vector<double>& ref) {
  at::Tensor d = t.to(at::kDouble).contiguous();
  double m = 0;
  for (int64_t i = 0; i < d.numel(); ++i) m = std::max(m, std::fabs(d.data_ptr<double>()[i] - ref[i]));
  return m;
}

TEST(DecodeTiles, PlanForTheThreeDecodePasses) {
  // 80 x 150 latent cells: taller than 64 and wider than 128, so every pass tiles.
  auto tall = plan_tiles(80, 150, 128, 32, 16);  // height fits; width range(0, 134, 16): 9 tiles
  ASSERT_EQ(tall.size(), 9u);
  EXPECT_EQ(tall[0].h, 80);
  EXPECT_EQ(tall[8].x, 128);
  EXPECT_EQ(tall[8].w, 22);
  auto wide = plan_tiles(80, 150, 32, 128, 16);  // rows range(0, 64, 16) = 0..48; cols 0, 112
  ASSERT_EQ(wide.size(), 8u);
  EXPECT_EQ(wide[1].x, 112);
  EXPECT_EQ(wide[1].w, 38);
  EXPECT_EQ(wide[7].y, 48);
  EXPECT_EQ(wide[7].h, 32);
  auto square = plan_tiles(80, 150, 64, 64, 16);  // rows 0, 48; cols 0, 48, 96
  ASSERT_EQ(square.size(), 6u);
  EXPECT_EQ(square[5].y, 48);
  EXPECT_EQ(square[5].h, 32);
  EXPECT_EQ(square[5].x, 96);
  EXPECT_EQ(square[5].w, 54);
  // The decode feather: 16 cells of overlap at upscale 8 = 128 pixels.
  at::Tensor m = feather_mask(256, 512, 128, at::TensorOptions().dtype(at::kDouble));
  EXPECT_DOUBLE_EQ(m[0][200].item<double>(), 1.0 / 128);
  EXPECT_DOUBLE_EQ(m[127][200].item<double>(), 1.0);
  EXPECT_DOUBLE_EQ(m[128][0].item<double>(), 1.0 / 128);
  EXPECT_DOUBLE_EQ(m[63][63].item<double>(), 0.25);
}

TEST(DecodeTiles, PerCellDecoderTilesBackIntoTheUntiledResult) {
  at::Tensor z = at::randn({1, 4, 80, 150}, at::TensorOptions().dtype(at::kFloat));
  at::Tensor direct = cell_decoder(z);
  at::Tensor tiled = decode_tiled(cell_decoder, z, 8);
  ASSERT_EQ(tiled.sizes(), direct.sizes());
  EXPECT_LT((tiled - direct).abs().max().item<float>(), 2e-6f);
}

TEST(DecodeTiles, BlendingFollowsComfyUITiledScale) {
  at::Tensor z = at::randn({1, 4, 80, 150}, at::TensorOptions().dtype(at::kFloat));
  int64_t calls = 0;
  auto fn = [&](const at::Tensor& t) {
    ++calls;
    return tile_dependent_decoder(t);
  };
  at::Tensor tiled = decode_tiled(fn, z, 8);
  EXPECT_EQ(calls, 9 + 8 + 6);
  const std::vector<double> expected = comfy_decode_tiled(z, tile_dependent_decoder);
  ASSERT_EQ(tiled.numel(), static_cast<int64_t>(expected.size()));
  EXPECT_LT(max_abs_diff(tiled, expected), 1e-5);
  // The tiles do differ: the blend is not the untiled decode.
  EXPECT_GT((tiled - tile_dependent_decoder(z)).abs().max().item<float>(), 0.05f);
}

TEST(DecodeTiles, LatentWithinOneTileIsDecodedWhole) {
  at::Tensor z = at::randn({1, 4, 20, 30}, at::TensorOptions().dtype(at::kFloat));
  const std::vector<double> expected = comfy_decode_tiled(z, tile_dependent_decoder);
  EXPECT_LT(max_abs_diff(decode_tiled(tile_dependent_decoder, z, 8), expected), 1e-5);
}

}  // namespace
}  // namespace gstvae
