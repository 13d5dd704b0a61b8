// Latent files: ComfyUI `.latent` (safetensors with `latent_tensor` and the
// `latent_format_version_0` marker), plain `.safetensors` (the same content)
// and NumPy `.npy`. Written as a stream: frames are appended as they arrive to
// a temporary file in the destination directory, the header (whose size is
// reserved up front) is written at the end, and the file is renamed into place,
// so the final name never holds a half-written file. No LibTorch here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace gstvae {

enum class LatentFileFormat { Latent, Safetensors, Npy };

class LatentFileError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

const char* latent_file_format_name(LatentFileFormat format);
// From the extension, ignoring case as the checkpoint loader does (y.NPY is a
// NumPy file): .npy -> Npy, .safetensors -> Safetensors, anything else -> Latent.
LatentFileFormat latent_file_format_for(const std::string& path);

// Why `final_path` cannot become a latent file before anything is written
// (it is an existing directory), or "" when nothing is known against it.
std::string latent_file_target_problem(const std::string& final_path);

// The temporary file of `dir/NAME` is `dir/.NAME.partial-XXXXXX` (six letters
// or digits): hidden, and in the same directory so that the final rename is
// atomic. For a directory entry name of that form returns NAME, else "".
std::string latent_temp_file_target(const std::string& entry_name);

class LatentFileWriter {
 public:
  // Creates the temporary file next to `final_path` (mode 0666 less the
  // umask, as any new file). Throws LatentFileError naming the path and the
  // reason when it cannot, or when `final_path` is an existing directory.
  LatentFileWriter(std::string final_path, LatentFileFormat format, int channels, int height, int width);
  // Removes the temporary file unless finish() succeeded.
  ~LatentFileWriter();
  LatentFileWriter(const LatentFileWriter&) = delete;
  LatentFileWriter& operator=(const LatentFileWriter&) = delete;

  // Appends whole frames (C x h x w little-endian float32 each). Every write
  // stays within the file size limit (RLIMIT_FSIZE): one that would pass it
  // throws LatentFileError instead, so the kernel never sends SIGXFSZ.
  void append(const void* data, size_t bytes);
  // Writes the header (frame count, shape, metadata), flushes to disk and
  // renames to the final path. Metadata is ignored by the .npy format.
  // Values are cut to 256 bytes, except `ranges` (JSON, which a cut would
  // make invalid); all of it must fit the reserved header, else this throws.
  void finish(const std::map<std::string, std::string>& metadata);
  // Whether finish(metadata) would find room for it in the reserved header.
  bool header_fits(const std::map<std::string, std::string>& metadata) const;
  // Deletes the temporary file.
  void abort();

  uint64_t frames() const { return frames_; }
  size_t frame_bytes() const { return frame_bytes_; }
  const std::string& final_path() const { return final_path_; }
  const std::string& temp_path() const { return temp_path_; }

 private:
  void write_at(uint64_t offset, const void* data, size_t bytes);
  std::string header(const std::map<std::string, std::string>& metadata) const;

  std::string final_path_, temp_path_;
  LatentFileFormat format_;
  int channels_, height_, width_;
  size_t frame_bytes_;
  size_t header_bytes_;
  int fd_ = -1;
  uint64_t frames_ = 0;
  bool finished_ = false;
};

// A whole latent file read back (any of the three formats).
struct LatentArray {
  int64_t frames = 0, channels = 0, height = 0, width = 0;
  std::vector<float> values;  // frames x channels x height x width
  std::map<std::string, std::string> metadata;
  bool has_version_marker = false;  // .latent/.safetensors: `latent_format_version_0` present
};

// Reads a latent file and checks that its shape matches its size. Without
// values (`with_values` false) only the header is read: shape, metadata.
LatentArray read_latent_file(const std::string& path, bool with_values = true);

}  // namespace gstvae
