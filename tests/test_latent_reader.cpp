// LatentFileReader (src/latent_file.cpp), the reader behind latentfilesrc and
// read_latent_file: F16/BF16 conversion, 3-D tensors, 5-D ComfyUI video
// latents (1 x C x T x h x w, gathered plane by plane), frame-by-frame reads,
// and hostile files refused with the right kind of error before any
// allocation follows their header.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "fixtures.h"
#include "latent_file.h"
#include "safetensors.h"

namespace gstvae {
namespace {

using test::TempDir;
using test::write_bytes;
using Kind = LatentFileError::Kind;

// IEEE half by its definition, independent of the bit manipulation under test.
float half_reference(uint16_t h) {
  const int sign = (h & 0x8000) ? -1 : 1;
  const int exponent = (h >> 10) & 0x1f;
  const int mantissa = h & 0x3ff;
  if (exponent == 0x1f) return mantissa ? std::nanf("") : sign * INFINITY;
  if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -24);
  return sign * std::ldexp(static_cast<float>(mantissa | 0x400), exponent - 25);
}

TEST(LatentReader, EveryHalfConvertsExactly) {
  std::vector<uint8_t> stored(2 * 65536);
  for (uint32_t h = 0; h < 65536; ++h) {
    stored[2 * h] = static_cast<uint8_t>(h & 0xff);
    stored[2 * h + 1] = static_cast<uint8_t>(h >> 8);
  }
  std::vector<float> out(65536);
  latent_values_to_f32(stored.data(), LatentElement::F16, out.size(), out.data());
  for (uint32_t h = 0; h < 65536; ++h) {
    const float want = half_reference(static_cast<uint16_t>(h));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(out[h])) << std::hex << h;
    } else {
      EXPECT_EQ(out[h], want) << std::hex << h;
      EXPECT_EQ(std::signbit(out[h]), std::signbit(want)) << std::hex << h;
    }
  }
}

TEST(LatentReader, Bfloat16IsTheTopHalfOfAFloat) {
  const float values[] = {1.0f, -2.5f, 3.140625f, 0.0f, -0.0f, INFINITY, 1e-38f};
  for (float v : values) {
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    const uint8_t stored[2] = {static_cast<uint8_t>((bits >> 16) & 0xff), static_cast<uint8_t>(bits >> 24)};
    float out = 0;
    latent_values_to_f32(stored, LatentElement::BF16, 1, &out);
    uint32_t got;
    std::memcpy(&got, &out, 4);
    EXPECT_EQ(got, bits & 0xffff0000u) << v;
  }
}

std::string npy(const std::string& descr, const std::string& shape, const std::string& data, int version = 1,
                bool fortran = false) {
  std::string dict = "{'descr': '" + descr + "', 'fortran_order': " + (fortran ? "True" : "False") +
                     ", 'shape': (" + shape + "), }";
  dict += std::string(63 - (dict.size() + 12) % 64, ' ') + "\n";
  std::string out = std::string("\x93NUMPY", 6) + static_cast<char>(version) + '\0';
  const size_t n = dict.size();
  out += static_cast<char>(n & 0xff);
  out += static_cast<char>((n >> 8) & 0xff);
  if (version >= 2) out += std::string("\0\0", 2);
  return out + dict + data;
}

std::string floats(const std::vector<float>& v) { return std::string(reinterpret_cast<const char*>(v.data()), 4 * v.size()); }

TEST(LatentReader, ReadsFramesOfEveryStoredType) {
  TempDir dir;
  std::vector<float> values(2 * 3 * 2 * 4);
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i) * 0.5f - 3.0f;  // exact in halves
  std::vector<uint16_t> halves(values.size()), bf16(values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &values[i], 4);
    bf16[i] = static_cast<uint16_t>(bits >> 16);
    // i*0.5-3 as a half: sign, exponent, 10-bit mantissa.
    const float a = std::fabs(values[i]);
    uint16_t h = 0;
    if (a != 0) {
      int e;
      const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
      h = static_cast<uint16_t>(((e - 1 + 15) << 10) | static_cast<uint16_t>((m * 2 - 1) * 1024));
    }
    halves[i] = static_cast<uint16_t>(h | (values[i] < 0 ? 0x8000 : 0));
  }
  write_safetensors(dir.file("f16.latent"), {{"latent_format_version_0", DType::F32, {0}, values.data()},
                                            {"latent_tensor", DType::F16, {2, 3, 2, 4}, halves.data()}},
                    {{"framerate", "12/1"}});
  write_safetensors(dir.file("bf16.safetensors"), {{"latent_tensor", DType::BF16, {2, 3, 2, 4}, bf16.data()}});
  write_bytes(dir.file("f32.npy"), npy("<f4", "2, 3, 2, 4", floats(values)));
  write_bytes(dir.file("f16-v2.npy"), npy("<f2", "2, 3, 2, 4",
                                          std::string(reinterpret_cast<const char*>(halves.data()), 2 * halves.size()), 2));
  for (const char* name : {"f16.latent", "bf16.safetensors", "f32.npy", "f16-v2.npy"}) {
    SCOPED_TRACE(name);
    LatentFileReader reader(dir.file(name));
    const LatentFileLayout& l = reader.layout();
    EXPECT_EQ(l.frames, 2);
    EXPECT_EQ(l.channels, 3);
    EXPECT_EQ(l.height, 2);
    EXPECT_EQ(l.width, 4);
    EXPECT_EQ(l.values_per_frame(), 24u);
    std::vector<float> frame(24);
    for (int f = 1; f >= 0; --f) {  // any order: each frame at its offset
      reader.read_frame(f, frame.data());
      for (size_t i = 0; i < 24; ++i) ASSERT_EQ(frame[i], values[f * 24 + i]) << "frame " << f << " value " << i;
    }
    EXPECT_THROW(reader.read_frame(2, frame.data()), LatentFileError);
    EXPECT_EQ(read_latent_file(dir.file(name)).values, values);
  }
  LatentFileReader latent(dir.file("f16.latent"));
  EXPECT_TRUE(latent.layout().has_version_marker);
  EXPECT_EQ(latent.layout().element, LatentElement::F16);
  EXPECT_EQ(latent.layout().metadata.at("framerate"), "12/1");
  EXPECT_FALSE(LatentFileReader(dir.file("bf16.safetensors")).layout().has_version_marker);
}

TEST(LatentReader, ThreeDimensionalTensorIsOneFrame) {
  TempDir dir;
  const std::vector<float> values(16 * 3 * 5, 1.5f);
  write_safetensors(dir.file("one.latent"), {{"latent_tensor", DType::F32, {16, 3, 5}, values.data()}});
  write_bytes(dir.file("one.npy"), npy("<f4", "16, 3, 5", floats(values)));
  for (const char* name : {"one.latent", "one.npy"}) {
    LatentFileReader reader(dir.file(name));
    EXPECT_EQ(reader.layout().stored_dims, 3) << name;
    EXPECT_EQ(reader.layout().frames, 1) << name;
    EXPECT_EQ(reader.layout().channels, 16) << name;
    EXPECT_EQ(reader.layout().height, 3) << name;
    EXPECT_EQ(reader.layout().width, 5) << name;
  }
}

// ComfyUI's video LATENT (Wan, Hunyuan): latent_tensor of 1 x C x T x h x w,
// read as T latents of C x h x w in time order (latent t = tensor[0, :, t]).
TEST(LatentReader, FiveDimensionalVideoLatentIsTFramesInTimeOrder) {
  TempDir dir;
  const int C = 3, T = 4, H = 2, W = 5;
  // Stored C-major: value (c, t, y, x) at ((c * T + t) * H + y) * W + x, each
  // distinct and exact in halves and bfloat16.
  std::vector<float> stored(static_cast<size_t>(C) * T * H * W);
  for (size_t i = 0; i < stored.size(); ++i) stored[i] = static_cast<float>(i) - 40.0f;
  std::vector<uint16_t> bf16(stored.size());
  for (size_t i = 0; i < stored.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &stored[i], 4);
    bf16[i] = static_cast<uint16_t>(bits >> 16);
  }
  // What each latent must be: frame t, channel c, row y, column x.
  std::vector<float> want(stored.size());
  for (int t = 0; t < T; ++t)
    for (int c = 0; c < C; ++c)
      for (int p = 0; p < H * W; ++p)
        want[(static_cast<size_t>(t) * C + c) * H * W + p] = stored[(static_cast<size_t>(c) * T + t) * H * W + p];
  write_safetensors(dir.file("video.latent"), {{"latent_format_version_0", DType::F32, {0}, stored.data()},
                                              {"latent_tensor", DType::F32, {1, C, T, H, W}, stored.data()}});
  write_safetensors(dir.file("video-bf16.safetensors"), {{"latent_tensor", DType::BF16, {1, C, T, H, W}, bf16.data()}});
  write_bytes(dir.file("video.npy"), npy("<f4", "1, 3, 4, 2, 5", floats(stored)));
  write_safetensors(dir.file("empty-video.latent"), {{"latent_tensor", DType::F32, {1, C, 0, H, W}, stored.data()}});
  for (const char* name : {"video.latent", "video-bf16.safetensors", "video.npy"}) {
    SCOPED_TRACE(name);
    LatentFileReader reader(dir.file(name));
    const LatentFileLayout& l = reader.layout();
    EXPECT_EQ(l.stored_dims, 5);
    EXPECT_TRUE(l.channel_major());
    EXPECT_EQ(l.frames, T);
    EXPECT_EQ(l.channels, C);
    EXPECT_EQ(l.height, H);
    EXPECT_EQ(l.width, W);
    std::vector<float> frame(static_cast<size_t>(C) * H * W);
    for (int t = T - 1; t >= 0; --t) {  // any order
      reader.read_frame(t, frame.data());
      for (size_t i = 0; i < frame.size(); ++i)
        ASSERT_EQ(frame[i], want[t * frame.size() + i]) << "latent " << t << " value " << i;
    }
    EXPECT_THROW(reader.read_frame(T, frame.data()), LatentFileError);
    const LatentArray a = read_latent_file(dir.file(name));
    EXPECT_EQ(a.stored_dims, 5);
    EXPECT_EQ(a.frames, T);
    EXPECT_EQ(a.values, want);
  }
  EXPECT_TRUE(LatentFileReader(dir.file("video.latent")).layout().has_version_marker);
  const LatentArray empty = read_latent_file(dir.file("empty-video.latent"));
  EXPECT_EQ(empty.frames, 0);
  EXPECT_EQ(empty.channels, C);
  EXPECT_TRUE(empty.values.empty());
  // 4-D files are unchanged: frames stored whole.
  write_safetensors(dir.file("images.latent"), {{"latent_tensor", DType::F32, {T, C, H, W}, stored.data()}});
  EXPECT_FALSE(LatentFileReader(dir.file("images.latent")).layout().channel_major());
  EXPECT_EQ(read_latent_file(dir.file("images.latent")).values, stored);
}

// A 5-D file cut short after it was opened: the first plane past the end is a
// read error naming the latent and its channel.
TEST(LatentReader, AFiveDimensionalFileCutShortIsAReadError) {
  TempDir dir;
  const std::vector<float> values(2 * 3 * 4 * 4, 1.0f);
  write_safetensors(dir.file("cut.latent"), {{"latent_tensor", DType::F32, {1, 2, 3, 4, 4}, values.data()}});
  LatentFileReader reader(dir.file("cut.latent"));
  struct stat st {};
  ASSERT_EQ(::stat(dir.file("cut.latent").c_str(), &st), 0);
  ASSERT_EQ(::truncate(dir.file("cut.latent").c_str(), st.st_size - 4 * 4 * 4), 0);  // the last plane: c 1, t 2
  std::vector<float> frame(2 * 4 * 4);
  reader.read_frame(1, frame.data());
  try {
    reader.read_frame(2, frame.data());
    FAIL() << "read past the end";
  } catch (const LatentFileError& e) {
    EXPECT_EQ(e.kind(), Kind::ReadFailed);
    EXPECT_NE(std::string(e.what()).find("frame 2 (channel 1)"), std::string::npos) << e.what();
  }
}

Kind kind_of(const std::string& path, std::string* message) {
  try {
    LatentFileReader reader(path);
  } catch (const LatentFileError& e) {
    *message = e.what();
    return e.kind();
  }
  *message = "accepted";
  return Kind::Other;
}

TEST(LatentReader, HostileFilesAreRefusedNamingTheFile) {
  TempDir dir;
  const std::vector<float> values(2 * 4 * 3 * 5, 1.0f);
  const std::string data = floats(values);
  ASSERT_EQ(::mkdir(dir.file("d.latent").c_str(), 0755), 0);
  ASSERT_EQ(::mkfifo(dir.file("fifo.latent").c_str(), 0644), 0);
  write_bytes(dir.file("empty.latent"), "");
  write_bytes(dir.file("pickle.latent"), std::string("\x80\x04\x95", 3) + std::string(40, '\0'));
  write_bytes(dir.file("zip.latent"), "PK\x03\x04" + std::string(40, '\0'));
  write_bytes(dir.file("huge.npy"), npy("<f4", "1000000000, 4, 10000, 10000", std::string(64, '\0')));
  write_bytes(dir.file("frame-too-big.npy"), npy("<f4", "0, 4, 1000000, 1000000", ""));
  write_bytes(dir.file("short.npy"), npy("<f4", "2, 4, 3, 5", data.substr(0, 100)));
  write_bytes(dir.file("long.npy"), npy("<f4", "2, 4, 3, 5", data + "xxxx"));
  write_bytes(dir.file("fortran.npy"), npy("<f4", "2, 4, 3, 5", data, 1, true));
  write_bytes(dir.file("f8.npy"), npy("<f8", "2, 4, 3, 5", data + data));
  write_bytes(dir.file("six-d.npy"), npy("<f4", "1, 1, 2, 4, 3, 5", data));
  write_bytes(dir.file("video-batch.npy"), npy("<f4", "2, 1, 4, 3, 5", data));
  write_bytes(dir.file("video-short.npy"), npy("<f4", "1, 4, 3, 3, 5", data));
  write_bytes(dir.file("garbage-dict.npy"), npy("<f4", "2, 4, __import__('os'), 5", data));
  write_bytes(dir.file("huge-header.npy"), std::string("\x93NUMPY\x02\x00\xf0\xff\xff\xff{", 13));
  write_safetensors(dir.file("i32.latent"), {{"latent_tensor", DType::I32, {2, 4, 3, 5}, values.data()}});
  write_safetensors(dir.file("two-d.latent"), {{"latent_tensor", DType::F32, {8, 15}, values.data()}});
  write_safetensors(dir.file("video-batch.latent"), {{"latent_tensor", DType::F32, {2, 4, 1, 3, 5}, values.data()}});
  write_safetensors(dir.file("video-zero-width.latent"), {{"latent_tensor", DType::F32, {1, 4, 2, 3, 0}, values.data()}});
  write_safetensors(dir.file("no-tensor.latent"), {{"samples", DType::F32, {2, 4, 3, 5}, values.data()}});
  write_safetensors(dir.file("zero-width.latent"), {{"latent_tensor", DType::F32, {2, 4, 3, 0}, values.data()}});
  write_safetensors(dir.file("good.latent"), {{"latent_tensor", DType::F32, {2, 4, 3, 5}, values.data()}});
  std::string good;
  {
    std::string message;
    ASSERT_EQ(kind_of(dir.file("good.latent"), &message), Kind::Other) << message;
  }
  {
    FILE* f = std::fopen(dir.file("good.latent").c_str(), "rb");
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) good.append(buf, n);
    std::fclose(f);
  }
  write_bytes(dir.file("truncated.latent"), good.substr(0, good.size() - 5));

  const std::vector<std::tuple<std::string, Kind, std::string>> cases = {
      {"missing.latent", Kind::NotFound, "No such file"},
      {"d.latent", Kind::CannotOpen, "is a directory"},
      {"fifo.latent", Kind::CannotOpen, "not a regular file"},
      {"empty.latent", Kind::BadFormat, "empty"},
      {"pickle.latent", Kind::BadFormat, "pickle"},
      {"zip.latent", Kind::BadFormat, "pickle"},
      {"huge.npy", Kind::BadFormat, "bytes"},
      {"frame-too-big.npy", Kind::BadFormat, "frames of more than"},
      {"short.npy", Kind::BadFormat, "truncated"},
      {"long.npy", Kind::BadFormat, "data bytes"},
      {"fortran.npy", Kind::BadFormat, "Fortran"},
      {"f8.npy", Kind::BadFormat, "<f8"},
      {"six-d.npy", Kind::BadFormat, "N x C x h x w"},
      {"video-batch.npy", Kind::BadFormat, "[2, 1, 4, 3, 5] is a batch of 2 videos"},
      {"video-batch.latent", Kind::BadFormat, "[2, 4, 1, 3, 5] is a batch of 2 videos"},
      {"video-zero-width.latent", Kind::BadFormat, "outside 1"},
      {"video-short.npy", Kind::BadFormat, "needs more than 480 data bytes"},
      {"garbage-dict.npy", Kind::BadFormat, "malformed NumPy header"},
      {"huge-header.npy", Kind::BadFormat, "exceeds the limit"},
      {"i32.latent", Kind::BadFormat, "I32"},
      {"two-d.latent", Kind::BadFormat, "N x C x h x w"},
      {"no-tensor.latent", Kind::BadFormat, "'samples'"},
      {"zero-width.latent", Kind::BadFormat, "outside 1"},
      {"truncated.latent", Kind::BadFormat, "truncated"},
  };
  for (const auto& [name, kind, words] : cases) {
    std::string message;
    EXPECT_EQ(kind_of(dir.file(name), &message), kind) << name << ": " << message;
    EXPECT_NE(message.find(dir.file(name)), std::string::npos) << name << ": " << message;
    EXPECT_NE(message.find(words), std::string::npos) << name << ": " << message;
  }
}

TEST(LatentReader, AFileCutShortAfterOpeningIsAReadError) {
  TempDir dir;
  const std::vector<float> values(3 * 4 * 8 * 8, 2.0f);
  write_safetensors(dir.file("cut.latent"), {{"latent_tensor", DType::F32, {3, 4, 8, 8}, values.data()}});
  LatentFileReader reader(dir.file("cut.latent"));
  struct stat st {};
  ASSERT_EQ(::stat(dir.file("cut.latent").c_str(), &st), 0);
  ASSERT_EQ(::truncate(dir.file("cut.latent").c_str(), st.st_size - 4 * 8 * 8 * 4), 0);
  std::vector<float> frame(4 * 8 * 8);
  reader.read_frame(0, frame.data());
  EXPECT_EQ(frame[0], 2.0f);
  try {
    reader.read_frame(2, frame.data());
    FAIL() << "read past the end";
  } catch (const LatentFileError& e) {
    EXPECT_EQ(e.kind(), Kind::ReadFailed);
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace gstvae
