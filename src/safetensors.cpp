#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>
#include <utility>

#include "errors.h"

namespace gstvae {

namespace {

struct DTypeEntry {
  DType dtype;
  const char* name;
  size_t size;
};

constexpr DTypeEntry kDTypes[] = {
    {DType::F64, "F64", 8},         {DType::F32, "F32", 4},        {DType::F16, "F16", 2},
    {DType::BF16, "BF16", 2},       {DType::I64, "I64", 8},        {DType::I32, "I32", 4},
    {DType::I16, "I16", 2},         {DType::I8, "I8", 1},          {DType::U8, "U8", 1},
    {DType::BOOL, "BOOL", 1},       {DType::F8_E4M3, "F8_E4M3", 1}, {DType::F8_E5M2, "F8_E5M2", 1},
};

const DTypeEntry& entry(DType dtype) {
  for (const auto& e : kDTypes)
    if (e.dtype == dtype) return e;
  throw std::logic_error("unknown DType");
}

std::string quoted(const std::string& s) {
  // Names come from untrusted files: keep messages printable and short.
  std::string out = "'";
  for (char c : s.substr(0, 200)) out += (c >= 0x20 && c < 0x7f) ? c : '?';
  if (s.size() > 200) out += "...";
  return out + "'";
}

}  // namespace

const char* dtype_name(DType dtype) { return entry(dtype).name; }
size_t dtype_size(DType dtype) { return entry(dtype).size; }

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    throw CheckpointError("cannot open '" + path + "': " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw CheckpointError("'" + path + "' is not a regular file");
  }
  if (st.st_size == 0) {
    ::close(fd);
    throw CheckpointError("'" + path + "' is empty, not a safetensors file");
  }
  size_ = static_cast<size_t>(st.st_size);
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED)
    throw CheckpointError("cannot map '" + path + "': " + std::strerror(errno));
  base_ = static_cast<const uint8_t*>(p);
  mapped_ = true;
  try {
    parse();
  } catch (...) {
    ::munmap(const_cast<uint8_t*>(base_), size_);
    throw;
  }
}

SafetensorsFile::SafetensorsFile(const uint8_t* data, size_t size, std::string label)
    : path_(std::move(label)), base_(data), size_(size) {
  parse();
}

SafetensorsFile::~SafetensorsFile() {
  if (mapped_) ::munmap(const_cast<uint8_t*>(base_), size_);
}

void SafetensorsFile::release(const TensorInfo& info) const {
  if (!mapped_) return;
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(base_) + info.offset + page - 1) / page * page;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(base_) + info.offset + info.nbytes) / page * page;
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

void SafetensorsFile::parse() {
  const std::string where = "'" + path_ + "'";
  if (size_ < 8)
    throw CheckpointError(where + " is truncated: " + std::to_string(size_) +
                          " bytes, shorter than the 8-byte safetensors header length");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | base_[i];
  if (header_len > kMaxHeaderBytes)
    throw CheckpointError(where + ": safetensors header length " + std::to_string(header_len) +
                          " exceeds the limit of " + std::to_string(kMaxHeaderBytes) +
                          " bytes (not a safetensors file?)");
  if (header_len > size_ - 8)
    throw CheckpointError(where + ": safetensors header length " + std::to_string(header_len) +
                          " runs past the end of the " + std::to_string(size_) +
                          "-byte file (truncated?)");
  if (header_len < 2)
    throw CheckpointError(where + ": safetensors header of " + std::to_string(header_len) +
                          " bytes is too short to hold a JSON object");

  const char* text = reinterpret_cast<const char*>(base_ + 8);
  // The JSON parser would stop at a NUL and ignore the rest, hiding entries
  // other readers see; the format allows only spaces as padding.
  if (std::memchr(text, '\0', header_len))
    throw CheckpointError(where + ": safetensors header is not valid JSON: it contains a NUL byte");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text, text + header_len);
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(where + ": safetensors header is not valid JSON: " + e.what());
  }
  if (!header.is_object())
    throw CheckpointError(where + ": safetensors header is not a JSON object");

  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = size_ - data_start;

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& value = it.value();
    if (name == "__metadata__") {
      if (!value.is_object())
        throw CheckpointError(where + ": __metadata__ is not a JSON object");
      for (auto m = value.begin(); m != value.end(); ++m) {
        if (!m.value().is_string())
          throw CheckpointError(where + ": __metadata__ entry " + quoted(m.key()) +
                                " is not a string");
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string tensor = where + ": tensor " + quoted(name);
    if (!value.is_object()) throw CheckpointError(tensor + " is not a JSON object");

    auto dtype_it = value.find("dtype");
    if (dtype_it == value.end() || !dtype_it->is_string())
      throw CheckpointError(tensor + " has no dtype string");
    const std::string dtype_str = dtype_it->get<std::string>();
    const DTypeEntry* dt = nullptr;
    for (const auto& e : kDTypes)
      if (dtype_str == e.name) dt = &e;
    if (!dt) throw CheckpointError(tensor + " has unknown dtype " + quoted(dtype_str));

    auto shape_it = value.find("shape");
    if (shape_it == value.end() || !shape_it->is_array())
      throw CheckpointError(tensor + " has no shape array");
    if (shape_it->size() > 8)
      throw CheckpointError(tensor + " has " + std::to_string(shape_it->size()) +
                            " dimensions; at most 8 are accepted");
    std::vector<int64_t> shape;
    uint64_t numel = 1;
    bool overflow = false;
    // A running product above INT64_MAX that a later 0 brings back to 0
    // (e.g. [4294967295, 4294967296, 0]): TensorInfo::numel() (int64_t)
    // and LibTorch would overflow on the way. Found by fuzz/fuzz_checkpoint.
    bool partial_overflow = false;
    for (const auto& d : *shape_it) {
      if (!d.is_number_unsigned())
        throw CheckpointError(tensor + " has a shape entry that is not a non-negative integer");
      const uint64_t v = d.get<uint64_t>();
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) overflow = true;
      shape.push_back(static_cast<int64_t>(v));
      if (v != 0 && numel > std::numeric_limits<uint64_t>::max() / v) overflow = true;
      numel *= v;
      if (numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) partial_overflow = true;
    }
    if (!overflow && numel > std::numeric_limits<uint64_t>::max() / dt->size) overflow = true;

    auto off_it = value.find("data_offsets");
    if (off_it == value.end() || !off_it->is_array() || off_it->size() != 2 ||
        !(*off_it)[0].is_number_unsigned() || !(*off_it)[1].is_number_unsigned())
      throw CheckpointError(tensor + " has no data_offsets [begin, end] of non-negative integers");
    const uint64_t begin = (*off_it)[0].get<uint64_t>();
    const uint64_t end = (*off_it)[1].get<uint64_t>();
    if (begin > end)
      throw CheckpointError(tensor + " has data_offsets [" + std::to_string(begin) + ", " +
                            std::to_string(end) + "] with begin after end");
    if (end > data_size)
      throw CheckpointError(tensor + " has data_offsets [" + std::to_string(begin) + ", " +
                            std::to_string(end) + "] past the end of the " +
                            std::to_string(data_size) + "-byte data section (truncated file?)");
    if (overflow || numel * dt->size != end - begin)
      throw CheckpointError(tensor + " of dtype " + dt->name + " and shape " +
                            shape_string(shape) + " needs " +
                            (overflow ? std::string("more than 2^64") : std::to_string(numel * dt->size)) +
                            " bytes but its data_offsets span " + std::to_string(end - begin));
    if (partial_overflow)
      throw CheckpointError(tensor + " has shape " + shape_string(shape) +
                            ": a running product of its dimensions exceeds 2^63 - 1 elements");
    tensors_[name] = TensorInfo{name, dt->dtype, std::move(shape), data_start + begin, end - begin};
  }
}

std::string safetensors_header(const std::vector<TensorToWrite>& tensors,
                               const std::map<std::string, std::string>& metadata) {
  // The header object is assembled entry by entry: nlohmann::ordered_json's
  // operator[] searches its keys linearly, which made n tensors cost O(n^2)
  // (20 s for 20k tensors; found by the round trip in fuzz/fuzz_checkpoint).
  // Same bytes as ordered_json: insertion order, and a repeated name keeps its
  // first position with its last value.
  std::vector<std::pair<std::string, std::string>> entries;  // dumped key, dumped value
  std::unordered_map<std::string, size_t> index;
  auto put = [&](const std::string& key, std::string value) {
    auto [it, inserted] = index.emplace(key, entries.size());
    if (inserted)
      entries.emplace_back(nlohmann::ordered_json(key).dump(), std::move(value));
    else
      entries[it->second].second = std::move(value);
  };
  if (!metadata.empty()) put("__metadata__", nlohmann::ordered_json(metadata).dump());
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    uint64_t nbytes = dtype_size(t.dtype);
    for (int64_t d : t.shape) nbytes *= static_cast<uint64_t>(d);
    const nlohmann::ordered_json entry = {{"dtype", dtype_name(t.dtype)},
                                          {"shape", t.shape},
                                          {"data_offsets", {offset, offset + nbytes}}};
    put(t.name, entry.dump());
    offset += nbytes;
  }
  std::string json = "{";
  for (size_t i = 0; i < entries.size(); ++i) {
    if (i) json += ',';
    json += entries[i].first;
    json += ':';
    json += entries[i].second;
  }
  json += '}';
  json.append((8 - json.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  uint64_t len = json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  return out + json;
}

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw std::runtime_error("cannot create '" + path + "': " + std::strerror(errno));
  const std::string header = safetensors_header(tensors, metadata);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  for (const auto& t : tensors) {
    uint64_t nbytes = dtype_size(t.dtype);
    for (int64_t d : t.shape) nbytes *= static_cast<uint64_t>(d);
    f.write(static_cast<const char*>(t.data), static_cast<std::streamsize>(nbytes));
  }
  f.flush();
  if (!f) throw std::runtime_error("cannot write '" + path + "': " + std::strerror(errno));
}

}  // namespace gstvae
