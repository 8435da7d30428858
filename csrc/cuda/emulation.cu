// Host emulation of the CUDA kernels' work items, for tests/test_cuda_compile.py (no GPU needed).
//
// csrc/cuda/kernels.cu keeps each thread's work (one group of elements) in __host__ __device__
// functions. This file includes kernels.cu and runs those same functions item by item on the CPU with
// the kernels' grid-stride schedule (first_item() + k * item_stride(), over a small grid so the loops
// take several rounds) and the squared norms' tree order, so the indexing, head/tail handling,
// vectorized and scalar paths, dtype conversions and summation order are checked against the
// reference without a GPU. Only the math library differs (glibc here, CUDA's on the device). The
// test compiles it with nvcc into a shared library and calls the extern "C" entry points below.
// When a kernel's schedule in kernels.cu changes, the matching Emu* here changes with it.
#include "cuda/kernels.cu"

#include <vector>

namespace {
using namespace zo;
using namespace zo::cuda;

int g_blocks = 3;  // a small grid, so that the grid-stride loops take several rounds

template <typename F>
void for_each_item(int64_t items, F f) {
  const int64_t stride = static_cast<int64_t>(g_blocks) * kThreads;
  for (int b = 0; b < g_blocks; ++b)
    for (int t = 0; t < kThreads; ++t)
      for (int64_t q = static_cast<int64_t>(b) * kThreads + t; q < items; q += stride) f(q);
}

template <int S, int D>
struct EmuPerturb {
  static void run(void* out, const void* theta, int64_t n, uint64_t seed, uint32_t sample, double scale,
                  int64_t offset) {
    using T = typename Io<D>::T;
    for_each_item(groups_for<S>(n, offset), [&](int64_t q) {
      perturb_item<S, D>(static_cast<T*>(out), static_cast<const T*>(theta), n, seed, sample,
                         RowScales{scale, scale, 1}, n, offset, q);
    });
  }
};

template <int S, int D>
struct EmuPerturbRows {  // perturb_rows_kernel: blockIdx.y over the samples, the grid-stride loop inside
  static void run(void* out, const void* theta, int64_t n, uint64_t seed, const int64_t* ids, int64_t num,
                  const double* scales, int signs, int64_t offset) {
    using T = typename Io<D>::T;
    for (int64_t i = 0; i < num; ++i) {
      const RowScales row_scales = sample_scales(ids, scales, i, signs);
      for_each_item(groups_for<S>(n, offset), [&](int64_t q) {
        perturb_item<S, D>(static_cast<T*>(out) + i * signs * n, static_cast<const T*>(theta), n, seed,
                           static_cast<uint32_t>(ids[i]), row_scales, n, offset, q);
      });
    }
  }
};

template <int S, int D>
struct EmuAccumulate {
  static void run(void* data, int64_t n, const void* weights, const int64_t* ids, int64_t num, uint64_t seed,
                  int64_t offset, double lr, bool subtract) {
    using T = typename Io<D>::T;
    using Acc = typename Io<D>::Acc;
    for_each_item(groups_for<S>(n, offset), [&](int64_t q) {
      accumulate_item<S, D>(static_cast<T*>(data), n, static_cast<const Acc*>(weights), ids, num, seed, offset,
                            static_cast<Acc>(lr), subtract, q);
    });
  }
};

template <int S, int D>
struct EmuSplit {  // partial_kernel (gridDim.y = chunks), then finish_kernel
  static void run(void* data, int64_t n, const void* weights, const int64_t* ids, int64_t num, uint64_t seed,
                  int64_t offset, double lr, bool subtract, int64_t chunks) {
    using T = typename Io<D>::T;
    using Acc = typename Io<D>::Acc;
    // NaN-filled: an element the partial kernel leaves unwritten would show in the result.
    std::vector<Acc> work(static_cast<size_t>(chunks * n), quiet_nan<Acc>());
    const SampleChunks split(num, chunks);
    for (int64_t c = 0; c < chunks; ++c)
      for_each_item(groups_for<S>(n, offset), [&](int64_t q) {
        partial_item<S, D>(work.data() + c * n, n, static_cast<const Acc*>(weights), ids, split.range(c), seed,
                           offset, q);
      });
    for_each_item(groups_for<S>(n, offset), [&](int64_t q) {
      finish_item<S, D>(static_cast<T*>(data), n, work.data(), chunks, offset, static_cast<Acc>(lr), subtract, q);
    });
  }
};

// The split path's summation order (kernels.cu) written out element by element with philox.h alone (no
// groups, packets or work items): what the kernels must reproduce bit for bit.
template <int S>
float plain_noise(uint64_t seed, int64_t id, uint64_t j) {
  const Words w = block_words(seed, static_cast<uint32_t>(id), j / StreamTraits<S>::kPerBlock);
  if constexpr (S == kNormal) {
    float z[4];
    normal_block(w, z);
    return z[j % 4];
  } else {
    return rademacher_sign(w, static_cast<int>(j % 128));
  }
}

template <int S, int D>
struct PlainSplit {
  static void run(void* data, int64_t n, const void* weights, const int64_t* ids, int64_t num, uint64_t seed,
                  int64_t offset, double lr, bool subtract, int64_t chunks) {
    using IO = Io<D>;
    using Acc = typename IO::Acc;
    auto* d = static_cast<typename IO::T*>(data);
    const auto* w = static_cast<const Acc*>(weights);
    for (int64_t j = 0; j < n; ++j) {
      Acc sum = 0;
      for (int64_t c = 0, lo = 0; c < chunks; ++c) {
        const int64_t hi = lo + num / chunks + (c < num % chunks ? 1 : 0);
        Acc part = 0;
        for (int64_t k = lo; k < hi; ++k) {
          const Acc wk = ids[k] < 0 || ids[k] >= (int64_t{1} << 32) ? quiet_nan<Acc>() : w[k];
          part = std::fma(wk, static_cast<Acc>(plain_noise<S>(seed, ids[k], offset + j)), part);
        }
        sum = c == 0 ? part : sum + part;
        lo = hi;
      }
      const Acc value = IO::load(d[j]);
      d[j] = IO::store(subtract ? std::fma(-static_cast<Acc>(lr), sum, value) : value + sum);
    }
  }
};

double tree_sum(std::vector<double> v) {  // block_sum's order
  for (int s = kThreads / 2; s > 0; s >>= 1)
    for (int t = 0; t < s; ++t) v[t] += v[t + s];
  return v[0];
}

template <int S>
void emu_norms(double* out, const int64_t* ids, int64_t num, int64_t n, uint64_t seed) {
  const int64_t chunks = n > 0 ? chunks_for(n) : 0;
  std::vector<double> partial(static_cast<size_t>(num * chunks));
  for (int64_t p = 0; p < num * chunks; ++p) {
    const int64_t lo = (p % chunks) * kNormChunk;
    const int64_t hi = n - lo < kNormChunk ? n : lo + kNormChunk;
    std::vector<double> v(kThreads);
    for (int t = 0; t < kThreads; ++t) v[t] = norms_thread_sum<S>(seed, ids[p / chunks], lo, hi, t);
    partial[p] = tree_sum(v);
  }
  for (int64_t k = 0; k < num; ++k) {
    std::vector<double> v(kThreads, 0.0);
    for (int t = 0; t < kThreads; ++t)
      for (int64_t c = t; c < chunks; c += kThreads) v[t] += partial[k * chunks + c];
    out[k] = tree_sum(v);
  }
}
}  // namespace

extern "C" {
void emu_set_blocks(int blocks) { g_blocks = blocks; }
int64_t emu_groups(int stream, int64_t n, int64_t offset) {
  return stream == kNormal ? groups_for<kNormal>(n, offset) : groups_for<kRademacher>(n, offset);
}
void emu_perturb(void* out, const void* theta, int64_t n, int dtype, int stream, uint64_t seed, uint32_t sample,
                 double scale, int64_t offset) {
  if (n > 0) dispatch<EmuPerturb>(stream, dtype, out, theta, n, seed, sample, scale, offset);
}
void emu_perturb_rows(void* out, const void* theta, int64_t n, int dtype, int stream, uint64_t seed, const int64_t* ids,
                      int64_t num, const double* scales, int signs, int64_t offset) {
  if (n > 0) dispatch<EmuPerturbRows>(stream, dtype, out, theta, n, seed, ids, num, scales, signs, offset);
}
void emu_accumulate(void* data, int64_t n, int dtype, const void* weights, const int64_t* ids, int64_t num,
                    int stream, uint64_t seed, int64_t offset, double lr, int subtract) {
  if (n > 0) dispatch<EmuAccumulate>(stream, dtype, data, n, weights, ids, num, seed, offset, lr, subtract != 0);
}
void emu_split(void* data, int64_t n, int dtype, const void* weights, const int64_t* ids, int64_t num, int stream,
               uint64_t seed, int64_t offset, double lr, int subtract, int64_t chunks) {
  dispatch<EmuSplit>(stream, dtype, data, n, weights, ids, num, seed, offset, lr, subtract != 0, chunks);
}
void plain_split(void* data, int64_t n, int dtype, const void* weights, const int64_t* ids, int64_t num, int stream,
                 uint64_t seed, int64_t offset, double lr, int subtract, int64_t chunks) {
  dispatch<PlainSplit>(stream, dtype, data, n, weights, ids, num, seed, offset, lr, subtract != 0, chunks);
}
int64_t emu_sample_splits(int64_t num, int64_t n, int stream) { return sample_splits(num, n, stream); }
// reduce/step as the host functions run them: sample_splits picks nothing, one kernel or the split.
void emu_reduce(void* data, int64_t n, int dtype, const void* weights, const int64_t* ids, int64_t num, int stream,
                uint64_t seed, int64_t offset, double lr, int subtract) {
  const int64_t chunks = sample_splits(num, n, stream);
  if (chunks == 1) dispatch<EmuAccumulate>(stream, dtype, data, n, weights, ids, num, seed, offset, lr, subtract != 0);
  if (chunks > 1) emu_split(data, n, dtype, weights, ids, num, stream, seed, offset, lr, subtract, chunks);
}
void emu_fill(float* out, int64_t n, int stream, uint64_t seed, uint32_t sample, int64_t offset) {
  if (stream == kNormal) for_each_item(groups_for<kNormal>(n, offset), [&](int64_t q) {
    fill_item<kNormal>(out, n, seed, sample, offset, q); });
  else for_each_item(groups_for<kRademacher>(n, offset), [&](int64_t q) {
    fill_item<kRademacher>(out, n, seed, sample, offset, q); });
}
void emu_squared_norms(double* out, const int64_t* ids, int64_t num, int64_t n, int stream, uint64_t seed) {
  if (stream == kNormal) emu_norms<kNormal>(out, ids, num, n, seed);
  else emu_norms<kRademacher>(out, ids, num, n, seed);
}
}
