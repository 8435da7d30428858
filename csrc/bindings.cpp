// pybind11 bindings of the CPU kernels as zo_kernels._C.
//
// The operations and their Python signatures are csrc/bindings.h's, shared with zo_kernels._C_cuda;
// this file maps them onto the OpenMP kernels of csrc/cpu/kernels.h. Arguments are raw addresses,
// element counts and dtype ids, never libtorch types: the module links no PyTorch library, so one
// built wheel imports under any PyTorch version. zo_kernels/ops/spec.py validates every tensor
// before calling in.
#include "bindings.h"

#include <cstdint>

#include "cpu/kernels.h"
#include "philox.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

using zo::bind::require_null;

// The CPU's launch tuple is (threads,); philox_words runs on one thread and may omit it.
struct CpuOps {
  using Launch = int;
  static Launch launch(const py::tuple& t) { return t.size() ? zo::bind::launch_arg<int>(t, 0, "(threads,)") : 1; }

  static void perturb(void* out, const void* theta, int64_t n, int dtype, int stream, uint64_t seed, uint32_t sample,
                      double scale, int64_t offset, float* keep, Launch threads) {
    zo::cpu::perturb(out, theta, n, dtype, stream, seed, sample, scale, offset, keep, threads);
  }
  static void perturb_rows(void* out, const void* theta, int64_t n, int dtype, int stream, uint64_t seed,
                           const int64_t* ids, int64_t num, const double* scales, int signs, int64_t offset,
                           float* keep, Launch threads) {
    zo::cpu::perturb_rows(out, theta, n, dtype, stream, seed, ids, num, scales, signs, offset, keep, threads);
  }
  // The CPU kernels take float64 weights and need no workspace (each thread owns its elements).
  static void reduce(void* grad, int64_t n, int dtype, const void* weights, const int64_t* ids, int64_t num,
                     int stream, uint64_t seed, int64_t offset, void* workspace, Launch threads) {
    require_null(workspace, "workspace", "CPU");
    zo::cpu::reduce(grad, n, dtype, static_cast<const double*>(weights), ids, num, stream, seed, offset, threads);
  }
  static void step(void* theta, int64_t n, int dtype, const void* weights, const int64_t* ids, int64_t num,
                   int stream, uint64_t seed, double lr, int64_t offset, void* workspace, Launch threads) {
    require_null(workspace, "workspace", "CPU");
    zo::cpu::step(theta, n, dtype, static_cast<const double*>(weights), ids, num, stream, seed, lr, offset, threads);
  }
  static void squared_norms(double* out, const int64_t* ids, int64_t num, int64_t n, int stream, uint64_t seed,
                            double* workspace, Launch threads) {
    require_null(workspace, "workspace", "CPU");
    zo::cpu::squared_norms(out, ids, num, n, stream, seed, threads);
  }
  static void fill(float* out, int64_t n, int stream, uint64_t seed, uint32_t sample, int64_t offset,
                   Launch threads) {
    zo::cpu::fill(out, n, stream, seed, sample, offset, threads);
  }
  static void philox_words(uint32_t* out, int64_t blocks, uint64_t seed, uint32_t sample, uint64_t block0, Launch) {
    zo::cpu::philox_words(out, blocks, seed, sample, block0);
  }
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "zo_kernels fused CPU kernels (C++17, OpenMP) over the Philox4x32-10 noise stream";
#if defined(_OPENMP)
  m.attr("OPENMP") = true;
  m.def("max_threads", []() { return omp_get_max_threads(); });
#else
  m.attr("OPENMP") = false;
  m.def("max_threads", []() { return 1; });
#endif
  zo::bind::def_ops<CpuOps>(m);

  m.def(
      "philox4x32_10",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
        const zo::Words w = zo::philox4x32_10(c0, c1, c2, c3, k0, k1);
        return py::make_tuple(w.x[0], w.x[1], w.x[2], w.x[3]);
      },
      "Raw Philox4x32-10 of one counter and key (for known-answer tests).");
}
