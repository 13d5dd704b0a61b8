#include "latent_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <random>
#include <sstream>

#include "errors.h"
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

const char* latent_element_name(LatentElement element) {
  switch (element) {
    case LatentElement::F32: return "F32";
    case LatentElement::F16: return "F16";
    case LatentElement::BF16: return "BF16";
  }
  return "?";
}

size_t latent_element_size(LatentElement element) { return element == LatentElement::F32 ? 4 : 2; }

namespace {

constexpr char kNpyMagic[] = "\x93NUMPY";
constexpr size_t kNpyMagicBytes = 6;
// NumPy headers are a few hundred bytes; version 2/3 allow a 4-byte length,
// which a hostile file could set to 4 GB.
constexpr uint64_t kMaxNpyHeaderBytes = 1u << 20;

std::string shape_text(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// Checks a 3-D, 4-D or 5-D shape against the `data_bytes` that hold it and
// fills the layout's shape. Every product is checked before it is formed.
// 5-D is ComfyUI's video LATENT, B x C x T x h x w: one video (B = 1) of T
// latents, stored channel-major.
void set_shape(LatentFileLayout* layout, const std::vector<int64_t>& dims, uint64_t data_bytes,
               const std::string& where) {
  using Kind = LatentFileError::Kind;
  if (dims.size() < 3 || dims.size() > 5)
    throw LatentFileError(where + ": latent shape " + shape_text(dims) +
                              " is not N x C x h x w (frames, channels, height, width), C x h x w, or "
                              "1 x C x T x h x w (a video: channels, latent frames, height, width)",
                          Kind::BadFormat);
  if (dims.size() == 5 && dims[0] != 1)
    throw LatentFileError(where + ": latent shape " + shape_text(dims) + " is a batch of " +
                              std::to_string(dims[0]) +
                              " videos (B x C x T x h x w); only one video (B = 1) can be read as a stream of "
                              "latents: save each video on its own",
                          Kind::BadFormat);
  // The dimensions of one frame (C, h, w) and the one that counts frames.
  std::vector<size_t> per_frame_dims;
  int frames_dim = -1;
  switch (dims.size()) {
    case 3: per_frame_dims = {0, 1, 2}; break;
    case 4: per_frame_dims = {1, 2, 3}; frames_dim = 0; break;
    default: per_frame_dims = {1, 3, 4}; frames_dim = 2; break;
  }
  uint64_t per_frame = latent_element_size(layout->element);
  uint64_t per_frame_f32 = 4;
  for (size_t i : per_frame_dims) {
    const int64_t d = dims[i];
    if (d < 1 || d > 0x7fffffff)
      throw LatentFileError(where + ": latent shape " + shape_text(dims) +
                                " has a channel, height or width outside 1 .. 2147483647",
                            Kind::BadFormat);
    if (per_frame_f32 > kMaxLatentFrameBytes / static_cast<uint64_t>(d))
      throw LatentFileError(where + ": latent shape " + shape_text(dims) + " makes frames of more than " +
                                std::to_string(kMaxLatentFrameBytes) + " bytes (a lying header?)",
                            Kind::BadFormat);
    per_frame_f32 *= static_cast<uint64_t>(d);
    per_frame *= static_cast<uint64_t>(d);
  }
  const int64_t frames = frames_dim >= 0 ? dims[frames_dim] : 1;
  if (frames < 0) throw LatentFileError(where + ": negative frame count", Kind::BadFormat);
  if (static_cast<uint64_t>(frames) > data_bytes / per_frame || static_cast<uint64_t>(frames) * per_frame != data_bytes) {
    const bool short_file = static_cast<uint64_t>(frames) > data_bytes / per_frame;
    throw LatentFileError(where + ": latent shape " + shape_text(dims) + " of " + latent_element_name(layout->element) +
                              " needs " + (short_file ? std::string("more than ") + std::to_string(data_bytes)
                                                      : std::to_string(static_cast<uint64_t>(frames) * per_frame)) +
                              " data bytes, the file holds " + std::to_string(data_bytes) +
                              (short_file ? " (truncated, or a header that lies about the size)" : ""),
                          Kind::BadFormat);
  }
  layout->stored_dims = static_cast<int>(dims.size());
  layout->frames = frames;
  layout->channels = dims[per_frame_dims[0]];
  layout->height = dims[per_frame_dims[1]];
  layout->width = dims[per_frame_dims[2]];
}

// The NumPy header dictionary, e.g. {'descr': '<f4', 'fortran_order': False,
// 'shape': (2, 4, 6, 8), }: a Python literal, parsed strictly (strings,
// True/False, tuples of non-negative integers; nothing else is ever written).
class NpyDictParser {
 public:
  NpyDictParser(const char* text, size_t size, std::string where) : p_(text), end_(text + size), where_(std::move(where)) {}

  void parse(std::string* descr, bool* fortran, std::vector<int64_t>* shape) {
    bool have_descr = false, have_order = false, have_shape = false;
    skip_space();
    expect('{');
    for (;;) {
      skip_space();
      if (peek() == '}') break;
      const std::string key = string_literal();
      skip_space();
      expect(':');
      skip_space();
      if (key == "descr") {
        *descr = string_literal();
        have_descr = true;
      } else if (key == "fortran_order") {
        *fortran = boolean();
        have_order = true;
      } else if (key == "shape") {
        *shape = int_tuple();
        have_shape = true;
      } else {
        fail("unknown key '" + key + "'");
      }
      skip_space();
      if (peek() == ',') {
        ++p_;
        continue;
      }
      skip_space();
      if (peek() != '}') fail("expected ',' or '}'");
    }
    ++p_;
    if (!have_descr || !have_order || !have_shape) fail("'descr', 'fortran_order' or 'shape' is missing");
  }

 private:
  [[noreturn]] void fail(const std::string& what) {
    throw LatentFileError(where_ + ": malformed NumPy header: " + what, LatentFileError::Kind::BadFormat);
  }
  char peek() const { return p_ < end_ ? *p_ : '\0'; }
  void skip_space() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++p_;
  }
  std::string string_literal() {
    const char quote = peek();
    if (quote != '\'' && quote != '"') fail("expected a string");
    ++p_;
    std::string out;
    while (p_ < end_ && *p_ != quote) {
      if (*p_ == '\\' || out.size() > 64) fail("unexpected string");
      out += *p_++;
    }
    expect(quote);
    return out;
  }
  bool boolean() {
    for (const char* word : {"True", "False"}) {
      const size_t n = std::strlen(word);
      if (static_cast<size_t>(end_ - p_) >= n && std::memcmp(p_, word, n) == 0) {
        p_ += n;
        return word[0] == 'T';
      }
    }
    fail("expected True or False");
  }
  std::vector<int64_t> int_tuple() {
    expect('(');
    std::vector<int64_t> out;
    for (;;) {
      skip_space();
      if (peek() == ')') break;
      if (peek() < '0' || peek() > '9') fail("shape entries must be non-negative integers");
      uint64_t v = 0;
      while (peek() >= '0' && peek() <= '9') {
        if (v > (static_cast<uint64_t>(INT64_MAX) - 9) / 10) fail("shape entry too large");
        v = v * 10 + static_cast<uint64_t>(*p_++ - '0');
      }
      if (out.size() >= 8) fail("more than 8 dimensions");
      out.push_back(static_cast<int64_t>(v));
      skip_space();
      if (peek() == ',') {
        ++p_;
      } else if (peek() != ')') {
        fail("expected ',' or ')' in the shape");
      }
    }
    ++p_;
    return out;
  }

  const char* p_;
  const char* end_;
  std::string where_;
};

// Where the NumPy header's text starts and how long it is, from the prefix.
bool npy_prefix(const uint8_t* head, size_t head_size, size_t* text_at, uint64_t* text_len, const std::string& where) {
  if (head_size < 10 || std::memcmp(head, kNpyMagic, kNpyMagicBytes) != 0) return false;
  const uint8_t major = head[6];
  if (major == 1) {
    *text_at = 10;
    *text_len = head[8] | (static_cast<uint64_t>(head[9]) << 8);
  } else if (major == 2 || major == 3) {
    if (head_size < 12)
      throw LatentFileError(where + " is truncated inside its NumPy header", LatentFileError::Kind::BadFormat);
    *text_at = 12;
    *text_len = head[8] | (static_cast<uint64_t>(head[9]) << 8) | (static_cast<uint64_t>(head[10]) << 16) |
                (static_cast<uint64_t>(head[11]) << 24);
  } else {
    throw LatentFileError(where + ": NumPy format version " + std::to_string(major) + " is not supported (1, 2, 3)",
                          LatentFileError::Kind::BadFormat);
  }
  return true;
}

bool looks_like_pickle(const uint8_t* head, size_t size) {
  // A zip archive (torch.save since PyTorch 1.6) or a raw pickle stream of
  // protocol 2 to 5 (torch.save before, pickle.dump).
  return size >= 2 && ((head[0] == 'P' && head[1] == 'K') || (head[0] == 0x80 && head[1] >= 2 && head[1] <= 5));
}

[[noreturn]] void refuse_pickle(const std::string& where) {
  throw LatentFileError(where + " looks like a PyTorch/pickle file (torch.save): loading one can run arbitrary "
                                "code, so it is refused; save latents as .latent/.safetensors or .npy",
                        LatentFileError::Kind::BadFormat);
}

LatentFileLayout safetensors_latent_layout(const SafetensorsFile& file, LatentFileFormat format,
                                           const std::string& where) {
  using Kind = LatentFileError::Kind;
  LatentFileLayout layout;
  layout.format = format;
  const TensorInfo* t = file.find("latent_tensor");
  if (!t) {
    std::string names;
    size_t listed = 0;
    for (const auto& entry : file.tensors()) {
      if (listed++ == 5) {
        names += ", ...";
        break;
      }
      names += (names.empty() ? "'" : ", '") + entry.first + "'";
    }
    throw LatentFileError(where + " has no 'latent_tensor' (a ComfyUI latent file holds one; this file has " +
                              (names.empty() ? std::string("no tensors") : "tensors " + names) + ")",
                          Kind::BadFormat);
  }
  switch (t->dtype) {
    case DType::F32: layout.element = LatentElement::F32; break;
    case DType::F16: layout.element = LatentElement::F16; break;
    case DType::BF16: layout.element = LatentElement::BF16; break;
    default:
      throw LatentFileError(where + ": 'latent_tensor' is " + dtype_name(t->dtype) + ", not F32, F16 or BF16",
                            Kind::BadFormat);
  }
  set_shape(&layout, t->shape, t->nbytes, where + ": 'latent_tensor'");
  layout.data_offset = t->offset;
  layout.metadata = file.metadata();
  layout.has_version_marker = file.find("latent_format_version_0") != nullptr;
  return layout;
}

std::string quoted(const std::string& path) { return "'" + path + "'"; }

}  // namespace

LatentFileLayout npy_latent_layout(const uint8_t* head, size_t head_size, uint64_t file_size,
                                   const std::string& label) {
  const std::string where = quoted(label);
  size_t text_at = 0;
  uint64_t text_len = 0;
  if (!npy_prefix(head, head_size, &text_at, &text_len, where))
    throw LatentFileError(where + " is not a NumPy file (no \\x93NUMPY magic)", LatentFileError::Kind::BadFormat);
  if (text_len > kMaxNpyHeaderBytes)
    throw LatentFileError(where + ": NumPy header length " + std::to_string(text_len) + " exceeds the limit of " +
                              std::to_string(kMaxNpyHeaderBytes) + " bytes",
                          LatentFileError::Kind::BadFormat);
  if (text_at + text_len > file_size || text_at + text_len > head_size)
    throw LatentFileError(where + ": NumPy header of " + std::to_string(text_len) + " bytes runs past the end of the " +
                              std::to_string(file_size) + "-byte file (truncated?)",
                          LatentFileError::Kind::BadFormat);
  std::string descr;
  bool fortran = false;
  std::vector<int64_t> shape;
  NpyDictParser(reinterpret_cast<const char*>(head + text_at), static_cast<size_t>(text_len), where)
      .parse(&descr, &fortran, &shape);
  LatentFileLayout layout;
  layout.npy = true;
  if (descr == "<f4") {
    layout.element = LatentElement::F32;
  } else if (descr == "<f2") {
    layout.element = LatentElement::F16;
  } else {
    throw LatentFileError(where + ": NumPy dtype '" + descr + "' is not little-endian float32 ('<f4') or float16 ('<f2')",
                          LatentFileError::Kind::BadFormat);
  }
  if (fortran)
    throw LatentFileError(where + ": Fortran-ordered arrays are not supported (save a C-ordered array)",
                          LatentFileError::Kind::BadFormat);
  layout.data_offset = text_at + text_len;
  set_shape(&layout, shape, file_size - layout.data_offset, where);
  return layout;
}

LatentFileLayout latent_layout_of_image(const uint8_t* data, size_t size, LatentFileFormat format,
                                        const std::string& label) {
  const std::string where = quoted(label);
  if (size >= kNpyMagicBytes && std::memcmp(data, kNpyMagic, kNpyMagicBytes) == 0) {
    LatentFileLayout layout = npy_latent_layout(data, size, size, label);
    layout.format = format;
    return layout;
  }
  if (looks_like_pickle(data, size)) refuse_pickle(where);
  try {
    const SafetensorsFile file(data, size, label);
    return safetensors_latent_layout(file, format, where);
  } catch (const CheckpointError& e) {
    throw LatentFileError(e.what(), LatentFileError::Kind::BadFormat);
  }
}

void latent_values_to_f32(const uint8_t* stored, LatentElement element, size_t count, float* out) {
  switch (element) {
    case LatentElement::F32:
      for (size_t i = 0; i < count; ++i) {
        const uint8_t* b = stored + 4 * i;
        const uint32_t bits = b[0] | (static_cast<uint32_t>(b[1]) << 8) | (static_cast<uint32_t>(b[2]) << 16) |
                              (static_cast<uint32_t>(b[3]) << 24);
        std::memcpy(out + i, &bits, 4);
      }
      return;
    case LatentElement::BF16:
      // bfloat16 is the top half of a float32.
      for (size_t i = 0; i < count; ++i) {
        const uint32_t bits = (static_cast<uint32_t>(stored[2 * i]) << 16) | (static_cast<uint32_t>(stored[2 * i + 1]) << 24);
        std::memcpy(out + i, &bits, 4);
      }
      return;
    case LatentElement::F16:
      for (size_t i = 0; i < count; ++i) {
        const uint32_t h = stored[2 * i] | (static_cast<uint32_t>(stored[2 * i + 1]) << 8);
        const uint32_t sign = (h & 0x8000u) << 16;
        const uint32_t exponent = (h >> 10) & 0x1f;
        uint32_t mantissa = h & 0x3ff;
        uint32_t bits;
        if (exponent == 0x1f) {  // infinity or NaN (payload kept)
          bits = sign | 0x7f800000u | (mantissa << 13);
        } else if (exponent != 0) {  // normal: rebias 15 -> 127
          bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
        } else if (mantissa == 0) {  // signed zero
          bits = sign;
        } else {  // subnormal half: a normal float32
          uint32_t shifts = 0;
          while (!(mantissa & 0x400)) {
            mantissa <<= 1;
            ++shifts;
          }
          bits = sign | ((113 - shifts) << 23) | ((mantissa & 0x3ff) << 13);
        }
        std::memcpy(out + i, &bits, 4);
      }
      return;
  }
}

LatentFileReader::LatentFileReader(const std::string& path) : path_(path) {
  using Kind = LatentFileError::Kind;
  const std::string where = quoted(path);
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd_ < 0)
    throw LatentFileError("cannot open " + where + ": " + errno_text(), errno == ENOENT ? Kind::NotFound : Kind::CannotOpen);
  try {
    struct stat st {};
    if (::fstat(fd_, &st) != 0) throw LatentFileError("cannot stat " + where + ": " + errno_text(), Kind::CannotOpen);
    if (S_ISDIR(st.st_mode)) throw LatentFileError(where + " is a directory, not a latent file", Kind::CannotOpen);
    if (!S_ISREG(st.st_mode)) throw LatentFileError(where + " is not a regular file", Kind::CannotOpen);
    const uint64_t size = static_cast<uint64_t>(st.st_size);
    if (size == 0) throw LatentFileError(where + " is empty, not a latent file", Kind::BadFormat);
    uint8_t head[16] = {};
    const size_t head_bytes = static_cast<size_t>(std::min<uint64_t>(size, sizeof head));
    if (::pread(fd_, head, head_bytes, 0) != static_cast<ssize_t>(head_bytes))
      throw LatentFileError("cannot read " + where + ": " + errno_text(), Kind::ReadFailed);
    const LatentFileFormat format = latent_file_format_for(path);
    size_t text_at = 0;
    uint64_t text_len = 0;
    if (npy_prefix(head, head_bytes, &text_at, &text_len, where)) {
      // Only the header is read (bounded: a hostile length fails the check
      // in npy_latent_layout without being allocated).
      const uint64_t want = std::min<uint64_t>(size, text_at + std::min<uint64_t>(text_len, kMaxNpyHeaderBytes));
      std::vector<uint8_t> header(static_cast<size_t>(want));
      if (::pread(fd_, header.data(), header.size(), 0) != static_cast<ssize_t>(header.size()))
        throw LatentFileError("cannot read " + where + ": " + errno_text(), Kind::ReadFailed);
      layout_ = npy_latent_layout(header.data(), header.size(), size, path);
      layout_.format = format;
    } else {
      if (looks_like_pickle(head, head_bytes)) refuse_pickle(where);
      // The safetensors parser checks every tensor against the file's size,
      // so it is given the whole file, mapped (only the header pages are
      // touched), from this descriptor.
      void* map = ::mmap(nullptr, static_cast<size_t>(size), PROT_READ, MAP_PRIVATE, fd_, 0);
      if (map == MAP_FAILED) throw LatentFileError("cannot map " + where + ": " + errno_text(), Kind::ReadFailed);
      try {
        const SafetensorsFile file(static_cast<const uint8_t*>(map), static_cast<size_t>(size), path);
        layout_ = safetensors_latent_layout(file, format, where);
      } catch (const CheckpointError& e) {
        ::munmap(map, static_cast<size_t>(size));
        throw LatentFileError(e.what(), Kind::BadFormat);
      } catch (...) {
        ::munmap(map, static_cast<size_t>(size));
        throw;
      }
      ::munmap(map, static_cast<size_t>(size));
    }
    if (::fcntl(fd_, F_SETFL, 0) != 0)
      throw LatentFileError("cannot use " + where + ": " + errno_text(), Kind::CannotOpen);
  } catch (...) {
    ::close(fd_);
    fd_ = -1;
    throw;
  }
}

LatentFileReader::~LatentFileReader() {
  if (fd_ >= 0) ::close(fd_);
}

void LatentFileReader::read_frame(int64_t index, float* out) {
  using Kind = LatentFileError::Kind;
  if (index < 0 || index >= layout_.frames)
    throw LatentFileError(quoted(path_) + ": frame " + std::to_string(index) + " out of 0.." +
                              std::to_string(layout_.frames - 1),
                          Kind::Other);
  const size_t bytes = static_cast<size_t>(layout_.stored_frame_bytes());
  uint8_t* dest = reinterpret_cast<uint8_t*>(out);
  if (layout_.element != LatentElement::F32) {
    scratch_.resize(bytes);
    dest = scratch_.data();
  }
  // A frame stored whole is one read; a 5-D video frame is one per channel
  // (its planes lie T planes apart), gathered into C x h x w.
  const bool whole = !layout_.channel_major();
  const size_t piece = whole ? bytes : static_cast<size_t>(layout_.stored_plane_bytes());
  const int64_t pieces = whole ? 1 : layout_.channels;
  for (int64_t p = 0; p < pieces; ++p) {
    const uint64_t offset = layout_.stored_plane_offset(index, p);
    uint8_t* to = dest + static_cast<size_t>(p) * piece;
    size_t done = 0;
    while (done < piece) {
      const ssize_t n = ::pread(fd_, to + done, piece - done, static_cast<off_t>(offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0)
        throw LatentFileError("cannot read frame " + std::to_string(index) + " of " + quoted(path_) + ": " +
                                  errno_text(),
                              Kind::ReadFailed);
      if (n == 0)
        throw LatentFileError(quoted(path_) + " is truncated: frame " + std::to_string(index) +
                                  (whole ? "" : " (channel " + std::to_string(p) + ")") + " ends at byte " +
                                  std::to_string(offset + piece) + ", past the end of the file (cut short after "
                                  "it was opened?)",
                              Kind::ReadFailed);
      done += static_cast<size_t>(n);
    }
  }
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  const bool converted_in_place = layout_.element == LatentElement::F32;  // already float32 as stored
#else
  const bool converted_in_place = false;  // little-endian on disk: swapped (in place for F32)
#endif
  if (!converted_in_place)
    latent_values_to_f32(dest, layout_.element, static_cast<size_t>(layout_.values_per_frame()), out);
}

LatentArray read_latent_file(const std::string& path, bool with_values) {
  LatentFileReader reader(path);
  const LatentFileLayout& layout = reader.layout();
  LatentArray out;
  out.frames = layout.frames;
  out.channels = layout.channels;
  out.height = layout.height;
  out.width = layout.width;
  out.stored_dims = layout.stored_dims;
  out.metadata = layout.metadata;
  out.has_version_marker = layout.has_version_marker;
  if (with_values) {
    // Bounded by the file's size: the layout matched it.
    const size_t per_frame = static_cast<size_t>(layout.values_per_frame());
    out.values.resize(static_cast<size_t>(layout.frames) * per_frame);
    for (int64_t i = 0; i < layout.frames; ++i) reader.read_frame(i, out.values.data() + static_cast<size_t>(i) * per_frame);
  }
  return out;
}

}  // namespace gstvae
