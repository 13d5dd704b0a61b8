// The TAESD family: how the latent space is told (option, file name,
// metadata), the errors when it cannot be or disagrees with the channels, the
// latent-format relations, and the family of every real file in ../shared.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>
#include <string>
#include <sys/stat.h>
#include <vector>

#include "decoder.h"
#include "encoder.h"
#include "errors.h"
#include "fixtures.h"
#include "frame.h"
#include "safetensors.h"

#ifndef GSTVAE_SHARED_DIR
#define GSTVAE_SHARED_DIR ""
#endif

namespace gstvae {
namespace {

using test::contains;
using test::error_of;
using test::TempDir;

ModelOptions cpu(const std::string& latent_space = "") { return test::cpu_fp32(latent_space); }

// Random TAESD-layout weights, narrow (width 8) so that loading is instant.
class TinyTaesd {
 public:
  TinyTaesd(bool decoder, int channels, int width = 8, std::vector<int> pools = {}) : decoder_(decoder) {
    const int64_t w = width;
    auto conv = [&](int index, int64_t out, int64_t in, bool bias) {
      add(std::to_string(index) + ".weight", {out, in, 3, 3});
      if (bias) add(std::to_string(index) + ".bias", {out});
    };
    auto block = [&](int index) {
      const std::string p = std::to_string(index);
      for (int i : {0, 2, 4}) {
        add(p + ".conv." + std::to_string(i) + ".weight", {w, w, 3, 3});
        add(p + ".conv." + std::to_string(i) + ".bias", {w});
      }
      for (int pooled : pools)
        if (pooled == index) {
          add(p + ".pool.0.weight", {4 * w, w, 1, 1});
          add(p + ".pool.1.weight", {4 * w});
          add(p + ".pool.1.bias", {4 * w});
          add(p + ".pool.3.weight", {w, 4 * w, 1, 1});
        }
    };
    if (!decoder) {
      conv(0, w, 3, true);
      block(1);
      for (int s : {2, 6, 10}) {
        conv(s, w, w, false);
        for (int b = s + 1; b < s + 4; ++b) block(b);
      }
      conv(14, channels, w, true);
    } else {
      conv(1, w, channels, true);
      for (int s : {3, 8, 13}) {
        for (int b = s; b < s + 3; ++b) block(b);
        conv(s + 4, w, w, false);
      }
      block(18);
      conv(19, 3, w, true);
    }
  }

  std::string write(const std::string& path, const std::map<std::string, std::string>& metadata = {},
                    const std::string& prefix = "") const {
    std::vector<TensorToWrite> tensors;
    std::vector<std::string> names;
    names.reserve(tensors_.size());
    for (const auto& t : tensors_) names.push_back(prefix + t.name);
    for (size_t i = 0; i < tensors_.size(); ++i)
      tensors.push_back({names[i], DType::F32, tensors_[i].shape, tensors_[i].values.data()});
    write_safetensors(path, tensors, metadata);
    return path;
  }

 private:
  struct Tensor {
    std::string name;
    std::vector<int64_t> shape;
    std::vector<float> values;
  };
  void add(const std::string& name, std::vector<int64_t> shape) {
    size_t n = 1;
    for (int64_t d : shape) n *= static_cast<size_t>(d);
    std::vector<float> v(n);
    std::normal_distribution<float> dist(0.0f, 0.1f);
    for (float& x : v) x = dist(rng_);
    tensors_.push_back({name, std::move(shape), std::move(v)});
  }
  bool decoder_;
  std::mt19937 rng_{7};
  std::vector<Tensor> tensors_;
};

// ------------------------------------------------------------------- detection

TEST(TaesdDetection, FromFileName) {
  TempDir dir;
  const struct {
    const char* file;
    int channels;
    const char* format;
    double scale, shift;
  } cases[] = {
      {"taesd_encoder.safetensors", 4, "sd15", 0.18215, 0.0},
      {"TAESDXL_encoder.safetensors", 4, "sdxl", 0.13025, 0.0},
      {"taesd3_x.safetensors", 16, "sd3", 1.5305, 0.0609},
      {"taef1_encoder.safetensors", 16, "flux", 0.3611, 0.1159},
      {"taef2_encoder.safetensors", 32, "raw", 1.0, 0.0},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.file);
    auto enc = load_encoder(TinyTaesd(false, c.channels).write(dir.file(c.file)), cpu());
    const EncoderInfo& i = enc->info();
    EXPECT_EQ(i.family, "taesd");
    EXPECT_EQ(i.layout, "taesd");
    EXPECT_FALSE(i.input_signed);
    EXPECT_EQ(i.downscale, 8);
    EXPECT_EQ(i.latent_channels, c.channels);
    EXPECT_EQ(i.native_format.name, c.format);
    EXPECT_DOUBLE_EQ(i.native_format.scale, c.scale);
    EXPECT_DOUBLE_EQ(i.native_format.shift, c.shift);
    EXPECT_TRUE(contains(i.architecture, "from the file name")) << i.architecture;
    EXPECT_TRUE(contains(i.architecture, "8 wide")) << i.architecture;
  }
}

TEST(TaesdDetection, FromMetadata) {
  TempDir dir;
  const struct {
    std::map<std::string, std::string> metadata;
    int channels;
    const char* space;
  } cases[] = {
      {{{"latent_space", "taesd3"}}, 16, "taesd3"},
      {{{"modelspec.architecture", "taesdxl/encoder"}}, 4, "taesdxl"},
      {{{"source_path", "models/vae_approx/taef1_encoder.safetensors"}}, 16, "taef1"},
      {{{"model", "taesd encoder"}, {"source_path", "elsewhere/unnamed.pth"}}, 4, "taesd"},
  };
  int n = 0;
  for (const auto& c : cases) {
    const std::string path = dir.file("model" + std::to_string(n++) + ".safetensors");
    SCOPED_TRACE(c.metadata.begin()->first);
    auto enc = load_encoder(TinyTaesd(false, c.channels).write(path, c.metadata), cpu());
    EXPECT_TRUE(contains(enc->info().architecture, std::string("latent space ") + c.space + " from the metadata"))
        << enc->info().architecture;
  }
}

TEST(TaesdDetection, OptionWinsOverNameAndMetadata) {
  TempDir dir;
  const std::string path =
      TinyTaesd(false, 4).write(dir.file("taesd_encoder.safetensors"), {{"latent_space", "taesd"}});
  auto enc = load_encoder(path, cpu("taesdxl"));
  EXPECT_EQ(enc->info().native_format.name, "sdxl");
  EXPECT_TRUE(contains(enc->info().architecture, "set by the latent-space option")) << enc->info().architecture;
  // The option is part of the cache key: without it the same file is SD 1.x.
  EXPECT_EQ(load_encoder(path, cpu())->info().native_format.name, "sd15");
}

TEST(TaesdDetection, PrefixesOfUpstreamAndComfyUI) {
  TempDir dir;
  auto enc = load_encoder(TinyTaesd(false, 4).write(dir.file("taesd_a.safetensors"), {}, "taesd_encoder."), cpu());
  EXPECT_EQ(enc->info().layout, "taesd under 'taesd_encoder.'");
  auto dec = load_decoder(TinyTaesd(true, 16).write(dir.file("taef1_b.safetensors"), {}, "decoder."), cpu());
  EXPECT_EQ(dec->info().layout, "taesd under 'decoder.'");
  EXPECT_EQ(dec->info().family, "taesd");
  EXPECT_FALSE(dec->info().output_signed);
  EXPECT_EQ(dec->info().upscale, 8);
  EXPECT_EQ(dec->info().native_format.name, "flux");
}

TEST(TaesdDetection, PoolBranchesAreFoundAndNamed) {
  TempDir dir;
  auto enc = load_encoder(TinyTaesd(false, 32, 8, {11, 12, 13}).write(dir.file("taef2_e.safetensors")), cpu());
  EXPECT_TRUE(contains(enc->info().architecture, "pool branches: Blocks 11, 12, 13")) << enc->info().architecture;
  auto dec = load_decoder(TinyTaesd(true, 32, 8, {3, 4, 5}).write(dir.file("taef2_d.safetensors")), cpu());
  EXPECT_TRUE(contains(dec->info().architecture, "pool branches: Blocks 3, 4, 5")) << dec->info().architecture;
}

TEST(TaesdDetection, KLAndTaesdDoNotClaimEachOther) {
  TempDir dir;
  test::VaeSpec spec;  // a KL VAE with some decoder tensors
  const std::string kl = dir.file("taesd_named_kl.safetensors");
  test::write_test_vae(kl, spec);
  EXPECT_EQ(load_encoder(kl, cpu())->info().family, "kl");
  // Its few decoder tensors are not a TAESD decoder, whatever the name says:
  // the KL decoder family claims them (and finds its missing tensors).
  const std::string kl_decoder_error = error_of<CheckpointError>([&] { load_decoder(kl, cpu()); });
  EXPECT_TRUE(contains(kl_decoder_error, "decoder.")) << kl_decoder_error;
  EXPECT_FALSE(contains(kl_decoder_error, "TAESD")) << kl_decoder_error;
  // A TAESD encoder is not a decoder, and a decoder not an encoder.
  const std::string enc = TinyTaesd(false, 4).write(dir.file("taesd_encoder.safetensors"));
  const std::string dec = TinyTaesd(true, 4).write(dir.file("taesd_decoder.safetensors"));
  EXPECT_TRUE(contains(error_of<CheckpointError>([&] { load_decoder(enc, cpu()); }), "no supported VAE decoder"));
  EXPECT_TRUE(contains(error_of<CheckpointError>([&] { load_encoder(dec, cpu()); }), "no supported VAE encoder"));
}

// ---------------------------------------------------------------------- errors

TEST(TaesdErrors, AmbiguousFileSaysHowToName) {
  TempDir dir;
  for (bool decoder : {false, true}) {
    SCOPED_TRACE(decoder ? "decoder" : "encoder");
    const std::string path = TinyTaesd(decoder, 4).write(dir.file(decoder ? "tiny_dec.safetensors" : "tiny.safetensors"));
    const std::string e = error_of<CheckpointError>([&] {
      if (decoder)
        load_decoder(path, cpu());
      else
        load_encoder(path, cpu());
    });
    EXPECT_TRUE(contains(e, path)) << e;
    EXPECT_TRUE(contains(e, "is a TAESD")) << e;
    EXPECT_TRUE(contains(e, "latent space cannot be told")) << e;
    EXPECT_TRUE(contains(e, "identical shapes")) << e;
    EXPECT_TRUE(contains(e, "taesdxl_*")) << e;
    EXPECT_TRUE(contains(e, "latent-space property")) << e;
  }
}

TEST(TaesdErrors, ChannelMismatchNamesBoth) {
  TempDir dir;
  const std::string path = TinyTaesd(false, 4).write(dir.file("taef1_encoder.safetensors"));
  const std::string e = error_of<CheckpointError>([&] { load_encoder(path, cpu()); });
  EXPECT_TRUE(contains(e, "has 4 latent channels")) << e;
  EXPECT_TRUE(contains(e, "taef1")) << e;
  EXPECT_TRUE(contains(e, "has 16")) << e;
  const std::string dpath = TinyTaesd(true, 16).write(dir.file("d.safetensors"));
  const std::string d = error_of<CheckpointError>([&] { load_decoder(dpath, cpu("taef2")); });
  EXPECT_TRUE(contains(d, "has 16 latent channels")) << d;
  EXPECT_TRUE(contains(d, "latent-space option")) << d;
  EXPECT_TRUE(contains(d, "has 32")) << d;
}

TEST(TaesdErrors, UnknownLatentSpaceOptionListsKnownOnes) {
  TempDir dir;
  const std::string path = TinyTaesd(false, 4).write(dir.file("taesd_encoder.safetensors"));
  const std::string e = error_of<VaeError>([&] { load_encoder(path, cpu("sdxl")); });
  EXPECT_TRUE(contains(e, "'sdxl'")) << e;
  EXPECT_TRUE(contains(e, "taesd, taesdxl, taesd3, taef1, taef2")) << e;
}

TEST(TaesdErrors, MissingBlockTensorIsNamed) {
  TempDir dir;
  // A decoder file whose Block 18 is absent.
  TinyTaesd full(true, 4);
  const std::string path = full.write(dir.file("taesd_decoder.safetensors"));
  SafetensorsFile file(path);
  std::vector<TensorToWrite> kept;
  std::vector<std::vector<uint8_t>> data;
  for (const auto& kv : file.tensors()) {
    if (kv.first.rfind("18.", 0) == 0) continue;
    data.emplace_back(file.data(kv.second), file.data(kv.second) + kv.second.nbytes);
  }
  size_t i = 0;
  for (const auto& kv : file.tensors())
    if (kv.first.rfind("18.", 0) != 0) kept.push_back({kv.first, kv.second.dtype, kv.second.shape, data[i++].data()});
  const std::string cut = dir.file("taesd_cut_decoder.safetensors");
  write_safetensors(cut, kept);
  const std::string e = error_of<CheckpointError>([&] { load_decoder(cut, cpu()); });
  EXPECT_TRUE(contains(e, "'18.conv.0.weight'")) << e;
}

// ------------------------------------------------------- latent format relations

std::vector<uint8_t> test_frame(int w, int h) { return test::make_frame(w, h, 3, static_cast<size_t>(w) * 3, 5); }

std::vector<float> encode(Encoder& enc, const std::vector<uint8_t>& rgb, int w, int h, const std::string& format) {
  auto batch = enc.new_batch(PixelFormat::RGB, w, h, 1);
  batch->add(rgb.data(), static_cast<size_t>(w) * 3, 0);
  EncodeParams params;
  params.latent_format = latent_format_by_name(format);
  std::vector<float> out(enc.latent_floats_per_frame(*batch));
  enc.encode(*batch, params, out.data());
  return out;
}

TEST(TaesdLatents, RawIsOutputOverScalePlusShift) {
  TempDir dir;
  const int w = 32, h = 24;
  const std::vector<uint8_t> rgb = test_frame(w, h);
  // taesd: raw = out / 0.18215, so the sd15 format gives the model's output back.
  auto sd = load_encoder(TinyTaesd(false, 4).write(dir.file("taesd_e.safetensors")), cpu());
  const std::vector<float> raw = encode(*sd, rgb, w, h, "raw"), sd15 = encode(*sd, rgb, w, h, "sd15");
  double max_abs = 0, max_diff = 0;
  for (size_t i = 0; i < raw.size(); ++i) {
    max_abs = std::max(max_abs, std::fabs(static_cast<double>(sd15[i])));
    max_diff = std::max(max_diff, std::fabs(raw[i] * 0.18215 - sd15[i]));
  }
  EXPECT_GT(max_abs, 0.0);
  EXPECT_LE(max_diff, 1e-6 * max_abs);
  // taesd3: raw = out / 1.5305 + 0.0609, and the sd3 format undoes exactly that.
  auto s3 = load_encoder(TinyTaesd(false, 16).write(dir.file("taesd3_e.safetensors")), cpu());
  const std::vector<float> raw3 = encode(*s3, rgb, w, h, "raw"), sd3 = encode(*s3, rgb, w, h, "sd3");
  max_abs = max_diff = 0;
  for (size_t i = 0; i < raw3.size(); ++i) {
    max_abs = std::max(max_abs, std::fabs(static_cast<double>(sd3[i])));
    max_diff = std::max(max_diff, std::fabs((raw3[i] - 0.0609) * 1.5305 - sd3[i]));
  }
  EXPECT_LE(max_diff, 1e-5 * max_abs);
}

TEST(TaesdLatents, DecoderTakesRawOrTheModelsOwnFormat) {
  TempDir dir;
  auto dec = load_decoder(TinyTaesd(true, 4).write(dir.file("taesd_d.safetensors")), cpu());
  auto raw_batch = dec->new_batch(3, 4, 1), sd15_batch = dec->new_batch(3, 4, 1);
  std::vector<float> raw(raw_batch->floats_per_latent()), scaled(raw.size());
  std::mt19937 rng(3);
  std::normal_distribution<float> dist(0.0f, 5.0f);
  for (size_t i = 0; i < raw.size(); ++i) {
    raw[i] = dist(rng);
    scaled[i] = raw[i] * 0.18215f;
  }
  raw_batch->add(raw.data(), 0);
  sd15_batch->add(scaled.data(), 0);
  DecodeParams as_raw, as_sd15;
  as_sd15.latent_format = latent_format_by_name("sd15");
  std::vector<uint8_t> a(dec->frame_bytes(*raw_batch, PixelFormat::RGB)), b(a.size());
  dec->decode(*raw_batch, as_raw, PixelFormat::RGB, a.data());
  dec->decode(*sd15_batch, as_sd15, PixelFormat::RGB, b.data());
  int worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(int(a[i]) - int(b[i])));
  EXPECT_LE(worst, 1);  // float rounding of x*0.18215 may move a value across a truncation boundary
}

// ------------------------------------------------------------------ real files

std::string shared_models() {
  const char* env = std::getenv("GSTVAE_SHARED_DIR");
  std::string dir = env && *env ? env : GSTVAE_SHARED_DIR;
  dir += "/models";
  struct stat st {};
  return ::stat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode) ? dir : "";
}

TEST(TaesdRealFiles, FamilyOfEveryFile) {
  const std::string models = shared_models();
  ASSERT_FALSE(models.empty()) << "no shared/models beside the repository (set GSTVAE_SHARED_DIR)";
  const struct {
    const char* space;
    const char* format;
    int channels;
    int64_t encoder_params, decoder_params;  // shared/models/README.md
    const char* pools;
  } files[] = {
      {"taesd", "sd15", 4, 1222532, 1222531, "no"},
      {"taesdxl", "sdxl", 4, 1222532, 1222531, "no"},
      {"taesd3", "sd3", 16, 1229456, 1229443, "no"},
      {"taef1", "flux", 16, 1229456, 1229443, "no"},
      {"taef2", "raw", 32, 1338528, 1338499, "Blocks"},
  };
  for (const auto& f : files) {
    SCOPED_TRACE(f.space);
    auto enc = load_encoder(models + "/" + f.space + "_encoder.safetensors", cpu());
    auto dec = load_decoder(models + "/" + f.space + "_decoder.safetensors", cpu());
    EXPECT_EQ(enc->info().family, "taesd");
    EXPECT_EQ(dec->info().family, "taesd");
    EXPECT_EQ(enc->info().native_format.name, f.format);
    EXPECT_EQ(dec->info().native_format.name, f.format);
    EXPECT_EQ(enc->info().latent_channels, f.channels);
    EXPECT_EQ(dec->info().latent_channels, f.channels);
    EXPECT_EQ(enc->info().parameters, f.encoder_params);
    EXPECT_EQ(dec->info().parameters, f.decoder_params);
    EXPECT_TRUE(contains(enc->info().architecture, std::string("latent space ") + f.space + " ")) << enc->info().architecture;
    EXPECT_TRUE(contains(enc->info().architecture, "64 wide")) << enc->info().architecture;
    EXPECT_TRUE(contains(enc->info().architecture, std::string("pool branches: ") + f.pools)) << enc->info().architecture;
    EXPECT_TRUE(contains(dec->info().architecture, std::string("pool branches: ") + f.pools)) << dec->info().architecture;
    std::cout << "[ info     ] " << enc->info().architecture << "\n[ info     ] " << dec->info().architecture << "\n";
  }
  auto sana = load_encoder(models + "/taesana_encoder.safetensors", cpu());
  EXPECT_EQ(sana->info().family, "taesd");
  EXPECT_EQ(sana->info().downscale, 32);
  EXPECT_EQ(sana->info().latent_channels, 32);
  EXPECT_EQ(sana->info().parameters, 1256288);
  EXPECT_TRUE(sana->info().native_format.is_raw());
  std::cout << "[ info     ] " << sana->info().architecture << "\n";
}

// No silent misloads (tensor_usage.h): the real files use every tensor they
// hold, no other family loads them even when forced, and one stray tensor
// makes the load fail naming it.
TEST(TaesdRealFiles, OnlyTaesdLoadsThemAndAStrayTensorIsRefused) {
  const std::string models = shared_models();
  ASSERT_FALSE(models.empty()) << "no shared/models beside the repository (set GSTVAE_SHARED_DIR)";
  TempDir dir;
  for (const char* space : {"taesd", "taesdxl", "taesd3", "taef1", "taef2", "taesana"}) {
    for (bool decoder : {false, true}) {
      if (decoder && std::string(space) == "taesana") continue;  // no decoder file
      const std::string name = std::string(space) + (decoder ? "_decoder" : "_encoder") + ".safetensors";
      SCOPED_TRACE(name);
      std::vector<std::string> faults;
      const auto loaded = test::families_that_load(models + "/" + name, decoder, cpu(), &faults);
      EXPECT_EQ(loaded, std::vector<std::string>{"taesd"});
      EXPECT_TRUE(faults.empty()) << faults.front();
      // Same name (the latent space comes from it), one tensor more.
      const std::string stray = dir.file(name);
      test::copy_with_extra_tensor(models + "/" + name, stray, "99.weight");
      const std::string err = error_of<CheckpointError>([&] {
        if (decoder)
          load_decoder(stray, cpu());
        else
          load_encoder(stray, cpu());
      });
      EXPECT_TRUE(contains(err, "'99.weight'") && contains(err, "not used")) << err;
      EXPECT_TRUE(contains(err, decoder ? "TAESD decoder" : std::string(space) == "taesana" ? "TAESana encoder"
                                                                                           : "TAESD encoder"))
          << err;
    }
  }
}

TEST(TaesdDetection, ModuleFilesLeaveTheOtherHalfAloneButNotStrays) {
  TempDir dir;
  // ComfyUI's module names: the encoder and decoder in one file.
  const std::string both = dir.file("taesd_both.safetensors");
  {
    const std::string enc = TinyTaesd(false, 4).write(dir.file("e.safetensors"), {}, "taesd_encoder.");
    const std::string dec = TinyTaesd(true, 4).write(dir.file("d.safetensors"), {}, "taesd_decoder.");
    SafetensorsFile a(enc), b(dec);
    std::vector<TensorToWrite> tensors;
    for (const SafetensorsFile* f : {&a, &b})
      for (const auto& kv : f->tensors()) tensors.push_back({kv.first, kv.second.dtype, kv.second.shape, f->data(kv.second)});
    write_safetensors(both, tensors);
  }
  EXPECT_NO_THROW(load_encoder(both, cpu()));
  EXPECT_NO_THROW(load_decoder(both, cpu()));
  const std::string stray = dir.file("taesd_stray.safetensors");
  test::copy_with_extra_tensor(both, stray, "taesd_encoder.15.weight");
  EXPECT_TRUE(contains(error_of<CheckpointError>([&] { load_encoder(stray, cpu()); }), "'taesd_encoder.15.weight'"));
  EXPECT_NO_THROW(load_decoder(stray, cpu()));
}

}  // namespace
}  // namespace gstvae
