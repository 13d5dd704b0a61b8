// Test fixtures generated at test time: random-weight VAE checkpoints with
// real key layouts and shapes, scratch directories, synthetic frames.
#pragma once

#include <cstdint>
#include <exception>
#include <map>
#include <string>
#include <vector>

#include "model.h"
#include "safetensors.h"

namespace gstvae::test {

struct VaeSpec {
  int ch = 32;                       // base width (multiple of 32)
  std::vector<int> mult = {1, 1, 2, 2};  // 4 levels -> downscale 8
  int blocks = 1;                    // residual blocks per level
  int z = 4;                         // latent channels
  bool quant_conv = true;
  DType dtype = DType::F32;          // F32, F16 or BF16
  // ldm, first_stage_model, vae, diffusers, diffusers_old, or flux2 (the
  // official Flux.2 ae.safetensors names: `encoder.quant_conv`,
  // `decoder.post_quant_conv`; otherwise ldm)
  std::string layout = "ldm";
  // Flux.2's latent BatchNorm: `bn.running_mean` / `bn.running_var` [4z]
  // (variances in [0.5, 1.5]) and the I64 `bn.num_batches_tracked` [].
  bool batch_norm = false;
  bool include_decoder = true;       // a few decoder tensors the encoder must ignore
  bool full_decoder = false;         // with include_decoder: a whole decoder (blocks + 1 per level)
  bool include_encoder = true;       // false: a decoder-only file
  uint64_t seed = 1;
  std::vector<std::string> drop;     // canonical (LDM) names left out of the file
  std::map<std::string, std::vector<int64_t>> reshape;  // canonical name -> wrong shape to store instead
};

// Writes a checkpoint for `spec` to `path`.
void write_test_vae(const std::string& path, const VaeSpec& spec);

// Copies the safetensors file `from` to `to` with one more tensor, `name`
// (F32, shape [1]): a stray tensor that the loader of `from` must refuse.
void copy_with_extra_tensor(const std::string& from, const std::string& to, const std::string& name);

// Every family's loader forced on `path` (detection skipped, as if a user had
// forced the family): the names of the families that loaded it. Refusals must
// be CheckpointErrors; any other exception is reported in `faults` as
// "family: what" (a crash ends the test anyway).
std::vector<std::string> families_that_load(const std::string& path, bool decoder, const ModelOptions& options,
                                            std::vector<std::string>* faults);
// The names of the families whose detect() accepts `path`, in registry order.
std::vector<std::string> families_that_detect(const std::string& path, bool decoder);

// A fresh empty directory under $TMPDIR, removed by the destructor.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Deterministic smooth-ish frame pixels (rows `stride` bytes apart).
std::vector<uint8_t> make_frame(int width, int height, int bytes_per_pixel, size_t stride, uint64_t seed);

// Writes raw bytes to a file (for hostile-file tests).
void write_bytes(const std::string& path, const std::string& bytes);

inline bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// The message of the exception of type E thrown by `f`, or a marker.
template <typename E, typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<wrong exception type: ") + e.what() + ">";
  }
  return "<no exception>";
}

// fp32 on the CPU, the latent space given (TAESD-family files need one).
inline ModelOptions cpu_fp32(const std::string& latent_space = "") {
  ModelOptions o;
  o.device = "cpu";
  o.precision = Precision::F32;
  o.latent_space = latent_space;
  return o;
}

}  // namespace gstvae::test
