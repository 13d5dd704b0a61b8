// The shared-weights cache behind load_encoder (src/model_cache.h): one
// encoder per (file identity, device, precision) while someone holds it, a new
// one for another file or a changed file, nothing kept once released, one load
// for concurrent callers, and concurrent encodes on the shared encoder.
//
// Other tests in this executable keep encoders alive, so counts are checked
// relative to the count at the start of each test.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "encoder.h"
#include "errors.h"
#include "fixtures.h"
#include "model_cache.h"

namespace gstvae {
namespace {

using test::TempDir;
using test::VaeSpec;

VaeSpec tiny_spec(uint64_t seed = 1) {
  VaeSpec s;
  s.ch = 32;
  s.mult = {1, 1, 2, 2};
  s.blocks = 1;
  s.seed = seed;
  s.include_decoder = false;
  return s;
}

ModelOptions cpu(Precision precision = Precision::Auto) {
  ModelOptions o;
  o.device = "cpu";
  o.precision = precision;
  return o;
}

// Moves the file's mtime by `seconds`, as a later rewrite would.
void touch_later(const std::string& path, int seconds) {
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  struct timespec times[2] = {st.st_atim, st.st_mtim};
  times[1].tv_sec += seconds;
  ASSERT_EQ(::utimensat(AT_FDCWD, path.c_str(), times, 0), 0);
}

struct Frames {
  std::vector<std::vector<uint8_t>> pixels;
  int w, h;
};

Frames rgb_frames(int w, int h, size_t n, uint64_t seed) {
  Frames f{{}, w, h};
  for (size_t i = 0; i < n; ++i) f.pixels.push_back(test::make_frame(w, h, 3, static_cast<size_t>(w) * 3, seed + i));
  return f;
}

std::vector<float> encode(Encoder& enc, const Frames& f, const EncodeParams& params = {}) {
  auto batch = enc.new_batch(PixelFormat::RGB, f.w, f.h, f.pixels.size());
  for (size_t i = 0; i < f.pixels.size(); ++i) batch->add(f.pixels[i].data(), static_cast<size_t>(f.w) * 3, i);
  std::vector<float> out(f.pixels.size() * enc.latent_floats_per_frame(*batch));
  enc.encode(*batch, params, out.data());
  return out;
}

// Releases all threads at once, so that their loads overlap.
class StartLine {
 public:
  explicit StartLine(int n) : waiting_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    if (--waiting_ == 0) cond_.notify_all();
    cond_.wait(lock, [&] { return waiting_ == 0; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable cond_;
  int waiting_;
};

class ModelCache : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_.file("vae.safetensors");
    test::write_test_vae(path_, tiny_spec());
    base_count_ = cached_encoder_count();
  }
  size_t added() const { return cached_encoder_count() - base_count_; }

  TempDir dir_;
  std::string path_;
  size_t base_count_ = 0;
};

TEST_F(ModelCache, SameFileTwiceIsOneEncoder) {
  auto a = load_encoder(path_, cpu());
  auto b = load_encoder(path_, cpu());
  EXPECT_EQ(a.get(), b.get());
  EXPECT_EQ(added(), 1u);
  EXPECT_EQ(gstvae_cached_encoder_count(), cached_encoder_count()) << "the C accessor sees another cache";
}

TEST_F(ModelCache, OtherSpellingsOfTheSamePathShareIt) {
  auto a = load_encoder(path_, cpu());
  // Through a symlink, and with a "." and a ".." in the path: one canonical path.
  const std::string link = dir_.file("link.safetensors");
  ASSERT_EQ(::symlink(path_.c_str(), link.c_str()), 0);
  EXPECT_EQ(load_encoder(link, cpu()).get(), a.get());
  std::filesystem::create_directory(dir_.file("sub"));
  EXPECT_EQ(load_encoder(dir_.path() + "/./sub/../vae.safetensors", cpu()).get(), a.get());
  EXPECT_EQ(added(), 1u);
}

TEST_F(ModelCache, AutoPrecisionSharesWithTheResolvedOne) {
  auto a = load_encoder(path_, cpu(Precision::Auto));  // fp32 on the CPU
  auto b = load_encoder(path_, cpu(Precision::F32));
  EXPECT_EQ(a.get(), b.get());
  ModelOptions any;  // device auto
  if (load_encoder(path_, any)->info().device == "cpu") {
    EXPECT_EQ(load_encoder(path_, any).get(), a.get());
  }
}

TEST_F(ModelCache, CopyUnderAnotherNameIsAnotherEncoder) {
  const std::string copy = dir_.file("copy.safetensors");
  std::filesystem::copy_file(path_, copy);
  auto a = load_encoder(path_, cpu());
  auto b = load_encoder(copy, cpu());
  EXPECT_NE(a.get(), b.get());
  // A hard link is the same inode under another path: the path is part of the key.
  const std::string hard = dir_.file("hard.safetensors");
  ASSERT_EQ(::link(path_.c_str(), hard.c_str()), 0);
  auto c = load_encoder(hard, cpu());
  EXPECT_NE(c.get(), a.get());
  EXPECT_EQ(added(), 3u);
  const Frames f = rgb_frames(32, 32, 2, 7);
  EXPECT_EQ(encode(*a, f), encode(*b, f));
  EXPECT_EQ(encode(*a, f), encode(*c, f));
}

TEST_F(ModelCache, RewrittenFileIsLoadedAgain) {
  auto a = load_encoder(path_, cpu());
  const Frames f = rgb_frames(32, 32, 2, 7);
  const auto ref_a = encode(*a, f);

  // Rewritten in place, same size (same shapes, other weights), later mtime.
  test::write_test_vae(path_, tiny_spec(2));
  touch_later(path_, 2);
  auto b = load_encoder(path_, cpu());
  EXPECT_NE(a.get(), b.get());
  EXPECT_NE(encode(*b, f), ref_a) << "the new encoder has the old weights";
  EXPECT_EQ(load_encoder(path_, cpu()).get(), b.get());

  // Rewritten with another size.
  VaeSpec bigger = tiny_spec(3);
  bigger.include_decoder = true;
  test::write_test_vae(path_, bigger);
  auto c = load_encoder(path_, cpu());
  EXPECT_NE(c.get(), b.get());
  EXPECT_NE(c.get(), a.get());

  // Replaced by a rename (a new inode), as atomic writers do.
  const std::string tmp = dir_.file("new.tmp");
  test::write_test_vae(tmp, tiny_spec(4));
  ASSERT_EQ(std::rename(tmp.c_str(), path_.c_str()), 0);
  auto d = load_encoder(path_, cpu());
  EXPECT_NE(d.get(), c.get());

  // The old ones still work (their weights are in memory, not in the file).
  EXPECT_EQ(encode(*a, f), ref_a);
  EXPECT_EQ(added(), 4u);
  a.reset();
  b.reset();
  c.reset();
  EXPECT_EQ(added(), 1u);
}

TEST_F(ModelCache, OtherPrecisionIsAnotherEncoder) {
  auto f32 = load_encoder(path_, cpu(Precision::F32));
  std::shared_ptr<Encoder> bf16;
  try {
    bf16 = load_encoder(path_, cpu(Precision::BF16));
  } catch (const VaeError& e) {
    GTEST_SKIP() << "bf16 does not run on this CPU: " << e.what();
  }
  EXPECT_NE(f32.get(), bf16.get());
  EXPECT_EQ(bf16->info().precision, Precision::BF16);
  EXPECT_EQ(f32->info().precision, Precision::F32);
  EXPECT_EQ(load_encoder(path_, cpu(Precision::BF16)).get(), bf16.get());
  EXPECT_EQ(added(), 2u);
}

TEST_F(ModelCache, ReleasedEncodersAreDropped) {
  const std::string copy = dir_.file("copy.safetensors");
  std::filesystem::copy_file(path_, copy);
  auto a = load_encoder(path_, cpu());
  auto b = load_encoder(copy, cpu());
  std::weak_ptr<Encoder> weak_a = a;
  EXPECT_EQ(added(), 2u);
  a.reset();
  EXPECT_TRUE(weak_a.expired()) << "the cache keeps the encoder alive";
  EXPECT_EQ(added(), 1u);
  b.reset();
  EXPECT_EQ(cached_encoder_count(), base_count_);
  // Loaded again from scratch after a release.
  auto c = load_encoder(path_, cpu());
  EXPECT_EQ(added(), 1u);
}

TEST_F(ModelCache, ConcurrentLoadsLoadOnce) {
  constexpr int kThreads = 4;
  for (int round = 0; round < 5; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    StartLine start(kThreads);
    std::vector<std::shared_ptr<Encoder>> got(kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t)
      threads.emplace_back([&, t] {
        start.arrive_and_wait();
        got[t] = load_encoder(path_, cpu());
      });
    for (auto& t : threads) t.join();
    for (int t = 1; t < kThreads; ++t) EXPECT_EQ(got[t].get(), got[0].get()) << "thread " << t;
    EXPECT_EQ(added(), 1u);
    got.clear();
    EXPECT_EQ(cached_encoder_count(), base_count_);
  }
}

TEST_F(ModelCache, ConcurrentFailedLoadsAllFailAndLeaveNothing) {
  const std::string bad = dir_.file("bad.safetensors");
  test::write_bytes(bad, std::string("\x10\0\0\0\0\0\0\0{\"a\":1}", 15));
  constexpr int kThreads = 4;
  StartLine start(kThreads);
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&] {
      start.arrive_and_wait();
      try {
        load_encoder(bad, cpu());
      } catch (const CheckpointError& e) {
        if (std::string(e.what()).find(bad) != std::string::npos) ++errors;
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(errors.load(), kThreads);
  EXPECT_EQ(cached_encoder_count(), base_count_);
  // A missing file and a bad device keep their own messages.
  try {
    load_encoder(dir_.file("missing.safetensors"), cpu());
    ADD_FAILURE() << "no error for a missing file";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("missing.safetensors"), std::string::npos) << e.what();
  }
  ModelOptions gpu;
  gpu.device = "gpu";
  EXPECT_THROW(load_encoder(path_, gpu), VaeError);
  EXPECT_EQ(cached_encoder_count(), base_count_);
}

TEST_F(ModelCache, ConcurrentEncodesOnTheSharedEncoderMatchSingleThreaded) {
  constexpr int kThreads = 4;
  auto shared = load_encoder(path_, cpu());
  std::vector<Frames> inputs;
  std::vector<std::vector<float>> ref, ref_sampled;
  EncodeParams sampled;
  sampled.sample = true;
  sampled.seed = 11;
  for (int t = 0; t < kThreads; ++t) {
    inputs.push_back(rgb_frames(48, 32, 3, 100 * (t + 1)));
    ref.push_back(encode(*shared, inputs[t]));
    ref_sampled.push_back(encode(*shared, inputs[t], sampled));
  }
  StartLine start(kThreads);
  std::vector<int> mismatches(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      auto enc = load_encoder(path_, cpu());  // each thread gets the shared one
      start.arrive_and_wait();
      for (int i = 0; i < 6; ++i) {
        if (encode(*enc, inputs[t]) != ref[t]) ++mismatches[t];
        if (encode(*enc, inputs[t], sampled) != ref_sampled[t]) ++mismatches[t];
      }
    });
  for (auto& t : threads) t.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(mismatches[t], 0) << "thread " << t;
  EXPECT_EQ(added(), 1u);
}

// Not the cache, but load_encoder's first checks, which run before it.
TEST(LoadEncoderChecks, PickleExtensionsInAnyCaseAreRefused) {
  TempDir dir;
  const std::string good = dir.file("vae.safetensors");
  test::write_test_vae(good, tiny_spec());
  for (const char* ext : {".CKPT", ".Pt", ".PTH", ".Bin"}) {
    const std::string path = dir.file(std::string("vae") + ext);
    std::filesystem::copy_file(good, path);
    try {
      load_encoder(path, cpu());
      ADD_FAILURE() << ext << ": loaded";
    } catch (const CheckpointError& e) {
      EXPECT_NE(std::string(e.what()).find("pickle"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    }
  }
}

TEST(LoadEncoderChecks, FifoAndDirectoryAreRefusedWithoutBlocking) {
  TempDir dir;
  const std::string fifo = dir.file("vae.safetensors");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  for (const std::string& path : {fifo, dir.path()}) {
    try {
      load_encoder(path, cpu());  // would block forever in open() on the FIFO
      ADD_FAILURE() << path << ": loaded";
    } catch (const CheckpointError& e) {
      EXPECT_NE(std::string(e.what()).find("not a regular file"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace gstvae
