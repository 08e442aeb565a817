// bf16 products by a weight on CPU as an XLA FFI custom call: the sampler's weight matmuls.
//
//   x       [M, K]          bf16   the rows (a decode step's M = its batch; a prefill's, its tokens; K even)
//   packed  [P, K/2, 128]   bf16   a weight w [K, N] in the kernel's layout (`cpu_matmul.pack`, once per set of
//                                  weights): panel p holds columns 64p ... 64p + 63, pair j rows 2j and 2j + 1,
//                                  packed[p][j][2c + r] = w[2j + r][64p + c] (zero past N)
//   out     [M, N]          f32 or bf16 (any M), f32 (M <= 16)   x @ w: products exact, sums in fp32 (bf16 out:
//                                                                rounded to nearest even)
//
// Why a kernel of our own: a decode step multiplies a few rows by every weight, so it is bound by reading the
// weights (SmolLM2-135M: 270 MB of bf16 a step); XLA:CPU's bf16 product (YNNPACK) reads them at 8-15 GB/s at
// 2-16 rows (1.2 GB/s at one row), where this machine streams 24 GB/s. A prefill's many rows are bound by the
// multiplies, which XLA:CPU ran at 100-380 GFLOP/s with a float32 result rounded to bf16 in a second pass.
// The weights come packed: each panel is one contiguous run that the hardware prefetchers stream (a weight's
// row-major panels are 128-byte pieces 1-3 KB apart), and no call spends time packing.
//
// A pass: up to 6 rows x one 64-column panel (24 fp32 sums in registers, AVX512-BF16's vdpbf16ps: two products
// and their sum per lane, the four vectors of a pair loaded as they are). Few rows (M <= 16): tasks of whole
// panels go to the threads; each runs its panel in blocks of 64 pairs (16 KB, in L1 for the passes after the
// first, which prefetches ahead), the sums kept in `out` between blocks. Many rows: tasks of (panel, up to 192
// rows) run passes over all of K (the panel, at most K x 128 bytes, in L2), each sum stored once.
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

constexpr int kPanel = 64;             // columns of a panel
constexpr int kPairWidth = 2 * kPanel;  // bf16 values of a panel's pair of rows (256 bytes, four vectors)
constexpr int kVectors = 4;            // vectors of 16 columns a panel
constexpr int kRows = 6;               // rows a pass (kRows x kVectors sums in registers)
constexpr int64_t kBlockPairs = 64;    // pairs of a few-row block (16 KB of a panel)
constexpr int64_t kAhead = 16;         // pairs a streaming pass prefetches ahead (4 KB)
constexpr int64_t kSmallRows = 16;     // at most this many rows: panels in blocks, sums kept in out (fp32)
constexpr int64_t kRowChunk = 192;     // rows a many-row task covers at most

#if defined(__AVX512BF16__)
constexpr bool kAvailable = true;

// 16 fp32 sums into out (fp32, or rounded to bf16 bits), the lanes of `mask`.
inline void Store16(float* o, __mmask16 mask, __m512 x) { _mm512_mask_storeu_ps(o, mask, x); }
inline void Store16(uint16_t* o, __mmask16 mask, __m512 x) {
  _mm256_mask_storeu_epi16(o, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
}

// Rows r0 ... r0 + R - 1 of x times pairs j0 ... j1 - 1 of one panel (columns c ... of out, lanes `mask`):
// the sums start at zero (`first`) or from out's (fp32), and are stored to out. kPrefetch: 0 none; kNear the
// panel comes from memory, prefetched into L1 kAhead pairs ahead; kFar the next block of the panel (or the next
// panel's first) into L2 while this pass computes from L1.
constexpr int kNear = 1, kFar = 2;
template <int R, int kPrefetch, typename O>
void Pass(const uint16_t* x, int64_t K, int64_t j0, int64_t j1, const uint16_t* panel, O* out, int64_t N,
          int64_t r0, int64_t c, const __mmask16* mask, bool first) {
  static_assert(std::is_same_v<O, float> || std::is_same_v<O, uint16_t>, "fp32 or bf16 bits out");
  __m512 acc[R][kVectors];
  for (int r = 0; r < R; ++r) {
    for (int i = 0; i < kVectors; ++i) {
      if constexpr (std::is_same_v<O, float>) {
        acc[r][i] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask[i], out + (r0 + r) * N + c + 16 * i);
      } else {
        acc[r][i] = _mm512_setzero_ps();
      }
    }
  }
  const uint16_t* xr = x + r0 * K;
  const uint16_t* pk = panel + j0 * kPairWidth;
  for (int64_t j = j0; j < j1; ++j, pk += kPairWidth) {
    if constexpr (kPrefetch == kNear) {
      const char* ahead = reinterpret_cast<const char*>(pk + kAhead * kPairWidth);
      for (int b = 0; b < 2 * kPairWidth; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    } else if constexpr (kPrefetch == kFar) {
      const char* ahead = reinterpret_cast<const char*>(pk + kBlockPairs * kPairWidth);
      for (int b = 0; b < 2 * kPairWidth; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T1);
    }
    __m512bh w[kVectors];
    for (int i = 0; i < kVectors; ++i) w[i] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(pk + 32 * i));
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, xr + r * K + 2 * j, sizeof(pair));
      const __m512bh xp = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair)));
      for (int i = 0; i < kVectors; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], w[i], xp);
    }
  }
  for (int r = 0; r < R; ++r) {
    O* o = out + (r0 + r) * N + c;
    for (int i = 0; i < kVectors; ++i) Store16(o + 16 * i, mask[i], acc[r][i]);
  }
}

template <typename O>
using PassFn = void (*)(const uint16_t*, int64_t, int64_t, int64_t, const uint16_t*, O*, int64_t, int64_t,
                        int64_t, const __mmask16*, bool);

// passes[prefetch][R] for R = 1 ... kRows
template <typename O, int... R>
constexpr std::array<std::array<PassFn<O>, kRows + 1>, 3> Passes(std::integer_sequence<int, R...>) {
  return {{{nullptr, Pass<R + 1, 0, O>...}, {nullptr, Pass<R + 1, kNear, O>...},
           {nullptr, Pass<R + 1, kFar, O>...}}};
}

// The store masks of panel p's four vectors.
void Masks(int64_t N, int64_t p, __mmask16* mask) {
  for (int i = 0; i < kVectors; ++i) {
    const int64_t m = std::max<int64_t>(0, std::min<int64_t>(16, N - p * kPanel - 16 * i));
    mask[i] = m >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << m) - 1);
  }
}

// Few rows: tasks of whole panels (at least 8 tasks where there are as many panels, at most 8 panels a task),
// each panel in blocks of kBlockPairs pairs (all of K when one pass holds every row), the rows in near-equal
// passes (16 rows: 6, 6, 4 would leave a short pass; 6, 5, 5 does not), the first streaming.
void RunFew(ffi::ThreadPool& pool, const uint16_t* x, const uint16_t* packed, float* out, int64_t M, int64_t K,
            int64_t N) {
  static constexpr auto passes = Passes<float>(std::make_integer_sequence<int, kRows>());
  const int64_t panels = (N + kPanel - 1) / kPanel, pairs = K / 2;
  const int64_t groups = (M + kRows - 1) / kRows;
  const int64_t block = groups == 1 ? pairs : kBlockPairs;
  const int64_t per_task = std::max<int64_t>(1, std::min<int64_t>(8, panels / 8));
  const int64_t tasks = (panels + per_task - 1) / per_task;
  ParallelFor(pool, tasks, [&](int64_t t) {
    for (int64_t p = t * per_task; p < std::min(panels, (t + 1) * per_task); ++p) {
      __mmask16 mask[kVectors];
      Masks(N, p, mask);
      const uint16_t* panel = packed + p * pairs * kPairWidth;
      for (int64_t j0 = 0; j0 < pairs; j0 += block) {
        const int64_t j1 = std::min(pairs, j0 + block);
        for (int64_t g = 0, r0 = 0; g < groups; ++g) {
          const int64_t rows = (M - r0) / (groups - g) + ((M - r0) % (groups - g) != 0);
          // the first pass streams the block (from L2 after the first block), the last fetches the next into L2
          const int prefetch = g == 0 ? kNear : g == groups - 1 ? kFar : 0;
          passes[prefetch][rows](x, K, j0, j1, panel, out, N, r0, p * kPanel, mask, j0 == 0);
          r0 += rows;
        }
      }
    }
  });
}

// Many rows: tasks of (panel, up to kRowChunk rows), passes of kRows rows over all of K, each sum stored once
// in fp32 or rounded to bf16 (O); a task's first pass streams its panel.
template <typename O>
void RunMany(ffi::ThreadPool& pool, const uint16_t* x, const uint16_t* packed, O* out, int64_t M, int64_t K,
             int64_t N) {
  static constexpr auto passes = Passes<O>(std::make_integer_sequence<int, kRows>());
  const int64_t panels = (N + kPanel - 1) / kPanel, pairs = K / 2;
  const int64_t chunks = (M + kRowChunk - 1) / kRowChunk;
  ParallelFor(pool, panels * chunks, [&](int64_t t) {
    const int64_t p = t % panels, m0 = t / panels * kRowChunk, m1 = std::min(M, m0 + kRowChunk);
    __mmask16 mask[kVectors];
    Masks(N, p, mask);
    const uint16_t* panel = packed + p * pairs * kPairWidth;
    for (int64_t r0 = m0; r0 < m1; r0 += kRows) {
      passes[r0 == m0 ? kNear : 0][std::min<int64_t>(kRows, m1 - r0)](x, K, 0, pairs, panel, out, N, r0,
                                                                       p * kPanel, mask, true);
    }
  });
}
#else
constexpr bool kAvailable = false;
#endif

ffi::Error Matmul(ffi::AnyBuffer x, ffi::AnyBuffer packed, ffi::Result<ffi::AnyBuffer> out,
                  ffi::ThreadPool pool) {
  if (!kAvailable)
    return ffi::Error::Internal("s3_matmul: this build has no AVX512-BF16 (check S3Bf16Matmul())");
  auto xd = x.dimensions(), wd = packed.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || od.size() != 2)
    return ffi::Error::InvalidArgument("s3_matmul: x [M,K] and out [M,N] must be matrices, packed [P,K/2,128]");
  const int64_t M = xd[0], K = xd[1], N = od[1];
  if (od[0] != M || 2 * wd[1] != K || wd[2] != kPairWidth || wd[0] != (N + kPanel - 1) / kPanel)
    return ffi::Error::InvalidArgument(
        "s3_matmul: shapes disagree (x [M,K], packed [ceil(N/64),K/2,128], out [M,N]): x [" +
        std::to_string(M) + "," + std::to_string(K) + "], packed [" + std::to_string(wd[0]) + "," +
        std::to_string(wd[1]) + "," + std::to_string(wd[2]) + "], out [" + std::to_string(od[0]) + "," +
        std::to_string(N) + "]");
  auto is_bf16 = [](ffi::DataType t) { return t == ffi::DataType::BF16 || t == ffi::DataType::U16; };
  if (!is_bf16(x.element_type()) || !is_bf16(packed.element_type()))
    return ffi::Error::InvalidArgument("s3_matmul: x and packed must be bfloat16 (or its bits as uint16)");
  const bool f32 = out->element_type() == ffi::DataType::F32;
  if (!f32 && !is_bf16(out->element_type()))
    return ffi::Error::InvalidArgument("s3_matmul: the result must be float32 or bfloat16");
#if defined(__AVX512BF16__)
  const auto* xp = static_cast<const uint16_t*>(x.untyped_data());
  const auto* wp = static_cast<const uint16_t*>(packed.untyped_data());
  if (f32 && M <= kSmallRows) {
    RunFew(pool, xp, wp, static_cast<float*>(out->untyped_data()), M, K, N);
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
