// int8-weight matmul for XLA:CPU, registered through the XLA FFI (see qmatmul.py, which builds and loads it).
//
// Shapes: x [M, K] float32 activations, w [N, K] int8 (row n = output channel n, contraction last),
// scale [N] float32 per output channel -> y [M, N] float32, y[m, n] = scale[n] * sum_k x[m, k] * w[n, k].
//
// Two kernels, picked per call by M (attribute vnni_min_rows):
//   exact (M < vnni_min_rows): int8 -> float32 in registers, FMA. Same products as dequantize-then-dot; only
//     the summation order differs. Three vector ops per 16 weights make it compute bound (~12 GB/s of int8 on
//     2 cores, below the memory's ~25), so by default (qmatmul.py) even batch-1 decode takes the VNNI kernel.
//   vnni  (M >= vnni_min_rows): x is quantized to int8 per block of QBLOCK = 128 along K (one scale per block,
//     as llama.cpp's q8 blocks: an outlier channel costs precision in its own block only), then vpdpbusd (u8 x s8
//     -> s32, 64 products per instruction: 4x the float FMA rate). Error, blocks b of x's row m:
//     |y - y_exact| <= scale[n] * sum_b (max_{k in b} |x[m, k]| / 254) * sum_{k in b} |w[n, k]|.
//     Blocks of 128 measured ~1.3x faster than 64 at M = 32 (half the int32 -> float conversions), 256 a little
//     faster again; 128 keeps an outlier's reach small.
// Work is split over output rows on XLA's intra-op thread pool (no threads of our own).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Chunks [0, total) claimed from a shared counter by the caller and by pool tasks. A task that starts after
// every chunk is claimed only touches the shared counters (kept alive by its shared_ptr), so the caller may
// return once the claimed chunks are done: nothing waits for a pool thread that is busy elsewhere.
struct Chunks {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0;
  std::function<void(int64_t)> body;

  void Run() {
    for (int64_t i = next.fetch_add(1); i < total; i = next.fetch_add(1)) {
      body(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void ParallelFor(ffi::ThreadPool& pool, int64_t total, std::function<void(int64_t)> body) {
  int64_t threads = std::min<int64_t>(pool.num_threads(), total);
  if (threads <= 1) {
    for (int64_t i = 0; i < total; ++i) body(i);
    return;
  }
  auto chunks = std::make_shared<Chunks>();
  chunks->total = total;
  chunks->body = std::move(body);
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([chunks] { chunks->Run(); });
  chunks->Run();
  while (chunks->done.load(std::memory_order_acquire) < total) _mm_pause();
}

inline __mmask16 Mask16(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }
inline __mmask64 Mask64(int64_t n) { return n >= 64 ? ~0ULL : ((1ULL << n) - 1); }

// ---- exact: float FMA over int8 converted in registers --------------------------------------------------------
template <int MR, int NR>
void ExactTile(const float* x, int64_t K, const int8_t* w, const float* scale, float* y, int64_t N) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  auto step = [&](int64_t k, __mmask16 mask) __attribute__((always_inline)) {
    __m512 wf[NR];
    for (int r = 0; r < NR; ++r)
      wf[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w + r * K + k)));
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wf[r], acc[m][r]);
    }
  };
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) step(k, 0xFFFF);  // a constant mask: plain loads
  if (k < K) step(k, Mask16(K - k));
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) y[m * N + r] = _mm512_reduce_add_ps(acc[m][r]) * scale[r];
}

template <int MR>
void ExactRows(const float* x, int64_t K, const int8_t* w, const float* scale, float* y, int64_t N, int64_t n0,
               int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) ExactTile<MR, 4>(x, K, w + n * K, scale + n, y + n, N);
  for (; n < n1; ++n) ExactTile<MR, 1>(x, K, w + n * K, scale + n, y + n, N);
}

void Exact(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, float* y, int64_t N,
           int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) ExactRows<4>(x + m * K, K, w, scale, y + m * N, N, n0, n1);
  switch (M - m) {
    case 3: ExactRows<3>(x + m * K, K, w, scale, y + m * N, N, n0, n1); break;
    case 2: ExactRows<2>(x + m * K, K, w, scale, y + m * N, N, n0, n1); break;
    case 1: ExactRows<1>(x + m * K, K, w, scale, y + m * N, N, n0, n1); break;
    default: break;
  }
}

// ---- vnni: activations quantized per block, u8 x s8 dot products ---------------------------------------------
// vpdpbusd multiplies unsigned by signed bytes. The weight is the unsigned side (w + 128, one xor in registers)
// so the activations keep their sign, and the offset's contribution 128 * sum_k xq[k] depends on x alone: each
// block's accumulator starts at -128 * sum xq instead of 0. A block's integer sum stays below 2^24, so it
// converts to float exactly before its scale is applied.
constexpr int64_t kChunk = 64;  // bytes of one register
#ifndef QBLOCK
#define QBLOCK 128
#endif
constexpr int64_t kBlock = QBLOCK;  // activations per scale; a multiple of kChunk, at most 512 (int32 -> float exact)

struct QuantizedRows {
  int64_t blocks;             // ceil(K / 64); rows are zero padded to whole blocks
  std::vector<int8_t> q;      // [M, blocks * 64]
  std::vector<float> scale;   // [M, blocks]: max |x| of the block / 127
  std::vector<int32_t> bias;  // [M, blocks]: -128 * sum of the block's q
};

QuantizedRows QuantizeRows(const float* x, int64_t M, int64_t K) {
  QuantizedRows out;
  out.blocks = (K + kBlock - 1) / kBlock;
  out.q.assign(M * out.blocks * kBlock, 0);
  out.scale.resize(M * out.blocks);
  out.bias.resize(M * out.blocks);
  const __m512 sign = _mm512_set1_ps(-0.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < out.blocks; ++b) {
      const float* src = x + m * K + b * kBlock;
      const int64_t n = std::min(kBlock, K - b * kBlock);
      __m512 amax = _mm512_setzero_ps();
      for (int64_t k = 0; k < n; k += 16)
        amax = _mm512_max_ps(amax, _mm512_andnot_ps(sign, _mm512_maskz_loadu_ps(Mask16(n - k), src + k)));
      const float top = _mm512_reduce_max_ps(amax);
      const float s = top > 0.f ? top / 127.f : 1.f;
      const __m512 inv = _mm512_set1_ps(1.f / s);
      int8_t* dst = out.q.data() + (m * out.blocks + b) * kBlock;
      __m512i sum = _mm512_setzero_si512();
      for (int64_t k = 0; k < n; k += 16) {
        // round to nearest even (the default MXCSR mode), |v| <= 127 (x * (1/s) may round to 127.00001)
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(Mask16(n - k), src + k), inv));
        v = _mm512_max_epi32(_mm512_min_epi32(v, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
        sum = _mm512_add_epi32(sum, v);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), _mm512_cvtepi32_epi8(v));
      }
      out.scale[m * out.blocks + b] = s;
      out.bias[m * out.blocks + b] = -128 * _mm512_reduce_add_epi32(sum);
    }
  }
  return out;
}

template <int MR, int NR>
void VnniTile(const QuantizedRows& xq, int64_t m0, int64_t K, const int8_t* w, const float* scale, float* y,
              int64_t N) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t row = xq.blocks * kBlock;
  for (int64_t b = 0; b < xq.blocks; ++b) {
    __m512i dot[MR][NR];
    for (int m = 0; m < MR; ++m) {
      const __m512i init = _mm512_maskz_set1_epi32(1, xq.bias[(m0 + m) * xq.blocks + b]);
      for (int r = 0; r < NR; ++r) dot[m][r] = init;
    }
    auto chunk = [&](int64_t k, __mmask64 mask) __attribute__((always_inline)) {
      __m512i wv[NR];
      for (int r = 0; r < NR; ++r) wv[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + r * K + k), flip);
      for (int m = 0; m < MR; ++m) {
        const __m512i xv = _mm512_loadu_si512(xq.q.data() + (m0 + m) * row + k);
        for (int r = 0; r < NR; ++r) dot[m][r] = _mm512_dpbusd_epi32(dot[m][r], wv[r], xv);
      }
    };
    const int64_t end = std::min(K, (b + 1) * kBlock);
    int64_t k = b * kBlock;
    for (; k + kChunk <= end; k += kChunk) chunk(k, ~0ULL);  // a constant mask: plain loads
    if (k < end) chunk(k, Mask64(end - k));
    for (int m = 0; m < MR; ++m) {
      const __m512 sx = _mm512_set1_ps(xq.scale[(m0 + m) * xq.blocks + b]);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m][r]), sx, acc[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) y[(m0 + m) * N + r] = _mm512_reduce_add_ps(acc[m][r]) * scale[r];
}

// Tiles of 3 rows x 4 columns: 12 integer and 12 float accumulators, 4 weight registers, within the 32 zmm.
template <int NR>
void VnniColumns(const QuantizedRows& xq, int64_t M, int64_t K, const int8_t* w, const float* scale, float* y,
                 int64_t N) {
  int64_t m = 0;
  for (; m + 3 <= M; m += 3) VnniTile<3, NR>(xq, m, K, w, scale, y, N);
  switch (M - m) {
    case 2: VnniTile<2, NR>(xq, m, K, w, scale, y, N); break;
    case 1: VnniTile<1, NR>(xq, m, K, w, scale, y, N); break;
    default: break;
  }
}

void Vnni(const QuantizedRows& xq, int64_t M, int64_t K, const int8_t* w, const float* scale, float* y, int64_t N,
          int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) VnniColumns<4>(xq, M, K, w + n * K, scale + n, y + n, N);
  for (; n < n1; ++n) VnniColumns<1>(xq, M, K, w + n * K, scale + n, y + n, N);
}

// Output rows per chunk: a multiple of 4 (the tile), about four chunks per thread for balance, and at least
// ~32 KB of weights so scheduling stays small next to the work.
int64_t RowsPerChunk(int64_t N, int64_t K, int64_t threads) {
  int64_t rows = (N + 4 * threads - 1) / (4 * threads);
  rows = std::max<int64_t>(rows, (32 * 1024 + K - 1) / K);
  return (rows + 3) / 4 * 4;
}

ffi::Error QMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                       ffi::Buffer<ffi::F32> scale, int64_t vnni_min_rows, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || scale.element_count() != wd[0])
    return ffi::Error::InvalidArgument("qmatmul: want x [M, K], w [N, K], scale [N]");
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  const float* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(yp, yp + M * N, 0.f);
    return ffi::Error::Success();
  }
  const int64_t rows = RowsPerChunk(N, K, std::max<int64_t>(1, pool.num_threads()));
  const int64_t chunks = (N + rows - 1) / rows;
  if (M < vnni_min_rows) {
    ParallelFor(pool, chunks, [&](int64_t c) { Exact(xp, M, K, wp, sp, yp, N, c * rows, std::min(N, (c + 1) * rows)); });
  } else {
    const QuantizedRows xq = QuantizeRows(xp, M, K);
    ParallelFor(pool, chunks, [&](int64_t c) { Vnni(xq, M, K, wp, sp, yp, N, c * rows, std::min(N, (c + 1) * rows)); });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(InternlmQMatmulI8, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("vnni_min_rows")
                                  .Ret<ffi::Buffer<ffi::F32>>());

// Whether this CPU runs the instructions the kernels use (the library is built with -march=native, but a cached
// build may be loaded on another machine of a shared home).
extern "C" int internlm_native_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}
