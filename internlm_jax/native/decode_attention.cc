// Paged decode attention for XLA:CPU, registered through the XLA FFI (see decode_attention.py).
//
// Shapes: B batch, H query heads, K kv heads, G = H / K, D head_dim, P pages in the pool, ps page_size,
// pps page-table width. q [B, H, D] float32; k_pages, v_pages [K, P, ps, D] float32, or int8 with per-token
// scales k_scale, v_scale [K, P, ps] float32; page_table [B, pps] int32; lengths [B] int32 -> out [B, H, D].
//
// out[b, h] = softmax_t(q[b, h] . k_t / sqrt(D)) . v over the positions t < lengths[b] of sequence b, whose
// token t sits at slot t % ps of page page_table[b, t / ps]: the math of kernels/paged_attention_reference.py,
// reading each key and value once from the pool where it lies instead of gathering dense copies first (at
// batch 32 the gathers and their masks cost more than every other op of a decode step). A length of 0 gives
// zeros. One task per (sequence, kv head): its G query heads share every key and value read.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using internlm_native::Mask16;
using internlm_native::ParallelFor;

// e^x for x <= 0 (scores minus their max), 16 at a time: 2^(x log2 e) split into 2^n * 2^f, f in [-0.5, 0.5],
// 2^f by a degree-6 polynomial (relative error ~2e-7, about float32 rounding). Below -87 it flushes to 0.
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));  // ln 2^frac
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// One key or value row, D elements, as float32 registers of 16 (masked at D's end).
template <typename T>
inline __m512 LoadRow(const T* row, int64_t d, __mmask16 mask);
template <>
inline __m512 LoadRow<float>(const float* row, int64_t d, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, row + d);
}
template <>
inline __m512 LoadRow<int8_t>(const int8_t* row, int64_t d, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, row + d)));
}

constexpr int internlm_attn_max_g = 16;       // query heads per kv head
constexpr int internlm_attn_max_chunks = 16;  // D up to 256

// kG, kC > 0 fix G and the number of 16-float chunks of D at compile time, so the query and accumulator arrays
// live in registers (the common head shapes); 0 takes them from the arguments.
template <typename T, int kG, int kC>
void AttendOne(const float* q, const T* k_pages, const T* v_pages, const float* k_scale, const float* v_scale,
               const int32_t* table, int64_t length, int64_t G_, int64_t D, int64_t P, int64_t ps, float* out,
               std::vector<float>& scores) {
  const int64_t G = kG ? kG : G_;
  const int64_t chunks = kC ? kC : (D + 15) / 16;
  constexpr int kMaxG = kG ? kG : internlm_attn_max_g;
  constexpr int kMaxChunks = kC ? kC : internlm_attn_max_chunks;
  if (length <= 0) {
    std::fill(out, out + G * D, 0.f);
    return;
  }
  scores.resize(G * length);
  __m512 qv[kMaxG][kMaxChunks];
  const float inv_sqrt_d = 1.f / std::sqrt(static_cast<float>(D));
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < chunks; ++c)
      qv[g][c] = _mm512_mul_ps(_mm512_maskz_loadu_ps(Mask16(D - 16 * c), q + g * D + 16 * c),
                               _mm512_set1_ps(inv_sqrt_d));
  // Every position t < length in order, with its slot in the pool (no division per position), and the slot of
  // the same row in the sequence's next page, or -1. Pages lie anywhere in the pool, so the hardware prefetcher
  // cannot follow them: each row also pulls in its counterpart of the next page.
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  auto for_each_slot = [&](auto&& body) __attribute__((always_inline)) {
    for (int64_t t0 = 0, p = 0; t0 < length; t0 += ps, ++p) {
      const int64_t base = std::clamp<int64_t>(table[p], 0, P - 1) * ps;
      const int64_t next = t0 + ps < length ? std::clamp<int64_t>(table[p + 1], 0, P - 1) * ps : -1;
      const int64_t n = std::min(ps, length - t0);
      for (int64_t o = 0; o < n; ++o) body(t0 + o, base + o, next < 0 ? -1 : next + o);
    }
  };
  auto prefetch_row = [&](const T* pages, int64_t slot) __attribute__((always_inline)) {
    if (slot < 0) return;
    const char* row = reinterpret_cast<const char*>(pages + slot * D);
    for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
  };
  auto prefetch_row_l2 = [&](const T* pages, int64_t slot) __attribute__((always_inline)) {
    const char* row = reinterpret_cast<const char*>(pages + slot * D);
    for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(row + b, _MM_HINT_T1);
  };
  // Scores, [G, length].
  for_each_slot([&](int64_t t, int64_t s, int64_t s_next) __attribute__((always_inline)) {
    prefetch_row(k_pages, s_next);
    prefetch_row_l2(v_pages, s);  // the values pass reads it next
    const T* krow = k_pages + s * D;
    __m512 acc[kMaxG];
    for (int64_t g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512 kv = LoadRow<T>(krow, 16 * c, Mask16(D - 16 * c));
      for (int64_t g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(qv[g][c], kv, acc[g]);
    }
    const float ks = k_scale ? k_scale[s] : 1.f;
    for (int64_t g = 0; g < G; ++g) scores[g * length + t] = _mm512_reduce_add_ps(acc[g]) * ks;
  });
  // Softmax per query head; the 1 / sum is folded into the output.
  float inv_sum[kMaxG];
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores.data() + g * length;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < length; t += 16) mx = _mm512_mask_max_ps(mx, Mask16(length - t), mx, _mm512_loadu_ps(sg + t));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < length; t += 16) {
      const __mmask16 mask = Mask16(length - t);
      const __m512 p = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, sg + t), m));
      _mm512_mask_storeu_ps(sg + t, mask, p);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, p));
    }
    inv_sum[g] = 1.f / _mm512_reduce_add_ps(sum);
  }
  // Weighted values.
  __m512 acc[kMaxG][kMaxChunks];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < chunks; ++c) acc[g][c] = _mm512_setzero_ps();
  for_each_slot([&](int64_t t, int64_t s, int64_t) __attribute__((always_inline)) {
    const T* vrow = v_pages + s * D;
    const float vs = v_scale ? v_scale[s] : 1.f;
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512 vv = LoadRow<T>(vrow, 16 * c, Mask16(D - 16 * c));
      for (int64_t g = 0; g < G; ++g)
        acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * length + t] * vs), vv, acc[g][c]);
    }
  });
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < chunks; ++c)
      _mm512_mask_storeu_ps(out + g * D + 16 * c, Mask16(D - 16 * c),
                            _mm512_mul_ps(acc[g][c], _mm512_set1_ps(inv_sum[g])));
}

template <typename T>
ffi::Error Attend(ffi::ThreadPool& pool, const float* q, const T* k_pages, const T* v_pages, const float* k_scale,
                  const float* v_scale, const int32_t* table, const int32_t* lengths, int64_t B, int64_t H,
                  int64_t K, int64_t D, int64_t P, int64_t ps, int64_t pps, float* out) {
  if (K <= 0 || H % K || H / K > internlm_attn_max_g || D > 16 * internlm_attn_max_chunks || D <= 0)
    return ffi::Error::InvalidArgument("decode_attention: want H a multiple of K, H / K <= 16, 0 < D <= 256");
  const int64_t G = H / K;
  using Fn = void (*)(const float*, const T*, const T*, const float*, const float*, const int32_t*, int64_t,
                      int64_t, int64_t, int64_t, int64_t, float*, std::vector<float>&);
  Fn fn = &AttendOne<T, 0, 0>;
#define INTERNLM_SHAPE(g, c) \
  if (G == g && D == 16 * c) fn = &AttendOne<T, g, c>;
#define INTERNLM_SHAPES(g) INTERNLM_SHAPE(g, 4) INTERNLM_SHAPE(g, 8)
  INTERNLM_SHAPES(1) INTERNLM_SHAPES(2) INTERNLM_SHAPES(3) INTERNLM_SHAPES(4) INTERNLM_SHAPES(6) INTERNLM_SHAPES(8)
#undef INTERNLM_SHAPES
#undef INTERNLM_SHAPE
  ParallelFor(pool, B * K, [&](int64_t task) {
    thread_local std::vector<float> scores;
    const int64_t b = task / K, kh = task % K;
    const int64_t length = std::min<int64_t>(lengths[b], pps * ps);
    const int64_t pool_offset = kh * P * ps;  // [K, P, ps] slots of this head
    fn(q + (b * H + kh * G) * D, k_pages + pool_offset * D, v_pages + pool_offset * D,
       k_scale ? k_scale + pool_offset : nullptr, v_scale ? v_scale + pool_offset : nullptr, table + b * pps,
       length, G, D, P, ps, out + (b * H + kh * G) * D, scores);
  });
  return ffi::Error::Success();
}

template <typename Pages>
bool ShapesOk(const ffi::Buffer<ffi::F32>& q, const Pages& k, const Pages& v, const ffi::Buffer<ffi::S32>& table,
              const ffi::Buffer<ffi::S32>& lengths) {
  auto qd = q.dimensions(), kd = k.dimensions(), td = table.dimensions();
  return qd.size() == 3 && kd.size() == 4 && td.size() == 2 && kd[3] == qd[2] && td[0] == qd[0] &&
         lengths.element_count() == qd[0] && v.dimensions().size() == 4 &&
         std::equal(kd.begin(), kd.end(), v.dimensions().begin()) && kd[1] > 0 && kd[2] > 0;
}

ffi::Error AttendF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                     ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> out) {
  if (!ShapesOk(q, k, v, table, lengths))
    return ffi::Error::InvalidArgument("decode_attention: want q [B, H, D], pages [K, P, ps, D], table [B, pps]");
  auto qd = q.dimensions(), kd = k.dimensions();
  return Attend<float>(pool, q.typed_data(), k.typed_data(), v.typed_data(), nullptr, nullptr, table.typed_data(),
                       lengths.typed_data(), qd[0], qd[1], kd[0], qd[2], kd[1], kd[2], table.dimensions()[1],
                       out->typed_data());
}

ffi::Error AttendI8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S8> k, ffi::Buffer<ffi::S8> v,
                    ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::F32> k_scale,
                    ffi::Buffer<ffi::F32> v_scale, ffi::ResultBuffer<ffi::F32> out) {
  if (!ShapesOk(q, k, v, table, lengths) || k_scale.element_count() * k.dimensions()[3] != k.element_count() ||
      v_scale.element_count() != k_scale.element_count())
    return ffi::Error::InvalidArgument("decode_attention: want int8 pages [K, P, ps, D] with scales [K, P, ps]");
  auto qd = q.dimensions(), kd = k.dimensions();
  return Attend<int8_t>(pool, q.typed_data(), k.typed_data(), v.typed_data(), k_scale.typed_data(),
                        v_scale.typed_data(), table.typed_data(), lengths.typed_data(), qd[0], qd[1], kd[0], qd[2],
                        kd[1], kd[2], table.dimensions()[1], out->typed_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(InternlmDecodeAttentionF32, AttendF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(InternlmDecodeAttentionI8, AttendI8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" int internlm_native_supported() { return internlm_native::Supported(); }
