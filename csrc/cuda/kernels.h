// Fused CUDA kernels over the noise stream of docs/noise.md, with the semantics of csrc/cpu/kernels.h.
//
// Every pointer is a device address validated by the Python layer (zo_kernels/ops/native.py):
// on `device`, contiguous, of the given dtype, with the stated number of elements. `cuda_stream` is a
// cudaStream_t passed as an integer (torch.cuda.current_stream().cuda_stream); every kernel runs on it
// and nothing here synchronizes the host. A launch error is thrown as std::runtime_error carrying the
// CUDA error string. This header needs no CUDA header, so the bindings compile with the host compiler.
#pragma once

#include <cstdint>

#include "../dtypes.h"  // the dtype ids (zo::DType), shared with the CPU code

namespace zo {
namespace cuda {

// out[j] = theta[j] + scale * z(seed, sample, offset + j). out may be theta (in place).
void perturb(void* out, const void* theta, int64_t n, int dtype, int stream, uint64_t seed, uint32_t sample,
             double scale, int64_t offset, int device, uintptr_t cuda_stream);

// Rows i * signs + k of out (num * signs rows of n) = theta + scales[i * signs + k] * z(seed, ids[i], offset + j),
// signs in {1, 2}; ids (int64) and scales (double) are device arrays. An id outside [0, 2**32) fills its
// rows with NaN.
void perturb_rows(void* out, const void* theta, int64_t n, int dtype, int stream, uint64_t seed, const int64_t* ids,
                  int64_t num, const double* scales, int signs, int64_t offset, int device, uintptr_t cuda_stream);

// How many contiguous chunks reduce/step split the `num` samples into for an n-element tensor of
// `stream`: 0 when there is nothing to do (num or n is 0), 1 for one kernel that loops over all samples
// in each thread, K >= 2 for K partial sums (one per chunk, in parallel over gridDim.y) added up in
// chunk order by a second kernel. A pure function of (num, n, stream), never of the device, so the
// summation order (and every bit of the result) is the same on any GPU: K = min(132 * 2048 // ceil(n / G),
// num // 16, 8 Mi // n, 65535), at least 1, G being the stream's group size (normal 4, rademacher 32).
int64_t sample_splits(int64_t num, int64_t n, int stream);

// Elements (of the accumulation type) of the device workspace reduce/step need: sample_splits * n when
// that is 2 or more, else 0 (no workspace; pass a null pointer).
int64_t reduce_workspace(int64_t num, int64_t n, int stream);

// grad[j] += sum_k weights[k] * z(seed, ids[k], offset + j). `weights` holds `num` values of the
// accumulation type: float for float32/float16/bfloat16 data, double for float64 data. Each element's
// sum has a fixed order (see sample_splits): over the samples of each chunk in order, then over the
// chunks in order. `workspace` has reduce_workspace(num, n, stream) elements of the accumulation type
// (null when that is 0). An id outside [0, 2**32) turns the result into NaN (checking it on the host
// would need a device sync). With num == 0 nothing is launched and grad is left bit for bit.
void reduce(void* grad, int64_t n, int dtype, const void* weights, const int64_t* ids, int64_t num, int stream,
            uint64_t seed, int64_t offset, void* workspace, int device, uintptr_t cuda_stream);

// theta[j] -= lr * sum_k weights[k] * z(seed, ids[k], offset + j), without writing a gradient; the sum
// and the workspace are those of reduce.
void step(void* theta, int64_t n, int dtype, const void* weights, const int64_t* ids, int64_t num, int stream,
          uint64_t seed, double lr, int64_t offset, void* workspace, int device, uintptr_t cuda_stream);

// Number of doubles of device scratch memory that squared_norms needs for (num, n).
int64_t squared_norms_workspace(int64_t num, int64_t n);

// out[k] = sum_{j < n} z(seed, ids[k], j)^2 in double: per-chunk partial sums into `workspace`, then
// one fixed-order sum per sample (deterministic, independent of the device's size).
void squared_norms(double* out, double* workspace, const int64_t* ids, int64_t num, int64_t n, int stream,
                   uint64_t seed, int device, uintptr_t cuda_stream);

// out[j] = z(seed, sample, offset + j) as float32 (for tests).
void fill(float* out, int64_t n, int stream, uint64_t seed, uint32_t sample, int64_t offset, int device,
          uintptr_t cuda_stream);

// out[4 * b + w] = word w of block (block0 + b) of (seed, sample) (for tests).
void philox_words(uint32_t* out, int64_t blocks, uint64_t seed, uint32_t sample, uint64_t block0, int device,
                  uintptr_t cuda_stream);

// out[0..3] = Philox4x32-10 of one counter and key, computed on the device (known-answer tests).
void philox4x32_10(uint32_t* out, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                   int device, uintptr_t cuda_stream);

// Visible CUDA devices (0 when no driver or device is present; never throws).
int device_count();

// CUDART_VERSION the module was built against.
int runtime_version();

// The lowest architecture the kernels were compiled for, as 100 * major + 10 * minor (800 for sm_80).
int min_architecture();

}  // namespace cuda
}  // namespace zo
