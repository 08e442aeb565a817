// Decode attention on CPU as an XLA FFI custom call: one new query token per row over that row's KV cache.
//
// Why a kernel of our own: XLA:CPU reads a decode step's cache at ~19 GB/s in fp32 and slower in bf16 (it
// converts the whole cache before its dot), and it reads every slot of the cache's bucket, valid or not.
// This kernel reads the cache once, in its own dtype (bf16 halves the bytes), only in the 32-slot blocks
// that hold a valid slot, and keeps scores, softmax and sums in fp32.
//
//   q     [B, H, E]    f32   the new token's queries (RoPE applied; not yet scaled)
//   kt    [B, K, E, S] T     keys, slots minor (the sampler's KVCache layout), T = f32 or bf16
//   v     [B, K, S, E] T     values
//   mask  [B, S]       pred  which slots this row's query may see
//   out   [B, H, E]    f32   softmax(scale * q.k over the visible slots) . v;  H = K * G (grouped queries)
//
// A row that sees no slot gets zeros (XLA's masked softmax would give the mean of every value; such a row
// is padding whose output nothing reads).
//
// Work is split over (row, kv head) pairs on XLA's intra-op thread pool; the calling thread takes pairs too.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kBlock = 32;  // slots per score block: one 64-byte line of bf16 keys per head dimension
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

struct Shape {
  int64_t B, H, K, E, S;
};

// One (row b, kv head k) pair: its G query heads over its S slots. `scores` holds G * S floats (S rounded up
// to a block), `live` a flag per block.
template <typename T, int G, int E>
void AttendPair(const float* __restrict q, const T* __restrict kt, const T* __restrict v,
                const bool* __restrict mask, float* __restrict out, float scale, int64_t S,
                float* __restrict scores, uint8_t* __restrict live) {
  static_assert(E % kLanes == 0, "head_dim must be a multiple of 16");
  constexpr int V = E / kLanes;
  const int64_t stride = (S + kBlock - 1) / kBlock * kBlock;  // scores row per query head
  float qs[G][E];
  for (int g = 0; g < G; ++g)
    for (int e = 0; e < E; ++e) qs[g][e] = q[g * E + e] * scale;
  F32x16 best[G];
  for (int g = 0; g < G; ++g) best[g] = F32x16{} - INFINITY;
  const int64_t blocks = stride / kBlock;
  bool any_live = false;
  // 1. scores of the visible slots, block by block (a block with no visible slot is not read)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t s0 = blk * kBlock;
    const int n = static_cast<int>(std::min<int64_t>(kBlock, S - s0));
    bool has = false;
    for (int j = 0; j < n; ++j) has |= mask[s0 + j];
    live[blk] = has;
    if (!has) continue;
    any_live = true;
    // the last block, when partial, is read from a zero-padded copy so that one loop serves every block
    const T* keys = kt + s0;
    int64_t key_stride = S;
    T tail[E * kBlock];
    if (n < kBlock) {
      std::memset(tail, 0, sizeof(tail));
      for (int e = 0; e < E; ++e) std::memcpy(tail + e * kBlock, kt + e * S + s0, n * sizeof(T));
      keys = tail;
      key_stride = kBlock;
    }
    F32x16 acc[G][2];
    for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = F32x16{};
    for (int e = 0; e < E; ++e) {
      const T* row = keys + e * key_stride;
      const F32x16 k0 = Load16(row), k1 = Load16(row + kLanes);
      for (int g = 0; g < G; ++g) {
        acc[g][0] += qs[g][e] * k0;
        acc[g][1] += qs[g][e] * k1;
      }
    }
    bool visible[kBlock] = {};
    for (int j = 0; j < n; ++j) visible[j] = mask[s0 + j];
    const I32x16 m0 = Visible16(visible), m1 = Visible16(visible + kLanes);
    for (int g = 0; g < G; ++g) {
      const F32x16 x0 = m0 ? acc[g][0] : F32x16{} - INFINITY, x1 = m1 ? acc[g][1] : F32x16{} - INFINITY;
      std::memcpy(scores + g * stride + s0, &x0, sizeof(x0));
      std::memcpy(scores + g * stride + s0 + kLanes, &x1, sizeof(x1));
      best[g] = x0 > best[g] ? x0 : best[g];
      best[g] = x1 > best[g] ? x1 : best[g];
    }
  }
  if (!any_live) {
    std::fill(out, out + G * E, 0.0f);
    return;
  }
  // 2. probabilities (unnormalised) in place of the scores; invisible slots get exactly 0
  float total[G];
  for (int g = 0; g < G; ++g) {
    const float top = Max(best[g]);
    F32x16 sum{};
    for (int64_t blk = 0; blk < blocks; ++blk) {
      if (!live[blk]) continue;
      for (int half = 0; half < 2; ++half) {
        float* sc = scores + g * stride + blk * kBlock + half * kLanes;
        const F32x16 x = Load16(sc);
        const F32x16 p = x == F32x16{} - INFINITY ? F32x16{} : ExpNonPositive(x - top);
        std::memcpy(sc, &p, sizeof(p));
        sum += p;
      }
    }
    total[g] = Sum(sum);
  }
  // 3. the probability-weighted values, the visible slots of live blocks only
  F32x16 acc[G][V];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < V; ++i) acc[g][i] = F32x16{};
  for (int64_t blk = 0; blk < blocks; ++blk) {
    if (!live[blk]) continue;
    const int64_t s0 = blk * kBlock;
    const int n = static_cast<int>(std::min<int64_t>(kBlock, S - s0));
    for (int j = 0; j < n; ++j) {
      if (!mask[s0 + j]) continue;
      const T* row = v + (s0 + j) * E;
      F32x16 vv[V];
      for (int i = 0; i < V; ++i) vv[i] = Load16(row + i * kLanes);
      for (int g = 0; g < G; ++g) {
        const float p = scores[g * stride + s0 + j];
        for (int i = 0; i < V; ++i) acc[g][i] += p * vv[i];
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const float inv = 1.0f / total[g];
    for (int i = 0; i < V; ++i) {
      const F32x16 o = acc[g][i] * inv;
      std::memcpy(out + g * E + i * kLanes, &o, sizeof(o));
    }
  }
}

template <typename T>
using PairFn = void (*)(const float*, const T*, const T*, const bool*, float*, float, int64_t, float*,
                        uint8_t*);

template <typename T, int E>
PairFn<T> PickG(int64_t g) {
  switch (g) {
    case 1: return AttendPair<T, 1, E>;
    case 2: return AttendPair<T, 2, E>;
    case 3: return AttendPair<T, 3, E>;
    case 4: return AttendPair<T, 4, E>;
    case 5: return AttendPair<T, 5, E>;
    case 6: return AttendPair<T, 6, E>;
    case 7: return AttendPair<T, 7, E>;
    case 8: return AttendPair<T, 8, E>;
    default: return nullptr;
  }
}

template <typename T>
PairFn<T> Pick(int64_t g, int64_t e) {
  switch (e) {
    case 16: return PickG<T, 16>(g);
    case 32: return PickG<T, 32>(g);
    case 64: return PickG<T, 64>(g);
    case 128: return PickG<T, 128>(g);
    default: return nullptr;
  }
}

// Runs fn(i) for i in [0, count) on the pool's threads and this one; returns when every i has run. Late
// pool tasks (scheduled but started after the work is done) only touch the shared counters, which they own
// a reference to.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, Fn fn) {
  struct Counters {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
  };
  auto counters = std::make_shared<Counters>();
  auto drain = [counters, count, &fn]() {
    for (int64_t i = counters->next.fetch_add(1); i < count; i = counters->next.fetch_add(1)) {
      fn(i);
      counters->finished.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count - 1);
  for (int64_t h = 0; h < helpers; ++h) {
    // A helper may start after this call returned: it then finds no work and never calls fn.
    pool.Schedule([counters, count, fnp = &fn]() {
      for (int64_t i = counters->next.fetch_add(1); i < count; i = counters->next.fetch_add(1)) {
        (*fnp)(i);
        counters->finished.fetch_add(1, std::memory_order_release);
      }
    });
  }
  drain();
  while (counters->finished.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

template <typename T>
ffi::Error Run(ffi::ThreadPool& pool, const Shape& d, const float* q, const T* kt, const T* v,
               const bool* mask, float* out, float scale) {
  const int64_t G = d.H / d.K;
  PairFn<T> pair = Pick<T>(G, d.E);
  if (pair == nullptr)
    return ffi::Error::InvalidArgument("s3_decode_attention: unsupported head_dim " + std::to_string(d.E) +
                                       " or query heads per kv head " + std::to_string(G));
  const int64_t S = d.S;
  const int64_t blocks = (S + kBlock - 1) / kBlock;
  ParallelFor(pool, d.B * d.K, [&](int64_t i) {
    thread_local std::vector<float> scores;
    thread_local std::vector<uint8_t> live;
    const int64_t stride = blocks * kBlock;
    if (static_cast<int64_t>(scores.size()) < G * stride) scores.resize(G * stride);
    if (static_cast<int64_t>(live.size()) < blocks) live.resize(blocks);
    const int64_t b = i / d.K, k = i % d.K;
    pair(q + (b * d.H + k * G) * d.E, kt + (b * d.K + k) * d.E * S, v + (b * d.K + k) * S * d.E,
         mask + b * S, out + (b * d.H + k * G) * d.E, scale, S, scores.data(), live.data());
  });
  return ffi::Error::Success();
}

ffi::Error DecodeAttention(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer kt, ffi::AnyBuffer v,
                           ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out, float scale,
                           ffi::ThreadPool pool) {
  auto qd = q.dimensions(), kd = kt.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || md.size() != 2)
    return ffi::Error::InvalidArgument("s3_decode_attention: ranks must be q 3, kt 4, v 4, mask 2");
  Shape d{qd[0], qd[1], kd[1], qd[2], kd[3]};
  if (kd[0] != d.B || kd[2] != d.E || vd[0] != d.B || vd[1] != d.K || vd[2] != d.S || vd[3] != d.E ||
      md[0] != d.B || md[1] != d.S || d.K == 0 || d.H % d.K != 0)
    return ffi::Error::InvalidArgument("s3_decode_attention: shapes disagree (q [B,H,E], kt [B,K,E,S], "
                                       "v [B,K,S,E], mask [B,S], H a multiple of K)");
  if (kt.element_type() != v.element_type())
    return ffi::Error::InvalidArgument("s3_decode_attention: keys and values differ in dtype");
  const bool* m = mask.typed_data();
  if (kt.element_type() == ffi::DataType::F32)
    return Run<float>(pool, d, q.typed_data(), static_cast<const float*>(kt.untyped_data()),
                      static_cast<const float*>(v.untyped_data()), m, out->typed_data(), scale);
  if (kt.element_type() == ffi::DataType::BF16)
    return Run<uint16_t>(pool, d, q.typed_data(), static_cast<const uint16_t*>(kt.untyped_data()),
                         static_cast<const uint16_t*>(v.untyped_data()), m, out->typed_data(), scale);
  return ffi::Error::InvalidArgument("s3_decode_attention: the cache must be float32 or bfloat16");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(S3DecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ctx<ffi::ThreadPool>());
