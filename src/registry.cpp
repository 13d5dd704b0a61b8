// load_encoder: refuses pickle checkpoints, opens the safetensors file and
// hands it to the first family that recognises its tensor names; encoders are
// shared between callers through the weak cache described in model_cache.h.
#include <atomic>
#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <condition_variable>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "errors.h"
#include "families.h"
#include "model_cache.h"
#include "torch_encoder.h"

namespace gstvae {

namespace {

// Function-local: the family objects live in other translation units, whose
// static initialisation order is unspecified.
const std::vector<const EncoderFamily*>& encoder_family_table() {
  static const std::vector<const EncoderFamily*> table = {
      &kWanEncoderFamily,  // first: its diffusers files share names with image VAEs (5-D convs tell them apart)
      &kLtx2EncoderFamily,   // before KL: `encoder.conv_in.conv.weight` (5-D) marks it
      &kFlux2EncoderFamily,  // before KL: a KL VAE with BatchNorm statistics
      &kKLFamily,
      &kTaehvEncoderFamily,  // before TAESD: both are Sequentials named by index
      &kTaesdEncoderFamily,
  };
  return table;
}

const std::vector<const DecoderFamily*>& decoder_family_table() {
  static const std::vector<const DecoderFamily*> table = {
      &kWanDecoderFamily,  // first, as for encoders
      &kFlux2DecoderFamily,  // before KL, as for encoders
      &kKLDecoderFamily,
      &kTaehvDecoderFamily,  // before TAESD: both are Sequentials named by index
      &kTaesdDecoderFamily,
  };
  return table;
}

// Case-insensitive: "model.CKPT" is a pickle too.
bool ends_with(const std::string& s, const std::string& suffix) {
  if (s.size() < suffix.size()) return false;
  for (size_t i = 0; i < suffix.size(); ++i) {
    const char c = s[s.size() - suffix.size() + i];
    if ((c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c) != suffix[i]) return false;
  }
  return true;
}

// PyTorch's .ckpt/.pt/.pth/.bin files are pickles (often inside a zip): loading
// one runs whatever code it carries, so they are refused before anything else.
void refuse_pickle(const std::string& path) {
  bool pickle = false;
  for (const char* ext : {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
    if (ends_with(path, ext)) pickle = true;
  if (FILE* f = std::fopen(path.c_str(), "rb")) {
    unsigned char magic[2] = {0, 0};
    const size_t n = std::fread(magic, 1, 2, f);
    std::fclose(f);
    // zip archive (torch.save since 1.6) or a raw pickle protocol 2+ stream.
    if (n == 2 && ((magic[0] == 'P' && magic[1] == 'K') || (magic[0] == 0x80 && magic[1] >= 2 && magic[1] <= 5)))
      pickle = true;
  }
  if (pickle)
    throw CheckpointError("'" + path +
                          "' looks like a PyTorch pickle checkpoint (.ckpt/.pt): those can run arbitrary code "
                          "when loaded and are not supported; convert it to .safetensors first");
}

// Models read from disk (cache misses), for tools and tests that count loads.
std::atomic<size_t> g_model_loads{0};

// The two directions, as the cache below sees them.
enum class Direction { Encode, Decode };

std::shared_ptr<void> load_uncached(Direction direction, const std::string& path, const ModelOptions& options) {
  g_model_loads++;
  auto file = std::make_shared<const SafetensorsFile>(path);
  if (direction == Direction::Encode) {
    for (const EncoderFamily* family : encoder_family_table())
      if (family && family->detect(*file)) return family->load(file, options);
    throw CheckpointError("'" + path + "' holds no supported VAE encoder (" +
                          std::to_string(file->tensors().size()) +
                          " tensors; expected the encoder of an AutoencoderKL, e.g. 'encoder.conv_in.weight' "
                          "and 'encoder.mid.attn_1.*', possibly under 'first_stage_model.' or 'vae.', or a "
                          "TAESD encoder, e.g. '1.conv.0.weight', or a video VAE encoder: Wan (a 5-D "
                          "'encoder.conv1.weight'), TAEHV (e.g. 'encoder.2.conv.weight') or LTX-2 (a 5-D "
                          "'encoder.conv_in.conv.weight')");
  }
  for (const DecoderFamily* family : decoder_family_table())
    if (family && family->detect(*file)) return family->load(file, options);
  throw CheckpointError("'" + path + "' holds no supported VAE decoder (" + std::to_string(file->tensors().size()) +
                        " tensors; expected the decoder of an AutoencoderKL, e.g. 'decoder.conv_in.weight' and "
                        "'decoder.mid.attn_1.*', possibly under 'first_stage_model.' or 'vae.', a TAESD "
                        "decoder, e.g. '1.weight' and '3.conv.0.weight', or a video VAE decoder: Wan (a 5-D "
                        "'decoder.conv1.weight') or TAEHV (e.g. 'decoder.7.conv.weight')");
}

/* ------------------------------------------------------------------ cache */

// Which file, as the kernel sees it: a rewrite changes size or mtime, a
// replacement (rename over the path) changes the inode.
struct FileIdentity {
  std::string canonical;
  dev_t dev = 0;
  ino_t ino = 0;
  off_t size = 0;
  int64_t mtime_ns = 0;

  auto tie() const { return std::tie(canonical, dev, ino, size, mtime_ns); }
  bool operator==(const FileIdentity& o) const { return tie() == o.tie(); }
};

bool identify(const std::string& path, FileIdentity* id) {
  char buf[PATH_MAX];
  if (!::realpath(path.c_str(), buf)) return false;
  struct stat st {};
  if (::stat(buf, &st) != 0 || !S_ISREG(st.st_mode)) return false;
  id->canonical = buf;
  id->dev = st.st_dev;
  id->ino = st.st_ino;
  id->size = st.st_size;
  id->mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  return true;
}

struct CacheKey {
  Direction direction;
  FileIdentity file;
  std::string device;  // resolved: "cpu", "cuda:0", ...
  Precision precision;  // resolved, never Auto
  std::string latent_space;
  LeversInEffect levers;  // a lever changed in the environment gives another model

  bool operator<(const CacheKey& o) const {
    return std::tie(direction, file.canonical, file.dev, file.ino, file.size, file.mtime_ns, device, precision,
                    latent_space, levers) < std::tie(o.direction, o.file.canonical, o.file.dev, o.file.ino,
                                                     o.file.size, o.file.mtime_ns, o.device, o.precision,
                                                     o.latent_space, o.levers);
  }
};

struct Slot {
  std::weak_ptr<void> model;
  bool loading = false;  // one thread is loading this key; the others wait on `loaded`
};

struct Cache {
  std::mutex mutex;
  std::condition_variable loaded;
  std::map<CacheKey, Slot> slots;

  // Drops the entries of released encoders. Caller holds `mutex`.
  void prune() {
    for (auto it = slots.begin(); it != slots.end();)
      if (!it->second.loading && it->second.model.expired())
        it = slots.erase(it);
      else
        ++it;
  }
};

// Never destroyed: encoders may be released by static destructors at exit.
Cache& cache() {
  static Cache* c = new Cache();
  return *c;
}


std::shared_ptr<void> load_cached(Direction direction, const std::string& path, const ModelOptions& options) {
  if (path.empty()) throw CheckpointError("no model file given");
  // Before anything opens it: opening a FIFO would block the caller (the
  // element's state change) until someone writes to it.
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode))
    throw CheckpointError("'" + path + "' is not a regular file");
  refuse_pickle(path);

  // Anything that prevents a key (no such file, a bad device request) is
  // left to the uncached load, which reports it as it always has.
  CacheKey key;
  key.direction = direction;
  key.latent_space = options.latent_space;
  if (!identify(path, &key.file)) return load_uncached(direction, path, options);
  try {
    const ComputeTarget target = resolve_target(options);
    key.device = target.device.str();
    key.precision = target.precision;
    key.levers = target.levers;
  } catch (const std::exception&) {
    return load_uncached(direction, path, options);
  }

  Cache& c = cache();
  std::unique_lock<std::mutex> lock(c.mutex);
  c.prune();
  for (;;) {
    Slot& slot = c.slots[key];
    if (auto shared = slot.model.lock()) {
      lock.unlock();
      apply_thread_option(options.threads);  // process-wide; as a fresh load would
      return shared;
    }
    if (!slot.loading) {
      slot.loading = true;
      break;
    }
    c.loaded.wait(lock);  // another thread loads this key: take its result (or retry after its failure)
  }
  lock.unlock();

  std::shared_ptr<void> model;
  try {
    model = load_uncached(direction, path, options);
  } catch (...) {
    lock.lock();
    c.slots.erase(key);
    c.loaded.notify_all();
    throw;
  }
  // A file replaced or rewritten while it was read: what was loaded matches
  // neither identity, so it is handed out but not shared.
  FileIdentity after;
  const bool unchanged = identify(path, &after) && after == key.file;
  lock.lock();
  if (unchanged) {
    Slot& slot = c.slots[key];
    slot.model = model;
    slot.loading = false;
  } else {
    c.slots.erase(key);
  }
  c.loaded.notify_all();
  return model;
}

}  // namespace

const std::vector<const EncoderFamily*>& encoder_families() { return encoder_family_table(); }
const std::vector<const DecoderFamily*>& decoder_families() { return decoder_family_table(); }

std::shared_ptr<Encoder> load_encoder(const std::string& path, const ModelOptions& options) {
  return std::static_pointer_cast<Encoder>(load_cached(Direction::Encode, path, options));
}

std::shared_ptr<Decoder> load_decoder(const std::string& path, const ModelOptions& options) {
  return std::static_pointer_cast<Decoder>(load_cached(Direction::Decode, path, options));
}

size_t cached_encoder_count() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.prune();
  size_t n = 0;
  for (const auto& kv : c.slots)
    if (kv.first.direction == Direction::Encode && !kv.second.model.expired()) ++n;
  return n;
}

}  // namespace gstvae

extern "C" __attribute__((visibility("default"))) size_t gstvae_model_load_count(void) {
  return gstvae::g_model_loads.load();
}

extern "C" __attribute__((visibility("default"))) size_t gstvae_cached_encoder_count(void) {
  return gstvae::cached_encoder_count();
}
