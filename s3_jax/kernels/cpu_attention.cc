// Attention over a KV cache on CPU as an XLA FFI custom call: a decode step (one new position per row) or a
// chunked prefill (T new positions per row, already written into the cache at slots index ... index + T - 1).
//
// Why a kernel of our own: XLA:CPU has no fused attention. A decode step's attention reads the whole cache
// (~19 GB/s in fp32; a bf16 cache is converted before its dot, slower still), every slot of the cache's
// bucket, valid or not; a chunked prefill materialises [T, slots] scores and masks, computes the causal half
// of its own block and pads every row to the longest. This kernel reads the cache in its own dtype (bf16:
// half the bytes), only the 16-slot blocks a query can see (valid, and at most its own slot), and keeps the
// scores, softmax and sums in fp32 without materialising anything beyond a tile's scores.
//
//   q      [B, T, H, E]  f32   the new positions' queries (RoPE applied; not yet scaled)
//   kt     [B, K, E, S]  C     keys, slots minor (the sampler's KVCache layout); C = f32 or bf16
//   v      [B, K, S, E]  C     values
//   valid  [B, S]        pred  which slots hold a token (the new positions' included)
//   index  []            s32   the slot of the first new position
//   out    [B, T, H, E]  f32   for query t of row b: softmax(scale * q.k) . v over the slots s with valid[b, s]
//                              and s <= index + t; H = K * G (grouped queries)
//
// A query whose own slot is not valid (left padding) and a row that sees nothing get zeros: XLA's masked
// softmax would give some mix of values there, which nothing reads.
//
// Work is split over (row, kv head, tile of positions) on XLA's intra-op thread pool; the calling thread takes
// work too.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using s3::ParallelFor;

constexpr int kLanes = 16;  // floats per vector (one AVX-512 register; two AVX2 ones where that is all)

// GCC/Clang vector extensions: the compiler maps them onto the machine's vector registers (-march=native).
typedef float F32x16 __attribute__((vector_size(64)));
typedef int32_t I32x16 __attribute__((vector_size(64)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint8_t U8x16 __attribute__((vector_size(16)));

inline F32x16 Load16(const float* p) {
  F32x16 x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
#if defined(__AVX512F__)
inline F32x16 Load16(const uint16_t* p) {  // bf16 -> f32: the bits become the high half of a float's
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return reinterpret_cast<F32x16>(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
}
#else
inline F32x16 Load16(const uint16_t* p) {
  U16x16 h;
  std::memcpy(&h, p, sizeof(h));
  U32x16 w = __builtin_convertvector(h, U32x16) << 16;
  F32x16 x;
  std::memcpy(&x, &w, sizeof(x));
  return x;
}
#endif
inline I32x16 Visible16(const bool* m) {  // -1 where the slot is visible, else 0
  U8x16 b;
  std::memcpy(&b, m, sizeof(b));
  return __builtin_convertvector(b, I32x16) != 0;
}
inline float Sum(F32x16 x) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += x[i];
  return s;
}
inline float Max(F32x16 x) {
  float s = x[0];
  for (int i = 1; i < kLanes; ++i) s = x[i] > s ? x[i] : s;
  return s;
}

#if defined(__AVX512BF16__)
// A chunked prefill over a bf16 cache multiplies in bf16 pairs with f32 sums (AVX512-BF16's dot product: two
// products and a sum per lane, twice the multiplies of an fp32 FMA): the query rounded to bf16 (exact when the
// model computes in bf16, as a sampler with a bf16 cache does), and the softmax's probabilities rounded to bf16
// before they weight the values, their total summed from the rounded ones.
constexpr bool kBf16Dots = true;

// Lane i: a[i] in the low half, b[i] in the high half (bf16 bits), a pair for _mm512_dpbf16_ps.
inline __m512i PairRows(const uint16_t* a, const uint16_t* b) {
  const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
  const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
  return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

// acc + a.lo * b.lo + a.hi * b.hi per lane, b the same pair of bf16 in every lane.
inline F32x16 DotPairs(F32x16 acc, __m512i a, uint32_t b) {
  return reinterpret_cast<F32x16>(_mm512_dpbf16_ps(reinterpret_cast<__m512>(acc), reinterpret_cast<__m512bh>(a),
                                                   reinterpret_cast<__m512bh>(_mm512_set1_epi32(b))));
}

// 16 floats rounded to bf16 (to nearest even), as 16 consecutive bf16 in 32 bytes.
inline void StoreBf16(uint16_t* out, F32x16 x) {
  const __m256bh h = _mm512_cvtneps_pbh(reinterpret_cast<__m512>(x));
  std::memcpy(out, &h, sizeof(h));
}
#else
constexpr bool kBf16Dots = false;
#endif

// Whether a chunked prefill's (not a decode step's) tile over a cache of C uses the bf16 dot products.
template <typename C, bool Chunk>
constexpr bool UseBf16Dots() { return kBf16Dots && std::is_same_v<C, uint16_t> && Chunk; }

inline uint16_t RoundBf16(float x) {  // to nearest even (finite x)
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

constexpr uint16_t kZeroRow[128] = {};  // a zero head (bf16 bits) for pairs with a slot nobody may read

// exp(x) for x <= 0 (a score minus its row's maximum): 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], a
// degree-6 Taylor polynomial (relative error ~2e-7, like expf's); below -87 it returns exp(-87) ~ 2e-38.
inline F32x16 ExpNonPositive(F32x16 x) {
  const F32x16 floor = x - x - 87.0f;
  x = x < floor ? floor : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  F32x16 n = (x * 1.44269504088896341f + magic) - magic;
  F32x16 r = x - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723e-06f;
  F32x16 p = r * (1.0f / 720.0f) + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  I32x16 bits = (__builtin_convertvector(n, I32x16) + 127) << 23;
  F32x16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}


constexpr float kNegInf = -INFINITY;

// Rows of a tile: Q positions x G query heads of one kv head, about 12 so that a block's scores stay in
// registers (one vector of 16 slots per row).
template <int G>
constexpr int TilePositions() { return G >= 12 ? 1 : 12 / G; }

struct Problem {
  int64_t B, T, H, K, E, S;
  int64_t index;
  float scale;
};

// The 16 slots from s0 as vectors: their keys' rows read from `kt` (a zero-padded copy when fewer than 16
// remain) and which of them hold a token.
template <typename C, int E>
struct KeyBlock {
  const C* rows;
  int64_t stride;
  I32x16 valid;
  C tail[E * kLanes];

  void Load(const C* kt, const bool* valid_row, int64_t S, int64_t s0) {
    const int64_t n = std::min<int64_t>(kLanes, S - s0);
    bool v[kLanes] = {};
    std::memcpy(v, valid_row + s0, n);
    valid = Visible16(v);
    if (n == kLanes) {
      rows = kt + s0;
      stride = S;
      return;
    }
    std::memset(tail, 0, sizeof(tail));
    for (int e = 0; e < E; ++e) std::memcpy(tail + e * kLanes, kt + e * S + s0, n * sizeof(C));
    rows = tail;
    stride = kLanes;
  }
};

inline I32x16 Iota() {
  I32x16 x;
  for (int i = 0; i < kLanes; ++i) x[i] = i;
  return x;
}

inline bool Any(const bool* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (p[i]) return true;
  return false;
}

// The mix's register block (phase 3): MixRows rows x MixWidth vectors of their head's sums, 12 registers, so
// that each value vector read (and converted from bf16) serves MixRows rows.
template <int R>
constexpr int MixRows() { return R >= 6 ? 6 : 3; }
template <int R, int V>
constexpr int MixWidth() { return V < 12 / MixRows<R>() ? V : 12 / MixRows<R>(); }
template <int R>
constexpr int PaddedRows() { return (R + MixRows<R>() - 1) / MixRows<R>() * MixRows<R>(); }
constexpr int kMaxMixRows = 6;

// A mix block's sums (rows r0 ... r0 + M - 1 below R, vectors i0 ... i0 + W - 1 of their heads) divided by
// their rows' totals (0 where a row sees nothing) into `out`; rows past the tile's n positions are skipped.
template <int G, int E, int M, int W>
inline void StoreMix(const Problem& d, const F32x16 (&acc)[M][W], const float* total, float* out, int64_t b,
                     int64_t k, int64_t t0, int n, int r0, int R, int i0) {
  for (int c = 0; c < M && r0 + c < R; ++c) {
    const int r = r0 + c, pos = r / G, g = r % G;
    if (pos >= n) continue;
    float* o = out + ((b * d.T + t0 + pos) * d.H + k * G + g) * E;
    const float inv = total[r] > 0.0f ? 1.0f / total[r] : 0.0f;
    for (int i = 0; i < W; ++i) {
      const F32x16 x = acc[c][i] * inv;
      std::memcpy(o + (i0 + i) * kLanes, &x, sizeof(x));
    }
  }
}

// One tile: positions t0 ... t0 + Q - 1 of row b (those below T) against kv head k. `scores` holds
// PaddedRows<Q * G>() * S16 floats.
template <typename C, int G, int E, int Q, bool Chunk>
void AttendTile(const Problem& d, const float* q, const C* kt_all, const C* v_all, const bool* valid_all,
                float* out, int64_t b, int64_t k, int64_t t0, float* __restrict scores) {
  constexpr int R = Q * G;
  constexpr int V = E / kLanes;
  static_assert(E % kLanes == 0, "head_dim must be a multiple of 16");
  const int64_t S = d.S, S16 = (S + kLanes - 1) / kLanes * kLanes;
  const int n = static_cast<int>(std::min<int64_t>(Q, d.T - t0));
  const C* kt = kt_all + (b * d.K + k) * E * S;
  const C* v = v_all + (b * d.K + k) * S * E;
  const bool* valid = valid_all + b * S;
  // each row's query, scaled; its last visible slot (-1: a padding position, sees nothing)
  float qs[R][E];
  uint32_t qp[UseBf16Dots<C, Chunk>() ? R : 1][E / 2];  // the bf16 path's query pairs, unscaled
  int64_t last[R];
  int64_t tile_last = -1;
  for (int r = 0; r < R; ++r) {
    const int p = r / G, g = r % G;
    const int64_t slot = d.index + t0 + p;
    const bool real = p < n && slot < S && valid[slot];
    last[r] = real ? slot : -1;
    tile_last = std::max(tile_last, last[r]);
    const float* qr = q + ((b * d.T + t0 + p) * d.H + k * G + g) * E;
    for (int e = 0; e < E; ++e) qs[r][e] = real ? qr[e] * d.scale : 0.0f;
    if constexpr (UseBf16Dots<C, Chunk>())
      for (int e = 0; e < E; e += 2)
        qp[r][e / 2] = real ? RoundBf16(qr[e]) | static_cast<uint32_t>(RoundBf16(qr[e + 1])) << 16 : 0u;
  }
  const int64_t blocks = tile_last < 0 ? 0 : tile_last / kLanes + 1;
  // 1. scores, block by block over the slots some row of the tile can see
  F32x16 best[R];
  for (int r = 0; r < R; ++r) best[r] = F32x16{} + kNegInf;
  const I32x16 iota = Iota();
  KeyBlock<C, E> block;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t s0 = blk * kLanes;
    if (!Any(valid + s0, std::min<int64_t>(kLanes, S - s0))) {
      for (int r = 0; r < R; ++r) {
        const F32x16 x = F32x16{} + kNegInf;
        std::memcpy(scores + r * S16 + s0, &x, sizeof(x));
      }
      continue;
    }
    block.Load(kt, valid, S, s0);
    F32x16 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = F32x16{};
    if constexpr (UseBf16Dots<C, Chunk>()) {
#if defined(__AVX512BF16__)
      for (int e = 0; e < E; e += 2) {
        const __m512i keys = PairRows(block.rows + e * block.stride, block.rows + (e + 1) * block.stride);
        for (int r = 0; r < R; ++r) acc[r] = DotPairs(acc[r], keys, qp[r][e / 2]);
      }
      for (int r = 0; r < R; ++r) acc[r] *= d.scale;
#endif
    } else {
      for (int e = 0; e < E; ++e) {
        const F32x16 key = Load16(block.rows + e * block.stride);
        for (int r = 0; r < R; ++r) acc[r] += qs[r][e] * key;
      }
    }
    for (int r = 0; r < R; ++r) {
      const I32x16 seen = block.valid & (iota <= static_cast<int32_t>(std::min<int64_t>(last[r] - s0, kLanes)));
      const F32x16 x = seen ? acc[r] : F32x16{} + kNegInf;
      std::memcpy(scores + r * S16 + s0, &x, sizeof(x));
      best[r] = x > best[r] ? x : best[r];
    }
  }
  // 2. unnormalised probabilities in place of the scores (exactly 0 where a row sees nothing)
  float total[R];
  for (int r = 0; r < R; ++r) {
    const float top = Max(best[r]);
    F32x16 sum{};
    for (int64_t blk = 0; blk < blocks; ++blk) {
      float* sc = scores + r * S16 + blk * kLanes;
      const F32x16 x = Load16(sc);
      const F32x16 p = (x == F32x16{} + kNegInf) ? F32x16{} : ExpNonPositive(x - top);
      if constexpr (UseBf16Dots<C, Chunk>()) {
#if defined(__AVX512BF16__)
        // the row's probabilities as bf16 in the first half of its own scores (slot s at bf16 index s: never
        // past this block's floats, all read already)
        uint16_t* pb = reinterpret_cast<uint16_t*>(scores + r * S16) + blk * kLanes;
        StoreBf16(pb, p);
        sum += Load16(pb);
#endif
      } else {
        std::memcpy(sc, &p, sizeof(p));
        sum += p;
      }
    }
    total[r] = top == kNegInf ? 0.0f : Sum(sum);
  }
  // 3. the probability-weighted values in register blocks of M rows x W vectors (rows past R read zeros)
  constexpr int M = MixRows<R>(), W = MixWidth<R, V>();
  static_assert(V % W == 0, "the head's vectors split into whole blocks");
  for (int r = R; r < PaddedRows<R>(); ++r) std::fill(scores + r * S16, scores + r * S16 + blocks * kLanes, 0.0f);
  if constexpr (UseBf16Dots<C, Chunk>()) {
#if defined(__AVX512BF16__)
    for (int r0 = 0; r0 < R; r0 += M) {
      const uint32_t* pairs = reinterpret_cast<const uint32_t*>(scores + r0 * S16);  // row c's slot pair s/2
      const int64_t stride = S16;  // uint32 per row: a row's floats
      int64_t end = 0;
      for (int c = 0; c < M && r0 + c < R; ++c) end = std::max(end, last[r0 + c] + 1);
      for (int i0 = 0; i0 < V; i0 += W) {
        F32x16 acc[M][W];
        for (int c = 0; c < M; ++c)
          for (int i = 0; i < W; ++i) acc[c][i] = F32x16{};
        for (int64_t s = 0; s < end; s += 2) {
          const bool a = valid[s], z = s + 1 < end && valid[s + 1];
          if (!a && !z) continue;
          const uint16_t* va = a ? v + s * E : kZeroRow;
          const uint16_t* vz = z ? v + (s + 1) * E : kZeroRow;
          __m512i vv[W];
          for (int i = 0; i < W; ++i) vv[i] = PairRows(va + (i0 + i) * kLanes, vz + (i0 + i) * kLanes);
          const uint32_t keep = z ? 0xFFFFFFFFu : 0x0000FFFFu;  // slot s + 1 past `end`: no weight
          for (int c = 0; c < M; ++c) {
            const uint32_t w = pairs[c * stride + s / 2] & keep;
            for (int i = 0; i < W; ++i) acc[c][i] = DotPairs(acc[c][i], vv[i], w);
          }
        }
        StoreMix<G, E, M, W>(d, acc, total, out, b, k, t0, n, r0, R, i0);
      }
    }
#endif
    return;
  }
  for (int r0 = 0; r0 < R; r0 += M) {
    const float* p = scores + r0 * S16;
    int64_t end = 0;
    for (int c = 0; c < M && r0 + c < R; ++c) end = std::max(end, last[r0 + c] + 1);
    for (int i0 = 0; i0 < V; i0 += W) {
      F32x16 acc[M][W];
      for (int c = 0; c < M; ++c)
        for (int i = 0; i < W; ++i) acc[c][i] = F32x16{};
      for (int64_t s = 0; s < end; ++s) {
        if (!valid[s]) continue;
        F32x16 vv[W];
        for (int i = 0; i < W; ++i) vv[i] = Load16(v + s * E + (i0 + i) * kLanes);
        for (int c = 0; c < M; ++c) {
          const float w = p[c * S16 + s];
          for (int i = 0; i < W; ++i) acc[c][i] += w * vv[i];
        }
      }
      StoreMix<G, E, M, W>(d, acc, total, out, b, k, t0, n, r0, R, i0);
    }
  }
}

template <typename C>
using TileFn = void (*)(const Problem&, const float*, const C*, const C*, const bool*, float*, int64_t, int64_t,
                        int64_t, float*);

// A decode step (T == 1) runs tiles of one position; a chunked prefill, tiles of TilePositions<G>().
template <typename C, int E>
TileFn<C> PickG(int64_t g, bool decode, int* positions) {
#define S3_CASE(G)                                                                \
  case G:                                                                         \
    *positions = decode ? 1 : TilePositions<G>();                                 \
    return decode ? AttendTile<C, G, E, 1, false> : AttendTile<C, G, E, TilePositions<G>(), true>;
  switch (g) {
    S3_CASE(1) S3_CASE(2) S3_CASE(3) S3_CASE(4) S3_CASE(5) S3_CASE(6) S3_CASE(7) S3_CASE(8)
    default: return nullptr;
  }
#undef S3_CASE
}

template <typename C>
TileFn<C> Pick(int64_t g, int64_t e, bool decode, int* positions) {
  switch (e) {
    case 16: return PickG<C, 16>(g, decode, positions);
    case 32: return PickG<C, 32>(g, decode, positions);
    case 64: return PickG<C, 64>(g, decode, positions);
    case 128: return PickG<C, 128>(g, decode, positions);
    default: return nullptr;
  }
}

template <typename C>
ffi::Error Run(ffi::ThreadPool& pool, const Problem& d, const float* q, const C* kt, const C* v,
               const bool* valid, float* out) {
  const int64_t G = d.H / d.K;
  int positions = 1;
  TileFn<C> tile = Pick<C>(G, d.E, d.T == 1, &positions);
  if (tile == nullptr)
    return ffi::Error::InvalidArgument("s3_cached_attention: unsupported head_dim " + std::to_string(d.E) +
                                       " or query heads per kv head " + std::to_string(G));
  const int64_t tiles = (d.T + positions - 1) / positions;
  const int64_t S16 = (d.S + kLanes - 1) / kLanes * kLanes;
  const int64_t rows = (positions * G + kMaxMixRows - 1) / kMaxMixRows * kMaxMixRows;  // >= PaddedRows
  ParallelFor(pool, d.B * d.K * tiles, [&](int64_t i) {
    thread_local std::vector<float> scores;
    if (static_cast<int64_t>(scores.size()) < rows * S16) scores.resize(rows * S16);
    const int64_t b = i / (d.K * tiles), k = i / tiles % d.K, t0 = i % tiles * positions;
    tile(d, q, kt, v, valid, out, b, k, t0, scores.data());
  });
  return ffi::Error::Success();
}

ffi::Error CachedAttention(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer kt, ffi::AnyBuffer v,
                           ffi::Buffer<ffi::PRED> valid, ffi::Buffer<ffi::S32> index,
                           ffi::ResultBuffer<ffi::F32> out, float scale, ffi::ThreadPool pool) {
  auto qd = q.dimensions(), kd = kt.dimensions(), vd = v.dimensions(), md = valid.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 2 || index.dimensions().size() != 0)
    return ffi::Error::InvalidArgument("s3_cached_attention: ranks must be q 4, kt 4, v 4, valid 2, index 0");
  Problem d{qd[0], qd[1], qd[2], kd[1], qd[3], kd[3], *index.typed_data(), scale};
  if (kd[0] != d.B || kd[2] != d.E || vd[0] != d.B || vd[1] != d.K || vd[2] != d.S || vd[3] != d.E ||
      md[0] != d.B || md[1] != d.S || d.K == 0 || d.H % d.K != 0)
    return ffi::Error::InvalidArgument("s3_cached_attention: shapes disagree (q [B,T,H,E], kt [B,K,E,S], "
                                       "v [B,K,S,E], valid [B,S], H a multiple of K)");
  if (d.index < 0 || d.index + d.T > d.S)
    return ffi::Error::InvalidArgument("s3_cached_attention: new positions at slots " +
                                       std::to_string(d.index) + " ... +" + std::to_string(d.T) +
                                       " past the cache's " + std::to_string(d.S) + " slots");
  if (kt.element_type() != v.element_type())
    return ffi::Error::InvalidArgument("s3_cached_attention: keys and values differ in dtype");
  const bool* m = valid.typed_data();
  if (kt.element_type() == ffi::DataType::F32)
    return Run<float>(pool, d, q.typed_data(), static_cast<const float*>(kt.untyped_data()),
                      static_cast<const float*>(v.untyped_data()), m, out->typed_data());
  if (kt.element_type() == ffi::DataType::BF16 || kt.element_type() == ffi::DataType::U16)  // bits of bf16
    return Run<uint16_t>(pool, d, q.typed_data(), static_cast<const uint16_t*>(kt.untyped_data()),
                         static_cast<const uint16_t*>(v.untyped_data()), m, out->typed_data());
  return ffi::Error::InvalidArgument("s3_cached_attention: the cache must be float32, bfloat16 or bfloat16 bits (uint16)");
}

}  // namespace

// Whether chunked prefills over a bf16 cache use AVX512-BF16's dot products (this build's instruction set).
extern "C" int S3Bf16Dots() { return kBf16Dots ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(S3CachedAttention, CachedAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ctx<ffi::ThreadPool>());
