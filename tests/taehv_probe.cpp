// taehv-probe: runs temporal encode sessions for tests/python/crosscheck_taehv.py.
// Reads cases from stdin, one per line:
//   MODEL PRECISION FRAMES_RGB N WIDTH HEIGHT PLAN END OUT
// FRAMES_RGB holds N packed RGB frames; PLAN is the batch sizes, e.g. "1,3"
// (repeated until the frames run out); END is "drop", "pad" or "open" (no
// end_of_clip); OUT receives the float32 latents. Prints one JSON line per
// case: latents, spans, dropped, padded, held frames, or the error.
// Until gst-vae-encode-file encodes through sessions, this is how Python
// reaches the engine's sessions.
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "encoder.h"
#include "errors.h"

using namespace gstvae;

namespace {

std::string run_case(const std::string& line, std::map<std::string, std::shared_ptr<Encoder>>& models) {
  std::istringstream in(line);
  std::string model, precision, frames_path, plan_text, end, out_path;
  size_t n = 0;
  int width = 0, height = 0;
  if (!(in >> model >> precision >> frames_path >> n >> width >> height >> plan_text >> end >> out_path))
    throw VaeError("bad case line: " + line);
  std::vector<size_t> plan;
  std::istringstream ps(plan_text);
  for (std::string item; std::getline(ps, item, ',');) plan.push_back(std::stoul(item));
  if (plan.empty()) throw VaeError("empty plan");

  const std::string key = model + "|" + precision;
  if (!models.count(key)) {
    ModelOptions options;
    options.device = "cpu";
    options.precision = precision_by_name(precision);
    models[key] = load_encoder(model, options);
  }
  auto encoder = models[key];
  const size_t frame_bytes = static_cast<size_t>(width) * height * 3;
  std::vector<uint8_t> pixels(n * frame_bytes);
  std::ifstream f(frames_path, std::ios::binary);
  f.read(reinterpret_cast<char*>(pixels.data()), static_cast<std::streamsize>(pixels.size()));
  if (static_cast<size_t>(f.gcount()) != pixels.size()) throw VaeError("short frames file " + frames_path);

  auto session = encoder->open_session();
  std::vector<float> latents;
  std::ostringstream spans;
  std::ostringstream json;
  Span dropped{0, 0};
  uint32_t padded = 0;
  size_t count = 0;
  size_t next = 0, step = 0;
  bool ended = false;
  while (!ended) {
    const size_t size = std::min(plan[step++ % plan.size()], n - next);
    auto batch = encoder->new_batch(PixelFormat::RGB, width, height, std::max<size_t>(size, 1));
    for (size_t i = 0; i < size; ++i, ++next)
      batch->add(pixels.data() + next * frame_bytes, static_cast<size_t>(width) * 3, next);
    EncodeParams params;
    params.end_of_clip = next == n && end != "open";
    params.pad_clip_end = end == "pad";
    ended = next == n;
    auto block = encoder->new_latents(*batch);
    BatchResult r = session->encode(*batch, params, *block);
    const size_t per = encoder->latent_floats_per_frame(*batch);
    latents.insert(latents.end(), block->data(), block->data() + r.spans.size() * per);
    for (const Span& s : r.spans) spans << (count++ ? "," : "") << "[" << s.first << "," << s.count << "]";
    if (r.dropped.count) dropped = r.dropped;
    padded += r.padded_frames;
  }
  std::ofstream out(out_path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(latents.data()), static_cast<std::streamsize>(latents.size() * 4));
  json << "{\"latents\":" << count << ",\"spans\":[" << spans.str() << "],\"dropped\":[" << dropped.first << ","
       << dropped.count << "],\"padded\":" << padded << ",\"held\":" << session->held_frames()
       << ",\"family\":\"" << encoder->info().family << "\",\"temporal\":" << encoder->info().temporal_downscale
       << "}";
  return json.str();
}

}  // namespace

int main() {
  std::map<std::string, std::shared_ptr<Encoder>> models;
  for (std::string line; std::getline(std::cin, line);) {
    if (line.empty()) continue;
    try {
      std::cout << run_case(line, models) << std::endl;
    } catch (const std::exception& e) {
      std::string msg = e.what();
      for (char& c : msg)
        if (c == '"' || c == '\\' || c == '\n') c = '\'';
      std::cout << "{\"error\":\"" << msg << "\"}" << std::endl;
    }
  }
  return 0;
}
