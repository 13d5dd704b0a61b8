#include "latent_file.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>

#include "safetensors.h"

namespace gstvae {

namespace {

// Room reserved for the header, so that frames can be written before the frame
// count is known. Both keep the data 64-byte aligned.
constexpr size_t kSafetensorsHeaderBytes = 4096;
constexpr size_t kNpyHeaderBytes = 128;
constexpr size_t kMaxMetadataValue = 256;
// Metadata whose value is JSON: never cut (the caller fits it, see header_fits).
constexpr const char* kRangesKey = "ranges";
constexpr const char* kTempInfix = ".partial-";
constexpr size_t kTempRandomChars = 6;

std::string errno_text() { return std::strerror(errno); }

std::string dir_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

std::string base_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

bool ends_with_ignoring_case(const std::string& s, const std::string& lower_suffix) {
  if (s.size() < lower_suffix.size()) return false;
  const size_t at = s.size() - lower_suffix.size();
  for (size_t i = 0; i < lower_suffix.size(); ++i) {
    const char c = s[at + i];
    if ((c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c) != lower_suffix[i]) return false;
  }
  return true;
}

bool is_alnum(char c) { return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'); }

}  // namespace

const char* latent_file_format_name(LatentFileFormat format) {
  switch (format) {
    case LatentFileFormat::Latent: return "latent";
    case LatentFileFormat::Safetensors: return "safetensors";
    case LatentFileFormat::Npy: return "npy";
  }
  return "?";
}

LatentFileFormat latent_file_format_for(const std::string& path) {
  if (ends_with_ignoring_case(path, ".npy")) return LatentFileFormat::Npy;
  if (ends_with_ignoring_case(path, ".safetensors")) return LatentFileFormat::Safetensors;
  return LatentFileFormat::Latent;
}

std::string latent_file_target_problem(const std::string& final_path) {
  // lstat: rename() replaces a symbolic link itself, even one to a directory,
  // but it cannot replace a directory; finding that out at the end of the
  // stream would throw away everything written.
  struct stat st;
  if (::lstat(final_path.c_str(), &st) == 0 && S_ISDIR(st.st_mode))
    return "'" + final_path + "' is a directory: a latent file cannot replace it";
  return "";
}

std::string latent_temp_file_target(const std::string& entry_name) {
  const size_t tail = std::strlen(kTempInfix) + kTempRandomChars;
  if (entry_name.size() < 2 + tail || entry_name[0] != '.') return "";
  const size_t infix = entry_name.size() - tail;
  if (entry_name.compare(infix, std::strlen(kTempInfix), kTempInfix) != 0) return "";
  for (size_t i = entry_name.size() - kTempRandomChars; i < entry_name.size(); ++i)
    if (!is_alnum(entry_name[i])) return "";
  return entry_name.substr(1, infix - 1);
}

LatentFileWriter::LatentFileWriter(std::string final_path, LatentFileFormat format, int channels, int height,
                                   int width)
    : final_path_(std::move(final_path)), format_(format), channels_(channels), height_(height), width_(width) {
  if (channels < 1 || height < 1 || width < 1)
    throw LatentFileError("invalid latent shape " + std::to_string(channels) + "x" + std::to_string(height) + "x" +
                          std::to_string(width));
  frame_bytes_ = static_cast<size_t>(channels) * height * width * sizeof(float);
  header_bytes_ = format == LatentFileFormat::Npy ? kNpyHeaderBytes : kSafetensorsHeaderBytes;
  const std::string problem = latent_file_target_problem(final_path_);
  if (!problem.empty()) throw LatentFileError(problem);
  // Hidden, unique, in the same directory: rename() is then atomic. Not
  // mkstemp: it creates mode 0600, and forcing a mode would ignore the umask;
  // open() with 0666 gives what any other new file gets. The ".partial-" infix
  // makes files left by a killed process recognisable (latent_temp_file_target).
  std::mt19937_64 random;
  try {
    std::random_device device;
    random.seed((static_cast<uint64_t>(device()) << 32) ^ device());
  } catch (const std::exception&) {
    random.seed(static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
                static_cast<uint64_t>(::getpid()));
  }
  static const char kChars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
  const std::string stem = dir_of(final_path_) + "/." + base_of(final_path_) + kTempInfix;
  for (int attempt = 0; attempt < 100 && fd_ < 0; ++attempt) {
    std::string name = stem;
    for (size_t i = 0; i < kTempRandomChars; ++i) name += kChars[random() % (sizeof(kChars) - 1)];
    fd_ = ::open(name.c_str(), O_CREAT | O_EXCL | O_CLOEXEC | O_RDWR, 0666);
    if (fd_ >= 0) {
      temp_path_ = name;
    } else if (errno != EEXIST) {
      throw LatentFileError("cannot create a file in '" + dir_of(final_path_) + "' for '" + final_path_ +
                            "': " + errno_text());
    }
  }
  if (fd_ < 0)
    throw LatentFileError("cannot create a file in '" + dir_of(final_path_) + "' for '" + final_path_ +
                          "': 100 random temporary names were all taken");
  const std::string placeholder(header_bytes_, ' ');
  try {
    write_at(0, placeholder.data(), placeholder.size());
  } catch (...) {
    abort();
    throw;
  }
}

LatentFileWriter::~LatentFileWriter() {
  if (!finished_) abort();
}

void LatentFileWriter::write_at(uint64_t offset, const void* data, size_t bytes) {
  // The kernel answers a write past RLIMIT_FSIZE with SIGXFSZ, which kills the
  // process before any error can be reported or the temporary file removed
  // (only a process that ignores the signal gets EFBIG). Asked at each write:
  // the limit can change while the stream runs.
  struct rlimit limit;
  if (::getrlimit(RLIMIT_FSIZE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY &&
      offset + bytes > static_cast<uint64_t>(limit.rlim_cur))
    throw LatentFileError("cannot write '" + temp_path_ + "' (for '" + final_path_ + "'): " +
                          std::to_string(offset + bytes) + " bytes would exceed the file size limit (ulimit -f / "
                          "RLIMIT_FSIZE, " + std::to_string(limit.rlim_cur) + " bytes)");
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t n = ::pwrite(fd_, p, bytes, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw LatentFileError("cannot write '" + temp_path_ + "' (for '" + final_path_ + "'): " + errno_text());
    }
    p += n;
    bytes -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

void LatentFileWriter::append(const void* data, size_t bytes) {
  if (fd_ < 0 || finished_) throw LatentFileError("'" + final_path_ + "' is already closed");
  if (bytes % frame_bytes_ != 0)
    throw LatentFileError("appending " + std::to_string(bytes) + " bytes to '" + final_path_ +
                          "', not a whole number of " + std::to_string(frame_bytes_) + "-byte latents");
  write_at(header_bytes_ + frames_ * frame_bytes_, data, bytes);
  frames_ += bytes / frame_bytes_;
}

std::string LatentFileWriter::header(const std::map<std::string, std::string>& metadata) const {
  const std::vector<int64_t> shape = {static_cast<int64_t>(frames_), channels_, height_, width_};
  std::string h;
  if (format_ == LatentFileFormat::Npy) {
    std::ostringstream dict;
    dict << "{'descr': '<f4', 'fortran_order': False, 'shape': (" << shape[0] << ", " << shape[1] << ", "
         << shape[2] << ", " << shape[3] << "), }";
    std::string text = dict.str();
    const size_t prefix = 10;  // magic (6) + version (2) + header length (2)
    if (prefix + text.size() + 1 > header_bytes_) throw LatentFileError("npy header too long");
    text.append(header_bytes_ - prefix - text.size() - 1, ' ');
    text += '\n';
    h = std::string("\x93NUMPY\x01\x00", 8);
    h += static_cast<char>(text.size() & 0xff);
    h += static_cast<char>((text.size() >> 8) & 0xff);
    h += text;
    return h;
  }
  std::map<std::string, std::string> meta;
  for (const auto& kv : metadata)
    meta[kv.first] = kv.first == kRangesKey ? kv.second : kv.second.substr(0, kMaxMetadataValue);
  static const float kNoData = 0.0f;
  // ComfyUI's SaveLatent layout: the empty marker first, then the samples.
  std::vector<TensorToWrite> tensors = {
      {"latent_format_version_0", DType::F32, {0}, &kNoData},
      {"latent_tensor", DType::F32, shape, nullptr},
  };
  h = safetensors_header(tensors, meta);
  if (h.size() > header_bytes_)
    throw LatentFileError("metadata of '" + final_path_ + "' does not fit the reserved header");
  // Pad the JSON with spaces (allowed by the format) to the reserved size.
  h.append(header_bytes_ - h.size(), ' ');
  const uint64_t json_len = header_bytes_ - 8;
  for (int i = 0; i < 8; ++i) h[i] = static_cast<char>((json_len >> (8 * i)) & 0xff);
  return h;
}

bool LatentFileWriter::header_fits(const std::map<std::string, std::string>& metadata) const {
  try {
    header(metadata);
  } catch (const std::exception&) {  // too long, or metadata the JSON library refuses (finish() would too)
    return false;
  }
  return true;
}

void LatentFileWriter::finish(const std::map<std::string, std::string>& metadata) {
  if (fd_ < 0 || finished_) throw LatentFileError("'" + final_path_ + "' is already closed");
  const std::string h = header(metadata);
  write_at(0, h.data(), h.size());
  if (::fsync(fd_) != 0)
    throw LatentFileError("cannot flush '" + temp_path_ + "' (for '" + final_path_ + "'): " + errno_text());
  if (::close(fd_) != 0) {
    fd_ = -1;
    throw LatentFileError("cannot close '" + temp_path_ + "' (for '" + final_path_ + "'): " + errno_text());
  }
  fd_ = -1;
  if (::rename(temp_path_.c_str(), final_path_.c_str()) != 0)
    throw LatentFileError("cannot rename '" + temp_path_ + "' to '" + final_path_ + "': " + errno_text());
  finished_ = true;
  // Make the rename itself durable.
  const int dir = ::open(dir_of(final_path_).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
}

void LatentFileWriter::abort() {
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
  if (!finished_ && !temp_path_.empty()) ::unlink(temp_path_.c_str());
  temp_path_.clear();
}

LatentArray read_latent_file(const std::string& path, bool with_values) {
  LatentArray out;
  if (latent_file_format_for(path) == LatentFileFormat::Npy) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw LatentFileError("cannot open '" + path + "'");
    char pre[10];
    f.read(pre, 10);
    if (!f || std::memcmp(pre, "\x93NUMPY", 6) != 0 || pre[6] != 1)
      throw LatentFileError("'" + path + "' is not a NumPy 1.0 file");
    const size_t hlen = static_cast<uint8_t>(pre[8]) | (static_cast<size_t>(static_cast<uint8_t>(pre[9])) << 8);
    std::string dict(hlen, '\0');
    f.read(&dict[0], static_cast<std::streamsize>(hlen));
    if (dict.find("'descr': '<f4'") == std::string::npos || dict.find("'fortran_order': False") == std::string::npos)
      throw LatentFileError("'" + path + "' is not a C-ordered little-endian float32 array");
    const size_t open = dict.find("'shape': (");
    if (open == std::string::npos) throw LatentFileError("'" + path + "' has no shape");
    long long d[4];
    if (std::sscanf(dict.c_str() + open, "'shape': (%lld, %lld, %lld, %lld)", &d[0], &d[1], &d[2], &d[3]) != 4)
      throw LatentFileError("'" + path + "' is not a 4-D array");
    // The shape must match the file's size before anything is allocated for it.
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) throw LatentFileError("cannot stat '" + path + "': " + errno_text());
    const uint64_t data_bytes = static_cast<uint64_t>(st.st_size) - std::min<uint64_t>(st.st_size, 10 + hlen);
    uint64_t count = 1;
    for (long long v : d) {
      if (v < 0 || (v > 0 && count > data_bytes / 4 / static_cast<uint64_t>(v)))
        throw LatentFileError("'" + path + "': shape does not fit the file's " + std::to_string(data_bytes) +
                              " data bytes");
      count *= static_cast<uint64_t>(v);
    }
    if (count * 4 != data_bytes)
      throw LatentFileError("'" + path + "' holds " + std::to_string(data_bytes) + " data bytes, its shape needs " +
                            std::to_string(count * 4) + (count * 4 > data_bytes ? " (truncated)" : ""));
    out.frames = d[0];
    out.channels = d[1];
    out.height = d[2];
    out.width = d[3];
    if (with_values) {
      out.values.resize(static_cast<size_t>(count));
      f.read(reinterpret_cast<char*>(out.values.data()), static_cast<std::streamsize>(count * 4));
      if (!f) throw LatentFileError("'" + path + "' is truncated");
    }
    return out;
  }
  SafetensorsFile file(path);
  const TensorInfo* t = file.find("latent_tensor");
  if (!t) throw LatentFileError("'" + path + "' has no 'latent_tensor'");
  if (t->dtype != DType::F32 || t->shape.size() != 4)
    throw LatentFileError("'" + path + "': 'latent_tensor' is not a 4-D F32 tensor");
  out.frames = t->shape[0];
  out.channels = t->shape[1];
  out.height = t->shape[2];
  out.width = t->shape[3];
  if (with_values) {
    out.values.resize(static_cast<size_t>(t->numel()));
    std::memcpy(out.values.data(), file.data(*t), t->nbytes);
  }
  out.metadata = file.metadata();
  out.has_version_marker = file.find("latent_format_version_0") != nullptr;
  return out;
}

}  // namespace gstvae
