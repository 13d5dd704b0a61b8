// gst-vae-batch: encodes one shard of a manifest of video files into latent
// files, as a well-behaved worker for Slurm job arrays, Kubernetes Indexed
// Jobs or Ray: a deterministic shard per task, idempotent and resumable,
// atomic outputs, one results file per shard that `--summary` merges.
// docs/scale-out.md is the user's guide; this file keeps to the mechanics.
//
// Each item runs `uridecodebin ! videoconvert ! videoscale ! videorate !
// capsfilter ! vaeencode ! latentfilesink` in its own pipeline. The model is
// loaded once per process: an idle vaeencode started at the beginning holds
// it in the plugin's model cache, which every item's vaeencode then shares.
#include <dlfcn.h>
#include <signal.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gst/gst.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "latent_file.h"

namespace {

using nlohmann::json;

std::atomic<int> g_interrupted{0};  // the signal that asked us to stop, or 0

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The machine, not the command line, is at fault (no GPU, unreadable model,
// unwritable out-dir): exit 1, so that a scheduler retries elsewhere rather
// than failing the whole job as for a usage error.
struct RunError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Errors of the output side that are no fault of the item -- a full disk or
// quota, a read-only mount, permissions -- and go away once the environment is
// fixed. An item that meets one is not marked failed (that would be sticky:
// "failed before"); the run stops and the item stays pending for a rerun.
bool is_environment_errno(int e) { return e == ENOSPC || e == EDQUOT || e == EROFS || e == EACCES || e == EPERM; }

// The environment errno whose strerror() text `text` holds, or 0: the
// plugin's elements report errors as text, with the system's message in it
// (same process, same locale, so the text is exact).
int environment_errno_in(const std::string& text) {
  for (int e : {ENOSPC, EDQUOT, EROFS, EACCES, EPERM})
    if (text.find(std::strerror(e)) != std::string::npos) return e;
  return 0;
}

// Another process holds this shard's lock (a resubmitted task while the first
// still runs): this run does nothing, with its own exit status, so that
// neither the scheduler nor the user takes it for a failure of the items or
// of the machine.
struct ShardBusy : std::runtime_error {
  using std::runtime_error::runtime_error;
};
constexpr int kExitShardBusy = 3;

// The string field `key` of a results row, or "" (absent, or not a string).
std::string str(const nlohmann::json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
}

// JSON text of `j`; invalid UTF-8 in file names becomes U+FFFD instead of an exception.
std::string dump(const nlohmann::json& j, int indent = -1) {
  return j.dump(indent, ' ', false, nlohmann::json::error_handler_t::replace);
}

/* ------------------------------------------------------------- options */

struct Options {
  std::string manifest, model, out_dir, summary;
  std::string format = "latent";
  unsigned per_batch = 16;
  std::string device = "auto", precision = "auto", latent_format = "raw";
  int max_side = 0, size_w = 0, size_h = 0;
  std::string fps;  // "" or "N" or "N/D"
  long long max_frames = 0;
  long long shard = -1, shards = 0;  // from --shard I/N
  long long k8s_shards = 0;          // --shards N (with JOB_COMPLETION_INDEX)
  unsigned jobs = 1;
  bool retry_failed = false, dry_run = false;
  int stall_timeout = 60;  // seconds without any progress before an item is given up
};

const char* kUsage =
    "usage: gst-vae-batch --manifest FILE --model M --out-dir DIR [options]\n"
    "       gst-vae-batch --summary DIR\n"
    "options: --format latent|safetensors|npy  --per-batch N  --device auto|cpu|cuda[:N]\n"
    "         --precision auto|fp32|fp16|bf16  --latent-format raw|sd15|sdxl|sd3|flux\n"
    "         --max-side N | --size WxH  --fps F  --max-frames N\n"
    "         --shard I/N | --shards N (with JOB_COMPLETION_INDEX)  --jobs J  --retry-failed  --dry-run\n"
    "         --stall-timeout S (an item with no progress for S seconds fails; default 60)\n"
    "Shard, when --shard is not given: SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT (minus SLURM_ARRAY_TASK_MIN),\n"
    "JOB_COMPLETION_INDEX with --shards N, RANK/WORLD_SIZE, else 0/1. See docs/scale-out.md.\n";

long long parse_int(const std::string& flag, const std::string& v, long long lo, long long hi) {
  char* end = nullptr;
  errno = 0;
  const long long n = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end || errno || n < lo || n > hi)
    throw UsageError(flag + " wants an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], not '" +
                     v + "'");
  return n;
}

bool one_of(const std::string& v, std::initializer_list<const char*> names) {
  for (const char* n : names)
    if (v == n) return true;
  return false;
}

Options parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError(a + " needs a value");
      return argv[++i];
    };
    if (a == "--manifest") o.manifest = value();
    else if (a == "--model") o.model = value();
    else if (a == "--out-dir") o.out_dir = value();
    else if (a == "--summary") o.summary = value();
    else if (a == "--format") o.format = value();
    else if (a == "--per-batch") o.per_batch = static_cast<unsigned>(parse_int(a, value(), 1, 4096));
    else if (a == "--device") o.device = value();
    else if (a == "--precision") o.precision = value();
    else if (a == "--latent-format") o.latent_format = value();
    else if (a == "--max-side") o.max_side = static_cast<int>(parse_int(a, value(), 8, 1 << 16));
    else if (a == "--size") {
      const std::string v = value();
      int w = 0, h = 0;
      char x = 0, extra = 0;
      if (std::sscanf(v.c_str(), "%d%c%d%c", &w, &x, &h, &extra) != 3 || (x != 'x' && x != 'X') || w < 8 || h < 8)
        throw UsageError("--size wants WxH with both at least 8, not '" + v + "'");
      o.size_w = w;
      o.size_h = h;
    } else if (a == "--fps") {
      o.fps = value();
      int n = 0, d = 1;
      char slash = 0, extra = 0;
      const int got = std::sscanf(o.fps.c_str(), "%d%c%d%c", &n, &slash, &d, &extra);
      if (!((got == 1 && n > 0) || (got == 3 && slash == '/' && n > 0 && d > 0)))
        throw UsageError("--fps wants N or N/D, not '" + o.fps + "'");
    } else if (a == "--max-frames") o.max_frames = parse_int(a, value(), 1, 1LL << 40);
    else if (a == "--shard") {
      const std::string v = value();
      const size_t slash = v.find('/');
      if (slash == std::string::npos) throw UsageError("--shard wants I/N, not '" + v + "'");
      o.shards = parse_int("--shard N", v.substr(slash + 1), 1, 1 << 24);
      o.shard = parse_int("--shard I", v.substr(0, slash), 0, o.shards - 1);
    } else if (a == "--shards") o.k8s_shards = parse_int(a, value(), 1, 1 << 24);
    else if (a == "--jobs") o.jobs = static_cast<unsigned>(parse_int(a, value(), 1, 64));
    else if (a == "--retry-failed") o.retry_failed = true;
    else if (a == "--stall-timeout") o.stall_timeout = static_cast<int>(parse_int(a, value(), 1, 86400));
    else if (a == "--dry-run") o.dry_run = true;
    else if (a == "--help" || a == "-h") {
      std::cout << kUsage;
      std::exit(0);
    } else throw UsageError("unknown argument '" + a + "'");
  }
  if (!o.summary.empty()) return o;
  if (o.manifest.empty() || o.model.empty() || o.out_dir.empty())
    throw UsageError("--manifest, --model and --out-dir are required");
  if (!one_of(o.format, {"latent", "safetensors", "npy"})) throw UsageError("--format: latent, safetensors or npy");
  if (!one_of(o.precision, {"auto", "fp32", "fp16", "bf16"})) throw UsageError("--precision: auto, fp32, fp16 or bf16");
  if (!one_of(o.latent_format, {"raw", "sd15", "sdxl", "sd3", "flux"}))
    throw UsageError("--latent-format: raw, sd15, sdxl, sd3 or flux");
  if (o.max_side && o.size_w) throw UsageError("--max-side and --size exclude each other");
  // vaeencode's names; anything else would only fail at the model load, as if the machine were at fault.
  const bool cuda_index = o.device.rfind("cuda:", 0) == 0 && o.device.size() > 5 && o.device.size() <= 8 &&
                          o.device.find_first_not_of("0123456789", 5) == std::string::npos;
  if (!one_of(o.device, {"auto", "cpu", "cuda"}) && !cuda_index)
    throw UsageError("--device: auto, cpu, cuda or cuda:N, not '" + o.device + "'");
  return o;
}

// Which shard this process is: the first of --shard, Slurm, Kubernetes, torchrun-style RANK.
void resolve_shard(Options& o, std::string* source) {
  auto env = [](const char* name) -> const char* {
    const char* v = std::getenv(name);
    return v && *v ? v : nullptr;
  };
  if (o.shard >= 0) {
    *source = "--shard";
    return;
  }
  if (env("SLURM_ARRAY_TASK_ID")) {
    if (!env("SLURM_ARRAY_TASK_COUNT")) throw UsageError("SLURM_ARRAY_TASK_ID is set without SLURM_ARRAY_TASK_COUNT");
    const long long id = parse_int("SLURM_ARRAY_TASK_ID", env("SLURM_ARRAY_TASK_ID"), 0, 1LL << 30);
    const long long min = env("SLURM_ARRAY_TASK_MIN") ? parse_int("SLURM_ARRAY_TASK_MIN", env("SLURM_ARRAY_TASK_MIN"), 0, id) : 0;
    // --array=0-63:2 numbers its tasks 0, 2, 4...
    const long long step =
        env("SLURM_ARRAY_TASK_STEP") ? parse_int("SLURM_ARRAY_TASK_STEP", env("SLURM_ARRAY_TASK_STEP"), 1, 1LL << 30) : 1;
    if ((id - min) % step != 0)
      throw UsageError("SLURM_ARRAY_TASK_ID " + std::to_string(id) + " is not MIN + k * STEP: give --shard I/N");
    o.shards = parse_int("SLURM_ARRAY_TASK_COUNT", env("SLURM_ARRAY_TASK_COUNT"), 1, 1 << 24);
    o.shard = parse_int("(SLURM_ARRAY_TASK_ID - MIN) / STEP", std::to_string((id - min) / step), 0, o.shards - 1);
    *source = "Slurm array";
    return;
  }
  if (env("JOB_COMPLETION_INDEX")) {
    if (!o.k8s_shards) throw UsageError("JOB_COMPLETION_INDEX is set: give the number of shards with --shards N");
    o.shards = o.k8s_shards;
    o.shard = parse_int("JOB_COMPLETION_INDEX", env("JOB_COMPLETION_INDEX"), 0, o.shards - 1);
    *source = "Kubernetes Indexed Job";
    return;
  }
  if (env("RANK") || env("WORLD_SIZE")) {
    if (!env("RANK") || !env("WORLD_SIZE")) throw UsageError("RANK and WORLD_SIZE must be set together");
    o.shards = parse_int("WORLD_SIZE", env("WORLD_SIZE"), 1, 1 << 24);
    o.shard = parse_int("RANK", env("RANK"), 0, o.shards - 1);
    *source = "RANK/WORLD_SIZE";
    return;
  }
  if (o.k8s_shards) throw UsageError("--shards N is for Kubernetes Indexed Jobs: JOB_COMPLETION_INDEX is not set");
  o.shard = 0;
  o.shards = 1;
  *source = "default (one shard)";
}

/* ------------------------------------------------------------ manifest */

uint64_t fnv1a64(const void* data, size_t n, uint64_t h = 14695981039346656037ULL) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ULL;
  return h;
}
uint64_t fnv1a64(const std::string& s) { return fnv1a64(s.data(), s.size()); }

std::string hex16(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

struct Item {
  int line = 0;
  std::string input;   // as written
  std::string uri;     // for uridecodebin
  std::string local;   // local path, when the input is one
  std::string key;
  std::string output;  // final path
  double start = -1, end = -1;
  std::string problem;  // a failed row without encoding (duplicate, collision)
};

// Only scheme://... is a URI: "Interview: Part 1.mp4" is a file name.
bool is_uri(const std::string& s) { return s.find("://") != std::string::npos && gst_uri_is_valid(s.c_str()); }

std::string dir_of(const std::string& path) {
  gchar* d = g_path_get_dirname(path.c_str());
  std::string out = d;
  g_free(d);
  return out;
}

// `path` made absolute against `base_dir` and cleaned up lexically ("." and
// ".." and repeated slashes; symlinks are not resolved: the key is the path as
// the user sees it).
std::string absolute(const std::string& path, const std::string& base_dir) {
  gchar* base = g_canonicalize_filename(base_dir.c_str(), nullptr);
  gchar* full = g_canonicalize_filename(path.c_str(), base);
  std::string out = full;
  g_free(full);
  g_free(base);
  return out;
}

std::string stem_of(const std::string& input) {
  std::string s = input;
  const size_t q = s.find_first_of("?#");
  if (is_uri(s) && q != std::string::npos) s = s.substr(0, q);
  while (!s.empty() && s.back() == '/') s.pop_back();
  const size_t slash = s.rfind('/');
  if (slash != std::string::npos) s = s.substr(slash + 1);
  const size_t dot = s.rfind('.');
  if (dot != std::string::npos && dot > 0) s = s.substr(0, dot);
  // ".clip.mp4" would give a hidden output, which the tool refuses when given
  // and which `ls` and many data loaders skip: drop the leading dots.
  s.erase(0, std::min(s.size(), s.find_first_not_of('.')));
  if (s.empty()) s = "item";
  // The hash keeps names unique; the staging and temporary names add ~60 bytes to a 255-byte limit.
  if (s.size() > 100) s.resize(100);
  for (char& c : s)
    if (c == '/' || static_cast<unsigned char>(c) < 0x20) c = '_';
  return s;
}

std::string number_text(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);  // every digit: 36000.04 is not 36000
  return buf;
}

// Why an "output" of the manifest cannot be used, or "". It must stay inside
// --out-dir, away from the tool's own files, and end with the format's
// extension (readers go by it).
std::string output_problem(const std::string& output, const std::string& format) {
  if (output.empty() || output[0] == '/') return "must be a relative path inside --out-dir";
  std::stringstream ss(output);
  std::string part;
  bool first = true;
  while (std::getline(ss, part, '/')) {
    if (part == "..") return "must stay inside --out-dir (no '..')";
    if (first && part == "_results") return "is in _results/, the tool's own folder";
    if (!part.empty() && part[0] == '.' && part != ".") return "has a hidden name (the tool's staging files are hidden)";
    if (!part.empty() && part != ".") first = false;
  }
  if (output.back() == '/') return "names a folder";
  const std::string ext = "." + format;
  if (output.size() <= ext.size() || g_ascii_strcasecmp(output.c_str() + output.size() - ext.size(), ext.c_str()) != 0)
    return "must end with ." + format + ", the --format";
  return "";
}

std::vector<Item> read_manifest(const Options& o) {
  // A folder opens as a stream that reads nothing: without this check it
  // would be an empty manifest, and the shard would "succeed" with 0 items.
  struct stat mst {};
  if (::stat(o.manifest.c_str(), &mst) == 0 && S_ISDIR(mst.st_mode))
    throw UsageError("the manifest '" + o.manifest + "' is a folder, not a file");
  std::ifstream f(o.manifest);
  if (!f) throw UsageError("cannot read the manifest '" + o.manifest + "': " + std::strerror(errno));
  const std::string base = dir_of(absolute(o.manifest, "."));
  std::vector<Item> items;
  std::map<std::string, int> by_key, by_output;
  std::string text;
  int line = 0;
  while (std::getline(f, text)) {
    ++line;
    if (line == 1 && text.rfind("\xEF\xBB\xBF", 0) == 0) text.erase(0, 3);  // a UTF-8 byte order mark
    if (!text.empty() && text.back() == '\r') text.pop_back();
    // A path cannot hold a NUL byte: the C string would silently end there and name another file.
    if (text.find('\0') != std::string::npos)
      throw UsageError("manifest line " + std::to_string(line) + ": holds a NUL byte");
    const size_t first = text.find_first_not_of(" \t");
    if (first == std::string::npos || text[first] == '#') continue;
    Item it;
    it.line = line;
    std::string output;
    if (text[first] == '{') {
      json j;
      try {
        j = json::parse(text.substr(first));
      } catch (const std::exception& e) {
        throw UsageError("manifest line " + std::to_string(line) + ": not valid JSON: " + e.what());
      }
      if (!j.is_object() || !j.contains("input") || !j["input"].is_string() || j["input"].get<std::string>().empty())
        throw UsageError("manifest line " + std::to_string(line) + ": a JSON line needs a string \"input\"");
      // A misspelt key ("ouptut") would otherwise be ignored, and the item written somewhere else.
      for (const auto& field : j.items())
        if (!one_of(field.key(), {"input", "output", "start", "end"}))
          throw UsageError("manifest line " + std::to_string(line) + ": unknown key \"" + field.key() +
                           "\" (the keys are input, output, start and end)");
      it.input = j["input"].get<std::string>();
      if (it.input.find('\0') != std::string::npos)
        throw UsageError("manifest line " + std::to_string(line) + ": \"input\" holds a NUL byte");
      auto number = [&](const char* name) -> double {
        if (!j.contains(name)) return -1;
        if (!j[name].is_number() || !(j[name].get<double>() >= 0) || j[name].get<double>() > 1e9)
          throw UsageError("manifest line " + std::to_string(line) + ": \"" + name +
                           "\" must be seconds, from 0 to 1e9");
        return j[name].get<double>();
      };
      it.start = number("start");
      it.end = number("end");
      if (it.start >= 0 && it.end >= 0 && it.start >= it.end)
        throw UsageError("manifest line " + std::to_string(line) + ": \"start\" must be before \"end\"");
      if (j.contains("output")) {
        if (!j["output"].is_string()) throw UsageError("manifest line " + std::to_string(line) + ": \"output\" must be a string");
        output = j["output"].get<std::string>();
        if (output.find('\0') != std::string::npos)
          throw UsageError("manifest line " + std::to_string(line) + ": \"output\" holds a NUL byte");
        const std::string problem = output_problem(output, o.format);
        if (!problem.empty())
          throw UsageError("manifest line " + std::to_string(line) + ": \"output\" '" + output + "' " + problem);
      }
    } else {
      it.input = text.substr(first);
      while (!it.input.empty() && (it.input.back() == ' ' || it.input.back() == '\t')) it.input.pop_back();
    }
    if (is_uri(it.input)) {
      it.uri = it.key = it.input;
      if (it.input.rfind("file://", 0) == 0) {
        gchar* local = g_filename_from_uri(it.input.c_str(), nullptr, nullptr);
        if (local) it.local = local;
        g_free(local);
      }
    } else {
      it.local = it.key = absolute(it.input, base);
      gchar* uri = g_filename_to_uri(it.local.c_str(), nullptr, nullptr);
      it.uri = uri ? uri : "";
      g_free(uri);
    }
    if (it.start >= 0 || it.end >= 0)
      it.key += "#t=" + (it.start >= 0 ? number_text(it.start) : "") + "," + (it.end >= 0 ? number_text(it.end) : "");
    // Lexically normal, so that "d.latent" and "./d.latent" are seen to be one file.
    it.output = absolute(o.out_dir + "/" + (output.empty() ? stem_of(it.input) + "-" + hex16(fnv1a64(it.key)) + "." + o.format
                                                           : output),
                         ".");
    if (by_key.count(it.key))
      it.problem = "duplicate of line " + std::to_string(by_key[it.key]);
    else if (by_output.count(it.output))
      it.problem = "output collides with line " + std::to_string(by_output[it.output]);
    else {
      by_key[it.key] = line;
      by_output[it.output] = line;
    }
    items.push_back(it);
  }
  if (f.bad()) throw UsageError("cannot read the manifest '" + o.manifest + "': " + std::strerror(errno));
  return items;
}

/* ---------------------------------------------------------- fingerprint */

// The model's content identity: its size and a hash of every byte.
std::string model_identity(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw UsageError("cannot read the model '" + path + "': " + std::strerror(errno));
  std::vector<char> buf(1 << 20);
  uint64_t h = 14695981039346656037ULL, size = 0;
  while (f) {
    f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const size_t n = static_cast<size_t>(f.gcount());
    h = fnv1a64(buf.data(), n, h);
    size += n;
  }
  return std::to_string(size) + ":" + hex16(h);
}

std::string fingerprint(const Options& o, const std::string& model_id, const Item& it) {
  std::ostringstream s;
  s << "gst-vae-batch/1|" << it.key << "|" << model_id << "|" << o.format << "|" << o.device << "|" << o.precision
    << "|" << o.latent_format << "|max-side=" << o.max_side << "|size=" << o.size_w << "x" << o.size_h
    << "|fps=" << o.fps << "|max-frames=" << o.max_frames << "|start=" << number_text(it.start)
    << "|end=" << number_text(it.end);
  return hex16(fnv1a64(s.str()));
}

/* -------------------------------------------------------------- results */

struct Row {
  std::string status;  // ok, skipped, failed
  // Input frames that reached the encoder (after the range, --fps and
  // --max-frames), the latents written, and the frames of them that made no
  // latent: a video VAE (Wan, TAEHV) encodes groups of 4 frames and drops an
  // incomplete group at the clip's end. -1: not known (written as null).
  long long frames = 0;
  long long latents = 0;
  long long dropped = 0;
  std::vector<long long> shape;
  double seconds = 0;
  std::string error;
  bool environment = false;  // the error is the output side's (is_environment_errno), not the item's
};

json row_json(const Item& it, const Row& r) {
  json j = {{"line", it.line}, {"input", it.input},     {"key", it.key},
            {"output", it.output}, {"status", r.status}};
  j["frames"] = r.frames >= 0 ? json(r.frames) : json(nullptr);
  j["latents"] = r.latents;
  j["dropped_frames"] = r.dropped >= 0 ? json(r.dropped) : json(nullptr);
  j["shape"] = r.shape.empty() ? json(nullptr) : json(r.shape);
  j["seconds"] = std::round(r.seconds * 1000) / 1000;
  j["fps"] = r.seconds > 0 && r.frames > 0 ? std::round(r.frames / r.seconds * 100) / 100 : 0.0;
  if (r.status == "failed") j["error"] = r.error;
  return j;
}

// Writes all of `text` to `fd`; false with errno set on an error.
bool write_all(int fd, const std::string& text) {
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n == 0) errno = EIO;
      return false;
    }
    done += static_cast<size_t>(n);
  }
  return true;
}

// Replaces `path` with `content` through a hidden temporary file; false with
// errno set (and no temporary file left) on an error.
bool write_file_atomically(const std::string& path, const std::string& content) {
  const std::string tmp = dir_of(path) + "/." + path.substr(path.rfind('/') + 1) + ".tmp-" + std::to_string(getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) return false;
  bool ok = write_all(fd, content);
  int saved = errno;
  if (::close(fd) != 0 && ok) {
    ok = false;
    saved = errno;
  }
  if (ok && std::rename(tmp.c_str(), path.c_str()) != 0) {
    ok = false;
    saved = errno;
  }
  if (!ok) {
    ::unlink(tmp.c_str());
    errno = saved;
  }
  return ok;
}

// A shard's results file, written one whole row at a time: a row that cannot
// be written whole (a full disk) is cut off again, so the file never holds
// half a row.
class ResultsFile {
 public:
  explicit ResultsFile(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (fd_ < 0) throw RunError("cannot write '" + path + "': " + std::strerror(errno));
  }
  ~ResultsFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  ResultsFile(const ResultsFile&) = delete;
  ResultsFile& operator=(const ResultsFile&) = delete;

  // Appends `line` and a newline; "" or why not.
  std::string append(const std::string& line) {
    if (write_all(fd_, line + "\n")) {
      size_ += line.size() + 1;
      return "";
    }
    const std::string why = "cannot write the results file '" + path_ + "': " + std::strerror(errno);
    if (::ftruncate(fd_, static_cast<off_t>(size_)) == 0) ::lseek(fd_, static_cast<off_t>(size_), SEEK_SET);
    return why;
  }

 private:
  std::string path_;
  int fd_ = -1;
  size_t size_ = 0;
};

// Whether `it`'s output is there, whole, and made with these settings; fills
// the counts and shape. The input frames of a video model's latents are not in
// a .latent/.safetensors file: frames and dropped stay -1 for the caller to
// take from the row of the run that wrote it.
bool output_is_current(const Options& o, const Item& it, const std::string& fp, Row* row) {
  struct stat st {};
  if (::stat(it.output.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
  try {
    gstvae::LatentArray a = gstvae::read_latent_file(it.output, /*with_values=*/false);
    row->latents = a.frames;
    row->frames = row->dropped = -1;
    if (o.format == "npy") {
      std::ifstream f(it.output + ".json");
      if (!f) return false;
      json j = json::parse(f);
      // The sidecar's "frames" is the latents' count (as it always was).
      if (j.value("batch_fingerprint", "") != fp || j.value("frames", -1LL) != a.frames) return false;
      row->frames = j.value("input_frames", -1LL);
      row->dropped = j.value("dropped_frames", -1LL);
    } else {
      auto found = a.metadata.find("batch_fingerprint");
      if (found == a.metadata.end() || found->second != fp) return false;
      if (!a.metadata.count("temporal_downscale")) {  // an image VAE: one latent per frame
        row->frames = a.frames;
        row->dropped = 0;
      }
    }
    row->shape = {a.channels, a.height, a.width};
    return a.frames > 0;
  } catch (const std::exception&) {
    return false;  // truncated or not a latent file: encode again
  }
}

// A skipped video item's input frame counts, which its file does not hold,
// from the last row about it, when that row describes the same output.
void counts_from_row(const std::string& line, const Item& it, Row* row) {
  const json j = json::parse(line, nullptr, false);
  if (j.is_discarded() || !j.is_object() || str(j, "output") != it.output) return;
  if (!one_of(str(j, "status"), {"ok", "skipped"})) return;
  auto count = [&](const char* key) {
    auto found = j.find(key);
    return found != j.end() && found->is_number_integer() ? found->get<long long>() : -1LL;
  };
  if (count("latents") != row->latents) return;
  row->frames = count("frames");
  row->dropped = count("dropped_frames");
}

/* ----------------------------------------------------------------- items */

struct ItemRun {
  const Options* o = nullptr;
  long long max_frames = 0;
  GstClockTime start = GST_CLOCK_TIME_NONE, end = GST_CLOCK_TIME_NONE;
  std::atomic<long long> passed{0};   // frames into vaeencode (numbered by their buffer offsets)
  std::atomic<long long> decoded{0};  // frames out of the decoder, before the range and the limit
  std::atomic<GstClockTime> decoded_end{0};  // end time of the last decoded frame
  std::atomic<long long> covered{0};  // frames the written latents cover (the largest offset-end)
  std::atomic<int> temporal_downscale{1};  // frames per latent (4 for Wan and TAEHV)
  std::atomic<bool> ended{false};
  GstElement* capsfilter = nullptr;
  GstElement* convert = nullptr;
  GstElement* pipeline = nullptr;
  std::string caps_base;  // video/x-raw,format=RGB[,framerate=F]
  std::atomic<bool> video_linked{false};
  // Last sign of life (a frame in, a latent out), in steady-clock nanoseconds.
  std::atomic<long long> last_progress{0};

  void progressed() {
    last_progress = std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::steady_clock::now().time_since_epoch()).count();
  }
};

// Ends the item with `text` as its error, from any thread.
void fail_item(ItemRun* run, const std::string& text) {
  GError* err = g_error_new_literal(GST_STREAM_ERROR, GST_STREAM_ERROR_FORMAT, text.c_str());
  gst_element_post_message(run->pipeline, gst_message_new_error(GST_OBJECT(run->pipeline), err, nullptr));
  g_error_free(err);
}

// Keeps frames in [start, end) and at most max-frames of them, then ends the stream.
GstPadProbeReturn frame_filter(GstPad* pad, GstPadProbeInfo* info, gpointer data) {
  ItemRun* run = static_cast<ItemRun*>(data);
  run->progressed();
  GstBuffer* buf = GST_PAD_PROBE_INFO_BUFFER(info);
  const GstClockTime pts = GST_BUFFER_PTS(buf);
  if (GST_CLOCK_TIME_IS_VALID(run->start) && GST_CLOCK_TIME_IS_VALID(pts) && pts < run->start)
    return GST_PAD_PROBE_DROP;
  const bool past_end = GST_CLOCK_TIME_IS_VALID(run->end) && GST_CLOCK_TIME_IS_VALID(pts) && pts >= run->end;
  if (past_end || (run->max_frames && run->passed >= run->max_frames)) {
    if (!run->ended.exchange(true)) gst_pad_send_event(pad, gst_event_new_eos());  // same thread: the stream lock is ours
    return GST_PAD_PROBE_DROP;
  }
  // Number the frame: vaeencode gives each latent the offsets of the frames
  // it covers, which tells how many frames made no latent at the clip's end.
  buf = gst_buffer_make_writable(buf);
  GST_BUFFER_OFFSET(buf) = static_cast<guint64>(run->passed.load());
  GST_BUFFER_OFFSET_END(buf) = static_cast<guint64>(run->passed.load()) + 1;
  GST_PAD_PROBE_INFO_DATA(info) = buf;
  ++run->passed;
  return GST_PAD_PROBE_OK;
}

// Counts decoded frames and their end time, for a message naming the cause when no latent comes out.
GstPadProbeReturn count_decoded(GstPad*, GstPadProbeInfo* info, gpointer data) {
  ItemRun* run = static_cast<ItemRun*>(data);
  GstBuffer* buf = GST_PAD_PROBE_INFO_BUFFER(info);
  ++run->decoded;
  if (GST_BUFFER_PTS_IS_VALID(buf)) {
    const GstClockTime end = GST_BUFFER_PTS(buf) + (GST_BUFFER_DURATION_IS_VALID(buf) ? GST_BUFFER_DURATION(buf) : 0);
    if (end > run->decoded_end) run->decoded_end = end;
  }
  return GST_PAD_PROBE_OK;
}

// At latentfilesink: a latent is progress, and its offset-end the frames
// covered so far; the caps say how many frames make a latent.
GstPadProbeReturn watch_latents(GstPad*, GstPadProbeInfo* info, gpointer data) {
  ItemRun* run = static_cast<ItemRun*>(data);
  if (info->type & GST_PAD_PROBE_TYPE_BUFFER) {
    run->progressed();
    GstBuffer* buf = GST_PAD_PROBE_INFO_BUFFER(info);
    const guint64 end = GST_BUFFER_OFFSET_END(buf);
    if (end != GST_BUFFER_OFFSET_NONE && static_cast<long long>(end) > run->covered)
      run->covered = static_cast<long long>(end);
  } else if (GST_EVENT_TYPE(GST_PAD_PROBE_INFO_EVENT(info)) == GST_EVENT_CAPS) {
    GstCaps* caps = nullptr;
    gst_event_parse_caps(GST_PAD_PROBE_INFO_EVENT(info), &caps);
    int n = 1;
    if (caps && gst_caps_get_size(caps) > 0 &&
        gst_structure_get_int(gst_caps_get_structure(caps, 0), "temporal-downscale", &n) && n > 1)
      run->temporal_downscale = n;
  }
  return GST_PAD_PROBE_OK;
}

std::string frames_text(long long n) { return std::to_string(n) + (n == 1 ? " frame" : " frames"); }

std::string seconds_text(double s) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g s", s);
  return buf;
}

// Why an item that ended without an error wrote no latent: the actual cause.
std::string no_latent_reason(const Item& it, const ItemRun& run) {
  if (!run.video_linked) return "no video stream in '" + it.input + "'";
  const long long decoded = run.decoded, passed = run.passed;
  if (decoded == 0) return "the video stream of '" + it.input + "' has no frames";
  if (passed == 0 && (it.start >= 0 || it.end >= 0)) {
    std::string range = it.start >= 0 ? "from start " + seconds_text(it.start) : "from the beginning";
    range += it.end >= 0 ? " to end " + seconds_text(it.end) : " to the end";
    return "no frame in the range " + range + ": the video's " + frames_text(decoded) + " end at " +
           seconds_text(static_cast<double>(run.decoded_end.load()) / GST_SECOND);
  }
  if (passed == 0) return frames_text(decoded) + " decoded, none reached the encoder";
  if (run.temporal_downscale > 1)
    return frames_text(passed) + " decoded, too few for one latent: this video model encodes groups of " +
           std::to_string(run.temporal_downscale.load()) + " frames and drops an incomplete group at the clip's end";
  return frames_text(passed) + " reached the encoder but no latent came out";
}

// Once the input size is known: keep it (no silent rescaling), or with
// --max-side ask videoscale for at most N on the longer (display) side; refuse
// frames too small for a VAE (under 8 pixels) rather than scale them up.
GstPadProbeReturn size_from_caps(GstPad*, GstPadProbeInfo* info, gpointer data) {
  ItemRun* run = static_cast<ItemRun*>(data);
  GstEvent* ev = GST_PAD_PROBE_INFO_EVENT(info);
  if (GST_EVENT_TYPE(ev) != GST_EVENT_CAPS) return GST_PAD_PROBE_OK;
  GstCaps* caps;
  gst_event_parse_caps(ev, &caps);
  const GstStructure* s = gst_caps_get_structure(caps, 0);
  int w = 0, h = 0, par_n = 1, par_d = 1;
  if (!gst_structure_get_int(s, "width", &w) || !gst_structure_get_int(s, "height", &h)) return GST_PAD_PROBE_OK;
  gst_structure_get_fraction(s, "pixel-aspect-ratio", &par_n, &par_d);
  int tw = w, th = h;
  if (run->o->size_w) {
    tw = run->o->size_w;
    th = run->o->size_h;
  } else if (run->o->max_side) {
    const double dw = static_cast<double>(w) * par_n / std::max(par_d, 1), dh = h;
    const double scale = std::min(1.0, run->o->max_side / std::max(dw, dh));
    tw = std::max(1, static_cast<int>(std::lround(dw * scale)));
    th = std::max(1, static_cast<int>(std::lround(dh * scale)));
  }
  if (tw < 8 || th < 8) {
    fail_item(run, "frames too small: " + std::to_string(w) + "x" + std::to_string(h) +
                       (tw != w || th != h ? " (" + std::to_string(tw) + "x" + std::to_string(th) + " after scaling)" : "") +
                       "; a VAE needs at least 8x8");
    return GST_PAD_PROBE_DROP;
  }
  const std::string text = run->caps_base + ",width=" + std::to_string(tw) + ",height=" + std::to_string(th);
  GstCaps* want = gst_caps_from_string(text.c_str());
  g_object_set(run->capsfilter, "caps", want, nullptr);
  gst_caps_unref(want);
  return GST_PAD_PROBE_OK;
}

void on_pad_added(GstElement*, GstPad* pad, gpointer data) {
  ItemRun* run = static_cast<ItemRun*>(data);
  GstCaps* caps = gst_pad_get_current_caps(pad);
  if (!caps) caps = gst_pad_query_caps(pad, nullptr);
  const bool video = caps && gst_caps_get_size(caps) > 0 &&
                     g_str_has_prefix(gst_structure_get_name(gst_caps_get_structure(caps, 0)), "video/");
  if (caps) gst_caps_unref(caps);
  if (!video) return;
  GstPad* sink = gst_element_get_static_pad(run->convert, "sink");
  if (!gst_pad_is_linked(sink) && gst_pad_link(pad, sink) == GST_PAD_LINK_OK) run->video_linked = true;  // the first video stream
  gst_object_unref(sink);
}

std::string error_text(GstMessage* m) {
  GError* err = nullptr;
  gchar* debug = nullptr;
  gst_message_parse_error(m, &err, &debug);
  std::string text = err ? err->message : "unknown error";
  if (debug) {
    std::string d = debug;
    // The last line of the debug text says what was at fault; the source file positions are noise.
    const size_t nl = d.rfind('\n');
    if (nl != std::string::npos) d = d.substr(nl + 1);
    const size_t func = d.find(" (): ");  // "file.c(123): function (): /GstPipeline:..."
    if (func != std::string::npos) d = d.substr(func + 5);
    if (d.size() > 400) d = d.substr(0, 400) + "...";
    text += " (" + d + ")";
  }
  g_clear_error(&err);
  g_free(debug);
  return text;
}

std::string host_name() {
  char buf[256] = {0};
  if (gethostname(buf, sizeof buf - 1) != 0 || !buf[0]) return "host";
  std::string h = buf;
  for (char& c : h)
    if (c == '/' || c == '-') c = '_';
  return h;
}

// Whether a process of this host can still write: it exists and is not a
// zombie. A run killed with its parent (a Ray worker, a container's shell)
// stays a zombie until whatever adopts it reaps it, which can take seconds
// (or forever under a PID 1 that never reaps); kill(pid, 0) succeeds on a
// zombie, so a retry started meanwhile would keep the dead run's files.
bool process_alive(pid_t pid) {
  if (::kill(pid, 0) != 0 && errno == ESRCH) return false;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  // "PID (COMM) STATE ...": COMM may hold spaces and parentheses, the state follows the last ')'.
  const size_t close = text.rfind(')');
  if (close == std::string::npos || close + 2 >= text.size()) return true;  // no /proc: assume it runs
  const char state = text[close + 2];
  return state != 'Z' && state != 'X';
}

// Staging files (and latentfilesink's temporary files beside them) of runs of
// this item on this host whose process is gone: a worker killed mid-item.
void remove_dead_leftovers(const std::string& dir, const std::string& prefix) {
  GDir* d = g_dir_open(dir.c_str(), 0, nullptr);
  if (!d) return;
  std::vector<std::string> dead;
  while (const gchar* name = g_dir_read_name(d)) {
    std::string n = name;
    // ".<base>.inprogress-<host>-<pid>.<ext>" or "..<base>.inprogress-<host>-<pid>.<ext>.partial-XXXXXX"
    const size_t at = n.find(prefix);
    if (at == std::string::npos || at > 1) continue;
    const long long pid = std::atoll(n.c_str() + at + prefix.size());
    if (pid <= 0 || pid == getpid()) continue;
    if (process_alive(static_cast<pid_t>(pid))) continue;
    dead.push_back(dir + "/" + n);
  }
  g_dir_close(d);
  for (const std::string& path : dead) ::unlink(path.c_str());
}

Row encode_item(const Options& o, const Item& it, const std::string& fp) {
  Row row;
  if (!it.local.empty()) {
    struct stat st {};
    if (::stat(it.local.c_str(), &st) != 0) {
      row.status = "failed";
      row.error = "cannot open '" + it.local + "': " + std::strerror(errno);
      return row;
    }
    if (!S_ISREG(st.st_mode)) {
      row.status = "failed";
      row.error = "'" + it.local + "' is " + (S_ISDIR(st.st_mode) ? "a directory" : "not a regular file");
      return row;
    }
  }
  if (it.uri.empty()) {
    row.status = "failed";
    row.error = "cannot make a URI of '" + it.input + "'";
    return row;
  }
  const std::string out_dir = dir_of(it.output);
  if (g_mkdir_with_parents(out_dir.c_str(), 0777) != 0) {
    row.status = "failed";
    row.environment = is_environment_errno(errno);
    row.error = "cannot create '" + out_dir + "': " + std::strerror(errno);
    return row;
  }
  // latentfilesink writes (through its own hidden temporary file) to a hidden
  // staging name; only a complete, verified result is renamed to the output.
  // It names this host and process (so a rerun can tell a dead run's leftovers
  // from a live one's on a shared file system) and ends with the format's
  // extension, which readers go by.
  const std::string base = it.output.substr(it.output.rfind('/') + 1);
  const std::string staging_prefix = "." + base + ".inprogress-" + host_name() + "-";
  const std::string staging = out_dir + "/" + staging_prefix + std::to_string(getpid()) + "." + o.format;
  remove_dead_leftovers(out_dir, staging_prefix);

  ItemRun run;
  run.o = &o;
  run.max_frames = o.max_frames;
  if (it.start >= 0) run.start = static_cast<GstClockTime>(it.start * GST_SECOND);
  if (it.end >= 0) run.end = static_cast<GstClockTime>(it.end * GST_SECOND);
  run.caps_base = "video/x-raw,format=RGB";
  if (o.max_side || o.size_w) run.caps_base += ",pixel-aspect-ratio=1/1";
  if (!o.fps.empty()) run.caps_base += ",framerate=" + (o.fps.find('/') == std::string::npos ? o.fps + "/1" : o.fps);

  GstElement* pipeline = gst_pipeline_new(nullptr);
  GstElement* src = gst_element_factory_make("uridecodebin", nullptr);
  run.convert = gst_element_factory_make("videoconvert", nullptr);
  GstElement* scale = gst_element_factory_make("videoscale", nullptr);
  GstElement* rate = gst_element_factory_make("videorate", nullptr);
  run.capsfilter = gst_element_factory_make("capsfilter", nullptr);
  GstElement* enc = gst_element_factory_make("vaeencode", nullptr);
  GstElement* sink = gst_element_factory_make("latentfilesink", nullptr);
  if (!src || !run.convert || !scale || !rate || !run.capsfilter || !enc || !sink) {
    for (GstElement* e : {src, run.convert, scale, rate, run.capsfilter, enc, sink})
      if (e) gst_object_unref(e);
    gst_object_unref(pipeline);
    row.status = "failed";
    row.error = "a GStreamer element is missing (uridecodebin, videoconvert, videoscale, videorate, vaeencode, "
                "latentfilesink): check GST_PLUGIN_PATH and the installed plugins";
    return row;
  }
  g_object_set(src, "uri", it.uri.c_str(), nullptr);
  std::string caps_text = run.caps_base;
  if (o.size_w) caps_text += ",width=" + std::to_string(o.size_w) + ",height=" + std::to_string(o.size_h);
  GstCaps* caps = gst_caps_from_string(caps_text.c_str());
  g_object_set(run.capsfilter, "caps", caps, nullptr);
  gst_caps_unref(caps);
  gst_util_set_object_arg(G_OBJECT(enc), "precision", o.precision.c_str());
  gst_util_set_object_arg(G_OBJECT(enc), "latent-format", o.latent_format.c_str());
  g_object_set(enc, "model", o.model.c_str(), "device", o.device.c_str(), "per-batch", o.per_batch, nullptr);
  gst_util_set_object_arg(G_OBJECT(sink), "format", o.format.c_str());
  // Metadata is JSON, so UTF-8: a file name in another encoding is recorded with U+FFFD (the fingerprint is exact).
  gchar* key_text = g_utf8_make_valid(it.key.c_str(), -1);
  GstStructure* meta = gst_structure_new("metadata", "batch_key", G_TYPE_STRING, key_text, "batch_fingerprint",
                                         G_TYPE_STRING, fp.c_str(), nullptr);
  g_free(key_text);
  // latentfilesink reads %d in a location as a segment number: a literal % is %%.
  std::string location;
  for (char ch : staging) location += ch == '%' ? std::string("%%") : std::string(1, ch);
  g_object_set(sink, "location", location.c_str(), "metadata", meta, nullptr);
  gst_structure_free(meta);
  // videorate only when asked for: it would repeat the last frame at the end of a range.
  gst_bin_add_many(GST_BIN(pipeline), src, run.convert, scale, run.capsfilter, enc, sink, nullptr);
  if (o.fps.empty()) {
    gst_object_unref(rate);
    gst_element_link_many(run.convert, scale, run.capsfilter, enc, sink, nullptr);
  } else {
    gst_bin_add(GST_BIN(pipeline), rate);
    gst_element_link_many(run.convert, scale, rate, run.capsfilter, enc, sink, nullptr);
  }
  g_signal_connect(src, "pad-added", G_CALLBACK(on_pad_added), &run);
  GstPad* convert_sink = gst_element_get_static_pad(run.convert, "sink");
  gst_pad_add_probe(convert_sink, GST_PAD_PROBE_TYPE_EVENT_DOWNSTREAM, size_from_caps, &run, nullptr);
  gst_pad_add_probe(convert_sink, GST_PAD_PROBE_TYPE_BUFFER, count_decoded, &run, nullptr);
  gst_object_unref(convert_sink);
  // The range and the frame limit apply to the frames vaeencode would get (after videorate).
  GstPad* enc_sink = gst_element_get_static_pad(enc, "sink");
  gst_pad_add_probe(enc_sink, GST_PAD_PROBE_TYPE_BUFFER, frame_filter, &run, nullptr);
  gst_object_unref(enc_sink);
  GstPad* sink_pad = gst_element_get_static_pad(sink, "sink");
  gst_pad_add_probe(sink_pad, static_cast<GstPadProbeType>(GST_PAD_PROBE_TYPE_BUFFER | GST_PAD_PROBE_TYPE_EVENT_DOWNSTREAM),
                    watch_latents, &run, nullptr);
  gst_object_unref(sink_pad);
  run.pipeline = pipeline;
  run.progressed();

  const auto t0 = std::chrono::steady_clock::now();
  GstBus* bus = gst_element_get_bus(pipeline);
  std::string error;
  bool environment = false;  // the error is the output side's, not the item's
  bool eos = false;
  if (gst_element_set_state(pipeline, GST_STATE_PLAYING) == GST_STATE_CHANGE_FAILURE) error = "could not start";
  while (!eos) {
    GstMessage* m = gst_bus_timed_pop_filtered(
        bus, 100 * GST_MSECOND,
        static_cast<GstMessageType>(GST_MESSAGE_ERROR | GST_MESSAGE_EOS | GST_MESSAGE_ELEMENT));
    if (g_interrupted) {
      if (m) gst_message_unref(m);
      error = "interrupted";
      break;
    }
    if (!m) {
      // A stall: no frame in, no latent out and nothing being encoded for a
      // while. Some broken files make a demuxer stop without an error that
      // reaches this bus (decodebin keeps it); the item must not hold a
      // cluster task until its time limit.
      guint64 in_flight = 0;
      g_object_get(enc, "frames-in-flight", &in_flight, nullptr);
      if (in_flight) run.progressed();
      const long long now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                std::chrono::steady_clock::now().time_since_epoch()).count();
      if (now - run.last_progress > static_cast<long long>(o.stall_timeout) * 1000000000LL) {
        error = "no progress for " + std::to_string(o.stall_timeout) +
                " s (a corrupt or truncated file, or a stalled source)";
        break;
      }
      continue;
    }
    if (GST_MESSAGE_TYPE(m) == GST_MESSAGE_ERROR) {
      error = error_text(m);
      // Only latentfilesink writes: a source's "Permission denied" is the input's.
      environment = GST_MESSAGE_SRC(m) == GST_OBJECT(sink) && environment_errno_in(error) != 0;
      if (!run.video_linked && error.find("not-linked") != std::string::npos)
        error = "no video stream in '" + it.input + "'";
      gst_message_unref(m);
      break;
    }
    if (GST_MESSAGE_TYPE(m) == GST_MESSAGE_ELEMENT) {
      // uridecodebin found no video: it says so only as "no-more-pads" with nothing linked.
      gst_message_unref(m);
      continue;
    }
    eos = true;
    gst_message_unref(m);
  }
  gst_element_set_state(pipeline, GST_STATE_NULL);
  gst_object_unref(bus);
  gst_object_unref(pipeline);
  row.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  if (error.empty()) {
    struct stat st {};
    if (::stat(staging.c_str(), &st) != 0) error = no_latent_reason(it, run);
  }
  if (error.empty()) {
    try {
      gstvae::LatentArray a = gstvae::read_latent_file(staging, /*with_values=*/false);
      row.latents = a.frames;
      row.frames = run.passed;
      row.dropped = std::max(0LL, run.passed - std::min(run.covered.load(), run.passed.load()));
      row.shape = {a.channels, a.height, a.width};
      if (a.frames == 0) error = no_latent_reason(it, run);
    } catch (const std::exception& e) {
      error = std::string("the written file does not read back: ") + e.what();
    }
  }
  // .npy: the old sidecar goes first, the new one comes after the rename, so
  // that a crash in between leaves an output a rerun encodes again.
  if (error.empty() && o.format == "npy") ::unlink((it.output + ".json").c_str());
  if (error.empty() && std::rename(staging.c_str(), it.output.c_str()) != 0) {
    environment = is_environment_errno(errno);
    error = "cannot rename '" + staging + "' to '" + it.output + "': " + std::strerror(errno);
  }
  if (error.empty() && o.format == "npy") {
    const json side = {{"batch_key", it.key}, {"batch_fingerprint", fp}, {"frames", row.latents},
                       {"input_frames", row.frames}, {"dropped_frames", row.dropped}};
    if (!write_file_atomically(it.output + ".json", dump(side) + "\n")) {
      environment = is_environment_errno(errno);
      error = "cannot write '" + it.output + ".json': " + std::strerror(errno);
    }
  }
  if (!error.empty()) {
    ::unlink(staging.c_str());
    row.status = "failed";
    row.error = error;
    row.environment = environment;
    row.frames = row.latents = row.dropped = 0;
    row.shape.clear();
    return row;
  }
  row.status = "ok";
  return row;
}

/* --------------------------------------------------------------- summary */

int summarize(const std::string& dir) {
  const std::string results = dir + "/_results";
  GDir* d = g_dir_open(results.c_str(), 0, nullptr);
  if (!d) throw UsageError("no results folder '" + results + "'");
  long long shards = -1;
  std::set<long long> present, succeeded;
  long long items = 0, ok = 0, skipped = 0, failed = 0, frames = 0, latents = 0;
  bool mixed = false;
  std::vector<json> failures;
  // Lines of results files that are not rows this tool writes (garbage, a
  // file cut short, rows of two runs spliced): the data set cannot be called
  // complete from them, so each is named and the summary fails.
  std::vector<json> unreadable;
  auto unreadable_line = [&](const std::string& path, long long line, const std::string& why) {
    std::cerr << "gst-vae-batch: " << path << " line " << line << ": " << why << "\n";
    unreadable.push_back({{"file", path}, {"line", line}, {"error", why}});
  };
  while (const gchar* name = g_dir_read_name(d)) {
    long long i = 0, n = 0;
    char tail[32] = {0};
    if (std::sscanf(name, "shard-%lld-of-%lld.%31s", &i, &n, tail) != 3 || n < 1 || i < 0 || i >= n) continue;
    // Exactly the names this tool writes: "shard-00-of-1.jsonl" (a copy) is not shard 0 again.
    const std::string canonical = "shard-" + std::to_string(i) + "-of-" + std::to_string(n) + "." + tail;
    if (canonical != name) continue;
    if (std::string(tail) != "_SUCCESS" && std::string(tail) != "jsonl") continue;
    if (shards >= 0 && n != shards) mixed = true;
    shards = n;
    if (std::string(tail) == "_SUCCESS") {
      succeeded.insert(i);
      continue;
    }
    present.insert(i);
    const std::string path = results + "/" + name;
    std::ifstream f(path, std::ios::binary);
    if (!f) {
      unreadable_line(path, 0, std::string("cannot read it: ") + std::strerror(errno));
      continue;
    }
    std::string line;
    long long number = 0;
    while (std::getline(f, line)) {
      ++number;
      // The tool ends every row with a newline: a last line without one was cut off.
      if (f.eof()) {
        unreadable_line(path, number, "cut short (no newline at its end)");
        break;
      }
      if (line.empty()) continue;
      json j = json::parse(line, nullptr, false);
      if (j.is_discarded()) {
        unreadable_line(path, number, "not valid JSON (a corrupt or spliced results file)");
        continue;
      }
      if (!j.is_object() || !one_of(str(j, "status"), {"ok", "skipped", "failed"})) {
        unreadable_line(path, number, "not a results row (no \"status\" ok, skipped or failed)");
        continue;
      }
      ++items;
      const std::string st = str(j, "status");
      if (st == "ok") ++ok;
      else if (st == "skipped") ++skipped;
      else {
        ++failed;
        failures.push_back({{"input", str(j, "input")}, {"error", str(j, "error")}});
      }
      if (j.contains("frames") && j["frames"].is_number_integer()) frames += j["frames"].get<long long>();
      if (j.contains("latents") && j["latents"].is_number_integer()) latents += j["latents"].get<long long>();
    }
  }
  g_dir_close(d);
  std::vector<long long> missing, unsuccessful;
  for (long long i = 0; i < std::max(shards, 0LL); ++i) {
    if (!present.count(i)) missing.push_back(i);
    if (!succeeded.count(i)) unsuccessful.push_back(i);
  }
  json s = {{"shards", shards < 0 ? 0 : shards}, {"items", items},     {"ok", ok},
            {"skipped", skipped},                {"failed", failed},   {"frames", frames},
            {"latents", latents},
            {"missing_shards", missing},         {"shards_without_success", unsuccessful},
            {"failures", failures},              {"mixed_shard_counts", mixed},
            {"unreadable_results", unreadable}};
  std::cout << dump(s) << std::endl;
  write_file_atomically(results + "/summary.json", dump(s, 2) + "\n");
  return (shards > 0 && missing.empty() && unsuccessful.empty() && failed == 0 && !mixed && unreadable.empty()) ? 0
                                                                                                             : 1;
}

/* ------------------------------------------------------------------ main */

// The plugin's count of models actually read from disk (its cache's misses).
long long plugin_model_loads() {
  GstPlugin* plugin = gst_registry_find_plugin(gst_registry_get(), "vae");
  if (!plugin) return -1;
  const gchar* file = gst_plugin_get_filename(plugin);
  std::string path = file ? file : "";
  gst_object_unref(plugin);
  void* module = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (!module) return -1;
  auto f = reinterpret_cast<size_t (*)(void)>(dlsym(module, "gstvae_model_load_count"));
  const long long n = f ? static_cast<long long>(f()) : -1;
  dlclose(module);
  return n;
}

void on_signal(int sig) { g_interrupted = sig; }

// One runner per shard: an exclusive flock on DIR/_results/shard-I-of-N.lock,
// held for the life of the process. The kernel releases it when the process
// ends, however it ends (SIGKILL, a lost node's NFS lease), so a stale lock
// never blocks a rerun. The file holds the holder's pid, host and start time
// for the message of a run that finds it taken. Returns the descriptor (kept
// open on purpose), or -1 where the file system cannot lock.
int lock_shard(const std::string& path, const std::string& tag) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
  if (fd < 0) throw RunError("cannot open the lock file '" + path + "': " + std::strerror(errno));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int why = errno;
    if (why == EWOULDBLOCK) {
      char buf[512] = {0};
      const ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
      std::string holder = n > 0 ? std::string(buf, static_cast<size_t>(n)) : "";
      while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
      ::close(fd);
      throw ShardBusy(tag + " is already being run by another process (" +
                      (holder.empty() ? std::string("it has not said which yet") : holder) +
                      "), which holds the lock '" + path +
                      "'; this run did nothing. Wait for that run to end (or stop it) and run again.");
    }
    // Some shared file systems cannot lock (Lustre without -o flock, NFS without a lock manager):
    // run unguarded rather than not at all, and say so.
    ::close(fd);
    std::cerr << "gst-vae-batch: warning: cannot lock '" << path << "' (" << std::strerror(why)
              << "): nothing keeps a second run of " << tag << " from running at the same time\n";
    return -1;
  }
  char since[64] = {0};
  const std::time_t now = std::time(nullptr);
  std::tm utc {};
  gmtime_r(&now, &utc);
  std::strftime(since, sizeof since, "%Y-%m-%dT%H:%M:%SZ", &utc);
  char host[256] = {0};
  if (gethostname(host, sizeof host - 1) != 0) std::strcpy(host, "?");
  const std::string holder = "pid " + std::to_string(getpid()) + " on host " + host + ", since " + since + "\n";
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, holder.data(), holder.size(), 0) < 0) {
    // Only the message of a second run loses its detail: the lock itself holds.
  }
  return fd;
}

int run(Options& o) {
  std::string shard_source;
  resolve_shard(o, &shard_source);
  std::vector<Item> all = read_manifest(o);
  std::vector<Item> mine;
  for (const Item& it : all)
    if (static_cast<long long>(fnv1a64(it.key) % static_cast<uint64_t>(o.shards)) == o.shard) mine.push_back(it);

  const std::string results_dir = o.out_dir + "/_results";
  const std::string tag = "shard-" + std::to_string(o.shard) + "-of-" + std::to_string(o.shards);
  const std::string results_path = results_dir + "/" + tag + ".jsonl";
  const std::string success_path = results_dir + "/" + tag + "._SUCCESS";

  // What the last run of this shard said about each item (for --retry-failed).
  std::map<std::string, std::string> failed_before;
  std::map<std::string, std::string> previous_rows;  // key -> its row, kept for items this run does not reach
  {
    std::ifstream prev(results_path);
    std::string line;
    while (std::getline(prev, line)) {
      json j = json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.is_object() || !j.contains("key") || !j["key"].is_string()) continue;
      previous_rows[j["key"].get<std::string>()] = line;
      std::string error = str(j, "error");
      // Rows about a manifest line (a duplicate, a collision) say nothing of the item itself.
      // An interrupted item was not at fault: the next run resumes it.
      if (error.rfind("duplicate of line", 0) == 0 || error.rfind("output collides with line", 0) == 0 ||
          error == "interrupted")
        continue;
      const std::string again = "failed before: ", hint = " (use --retry-failed)";
      if (error.rfind(again, 0) == 0) error = error.substr(again.size());
      if (error.size() >= hint.size() && error.compare(error.size() - hint.size(), hint.size(), hint) == 0)
        error.resize(error.size() - hint.size());
      if (str(j, "status") == "failed") failed_before[str(j, "key")] = error;
      else failed_before.erase(str(j, "key"));
    }
  }

  struct stat mst {};
  if (::stat(o.model.c_str(), &mst) != 0 || !S_ISREG(mst.st_mode))
    throw UsageError("the model '" + o.model + "' is not a readable file");
  const std::string model_id = model_identity(o.model);

  std::vector<std::string> fps;
  for (const Item& it : mine) fps.push_back(fingerprint(o, model_id, it));

  if (o.dry_run) {
    for (size_t i = 0; i < mine.size(); ++i) {
      const Item& it = mine[i];
      Row probe;
      std::string action = "encode";
      if (!it.problem.empty()) action = "failed";
      else if (output_is_current(o, it, fps[i], &probe)) action = "skip";
      else if (failed_before.count(it.key) && !o.retry_failed) action = "failed-before";
      std::cout << json({{"line", it.line}, {"input", it.input}, {"key", it.key}, {"output", it.output},
                         {"action", action}}).dump(-1, ' ', false, json::error_handler_t::replace)
                << "\n";
    }
    std::cerr << "gst-vae-batch: dry run of " << tag << " (" << shard_source << "): " << mine.size() << " of "
              << all.size() << " items\n";
    return 0;
  }

  // Before anything is loaded or written: a second run of a shard that is
  // running would redo its work and splice its rows into the same results.
  if (g_mkdir_with_parents(results_dir.c_str(), 0777) != 0)
    throw RunError("cannot create '" + results_dir + "': " + std::strerror(errno));
  const int shard_lock = lock_shard(results_dir + "/" + tag + ".lock", tag);
  (void)shard_lock;  // open until the process ends: that is the lock

  // Load the model once: this idle element holds it in the plugin's cache for every item.
  GstElement* anchor = gst_element_factory_make("vaeencode", nullptr);
  if (!anchor) throw UsageError("the vaeencode element is missing: set GST_PLUGIN_PATH to the plugin's folder");
  gst_util_set_object_arg(G_OBJECT(anchor), "precision", o.precision.c_str());
  g_object_set(anchor, "model", o.model.c_str(), "device", o.device.c_str(), nullptr);
  GstBus* anchor_bus = gst_bus_new();
  gst_element_set_bus(anchor, anchor_bus);
  if (gst_element_set_state(anchor, GST_STATE_PAUSED) == GST_STATE_CHANGE_FAILURE) {
    GstMessage* m = gst_bus_pop_filtered(anchor_bus, GST_MESSAGE_ERROR);
    const std::string why = m ? error_text(m) : "unknown error";
    if (m) gst_message_unref(m);
    gst_element_set_state(anchor, GST_STATE_NULL);
    gst_object_unref(anchor);
    gst_object_unref(anchor_bus);
    throw RunError("cannot load the model '" + o.model + "': " + why);
  }
  // The last results are replaced only once this run can work: a run that
  // fails before (no GPU, a bad model) leaves them as they were.
  ::unlink(success_path.c_str());
  ResultsFile results(results_path);

  const bool tty = isatty(STDERR_FILENO);
  std::cerr << "gst-vae-batch: " << tag << " (" << shard_source << "): " << mine.size() << " of " << all.size()
            << " items, " << o.jobs << " at a time\n";
  std::mutex mutex;  // results, counters, progress
  size_t next = 0, done = 0, failures = 0;
  // Why the run stopped early for a fault of the environment (a full disk, a
  // read-only out-dir), or "": items not done then stay pending.
  std::string stopped;
  std::set<std::string> reported;  // keys with a row from this run
  long long frames_done = 0;
  double encode_seconds = 0;
  const auto t0 = std::chrono::steady_clock::now();

  auto report = [&](const Item& it, const Row& r) {
    std::lock_guard<std::mutex> lock(mutex);
    if (r.environment) {
      // Not the item's fault: no row (it stays pending), and no point in trying the next items.
      if (stopped.empty()) stopped = it.input + ": " + r.error;
      std::fprintf(stderr, "gst-vae-batch: stopping at %s: %s\n", it.input.c_str(), r.error.c_str());
      return;
    }
    const std::string not_written = results.append(dump(row_json(it, r)));
    if (!not_written.empty()) {
      if (stopped.empty()) stopped = not_written;
      std::fprintf(stderr, "gst-vae-batch: stopping: %s\n", not_written.c_str());
      return;
    }
    reported.insert(it.key);
    ++done;
    if (r.status == "failed") ++failures;
    if (r.status == "ok") {
      frames_done += r.frames;
      encode_seconds += r.seconds;
    }
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double fps = elapsed > 0 ? frames_done / elapsed : 0;
    const double eta = done ? elapsed / done * (mine.size() - done) : 0;
    if (tty) {
      std::fprintf(stderr, "\r[%zu/%zu items] %.1f frames/s, ETA %d:%02d   ", done, mine.size(), fps,
                   static_cast<int>(eta) / 60, static_cast<int>(eta) % 60);
      if (done == mine.size()) std::fprintf(stderr, "\n");
    } else {
      // A video model's latents are not its frames: both, and what was dropped.
      const std::string latents = r.latents == r.frames && r.dropped <= 0
                                      ? ""
                                      : " (" + std::to_string(r.latents) + " latents, " +
                                            (r.dropped >= 0 ? std::to_string(r.dropped) : "?") + " dropped)";
      std::fprintf(stderr, "gst-vae-batch: [%zu/%zu] %s %s: %lld frames%s in %.2f s%s%s\n", done, mine.size(),
                   r.status.c_str(), it.input.c_str(), std::max(r.frames, 0LL), latents.c_str(), r.seconds,
                   r.error.empty() ? "" : ": ", r.error.c_str());
    }
  };

  auto worker = [&]() {
    for (;;) {
      size_t i;
      {
        std::lock_guard<std::mutex> lock(mutex);
        if (next >= mine.size() || g_interrupted || !stopped.empty()) return;
        i = next++;
      }
      const Item& it = mine[i];
      Row r;
      try {
        if (!it.problem.empty()) {
          r.status = "failed";
          r.error = it.problem;
        } else if (output_is_current(o, it, fps[i], &r)) {
          r.status = "skipped";
          if (r.frames < 0 && previous_rows.count(it.key)) counts_from_row(previous_rows[it.key], it, &r);
        } else if (failed_before.count(it.key) && !o.retry_failed) {
          r.status = "failed";
          r.error = "failed before: " + failed_before[it.key] + " (use --retry-failed)";
        } else {
          r = encode_item(o, it, fps[i]);
        }
      } catch (const std::exception& e) {  // one item's fault never ends the shard
        r = Row();
        r.status = "failed";
        r.error = e.what();
      }
      report(it, r);
    }
  };
  std::vector<std::thread> threads;
  for (unsigned j = 0; j < std::min<size_t>(o.jobs, std::max<size_t>(mine.size(), 1)); ++j) threads.emplace_back(worker);
  for (auto& t : threads) t.join();
  {
    // Items an interruption or a stop kept this run from doing keep their
    // last rows (a "failed before" stays known).
    for (const Item& it : mine)
      if (!reported.count(it.key) && previous_rows.count(it.key)) {
        const std::string not_written = results.append(previous_rows[it.key]);
        if (!not_written.empty() && stopped.empty()) stopped = not_written;
      }
  }

  const long long loads = plugin_model_loads();
  gst_element_set_state(anchor, GST_STATE_NULL);
  gst_element_set_bus(anchor, nullptr);
  gst_object_unref(anchor_bus);
  gst_object_unref(anchor);

  const bool interrupted = g_interrupted != 0;
  if (!interrupted && stopped.empty() && failures == 0 && !write_file_atomically(success_path, ""))
    stopped = "cannot write '" + success_path + "': " + std::strerror(errno);
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "gst-vae-batch: %s: %zu items, %zu failed, %lld frames in %.1f s (%.1f frames/s)%s\n",
               tag.c_str(), done, failures, frames_done, elapsed, elapsed > 0 ? frames_done / elapsed : 0.0,
               interrupted ? ", interrupted" : "");
  if (!stopped.empty())
    std::fprintf(stderr,
                 "gst-vae-batch: %s stopped: %s. That is a fault of the output side, not of the items: "
                 "those not done stay pending, and a rerun once it is fixed does them\n",
                 tag.c_str(), stopped.c_str());
  std::fprintf(stderr, "gst-vae-batch: model loads: %lld\n", loads);
  return (failures || interrupted || !stopped.empty()) ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  gst_init(nullptr, nullptr);
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  try {
    Options o = parse_args(argc, argv);
    if (!o.summary.empty()) return summarize(o.summary);
    return run(o);
  } catch (const UsageError& e) {
    std::cerr << "gst-vae-batch: " << e.what() << "\n" << kUsage;
    return 2;
  } catch (const RunError& e) {
    std::cerr << "gst-vae-batch: " << e.what() << "\n";
    return 1;
  } catch (const ShardBusy& e) {
    std::cerr << "gst-vae-batch: " << e.what() << "\n";
    return kExitShardBusy;
  } catch (const std::exception& e) {
    std::cerr << "gst-vae-batch: " << e.what() << "\n";
    return 1;
  }
}
