// Fused CPU kernels over the noise stream of docs/noise.md. Pointers are raw, validated by the
// Python layer (zo_kernels/ops/spec.py): contiguous, of the given dtype, with n elements.
#pragma once

#include <cstdint>

namespace zo {
namespace cpu {

// out[j] = theta[j] + scale * z(seed, sample, offset + j); also keep[j] = z(...) when keep is not null.
void perturb(void* out, const void* theta, int64_t n, int dtype, int stream, uint64_t seed, uint32_t sample,
             double scale, int64_t offset, float* keep, int threads);

// Row i * signs + k of out (num * signs rows of n) = theta + scales[i * signs + k] * z(seed, ids[i], offset + j);
// row i of keep (num rows of n float32, or null) = z(seed, ids[i], offset + j).
void perturb_rows(void* out, const void* theta, int64_t n, int dtype, int stream, uint64_t seed, const int64_t* ids,
                  int64_t num, const double* scales, int signs, int64_t offset, float* keep, int threads);

// grad[j] += sum_k weights[k] * z(seed, ids[k], offset + j); each element's sum runs over k in order.
void reduce(void* grad, int64_t n, int dtype, const double* weights, const int64_t* ids, int64_t num, int stream,
            uint64_t seed, int64_t offset, int threads);

// theta[j] -= lr * sum_k weights[k] * z(seed, ids[k], offset + j), without writing a gradient.
void step(void* theta, int64_t n, int dtype, const double* weights, const int64_t* ids, int64_t num, int stream,
          uint64_t seed, double lr, int64_t offset, int threads);

// out[k] = sum_{j < n} z(seed, ids[k], j)^2, accumulated in double, in a fixed order.
void squared_norms(double* out, const int64_t* ids, int64_t num, int64_t n, int stream, uint64_t seed, int threads);

// out[j] = z(seed, sample, offset + j) as float32 (for tests).
void fill(float* out, int64_t n, int stream, uint64_t seed, uint32_t sample, int64_t offset, int threads);

// out[4 * b + w] = word w of block (block0 + b) of (seed, sample) (for tests).
void philox_words(uint32_t* out, int64_t blocks, uint64_t seed, uint32_t sample, uint64_t block0);

}  // namespace cpu
}  // namespace zo
