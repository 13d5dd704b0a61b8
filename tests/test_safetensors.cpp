// The safetensors reader and writer: round trips, and hostile files that must
// be refused with a CheckpointError naming the fault (never a crash, never an
// unbounded allocation).
#include <gtest/gtest.h>

#include <sys/stat.h>

#include <cstring>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <string>
#include <vector>

#include "errors.h"
#include "fixtures.h"
#include "safetensors.h"

namespace gstvae {
namespace {

using test::TempDir;
using test::write_bytes;

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// A hand-built file: 8-byte little-endian header length, the header text, data.
std::string st_file(const std::string& json, const std::string& data = "") {
  return le64(json.size()) + json + data;
}

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// Parses `bytes` from a file and from memory; both must throw CheckpointError
// whose message names the source and contains every fragment.
::testing::AssertionResult Rejected(const std::string& bytes, std::initializer_list<std::string> fragments) {
  TempDir dir;
  const std::string path = dir.file("hostile.safetensors");
  write_bytes(path, bytes);
  const std::vector<uint8_t> memory(bytes.begin(), bytes.end());
  const std::string label = "in-memory-image";
  for (int mode = 0; mode < 2; ++mode) {
    const std::string source = mode == 0 ? path : label;
    std::string message;
    try {
      if (mode == 0) {
        SafetensorsFile f(path);
      } else {
        SafetensorsFile f(memory.data(), memory.size(), label);
      }
      return ::testing::AssertionFailure() << source << ": accepted a malformed file";
    } catch (const CheckpointError& e) {
      message = e.what();
    } catch (const std::exception& e) {
      return ::testing::AssertionFailure() << source << ": threw a non-CheckpointError: " << e.what();
    }
    if (!contains(message, source))
      return ::testing::AssertionFailure() << "message does not name '" << source << "': " << message;
    for (const auto& f : fragments)
      if (!contains(message, f))
        return ::testing::AssertionFailure() << "message lacks '" << f << "': " << message;
  }
  return ::testing::AssertionSuccess();
}

std::string message_of(const std::string& path) {
  try {
    SafetensorsFile f(path);
  } catch (const CheckpointError& e) {
    return e.what();
  }
  return "<no CheckpointError>";
}

// ---------------------------------------------------------------- basics

TEST(SafetensorsBasics, DTypeNamesAndSizes) {
  const std::pair<DType, std::pair<const char*, size_t>> expected[] = {
      {DType::F64, {"F64", 8}},   {DType::F32, {"F32", 4}},         {DType::F16, {"F16", 2}},
      {DType::BF16, {"BF16", 2}}, {DType::I64, {"I64", 8}},         {DType::I32, {"I32", 4}},
      {DType::I16, {"I16", 2}},   {DType::I8, {"I8", 1}},           {DType::U8, {"U8", 1}},
      {DType::BOOL, {"BOOL", 1}}, {DType::F8_E4M3, {"F8_E4M3", 1}}, {DType::F8_E5M2, {"F8_E5M2", 1}},
  };
  for (const auto& e : expected) {
    EXPECT_STREQ(dtype_name(e.first), e.second.first);
    EXPECT_EQ(dtype_size(e.first), e.second.second) << e.second.first;
  }
}

TEST(SafetensorsBasics, ShapeString) {
  EXPECT_EQ(shape_string({}), "[]");
  EXPECT_EQ(shape_string({7}), "[7]");
  EXPECT_EQ(shape_string({128, 3, 3, 3}), "[128, 3, 3, 3]");
  EXPECT_EQ(shape_string({0, 5}), "[0, 5]");
}

TEST(SafetensorsBasics, NumelOfTensorInfo) {
  TensorInfo t{"x", DType::F32, {2, 3, 4}, 0, 96};
  EXPECT_EQ(t.numel(), 24);
  t.shape = {};
  EXPECT_EQ(t.numel(), 1);
  t.shape = {5, 0};
  EXPECT_EQ(t.numel(), 0);
}

// ---------------------------------------------------------------- round trip

struct Sample {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

std::vector<Sample> sample_tensors() {
  auto fill = [](size_t n, uint8_t start) {
    std::vector<uint8_t> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(start + 7 * i);
    return v;
  };
  std::vector<Sample> s;
  s.push_back({"encoder.conv_in.weight", DType::F32, {2, 3}, fill(24, 1)});
  s.push_back({"odd.u8", DType::U8, {3}, fill(3, 9)});  // leaves the next tensor unaligned
  s.push_back({"half", DType::F16, {4}, fill(8, 50)});
  s.push_back({"brain", DType::BF16, {1, 1, 1}, fill(2, 77)});
  s.push_back({"ids", DType::I64, {2, 2}, fill(32, 100)});
  s.push_back({"scalar", DType::F64, {}, fill(8, 200)});
  s.push_back({"empty", DType::BOOL, {0, 5}, {}});
  s.push_back({"fp8", DType::F8_E4M3, {5}, fill(5, 3)});
  return s;
}

TEST(SafetensorsRoundTrip, NamesDtypesShapesBytesMetadata) {
  TempDir dir;
  const std::string path = dir.file("rt.safetensors");
  const auto samples = sample_tensors();
  std::vector<TensorToWrite> tensors;
  for (const auto& s : samples) tensors.push_back({s.name, s.dtype, s.shape, s.bytes.data()});
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "h\u00e9llo \"quoted\""}};
  write_safetensors(path, tensors, metadata);

  SafetensorsFile f(path);
  EXPECT_EQ(f.path(), path);
  EXPECT_EQ(f.metadata(), metadata);
  ASSERT_EQ(f.tensors().size(), samples.size());
  for (const auto& s : samples) {
    SCOPED_TRACE(s.name);
    const TensorInfo* t = f.find(s.name);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->name, s.name);
    EXPECT_EQ(t->dtype, s.dtype);
    EXPECT_EQ(t->shape, s.shape);
    EXPECT_EQ(t->nbytes, s.bytes.size());
    EXPECT_EQ(std::vector<uint8_t>(f.data(*t), f.data(*t) + t->nbytes), s.bytes);
  }
  EXPECT_EQ(f.find("missing"), nullptr);
  EXPECT_EQ(f.find("encoder.conv_in"), nullptr);
  EXPECT_EQ(f.find(""), nullptr);
}

TEST(SafetensorsRoundTrip, HeaderIsPaddedToMultipleOf8) {
  TempDir dir;
  const auto samples = sample_tensors();
  // Vary the header length over all residues mod 8 by growing one name.
  for (int extra = 0; extra < 8; ++extra) {
    SCOPED_TRACE(extra);
    const std::string path = dir.file("pad" + std::to_string(extra) + ".safetensors");
    std::vector<TensorToWrite> tensors;
    const std::string longname = "t" + std::string(static_cast<size_t>(extra), 'x');
    for (const auto& s : samples) tensors.push_back({s.name, s.dtype, s.shape, s.bytes.data()});
    tensors[0].name = longname;
    write_safetensors(path, tensors);
    const std::string bytes = read_all(path);
    ASSERT_GE(bytes.size(), 8u);
    uint64_t len = 0;
    for (int i = 7; i >= 0; --i) len = (len << 8) | static_cast<uint8_t>(bytes[i]);
    EXPECT_EQ(len % 8, 0u);
    ASSERT_LE(8 + len, bytes.size());
    EXPECT_EQ(bytes.substr(0, 8 + len), safetensors_header(tensors, {}));
    EXPECT_EQ(bytes.substr(8, 1), "{");
    // Data follow the header back to back.
    size_t total = 0;
    for (const auto& s : samples) total += s.bytes.size();
    EXPECT_EQ(bytes.size(), 8 + len + total);
    SafetensorsFile f(path);
    const TensorInfo* first = f.find(longname);
    ASSERT_NE(first, nullptr);
    EXPECT_EQ(first->offset, 8 + len);
    EXPECT_EQ(f.metadata().size(), 0u);
  }
}

TEST(SafetensorsRoundTrip, InMemoryConstructor) {
  TempDir dir;
  const std::string path = dir.file("mem.safetensors");
  const auto samples = sample_tensors();
  std::vector<TensorToWrite> tensors;
  for (const auto& s : samples) tensors.push_back({s.name, s.dtype, s.shape, s.bytes.data()});
  write_safetensors(path, tensors, {{"k", "v"}});
  const std::string bytes = read_all(path);
  const std::vector<uint8_t> image(bytes.begin(), bytes.end());

  SafetensorsFile f(image.data(), image.size(), "my label");
  EXPECT_EQ(f.path(), "my label");
  EXPECT_EQ(f.metadata().at("k"), "v");
  ASSERT_EQ(f.tensors().size(), samples.size());
  for (const auto& s : samples) {
    const TensorInfo* t = f.find(s.name);
    ASSERT_NE(t, nullptr) << s.name;
    // No copy: data() points into the caller's image.
    EXPECT_EQ(f.data(*t), image.data() + t->offset);
    EXPECT_EQ(std::vector<uint8_t>(f.data(*t), f.data(*t) + t->nbytes), s.bytes) << s.name;
  }
}

TEST(SafetensorsRoundTrip, EmptyFileOfTensorsIsValid) {
  // "{}" padded to 8: a file with no tensors at all parses (and holds nothing).
  TempDir dir;
  const std::string path = dir.file("none.safetensors");
  write_safetensors(path, {});
  SafetensorsFile f(path);
  EXPECT_TRUE(f.tensors().empty());
  EXPECT_TRUE(f.metadata().empty());
}

TEST(SafetensorsRoundTrip, AcceptsHandWrittenHeaderWithWhitespace) {
  const std::string json =
      "{ \"__metadata__\" : { \"a\" : \"b\" } ,\n \"w\" : {\"shape\": [2], \"data_offsets\": [0, 8], "
      "\"dtype\": \"F32\"}}   ";
  const std::string data(8, '\x11');
  const std::string bytes = st_file(json, data);
  const std::vector<uint8_t> image(bytes.begin(), bytes.end());
  SafetensorsFile f(image.data(), image.size(), "hand");
  ASSERT_NE(f.find("w"), nullptr);
  EXPECT_EQ(f.find("w")->offset, 8 + json.size());
  EXPECT_EQ(f.find("w")->nbytes, 8u);
  EXPECT_EQ(f.metadata().at("a"), "b");
}

// ---------------------------------------------------------------- hostile files

const std::string kGoodEntry = "{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}";
const std::string kEightBytes(8, '\0');

TEST(SafetensorsHostile, EmptyFile) {
  TempDir dir;
  const std::string path = dir.file("empty.safetensors");
  write_bytes(path, "");
  EXPECT_THROW(SafetensorsFile{path}, CheckpointError);
  const std::string m = message_of(path);
  EXPECT_TRUE(contains(m, path)) << m;
  EXPECT_TRUE(contains(m, "empty")) << m;
  // The same image in memory (size 0) is refused as truncated.
  EXPECT_THROW(SafetensorsFile(nullptr, 0, "zero"), CheckpointError);
}

TEST(SafetensorsHostile, ThreeByteFile) {
  EXPECT_TRUE(Rejected("abc", {"truncated", "3 bytes"}));
}

TEST(SafetensorsHostile, SevenByteFile) {
  EXPECT_TRUE(Rejected(std::string(7, '\0'), {"truncated"}));
}

TEST(SafetensorsHostile, HeaderLengthOnlyNoHeader) {
  // Length says 2, the file ends right after the length field.
  EXPECT_TRUE(Rejected(le64(2), {"header length 2", "truncated"}));
}

TEST(SafetensorsHostile, HeaderLengthBeyondFile) {
  const std::string json = "{\"w\":" + kGoodEntry + "}";
  EXPECT_TRUE(Rejected(le64(json.size() + 100) + json + kEightBytes, {"runs past the end", "truncated"}));
}

TEST(SafetensorsHostile, HugeHeaderLength2Pow60) {
  EXPECT_TRUE(Rejected(le64(1ull << 60) + "{}", {"exceeds the limit", std::to_string(1ull << 60)}));
}

TEST(SafetensorsHostile, HugeHeaderLength2Pow40) {
  EXPECT_TRUE(Rejected(le64(1ull << 40) + "{}", {"exceeds the limit", std::to_string(1ull << 40)}));
}

TEST(SafetensorsHostile, HeaderLengthAllOnes) {
  EXPECT_TRUE(Rejected(le64(~0ull) + "{}", {"exceeds the limit"}));
}

TEST(SafetensorsHostile, HeaderLengthJustOverLimit) {
  EXPECT_TRUE(Rejected(le64(SafetensorsFile::kMaxHeaderBytes + 1) + "{}", {"exceeds the limit"}));
}

TEST(SafetensorsHostile, HeaderLengthZero) {
  EXPECT_TRUE(Rejected(le64(0) + kEightBytes, {"too short"}));
}

TEST(SafetensorsHostile, InvalidJson) {
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\": \"F32\", "), {"JSON"}));
  EXPECT_TRUE(Rejected(st_file("not json at all"), {"JSON"}));
}

TEST(SafetensorsHostile, JsonWithTrailingGarbage) {
  EXPECT_TRUE(Rejected(st_file("{} {}"), {"JSON"}));
}

TEST(SafetensorsHostile, JsonWithNulPadding) {
  // The format allows padding the header with spaces (0x20) only; a NUL byte
  // is not JSON whitespace, and the reference parser (serde_json) rejects it as
  // trailing characters. Accepting it lets a header hide content after the NUL
  // that other parsers would see (a parser differential).
  EXPECT_TRUE(Rejected(st_file(std::string("{}") + std::string(6, '\0')), {"JSON"}));
  const std::string hidden = std::string("{}") + '\0' + "{\"w\":" + kGoodEntry + "}";
  EXPECT_TRUE(Rejected(st_file(hidden, kEightBytes), {"JSON"}));
}

TEST(SafetensorsHostile, InvalidUtf8InName) {
  EXPECT_TRUE(Rejected(st_file("{\"\xff\xfe\":" + kGoodEntry + "}", kEightBytes), {"JSON"}));
}

TEST(SafetensorsHostile, JsonArrayHeader) {
  EXPECT_TRUE(Rejected(st_file("[1, 2, 3]"), {"not a JSON object"}));
}

TEST(SafetensorsHostile, JsonStringHeader) {
  EXPECT_TRUE(Rejected(st_file("\"hello\""), {"not a JSON object"}));
}

TEST(SafetensorsHostile, DeeplyNestedJson) {
  // 200k nested arrays: must neither overflow the stack nor be accepted.
  const int depth = 200000;
  const std::string json = "{\"w\":" + std::string(depth, '[') + std::string(depth, ']') + "}";
  EXPECT_TRUE(Rejected(st_file(json), {"'w'", "not a JSON object"}));
}

TEST(SafetensorsHostile, TensorEntryNotAnObject) {
  EXPECT_TRUE(Rejected(st_file("{\"encoder.conv_in.weight\": 5}"), {"'encoder.conv_in.weight'", "not a JSON object"}));
  EXPECT_TRUE(Rejected(st_file("{\"w\": [\"F32\", [2], [0, 8]]}", kEightBytes), {"'w'", "not a JSON object"}));
}

TEST(SafetensorsHostile, MissingDtype) {
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"shape\":[2],\"data_offsets\":[0,8]}}", kEightBytes), {"'w'", "dtype"}));
}

TEST(SafetensorsHostile, DtypeNotAString) {
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\":4,\"shape\":[2],\"data_offsets\":[0,8]}}", kEightBytes),
                       {"'w'", "dtype"}));
}

TEST(SafetensorsHostile, UnknownDtype) {
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\":\"Q7\",\"shape\":[2],\"data_offsets\":[0,8]}}", kEightBytes),
                       {"'w'", "unknown dtype", "Q7"}));
  // Case matters: "f32" is not a safetensors dtype.
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\":\"f32\",\"shape\":[2],\"data_offsets\":[0,8]}}", kEightBytes),
                       {"unknown dtype", "f32"}));
}

TEST(SafetensorsHostile, MissingShape) {
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", kEightBytes), {"'w'", "shape"}));
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]}}", kEightBytes),
                       {"'w'", "shape"}));
}

TEST(SafetensorsHostile, NegativeShapeEntry) {
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", kEightBytes),
                       {"'w'", "non-negative integer"}));
  // Two negatives whose product would look right.
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\":\"F32\",\"shape\":[-1,-2],\"data_offsets\":[0,8]}}", kEightBytes),
                       {"'w'", "non-negative integer"}));
}

TEST(SafetensorsHostile, NonIntegerShapeEntry) {
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\":\"F32\",\"shape\":[2.5],\"data_offsets\":[0,10]}}", std::string(10, 'x')),
                       {"'w'", "non-negative integer"}));
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]}}", kEightBytes),
                       {"'w'", "non-negative integer"}));
  // Beyond uint64: nlohmann parses it as a float.
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\":\"U8\",\"shape\":[36893488147419103232],\"data_offsets\":[0,8]}}",
                               kEightBytes),
                       {"'w'", "non-negative integer"}));
}

TEST(SafetensorsHostile, ShapeProductOverflows) {
  // 2^32 * 2^32 * 2 = 2^65 elements; wraps to 0 in 64 bits, matching an empty span.
  EXPECT_TRUE(Rejected(
      st_file("{\"w\": {\"dtype\":\"U8\",\"shape\":[4294967296,4294967296,2],\"data_offsets\":[0,0]}}"),
      {"'w'", "more than 2^64"}));
  // Element count fits, byte count does not: 2^62 F64 values = 2^65 bytes.
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\":\"F64\",\"shape\":[4611686018427387904],\"data_offsets\":[0,0]}}"),
                       {"'w'", "more than 2^64"}));
  // A single entry above INT64_MAX (would be negative as int64_t).
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\":\"U8\",\"shape\":[9223372036854775808],\"data_offsets\":[0,0]}}"),
                       {"'w'"}));
  // With a zero dimension the product is 0 but an entry is still absurd.
  EXPECT_TRUE(Rejected(
      st_file("{\"w\": {\"dtype\":\"U8\",\"shape\":[0, 18446744073709551615],\"data_offsets\":[0,0]}}"), {"'w'"}));
}

TEST(SafetensorsHostile, TooManyDimensions) {
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", "x"),
                       {"'w'", "9 dimensions"}));
}

TEST(SafetensorsHostile, DataOffsetsPastEnd) {
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", "1234"),
                       {"'w'", "past the end", "4-byte data section"}));
  EXPECT_TRUE(Rejected(
      st_file("{\"w\": {\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[18446744073709551614,18446744073709551615]}}",
              kEightBytes),
      {"'w'", "past the end"}));
}

TEST(SafetensorsHostile, DataOffsetsBeginAfterEnd) {
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,0]}}", kEightBytes),
                       {"'w'", "begin after end"}));
}

TEST(SafetensorsHostile, DataOffsetsMalformed) {
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\":\"F32\",\"shape\":[2]}}", kEightBytes), {"'w'", "data_offsets"}));
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4,8]}}", kEightBytes),
                       {"'w'", "data_offsets"}));
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[-8,0]}}", kEightBytes),
                       {"'w'", "data_offsets"}));
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":\"0-8\"}}", kEightBytes),
                       {"'w'", "data_offsets"}));
}

TEST(SafetensorsHostile, ShapeTimesDtypeSizeNotSpan) {
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,8]}}", kEightBytes),
                       {"'w'", "F32", "[4]", "needs 16 bytes", "span 8"}));
  // Same element count, wrong element size.
  EXPECT_TRUE(Rejected(st_file("{\"w\": {\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,8]}}", kEightBytes),
                       {"'w'", "needs 4 bytes"}));
}

TEST(SafetensorsHostile, MetadataNotAnObject) {
  EXPECT_TRUE(Rejected(st_file("{\"__metadata__\": [\"a\", \"b\"]}"), {"__metadata__", "not a JSON object"}));
  EXPECT_TRUE(Rejected(st_file("{\"__metadata__\": \"text\"}"), {"__metadata__"}));
}

TEST(SafetensorsHostile, MetadataNonStringValue) {
  EXPECT_TRUE(Rejected(st_file("{\"__metadata__\": {\"ok\": \"x\", \"epoch\": 3}}"), {"__metadata__", "'epoch'", "not a string"}));
  EXPECT_TRUE(Rejected(st_file("{\"__metadata__\": {\"nested\": {\"a\": \"b\"}}}"), {"__metadata__", "'nested'"}));
}

TEST(SafetensorsHostile, BadTensorAfterGoodOnes) {
  // The fault is found whatever its position, and names the right tensor.
  const std::string json = "{\"a\":" + kGoodEntry + ",\"b\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[8,16]}}";
  EXPECT_TRUE(Rejected(st_file(json, std::string(16, '\0')), {"'b'", "needs 12 bytes"}));
}

TEST(SafetensorsHostile, UnprintableNameIsSanitised) {
  const std::string json = "{\"\\u0001bad\\u001bname\": 1}";
  TempDir dir;
  const std::string path = dir.file("ctl.safetensors");
  write_bytes(path, st_file(json));
  const std::string m = message_of(path);
  EXPECT_TRUE(contains(m, "'?bad?name'")) << m;
  for (char c : m) EXPECT_FALSE(c == '\x01' || c == '\x1b') << "raw control character in message";
}

TEST(SafetensorsHostile, VeryLongNameIsShortened) {
  const std::string name(5000, 'n');
  TempDir dir;
  const std::string path = dir.file("long.safetensors");
  write_bytes(path, st_file("{\"" + name + "\": 1}"));
  const std::string m = message_of(path);
  EXPECT_TRUE(contains(m, "...")) << m.substr(0, 300);
  EXPECT_LT(m.size(), 1000u);
}

TEST(SafetensorsHostile, NonexistentPath) {
  TempDir dir;
  const std::string path = dir.file("does-not-exist.safetensors");
  EXPECT_THROW(SafetensorsFile{path}, CheckpointError);
  const std::string m = message_of(path);
  EXPECT_TRUE(contains(m, path)) << m;
  EXPECT_TRUE(contains(m, "cannot open")) << m;
}

TEST(SafetensorsHostile, Directory) {
  TempDir dir;
  EXPECT_THROW(SafetensorsFile{dir.path()}, CheckpointError);
  const std::string m = message_of(dir.path());
  EXPECT_TRUE(contains(m, dir.path())) << m;
  EXPECT_TRUE(contains(m, "not a regular file")) << m;
}

TEST(SafetensorsHostile, TruncatedRealFile) {
  // A valid file cut short anywhere in its data section is refused.
  TempDir dir;
  const std::string path = dir.file("full.safetensors");
  const auto samples = sample_tensors();
  std::vector<TensorToWrite> tensors;
  for (const auto& s : samples) tensors.push_back({s.name, s.dtype, s.shape, s.bytes.data()});
  write_safetensors(path, tensors);
  const std::string bytes = read_all(path);
  const size_t header = safetensors_header(tensors, {}).size();
  for (size_t cut = header; cut < bytes.size(); cut += 5) {
    SCOPED_TRACE(cut);
    EXPECT_TRUE(Rejected(bytes.substr(0, cut), {"past the end"}));
  }
  // Cut inside the header: either too long for the file or broken JSON.
  for (size_t cut : {size_t{8}, size_t{9}, header / 2, header - 1}) {
    SCOPED_TRACE(cut);
    EXPECT_TRUE(Rejected(bytes.substr(0, cut), {}));
  }
}

}  // namespace
}  // namespace gstvae
