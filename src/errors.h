// Errors raised by the engine. Every message names the file, tensor, shape or
// value at fault so that the GStreamer glue can post it as is.
#pragma once

#include <stdexcept>
#include <string>

namespace gstvae {

// A checkpoint that cannot be used: unreadable, malformed or of the wrong layout.
class CheckpointError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A request the engine cannot satisfy: bad option value, unusable device,
// frame too small, mismatched batch.
class VaeError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace gstvae
