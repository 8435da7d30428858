// pybind11 bindings of the CPU kernels as zo_kernels._C.
//
// Arguments are raw addresses (Python ints from Tensor.data_ptr()), element counts and dtype ids,
// never libtorch types: the module links no PyTorch library, so one built wheel imports under any
// PyTorch version. zo_kernels/kernels/checks.py validates every tensor before calling in.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/kernels.h"
#include "philox.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "zo_kernels fused CPU kernels (C++17, OpenMP) over the Philox4x32-10 noise stream";
  m.attr("ABI_VERSION") = 2;  // zo_kernels/kernels/native.py checks it
#if defined(_OPENMP)
  m.attr("OPENMP") = true;
  m.def("max_threads", []() { return omp_get_max_threads(); });
#else
  m.attr("OPENMP") = false;
  m.def("max_threads", []() { return 1; });
#endif

  m.def(
      "perturb",
      [](uintptr_t out, uintptr_t theta, int64_t n, int dtype, int stream, uint64_t seed, uint32_t sample,
         double scale, int64_t offset, int threads, uintptr_t keep) {
        py::gil_scoped_release release;
        zo::cpu::perturb(ptr<void>(out), ptr<const void>(theta), n, dtype, stream, seed, sample, scale, offset,
                         ptr<float>(keep), threads);
      },
      py::arg("out"), py::arg("theta"), py::arg("n"), py::arg("dtype"), py::arg("stream"), py::arg("seed"),
      py::arg("sample"), py::arg("scale"), py::arg("offset"), py::arg("threads"), py::arg("keep") = 0,
      "out = theta + scale * z; keep (a float32 buffer's address, 0 for none) also receives z.");

  m.def(
      "perturb_rows",
      [](uintptr_t out, uintptr_t theta, int64_t n, int dtype, int stream, uint64_t seed, uintptr_t ids, int64_t num,
         uintptr_t scales, int signs, int64_t offset, uintptr_t keep, int threads) {
        py::gil_scoped_release release;
        zo::cpu::perturb_rows(ptr<void>(out), ptr<const void>(theta), n, dtype, stream, seed, ptr<const int64_t>(ids),
                              num, ptr<const double>(scales), signs, offset, ptr<float>(keep), threads);
      },
      py::arg("out"), py::arg("theta"), py::arg("n"), py::arg("dtype"), py::arg("stream"), py::arg("seed"),
      py::arg("ids"), py::arg("num"), py::arg("scales"), py::arg("signs"), py::arg("offset"), py::arg("keep"),
      py::arg("threads"),
      "Rows i * signs + k of out = theta + scales[i * signs + k] * z_{ids[i]}; keep (0 for none) row i = z_{ids[i]}.");

  m.def(
      "reduce",
      [](uintptr_t grad, int64_t n, int dtype, uintptr_t weights, uintptr_t ids, int64_t num, int stream,
         uint64_t seed, int64_t offset, int threads) {
        py::gil_scoped_release release;
        zo::cpu::reduce(ptr<void>(grad), n, dtype, ptr<const double>(weights), ptr<const int64_t>(ids), num, stream,
                        seed, offset, threads);
      },
      py::arg("grad"), py::arg("n"), py::arg("dtype"), py::arg("weights"), py::arg("ids"), py::arg("num"),
      py::arg("stream"), py::arg("seed"), py::arg("offset"), py::arg("threads"));

  m.def(
      "step",
      [](uintptr_t theta, int64_t n, int dtype, uintptr_t weights, uintptr_t ids, int64_t num, int stream,
         uint64_t seed, double lr, int64_t offset, int threads) {
        py::gil_scoped_release release;
        zo::cpu::step(ptr<void>(theta), n, dtype, ptr<const double>(weights), ptr<const int64_t>(ids), num, stream,
                      seed, lr, offset, threads);
      },
      py::arg("theta"), py::arg("n"), py::arg("dtype"), py::arg("weights"), py::arg("ids"), py::arg("num"),
      py::arg("stream"), py::arg("seed"), py::arg("lr"), py::arg("offset"), py::arg("threads"));

  m.def(
      "squared_norms",
      [](uintptr_t out, uintptr_t ids, int64_t num, int64_t n, int stream, uint64_t seed, int threads) {
        py::gil_scoped_release release;
        zo::cpu::squared_norms(ptr<double>(out), ptr<const int64_t>(ids), num, n, stream, seed, threads);
      },
      py::arg("out"), py::arg("ids"), py::arg("num"), py::arg("n"), py::arg("stream"), py::arg("seed"),
      py::arg("threads"));

  m.def(
      "fill",
      [](uintptr_t out, int64_t n, int stream, uint64_t seed, uint32_t sample, int64_t offset, int threads) {
        py::gil_scoped_release release;
        zo::cpu::fill(ptr<float>(out), n, stream, seed, sample, offset, threads);
      },
      py::arg("out"), py::arg("n"), py::arg("stream"), py::arg("seed"), py::arg("sample"), py::arg("offset"),
      py::arg("threads"));

  m.def(
      "philox4x32_10",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
        const zo::Words w = zo::philox4x32_10(c0, c1, c2, c3, k0, k1);
        return py::make_tuple(w.x[0], w.x[1], w.x[2], w.x[3]);
      },
      "Raw Philox4x32-10 of one counter and key (for known-answer tests).");

  m.def(
      "philox_words",
      [](uintptr_t out, int64_t blocks, uint64_t seed, uint32_t sample, uint64_t block0) {
        zo::cpu::philox_words(ptr<uint32_t>(out), blocks, seed, sample, block0);
      },
      py::arg("out"), py::arg("blocks"), py::arg("seed"), py::arg("sample"), py::arg("block0"));
}
