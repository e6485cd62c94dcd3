// bf16 y = x @ W^T (+ bias) for a few rows of x (decode: one row per running sequence), reading a
// plain row-major weight at DRAM speed with AMX tiles.
//
// Decoding is memory-bound: all that matters is how fast W streams in. One core alone cannot keep
// enough cache misses in flight from the hardware prefetchers (they stop at 4 KB pages), so the
// kernel prefetches every weight row a fixed distance ahead in software. Measured on this Xeon
// (2 cores, 2 MiB pages): a plain 2-thread read streams ~27-30 GB/s, the same read prefetched
// ~35-40 GB/s; this kernel reads 28-31 GB/s per TinyLlama matrix where oneDNN's bf16 GEMM reads
// 21-26 (benchmarks/dense_kernels.py).
//
// W is the A operand: a tile is 16 output rows x 32 input columns, loaded straight from the
// row-major weight (row stride = in_features). x is the B operand: per 32 columns, a 1 KB tile
// of 16 rows of x in AMX's VNNI pair order, built once per call. The product tile is 16 outputs x
// 16 rows of x, transposed into y on the way out. Up to 64 rows of x (four B tiles) share each
// weight tile; weight rows past the last whole block of 16 use AVX512-BF16 dot products.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "amx.h"

namespace {

constexpr int64_t kRows = 16;     // weight rows per tile (outputs per block)
constexpr int64_t kCols = 32;     // input columns per tile (one AMX K-step of bf16)
constexpr int64_t kMaxX = 64;     // rows of x per call (four groups of 16)
constexpr int64_t kPrefetchBytes = 256;  // software prefetch distance along each weight row (measured best)

// x [M, K] bf16 -> per 16-row group g and 32-column chunk c a 1 KB tile at ((g * chunks + c) * 16
// + p) * 32 + 2 * m + j holding x[16 g + m, 32 c + 2 p + j] (zero past the last row). One gather
// of 16 column pairs, one from each row, per 64-byte tile row.
void pack_x(const uint16_t* x, int64_t M, int64_t K, uint16_t* out) {
  const int64_t chunks = K / kCols, groups = (M + 15) / 16;
  const int* pairs = (const int*)x;
  auto* dst = (__m512i*)out;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t rows = std::min<int64_t>(16, M - g * 16);
    const __mmask16 valid = (__mmask16)((1u << rows) - 1);
    const __m512i row_start = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                 _mm512_set1_epi32((int)(K / 2)));
    const int* base = pairs + g * 16 * (K / 2);
    for (int64_t q = 0; q < chunks * 16; ++q)  // q = 16 c + p: the column pair
      _mm512_storeu_si512(dst + g * chunks * 16 + q,
                          _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, row_start, base + q, 4));
  }
}

// Products of one block of 16 weight rows with every row of x (G groups of 16 rows, G <= 4).
// Tile 0 holds the weights, tile 1 each group's x in turn, tiles 2-5 the groups' products.
template <int G>
void block(const uint16_t* w, int64_t K, const uint16_t* xtiles, int64_t n0, int64_t M, const float* bias,
           uint16_t* y, int64_t N) {
  const int64_t chunks = K / kCols;
  const char* rows = (const char*)(w + n0 * K);
  const int64_t stride = K * 2;
  _tile_zero(2);
  if constexpr (G > 1) _tile_zero(3);
  if constexpr (G > 2) _tile_zero(4);
  if constexpr (G > 3) _tile_zero(5);
  for (int64_t c = 0; c < chunks; ++c) {
    // Near the end of the rows, fetch the start of the next block's rows instead (the block this
    // thread most likely does next; a prefetch past the weight's end is harmless).
    const int64_t ahead = c * 64 + kPrefetchBytes;
    const char* target = ahead < stride ? rows + ahead : rows + kRows * stride + (ahead - stride);
    for (int64_t r = 0; r < kRows; ++r) _mm_prefetch(target + r * stride, _MM_HINT_T0);
    _tile_loadd(0, rows + c * 64, stride);
    _tile_loadd(1, xtiles + c * 512, 64);
    _tile_dpbf16ps(2, 0, 1);
    if constexpr (G > 1) {
      _tile_loadd(1, xtiles + (chunks + c) * 512, 64);
      _tile_dpbf16ps(3, 0, 1);
    }
    if constexpr (G > 2) {
      _tile_loadd(1, xtiles + (2 * chunks + c) * 512, 64);
      _tile_dpbf16ps(4, 0, 1);
    }
    if constexpr (G > 3) {
      _tile_loadd(1, xtiles + (3 * chunks + c) * 512, 64);
      _tile_dpbf16ps(5, 0, 1);
    }
  }
  alignas(64) float acc[G][16][16];  // [group][output row][row of x]
  _tile_stored(2, acc[0], 64);
  if constexpr (G > 1) _tile_stored(3, acc[1], 64);
  if constexpr (G > 2) _tile_stored(4, acc[2], 64);
  if constexpr (G > 3) _tile_stored(5, acc[3], 64);
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(16));
  const __m512 b = bias ? _mm512_loadu_ps(bias + n0) : _mm512_setzero_ps();
  for (int64_t m = 0; m < M; ++m) {  // column m of the product tile is row m of y
    const __m512 v = _mm512_add_ps(_mm512_i32gather_ps(column, &acc[m / 16][0][m % 16], 4), b);
    _mm256_storeu_si256((__m256i*)(y + m * N + n0), (__m256i)_mm512_cvtneps_pbh(v));
  }
}

// Weight rows [n0, N) that do not fill a block: plain dot products.
void tail_rows(const uint16_t* w, int64_t K, const uint16_t* x, int64_t M, int64_t n0, int64_t N, const float* bias,
               uint16_t* y) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < N; ++n) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x + m * K + k),
                               (__m512bh)_mm512_loadu_si512(w + n * K + k));
      y[m * N + n] = c10::BFloat16(_mm512_reduce_add_ps(acc) + (bias ? bias[n] : 0.0f)).x;
    }
}

}  // namespace

bool amx_ready() { return amx::ready(); }

// x: bf16 [M, K] (M <= 64, K a multiple of 32); weight: bf16 [N, K] row-major; bias: fp32 [N] or none.
torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.scalar_type() == torch::kBFloat16 &&
                  weight.scalar_type() == torch::kBFloat16 && x.device().is_cpu() && weight.device().is_cpu(),
              "skinny_linear takes bf16 CPU tensors x [M, K] and weight [N, K]");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K && K % kCols == 0 && M >= 1 && M <= kMaxX && weight.is_contiguous(),
              "skinny_linear needs 1-64 rows, in_features a multiple of 32 and a contiguous weight");
  TORCH_CHECK(!bias || (bias->scalar_type() == torch::kFloat && bias->numel() == N && bias->is_contiguous() &&
                        bias->device().is_cpu()),
              "bias must be a float32 CPU tensor [out_features]");
  TORCH_CHECK(amx_ready(), "AMX tile state was refused");
  x = x.contiguous();
  const auto* xp = (const uint16_t*)x.data_ptr();
  const auto* wp = (const uint16_t*)weight.data_ptr();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const int64_t groups = (M + 15) / 16;
  auto xtiles = torch::empty({groups * (K / kCols) * 512}, x.options());
  pack_x(xp, M, K, (uint16_t*)xtiles.data_ptr());
  auto y = torch::empty({M, N}, x.options());
  auto* yp = (uint16_t*)y.data_ptr();
  const auto* xt = (const uint16_t*)xtiles.data_ptr();
  const int64_t blocks = N / kRows;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    amx::configure_tiles();
    for (int64_t nb = begin; nb < end; ++nb) {
      switch (groups) {
        case 1: block<1>(wp, K, xt, nb * kRows, M, bp, yp, N); break;
        case 2: block<2>(wp, K, xt, nb * kRows, M, bp, yp, N); break;
        case 3: block<3>(wp, K, xt, nb * kRows, M, bp, yp, N); break;
        default: block<4>(wp, K, xt, nb * kRows, M, bp, yp, N); break;
      }
    }
    _tile_release();
  });
  if (blocks * kRows < N) tail_rows(wp, K, xp, M, blocks * kRows, N, bp, yp);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_linear", &skinny_linear, "bf16 x @ W^T for 1-64 rows of x (see skinny_gemm.cpp)");
  m.def("amx_ready", &amx_ready, "request AMX tile state from the kernel; true when granted");
}
