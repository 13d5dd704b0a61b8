// libFuzzer target for the latent file reader behind latentfilesrc and
// read_latent_file (src/latent_file.cpp: NumPy and safetensors latent
// layouts, F16/BF16 conversion) together with the safetensors parser it uses.
// LibTorch-free, compiled straight into this fuzzer (see scripts/fuzz.sh).
//
// Each input is a whole latent file image. The contract under test:
//   - latent_layout_of_image() either succeeds or throws LatentFileError; any
//     other exception is a bug (reported as a crash); ASan/UBSan catch memory
//     errors and UB;
//   - an accepted layout is 3-D, 4-D or 5-D (1 x C x T x h x w, frames
//     gathered plane by plane), every size is in range, one frame is
//     at most kMaxLatentFrameBytes as float32, and every frame lies inside the
//     image; every value is converted (ASan sees any bad read);
//   - the same bytes as a file (a memfd, through /proc/self/fd) read by
//     LatentFileReader with pread give the same layout and the same floats,
//     bit for bit.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "latent_file.h"

namespace {

[[noreturn]] void fail(const char* what, const std::string& detail = {}) {
  std::fprintf(stderr, "fuzz_latent_file: invariant broken: %s %s\n", what, detail.c_str());
  std::abort();
}

void check_layout(const gstvae::LatentFileLayout& l, size_t size) {
  if (l.stored_dims < 3 || l.stored_dims > 5) fail("stored_dims not 3, 4 or 5");
  if (l.stored_dims == 3 && l.frames != 1) fail("3-D tensor is not one frame");
  if (l.frames < 0) fail("negative frame count");
  for (int64_t d : {l.channels, l.height, l.width})
    if (d < 1 || d > 0x7fffffff) fail("dimension out of range", std::to_string(d));
  if (l.values_per_frame() * 4 > gstvae::kMaxLatentFrameBytes) fail("frame larger than the limit");
  if (l.data_offset > size) fail("data starts past the image");
  if (l.frames > 0 && static_cast<uint64_t>(l.frames) > (size - l.data_offset) / l.stored_frame_bytes())
    fail("frames past the image");
}

// The same image as a file, read back by LatentFileReader.
void check_reader(const uint8_t* data, size_t size, const gstvae::LatentFileLayout* expected,
                  const std::vector<float>& expected_values) {
  const int fd = ::memfd_create("fuzz-latent", MFD_CLOEXEC);
  if (fd < 0) return;  // no memfd here: the in-memory checks still ran
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::write(fd, data + done, size - done);
    if (n <= 0) {
      ::close(fd);
      return;
    }
    done += static_cast<size_t>(n);
  }
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  try {
    gstvae::LatentFileReader reader(path);
    if (!expected) fail("the file reader accepts what the image parser refused");
    const gstvae::LatentFileLayout& l = reader.layout();
    if (l.frames != expected->frames || l.channels != expected->channels || l.height != expected->height ||
        l.width != expected->width || l.element != expected->element || l.data_offset != expected->data_offset ||
        l.npy != expected->npy || l.has_version_marker != expected->has_version_marker ||
        l.metadata != expected->metadata)
      fail("the file reader's layout differs from the image parser's");
    std::vector<float> frame(static_cast<size_t>(l.values_per_frame()));
    for (int64_t i = 0; i < l.frames; ++i) {
      reader.read_frame(i, frame.data());
      if (std::memcmp(frame.data(), expected_values.data() + static_cast<size_t>(i) * frame.size(),
                      frame.size() * sizeof(float)) != 0)
        fail("the file reader's values differ from the image's", "frame " + std::to_string(i));
    }
  } catch (const gstvae::LatentFileError& e) {
    if (expected) fail("the file reader refuses what the image parser accepted:", e.what());
  }
  ::close(fd);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    gstvae::LatentFileLayout layout;
    bool accepted = true;
    try {
      layout = gstvae::latent_layout_of_image(data, size, gstvae::LatentFileFormat::Latent, "fuzz");
    } catch (const gstvae::LatentFileError&) {
      accepted = false;  // expected for most inputs
    }
    std::vector<float> values;
    if (accepted) {
      check_layout(layout, size);
      // Bounded by the input: the frames were checked to lie inside it.
      // Plane by plane, so that 5-D (channel-major) files are gathered too.
      const size_t per_frame = static_cast<size_t>(layout.values_per_frame());
      const size_t per_plane = static_cast<size_t>(layout.height * layout.width);
      values.resize(static_cast<size_t>(layout.frames) * per_frame);
      for (int64_t i = 0; i < layout.frames; ++i)
        for (int64_t ch = 0; ch < layout.channels; ++ch)
          gstvae::latent_values_to_f32(data + layout.stored_plane_offset(i, ch), layout.element, per_plane,
                                       values.data() + static_cast<size_t>(i) * per_frame +
                                           static_cast<size_t>(ch) * per_plane);
    }
    check_reader(data, size, accepted ? &layout : nullptr, values);
  } catch (const std::exception& e) {
    // The reader promises LatentFileError; anything else escaping (a
    // nlohmann::json error, std::out_of_range, std::length_error...) is a bug.
    fail("unexpected exception escaped the latent reader:", e.what());
  }
  return 0;
}
