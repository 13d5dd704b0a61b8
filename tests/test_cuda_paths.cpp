// What of the CUDA-only paths runs without a GPU: the CUDA graphs' bookkeeping
// (when to warm up, capture, replay, re-capture, evict), the runner's refusal
// of a CPU device, and the download-overlap plumbing of latent blocks. The
// capture and replay themselves run in the GPU check (docs/gpu.md).
#include <ATen/Context.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "cuda_graphs.h"
#include "errors.h"
#include "frame.h"
#include "graph_book.h"
#include "levers.h"

namespace gstvae {
namespace {

GraphKey key(int64_t n, int64_t side, int dtype = 6) { return {{n, 3, side, side}, dtype, 0}; }

TEST(GraphBook, WarmsUpThenCapturesOnceThenReplays) {
  GraphBook book(/*warmup_runs=*/2, /*max_graphs=*/4);
  const GraphKey k = key(4, 512);
  EXPECT_EQ(book.next(k), GraphBook::Step::Eager);
  EXPECT_EQ(book.next(k), GraphBook::Step::Eager);
  EXPECT_EQ(book.next(k), GraphBook::Step::Capture);
  EXPECT_EQ(book.captured(k), std::nullopt);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(book.next(k), GraphBook::Step::Replay);
  EXPECT_EQ(book.captures(), 1u);
  EXPECT_EQ(book.replays(), 5u);
  EXPECT_EQ(book.eager_runs(), 2u);
  EXPECT_EQ(book.graphs(), 1u);
}

TEST(GraphBook, EveryShapeAndPrecisionIsItsOwnGraph) {
  GraphBook book(1, 8);
  // A partial batch (3 frames), another frame size, another dtype, another device.
  const std::vector<GraphKey> keys = {key(4, 512), key(3, 512), key(4, 256), key(4, 512, 15),
                                      {{4, 3, 512, 512}, 6, 1}};
  for (const GraphKey& k : keys) {
    SCOPED_TRACE(k.str());
    EXPECT_EQ(book.next(k), GraphBook::Step::Eager) << "a new key warms up first";
    EXPECT_EQ(book.next(k), GraphBook::Step::Capture);
    book.captured(k);
  }
  for (const GraphKey& k : keys) EXPECT_EQ(book.next(k), GraphBook::Step::Replay) << k.str();
  EXPECT_EQ(book.graphs(), keys.size());
}

TEST(GraphBook, DropsTheLeastRecentlyUsedGraphAndWarmsItUpAgain) {
  GraphBook book(1, 2);
  const GraphKey a = key(1, 64), b = key(1, 128), c = key(1, 256);
  for (const GraphKey& k : {a, b}) {
    book.next(k);
    ASSERT_EQ(book.next(k), GraphBook::Step::Capture);
    EXPECT_EQ(book.captured(k), std::nullopt);
  }
  EXPECT_EQ(book.next(a), GraphBook::Step::Replay);  // b is now the least recently used
  book.next(c);
  ASSERT_EQ(book.next(c), GraphBook::Step::Capture);
  const std::optional<GraphKey> dropped = book.captured(c);
  ASSERT_TRUE(dropped.has_value());
  EXPECT_EQ(*dropped, b);
  EXPECT_EQ(book.graphs(), 2u);
  EXPECT_EQ(book.next(b), GraphBook::Step::Eager) << "a dropped graph is captured anew after warm-up";
  EXPECT_EQ(book.next(b), GraphBook::Step::Capture);
  EXPECT_EQ(book.next(a), GraphBook::Step::Replay);
  EXPECT_EQ(book.next(c), GraphBook::Step::Replay);
}

TEST(GraphBook, AFailedCaptureRunsEagerlyForGood) {
  GraphBook book(1, 4);
  const GraphKey k = key(2, 64);
  book.next(k);
  ASSERT_EQ(book.next(k), GraphBook::Step::Capture);
  book.capture_failed(k);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(book.next(k), GraphBook::Step::Eager);
  EXPECT_EQ(book.captures(), 0u);
  EXPECT_EQ(book.graphs(), 0u);
}

TEST(GraphBook, RefusesNoWarmUpOrNoRoom) {
  EXPECT_THROW(GraphBook(0, 4), std::invalid_argument) << "cuDNN's autotuning must run before a capture";
  EXPECT_THROW(GraphBook(1, 0), std::invalid_argument);
}

TEST(CudaGraphs, RunnerOnlyForCudaDevicesInCudaBuilds) {
  if (cuda_built()) {
    EXPECT_THROW(make_cuda_graphed_forward(c10::Device(c10::kCPU)), VaeError);
  } else {
    EXPECT_EQ(make_cuda_graphed_forward(c10::Device(c10::kCPU)), nullptr);
  }
}

// A block with no copy in flight (every CPU encode, and GPU encodes without
// GSTVAE_DOWNLOAD_OVERLAP) is ready at once.
TEST(DownloadOverlap, BlocksWithoutACopyInFlightAreReady) {
  LatentBlock block(16, /*pinned=*/false);
  EXPECT_FALSE(block.has_pending_copy());
  block.wait_ready();
  block.data()[0] = 1.0f;
  EXPECT_FALSE(block.has_pending_copy());
}

// CI's build links libtorch_cuda and runs where there is no GPU and no
// driver: it finds no device, says so once, and device=auto runs on the CPU.
TEST(Devices, ACudaBuildWithoutADeviceSaysSoOnce) {
  const std::string note = no_cuda_device_note();
  if (!cuda_built() || at::hasCUDA()) {
    EXPECT_TRUE(note.empty()) << note;
    EXPECT_EQ(take_no_cuda_device_note(), "");
    return;
  }
  EXPECT_NE(note.find("finds no CUDA device"), std::string::npos) << note;
  EXPECT_NE(note.find(libtorch_version()), std::string::npos) << note;
  EXPECT_EQ(take_no_cuda_device_note(), note);
  EXPECT_EQ(take_no_cuda_device_note(), "") << "said once per process";
}

}  // namespace
}  // namespace gstvae
