// bf16 products by a weight on CPU as an XLA FFI custom call: the sampler's weight matmuls.
//
//   x    [M, K]  bf16   the rows (a decode step's M = its batch; a prefill's, its tokens; K even)
//   w    [K, N]  bf16   a weight in its row-major layout (the sampler's bf16 copy)
//   out  [M, N]  f32 or bf16 (any M), f32 (M <= 16)   x @ w: products exact, sums in fp32 (bf16 out: rounded
//                                                      to nearest even)
//
// Why a kernel of our own: a decode step multiplies a few rows by every weight, so it is bound by reading the
// weights (SmolLM2-135M: 270 MB of bf16 a step); XLA:CPU's bf16 product (YNNPACK) reads them at 8-15 GB/s at
// 2-16 rows (1.2 GB/s at one row), where this machine streams 24 GB/s. A prefill's many rows are bound by the
// multiplies, which XLA:CPU ran at 100-380 GFLOP/s with a float32 result rounded to bf16 in a second pass.
//
// Few rows (M <= 16): tasks of whole 64-column panels go to XLA's intra-op threads; each task packs 64 rows of
// its columns at a time into bf16 pairs (rows k and k+1 interleaved), prefetches the next 64 into L2, and runs
// passes of up to 6 rows x 64 columns over the block (24 fp32 sums in registers, AVX512-BF16's vdpbf16ps: two
// products and their sum per lane), the sums kept in `out` between blocks. Many rows: every panel is packed
// once over all of K, then tasks of (panel, up to 192 rows) run the same passes over all of K, each sum
// stored once.
//
// Built only where the compiler targets AVX512-BF16 (`S3Bf16Matmul()` says whether); elsewhere the call is an
// error and the Python side keeps XLA's product.

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>
#include <cstring>
#include <string>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif


#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using s3::ParallelFor;

constexpr int kMaxAcc = 24;    // fp32 sums one pass holds in registers (rows x vectors)
constexpr int kBlockK = 64;    // weight rows packed at a time
constexpr int kBlockN = 512;   // columns a task covers at most
constexpr int kChunk = 32;     // columns a load of a weight row: its pairs with the next row fill two vectors
constexpr int64_t kPrefetch = 1;  // blocks of weight rows ahead (2 measured no faster)
constexpr int64_t kSmallRows = 16;  // at most this many rows: blocks of K packed per task (weight-bound)

#if defined(__AVX512BF16__)
constexpr bool kAvailable = true;


// A task's block of weight rows k0 ... k0 + 2 pairs - 1 at columns c ... c + n - 1, packed for the passes:
// pair j of chunk q (32 columns) as two vectors (lo, hi) of bf16 pairs at packed + (j * chunks + q) * 64.
// Within each 128-bit lane, lo holds columns 0-3 of the lane's 8 (rows k and k+1 interleaved), hi 4-7.
void Pack(const uint16_t* w, int64_t K, int64_t N, int64_t k0, int64_t pairs, int64_t c, int64_t n, uint16_t* packed) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  for (int64_t j = 0; j < pairs; ++j) {
    const uint16_t* r0 = w + (k0 + 2 * j) * N + c;
    // The rows kPrefetch blocks ahead into L2 while this block's passes compute.
    if (k0 + kPrefetch * kBlockK + 2 * j + 1 < K) {
      const char* next = reinterpret_cast<const char*>(r0 + kPrefetch * kBlockK * N);
      for (int64_t b = 0; b < n * 2; b += 64) {
        _mm_prefetch(next + b, _MM_HINT_T1);
        _mm_prefetch(next + N * 2 + b, _MM_HINT_T1);
      }
    }
    for (int64_t q = 0; q < chunks; ++q) {
      const int64_t m = std::min<int64_t>(kChunk, n - q * kChunk);
      const __mmask32 cols = m >= kChunk ? ~__mmask32{0} : (__mmask32{1} << m) - 1;
      const __m512i a = _mm512_maskz_loadu_epi16(cols, r0 + q * kChunk);
      const __m512i b = _mm512_maskz_loadu_epi16(cols, r0 + N + q * kChunk);
      uint16_t* o = packed + (j * chunks + q) * 2 * kChunk;
      _mm512_store_si512(o, _mm512_unpacklo_epi16(a, b));
      _mm512_store_si512(o + kChunk, _mm512_unpackhi_epi16(a, b));
    }
  }
}

// Rows r0 ... r0 + R - 1 of out at the V/2 chunks from chunk q0 of a packed block (columns c ... c + n - 1 of
// out, n <= 16 V), over its pairs of weight rows: the sums start from out's (zero for the first block) and
// are stored back. x's pairs are those of rows k0, k0 + 1, ...
// 16 fp32 sums into out (fp32, or rounded to bf16 bits), the lanes of `mask`.
inline void Store16(float* o, __mmask16 mask, __m512 x) { _mm512_mask_storeu_ps(o, mask, x); }
inline void Store16(uint16_t* o, __mmask16 mask, __m512 x) {
  _mm256_mask_storeu_epi16(o, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
}

template <int R, int V, typename O>
void Pass(const uint16_t* x, int64_t K, int64_t k0, const uint16_t* packed, int64_t chunks, int64_t q0,
          int64_t pairs, O* out, int64_t N, int64_t r0, int64_t c, int n) {
  static_assert(std::is_same_v<O, float> || std::is_same_v<O, uint16_t>, "fp32 or bf16 bits out");
  static_assert(V % 2 == 0, "vectors come in pairs (lo and hi of a chunk)");
  constexpr int P = V / 2;
  // Column j of a chunk sits in vector (j % 8 < 4 ? lo : hi), lane 4 (j / 8) + j % 4.
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  const __m512i back_lo = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
  const __m512i back_hi = _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  __mmask16 store[V];
  for (int i = 0; i < V; ++i) {
    const int m = std::max(0, std::min(16, n - 16 * i));
    store[i] = m >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << m) - 1);
  }
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < P; ++q) {
      if constexpr (!std::is_same_v<O, float>) {  // bf16 out: one pass over all of K
        acc[r][2 * q] = acc[r][2 * q + 1] = _mm512_setzero_ps();
      } else if (k0 == 0) {
        acc[r][2 * q] = acc[r][2 * q + 1] = _mm512_setzero_ps();
      } else {  // the stored sums, in column order, back into the lo/hi lanes
        const float* o = out + (r0 + r) * N + c + kChunk * q;
        const __m512 a = _mm512_maskz_loadu_ps(store[2 * q], o);
        const __m512 b = _mm512_maskz_loadu_ps(store[2 * q + 1], o + 16);
        acc[r][2 * q] = _mm512_permutex2var_ps(a, back_lo, b);
        acc[r][2 * q + 1] = _mm512_permutex2var_ps(a, back_hi, b);
      }
    }
  }
  const uint16_t* xr = x + r0 * K + k0;
  const uint16_t* pk = packed + q0 * 2 * kChunk;
  for (int64_t j = 0; j < pairs; ++j, pk += chunks * 2 * kChunk) {
    __m512bh w[V];
    for (int i = 0; i < V; ++i) w[i] = reinterpret_cast<__m512bh>(_mm512_load_si512(pk + i * kChunk));
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, xr + r * K + 2 * j, sizeof(pair));
      const __m512bh xp = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair)));
      for (int i = 0; i < V; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], w[i], xp);
    }
  }
  for (int r = 0; r < R; ++r) {
    O* o = out + (r0 + r) * N + c;
    for (int q = 0; q < P; ++q) {
      Store16(o + kChunk * q, store[2 * q], _mm512_permutex2var_ps(acc[r][2 * q], first, acc[r][2 * q + 1]));
      Store16(o + kChunk * q + 16, store[2 * q + 1],
              _mm512_permutex2var_ps(acc[r][2 * q], second, acc[r][2 * q + 1]));
    }
  }
}

template <typename O>
using PassFn = void (*)(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, int64_t, O*,
                        int64_t, int64_t, int64_t, int);

template <int V, typename O, int... R>
constexpr std::array<PassFn<O>, sizeof...(R) + 1> Passes(std::integer_sequence<int, R...>) {
  return {nullptr, Pass<R + 1, V, O>...};
}

void Run(ffi::ThreadPool& pool, const uint16_t* x, const uint16_t* w, float* out, int64_t M, int64_t K,
         int64_t N) {
  constexpr int V = 4;  // vectors of 16 columns a pass
  constexpr int kRows = kMaxAcc / V;
  constexpr int64_t kPanel = 16 * V;
  static constexpr auto passes = Passes<V, float>(std::make_integer_sequence<int, kRows>());
  // Rows in near-equal passes of at most kRows (16 rows and kRows 12: two of 8, not 12 and 4).
  const int64_t groups = (M + kRows - 1) / kRows;
  const int64_t rows = (M + groups - 1) / groups;
  // Tasks of whole panels, at most kBlockN columns, at least 8 tasks where there are as many panels.
  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(kBlockN / kPanel, panels / 8)) * kPanel;
  const int64_t tasks = (N + block - 1) / block;
  ParallelFor(pool, tasks, [&](int64_t t) {
    alignas(64) thread_local uint16_t packed[kBlockK * kBlockN];
    const int64_t c0 = t * block, width = std::min(N, c0 + block) - c0;
    const int64_t chunks = (width + kChunk - 1) / kChunk;
    for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
      const int64_t pairs = std::min<int64_t>(kBlockK, K - k0) / 2;
      Pack(w, K, N, k0, pairs, c0, width, packed);
      for (int64_t c = 0; c < width; c += kPanel) {
        const int n = static_cast<int>(std::min<int64_t>(kPanel, width - c));
        for (int64_t r0 = 0; r0 < M; r0 += rows) {
          passes[std::min(rows, M - r0)](x, K, k0, packed, chunks, c / kChunk, pairs, out, N, r0, c0 + c, n);
        }
      }
    }
  });
}
// Many rows: every 64-column panel of w packed once over all of K (K x 128 bytes, in L2 while it is used),
// then tasks of (panel, up to kRowChunk rows) run passes of 6 rows over all of K, each sum stored once, in
// fp32 or rounded to bf16 (O).
constexpr int64_t kRowChunk = 192;

template <typename O>
void RunMany(ffi::ThreadPool& pool, const uint16_t* x, const uint16_t* w, O* out, int64_t M, int64_t K,
             int64_t N) {
  constexpr int V = 4;
  constexpr int kRows = kMaxAcc / V;
  constexpr int64_t kPanel = 16 * V;
  static constexpr auto passes = Passes<V, O>(std::make_integer_sequence<int, kRows>());
  const int64_t panels = (N + kPanel - 1) / kPanel, pairs = K / 2;
  const int64_t panel_size = pairs * 2 * kPanel;  // uint16 a packed panel
  // The calling thread's buffer (helpers write into it through `base`), in 64-byte vectors: aligned loads.
  thread_local std::vector<__m512i> packed;
  const int64_t vectors = panels * panel_size / 32;
  if (static_cast<int64_t>(packed.size()) < vectors) packed.resize(vectors);
  uint16_t* base = reinterpret_cast<uint16_t*>(packed.data());
  ParallelFor(pool, panels, [&](int64_t p) {
    Pack(w, K, N, 0, pairs, p * kPanel, std::min<int64_t>(kPanel, N - p * kPanel), base + p * panel_size);
  });
  const int64_t chunks = (M + kRowChunk - 1) / kRowChunk;
  ParallelFor(pool, panels * chunks, [&](int64_t t) {
    const int64_t p = t % panels, m0 = t / panels * kRowChunk, m1 = std::min(M, m0 + kRowChunk);
    const int n = static_cast<int>(std::min<int64_t>(kPanel, N - p * kPanel));
    const int64_t chunks_p = (n + kChunk - 1) / kChunk;  // as `Pack` laid the panel out
    for (int64_t r0 = m0; r0 < m1; r0 += kRows) {
      passes[std::min<int64_t>(kRows, m1 - r0)](x, K, 0, base + p * panel_size, chunks_p, 0, pairs, out, N, r0,
                                                p * kPanel, n);
    }
  });
}
#else
constexpr bool kAvailable = false;
#endif

ffi::Error Matmul(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> out,
                       ffi::ThreadPool pool) {
  if (!kAvailable)
    return ffi::Error::Internal("s3_matmul: this build has no AVX512-BF16 (check S3Bf16Matmul())");
  auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || od.size() != 2)
    return ffi::Error::InvalidArgument("s3_matmul: x, w and out must be matrices");
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  if (wd[0] != K || od[0] != M || od[1] != N)
    return ffi::Error::InvalidArgument("s3_matmul: shapes disagree (x [M,K], w [K,N], out [M,N]): x [" +
                                       std::to_string(M) + "," + std::to_string(K) + "], w [" +
                                       std::to_string(wd[0]) + "," + std::to_string(N) + "]");
  if (K % 2 != 0) return ffi::Error::InvalidArgument("s3_matmul: K must be even, got " + std::to_string(K));
  auto is_bf16 = [](ffi::DataType t) { return t == ffi::DataType::BF16 || t == ffi::DataType::U16; };
  if (!is_bf16(x.element_type()) || !is_bf16(w.element_type()))
    return ffi::Error::InvalidArgument("s3_matmul: x and w must be bfloat16 (or its bits as uint16)");
  const bool f32 = out->element_type() == ffi::DataType::F32;
  if (!f32 && !is_bf16(out->element_type()))
    return ffi::Error::InvalidArgument("s3_matmul: the result must be float32 or bfloat16");
#if defined(__AVX512BF16__)
  const auto* xp = static_cast<const uint16_t*>(x.untyped_data());
  const auto* wp = static_cast<const uint16_t*>(w.untyped_data());
  if (f32 && M <= kSmallRows) {
    Run(pool, xp, wp, static_cast<float*>(out->untyped_data()), M, K, N);
  } else if (f32) {
    RunMany(pool, xp, wp, static_cast<float*>(out->untyped_data()), M, K, N);
  } else {
    RunMany(pool, xp, wp, static_cast<uint16_t*>(out->untyped_data()), M, K, N);
  }
#endif
  return ffi::Error::Success();
}

}  // namespace

// Whether this build multiplies with AVX512-BF16 (the kernel is usable).
extern "C" int S3Bf16Matmul() { return kAvailable ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(S3Matmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ctx<ffi::ThreadPool>());
