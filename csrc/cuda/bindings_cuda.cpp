// pybind11 bindings of the CUDA kernels as zo_kernels._C_cuda.
//
// Like zo_kernels._C, arguments are raw device addresses (Tensor.data_ptr()), element counts, dtype
// ids, the device index and the CUDA stream handle (torch.cuda.current_stream().cuda_stream), never
// libtorch types; the CUDA runtime is linked statically, so the module links no PyTorch or CUDA
// library and imports on machines without a GPU. zo_kernels/kernels/native_cuda.py validates every
// tensor before calling in. The GIL is released while kernels are launched; nothing here waits for
// the device.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cuda/kernels.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "zo_kernels fused CUDA kernels over the Philox4x32-10 noise stream";
  m.attr("ABI_VERSION") = 3;  // zo_kernels/kernels/native_cuda.py checks it
  m.attr("CUDART_VERSION") = zo::cuda::runtime_version();
  m.attr("MIN_ARCH") = zo::cuda::min_architecture();
  m.def("device_count", &zo::cuda::device_count, "CUDA devices visible to the module's runtime (0 if none).");
  m.def("squared_norms_workspace", &zo::cuda::squared_norms_workspace, py::arg("num"), py::arg("n"),
        "Doubles of device scratch memory that squared_norms needs.");
  m.def("sample_splits", &zo::cuda::sample_splits, py::arg("num"), py::arg("n"), py::arg("stream"),
        "Chunks reduce/step split `num` samples into for n elements (0: nothing to do, 1: one kernel).");
  m.def("reduce_workspace", &zo::cuda::reduce_workspace, py::arg("num"), py::arg("n"), py::arg("stream"),
        "Elements of the accumulation dtype of device scratch memory that reduce/step need (0: none).");

  m.def(
      "perturb",
      [](uintptr_t out, uintptr_t theta, int64_t n, int dtype, int stream, uint64_t seed, uint32_t sample,
         double scale, int64_t offset, int device, uintptr_t cuda_stream) {
        py::gil_scoped_release release;
        zo::cuda::perturb(ptr<void>(out), ptr<const void>(theta), n, dtype, stream, seed, sample, scale, offset,
                          device, cuda_stream);
      },
      py::arg("out"), py::arg("theta"), py::arg("n"), py::arg("dtype"), py::arg("stream"), py::arg("seed"),
      py::arg("sample"), py::arg("scale"), py::arg("offset"), py::arg("device"), py::arg("cuda_stream"));

  m.def(
      "perturb_rows",
      [](uintptr_t out, uintptr_t theta, int64_t n, int dtype, int stream, uint64_t seed, uintptr_t ids, int64_t num,
         uintptr_t scales, int signs, int64_t offset, int device, uintptr_t cuda_stream) {
        py::gil_scoped_release release;
        zo::cuda::perturb_rows(ptr<void>(out), ptr<const void>(theta), n, dtype, stream, seed, ptr<const int64_t>(ids),
                               num, ptr<const double>(scales), signs, offset, device, cuda_stream);
      },
      py::arg("out"), py::arg("theta"), py::arg("n"), py::arg("dtype"), py::arg("stream"), py::arg("seed"),
      py::arg("ids"), py::arg("num"), py::arg("scales"), py::arg("signs"), py::arg("offset"), py::arg("device"),
      py::arg("cuda_stream"));

  m.def(
      "reduce",
      [](uintptr_t grad, int64_t n, int dtype, uintptr_t weights, uintptr_t ids, int64_t num, int stream,
         uint64_t seed, int64_t offset, uintptr_t workspace, int device, uintptr_t cuda_stream) {
        py::gil_scoped_release release;
        zo::cuda::reduce(ptr<void>(grad), n, dtype, ptr<const void>(weights), ptr<const int64_t>(ids), num, stream,
                         seed, offset, ptr<void>(workspace), device, cuda_stream);
      },
      py::arg("grad"), py::arg("n"), py::arg("dtype"), py::arg("weights"), py::arg("ids"), py::arg("num"),
      py::arg("stream"), py::arg("seed"), py::arg("offset"), py::arg("workspace"), py::arg("device"),
      py::arg("cuda_stream"));

  m.def(
      "step",
      [](uintptr_t theta, int64_t n, int dtype, uintptr_t weights, uintptr_t ids, int64_t num, int stream,
         uint64_t seed, double lr, int64_t offset, uintptr_t workspace, int device, uintptr_t cuda_stream) {
        py::gil_scoped_release release;
        zo::cuda::step(ptr<void>(theta), n, dtype, ptr<const void>(weights), ptr<const int64_t>(ids), num, stream,
                       seed, lr, offset, ptr<void>(workspace), device, cuda_stream);
      },
      py::arg("theta"), py::arg("n"), py::arg("dtype"), py::arg("weights"), py::arg("ids"), py::arg("num"),
      py::arg("stream"), py::arg("seed"), py::arg("lr"), py::arg("offset"), py::arg("workspace"), py::arg("device"),
      py::arg("cuda_stream"));

  m.def(
      "squared_norms",
      [](uintptr_t out, uintptr_t workspace, uintptr_t ids, int64_t num, int64_t n, int stream, uint64_t seed,
         int device, uintptr_t cuda_stream) {
        py::gil_scoped_release release;
        zo::cuda::squared_norms(ptr<double>(out), ptr<double>(workspace), ptr<const int64_t>(ids), num, n, stream,
                                seed, device, cuda_stream);
      },
      py::arg("out"), py::arg("workspace"), py::arg("ids"), py::arg("num"), py::arg("n"), py::arg("stream"),
      py::arg("seed"), py::arg("device"), py::arg("cuda_stream"));

  m.def(
      "fill",
      [](uintptr_t out, int64_t n, int stream, uint64_t seed, uint32_t sample, int64_t offset, int device,
         uintptr_t cuda_stream) {
        py::gil_scoped_release release;
        zo::cuda::fill(ptr<float>(out), n, stream, seed, sample, offset, device, cuda_stream);
      },
      py::arg("out"), py::arg("n"), py::arg("stream"), py::arg("seed"), py::arg("sample"), py::arg("offset"),
      py::arg("device"), py::arg("cuda_stream"));

  m.def(
      "philox_words",
      [](uintptr_t out, int64_t blocks, uint64_t seed, uint32_t sample, uint64_t block0, int device,
         uintptr_t cuda_stream) {
        py::gil_scoped_release release;
        zo::cuda::philox_words(ptr<uint32_t>(out), blocks, seed, sample, block0, device, cuda_stream);
      },
      py::arg("out"), py::arg("blocks"), py::arg("seed"), py::arg("sample"), py::arg("block0"), py::arg("device"),
      py::arg("cuda_stream"));

  m.def(
      "philox4x32_10",
      [](uintptr_t out, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1, int device,
         uintptr_t cuda_stream) {
        py::gil_scoped_release release;
        zo::cuda::philox4x32_10(ptr<uint32_t>(out), c0, c1, c2, c3, k0, k1, device, cuda_stream);
      },
      py::arg("out"), py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"), py::arg("k0"), py::arg("k1"),
      py::arg("device"), py::arg("cuda_stream"),
      "Raw Philox4x32-10 of one counter and key into 4 uint32 at `out` (device memory), for known-answer tests.");
}
