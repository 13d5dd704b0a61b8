// The tables of model families. Adding a family = one source file defining an
// EncoderFamily and/or a DecoderFamily plus one line per table in registry.cpp.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "decoder.h"
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

struct DecoderFamily {
  const char* name;
  bool (*detect)(const SafetensorsFile& file);
  std::shared_ptr<Decoder> (*load)(std::shared_ptr<const SafetensorsFile> file, const ModelOptions& options);
};

// Every family, in the order load_encoder()/load_decoder() try them
// (registry.cpp): the first whose detect() accepts a file loads it.
const std::vector<const EncoderFamily*>& encoder_families();
const std::vector<const DecoderFamily*>& decoder_families();

extern const EncoderFamily kKLFamily;               // kl_vae.cpp
extern const DecoderFamily kKLDecoderFamily;        // kl_vae.cpp
extern const EncoderFamily kFlux2EncoderFamily;     // kl_vae.cpp: the KL VAE + Flux.2's latent head
extern const DecoderFamily kFlux2DecoderFamily;     // kl_vae.cpp
extern const EncoderFamily kTaesdEncoderFamily;     // taesd.cpp
extern const DecoderFamily kTaesdDecoderFamily;     // taesd.cpp
extern const EncoderFamily kWanEncoderFamily;       // wan_vae.cpp
extern const DecoderFamily kWanDecoderFamily;       // wan_vae.cpp
extern const EncoderFamily kTaehvEncoderFamily;     // taehv.cpp
extern const DecoderFamily kTaehvDecoderFamily;     // taehv.cpp
extern const EncoderFamily kLtx2EncoderFamily;      // ltx2_vae.cpp

}  // namespace gstvae
