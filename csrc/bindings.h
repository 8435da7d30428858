// The one description of the kernel operations' Python signatures, shared by zo_kernels._C
// (csrc/bindings.cpp) and zo_kernels._C_cuda (csrc/cuda/bindings_cuda.cpp).
//
// Every operation takes the same arguments, by the same keyword names, in both modules: raw addresses
// (Python ints from Tensor.data_ptr()), element counts and dtype/stream ids, never libtorch types (so
// one built wheel imports under any PyTorch version), then `launch`, a tuple of the device's launch
// arguments: (threads,) on the CPU, (device index, cudaStream_t) on CUDA. A device's `Ops` struct maps
// each operation onto its kernels; an argument a device has no use for (the CPU's workspaces, CUDA's
// kept noise) must be 0 there. zo_kernels/ops/spec.py validates every argument before calling in;
// the GIL is released while a kernel runs. Changing an operation here changes both modules: bump
// ABI_VERSION in zo_kernels/ops/spec.py, which CMakeLists.txt passes to both as ZO_ABI_VERSION.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace zo {
namespace bind {

namespace py = pybind11;

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// The leading arguments of each operation, by name (the trailing `launch` is added by def_ops).
#define ZO_ARGS_PERTURB                                                                                          \
  py::arg("out"), py::arg("theta"), py::arg("n"), py::arg("dtype"), py::arg("stream"), py::arg("seed"),         \
      py::arg("sample"), py::arg("scale"), py::arg("offset"), py::arg("keep")
#define ZO_ARGS_PERTURB_ROWS                                                                                     \
  py::arg("out"), py::arg("theta"), py::arg("n"), py::arg("dtype"), py::arg("stream"), py::arg("seed"),         \
      py::arg("ids"), py::arg("num"), py::arg("scales"), py::arg("signs"), py::arg("offset"), py::arg("keep")
#define ZO_ARGS_ACCUMULATE                                                                                       \
  py::arg("data"), py::arg("n"), py::arg("dtype"), py::arg("weights"), py::arg("ids"), py::arg("num"),          \
      py::arg("stream"), py::arg("seed")

// perturb and perturb_rows of `Ops`. Ops: `Launch` (parsed from the launch tuple by `Ops::launch`)
// and one static function per operation.
template <typename Ops>
void def_perturb_ops(py::module_& m) {
  using L = typename Ops::Launch;
  m.def(
      "perturb",
      [](uintptr_t out, uintptr_t theta, int64_t n, int dtype, int stream, uint64_t seed, uint32_t sample,
         double scale, int64_t offset, uintptr_t keep, py::tuple launch) {
        const L l = Ops::launch(launch);
        py::gil_scoped_release release;
        Ops::perturb(ptr<void>(out), ptr<const void>(theta), n, dtype, stream, seed, sample, scale, offset,
                     ptr<float>(keep), l);
      },
      ZO_ARGS_PERTURB, py::arg("launch"),
      "out = theta + scale * z; keep (a float32 buffer's address, 0 for none) also receives z.");
  m.def(
      "perturb_rows",
      [](uintptr_t out, uintptr_t theta, int64_t n, int dtype, int stream, uint64_t seed, uintptr_t ids, int64_t num,
         uintptr_t scales, int signs, int64_t offset, uintptr_t keep, py::tuple launch) {
        const L l = Ops::launch(launch);
        py::gil_scoped_release release;
        Ops::perturb_rows(ptr<void>(out), ptr<const void>(theta), n, dtype, stream, seed, ptr<const int64_t>(ids),
                          num, ptr<const double>(scales), signs, offset, ptr<float>(keep), l);
      },
      ZO_ARGS_PERTURB_ROWS, py::arg("launch"),
      "Rows i * signs + k of out = theta + scales[i * signs + k] * z_{ids[i]}; keep (0 for none) row i = z_{ids[i]}.");
}

// reduce, step and squared_norms of `Ops`: the sums over samples.
template <typename Ops>
void def_sum_ops(py::module_& m) {
  using L = typename Ops::Launch;
  m.def(
      "reduce",
      [](uintptr_t grad, int64_t n, int dtype, uintptr_t weights, uintptr_t ids, int64_t num, int stream,
         uint64_t seed, int64_t offset, uintptr_t workspace, py::tuple launch) {
        const L l = Ops::launch(launch);
        py::gil_scoped_release release;
        Ops::reduce(ptr<void>(grad), n, dtype, ptr<const void>(weights), ptr<const int64_t>(ids), num, stream, seed,
                    offset, ptr<void>(workspace), l);
      },
      ZO_ARGS_ACCUMULATE, py::arg("offset"), py::arg("workspace"), py::arg("launch"),
      "data += sum_k weights[k] * z_{ids[k]}.");
  m.def(
      "step",
      [](uintptr_t theta, int64_t n, int dtype, uintptr_t weights, uintptr_t ids, int64_t num, int stream,
         uint64_t seed, double lr, int64_t offset, uintptr_t workspace, py::tuple launch) {
        const L l = Ops::launch(launch);
        py::gil_scoped_release release;
        Ops::step(ptr<void>(theta), n, dtype, ptr<const void>(weights), ptr<const int64_t>(ids), num, stream, seed,
                  lr, offset, ptr<void>(workspace), l);
      },
      ZO_ARGS_ACCUMULATE, py::arg("lr"), py::arg("offset"), py::arg("workspace"), py::arg("launch"),
      "data -= lr * sum_k weights[k] * z_{ids[k]}.");
  m.def(
      "squared_norms",
      [](uintptr_t out, uintptr_t ids, int64_t num, int64_t n, int stream, uint64_t seed, uintptr_t workspace,
         py::tuple launch) {
        const L l = Ops::launch(launch);
        py::gil_scoped_release release;
        Ops::squared_norms(ptr<double>(out), ptr<const int64_t>(ids), num, n, stream, seed, ptr<double>(workspace), l);
      },
      py::arg("out"), py::arg("ids"), py::arg("num"), py::arg("n"), py::arg("stream"), py::arg("seed"),
      py::arg("workspace"), py::arg("launch"), "out[k] = |z_{ids[k]}|^2 over the first n elements, in double.");
}

// fill and philox_words of `Ops`: the noise and the raw generator, materialized (for tests).
template <typename Ops>
void def_noise_ops(py::module_& m) {
  using L = typename Ops::Launch;
  m.def(
      "fill",
      [](uintptr_t out, int64_t n, int stream, uint64_t seed, uint32_t sample, int64_t offset, py::tuple launch) {
        const L l = Ops::launch(launch);
        py::gil_scoped_release release;
        Ops::fill(ptr<float>(out), n, stream, seed, sample, offset, l);
      },
      py::arg("out"), py::arg("n"), py::arg("stream"), py::arg("seed"), py::arg("sample"), py::arg("offset"),
      py::arg("launch"), "out = z as float32 (materialized noise).");
  m.def(
      "philox_words",
      [](uintptr_t out, int64_t blocks, uint64_t seed, uint32_t sample, uint64_t block0, py::tuple launch) {
        const L l = Ops::launch(launch);
        py::gil_scoped_release release;
        Ops::philox_words(ptr<uint32_t>(out), blocks, seed, sample, block0, l);
      },
      py::arg("out"), py::arg("blocks"), py::arg("seed"), py::arg("sample"), py::arg("block0"),
      py::arg("launch") = py::tuple(), "The 4 uint32 words of each of `blocks` Philox blocks from block0 (tests).");
}

// Every kernel operation of `Ops`, and the ABI version they make up, into m.
template <typename Ops>
void def_ops(py::module_& m) {
  m.attr("ABI_VERSION") = ZO_ABI_VERSION;  // zo_kernels/ops/native.py checks it at load
  def_perturb_ops<Ops>(m);
  def_sum_ops<Ops>(m);
  def_noise_ops<Ops>(m);
}

// A launch tuple's element `i` as T; ValueError (not a crash) on a short tuple.
template <typename T>
T launch_arg(const py::tuple& launch, size_t i, const char* what) {
  if (launch.size() <= i) throw py::value_error(std::string("launch must hold ") + what);
  return launch[i].cast<T>();
}

// An address a device cannot use must be null there.
inline void require_null(const void* p, const char* name, const char* device) {
  if (p != nullptr) throw py::value_error(std::string(name) + " is not supported by the " + device + " kernels");
}

}  // namespace bind
}  // namespace zo
