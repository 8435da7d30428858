// Fused CPU kernels: OpenMP over tiles of elements; inside a tile, the samples are visited in order,
// so every element's sum has the same order whatever the thread count (deterministic results).
#include "kernels.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "../philox.h"
#include "normal_tile.h"
#include "../dtypes.h"

namespace zo {
namespace cpu {
namespace {

// Elements per tile: a multiple of every stream's block length, small enough to stay in L1/L2.
constexpr int64_t kTile = 2048;

// z[k] = z(seed, sample, start + k) for k < len <= kTile, one Philox call per block touched.
template <int S>
void fill_tile(float* z, uint64_t seed, uint32_t sample, uint64_t start, int64_t len);

template <>
void fill_tile<kNormal>(float* z, uint64_t seed, uint32_t sample, uint64_t start, int64_t len) {
  if (len <= 0) return;
  const uint64_t block0 = start / 4;
  const int lane0 = static_cast<int>(start % 4);
  const int nblocks = static_cast<int>((static_cast<uint64_t>(lane0) + static_cast<uint64_t>(len) + 3) / 4);
  float values[4 * kMaxTileBlocks];
  normal_blocks(values, seed, sample, block0, nblocks);
  std::copy(values + lane0, values + lane0 + len, z);
}

template <>
void fill_tile<kRademacher>(float* z, uint64_t seed, uint32_t sample, uint64_t start, int64_t len) {
  if (len <= 0) return;
  constexpr int P = StreamTraits<kRademacher>::kPerBlock;
  const uint64_t block0 = start / P;
  const int lane0 = static_cast<int>(start % P);
  const int nblocks = static_cast<int>((static_cast<uint64_t>(lane0) + static_cast<uint64_t>(len) + P - 1) / P);
  uint32_t words[4 * (kTile / P + 1)];
  for (int i = 0; i < nblocks; ++i) {
    const Words w = block_words(seed, sample, block0 + static_cast<uint64_t>(i));
    for (int k = 0; k < 4; ++k) words[4 * i + k] = w.x[k];
  }
  // +1.0f with the sign bit set where the stream's bit is 0: branch-free, so the bit loop vectorizes.
  // Bit masks from a table, not `word >> b`: SSE2 has no per-lane variable shift.
  static constexpr uint32_t kBit[32] = {
      1u << 0,  1u << 1,  1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,  1u << 8,  1u << 9,  1u << 10,
      1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15, 1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21,
      1u << 22, 1u << 23, 1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31};
  float values[P * (kTile / P + 1)];
  for (int wi = 0; wi < 4 * nblocks; ++wi) {
    const uint32_t word = words[wi];
    float* dst = values + 32 * wi;
    for (int b = 0; b < 32; ++b) dst[b] = bits_float(0x3F800000u | ((word & kBit[b]) ? 0u : 0x80000000u));
  }
  std::copy(values + lane0, values + lane0 + len, z);
}

using FillFn = void (*)(float*, uint64_t, uint32_t, uint64_t, int64_t);

FillFn fill_for(int stream) {
  if (stream == kNormal) return &fill_tile<kNormal>;
  if (stream == kRademacher) return &fill_tile<kRademacher>;
  throw std::invalid_argument("zo_kernels._C: unknown stream id");
}

int64_t tiles(int64_t n) { return (n + kTile - 1) / kTile; }

// Threads worth waking for `work` stream values: below kMinWorkPerThread values each, waking the
// OpenMP team costs more than it saves, and on a loaded machine it can stall behind PyTorch's own
// thread pool, so small calls run on the calling thread.
constexpr int64_t kMinWorkPerThread = int64_t(1) << 16;

int team_size(int threads, int64_t work) {
  const int64_t useful = std::max<int64_t>(1, work / kMinWorkPerThread);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, useful)));
}

// Rows r = i * signs + k of `out` get theta + scales[r] * z(seed, ids[i], offset + j): the noise of
// sample i is generated once per tile for all its rows (the antithetic pair shares it), and copied to
// row i of `keep` when that is not null. One sample and one sign is the plain per-sample perturb.
template <int D>
void perturb_impl(void* out_v, const void* theta_v, int64_t n, FillFn fill, uint64_t seed, const int64_t* ids,
                  int64_t num, const double* scales, int signs, int64_t offset, float* keep, int threads) {
  using IO = Io<D>;
  using T = typename IO::T;
  using Acc = typename IO::Acc;
  T* out = static_cast<T*>(out_v);
  const T* theta = static_cast<const T*>(theta_v);
  const int64_t per_row = tiles(n);
  const int team = team_size(threads, n * num * signs);
#pragma omp parallel for num_threads(team) if (team > 1) schedule(static)
  for (int64_t job = 0; job < num * per_row; ++job) {
    float z[kTile];
    const int64_t i = job / per_row;
    const int64_t lo = (job % per_row) * kTile;
    const int64_t len = std::min(kTile, n - lo);
    fill(z, seed, static_cast<uint32_t>(ids[i]), static_cast<uint64_t>(offset + lo), len);
    for (int k = 0; k < signs; ++k) {
      const Acc s = static_cast<Acc>(scales[i * signs + k]);
      T* row = out + (i * signs + k) * n;
      for (int64_t e = 0; e < len; ++e) row[lo + e] = IO::store(IO::load(theta[lo + e]) + s * static_cast<Acc>(z[e]));
    }
    if (keep != nullptr) std::copy(z, z + len, keep + i * n + lo);
  }
}

// acc[k] = sum_i w_i z(seed, ids[i], start + k) for one tile; the sum over i runs in order.
template <typename Acc>
void combine_tile(Acc* acc, float* z, int64_t len, FillFn fill, const double* weights, const int64_t* ids,
                  int64_t num, uint64_t seed, uint64_t start) {
  std::fill(acc, acc + len, Acc(0));
  for (int64_t i = 0; i < num; ++i) {
    fill(z, seed, static_cast<uint32_t>(ids[i]), start, len);
    const Acc w = static_cast<Acc>(weights[i]);
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) acc[k] += w * static_cast<Acc>(z[k]);
  }
}

// reduce: data[j] += sum_i w_i z_i[j]; step (descend): data[j] -= lr * sum_i w_i z_i[j].
template <int D>
void accumulate_impl(void* data_v, int64_t n, const double* weights, const int64_t* ids, int64_t num, FillFn fill,
                     uint64_t seed, bool descend, double lr, int64_t offset, int threads) {
  using IO = Io<D>;
  using T = typename IO::T;
  using Acc = typename IO::Acc;
  T* data = static_cast<T*>(data_v);
  const Acc f = static_cast<Acc>(lr);
  const int team = team_size(threads, n * std::max<int64_t>(num, 1));
#pragma omp parallel for num_threads(team) if (team > 1) schedule(static)
  for (int64_t t = 0; t < tiles(n); ++t) {
    float z[kTile];
    Acc acc[kTile];
    const int64_t lo = t * kTile;
    const int64_t len = std::min(kTile, n - lo);
    combine_tile<Acc>(acc, z, len, fill, weights, ids, num, seed, static_cast<uint64_t>(offset + lo));
    if (descend) {
      for (int64_t k = 0; k < len; ++k) data[lo + k] = IO::store(IO::load(data[lo + k]) - f * acc[k]);
    } else {
      for (int64_t k = 0; k < len; ++k) data[lo + k] = IO::store(IO::load(data[lo + k]) + acc[k]);
    }
  }
}

template <template <int> class Fn, typename... Args>
void dispatch(int dtype, Args... args) {
  switch (dtype) {
    case kFloat32: return Fn<kFloat32>::run(args...);
    case kFloat64: return Fn<kFloat64>::run(args...);
    case kFloat16: return Fn<kFloat16>::run(args...);
    case kBFloat16: return Fn<kBFloat16>::run(args...);
    default: throw std::invalid_argument("zo_kernels._C: unsupported dtype id");
  }
}

template <int D>
struct PerturbOp {
  template <typename... Args>
  static void run(Args... args) { perturb_impl<D>(args...); }
};

template <int D>
struct AccumulateOp {
  template <typename... Args>
  static void run(Args... args) { accumulate_impl<D>(args...); }
};

}  // namespace

void perturb(void* out, const void* theta, int64_t n, int dtype, int stream, uint64_t seed, uint32_t sample,
             double scale, int64_t offset, float* keep, int threads) {
  const int64_t id = sample;
  dispatch<PerturbOp>(dtype, out, theta, n, fill_for(stream), seed, &id, int64_t(1), &scale, 1, offset, keep,
                      threads);
}

void perturb_rows(void* out, const void* theta, int64_t n, int dtype, int stream, uint64_t seed, const int64_t* ids,
                  int64_t num, const double* scales, int signs, int64_t offset, float* keep, int threads) {
  dispatch<PerturbOp>(dtype, out, theta, n, fill_for(stream), seed, ids, num, scales, signs, offset, keep, threads);
}

void reduce(void* grad, int64_t n, int dtype, const double* weights, const int64_t* ids, int64_t num, int stream,
            uint64_t seed, int64_t offset, int threads) {
  dispatch<AccumulateOp>(dtype, grad, n, weights, ids, num, fill_for(stream), seed, false, 1.0, offset, threads);
}

void step(void* theta, int64_t n, int dtype, const double* weights, const int64_t* ids, int64_t num, int stream,
          uint64_t seed, double lr, int64_t offset, int threads) {
  dispatch<AccumulateOp>(dtype, theta, n, weights, ids, num, fill_for(stream), seed, true, lr, offset, threads);
}

void squared_norms(double* out, const int64_t* ids, int64_t num, int64_t n, int stream, uint64_t seed,
                   int threads) {
  const FillFn fill = fill_for(stream);
  std::vector<double> partial(static_cast<size_t>(tiles(n)));
  const int team = team_size(threads, n);
  for (int64_t i = 0; i < num; ++i) {
#pragma omp parallel for num_threads(team) if (team > 1) schedule(static)
    for (int64_t t = 0; t < tiles(n); ++t) {
      float z[kTile];
      const int64_t lo = t * kTile;
      const int64_t len = std::min(kTile, n - lo);
      fill(z, seed, static_cast<uint32_t>(ids[i]), static_cast<uint64_t>(lo), len);
      double s = 0.0;
      for (int64_t k = 0; k < len; ++k) s += static_cast<double>(z[k]) * static_cast<double>(z[k]);
      partial[static_cast<size_t>(t)] = s;
    }
    double total = 0.0;
    for (double p : partial) total += p;  // fixed order: deterministic for any thread count
    out[i] = total;
  }
}

void fill(float* out, int64_t n, int stream, uint64_t seed, uint32_t sample, int64_t offset, int threads) {
  const FillFn f = fill_for(stream);
  const int team = team_size(threads, n);
#pragma omp parallel for num_threads(team) if (team > 1) schedule(static)
  for (int64_t t = 0; t < tiles(n); ++t) {
    const int64_t lo = t * kTile;
    f(out + lo, seed, sample, static_cast<uint64_t>(offset + lo), std::min(kTile, n - lo));
  }
}

void philox_words(uint32_t* out, int64_t blocks, uint64_t seed, uint32_t sample, uint64_t block0) {
  for (int64_t b = 0; b < blocks; ++b) {
    const Words w = block_words(seed, sample, block0 + static_cast<uint64_t>(b));
    for (int k = 0; k < 4; ++k) out[4 * b + k] = w.x[k];
  }
}

}  // namespace cpu
}  // namespace zo
