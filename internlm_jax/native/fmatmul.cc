// float32 matmul for serving on XLA:CPU, registered through the XLA FFI (see fmatmul.py, which packs weights).
//
// Shapes: x [M, K] float32; the weight w [N, K] (row n = output channel n), stored packed (below) ->
// y [M, N] float32, y[m, n] = sum_k x[m, k] * w[n, k].
//
// Packed layout, made once at load time by fmatmul.pack: strips of kWidth = 64 output channels, N padded to a
// multiple of 64 with zero weights; strip s is [K, 64]: row k holds w[64 s .. 64 s + 63, k], contiguous. A
// decode step multiplies a few rows (1 to a few dozen) by every weight: XLA:CPU's dot reads the weights at ~0.8
// of the bandwidth a plain sum reaches at one row and runs its small-M kernels far below the FMA peak at 8-32.
// Here each output is a register accumulator: a tile of MR rows x 4 vectors of 16 outputs loads 4 weight
// vectors per k and broadcasts MR activations (outer products, no horizontal sums); each strip streams from
// memory in order. K is walked in blocks of kKBlock rows so a block of the strip (32 KB) stays in L1 for every
// row tile, and the first row tile prefetches the next block into L2.
//
// Every output is one accumulation in k order, one FMA (one rounding) per k, from zero; a block boundary only
// stores and reloads it. So whatever M is and whichever tile computes it, a row's result is the same bits: a
// sequence's logits do not depend on the rows beside it (decode buckets and prefill chunks stay consistent).
// Work is split over strips on XLA's intra-op thread pool (no threads of our own).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using internlm_native::Mask16;
using internlm_native::ParallelFor;

constexpr int64_t kKBlock = 128;
constexpr int64_t kManyTiles = 64;
constexpr int64_t kNV = 4;                 // vectors of 16 outputs per strip
constexpr int64_t kWidth = 16 * kNV;       // outputs per strip

// One tile: `rows` (<= MR) rows of x packed k-major (xt[k * MR + r]; rows past `rows` are zero padding) times
// one packed strip w [K, 16 NV] over k in [k0, k1), into y's columns [0, nvalid) (y already offset to the strip,
// row stride N; nvalid == 16 NV unless kMasked). Accumulators start at zero when k0 == 0, else from y; only real
// rows are stored. kPrefetch: also pull the next block (next_block, k1 - k0 rows) into L2.
template <int MR, int NV, bool kMasked, bool kPrefetch>
void Tile(const float* xt, const float* w, int64_t N, float* y, int64_t rows, int64_t nvalid, int64_t k0, int64_t k1,
          const float* next_block) {
  constexpr int64_t width = 16 * NV;
  __mmask16 mask[NV];
  for (int v = 0; v < NV; ++v) mask[v] = kMasked ? Mask16(nvalid - 16 * v) : static_cast<__mmask16>(0xFFFF);
  __m512 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v)
      acc[m][v] = (k0 == 0 || m >= rows) ? _mm512_setzero_ps()
                                         : kMasked ? _mm512_maskz_loadu_ps(mask[v], y + m * N + 16 * v)
                                                   : _mm512_loadu_ps(y + m * N + 16 * v);
  const float* wk = w + k0 * width;
  const float* xk = xt + k0 * MR;
  for (int64_t k = k0; k < k1; ++k, wk += width, xk += MR) {
    __m512 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(wk + 16 * v);  // padded strips: no mask
    if (kPrefetch) {
      const char* line = reinterpret_cast<const char*>(next_block + (k - k0) * width);
      for (int v = 0; v < NV; ++v) _mm_prefetch(line + 64 * v, _MM_HINT_T1);
    }
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_set1_ps(xk[m]);
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(xv, wv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    if (m >= rows) break;
    for (int v = 0; v < NV; ++v) {
      if (kMasked) {
        _mm512_mask_storeu_ps(y + m * N + 16 * v, mask[v], acc[m][v]);
      } else {
        _mm512_storeu_ps(y + m * N + 16 * v, acc[m][v]);
      }
    }
  }
}

// x [M, K] -> tiles of MR rows, each k-major [K, MR], the last one zero padded.
struct PackedRows {
  std::vector<float> data;
  int64_t tiles = 0;
};

template <int MR>
const float* Pack(const float* x, int64_t M, int64_t K, PackedRows& packed) {
  packed.tiles = (M + MR - 1) / MR;
  if (MR == 1) return x;  // one row is already k-major
  packed.data.assign(packed.tiles * K * MR, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    float* dst = packed.data.data() + (m / MR) * K * MR + m % MR;
    const float* src = x + m * K;
    for (int64_t k = 0; k < K; ++k) dst[k * MR] = src[k];
  }
  return packed.data.data();
}

// One strip (its packed [K, kWidth] weights at ws) for every row, block by block along K; the first tile of a
// block prefetches the next block.
template <int MR, bool kMasked>
void Strip(const float* xt, int64_t M, int64_t K, const float* ws, int64_t N, float* y, int64_t n0, int64_t nvalid) {
  const int64_t tiles = (M + MR - 1) / MR;
  // Many tiles (prefill): whole K per tile, the strip rereads from L2 and y is written once.
  const int64_t kblock = tiles > kManyTiles ? K : kKBlock;
  for (int64_t k0 = 0; k0 < K; k0 += kblock) {
    const int64_t k1 = std::min(K, k0 + kblock);
    const float* next_block = k1 + kblock <= K ? ws + k1 * kWidth : nullptr;  // a whole next block exists
    for (int64_t t = 0; t < tiles; ++t) {
      const float* xtile = xt + t * K * MR;
      float* ytile = y + t * MR * N + n0;
      const int64_t rows = std::min<int64_t>(MR, M - t * MR);
      if (t == 0 && next_block) {
        Tile<MR, kNV, kMasked, true>(xtile, ws, N, ytile, rows, nvalid, k0, k1, next_block);
      } else {
        Tile<MR, kNV, kMasked, false>(xtile, ws, N, ytile, rows, nvalid, k0, k1, nullptr);
      }
    }
  }
}

// One row (batch-1 decode, bandwidth bound): kStreams strips at once, each read front to back with its whole K in
// registers, so several memory streams are in flight per thread. Same accumulation as Tile.
constexpr int64_t kStreams = 4;
constexpr int64_t kAhead = 16;  // rows of a strip prefetched ahead (4 KB)

template <int S>
void RowStrips(const float* x, int64_t K, const float* ws, int64_t N, float* y, int64_t n0) {
  __m512 acc[S][kNV];
  for (int s = 0; s < S; ++s)
    for (int v = 0; v < kNV; ++v) acc[s][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 xv = _mm512_set1_ps(x[k]);
    for (int s = 0; s < S; ++s) {
      const float* row = ws + s * K * kWidth + k * kWidth;
      if (k + kAhead < K) {
        const char* ahead = reinterpret_cast<const char*>(row + kAhead * kWidth);
        for (int v = 0; v < kNV; ++v) _mm_prefetch(ahead + 64 * v, _MM_HINT_T0);
      }
      for (int v = 0; v < kNV; ++v) acc[s][v] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(row + 16 * v), acc[s][v]);
    }
  }
  for (int s = 0; s < S; ++s)
    for (int v = 0; v < kNV; ++v) {
      const int64_t n = n0 + s * kWidth + 16 * v;
      if (n < N) _mm512_mask_storeu_ps(y + n, Mask16(N - n), acc[s][v]);
    }
}

void RunOneRow(ffi::ThreadPool& pool, const float* x, int64_t K, const float* w, int64_t N, float* y) {
  const int64_t strips = (N + kWidth - 1) / kWidth;
  // Even ranges of strips, about two per thread (a decode step's weights have only 12-32 strips: balance
  // first), each read kStreams strips at a time.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t tasks = std::min<int64_t>(strips, 2 * threads);
  ParallelFor(pool, tasks, [&](int64_t t) {
    const int64_t end = strips * (t + 1) / tasks;
    for (int64_t s0 = strips * t / tasks; s0 < end; s0 += kStreams) {
      const int64_t n = std::min(kStreams, end - s0);
      const float* ws = w + s0 * K * kWidth;
      switch (n) {
        case 4: RowStrips<4>(x, K, ws, N, y, s0 * kWidth); break;
        case 3: RowStrips<3>(x, K, ws, N, y, s0 * kWidth); break;
        case 2: RowStrips<2>(x, K, ws, N, y, s0 * kWidth); break;
        default: RowStrips<1>(x, K, ws, N, y, s0 * kWidth); break;
      }
    }
  });
}

template <int MR>
void Run(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y) {
  PackedRows packed;
  const float* xt = Pack<MR>(x, M, K, packed);
  const int64_t strips = (N + kWidth - 1) / kWidth;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per_task = std::max<int64_t>(1, strips / (4 * threads));  // about four tasks per thread
  const int64_t tasks = (strips + per_task - 1) / per_task;
  ParallelFor(pool, tasks, [&](int64_t t) {
    for (int64_t s = t * per_task; s < std::min(strips, (t + 1) * per_task); ++s) {
      const int64_t n0 = s * kWidth, nvalid = std::min(kWidth, N - n0);
      const float* ws = w + s * K * kWidth;
      if (nvalid == kWidth) {
        Strip<MR, false>(xt, M, K, ws, N, y, n0, nvalid);
      } else {
        Strip<MR, true>(xt, M, K, ws, N, y, n0, nvalid);
      }
    }
  });
}

ffi::Error FMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, int64_t n_out,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[1] != xd[1] || wd[2] != kWidth || wd[0] != (n_out + kWidth - 1) / kWidth)
    return ffi::Error::InvalidArgument("fmatmul: want x [M, K] and a packed weight [ceil(n_out / 64), K, 64]");
  const int64_t M = xd[0], K = xd[1], N = n_out;
  float* yp = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(yp, yp + M * N, 0.f);
    return ffi::Error::Success();
  }
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  // Row tiles: 6 x 4 vectors (24 accumulators) from 3 rows; one or two rows stream the weights once.
  if (M == 1) {
    RunOneRow(pool, xp, K, wp, N, yp);
  } else if (M == 2) {
    Run<2>(pool, xp, M, K, wp, N, yp);
  } else {
    Run<6>(pool, xp, M, K, wp, N, yp);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(InternlmFMatmul, FMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("n_out")
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" int internlm_native_supported() { return internlm_native::Supported(); }
