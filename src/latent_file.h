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
// From the extension: .npy -> Npy, .safetensors -> Safetensors, anything else -> Latent.
LatentFileFormat latent_file_format_for(const std::string& path);

class LatentFileWriter {
 public:
  // Creates the temporary file next to `final_path`. Throws LatentFileError
  // naming the directory and the reason when it cannot.
  LatentFileWriter(std::string final_path, LatentFileFormat format, int channels, int height, int width);
  // Removes the temporary file unless finish() succeeded.
  ~LatentFileWriter();
  LatentFileWriter(const LatentFileWriter&) = delete;
  LatentFileWriter& operator=(const LatentFileWriter&) = delete;

  // Appends whole frames (C x h x w little-endian float32 each).
  void append(const void* data, size_t bytes);
  // Writes the header (frame count, shape, metadata), flushes to disk and
  // renames to the final path. Metadata is ignored by the .npy format.
  void finish(const std::map<std::string, std::string>& metadata);
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

LatentArray read_latent_file(const std::string& path);

}  // namespace gstvae
