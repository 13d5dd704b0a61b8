#include "tensor_usage.h"

#include <cstddef>

#include "errors.h"

namespace gstvae {

namespace {

// Tensors listed by name in the error; the rest are counted.
constexpr size_t kListedUnused = 8;

std::string shortened(const std::string& name) { return name.size() > 200 ? name.substr(0, 200) + "..." : name; }

}  // namespace

bool matches_pattern(const std::string& pattern, const std::string& name) {
  // The usual two-cursor wildcard match: on a mismatch, retry from the last
  // '*' with one more character swallowed by it.
  size_t p = 0, n = 0;
  size_t star = std::string::npos, star_n = 0;
  while (n < name.size()) {
    if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      star_n = n;
    } else if (p < pattern.size() && pattern[p] == name[n]) {
      ++p;
      ++n;
    } else if (star != std::string::npos) {
      p = star + 1;
      n = ++star_n;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

std::vector<std::string> unused_tensors(const SafetensorsFile& file, const TensorClaim& claim,
                                        const std::set<std::string>& used) {
  std::vector<std::string> unused;
  for (const auto& kv : file.tensors()) {
    const std::string& name = kv.first;
    if (name.compare(0, claim.prefix.size(), claim.prefix) != 0 || used.count(name)) continue;
    const std::string local = name.substr(claim.prefix.size());
    bool deliberate = false;
    for (const std::string& pattern : claim.deliberately_unused)
      if (matches_pattern(pattern, local)) deliberate = true;
    if (!deliberate) unused.push_back(name);
  }
  return unused;
}

void require_every_tensor_used(const SafetensorsFile& file, const TensorClaim& claim,
                               const std::set<std::string>& used) {
  const std::vector<std::string> unused = unused_tensors(file, claim, used);
  if (unused.empty()) return;
  std::string list;
  for (size_t i = 0; i < unused.size() && i < kListedUnused; ++i)
    list += (i ? ", '" : "'") + shortened(unused[i]) + "'";
  if (unused.size() > kListedUnused) list += " and " + std::to_string(unused.size() - kListedUnused) + " more";
  throw CheckpointError("'" + file.path() + "' was taken for a " + claim.taken_for + ", but " +
                        std::to_string(unused.size()) + (unused.size() == 1 ? " of its tensors is" : " of its tensors are") +
                        " not used by it: " + list +
                        ". Loading it would silently skip part of the model: the file is another model or a "
                        "variant of this one that is not supported");
}

}  // namespace gstvae
