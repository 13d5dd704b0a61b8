// No silent misloads (src/tensor_usage.h): a loader uses every tensor of the
// part of a file it claims, or the load fails naming the tensors left over and
// the family the file was taken for. The KL VAE families here; the TAESD,
// Wan and TAEHV files in their own test files, with their writers.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "decoder.h"
#include "encoder.h"
#include "errors.h"
#include "families.h"
#include "fixtures.h"
#include "safetensors.h"
#include "tensor_usage.h"

namespace gstvae {
namespace {

using test::contains;
using test::error_of;
using test::TempDir;

ModelOptions cpu() { return test::cpu_fp32(); }

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

// A small KL VAE, both halves whole, in `layout`.
test::VaeSpec kl_spec(const std::string& layout) {
  test::VaeSpec spec;
  spec.layout = layout;
  spec.full_decoder = true;
  return spec;
}

// The same with Flux.2's shapes and latent head: z = 32 (so 128 BatchNorm
// channels), quant convs, BatchNorm statistics; widths kept small.
test::VaeSpec flux2_spec(const std::string& layout) {
  test::VaeSpec spec = kl_spec(layout);
  spec.z = 32;
  spec.batch_norm = true;
  return spec;
}

// ---------------------------------------------------------------- the check

TEST(TensorUsage, PatternsMatchWholeNamesWithStars) {
  EXPECT_TRUE(matches_pattern("decoder.*", "decoder.up.0.block.0.conv1.weight"));
  EXPECT_TRUE(matches_pattern("bn.num_batches_tracked", "bn.num_batches_tracked"));
  EXPECT_TRUE(matches_pattern("*.num_batches_tracked", "a.b.num_batches_tracked"));
  EXPECT_TRUE(matches_pattern("a*b*c", "a__b__b__c"));
  EXPECT_TRUE(matches_pattern("*", ""));
  EXPECT_FALSE(matches_pattern("decoder.*", "encoder.conv_in.weight"));
  EXPECT_FALSE(matches_pattern("decoder.*", "xdecoder.a"));
  EXPECT_FALSE(matches_pattern("bn.running_mean", "bn.running_mean2"));
  EXPECT_FALSE(matches_pattern("a*b*c", "a__b__b__"));
  // Hostile names: long runs that nearly match stay fast (no recursion).
  EXPECT_FALSE(matches_pattern("*a*a*a*a*b", std::string(100000, 'a')));
}

TEST(TensorUsage, UnusedTensorsAreNamedUnlessDeliberatelyUnused) {
  TempDir dir;
  const float one = 1.0f;
  std::vector<TensorToWrite> tensors;
  for (const char* n : {"vae.used", "vae.other.x", "vae.stray", "unet.w"})
    tensors.push_back({n, DType::F32, {1}, &one});
  const std::string path = dir.file("m.safetensors");
  write_safetensors(path, tensors);
  SafetensorsFile file(path);
  const TensorClaim claim{"test model", "vae.", {"other.*"}};
  EXPECT_EQ(unused_tensors(file, claim, {"vae.used"}), std::vector<std::string>{"vae.stray"});
  const std::string err = error_of<CheckpointError>([&] { require_every_tensor_used(file, claim, {"vae.used"}); });
  EXPECT_TRUE(contains(err, path)) << err;
  EXPECT_TRUE(contains(err, "taken for a test model")) << err;
  EXPECT_TRUE(contains(err, "'vae.stray'")) << err;
  EXPECT_FALSE(contains(err, "unet.w")) << err;  // outside the claim
  EXPECT_NO_THROW(require_every_tensor_used(file, claim, {"vae.used", "vae.stray"}));
}

TEST(TensorUsage, LongListsAreCut) {
  TempDir dir;
  const float one = 1.0f;
  std::vector<std::string> names;
  for (int i = 0; i < 20; ++i) names.push_back("t" + std::to_string(100 + i));
  std::vector<TensorToWrite> tensors;
  for (const auto& n : names) tensors.push_back({n, DType::F32, {1}, &one});
  const std::string path = dir.file("m.safetensors");
  write_safetensors(path, tensors);
  SafetensorsFile file(path);
  const std::string err = error_of<CheckpointError>([&] { require_every_tensor_used(file, {"x", "", {}}, {}); });
  EXPECT_TRUE(contains(err, "20 of its tensors are not used")) << err;
  EXPECT_TRUE(contains(err, "'t107' and 12 more")) << err;
  EXPECT_FALSE(contains(err, "t108")) << err;
}

// ---------------------------------------------------------------- KL VAEs

// The defect of issue 21: a Flux.2 VAE file has the KL VAE's key names, and
// the KL loaders used to take it silently, skipping its BatchNorm (and, in the
// official layout, the encoder's quant_conv): 32-channel latents at 1/8
// instead of Flux.2's 128 at 1/16.
TEST(NoSilentMisloads, Flux2FileIsRefusedByTheKLLoaders) {
  TempDir dir;
  for (const std::string layout : {"flux2", "ldm", "diffusers"}) {
    SCOPED_TRACE(layout);
    const std::string path = dir.file(layout + ".safetensors");
    test::write_test_vae(path, flux2_spec(layout));
    auto file = std::make_shared<const SafetensorsFile>(path);
    const std::string enc = error_of<CheckpointError>([&] { kKLFamily.load(file, cpu()); });
    const std::string dec = error_of<CheckpointError>([&] { kKLDecoderFamily.load(file, cpu()); });
    for (const std::string& err : {enc, dec}) {
      EXPECT_TRUE(contains(err, "'bn.running_mean'")) << err;
      EXPECT_TRUE(contains(err, "'bn.running_var'")) << err;
      EXPECT_TRUE(contains(err, "not used")) << err;
    }
    EXPECT_TRUE(contains(enc, "taken for a KL VAE encoder")) << enc;
    EXPECT_TRUE(contains(dec, "taken for a KL VAE decoder")) << dec;
    // Whatever loads it through the registry, it is not the plain KL VAE.
    std::string family;
    try {
      family = load_encoder(path, cpu())->info().family;
    } catch (const CheckpointError&) {
      family = "<refused>";
    }
    EXPECT_NE(family, "kl");
  }
}

TEST(NoSilentMisloads, KLFilesLoadOnlyAsKL) {
  TempDir dir;
  for (const std::string layout : {"ldm", "first_stage_model", "vae", "diffusers", "diffusers_old"}) {
    SCOPED_TRACE(layout);
    const std::string path = dir.file(layout + ".safetensors");
    test::write_test_vae(path, kl_spec(layout));
    for (bool decoder : {false, true}) {
      SCOPED_TRACE(decoder ? "decoder" : "encoder");
      std::vector<std::string> faults;
      EXPECT_EQ(joined(test::families_that_load(path, decoder, cpu(), &faults)), "kl");
      EXPECT_TRUE(faults.empty()) << joined(faults);
      const auto detected = test::families_that_detect(path, decoder);
      ASSERT_FALSE(detected.empty());
      EXPECT_EQ(detected.front(), "kl") << joined(detected);
    }
  }
}

TEST(NoSilentMisloads, KLStrayTensorIsNamedInBothDirections) {
  TempDir dir;
  for (const std::string layout : {"ldm", "first_stage_model", "vae", "diffusers"}) {
    SCOPED_TRACE(layout);
    const std::string prefix = layout == "first_stage_model" ? "first_stage_model." : layout == "vae" ? "vae." : "";
    const std::string clean = dir.file(layout + ".safetensors");
    test::write_test_vae(clean, kl_spec(layout));
    ASSERT_NO_THROW(load_encoder(clean, cpu()));
    ASSERT_NO_THROW(load_decoder(clean, cpu()));

    // In the encoder's half: the encoder refuses it, the decoder leaves that
    // half alone; the mirror for the decoder's half; outside both: both refuse.
    const struct {
      std::string name;
      bool encoder_refuses, decoder_refuses;
    } strays[] = {
        {prefix + "encoder.mid.attn_2.q.weight", true, false},
        {prefix + "decoder.up.0.block.9.conv1.weight", false, true},
        {prefix + "extra.weight", true, true},
    };
    int n = 0;
    for (const auto& s : strays) {
      SCOPED_TRACE(s.name);
      const std::string path = dir.file(layout + "_stray" + std::to_string(n++) + ".safetensors");
      test::copy_with_extra_tensor(clean, path, s.name);
      const std::string enc = error_of<CheckpointError>([&] { load_encoder(path, cpu()); });
      const std::string dec = error_of<CheckpointError>([&] { load_decoder(path, cpu()); });
      if (s.encoder_refuses) {
        EXPECT_TRUE(contains(enc, "'" + s.name + "'") && contains(enc, "KL VAE encoder")) << enc;
      } else {
        EXPECT_EQ(enc, "<no exception>");
      }
      if (s.decoder_refuses) {
        EXPECT_TRUE(contains(dec, "'" + s.name + "'") && contains(dec, "KL VAE decoder")) << dec;
      } else {
        EXPECT_EQ(dec, "<no exception>");
      }
    }
    // Listed on purpose: training-only loss networks; outside the prefix: a
    // full checkpoint's other models.
    const std::string loss = dir.file(layout + "_loss.safetensors");
    test::copy_with_extra_tensor(clean, loss, prefix + "loss.discriminator.main.0.weight");
    EXPECT_NO_THROW(load_encoder(loss, cpu()));
    EXPECT_NO_THROW(load_decoder(loss, cpu()));
    if (!prefix.empty()) {
      const std::string outside = dir.file(layout + "_outside.safetensors");
      test::copy_with_extra_tensor(clean, outside, "cond_stage_model.extra.weight");
      EXPECT_NO_THROW(load_encoder(outside, cpu()));
      EXPECT_NO_THROW(load_decoder(outside, cpu()));
    }
  }
}

}  // namespace
}  // namespace gstvae
