// Reading and writing the safetensors format
// (https://github.com/huggingface/safetensors): an 8-byte little-endian header
// length, a JSON header mapping tensor names to {dtype, shape, data_offsets},
// then the raw little-endian data. Files are untrusted input: every field is
// validated before use. No LibTorch here, so the parser can be fuzzed alone.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace gstvae {

enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2 };

const char* dtype_name(DType dtype);
size_t dtype_size(DType dtype);

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t offset;  // from the start of the file
  uint64_t nbytes;

  int64_t numel() const;
};

std::string shape_string(const std::vector<int64_t>& shape);

// A memory-mapped safetensors file. Tensor data is only paged in when read,
// so tensors nobody asks for (a decoder, a UNet) stay on disk.
class SafetensorsFile {
 public:
  // Headers larger than this are refused before any allocation.
  static constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

  // Throws CheckpointError naming `path` and the fault.
  explicit SafetensorsFile(const std::string& path);
  // Parses an in-memory image (no copy; `data` must outlive this object).
  SafetensorsFile(const uint8_t* data, size_t size, std::string label);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const TensorInfo* find(const std::string& name) const;
  const uint8_t* data(const TensorInfo& info) const { return base_ + info.offset; }
  // Drops the tensor's pages from this process's memory once they have been
  // copied (they stay in the page cache), so loading does not hold the weights
  // twice. No effect on in-memory images.
  void release(const TensorInfo& info) const;

 private:
  void parse();

  std::string path_;
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  bool mapped_ = false;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// One tensor to write: raw little-endian bytes of `shape` × dtype size.
struct TensorToWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void* data;
};

// The header of a safetensors file holding `tensors` in the given order,
// including the 8-byte length prefix and padding to a multiple of 8.
std::string safetensors_header(const std::vector<TensorToWrite>& tensors,
                               const std::map<std::string, std::string>& metadata);

// Writes a whole safetensors file. Throws std::runtime_error on I/O failure.
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace gstvae
