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
  // What went wrong, so that callers (latentfilesrc) can pick an error code;
  // the message always names the file and the fault.
  enum class Kind { Other, NotFound, CannotOpen, BadFormat, ReadFailed };
  explicit LatentFileError(const std::string& what, Kind kind = Kind::Other)
      : std::runtime_error(what), kind_(kind) {}
  Kind kind() const { return kind_; }

 private:
  Kind kind_;
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

// How a latent file stores its values; every reader hands out float32.
enum class LatentElement { F32, F16, BF16 };
const char* latent_element_name(LatentElement element);
size_t latent_element_size(LatentElement element);

// The largest latent frame accepted, in float32 bytes: far above any real
// model (SD3 at 8K is 16 x 540 x 960 floats, 33 MB), so a header claiming
// a huge shape is refused instead of being allocated.
constexpr uint64_t kMaxLatentFrameBytes = 1ull << 30;

// Where a latent file keeps its frames, from its header alone (no values
// read). A 3-D C x h x w tensor is one frame; a 4-D N x C x h x w tensor is N
// frames, each stored whole; a 5-D 1 x C x T x h x w tensor (ComfyUI's video
// LATENT: Wan, Hunyuan, ...) is T frames in time order, frame t being
// tensor[0, :, t], so each of its C planes lies elsewhere (channel-major).
struct LatentFileLayout {
  LatentFileFormat format = LatentFileFormat::Latent;  // from the extension
  bool npy = false;                                    // from the content
  int stored_dims = 4;                                 // 3, 4 or 5
  int64_t frames = 0, channels = 0, height = 0, width = 0;
  LatentElement element = LatentElement::F32;
  uint64_t data_offset = 0;  // of frame 0, from the start of the file
  std::map<std::string, std::string> metadata;  // safetensors __metadata__
  bool has_version_marker = false;              // `latent_format_version_0` present

  uint64_t values_per_frame() const { return static_cast<uint64_t>(channels) * height * width; }
  uint64_t stored_frame_bytes() const { return values_per_frame() * latent_element_size(element); }
  uint64_t stored_plane_bytes() const {
    return static_cast<uint64_t>(height) * width * latent_element_size(element);
  }
  // A 5-D video tensor: frame t's channel c is plane c * frames + t.
  bool channel_major() const { return stored_dims == 5; }
  // Where channel `channel` (h x w values) of frame `frame` is stored, from
  // the start of the file, for every layout. All frames together fill
  // frames x stored_frame_bytes() bytes from data_offset.
  uint64_t stored_plane_offset(int64_t frame, int64_t channel) const {
    const uint64_t plane = channel_major() ? static_cast<uint64_t>(channel) * frames + frame
                                           : static_cast<uint64_t>(frame) * channels + channel;
    return data_offset + plane * stored_plane_bytes();
  }
};

// The layout of a whole file image in memory (the fuzz target's entry
// point; LatentFileReader parses the same way). NumPy files are recognised by
// their magic, anything else must be safetensors holding `latent_tensor`.
// Throws LatentFileError (Kind::BadFormat) naming `label` and the fault.
LatentFileLayout latent_layout_of_image(const uint8_t* data, size_t size, LatentFileFormat format,
                                        const std::string& label);
// The layout from a NumPy header: `head` holds the first `head_size` bytes of
// a `file_size`-byte file (at least the whole header, when the file has it).
LatentFileLayout npy_latent_layout(const uint8_t* head, size_t head_size, uint64_t file_size,
                                   const std::string& label);
// Stored little-endian values to float32 (F16 and BF16 exactly, with
// subnormals, infinities and NaNs).
void latent_values_to_f32(const uint8_t* stored, LatentElement element, size_t count, float* out);

// Reads a latent file frame by frame (pread at each frame's offset): memory
// use is one frame whatever the file's size. The header is checked against
// the file's size before anything is allocated for it.
class LatentFileReader {
 public:
  // Throws LatentFileError naming `path`: missing, a directory or other
  // non-regular file, a pickle, a malformed or lying header.
  explicit LatentFileReader(const std::string& path);
  ~LatentFileReader();
  LatentFileReader(const LatentFileReader&) = delete;
  LatentFileReader& operator=(const LatentFileReader&) = delete;

  const std::string& path() const { return path_; }
  const LatentFileLayout& layout() const { return layout_; }
  // Frame `index` (0 .. frames-1) as values_per_frame() float32 values.
  // Throws LatentFileError (Kind::ReadFailed) when the file was cut short
  // since it was opened or cannot be read.
  void read_frame(int64_t index, float* out);

 private:
  std::string path_;
  int fd_ = -1;
  LatentFileLayout layout_;
  std::vector<uint8_t> scratch_;  // one stored frame of F16/BF16
};

// A whole latent file read back (any of the three formats).
struct LatentArray {
  int64_t frames = 0, channels = 0, height = 0, width = 0;
  int stored_dims = 4;        // 5: a ComfyUI video latent (1 x C x T x h x w), frames = T
  std::vector<float> values;  // frames x channels x height x width (a 5-D file's transposed to this)
  std::map<std::string, std::string> metadata;
  bool has_version_marker = false;  // .latent/.safetensors: `latent_format_version_0` present
};

// Reads a latent file (through LatentFileReader: F32, F16, BF16, 3-D, 4-D or
// 5-D 1 x C x T x h x w, whose T latents come out in time order as
// T x C x h x w) and checks that its shape matches its size. Without values (`with_values`
// false) only the header is read: shape, metadata. Values are as stored (no
// ComfyUI LoadLatent rescaling).
LatentArray read_latent_file(const std::string& path, bool with_values = true);

}  // namespace gstvae
