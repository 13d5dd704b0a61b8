// libFuzzer target for the checkpoint loader: the safetensors header parser
// (src/safetensors.cpp) and the tensor-name normalisation
// (src/checkpoint_keys.cpp). Both are LibTorch-free, so they are compiled
// straight into this fuzzer (see scripts/fuzz.sh); no LibTorch is linked.
//
// Each input is a whole safetensors image. The contract under test:
//   - SafetensorsFile and normalize_vae_keys either succeed or throw
//     gstvae::CheckpointError (expected for hostile input);
//   - any other exception is a bug (their headers promise CheckpointError), so
//     it is reported as a crash; ASan/UBSan catch memory errors and UB;
//   - an accepted file's tensors lie inside the image, their byte counts match
//     dtype x shape, and every byte can be read (checksummed here, so ASan sees
//     any out-of-bounds view);
//   - an accepted file written back with safetensors_header() parses again to
//     the same tensors and metadata (round trip).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "checkpoint_keys.h"
#include "errors.h"
#include "safetensors.h"

namespace {

[[noreturn]] void fail(const char* what, const std::string& detail = {}) {
  std::fprintf(stderr, "fuzz_checkpoint: invariant broken: %s %s\n", what, detail.c_str());
  std::abort();
}

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

// Reads every byte of every tensor; the sum is returned so the reads cannot be
// optimised away.
uint64_t check_tensors(const gstvae::SafetensorsFile& file, const uint8_t* data, size_t size) {
  uint64_t sum = 0;
  for (const auto& [name, info] : file.tensors()) {
    if (info.name != name) fail("TensorInfo::name differs from its key", name);
    if (info.shape.size() > 8) fail("more than 8 dimensions accepted", name);
    for (int64_t d : info.shape)
      if (d < 0) fail("negative dimension accepted", name);
    if (info.offset < 8 || info.offset > size || info.nbytes > size - info.offset)
      fail("tensor data outside the image", name);
    if (static_cast<uint64_t>(info.numel()) * gstvae::dtype_size(info.dtype) != info.nbytes)
      fail("numel x dtype size != nbytes", name);
    (void)gstvae::shape_string(info.shape);
    (void)gstvae::dtype_name(info.dtype);
    if (file.find(name) != &info) fail("find() does not return the tensor", name);
    const uint8_t* p = file.data(info);
    if (p < data || p + info.nbytes > data + size) fail("data() outside the image", name);
    for (uint64_t i = 0; i < info.nbytes; ++i) sum = sum * 31 + p[i];
  }
  for (const auto& [key, value] : file.metadata()) sum += key.size() + value.size();
  return sum;
}

// The decoder side of the same names: diffusers' reversed up_blocks numbering
// must never produce a negative or out-of-range level.
void check_decoder_keys(const std::vector<std::string>& names, const std::set<std::string>& present) {
  gstvae::NormalizedKeys keys;
  try {
    keys = gstvae::normalize_vae_keys(names, "fuzz", gstvae::VaePart::Decoder);
  } catch (const gstvae::CheckpointError&) {
    return;  // no decoder, an absurd up-block index, or two names for one canonical name
  }
  if (!keys.has("decoder.conv_in.weight")) fail("decoder accepted without decoder.conv_in.weight");
  for (const auto& [canonical, source] : keys.source) {
    if (!starts_with(canonical, "decoder.") && !starts_with(canonical, "post_quant_conv."))
      fail("canonical name outside decoder./post_quant_conv.", canonical);
    if (starts_with(canonical, "decoder.up.-")) fail("negative up level", canonical);
    if (!present.count(source)) fail("decoder source name not in the file", source);
  }
}

void check_keys(const std::vector<std::string>& names) {
  check_decoder_keys(names, std::set<std::string>(names.begin(), names.end()));
  gstvae::NormalizedKeys keys;
  try {
    keys = gstvae::normalize_vae_keys(names, "fuzz");
  } catch (const gstvae::CheckpointError&) {
    return;  // no encoder, or two names map onto one canonical name
  }
  if (keys.prefix != "" && keys.prefix != "first_stage_model." && keys.prefix != "vae.")
    fail("unexpected prefix", keys.prefix);
  if (keys.layout != "ldm" && keys.layout != "diffusers") fail("unexpected layout", keys.layout);
  if (!keys.has("encoder.conv_in.weight")) fail("accepted without encoder.conv_in.weight");
  const std::set<std::string> present(names.begin(), names.end());
  for (const auto& [canonical, source] : keys.source) {
    if (!starts_with(canonical, "encoder.") && !starts_with(canonical, "quant_conv."))
      fail("canonical name outside encoder./quant_conv.", canonical);
    if (!starts_with(source, keys.prefix)) fail("source name without the prefix", source);
    if (!present.count(source)) fail("source name not in the file", source);
  }
}

// Writes the accepted file back and parses it again: same names, dtypes,
// shapes, bytes and metadata.
void check_round_trip(const gstvae::SafetensorsFile& file) {
  std::vector<gstvae::TensorToWrite> out;
  size_t data_bytes = 0;
  for (const auto& [name, info] : file.tensors()) {
    out.push_back({name, info.dtype, info.shape, file.data(info)});
    data_bytes += info.nbytes;
  }
  std::string image = gstvae::safetensors_header(out, file.metadata());
  image.reserve(image.size() + data_bytes);
  for (const auto& t : out) {
    const auto& info = file.tensors().at(t.name);
    image.append(reinterpret_cast<const char*>(t.data), info.nbytes);
  }
  gstvae::SafetensorsFile again(reinterpret_cast<const uint8_t*>(image.data()), image.size(), "round-trip");
  if (again.metadata() != file.metadata()) fail("metadata differs after round trip");
  if (again.tensors().size() != file.tensors().size()) fail("tensor count differs after round trip");
  for (const auto& [name, info] : file.tensors()) {
    const gstvae::TensorInfo* b = again.find(name);
    if (!b) fail("tensor lost in round trip", name);
    if (b->dtype != info.dtype || b->shape != info.shape || b->nbytes != info.nbytes)
      fail("tensor header differs after round trip", name);
    for (uint64_t i = 0; i < info.nbytes; ++i)
      if (again.data(*b)[i] != file.data(info)[i]) fail("tensor bytes differ after round trip", name);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    std::unique_ptr<gstvae::SafetensorsFile> file;
    try {
      file = std::make_unique<gstvae::SafetensorsFile>(data, size, "fuzz");
    } catch (const gstvae::CheckpointError&) {
      return 0;  // rejected: expected for most inputs
    }
    volatile uint64_t sink = check_tensors(*file, data, size);
    (void)sink;
    std::vector<std::string> names;
    for (const auto& entry : file->tensors()) names.push_back(entry.first);
    check_keys(names);
    check_round_trip(*file);
  } catch (const std::exception& e) {
    // The parser and normalize_vae_keys promise CheckpointError; anything
    // else (nlohmann::json errors, std::out_of_range, std::length_error...)
    // escaping them is a bug in the loader.
    fail("unexpected exception escaped the loader:", e.what());
  }
  return 0;
}
