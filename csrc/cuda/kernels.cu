// Fused CUDA kernels over the noise stream of docs/noise.md (semantics of csrc/cpu/kernels.h).
//
// Work split: a thread owns a *group* of G consecutive flat elements whose global start is a multiple
// of G (normal: G = 4, one Philox block; rademacher: G = 32, one 32-bit word of a block, so four threads
// share a block). reduce/step loop over the samples in order inside the thread, accumulating the group in
// registers, and touch memory once at the end. A small tensor has too few groups to fill the GPU, so
// its samples are split into K contiguous chunks over gridDim.y: each chunk's partial sums go to a
// K x n workspace and a second kernel adds them in chunk order (see "The split path" below). K is a
// function of (num, n, stream) only (sample_splits), so every element's sum has a fixed order: results
// are deterministic and independent of the launch geometry and of the device. Interior groups whose
// addresses are aligned move with 8/16-byte vector loads and stores; head/tail groups (offset or n not
// a multiple of G) and unaligned pointers take a guarded scalar path. Indices are int64 and the grids
// are grid-stride loops capped at a few waves, so any n < 2**63 works.
//
// The normals use the accurate logf/sqrtf/sincosf of the CUDA math library (no fast-math intrinsics;
// never build with --use_fast_math), so they stay within float32 rounding of the reference.
#include "kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../dtypes.h"
#include "../philox.h"

namespace zo {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// The largest gridDim.y: perturb_rows launches once per this many samples, reduce/step split the
// samples into at most this many chunks.
constexpr int64_t kMaxGridY = 65535;
// Grid cap, in blocks per SM: 8 resident blocks of 256 threads fill an SM; 4 waves of them keep the
// tail short while the grid-stride loops cover any larger n.
constexpr int64_t kBlocksPerSm = 32;
// Elements per partial sum of squared_norms (a multiple of every group and block length). Fixed, so
// the summation order does not depend on the device.
constexpr int64_t kNormChunk = 65536;
// The sample split of reduce/step (sample_splits): fixed numbers, never the device's, because the
// chunks fix the summation order. Threads aimed at: an H100/H200 (132 SMs x 2048 threads) full once.
constexpr int64_t kSplitThreads = 132 * 2048;
// Fewest samples per chunk: shorter chunks would spend more on the workspace round trip than they win.
constexpr int64_t kMinChunkSamples = 16;
// Most workspace elements: 64 MiB of float64 partial sums; larger tensors have the threads anyway.
constexpr int64_t kMaxWorkspaceElements = (int64_t{64} << 20) / 8;

// Element types: zo::Io<D> (csrc/dtypes.h), the storage type T and accumulation type Acc of each dtype.

template <typename A>
ZO_HD A quiet_nan() {
  return static_cast<A>(NAN);
}

// a * b + c with one rounding, written out so that the compiler's contraction choices cannot make
// the vectorized and the scalar path (or host and device) round differently.
ZO_HD float mul_add(float a, float b, float c) { return fmaf(a, b, c); }
ZO_HD double mul_add(double a, double b, double c) { return fma(a, b, c); }

// Read-only loads of values every thread of a block reads (weights, ids): the read-only cache path.
template <typename T>
ZO_HD T load_shared_value(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// ---------------------------------------------------------------------------------------------------
// Groups of elements and their noise.

template <int S>
struct Group;
template <>
struct Group<kNormal> {
  static constexpr int kSize = 4;
};
// One whole 32-bit word of a Philox block per thread: a smaller group would regenerate the same
// block for more threads and throw more of its bits away.
template <>
struct Group<kRademacher> {
  static constexpr int kSize = 32;
};
static_assert(Group<kNormal>::kSize == StreamTraits<kNormal>::kPerBlock, "a normal group is one Philox block");
static_assert(StreamTraits<kRademacher>::kPerBlock == 4 * Group<kRademacher>::kSize,
              "a rademacher group is one 32-bit word of one Philox block");

// z[e] = z(seed, sample, start + e) for the group starting at global element `start` (a multiple of G).
template <int S>
ZO_HD void group_noise(uint64_t seed, uint32_t sample, uint64_t start, float (&z)[Group<S>::kSize]) {
  constexpr int P = StreamTraits<S>::kPerBlock;
  const Words w = block_words(seed, sample, start / P);
  if constexpr (S == kNormal) {
    normal_block(w, z);
  } else {
    // Lanes 32q .. 32q+31 of the block are the bits of word q (docs/noise.md). The word is picked
    // with selects, not w.x[runtime index], which would go through local memory.
    const unsigned q = static_cast<unsigned>(start % P) >> 5;
    const uint32_t word = q == 0 ? w.x[0] : q == 1 ? w.x[1] : q == 2 ? w.x[2] : w.x[3];
#pragma unroll
    for (int e = 0; e < Group<S>::kSize; ++e) z[e] = ((word >> e) & 1u) ? 1.0f : -1.0f;
  }
}

// The 16-byte vector type of T's values (a float4 of floats rather than a uint4 of their bits spares
// register moves around store_word).
template <typename T>
struct Vector16;
template <>
struct Vector16<float> {
  using type = float4;
};
template <>
struct Vector16<double> {
  using type = double2;
};
template <>
struct Vector16<unsigned short> {
  using type = uint4;
};

#if defined(__CUDA_ARCH__)
// One vector store, as inline PTX the compiler cannot split: a plain store of Packet's union words is
// split into scalars, and in some kernels (perturb_rows, the split reduce's partial sums) the compiler
// does not vectorize them again. A plain st.global (weak, default cache policy) like the C++ store.
__device__ __forceinline__ void store_word(float4* p, const float4& w) {
  asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(w.x), "f"(w.y), "f"(w.z), "f"(w.w) : "memory");
}
__device__ __forceinline__ void store_word(double2* p, const double2& w) {
  asm volatile("st.global.v2.f64 [%0], {%1, %2};" ::"l"(p), "d"(w.x), "d"(w.y) : "memory");
}
__device__ __forceinline__ void store_word(uint4* p, const uint4& w) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w.x), "r"(w.y), "r"(w.z), "r"(w.w) : "memory");
}
__device__ __forceinline__ void store_word(uint2* p, const uint2& w) {
  asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(w.x), "r"(w.y) : "memory");
}
#endif

// A group of G elements of T as 8- or 16-byte words, for vectorized loads and stores.
template <typename T, int G>
struct Packet {
  static constexpr int kBytes = G * static_cast<int>(sizeof(T));
  static constexpr int kAlign = kBytes < 16 ? kBytes : 16;
  static_assert(kAlign == 8 || kAlign == 16, "groups move as 8- or 16-byte words");
  using Word = typename std::conditional<kAlign == 16, typename Vector16<T>::type, uint2>::type;
  static constexpr int kWords = kBytes / kAlign;
  union {
    Word w[kWords];
    T t[G];
  };

  static ZO_HD bool aligned(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & static_cast<uintptr_t>(kAlign - 1)) == 0;
  }
  ZO_HD void load(const T* p) {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = reinterpret_cast<const Word*>(p)[i];
  }
  ZO_HD void store(T* p) const {
#pragma unroll
    for (int i = 0; i < kWords; ++i) {
#if defined(__CUDA_ARCH__)
      store_word(reinterpret_cast<Word*>(p) + i, w[i]);
#else
      reinterpret_cast<Word*>(p)[i] = w[i];
#endif
    }
  }
};

// ---------------------------------------------------------------------------------------------------
// One thread's work item, as host-device functions: the kernels below loop over items, and the same
// code runs item by item on the CPU in tests/test_cuda_compile.py (an emulation that needs no GPU).

// Group q of those covering [offset, offset + n): the global index of its first element, and that
// element's index in the tensor (negative for the head group when offset is not a multiple of G).
template <int G>
struct GroupPosition {
  uint64_t start;
  int64_t local;
  ZO_HD GroupPosition(int64_t offset, int64_t q)
      : start((static_cast<uint64_t>(offset) / G + static_cast<uint64_t>(q)) * G),
        local(static_cast<int64_t>(start - static_cast<uint64_t>(offset))) {}
  // Whether all G elements are inside the tensor, so the group may move as one packet.
  ZO_HD bool whole(int64_t n) const { return local >= 0 && local + G <= n; }
};

// dst[j] = f(e, src[j]) for the elements j = pos.local + e of the group inside [0, n): one packet when
// the group is whole and both rows are aligned, else element by element (head/tail groups, unaligned
// rows). dst may be src.
template <typename U, int G, typename F>
ZO_HD void update_group(U* dst, const U* src, int64_t n, const GroupPosition<G>& pos, F f) {
  using Pk = Packet<U, G>;
  if (pos.whole(n) && Pk::aligned(dst + pos.local) && Pk::aligned(src + pos.local)) {
    Pk pk;
    pk.load(src + pos.local);
#pragma unroll
    for (int e = 0; e < G; ++e) pk.t[e] = f(e, pk.t[e]);
    pk.store(dst + pos.local);
  } else {
#pragma unroll
    for (int e = 0; e < G; ++e) {
      const int64_t j = pos.local + e;
      if (j >= 0 && j < n) dst[j] = f(e, src[j]);
    }
  }
}

// v[e] = row[pos.local + e] for the elements inside [0, n) (U(0) outside), moved like update_group.
template <typename U, int G>
ZO_HD void load_group(const U* row, int64_t n, const GroupPosition<G>& pos, U (&v)[G]) {
  using Pk = Packet<U, G>;
  if (pos.whole(n) && Pk::aligned(row + pos.local)) {
    Pk pk;
    pk.load(row + pos.local);
#pragma unroll
    for (int e = 0; e < G; ++e) v[e] = pk.t[e];
  } else {
#pragma unroll
    for (int e = 0; e < G; ++e) {
      const int64_t j = pos.local + e;
      v[e] = j >= 0 && j < n ? row[j] : U(0);
    }
  }
}

// row[pos.local + e] = v[e] for the elements inside [0, n), moved like update_group.
template <typename U, int G>
ZO_HD void store_group(U* row, int64_t n, const GroupPosition<G>& pos, const U (&v)[G]) {
  using Pk = Packet<U, G>;
  if (pos.whole(n) && Pk::aligned(row + pos.local)) {
    Pk pk;
#pragma unroll
    for (int e = 0; e < G; ++e) pk.t[e] = v[e];
    pk.store(row + pos.local);
  } else {
#pragma unroll
    for (int e = 0; e < G; ++e) {
      const int64_t j = pos.local + e;
      if (j >= 0 && j < n) row[j] = v[e];
    }
  }
}

// The scales of one sample's rows of out: one, or two for an antithetic pair. Passed by value so they
// stay in registers (a pointer to a local array would give the kernel a stack frame).
struct RowScales {
  double first;
  double second;
  int rows;
};

// Sample i's `signs` scales; NaN for an id outside [0, 2**32), which poisons its rows like the reduce.
ZO_HD RowScales sample_scales(const int64_t* ids, const double* scales, int64_t i, int signs) {
  const bool valid = (static_cast<uint64_t>(ids[i]) >> 32) == 0;
  const double first = valid ? scales[i * signs] : quiet_nan<double>();
  const double second = valid && signs > 1 ? scales[i * signs + 1] : quiet_nan<double>();
  return RowScales{first, second, signs};
}

// out[k * row_stride + j] = theta[j] + scale_k * z(seed, sample, offset + j) for each row k, over the
// elements of group q: the noise is generated once for every row (the antithetic pair shares it).
// With one row, out may be theta (in place).
template <int S, int D>
ZO_HD void perturb_item(typename Io<D>::T* out, const typename Io<D>::T* theta, int64_t n, uint64_t seed,
                        uint32_t sample, RowScales scales, int64_t row_stride, int64_t offset, int64_t q) {
  using IO = Io<D>;
  using Acc = typename IO::Acc;
  using T = typename IO::T;
  constexpr int G = Group<S>::kSize;
  const GroupPosition<G> pos(offset, q);
  float z[G];
  group_noise<S>(seed, sample, pos.start, z);
  // Not unrolled: a second copy of the row code would hold twice the registers for the antithetic pair.
#pragma unroll 1
  for (int k = 0; k < scales.rows; ++k) {
    const Acc scale = static_cast<Acc>(k == 0 ? scales.first : scales.second);
    update_group(out + k * row_stride, theta, n, pos,
                 [&](int e, T t) { return IO::store(mul_add(scale, static_cast<Acc>(z[e]), IO::load(t))); });
  }
}

template <typename Acc>
ZO_HD Acc apply(Acc value, Acc sum, Acc lr, bool subtract) {
  return subtract ? mul_add(-lr, sum, value) : value + sum;
}

// acc[e] = sum over the samples k in [lo, hi), in order, of weights[k] * z(seed, ids[k], start + e): one
// fma per sample into a running sum that starts at +0. An id outside [0, 2**32) makes the sums NaN
// instead of wrapping.
template <int S, typename Acc>
ZO_HD void sample_sums(const Acc* weights, const int64_t* ids, int64_t lo, int64_t hi, uint64_t seed,
                       uint64_t start, Acc (&acc)[Group<S>::kSize]) {
  constexpr int G = Group<S>::kSize;
#pragma unroll
  for (int e = 0; e < G; ++e) acc[e] = Acc(0);
  for (int64_t k = lo; k < hi; ++k) {
    const int64_t id = load_shared_value(ids + k);
    Acc w = load_shared_value(weights + k);
    if (static_cast<uint64_t>(id) >> 32) w = quiet_nan<Acc>();
    float z[G];
    group_noise<S>(seed, static_cast<uint32_t>(id), start, z);
#pragma unroll
    for (int e = 0; e < G; ++e) acc[e] = mul_add(w, static_cast<Acc>(z[e]), acc[e]);
  }
}

// data = data + sum (reduce) or data - lr * sum (step) over group `pos`, rounding once to T.
template <int D, int G>
ZO_HD void apply_group(typename Io<D>::T* data, int64_t n, const GroupPosition<G>& pos,
                       const typename Io<D>::Acc (&sum)[G], typename Io<D>::Acc lr, bool subtract) {
  using IO = Io<D>;
  update_group(data, data, n, pos,
               [&](int e, typename IO::T t) { return IO::store(apply(IO::load(t), sum[e], lr, subtract)); });
}

// Group q of reduce (subtract = false: data += sum_k w_k z_k) or step (subtract = true: data -= lr * sum)
// over all `num` samples in one thread: the single-kernel path.
template <int S, int D>
ZO_HD void accumulate_item(typename Io<D>::T* data, int64_t n, const typename Io<D>::Acc* weights, const int64_t* ids,
                           int64_t num, uint64_t seed, int64_t offset, typename Io<D>::Acc lr, bool subtract,
                           int64_t q) {
  using Acc = typename Io<D>::Acc;
  constexpr int G = Group<S>::kSize;
  const GroupPosition<G> pos(offset, q);
  Acc sum[G];
  sample_sums<S>(weights, ids, 0, num, seed, pos.start, sum);
  apply_group<D>(data, n, pos, sum, lr, subtract);
}

// ---- The split path: the samples in `chunks` contiguous chunks, one partial sum each, then their sum.
//
// Summation order of element j, in the accumulation type (fixed by (num, n, stream) alone, see
// sample_splits; w_k = weights[k], z_k = z(seed, ids[k], offset + j)):
//   p_c = fma(w_{hi-1}, z_{hi-1}, ... fma(w_{lo+1}, z_{lo+1}, fma(w_lo, z_lo, +0)))   for chunk c = [lo, hi)
//   sum = (((p_0 + p_1) + p_2) + ...) + p_{K-1}
//   data[j] = data[j] + sum (reduce) or fma(-lr, sum, data[j]) (step), rounded once to the data type.
// With K = 1 this is the single-kernel path's order, bit for bit.

struct SampleRange {
  int64_t lo;
  int64_t hi;
};

// `chunks` near-equal contiguous chunks of the samples [0, num): the first num % chunks have one more.
// Built on the host, so the kernels divide nothing (a 64-bit division is a subroutine call there).
struct SampleChunks {
  int64_t base;
  int64_t extra;
  ZO_HD SampleChunks(int64_t num, int64_t chunks) : base(num / chunks), extra(num % chunks) {}
  ZO_HD SampleRange range(int64_t c) const {
    const int64_t lo = c * base + (c < extra ? c : extra);
    return SampleRange{lo, lo + base + (c < extra ? 1 : 0)};
  }
};

// row (one of the workspace's, n elements of the accumulation type) = the partial sums of the samples
// in `chunk`, over group q.
template <int S, int D>
ZO_HD void partial_item(typename Io<D>::Acc* row, int64_t n, const typename Io<D>::Acc* weights, const int64_t* ids,
                        SampleRange chunk, uint64_t seed, int64_t offset, int64_t q) {
  using Acc = typename Io<D>::Acc;
  constexpr int G = Group<S>::kSize;
  const GroupPosition<G> pos(offset, q);
  Acc sum[G];
  sample_sums<S>(weights, ids, chunk.lo, chunk.hi, seed, pos.start, sum);
  store_group(row, n, pos, sum);
}

// Group q of data, updated with the sum of the partials in chunk order.
template <int S, int D>
ZO_HD void finish_item(typename Io<D>::T* data, int64_t n, const typename Io<D>::Acc* workspace, int64_t chunks,
                       int64_t offset, typename Io<D>::Acc lr, bool subtract, int64_t q) {
  using Acc = typename Io<D>::Acc;
  constexpr int G = Group<S>::kSize;
  const GroupPosition<G> pos(offset, q);
  Acc sum[G];
  load_group(workspace, n, pos, sum);
  for (int64_t c = 1; c < chunks; ++c) {
    Acc part[G];
    load_group(workspace + c * n, n, pos, part);
#pragma unroll
    for (int e = 0; e < G; ++e) sum[e] += part[e];
  }
  apply_group<D>(data, n, pos, sum, lr, subtract);
}

template <int S>
ZO_HD void fill_item(float* out, int64_t n, uint64_t seed, uint32_t sample, int64_t offset, int64_t q) {
  constexpr int G = Group<S>::kSize;
  const GroupPosition<G> pos(offset, q);
  float z[G];
  group_noise<S>(seed, sample, pos.start, z);
  store_group(out, n, pos, z);
}

// Thread `t`'s share of the squared norm of sample `id` over [lo, hi) (lo a multiple of the chunk):
// groups t, t + kThreads, ... in order. NaN for an id outside [0, 2**32).
template <int S>
ZO_HD double norms_thread_sum(uint64_t seed, int64_t id, int64_t lo, int64_t hi, int t) {
  constexpr int G = Group<S>::kSize;
  double s = 0.0;
  for (int64_t start = lo + static_cast<int64_t>(t) * G; start < hi; start += static_cast<int64_t>(kThreads) * G) {
    float z[G];
    group_noise<S>(seed, static_cast<uint32_t>(id), static_cast<uint64_t>(start), z);
#pragma unroll
    for (int e = 0; e < G; ++e) {
      const double v = start + e < hi ? static_cast<double>(z[e]) : 0.0;  // a select, not a branch
      s += v * v;
    }
  }
  return (static_cast<uint64_t>(id) >> 32) ? quiet_nan<double>() : s;
}

template <int S>
int64_t groups_for(int64_t n, int64_t offset) {
  constexpr int64_t G = Group<S>::kSize;
  return (offset + n - 1) / G - offset / G + 1;
}

int64_t chunks_for(int64_t n) { return (n + kNormChunk - 1) / kNormChunk; }

// ---------------------------------------------------------------------------------------------------
// Kernels: grid-stride loops over the work items.

__device__ __forceinline__ int64_t first_item() { return static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; }
__device__ __forceinline__ int64_t item_stride() { return static_cast<int64_t>(gridDim.x) * kThreads; }

template <int S, int D>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(typename Io<D>::T* out, const typename Io<D>::T* theta, int64_t n, uint64_t seed, uint32_t sample,
                   double scale, int64_t offset, int64_t groups) {
  const RowScales one{scale, scale, 1};
  for (int64_t q = first_item(); q < groups; q += item_stride())
    perturb_item<S, D>(out, theta, n, seed, sample, one, n, offset, q);
}

// blockIdx.y picks sample first + blockIdx.y: its `signs` rows of `out`, scaled by its `signs` scales.
// An id outside [0, 2**32) poisons its rows with NaN, like the reduce (checking it needs a host sync).
template <int S, int D>
__global__ void __launch_bounds__(kThreads)
    perturb_rows_kernel(typename Io<D>::T* out, const typename Io<D>::T* theta, int64_t n, uint64_t seed,
                        const int64_t* __restrict__ ids, const double* __restrict__ scales, int signs, int64_t first,
                        int64_t offset, int64_t groups) {
  const int64_t i = first + blockIdx.y;
  const RowScales row_scales = sample_scales(ids, scales, i, signs);
  const uint32_t sample = static_cast<uint32_t>(ids[i]);
  for (int64_t q = first_item(); q < groups; q += item_stride())
    perturb_item<S, D>(out + i * signs * n, theta, n, seed, sample, row_scales, n, offset, q);
}

template <int S, int D>
__global__ void __launch_bounds__(kThreads)
    accumulate_kernel(typename Io<D>::T* data, int64_t n, const typename Io<D>::Acc* __restrict__ weights,
                      const int64_t* __restrict__ ids, int64_t num, uint64_t seed, int64_t offset, int64_t groups,
                      typename Io<D>::Acc lr, bool subtract) {
  for (int64_t q = first_item(); q < groups; q += item_stride())
    accumulate_item<S, D>(data, n, weights, ids, num, seed, offset, lr, subtract, q);
}

// blockIdx.y is the chunk: row blockIdx.y of the workspace.
template <int S, int D>
__global__ void __launch_bounds__(kThreads)
    partial_kernel(typename Io<D>::Acc* workspace, int64_t n, const typename Io<D>::Acc* __restrict__ weights,
                   const int64_t* __restrict__ ids, SampleChunks chunks, uint64_t seed, int64_t offset,
                   int64_t groups) {
  typename Io<D>::Acc* row = workspace + blockIdx.y * n;
  const SampleRange chunk = chunks.range(blockIdx.y);
  for (int64_t q = first_item(); q < groups; q += item_stride())
    partial_item<S, D>(row, n, weights, ids, chunk, seed, offset, q);
}

template <int S, int D>
__global__ void __launch_bounds__(kThreads)
    finish_kernel(typename Io<D>::T* data, int64_t n, const typename Io<D>::Acc* __restrict__ workspace,
                  int64_t chunks, int64_t offset, int64_t groups, typename Io<D>::Acc lr, bool subtract) {
  for (int64_t q = first_item(); q < groups; q += item_stride())
    finish_item<S, D>(data, n, workspace, chunks, offset, lr, subtract, q);
}

template <int S>
__global__ void __launch_bounds__(kThreads)
    fill_kernel(float* out, int64_t n, uint64_t seed, uint32_t sample, int64_t offset, int64_t groups) {
  for (int64_t q = first_item(); q < groups; q += item_stride()) fill_item<S>(out, n, seed, sample, offset, q);
}

// Sum of v over the block in a fixed tree order (deterministic); every thread gets the total.
__device__ __forceinline__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();  // `shared` may be reused right after
  return total;
}

// partial[k * chunks + c] = sum of z(seed, ids[k], j)^2 over chunk c of [0, n); one block per (k, c).
template <int S>
__global__ void __launch_bounds__(kThreads)
    norms_partial_kernel(double* partial, const int64_t* __restrict__ ids, int64_t num, int64_t n, uint64_t seed,
                         int64_t chunks) {
  static_assert(kNormChunk % (static_cast<int64_t>(Group<S>::kSize) * kThreads) == 0, "whole rounds of groups");
  __shared__ double shared[kThreads];
  const int64_t total = num * chunks;
  for (int64_t p = blockIdx.x; p < total; p += gridDim.x) {  // uniform per block: __syncthreads is safe
    const int64_t k = p / chunks;
    const int64_t lo = (p % chunks) * kNormChunk;
    const int64_t hi = n - lo < kNormChunk ? n : lo + kNormChunk;
    const double s = norms_thread_sum<S>(seed, load_shared_value(ids + k), lo, hi, static_cast<int>(threadIdx.x));
    const double sum = block_sum(s, shared);
    if (threadIdx.x == 0) partial[p] = sum;
  }
}

// out[k] = sum over c of partial[k * chunks + c], in a fixed order; one block per sample.
__global__ void __launch_bounds__(kThreads)
    norms_final_kernel(double* out, const double* __restrict__ partial, int64_t num, int64_t chunks) {
  __shared__ double shared[kThreads];
  for (int64_t k = blockIdx.x; k < num; k += gridDim.x) {
    double s = 0.0;
    for (int64_t c = threadIdx.x; c < chunks; c += kThreads) s += partial[k * chunks + c];
    const double sum = block_sum(s, shared);
    if (threadIdx.x == 0) out[k] = sum;
  }
}

__global__ void philox_words_kernel(uint32_t* out, int64_t blocks, uint64_t seed, uint32_t sample,
                                    uint64_t block0) {
  for (int64_t b = first_item(); b < blocks; b += item_stride()) {
    const Words w = block_words(seed, sample, block0 + static_cast<uint64_t>(b));
#pragma unroll
    for (int i = 0; i < 4; ++i) out[4 * b + i] = w.x[i];
  }
}

__global__ void philox_raw_kernel(uint32_t* out, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                  uint32_t k1) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const Words w = zo::philox4x32_10(c0, c1, c2, c3, k0, k1);
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = w.x[i];
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side.

[[noreturn]] void fail(const char* what, cudaError_t err) {
  throw std::runtime_error(std::string("zo_kernels._C_cuda: ") + what + " failed: " + cudaGetErrorName(err) + ": " +
                           cudaGetErrorString(err));
}

// A failed runtime call is also recorded as the thread's "last error": clear it, or the next launch
// check would report it again.
void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();
    fail(what, err);
  }
}

// Every launch is checked: configuration errors and sticky errors of earlier kernels surface here
// (cudaGetLastError also resets the non-sticky ones).
void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) fail(kernel, err);
}

cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// Makes `device` current for the launches of one call and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    int current = 0;
    check(cudaGetDevice(&current), "cudaGetDevice");
    if (current != device) {
      check(cudaSetDevice(device), "cudaSetDevice");
      previous_ = current;
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

int sm_count(int device) {
  constexpr int kCached = 64;
  static std::atomic<int> cache[kCached] = {};
  if (device >= 0 && device < kCached) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int count = 0;
  check(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  count = std::max(count, 1);
  if (device >= 0 && device < kCached) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

// Blocks for a grid-stride loop over `items` (threads' work items, or blocks' with per_block = 1).
unsigned grid_for(int64_t items, int64_t per_block, int device) {
  const int64_t wanted = (items + per_block - 1) / per_block;
  const int64_t cap = sm_count(device) * kBlocksPerSm;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(wanted, cap)));
}

void check_ids(int stream, int dtype) {
  if (stream != kNormal && stream != kRademacher) throw std::invalid_argument("zo_kernels._C_cuda: unknown stream id");
  if (dtype < kFloat32 || dtype > kBFloat16) throw std::invalid_argument("zo_kernels._C_cuda: unsupported dtype id");
}

// Calls Op<S, D>::run(args...) for runtime stream and dtype ids.
template <template <int, int> class Op, int S, typename... Args>
void dispatch_dtype(int dtype, Args... args) {
  switch (dtype) {
    case kFloat32: return Op<S, kFloat32>::run(args...);
    case kFloat64: return Op<S, kFloat64>::run(args...);
    case kFloat16: return Op<S, kFloat16>::run(args...);
    case kBFloat16: return Op<S, kBFloat16>::run(args...);
    default: throw std::invalid_argument("zo_kernels._C_cuda: unsupported dtype id");
  }
}

template <template <int, int> class Op, typename... Args>
void dispatch(int stream, int dtype, Args... args) {
  switch (stream) {
    case kNormal: return dispatch_dtype<Op, kNormal>(dtype, args...);
    case kRademacher: return dispatch_dtype<Op, kRademacher>(dtype, args...);
    default: throw std::invalid_argument("zo_kernels._C_cuda: unknown stream id");
  }
}

template <int S, int D>
struct PerturbOp {
  static void run(void* out, const void* theta, int64_t n, uint64_t seed, uint32_t sample, double scale,
                  int64_t offset, int device, cudaStream_t stream) {
    using IO = Io<D>;
    using T = typename IO::T;
    const int64_t groups = groups_for<S>(n, offset);
    perturb_kernel<S, D><<<grid_for(groups, kThreads, device), kThreads, 0, stream>>>(
        static_cast<T*>(out), static_cast<const T*>(theta), n, seed, sample, scale, offset, groups);
    check_launch("perturb kernel launch");
  }
};

template <int S, int D>
struct PerturbRowsOp {
  static void run(void* out, const void* theta, int64_t n, uint64_t seed, const int64_t* ids, int64_t num,
                  const double* scales, int signs, int64_t offset, int device, cudaStream_t stream) {
    using T = typename Io<D>::T;
    const int64_t groups = groups_for<S>(n, offset);
    const unsigned x = grid_for(groups, kThreads, device);
    for (int64_t first = 0; first < num; first += kMaxGridY) {
      const unsigned y = static_cast<unsigned>(std::min<int64_t>(kMaxGridY, num - first));
      perturb_rows_kernel<S, D><<<dim3(x, y), kThreads, 0, stream>>>(
          static_cast<T*>(out), static_cast<const T*>(theta), n, seed, ids, scales, signs, first, offset, groups);
      check_launch("perturb_rows kernel launch");
    }
  }
};

// reduce/step: one kernel when chunks == 1, else the partial sums of the chunks into `workspace`
// (chunks x n) and a finishing kernel that adds them up in chunk order and updates data.
template <int S, int D>
struct AccumulateOp {
  static void run(void* data, int64_t n, const void* weights, const int64_t* ids, int64_t num, uint64_t seed,
                  int64_t offset, double lr, bool subtract, void* workspace, int64_t chunks, int device,
                  cudaStream_t stream) {
    using IO = Io<D>;
    using T = typename IO::T;
    using Acc = typename IO::Acc;
    const int64_t groups = groups_for<S>(n, offset);
    const unsigned x = grid_for(groups, kThreads, device);
    const char* what = subtract ? "step kernel launch" : "reduce kernel launch";
    if (chunks == 1) {
      accumulate_kernel<S, D><<<x, kThreads, 0, stream>>>(static_cast<T*>(data), n, static_cast<const Acc*>(weights),
                                                          ids, num, seed, offset, groups, static_cast<Acc>(lr),
                                                          subtract);
      check_launch(what);
      return;
    }
    Acc* partial = static_cast<Acc*>(workspace);
    partial_kernel<S, D><<<dim3(x, static_cast<unsigned>(chunks)), kThreads, 0, stream>>>(
        partial, n, static_cast<const Acc*>(weights), ids, SampleChunks(num, chunks), seed, offset, groups);
    check_launch(what);
    finish_kernel<S, D><<<x, kThreads, 0, stream>>>(static_cast<T*>(data), n, partial, chunks, offset, groups,
                                                    static_cast<Acc>(lr), subtract);
    check_launch(what);
  }
};

void accumulate(void* data, int64_t n, int dtype, const void* weights, const int64_t* ids, int64_t num, int stream,
                uint64_t seed, int64_t offset, double lr, bool subtract, void* workspace, int device,
                uintptr_t cuda_stream) {
  check_ids(stream, dtype);
  const int64_t chunks = sample_splits(num, n, stream);
  // No samples: nothing to add, and adding +0.0 would still turn -0.0 into +0.0.
  if (chunks == 0) return;
  if (chunks > 1 && workspace == nullptr)
    throw std::invalid_argument("zo_kernels._C_cuda: reduce/step need a workspace of reduce_workspace() elements");
  DeviceGuard guard(device);
  dispatch<AccumulateOp>(stream, dtype, data, n, weights, ids, num, seed, offset, lr, subtract, workspace, chunks,
                         device, as_stream(cuda_stream));
}

}  // namespace

void perturb(void* out, const void* theta, int64_t n, int dtype, int stream, uint64_t seed, uint32_t sample,
             double scale, int64_t offset, int device, uintptr_t cuda_stream) {
  check_ids(stream, dtype);
  if (n <= 0) return;
  DeviceGuard guard(device);
  dispatch<PerturbOp>(stream, dtype, out, theta, n, seed, sample, scale, offset, device, as_stream(cuda_stream));
}

void perturb_rows(void* out, const void* theta, int64_t n, int dtype, int stream, uint64_t seed, const int64_t* ids,
                  int64_t num, const double* scales, int signs, int64_t offset, int device, uintptr_t cuda_stream) {
  check_ids(stream, dtype);
  if (n <= 0 || num <= 0) return;
  if (signs < 1 || signs > 2) throw std::invalid_argument("zo_kernels._C_cuda: perturb_rows takes 1 or 2 signs");
  DeviceGuard guard(device);
  dispatch<PerturbRowsOp>(stream, dtype, out, theta, n, seed, ids, num, scales, signs, offset, device,
                          as_stream(cuda_stream));
}

int64_t sample_splits(int64_t num, int64_t n, int stream) {
  check_ids(stream, kFloat32);
  if (num <= 0 || n <= 0) return 0;
  const int64_t g = stream == kNormal ? Group<kNormal>::kSize : Group<kRademacher>::kSize;
  const int64_t threads = (n + g - 1) / g;  // per chunk (an offset's head group aside)
  const int64_t k = std::min({kSplitThreads / threads, num / kMinChunkSamples, kMaxWorkspaceElements / n, kMaxGridY});
  return std::max<int64_t>(k, 1);
}

int64_t reduce_workspace(int64_t num, int64_t n, int stream) {
  const int64_t chunks = sample_splits(num, n, stream);
  return chunks > 1 ? chunks * n : 0;
}

void reduce(void* grad, int64_t n, int dtype, const void* weights, const int64_t* ids, int64_t num, int stream,
            uint64_t seed, int64_t offset, void* workspace, int device, uintptr_t cuda_stream) {
  accumulate(grad, n, dtype, weights, ids, num, stream, seed, offset, 1.0, false, workspace, device, cuda_stream);
}

void step(void* theta, int64_t n, int dtype, const void* weights, const int64_t* ids, int64_t num, int stream,
          uint64_t seed, double lr, int64_t offset, void* workspace, int device, uintptr_t cuda_stream) {
  accumulate(theta, n, dtype, weights, ids, num, stream, seed, offset, lr, true, workspace, device, cuda_stream);
}

int64_t squared_norms_workspace(int64_t num, int64_t n) { return num > 0 && n > 0 ? num * chunks_for(n) : 0; }

void squared_norms(double* out, double* workspace, const int64_t* ids, int64_t num, int64_t n, int stream,
                   uint64_t seed, int device, uintptr_t cuda_stream) {
  check_ids(stream, kFloat32);
  if (num <= 0) return;
  DeviceGuard guard(device);
  const cudaStream_t st = as_stream(cuda_stream);
  const int64_t chunks = n > 0 ? chunks_for(n) : 0;
  if (chunks > 0) {
    const unsigned grid = grid_for(num * chunks, 1, device);
    if (stream == kNormal) {
      norms_partial_kernel<kNormal><<<grid, kThreads, 0, st>>>(workspace, ids, num, n, seed, chunks);
    } else {
      norms_partial_kernel<kRademacher><<<grid, kThreads, 0, st>>>(workspace, ids, num, n, seed, chunks);
    }
    check_launch("squared_norms partial-sum kernel launch");
  }
  norms_final_kernel<<<grid_for(num, 1, device), kThreads, 0, st>>>(out, workspace, num, chunks);
  check_launch("squared_norms final-sum kernel launch");
}

void fill(float* out, int64_t n, int stream, uint64_t seed, uint32_t sample, int64_t offset, int device,
          uintptr_t cuda_stream) {
  check_ids(stream, kFloat32);
  if (n <= 0) return;
  DeviceGuard guard(device);
  const cudaStream_t st = as_stream(cuda_stream);
  if (stream == kNormal) {
    const int64_t groups = groups_for<kNormal>(n, offset);
    fill_kernel<kNormal><<<grid_for(groups, kThreads, device), kThreads, 0, st>>>(out, n, seed, sample, offset,
                                                                                  groups);
  } else {
    const int64_t groups = groups_for<kRademacher>(n, offset);
    fill_kernel<kRademacher><<<grid_for(groups, kThreads, device), kThreads, 0, st>>>(out, n, seed, sample, offset,
                                                                                      groups);
  }
  check_launch("fill kernel launch");
}

void philox_words(uint32_t* out, int64_t blocks, uint64_t seed, uint32_t sample, uint64_t block0, int device,
                  uintptr_t cuda_stream) {
  if (blocks <= 0) return;
  DeviceGuard guard(device);
  philox_words_kernel<<<grid_for(blocks, kThreads, device), kThreads, 0, as_stream(cuda_stream)>>>(out, blocks, seed,
                                                                                                  sample, block0);
  check_launch("philox_words kernel launch");
}

void philox4x32_10(uint32_t* out, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                   int device, uintptr_t cuda_stream) {
  DeviceGuard guard(device);
  philox_raw_kernel<<<1, 1, 0, as_stream(cuda_stream)>>>(out, c0, c1, c2, c3, k0, k1);
  check_launch("philox4x32_10 kernel launch");
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error: no driver or no device is not a failure here
    return 0;
  }
  return count;
}

int runtime_version() { return CUDART_VERSION; }

int min_architecture() {
#if defined(__CUDA_ARCH_LIST__)
  constexpr int kArchs[] = {__CUDA_ARCH_LIST__};
  int lowest = kArchs[0];
  for (int a : kArchs) lowest = std::min(lowest, a);
  return lowest;
#else
  return 0;
#endif
}

}  // namespace cuda
}  // namespace zo
