// senformer::cpu_isa() -> str: which SENF_TARGET_CLONES clone the hot CPU loops run on this machine
// ("x86-64-v4", "x86-64-v3", "default"; "single build" where the compiler makes no clones). The
// answer comes from GCC's own load-time resolver, by versioning a function over the same list, so
// benchmark records and tests (e.g. under an emulated older CPU) know which code they measured.
#include <torch/library.h>

#include <string>

#include "cpu/simd_math.h"

namespace senformer {
namespace {

#ifdef SENF_HAS_TARGET_CLONES
__attribute__((target("arch=x86-64-v4"))) const char* clone_name() { return "x86-64-v4"; }
__attribute__((target("arch=x86-64-v3"))) const char* clone_name() { return "x86-64-v3"; }
__attribute__((target("default"))) const char* clone_name() { return "default"; }
#else
const char* clone_name() { return "single build"; }
#endif

std::string cpu_isa() { return clone_name(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(senformer, m) {
  m.def("cpu_isa() -> str", &cpu_isa);
}

}  // namespace senformer
