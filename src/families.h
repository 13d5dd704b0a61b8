// The table of encoder families. Adding a family = one source file defining an
// EncoderFamily plus one line in registry.cpp.
#pragma once

#include <memory>
#include <string>

#include "encoder.h"
#include "safetensors.h"

namespace gstvae {

struct EncoderFamily {
  const char* name;
  // True when the checkpoint's tensor names belong to this family.
  bool (*detect)(const SafetensorsFile& file);
  std::shared_ptr<Encoder> (*load)(std::shared_ptr<const SafetensorsFile> file,
                                   const ModelOptions& options);
};

extern const EncoderFamily kKLFamily;  // kl_encoder.cpp

}  // namespace gstvae
