// pybind11 bindings of the CUDA kernels as zo_kernels._C_cuda.
//
// The operations and their Python signatures are csrc/bindings.h's, shared with zo_kernels._C; this
// file maps them onto the kernels of csrc/cuda/kernels.h. The launch tuple is (device index, CUDA
// stream handle) (torch.cuda.current_stream().cuda_stream); the CUDA runtime is linked statically, so
// the module links no PyTorch or CUDA library and imports on machines without a GPU.
// zo_kernels/ops/native.py validates every tensor before calling in. The GIL is released while
// kernels are launched; nothing here waits for the device.
#include "bindings.h"

#include <cstdint>

#include "cuda/kernels.h"

namespace py = pybind11;

namespace {

using zo::bind::require_null;

struct CudaLaunch {
  int device;
  uintptr_t stream;
};

struct CudaOps {
  using Launch = CudaLaunch;
  static Launch launch(const py::tuple& t) {
    return {zo::bind::launch_arg<int>(t, 0, "(device, cuda_stream)"),
            zo::bind::launch_arg<uintptr_t>(t, 1, "(device, cuda_stream)")};
  }

  // The kernels do not keep noise: regenerating it in reduce is free on a GPU (keep must be 0).
  static void perturb(void* out, const void* theta, int64_t n, int dtype, int stream, uint64_t seed, uint32_t sample,
                      double scale, int64_t offset, float* keep, Launch l) {
    require_null(keep, "keep", "CUDA");
    zo::cuda::perturb(out, theta, n, dtype, stream, seed, sample, scale, offset, l.device, l.stream);
  }
  static void perturb_rows(void* out, const void* theta, int64_t n, int dtype, int stream, uint64_t seed,
                           const int64_t* ids, int64_t num, const double* scales, int signs, int64_t offset,
                           float* keep, Launch l) {
    require_null(keep, "keep", "CUDA");
    zo::cuda::perturb_rows(out, theta, n, dtype, stream, seed, ids, num, scales, signs, offset, l.device, l.stream);
  }
  static void reduce(void* grad, int64_t n, int dtype, const void* weights, const int64_t* ids, int64_t num,
                     int stream, uint64_t seed, int64_t offset, void* workspace, Launch l) {
    zo::cuda::reduce(grad, n, dtype, weights, ids, num, stream, seed, offset, workspace, l.device, l.stream);
  }
  static void step(void* theta, int64_t n, int dtype, const void* weights, const int64_t* ids, int64_t num,
                   int stream, uint64_t seed, double lr, int64_t offset, void* workspace, Launch l) {
    zo::cuda::step(theta, n, dtype, weights, ids, num, stream, seed, lr, offset, workspace, l.device, l.stream);
  }
  static void squared_norms(double* out, const int64_t* ids, int64_t num, int64_t n, int stream, uint64_t seed,
                            double* workspace, Launch l) {
    zo::cuda::squared_norms(out, workspace, ids, num, n, stream, seed, l.device, l.stream);
  }
  static void fill(float* out, int64_t n, int stream, uint64_t seed, uint32_t sample, int64_t offset, Launch l) {
    zo::cuda::fill(out, n, stream, seed, sample, offset, l.device, l.stream);
  }
  static void philox_words(uint32_t* out, int64_t blocks, uint64_t seed, uint32_t sample, uint64_t block0,
                           Launch l) {
    zo::cuda::philox_words(out, blocks, seed, sample, block0, l.device, l.stream);
  }
};

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "zo_kernels fused CUDA kernels over the Philox4x32-10 noise stream";
  m.attr("CUDART_VERSION") = zo::cuda::runtime_version();
  m.attr("MIN_ARCH") = zo::cuda::min_architecture();
  m.def("device_count", &zo::cuda::device_count, "CUDA devices visible to the module's runtime (0 if none).");
  m.def("squared_norms_workspace", &zo::cuda::squared_norms_workspace, py::arg("num"), py::arg("n"),
        "Doubles of device scratch memory that squared_norms needs.");
  m.def("sample_splits", &zo::cuda::sample_splits, py::arg("num"), py::arg("n"), py::arg("stream"),
        "Chunks reduce/step split `num` samples into for n elements (0: nothing to do, 1: one kernel).");
  m.def("reduce_workspace", &zo::cuda::reduce_workspace, py::arg("num"), py::arg("n"), py::arg("stream"),
        "Elements of the accumulation dtype of device scratch memory that reduce/step need (0: none).");
  zo::bind::def_ops<CudaOps>(m);

  m.def(
      "philox4x32_10",
      [](uintptr_t out, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1, py::tuple launch) {
        const CudaLaunch l = CudaOps::launch(launch);
        py::gil_scoped_release release;
        zo::cuda::philox4x32_10(reinterpret_cast<uint32_t*>(out), c0, c1, c2, c3, k0, k1, l.device, l.stream);
      },
      py::arg("out"), py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"), py::arg("k0"), py::arg("k1"),
      py::arg("launch"),
      "Raw Philox4x32-10 of one counter and key into 4 uint32 at `out` (device memory), for known-answer tests.");
}
