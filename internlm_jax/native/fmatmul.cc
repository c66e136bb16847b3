// float32 matmul for few rows (decode steps) on XLA:CPU, registered through the XLA FFI (see fmatmul.py).
//
// Shapes: x [M, K] float32, w [N, K] float32 (row n = output channel n, contraction last: the serving layout)
// -> y [M, N] float32, y[m, n] = sum_k x[m, k] * w[n, k].
//
// Why: a decode step multiplies a few rows by every weight. At one row XLA:CPU's dot reads the weights at ~0.8
// of the bandwidth a plain sum reaches; at 8-32 rows its small-M dot kernels run far below the FMA peak. Here
// a tile of up to 4 rows x 4 output channels keeps 16 accumulators in registers (4 weight and 4 activation
// loads per 16 FMAs), each weight row is streamed once per tile of rows, and work is split over output rows on
// XLA's intra-op pool. Each output is one accumulation in k order and one horizontal sum, whatever M is, so a
// row's result does not depend on the rows beside it (decode buckets stay bitwise consistent).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using internlm_native::Mask16;
using internlm_native::ParallelFor;

template <int MR, int NR>
void Tile(const float* x, int64_t K, const float* w, float* y, int64_t N) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  auto step = [&](int64_t k, __mmask16 mask) __attribute__((always_inline)) {
    __m512 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = _mm512_maskz_loadu_ps(mask, w + r * K + k);
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  };
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) step(k, 0xFFFF);  // a constant mask: plain loads
  if (k < K) step(k, Mask16(K - k));
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) y[m * N + r] = _mm512_reduce_add_ps(acc[m][r]);
}

template <int NR>
void Columns(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) Tile<4, NR>(x + m * K, K, w, y + m * N, N);
  switch (M - m) {
    case 3: Tile<3, NR>(x + m * K, K, w, y + m * N, N); break;
    case 2: Tile<2, NR>(x + m * K, K, w, y + m * N, N); break;
    case 1: Tile<1, NR>(x + m * K, K, w, y + m * N, N); break;
    default: break;
  }
}

void Rows(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) Columns<4>(x, M, K, w + n * K, y + n, N);
  for (; n < n1; ++n) Columns<1>(x, M, K, w + n * K, y + n, N);
}

// Output rows per chunk: a multiple of 4 (the tile), about four chunks per thread for balance, and at least
// ~64 KB of weights so scheduling stays small next to the work.
int64_t RowsPerChunk(int64_t N, int64_t K, int64_t threads) {
  int64_t rows = (N + 4 * threads - 1) / (4 * threads);
  rows = std::max<int64_t>(rows, (16 * 1024 + K - 1) / K);
  return (rows + 3) / 4 * 4;
}

ffi::Error FMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("fmatmul: want x [M, K] and w [N, K]");
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  float* yp = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(yp, yp + M * N, 0.f);
    return ffi::Error::Success();
  }
  const int64_t rows = RowsPerChunk(N, K, std::max<int64_t>(1, pool.num_threads()));
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  ParallelFor(pool, (N + rows - 1) / rows,
              [&](int64_t c) { Rows(xp, M, K, wp, yp, N, c * rows, std::min(N, (c + 1) * rows)); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(InternlmFMatmul, FMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" int internlm_native_supported() { return internlm_native::Supported(); }
