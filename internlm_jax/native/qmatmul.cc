// int8-weight matmul for XLA:CPU, registered through the XLA FFI (see qmatmul.py, which packs weights, builds
// and loads it).
//
// Shapes: x [M, K] float32 activations; the weight q [N, K] int8 (row n = output channel n) with one float32
// scale per row, stored packed (below) -> y [M, N] float32, y[m, n] = scale[n] * sum_k x[m, k] * q[n, k].
//
// Packed layout, made once at load time by qmatmul.pack: panels of 16 output rows, N padded to a multiple of 16
// and K to a multiple of kBlock with zero weights. Panel p is Kp * 16 bytes: for each group of 4 along K
// (g = 0 .. Kp/4 - 1) the 64 bytes [g * 64 + r * 4 + j] = q[16 p + r, 4 g + j] + 128 (unsigned). One 64-byte
// load thus holds 4 consecutive k of 16 outputs, which is what vpdpbusd multiplies against 4 bytes of x
// broadcast to every lane: each lane accumulates its own output, with no horizontal sums, and one weight load
// serves every row of x in the tile (the register-blocked GEMM shape; batch 1 streams the panels in order).
//
// Two kernels, picked per call by M (attribute vnni_min_rows):
//   exact (M < vnni_min_rows): int8 -> float32 in registers, FMA. Same products as dequantize-then-dot; only
//     the summation order differs. Compute bound; kept to reproduce the pure-JAX path's tokens.
//   vnni  (M >= vnni_min_rows): x is quantized to int8 per block of kBlock = 128 along K (one scale per block,
//     as llama.cpp's q8 blocks: an outlier channel costs precision in its own block only), then vpdpbusd
//     (u8 x s8 -> s32, 64 products per instruction). The weight is the unsigned side (stored + 128), so x keeps
//     its sign; the offset adds 128 * sum_k xq[k], which depends on x alone: each block's accumulator starts at
//     -128 * sum xq. A block's integer sum stays below 2^24, so it converts to float exactly. Error, blocks b
//     of x's row m: |y - y_exact| <= scale[n] * sum_b (max_{k in b} |x[m, k]| / 254) * sum_{k in b} |q[n, k]|.
// Work is split over output panels on XLA's intra-op thread pool (no threads of our own).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;    // outputs per panel (one zmm of int32 / float)
constexpr int64_t kBlock = 128;   // activations per int8 scale; Kp is a multiple of it

using internlm_native::Mask16;
using internlm_native::ParallelFor;

// The packed weight. scale is [groups, panels * 16]: one float per output row and group of `group` consecutive
// k (groups = 1: per output channel, applied once at the end; more: applied per group, e.g. per head of wo).
struct Weight {
  const uint8_t* panels;
  int64_t panel_bytes;  // Kp * 16
  const float* scale;
  int64_t rows;         // panels * 16: the stride of scale
  int64_t groups;
  int64_t group;        // K / groups
};

// The tile's outputs: y[m, n0 + 16 r + lane] = acc (* scale), masked at N's end.
template <int MR, int NR>
inline void Store(const __m512 (&acc)[MR][NR], const float* scale, float* y, int64_t N, int64_t n0) {
  for (int r = 0; r < NR; ++r) {
    const int64_t n = n0 + r * kLanes;
    if (n >= N) break;
    const __mmask16 mask = Mask16(N - n);
    const __m512 s = scale ? _mm512_maskz_loadu_ps(mask, scale + n) : _mm512_set1_ps(1.f);
    for (int m = 0; m < MR; ++m) _mm512_mask_storeu_ps(y + m * N + n, mask, _mm512_mul_ps(acc[m][r], s));
  }
}

template <int NR>
inline void GroupScales(const Weight& w, int64_t k, int64_t n0, __m512 (&ws)[NR]) {
  const int64_t gi = std::min(k / w.group, w.groups - 1);  // k in Kp's padding: zero weights, any scale
  for (int r = 0; r < NR; ++r) ws[r] = _mm512_loadu_ps(w.scale + gi * w.rows + n0 + r * kLanes);
}

// ---- exact: float FMA over int8 converted in registers --------------------------------------------------------
// Byte j of each 32-bit lane (x 0x80 undoes the +128) shifted to the top, then an arithmetic shift back down
// sign-extends it: q[n, 4 g + j] for the 16 lanes.
template <int MR, int NR, bool kGrouped>
void ExactTile(const float* x, int64_t K, const Weight& w, const uint8_t* panels, float* y, int64_t N, int64_t n0) {
  __m512 acc[MR][NR], part[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = part[m][r] = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t steps = (K + 3) / 4;
  for (int64_t g = 0; g < steps; ++g) {
    __m512i wv[NR];
    for (int r = 0; r < NR; ++r)
      wv[r] = _mm512_xor_si512(_mm512_loadu_si512(panels + r * w.panel_bytes + g * 64), flip);
    for (int j = 0; j < 4; ++j) {
      const int64_t k = 4 * g + j;
      if (k >= K) break;
      __m512 wf[NR];
      for (int r = 0; r < NR; ++r)
        wf[r] = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(wv[r], 24 - 8 * j), 24));
      for (int m = 0; m < MR; ++m) {
        const __m512 xv = _mm512_set1_ps(x[m * K + k]);
        for (int r = 0; r < NR; ++r) part[m][r] = _mm512_fmadd_ps(xv, wf[r], part[m][r]);
      }
    }
    if (kGrouped && ((4 * g + 4) % w.group == 0 || g + 1 == steps)) {  // group % 4 == 0: groups end on a step
      __m512 ws[NR];
      GroupScales<NR>(w, 4 * g, n0, ws);
      for (int m = 0; m < MR; ++m)
        for (int r = 0; r < NR; ++r) {
          acc[m][r] = _mm512_fmadd_ps(part[m][r], ws[r], acc[m][r]);
          part[m][r] = _mm512_setzero_ps();
        }
    }
  }
  if (kGrouped) {
    Store<MR, NR>(acc, nullptr, y, N, n0);
  } else {
    Store<MR, NR>(part, w.scale, y, N, n0);
  }
}

// ---- vnni: activations quantized per block, u8 x s8 dot products ---------------------------------------------
// Integer sums run over sub-blocks of `sub` k (kBlock, or a weight group when groups are shorter), each starting
// from its bias: -128 * the sum of its xq (the weight's +128 offset).
struct QuantizedRows {
  int64_t blocks = 0;         // Kp / kBlock; rows are zero padded to whole blocks
  int64_t sub = kBlock;       // k per integer sum, dividing kBlock
  std::vector<int8_t> q;      // [M, Kp]
  std::vector<float> scale;   // [M, blocks]: max |x| of the block / 127
  std::vector<int32_t> bias;  // [M, Kp / sub]
};

void QuantizeRow(const float* src, int64_t K, int64_t blocks, int64_t sub, int8_t* dst, float* scales,
                 int32_t* biases) {
  const __m512 sign = _mm512_set1_ps(-0.f);
  for (int64_t b = 0; b < blocks; ++b) {
    const float* s0 = src + b * kBlock;
    const int64_t n = std::max<int64_t>(0, std::min(kBlock, K - b * kBlock));
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = 0; k < n; k += 16)
      amax = _mm512_max_ps(amax, _mm512_andnot_ps(sign, _mm512_maskz_loadu_ps(Mask16(n - k), s0 + k)));
    const float top = _mm512_reduce_max_ps(amax);
    const float s = top > 0.f ? top / 127.f : 1.f;
    const __m512 inv = _mm512_set1_ps(1.f / s);
    int8_t* d0 = dst + b * kBlock;
    scales[b] = s;
    for (int64_t k0 = 0; k0 < kBlock; k0 += sub) {
      __m512i sum = _mm512_setzero_si512();
      for (int64_t k = k0; k < k0 + sub; k += 16) {  // past n the masked loads give zeros: the padding
        // round to nearest even (the default MXCSR mode), |v| <= 127 (x * (1/s) may round to 127.00001)
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(Mask16(n - k), s0 + k), inv));
        v = _mm512_max_epi32(_mm512_min_epi32(v, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
        v = _mm512_maskz_mov_epi32(Mask16(sub - (k - k0)), v);
        sum = _mm512_add_epi32(sum, v);
        _mm_mask_storeu_epi8(d0 + k, Mask16(sub - (k - k0)), _mm512_cvtepi32_epi8(v));
      }
      biases[(b * kBlock + k0) / sub] = -128 * _mm512_reduce_add_epi32(sum);
    }
  }
}

// kPrefetch: also pull the same k range of the NR panels at `next` into L2 (the first row tile of a panel group
// fetches the next group while the others run: weights larger than L2 otherwise stall on L3 latency).
template <int MR, int NR, bool kGrouped, bool kPrefetch = false>
void VnniTile(const QuantizedRows& xq, int64_t m0, const Weight& w, const uint8_t* panels, float* y, int64_t N,
              int64_t n0, const uint8_t* next = nullptr) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  const int64_t row = xq.blocks * kBlock, subs = row / xq.sub, steps = xq.sub / 4;
  const int8_t* xrow = xq.q.data() + m0 * row;
  for (int64_t k0 = 0; k0 < row; k0 += xq.sub) {
    __m512i dot[MR][NR];
    for (int m = 0; m < MR; ++m) {
      const __m512i init = _mm512_set1_epi32(xq.bias[(m0 + m) * subs + k0 / xq.sub]);
      for (int r = 0; r < NR; ++r) dot[m][r] = init;
    }
    const uint8_t* wb = panels + k0 * kLanes;
    const int8_t* xb = xrow + k0;
#pragma GCC unroll 4
    for (int64_t g = 0; g < steps; ++g) {
      __m512i wv[NR];
      for (int r = 0; r < NR; ++r) wv[r] = _mm512_loadu_si512(wb + r * w.panel_bytes + g * 64);
      if (kPrefetch)
        for (int r = 0; r < NR; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(next + k0 * kLanes + r * w.panel_bytes + g * 64), _MM_HINT_T1);
      for (int m = 0; m < MR; ++m) {
        int32_t four;
        std::memcpy(&four, xb + m * row + 4 * g, 4);
        const __m512i xv = _mm512_set1_epi32(four);
        for (int r = 0; r < NR; ++r) dot[m][r] = _mm512_dpbusd_epi32(dot[m][r], wv[r], xv);
      }
    }
    __m512 ws[NR];
    if (kGrouped) GroupScales<NR>(w, k0, n0, ws);
    for (int m = 0; m < MR; ++m) {
      const __m512 sx = _mm512_set1_ps(xq.scale[(m0 + m) * xq.blocks + k0 / kBlock]);
      for (int r = 0; r < NR; ++r)
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m][r]), kGrouped ? _mm512_mul_ps(sx, ws[r]) : sx,
                                    acc[m][r]);
    }
  }
  Store<MR, NR>(acc, kGrouped ? nullptr : w.scale, y + m0 * N, N, n0);
}

// Every row of x (tiles of 4, then the rest) against NR panels from panel p.
template <int NR, bool kGrouped>
void VnniPanels(const QuantizedRows& xq, int64_t M, const Weight& w, float* y, int64_t N, int64_t p) {
  const uint8_t* panels = w.panels + p * w.panel_bytes;
  const int64_t n0 = p * kLanes;
  int64_t m = 0;
  // The next NR panels, fetched by the first row tile (when they exist; none past the weight's end).
  const bool has_next = p + 2 * NR <= w.rows / kLanes;
  const uint8_t* next = panels + NR * w.panel_bytes;
  // 4 x NR int32 + 4 x NR float accumulators + NR weights + 1 broadcast fit the 32 zmm for NR <= 3.
  if (M >= 4) {
    if (has_next) {
      VnniTile<4, NR, kGrouped, true>(xq, 0, w, panels, y, N, n0, next);
    } else {
      VnniTile<4, NR, kGrouped>(xq, 0, w, panels, y, N, n0);
    }
    m = 4;
  } else if (has_next && M > 0) {
    switch (M) {
      case 3: VnniTile<3, NR, kGrouped, true>(xq, 0, w, panels, y, N, n0, next); break;
      case 2: VnniTile<2, NR, kGrouped, true>(xq, 0, w, panels, y, N, n0, next); break;
      default: VnniTile<1, NR, kGrouped, true>(xq, 0, w, panels, y, N, n0, next); break;
    }
    return;
  }
  for (; m + 4 <= M; m += 4) VnniTile<4, NR, kGrouped>(xq, m, w, panels, y, N, n0);
  switch (M - m) {
    case 3: VnniTile<3, NR, kGrouped>(xq, m, w, panels, y, N, n0); break;
    case 2: VnniTile<2, NR, kGrouped>(xq, m, w, panels, y, N, n0); break;
    case 1: VnniTile<1, NR, kGrouped>(xq, m, w, panels, y, N, n0); break;
    default: break;
  }
}

template <int NR, bool kGrouped>
void ExactPanels(const float* x, int64_t M, int64_t K, const Weight& w, float* y, int64_t N, int64_t p) {
  const uint8_t* panels = w.panels + p * w.panel_bytes;
  const int64_t n0 = p * kLanes;
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) ExactTile<4, NR, kGrouped>(x + m * K, K, w, panels, y + m * N, N, n0);
  switch (M - m) {
    case 3: ExactTile<3, NR, kGrouped>(x + m * K, K, w, panels, y + m * N, N, n0); break;
    case 2: ExactTile<2, NR, kGrouped>(x + m * K, K, w, panels, y + m * N, N, n0); break;
    case 1: ExactTile<1, NR, kGrouped>(x + m * K, K, w, panels, y + m * N, N, n0); break;
    default: break;
  }
}

constexpr int64_t kPanelsPerTile = 3;

// Panels per chunk: a multiple of the tile, about four chunks per thread for balance, and at least ~32 KB of
// weights so scheduling stays small next to the work.
int64_t PanelsPerChunk(int64_t panels, int64_t panel_bytes, int64_t threads) {
  int64_t n = (panels + 4 * threads - 1) / (4 * threads);
  n = std::max<int64_t>(n, (32 * 1024 + panel_bytes - 1) / panel_bytes);
  return (n + kPanelsPerTile - 1) / kPanelsPerTile * kPanelsPerTile;
}

template <bool kGrouped>
void Run(ffi::ThreadPool& pool, const float* xp, int64_t M, int64_t K, const Weight& w, float* yp, int64_t N,
         int64_t vnni_min_rows) {
  const int64_t panels = w.rows / kLanes;
  const int64_t per_chunk = PanelsPerChunk(panels, w.panel_bytes, std::max<int64_t>(1, pool.num_threads()));
  const int64_t chunks = (panels + per_chunk - 1) / per_chunk;
  auto each_tile = [&](int64_t c, auto&& full, auto&& one) {
    const int64_t end = std::min(panels, (c + 1) * per_chunk);
    int64_t p = c * per_chunk;
    for (; p + kPanelsPerTile <= end; p += kPanelsPerTile) full(p);
    for (; p < end; ++p) one(p);
  };
  if (M < vnni_min_rows) {
    ParallelFor(pool, chunks, [&](int64_t c) {
      each_tile(c, [&](int64_t p) { ExactPanels<kPanelsPerTile, kGrouped>(xp, M, K, w, yp, N, p); },
                [&](int64_t p) { ExactPanels<1, kGrouped>(xp, M, K, w, yp, N, p); });
    });
    return;
  }
  const int64_t Kp = w.panel_bytes / kLanes;
  QuantizedRows xq;
  xq.blocks = Kp / kBlock;
  xq.sub = kGrouped ? std::min(kBlock, w.group) : kBlock;
  xq.q.resize(M * Kp);
  xq.scale.resize(M * xq.blocks);
  xq.bias.resize(M * (Kp / xq.sub));
  auto quantize = [&](int64_t m) {
    QuantizeRow(xp + m * K, K, xq.blocks, xq.sub, xq.q.data() + m * Kp, xq.scale.data() + m * xq.blocks,
                xq.bias.data() + m * (Kp / xq.sub));
  };
  if (M * K >= (1 << 16)) {
    ParallelFor(pool, M, quantize);
  } else {
    for (int64_t m = 0; m < M; ++m) quantize(m);
  }
  ParallelFor(pool, chunks, [&](int64_t c) {
    each_tile(c, [&](int64_t p) { VnniPanels<kPanelsPerTile, kGrouped>(xq, M, w, yp, N, p); },
              [&](int64_t p) { VnniPanels<1, kGrouped>(xq, M, w, yp, N, p); });
  });
}

ffi::Error QMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> wq,
                       ffi::Buffer<ffi::F32> scale, int64_t n_out, int64_t vnni_min_rows,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = wq.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 2)
    return ffi::Error::InvalidArgument("qmatmul: want x [M, K], packed w [panels, Kp * 16], scale [groups, rows]");
  const int64_t M = xd[0], K = xd[1], N = n_out;
  Weight w{wq.typed_data(), wd[1], scale.typed_data(), wd[0] * kLanes, sd[0], 0};
  const int64_t Kp = w.panel_bytes / kLanes;
  if (w.panel_bytes % (kLanes * kBlock) || Kp < K || Kp >= K + kBlock || wd[0] != (N + kLanes - 1) / kLanes ||
      sd[1] != w.rows || w.groups < 1)
    return ffi::Error::InvalidArgument("qmatmul: packed weight does not match x [M, K] and n_out");
  w.group = K / w.groups;
  const bool grouped = w.groups > 1;
  if (grouped && (K % w.groups || w.group % 4 || (kBlock % w.group && w.group % kBlock)))
    return ffi::Error::InvalidArgument("qmatmul: weight groups must split K evenly into multiples of 4 that "
                                       "divide 128 or are multiples of it");
  float* yp = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(yp, yp + M * N, 0.f);
    return ffi::Error::Success();
  }
  if (grouped) {
    Run<true>(pool, x.typed_data(), M, K, w, yp, N, vnni_min_rows);
  } else {
    Run<false>(pool, x.typed_data(), M, K, w, yp, N, vnni_min_rows);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(InternlmQMatmulI8, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("n_out")
                                  .Attr<int64_t>("vnni_min_rows")
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" int internlm_native_supported() { return internlm_native::Supported(); }
