// Weight-only int8 / int4 / 4-bit-codebook GEMM for x86 CPUs with AVX512-BF16 and AMX-BF16.
//
// y[m, n] = sum_g scale[n, g] * sum_{k in g} (q[n, k] - zero[n, g]) * x[m, k]    (+ bias[n])
// or, for NF4 / FP4 codes (QLoRA), the same with level[q[n, k]] in place of q - zero:
// y[m, n] = sum_g absmax[n, g] * sum_{k in g} level[q[n, k]] * x[m, k]
//
// Decoding is memory-bound: the win comes from streaming 1 (int8) or 0.5 (int4) bytes per weight
// instead of bf16's 2, with arithmetic cheap enough to keep up with the memory:
//  * Decode (a few rows of x, integer codes): x is quantized to int8 per 32 columns (one float
//    step each, as llama.cpp's Q8_0 activations) and the raw codes are multiplied by ``vpdpbusd``
//    (64 unsigned-code x int8 products per instruction, twice vdpbf16ps's 32). The layout below
//    is vpdpbusd's own order, so a 64-byte load of 4-bit codes is two operands after one AND and
//    one shift, int8 codes need nothing, the 5th and 6th bits one masked add each. Per 32
//    columns the int32 sums are scaled by x's step in fp32; per group, by the weight's scale, and
//    the zero point comes off as zero * scale * sum(x).
//  * Batches (and float32 activations, and NF4 / FP4 tables): the codes are converted to bf16
//    *exactly* (integers up to 256 fit bf16's 8-bit significand) and dotted with bf16 x; scale and
//    zero point again once per group, on fp32 partial sums. 4- to 6-bit codes become bf16 with one
//    OR (0x4300 | q is the bf16 number 128 + q), int8 codes go through fp16 as q + 1 (see
//    bf16_pairs); both offsets are folded into the zero point at pack time. NF4 / FP4 codes are
//    looked up in a 16-entry table of bf16 levels held in one zmm (one vpermw per 32 codes), each
//    level rounded to bf16 once (up to 2**-8 relative); for float32 activations woq.py adds a
//    second pass with a table of the rounding remainders.
//
// Packed layout (built by woq.py): output rows in blocks of 16 ("nb"), input columns in
// "octets" of 8. One (nb, octet) holds 128 codes in two halves, columns 0-3 and 4-7, each half
// in vpdpbusd's order: byte 4n + i = the code of row n, column i of the half.
//   int8: 128 bytes, half 0 then half 1;
//   int4 and table codes: 64 bytes, byte j = half0[j] | half1[j] << 4;
//   5- and 6-bit codes (GGUF Q5_x, Q6_K): those 64 bytes of low nibbles, then per higher bit (4,
//   then 5) two 64-bit masks, half 0's and half 1's (bit j: that bit of code j): 80 / 96 bytes.
// The bf16 paths regroup a half into AMX's VNNI pair order with one byte permute (bf16_pairs).
// Scales are float32 per (16 rows, group), or for GGUF blocks two-level as the file has them
// (fp16 super-block scale and min, int8 / uint8 group scale and min, see TwoLevelScales), so
// a Q4_K weight streams 4.6 bits and a Q6_K one 6.6, as in the file.
// Groups are padded to multiples of 32 columns (zero codes, zero x), so a group is a whole
// number of AMX K-steps; ``chunks[g]`` is the first 32-column chunk of group g.
// Groups of 16 (GGUF's Q6_K / Q3_K / Q2_K sub-blocks) count ``chunks`` in 16-column units
// instead; on AMX (an AMX K-step spans two such groups) their weights are converted with the scale
// applied, to bf16, like a dequantized weight (amx_block_scaled).
//
// Four paths over the same layout (woq.py picks one per call by the rows of x):
//  * VNNI: integer codes, up to woq.VNNI_MAX_ROWS rows of x, bf16 output (see above);
//  * AVX512-BF16: per 16 output rows, dot products (vdpbf16ps) with the converted codes held
//    in registers, 4 rows of x at a time;
//  * AMX: per 16 output rows, codes are converted chunk by chunk into a 8 KB L1 ring, a few
//    chunks ahead of the tile products that consume them, each chunk reused by up to 4 row
//    tiles (64 rows) of x; more rows take several 64-row passes;
//  * panel GEMM (integer codes, from woq.PANEL_MIN_ROWS bf16 rows, e.g. prefill): panels of
//    codes dequantized once into an L2 buffer, then a blocked AMX GEMM over all rows of x.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "amx.h"

namespace {

constexpr int kBlockN = 16;       // output rows per block (one zmm of fp32 results)
constexpr int kChunk = 32;        // input columns per AMX K-step and per padded-group unit
constexpr int kOctetsPerChunk = 4; // 32 columns = 4 octets of 8
constexpr int64_t kStage = 8;     // ring of dequantized chunks feeding the AMX tiles
constexpr int64_t kLag = 4;       // chunks converted ahead of the one being multiplied
// Software prefetch distance (bytes of codes ahead). One core alone cannot keep enough misses in
// flight from the hardware prefetchers, which stop at 4 KB pages; measured on Sapphire Rapids.
constexpr int64_t kPrefetchSmallM = 4096;
constexpr int64_t kPrefetchAmx = 2048;

// What the codes stand for (the kernels' template argument).
enum CodeKind : int {
  kInt8 = 8,     // uint8 integer codes
  kInt4 = 4,     // 4-bit integer codes
  kInt5 = 5,     // 5-bit integer codes: the int4 nibbles plus one bit plane (GGUF Q5_x)
  kInt6 = 6,     // 6-bit integer codes: the int4 nibbles plus two bit planes (GGUF Q6_K)
  kTable4 = 16,  // 4-bit indices into a table of 16 levels (NF4, FP4)
};

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// One octet: the 128 codes of 16 output rows x 8 columns, as two zmm of unsigned bytes in
// vpdpbusd's order: ``lo`` byte 4n + i = code (row n, column i), ``hi`` the same for column 4 + i.
// 4-bit codes are the two nibbles of one 64-byte load; 5- and 6-bit codes add their higher bits
// under the bit-plane masks (the bit is clear, so the add is an OR).
template <int Kind>
inline void octet_codes(const uint8_t* p, __m512i& lo, __m512i& hi) {
  if constexpr (Kind == kInt8) {
    lo = _mm512_loadu_si512((const void*)p);
    hi = _mm512_loadu_si512((const void*)(p + 64));
  } else {
    const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
    const __m512i v = _mm512_loadu_si512((const void*)p);
    lo = _mm512_and_si512(v, low_nibbles);
    hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low_nibbles);
    if constexpr (Kind == kInt5 || Kind == kInt6) {
      const uint64_t* planes = (const uint64_t*)(p + 64);
      const __m512i b4 = _mm512_set1_epi8(0x10);
      lo = _mm512_mask_add_epi8(lo, _cvtu64_mask64(planes[0]), lo, b4);
      hi = _mm512_mask_add_epi8(hi, _cvtu64_mask64(planes[1]), hi, b4);
      if constexpr (Kind == kInt6) {
        const __m512i b5 = _mm512_set1_epi8(0x20);
        lo = _mm512_mask_add_epi8(lo, _cvtu64_mask64(planes[2]), lo, b5);
        hi = _mm512_mask_add_epi8(hi, _cvtu64_mask64(planes[3]), hi, b5);
      }
    }
  }
}

template <int Kind>
constexpr int octet_bytes() { return Kind == kInt8 ? 128 : Kind == kInt5 ? 80 : Kind == kInt6 ? 96 : 64; }

// Four columns of codes (one ``octet_codes`` half) as two zmm of 32 bf16 in AMX's VNNI pair order:
// w0 = (n, k0), (n, k1) for n = 0..15, w1 = the same for k2, k3. Integers are exact in bf16: 4- to
// 6-bit codes become 128 + q with one OR (the bits of bf16 0x4300 | q); int8 codes go through
// fp16 as q + 1 (see below); table codes (NF4 / FP4) index 16 bf16 levels with one vpermw.
// Both offsets are folded into the zero point at pack time.
template <int Kind>
inline void bf16_pairs(__m512i codes, __m512bh& w0, __m512bh& w1, __m512i table) {
  // Bytes 4n, 4n + 1 (columns k0, k1 of row n) to the low half, 4n + 2, 4n + 3 to the high half.
  static const __m512i by_pairs = [] {
    alignas(64) int8_t idx[64];
    for (int n = 0; n < 16; ++n)
      for (int i = 0; i < 2; ++i) idx[2 * n + i] = (int8_t)(4 * n + i), idx[32 + 2 * n + i] = (int8_t)(4 * n + 2 + i);
    return _mm512_load_si512(idx);
  }();
  const __m512i v = _mm512_permutexvar_epi8(by_pairs, codes);
  __m512i h[2] = {_mm512_cvtepu8_epi16(_mm512_castsi512_si256(v)), _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(v, 1))};
  for (int j = 0; j < 2; ++j) {
    if constexpr (Kind == kTable4) {
      h[j] = _mm512_permutexvar_epi16(h[j], table);
    } else if constexpr (Kind == kInt8) {
      // uint8 -> bf16 in 4 ops: c = q + 1 is in [1, 256], so its fp16 (AVX512-FP16 converts 32
      // words at once) has at most 8 significant bits; dropping fp16's 3 spare mantissa bits and
      // rebiasing the exponent (127 - 15) gives bf16 exactly.
      __m512i c = _mm512_castph_si512(_mm512_cvtepu16_ph(_mm512_add_epi16(h[j], _mm512_set1_epi16(1))));
      h[j] = _mm512_add_epi16(_mm512_srli_epi16(c, 3), _mm512_set1_epi16(0x3800));
    } else {
      h[j] = _mm512_or_si512(h[j], _mm512_set1_epi16(0x4300));  // bf16 128.0 | q = 128 + q
    }
  }
  w0 = as_bh(h[0]);
  w1 = as_bh(h[1]);
}

// An octet as four bf16 pair vectors (columns k0 k1, k2 k3, k4 k5, k6 k7).
template <int Kind>
inline void dequant_octet(const uint8_t* p, __m512bh w[4], __m512i table) {
  __m512i lo, hi;
  octet_codes<Kind == kTable4 ? kInt4 : Kind>(p, lo, hi);
  bf16_pairs<Kind>(lo, w[0], w[1], table);
  bf16_pairs<Kind>(hi, w[2], w[3], table);
}

// Two-level group scales (GGUF blocks; ``scales`` is then nullptr), per 16-row block nb:
//   scale[g] = d[s] * sc[g],  zscale[g] = scale[g] * zc + dmin[s] * mn[g],
// with s = g / groups_per_super, d / dmin fp16 [NB, S, 16], sc int8 / mn uint8 [NB, G, 16]
// (nullptr: all 1), dmin nullptr: no float min, zc float [NB, 16] (the row's code offset + zero).
struct TwoLevelScales {
  const uint16_t* d = nullptr;
  const int8_t* sc = nullptr;
  const uint16_t* dmin = nullptr;
  const uint8_t* mn = nullptr;
  const float* zc = nullptr;
  int64_t groups_per_super = 1;
};

struct Problem {
  const uint16_t* x;       // bf16 [M, Kp]
  int64_t M, Kp, N, G;
  const uint8_t* codes;    // packed, see above
  const float* scales;     // [NB, G, 16], or nullptr: ``two_level`` holds them
  const float* zscales;    // [NB, G, 16]: (zero + offset) * scale; nullptr with a table
  TwoLevelScales two_level;
  const int32_t* chunks;   // [G + 1], in units of ``unit_cols`` columns
  int64_t unit_cols;       // 32, or 16 for groups of 16 (GGUF sub-blocks)
  const float* bias;       // [NB * 16] or nullptr
  const uint16_t* table;   // [32] bf16 levels (16 used), kTable4 only
  const float* xsum;       // [M, G]: sum of x over each group (not computed with a table)
  void* out;               // [M, N], bf16 or fp32
  bool out_fp32;

  __m512i table_register() const {
    return table ? _mm512_loadu_si512((const void*)table) : _mm512_setzero_si512();
  }

  // Group g's scale and zero-point scale for the 16 rows of block nb.
  inline void group_scales(int64_t nb, int64_t g, __m512& s, __m512& z) const {
    const int64_t at = (nb * G + g) * kBlockN;
    if (scales) {
      s = _mm512_loadu_ps(scales + at);
      if (zscales) z = _mm512_loadu_ps(zscales + at);
      return;
    }
    const TwoLevelScales& t = two_level;
    const int64_t super_at = (nb * (G / t.groups_per_super) + g / t.groups_per_super) * kBlockN;
    s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(t.d + super_at)));
    if (t.sc)
      s = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(t.sc + at)))));
    z = _mm512_mul_ps(s, _mm512_loadu_ps(t.zc + nb * kBlockN));
    if (t.dmin) {
      __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(t.dmin + super_at)));
      if (t.mn)
        m = _mm512_mul_ps(m, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(t.mn + at)))));
      z = _mm512_add_ps(z, m);
    }
  }
};

// One block of 16 results for row m: add bias, convert, store the valid columns.
inline void store_block(const Problem& P, int64_t m, int64_t nb, __m512 y) {
  const int64_t n0 = nb * kBlockN;
  const int64_t valid = std::min<int64_t>(kBlockN, P.N - n0);
  const __mmask16 mask = (__mmask16)((1u << valid) - 1);
  if (P.bias) y = _mm512_add_ps(y, _mm512_loadu_ps(P.bias + n0));
  if (P.out_fp32) {
    _mm512_mask_storeu_ps((float*)P.out + m * P.N + n0, mask, y);
  } else {
    __m256i h = (__m256i)_mm512_cvtneps_pbh(y);
    _mm256_mask_storeu_epi16((uint16_t*)P.out + m * P.N + n0, mask, h);
  }
}

// ---------------------------------------------------------------------------------------------
// Small M: register-blocked AVX512-BF16. MB rows of x at a time; every dequantized code vector
// is used MB times. With few rows the dot products form short dependency chains, so each row
// gets several accumulators (NC) to keep the FMA pipes busy while the codes stream in.
template <int Kind, int MB>
void small_m_block(const Problem& P, int64_t m0, int64_t nb) {
  constexpr int NC = MB == 1 ? 4 : (MB <= 3 ? 2 : 1);
  constexpr int OB = octet_bytes<Kind == kTable4 ? kInt4 : Kind>();
  const uint8_t* w = P.codes + nb * (P.Kp / 8) * OB;
  const int32_t* xrow[MB];
  for (int m = 0; m < MB; ++m) xrow[m] = (const int32_t*)(P.x + (m0 + m) * P.Kp);  // bf16 pairs
  const __m512i table = P.table_register();

  __m512 total[MB];
  for (int m = 0; m < MB; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < P.G; ++g) {
    __m512 acc[MB][NC];
    for (int m = 0; m < MB; ++m)
      for (int c = 0; c < NC; ++c) acc[m][c] = _mm512_setzero_ps();
    const int64_t unit_octets = P.unit_cols / 8;
    const int64_t o_end = (int64_t)P.chunks[g + 1] * unit_octets;
    for (int64_t o = (int64_t)P.chunks[g] * unit_octets; o < o_end; ++o) {  // 8 columns
      _mm_prefetch((const char*)(w + o * OB + kPrefetchSmallM), _MM_HINT_T0);
      __m512bh wv[4];
      dequant_octet<Kind>(w + o * OB, wv, table);
      for (int m = 0; m < MB; ++m) {
        for (int i = 0; i < 4; ++i) {
          // Column pair 4o + i of row m, broadcast: lane j gets x[k]*w[j,k] + x[k+1]*w[j,k+1].
          __m512bh xv = as_bh(_mm512_set1_epi32(xrow[m][4 * o + i]));
          acc[m][i % NC] = _mm512_dpbf16_ps(acc[m][i % NC], xv, wv[i]);
        }
      }
    }
    __m512 s, z;
    P.group_scales(nb, g, s, z);
    for (int m = 0; m < MB; ++m) {
      __m512 a = acc[m][0];
      for (int c = 1; c < NC; ++c) a = _mm512_add_ps(a, acc[m][c]);
      total[m] = _mm512_fmadd_ps(a, s, total[m]);
      if constexpr (Kind != kTable4)  // table codes have no zero point
        total[m] = _mm512_fnmadd_ps(z, _mm512_set1_ps(P.xsum[(m0 + m) * P.G + g]), total[m]);
    }
  }
  for (int m = 0; m < MB; ++m) store_block(P, m0 + m, nb, total[m]);
}

template <int Kind>
void small_m(const Problem& P) {
  const int64_t NB = (P.N + kBlockN - 1) / kBlockN;
  at::parallel_for(0, NB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      int64_t m = 0;
      for (; m + 4 <= P.M; m += 4) small_m_block<Kind, 4>(P, m, nb);
      switch (P.M - m) {
        case 3: small_m_block<Kind, 3>(P, m, nb); break;
        case 2: small_m_block<Kind, 2>(P, m, nb); break;
        case 1: small_m_block<Kind, 1>(P, m, nb); break;
        default: break;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Decode with int8 activations: VNNI integer dot products (see the header). x is quantized per
// 32 columns: xq = round(x / dx), dx = max|x| / 127; ``xsum`` holds each group's sum of the
// quantized x (the zero-point term).
struct QuantizedRows {
  const int8_t* q;      // [M, Kp]
  const float* dx;      // [M, Kp / 32]
  const float* xsum;    // [M, G]: sum of the quantized x over each group, dx * sum(xq) per 32 columns
};

void quantize_rows(const Problem& P, int8_t* q, float* dx, float* xsum) {
  std::vector<int32_t> qsum(P.Kp / 16);  // sum(xq) per 16 columns (a group has whole ones)
  const int64_t chunks = P.Kp / kChunk;
  for (int64_t m = 0; m < P.M; ++m) {
    const uint16_t* row = P.x + m * P.Kp;
    for (int64_t c = 0; c < chunks; ++c) {
      const uint16_t* src = row + c * kChunk;
      __m512 v[2];
      for (int h = 0; h < 2; ++h)  // bf16 -> fp32: the bits moved up a half word
        v[h] = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(src + 16 * h))), 16));
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
      const float step = amax / 127.0f;
      const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      for (int h = 0; h < 2; ++h) {
        __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(v[h], inv));  // round to nearest even
        _mm_storeu_si128((__m128i*)(q + m * P.Kp + c * kChunk + 16 * h), _mm512_cvtsepi32_epi8(r));
        qsum[2 * c + h] = _mm512_reduce_add_epi32(r);
      }
      dx[m * chunks + c] = step;
    }
    for (int64_t g = 0; g < P.G; ++g) {
      float total = 0.0f;
      for (int64_t u = P.chunks[g] * P.unit_cols / 16; u < P.chunks[g + 1] * P.unit_cols / 16; ++u)
        total += dx[m * chunks + u / 2] * (float)qsum[u];
      xsum[m * P.G + g] = total;
    }
  }
}

template <int Kind>
constexpr int code_offset() { return Kind == kInt8 ? 1 : 128; }  // what zc includes for the bf16 paths

template <int Kind, int MB>
void vnni_block(const Problem& P, const QuantizedRows& X, int64_t m0, int64_t nb) {
  constexpr int NC = MB == 1 ? 2 : 1;
  constexpr int OB = octet_bytes<Kind>();
  const uint8_t* w = P.codes + nb * (P.Kp / 8) * OB;
  const int32_t* xrow[MB];  // 4 int8 of x per int32
  for (int m = 0; m < MB; ++m) xrow[m] = (const int32_t*)(X.q + (m0 + m) * P.Kp);
  const int64_t chunks = P.Kp / kChunk;
  const int64_t unit_octets = P.unit_cols / 8;

  __m512 total[MB];
  for (int m = 0; m < MB; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < P.G; ++g) {
    __m512 fsum[MB];
    for (int m = 0; m < MB; ++m) fsum[m] = _mm512_setzero_ps();
    const int64_t o_end = (int64_t)P.chunks[g + 1] * unit_octets;
    for (int64_t o = (int64_t)P.chunks[g] * unit_octets; o < o_end;) {
      const int64_t c = o / 4;  // the 32 columns x's step covers
      const int64_t stop = std::min<int64_t>(o_end, (c + 1) * 4);
      __m512i acc[MB][2 * NC];
      for (int m = 0; m < MB; ++m)
        for (int i = 0; i < 2 * NC; ++i) acc[m][i] = _mm512_setzero_si512();
      for (int j = 0; o < stop; ++o, ++j) {
        _mm_prefetch((const char*)(w + o * OB + kPrefetchSmallM), _MM_HINT_T0);
        __m512i lo, hi;
        octet_codes<Kind>(w + o * OB, lo, hi);
        const int a = NC == 1 ? 0 : 2 * (j & 1);
        for (int m = 0; m < MB; ++m) {
          acc[m][a] = _mm512_dpbusd_epi32(acc[m][a], lo, _mm512_set1_epi32(xrow[m][2 * o]));
          acc[m][a + 1] = _mm512_dpbusd_epi32(acc[m][a + 1], hi, _mm512_set1_epi32(xrow[m][2 * o + 1]));
        }
      }
      for (int m = 0; m < MB; ++m) {
        __m512i a = acc[m][0];
        for (int i = 1; i < 2 * NC; ++i) a = _mm512_add_epi32(a, acc[m][i]);
        const float d = X.dx[(m0 + m) * chunks + c];
        fsum[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(d), fsum[m]);
      }
    }
    __m512 s, z;
    P.group_scales(nb, g, s, z);
    z = _mm512_fnmadd_ps(s, _mm512_set1_ps((float)code_offset<Kind>()), z);  // raw codes here
    for (int m = 0; m < MB; ++m) {
      total[m] = _mm512_fmadd_ps(fsum[m], s, total[m]);
      total[m] = _mm512_fnmadd_ps(z, _mm512_set1_ps(X.xsum[(m0 + m) * P.G + g]), total[m]);
    }
  }
  for (int m = 0; m < MB; ++m) store_block(P, m0 + m, nb, total[m]);
}

template <int Kind>
void vnni_m(const Problem& P, const QuantizedRows& X) {
  const int64_t NB = (P.N + kBlockN - 1) / kBlockN;
  at::parallel_for(0, NB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      int64_t m = 0;
      for (; m + 4 <= P.M; m += 4) vnni_block<Kind, 4>(P, X, m, nb);
      switch (P.M - m) {
        case 3: vnni_block<Kind, 3>(P, X, m, nb); break;
        case 2: vnni_block<Kind, 2>(P, X, m, nb); break;
        case 1: vnni_block<Kind, 1>(P, X, m, nb); break;
        default: break;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Large M: AMX. Tiles 0-3 accumulate 16x16 fp32 blocks, tiles 4-5 hold 16x32 bf16 blocks of x,
// tiles 6-7 32x16 blocks of codes in VNNI order. Tile registers are not renamed, so
// consecutive chunks alternate between the two A and the two B tiles (the next load need not
// wait for the previous product to finish reading), and with at most two row tiles, odd
// chunks also accumulate into their own C tiles (2, 3) to shorten the dependency chain.
constexpr int64_t kTile = 16 * kChunk;  // bf16 elements in one A or B tile (1 KB)

// Products of one chunk of codes (already bf16, at ``b``) with NT row tiles of x at ``xc``: tile
// TB gets the codes, TA0/TA1 alternate for x, row tile i accumulates into TC0, TC1, 2, 3.
// GCC's AMX intrinsics need tile numbers as literal tokens, hence a macro, not a template.
#define WOQ_CHUNK_PRODUCTS(NT, TB, TC0, TC1, TA0, TA1, b, xc, xstep) \
  do {                                                               \
    _tile_loadd(TB, b, 64);                                          \
    _tile_loadd(TA0, xc, 64);                                        \
    _tile_dpbf16ps(TC0, TA0, TB);                                    \
    if constexpr (NT > 1) {                                          \
      _tile_loadd(TA1, (xc) + (xstep), 64);                          \
      _tile_dpbf16ps(TC1, TA1, TB);                                  \
    }                                                                \
    if constexpr (NT > 2) {                                          \
      _tile_loadd(TA0, (xc) + 2 * (xstep), 64);                      \
      _tile_dpbf16ps(2, TA0, TB);                                    \
    }                                                                \
    if constexpr (NT > 3) {                                          \
      _tile_loadd(TA1, (xc) + 3 * (xstep), 64);                      \
      _tile_dpbf16ps(3, TA1, TB);                                    \
    }                                                                \
  } while (0)

template <int NT>
inline void even_chunk(const uint16_t* b, const uint16_t* xc, int64_t xstep) {
  WOQ_CHUNK_PRODUCTS(NT, 6, 0, 1, 4, 5, b, xc, xstep);
}

template <int NT>
inline void odd_chunk(const uint16_t* b, const uint16_t* xc, int64_t xstep) {
  if constexpr (NT <= 2) {
    WOQ_CHUNK_PRODUCTS(NT, 7, 2, 3, 5, 4, b, xc, xstep);
  } else {
    WOQ_CHUNK_PRODUCTS(NT, 7, 0, 1, 5, 4, b, xc, xstep);
  }
}

// The tile products of chunks [c0, c1) (codes converted in ``stage``, x in ``xt``) into C tiles zeroed
// first, then stored to ``cbuf``; ``convert(c + kLag)`` fills the ring while chunk c is multiplied.
template <int NT, typename Convert>
inline void chunk_products(const uint16_t* stage, const uint16_t* xt, int64_t chunks, int64_t c0, int64_t c1,
                           Convert&& convert, float (*cbuf)[16][16]) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t c = c0; c < c1; ++c) {
    if (c + kLag < chunks) convert(c + kLag);
    if (c & 1)
      odd_chunk<NT>(stage + (c % kStage) * kTile, xt + c * kTile, chunks * kTile);
    else
      even_chunk<NT>(stage + (c % kStage) * kTile, xt + c * kTile, chunks * kTile);
  }
  _tile_stored(0, cbuf[0], 64);
  if constexpr (NT > 1) _tile_stored(1, cbuf[1], 64);
  if constexpr (NT > 2) _tile_stored(2, cbuf[2], 64);
  if constexpr (NT > 3) _tile_stored(3, cbuf[3], 64);
  if constexpr (NT <= 2) {  // the odd chunks' accumulators
    _tile_stored(2, cbuf[2], 64);
    if constexpr (NT > 1) _tile_stored(3, cbuf[3], 64);
  }
}

// One output block (16 rows of W) against NT row tiles of x starting at row tile t0.
// ``stage`` is a ring of kStage dequantized chunks (1 KB each); a chunk is written kLag steps
// before its tile load, so the load never waits on freshly stored data.
template <int Kind, int NT>
void amx_block(const Problem& P, const uint16_t* xtiles, int64_t nb, int64_t t0, uint16_t* stage,
               float (*cbuf)[16][16], float* totals) {
  constexpr int OB = octet_bytes<Kind == kTable4 ? kInt4 : Kind>();
  const int64_t chunks = P.Kp / kChunk;
  const uint8_t* w = P.codes + nb * (P.Kp / 8) * OB;
  const uint16_t* xt = xtiles + t0 * chunks * kTile;
  std::fill(totals, totals + NT * 16 * kBlockN, 0.0f);
  const __m512i table = P.table_register();
  // Software pipeline over the block's chunks: chunk c + kLag is dequantized (vector units)
  // while the tile unit multiplies chunk c, from a ring of kStage converted chunks.
  auto dequant_chunk = [&](int64_t c) {
    uint16_t* dst = stage + (c % kStage) * kTile;
    const uint8_t* src = w + c * kOctetsPerChunk * OB;
    for (int o = 0; o < kOctetsPerChunk; ++o) {
      _mm_prefetch((const char*)(src + o * OB + kPrefetchAmx), _MM_HINT_T0);
      __m512bh wv[4];
      dequant_octet<Kind>(src + o * OB, wv, table);
      for (int i = 0; i < 4; ++i) _mm512_store_si512(dst + o * 128 + i * 32, (__m512i)wv[i]);
    }
  };
  for (int64_t c = 0; c < std::min<int64_t>(kLag, chunks); ++c) dequant_chunk(c);
  for (int64_t g = 0; g < P.G; ++g) {
    chunk_products<NT>(stage, xt, chunks, P.chunks[g], P.chunks[g + 1], dequant_chunk, cbuf);
    // Apply the group's scale and zero point to the partial sums.
    __m512 s, z;
    P.group_scales(nb, g, s, z);
    for (int r = 0; r < NT * 16; ++r) {
      __m512 c = _mm512_load_ps(cbuf[r / 16][r % 16]);
      if constexpr (NT <= 2) c = _mm512_add_ps(c, _mm512_load_ps(cbuf[2 + r / 16][r % 16]));
      float* tot = totals + r * kBlockN;
      __m512 v = _mm512_fmadd_ps(c, s, _mm512_loadu_ps(tot));
      if constexpr (Kind != kTable4) v = _mm512_fnmadd_ps(z, _mm512_set1_ps(P.xsum[(t0 * 16 + r) * P.G + g]), v);
      _mm512_storeu_ps(tot, v);
    }
  }
  const int64_t rows = std::min<int64_t>(NT * 16, P.M - t0 * 16);
  for (int64_t r = 0; r < rows; ++r) store_block(P, t0 * 16 + r, nb, _mm512_loadu_ps(totals + r * kBlockN));
}

// Groups of 16 (an AMX K-step spans two): the ring holds the weights themselves, w = s * c - z
// in fp32 rounded once to bf16 (what dequantize-then-bf16-GEMM computes), so the tiles accumulate
// over the whole row with no per-group step. Only for batches: decode keeps the exact codes.
template <int Kind>
inline void scaled_pairs(__m512bh& w, __m512 s_lo, __m512 s_hi, __m512 z_lo, __m512 z_hi) {
  // Pair vector: lanes 2n, 2n + 1 are row n; fp32 halves hold rows 0-7 and 8-15.
  const __m512i v = (__m512i)w;
  const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
  const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
  w = _mm512_cvtne2ps_pbh(_mm512_fmsub_ps(hi, s_hi, z_hi), _mm512_fmsub_ps(lo, s_lo, z_lo));
}

// Chunk c of block nb dequantized with the scales of ``g0`` (columns 0-15) and ``g1`` (16-31),
// into one B tile (1 KB) at ``dst``.
template <int Kind>
inline void scaled_chunk(const Problem& P, const uint8_t* w, int64_t nb, int64_t c, int64_t g0, int64_t g1,
                         uint16_t* dst, __m512i table) {
  constexpr int OB = octet_bytes<Kind>();
  // Row n of a group's 16 scales to lanes 2n and 2n + 1 (rows 0-7; rows 8-15 the second index).
  const __m512i rows_lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i rows_hi = _mm512_add_epi32(rows_lo, _mm512_set1_epi32(8));
  const uint8_t* src = w + c * kOctetsPerChunk * OB;
  for (int half = 0; half < 2; ++half) {
    __m512 s, z;
    P.group_scales(nb, half ? g1 : g0, s, z);
    const __m512 s_lo = _mm512_permutexvar_ps(rows_lo, s), s_hi = _mm512_permutexvar_ps(rows_hi, s);
    const __m512 z_lo = _mm512_permutexvar_ps(rows_lo, z), z_hi = _mm512_permutexvar_ps(rows_hi, z);
    for (int o = 2 * half; o < 2 * half + 2; ++o) {
      _mm_prefetch((const char*)(src + o * OB + kPrefetchAmx), _MM_HINT_T0);
      __m512bh wv[4];
      dequant_octet<Kind>(src + o * OB, wv, table);
      for (int i = 0; i < 4; ++i) {
        scaled_pairs<Kind>(wv[i], s_lo, s_hi, z_lo, z_hi);
        _mm512_store_si512(dst + o * 128 + i * 32, (__m512i)wv[i]);
      }
    }
  }
}

template <int Kind, int NT>
void amx_block_scaled(const Problem& P, const uint16_t* xtiles, int64_t nb, int64_t t0, uint16_t* stage,
                      float (*cbuf)[16][16]) {
  constexpr int OB = octet_bytes<Kind>();
  const int64_t chunks = P.Kp / kChunk;
  const uint8_t* w = P.codes + nb * (P.Kp / 8) * OB;
  const uint16_t* xt = xtiles + t0 * chunks * kTile;
  const __m512i table = P.table_register();
  auto dequant_chunk = [&](int64_t c) {  // the chunk's two groups of 16 columns: 2c, 2c + 1
    scaled_chunk<Kind>(P, w, nb, c, 2 * c, 2 * c + 1, stage + (c % kStage) * kTile, table);
  };
  for (int64_t c = 0; c < std::min<int64_t>(kLag, chunks); ++c) dequant_chunk(c);
  chunk_products<NT>(stage, xt, chunks, 0, chunks, dequant_chunk, cbuf);
  const int64_t rows = std::min<int64_t>(NT * 16, P.M - t0 * 16);
  for (int64_t r = 0; r < rows; ++r) {
    __m512 y = _mm512_load_ps(cbuf[r / 16][r % 16]);
    if constexpr (NT <= 2) y = _mm512_add_ps(y, _mm512_load_ps(cbuf[2 + r / 16][r % 16]));
    store_block(P, t0 * 16 + r, nb, y);
  }
}

// x arrives rearranged into AMX A tiles, [row tiles][32-column chunks][16 rows][32 columns], so
// each tile is one contiguous KB (loading 16 rows at the matrix's own stride thrashes L1 sets).
// Up to 4 row tiles (64 rows of x) per pass; each block of codes is dequantized once per pass.
template <int Kind>
void large_m(const Problem& P, const uint16_t* xtiles) {
  const int64_t NB = (P.N + kBlockN - 1) / kBlockN;
  const int64_t row_tiles = (P.M + 15) / 16;
  at::parallel_for(0, NB, 1, [&](int64_t begin, int64_t end) {
    amx::configure_tiles();
    alignas(64) uint16_t stage[kStage * kTile];
    alignas(64) float cbuf[4][16][16];
    alignas(64) float totals[64 * kBlockN];
    // Passes of 64 rows outside, blocks inside: with more than 64 rows (prefill) the 64-row
    // slice of x stays in L2 for the whole pass, while the codes are re-read and re-converted
    // per pass; the other order reloads all of x (too big for L2) for every block.
    for (int64_t t0 = 0; t0 < row_tiles; t0 += 4) {
      for (int64_t nb = begin; nb < end; ++nb) {
        if (P.unit_cols == 16) {
          if constexpr (Kind != kTable4) {
            switch (std::min<int64_t>(4, row_tiles - t0)) {
              case 1: amx_block_scaled<Kind, 1>(P, xtiles, nb, t0, stage, cbuf); break;
              case 2: amx_block_scaled<Kind, 2>(P, xtiles, nb, t0, stage, cbuf); break;
              case 3: amx_block_scaled<Kind, 3>(P, xtiles, nb, t0, stage, cbuf); break;
              default: amx_block_scaled<Kind, 4>(P, xtiles, nb, t0, stage, cbuf); break;
            }
          }
          continue;
        }
        switch (std::min<int64_t>(4, row_tiles - t0)) {
          case 1: amx_block<Kind, 1>(P, xtiles, nb, t0, stage, cbuf, totals); break;
          case 2: amx_block<Kind, 2>(P, xtiles, nb, t0, stage, cbuf, totals); break;
          case 3: amx_block<Kind, 3>(P, xtiles, nb, t0, stage, cbuf, totals); break;
          default: amx_block<Kind, 4>(P, xtiles, nb, t0, stage, cbuf, totals); break;
        }
      }
    }
    _tile_release();
  });
}

// Sum of x over every group, from the same bf16 values the kernels multiply.
void group_sums(const Problem& P, float* xsum) {
  // Cheap (M * Kp adds): threads only when there is enough of it to pay for waking them.
  at::parallel_for(0, P.M, std::max<int64_t>(1, (int64_t{1} << 17) / P.Kp), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const uint16_t* row = P.x + m * P.Kp;
      for (int64_t g = 0; g < P.G; ++g) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = (int64_t)P.chunks[g] * P.unit_cols; k < (int64_t)P.chunks[g + 1] * P.unit_cols; k += 16) {
          __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(row + k)));
          acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));  // bf16 -> fp32
        }
        xsum[m * P.G + g] = _mm512_reduce_add_ps(acc);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Prefill (hundreds of rows): a blocked AMX GEMM on weights dequantized one panel at a time.
// Each thread owns panels of output columns. Per panel and per kPanelChunks x 32 input columns,
// the codes are converted once, scales applied and rounded to bf16 (what dequantize-then-GEMM
// computes), into a 64 KB buffer in B-tile order that stays in L2; every pair of row tiles of x
// then multiplies against it 2 x 2 C tiles at a time, the fp32 sums accumulating in a per-thread
// buffer across the K panels. Two such buffers alternate, so the next panel's conversion overlaps
// this one's tile products. The dense weight never goes to memory, and the tile loop reads x from
// L1 and the panel from L2.
constexpr int64_t kPanelBlocks = 8;   // output columns per panel: 8 blocks of 16
constexpr int64_t kPanelChunks = 8;   // input columns per panel: 8 chunks of 32
constexpr int64_t kPanelRows = 512;   // rows of x per pass (bounds the fp32 sum buffer)

// C tiles 0-3 = rows (tile ``xa``, tile ``xa + xstep``) x blocks (``b``, ``b + bstep``) over
// ``kc`` chunks, added to the fp32 sums at ``c`` (row stride ``ldc`` floats) unless ``first``.
template <int MT, int NB>
inline void panel_tiles(const uint16_t* xa, int64_t xstep, const uint16_t* b, int64_t bstep, int64_t kc,
                        float* c, int64_t ldc, bool first) {
  const int64_t ldb = ldc * sizeof(float);
  if (first) {
    _tile_zero(0);
    if constexpr (NB > 1) _tile_zero(1);
    if constexpr (MT > 1) _tile_zero(2);
    if constexpr (MT > 1 && NB > 1) _tile_zero(3);
  } else {
    _tile_loadd(0, c, ldb);
    if constexpr (NB > 1) _tile_loadd(1, c + 16, ldb);
    if constexpr (MT > 1) _tile_loadd(2, c + 16 * ldc, ldb);
    if constexpr (MT > 1 && NB > 1) _tile_loadd(3, c + 16 * ldc + 16, ldb);
  }
  for (int64_t k = 0; k < kc; ++k) {
    _tile_loadd(4, xa + k * kTile, 64);
    _tile_loadd(6, b + k * kTile, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB > 1) {
      _tile_loadd(7, b + bstep + k * kTile, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (MT > 1) {
      _tile_loadd(5, xa + xstep + k * kTile, 64);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NB > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, ldb);
  if constexpr (NB > 1) _tile_stored(1, c + 16, ldb);
  if constexpr (MT > 1) _tile_stored(2, c + 16 * ldc, ldb);
  if constexpr (MT > 1 && NB > 1) _tile_stored(3, c + 16 * ldc + 16, ldb);
}

template <int Kind>
void panel_gemm(const Problem& P, const uint16_t* xtiles) {
  const int64_t NB = (P.N + kBlockN - 1) / kBlockN;
  const int64_t chunks = P.Kp / kChunk;
  const int64_t row_tiles = (P.M + 15) / 16;
  const int64_t pass_tiles = kPanelRows / 16;
  constexpr int OB = octet_bytes<Kind>();
  // The group of every ``unit_cols`` columns, so a chunk finds the scales of its two halves.
  std::vector<int32_t> unit_group(P.Kp / P.unit_cols);
  for (int64_t g = 0; g < P.G; ++g)
    for (int64_t u = P.chunks[g]; u < P.chunks[g + 1]; ++u) unit_group[u] = (int32_t)g;
  const int64_t per_chunk = kChunk / P.unit_cols;  // units per chunk: 1, or 2 for groups of 16
  // Panel width: at most kPanelBlocks, even, and a whole number of panels per thread where the
  // layer is narrow (a 576-wide layer has 36 blocks: 6 panels of 6, not 8 + 8 + 8 + 8 + 4).
  const int64_t threads = at::get_num_threads();
  const int64_t rounds = (NB + threads * kPanelBlocks - 1) / (threads * kPanelBlocks);
  const int64_t panel_blocks = std::max<int64_t>(2, ((NB + threads * rounds - 1) / (threads * rounds) + 1) & ~int64_t{1});
  const int64_t panels = (NB + panel_blocks - 1) / panel_blocks;
  const int64_t ldc = panel_blocks * kBlockN;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    amx::configure_tiles();
    const __m512i table = P.table_register();
    // Two panel buffers: the tile products read one while the next K-panel is converted into the
    // other, a few chunks after each 2 x 2 tile step, so the vector units' conversion overlaps the
    // tile unit's products (as the ring of the fused path does).
    // Kept by the thread from call to call: fresh buffers this size cost their page faults.
    thread_local std::vector<uint16_t> panel_store;
    thread_local std::vector<float> sums_store;
    panel_store.resize(2 * kPanelBlocks * kPanelChunks * kTile + 32);
    sums_store.resize(std::max<size_t>(sums_store.size(), std::min(row_tiles, pass_tiles) * 16 * ldc + 16));
    uint16_t* buffers[2];
    buffers[0] = (uint16_t*)(((uintptr_t)panel_store.data() + 63) & ~uintptr_t{63});
    buffers[1] = buffers[0] + kPanelBlocks * kPanelChunks * kTile;
    float* sums = (float*)(((uintptr_t)sums_store.data() + 63) & ~uintptr_t{63});
    // A thread's steps, in order: (panel, row pass, K-panel). Step i uses buffers[i & 1].
    const int64_t k_steps = (chunks + kPanelChunks - 1) / kPanelChunks;
    const int64_t passes = (row_tiles + pass_tiles - 1) / pass_tiles;
    const int64_t steps = (end - begin) * passes * k_steps;
    struct Step { int64_t nb0, nbs, t0, tiles, c0, kc; };
    auto step_at = [&](int64_t i) {
      const int64_t p = begin + i / (passes * k_steps), pass = i / k_steps % passes, k = i % k_steps;
      Step st;
      st.nb0 = p * panel_blocks;
      st.nbs = std::min(panel_blocks, NB - st.nb0);
      st.t0 = pass * pass_tiles;
      st.tiles = std::min(pass_tiles, row_tiles - st.t0);
      st.c0 = k * kPanelChunks;
      st.kc = std::min(kPanelChunks, chunks - st.c0);
      return st;
    };
    // Chunk ``q`` (block-major) of step ``st``'s panel into ``dst``.
    auto convert = [&](const Step& st, int64_t q, uint16_t* dst) {
      const int64_t j = q / st.kc, c = st.c0 + q % st.kc;
      const uint8_t* w = P.codes + (st.nb0 + j) * (P.Kp / 8) * OB;
      const int64_t u = c * per_chunk;
      scaled_chunk<Kind>(P, w, st.nb0 + j, c, unit_group[u], unit_group[u + per_chunk - 1], dst + q * kTile, table);
    };
    if (steps > 0) {
      const Step first_step = step_at(0);
      for (int64_t q = 0; q < first_step.nbs * first_step.kc; ++q) convert(first_step, q, buffers[0]);
    }
    for (int64_t i = 0; i < steps; ++i) {
      const Step st = step_at(i);
      const uint16_t* panel = buffers[i & 1];
      const bool has_next = i + 1 < steps;
      const Step next = has_next ? step_at(i + 1) : st;
      const int64_t next_chunks = has_next ? next.nbs * next.kc : 0;
      const int64_t products = ((st.tiles + 1) / 2) * ((st.nbs + 1) / 2);
      const int64_t per_product = (next_chunks + products - 1) / products;
      int64_t converted = 0;
      const bool first = st.c0 == 0;
      for (int64_t t = 0; t < st.tiles; t += 2) {
        const uint16_t* xa = xtiles + ((st.t0 + t) * chunks + st.c0) * kTile;
        const bool two_rows = t + 1 < st.tiles;
        for (int64_t j = 0; j < st.nbs; j += 2) {
          const uint16_t* b = panel + j * st.kc * kTile;
          float* c = sums + t * 16 * ldc + j * kBlockN;
          const int64_t xstep = chunks * kTile, bstep = st.kc * kTile;
          if (two_rows && j + 1 < st.nbs) panel_tiles<2, 2>(xa, xstep, b, bstep, st.kc, c, ldc, first);
          else if (two_rows) panel_tiles<2, 1>(xa, xstep, b, bstep, st.kc, c, ldc, first);
          else if (j + 1 < st.nbs) panel_tiles<1, 2>(xa, xstep, b, bstep, st.kc, c, ldc, first);
          else panel_tiles<1, 1>(xa, xstep, b, bstep, st.kc, c, ldc, first);
          for (int64_t q = 0; q < per_product && converted < next_chunks; ++q) convert(next, converted++, buffers[(i + 1) & 1]);
        }
      }
      while (converted < next_chunks) convert(next, converted++, buffers[(i + 1) & 1]);
      if (st.c0 + st.kc == chunks) {  // the pass's sums are complete
        const int64_t rows = std::min<int64_t>(st.tiles * 16, P.M - st.t0 * 16);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < st.nbs; ++j)
            store_block(P, st.t0 * 16 + r, st.nb0 + j, _mm512_load_ps(sums + r * ldc + j * kBlockN));
      }
    }
    _tile_release();
  });
}

}  // namespace

bool amx_ready() { return amx::ready(); }

// Calls fn with the CodeKind of ``bits``-bit integer codes as a compile-time constant.
template <typename F>
void by_kind(int64_t bits, F&& fn) {
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 6 || bits == 8, "bits must be 4, 5, 6 or 8");
  switch (bits) {
    case 8: fn(std::integral_constant<int, kInt8>{}); break;
    case 6: fn(std::integral_constant<int, kInt6>{}); break;
    case 5: fn(std::integral_constant<int, kInt5>{}); break;
    default: fn(std::integral_constant<int, kInt4>{}); break;
  }
}

// The weight's side of a Problem, from the packed tensors (``table``: NF4 / FP4 codes, no zero point).
Problem weight_problem(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& zscales,
                       const torch::Tensor& chunks, int64_t n, int64_t kp, int64_t group_cols,
                       const c10::optional<std::vector<torch::Tensor>>& two_level, int64_t groups_per_super,
                       bool table = false) {
  Problem P{};
  P.Kp = kp;
  P.N = n;
  P.G = chunks.size(0) - 1;
  P.codes = codes.data_ptr<uint8_t>();
  P.chunks = chunks.data_ptr<int32_t>();
  P.unit_cols = group_cols;
  auto or_null = [](const torch::Tensor& t) { return t.numel() ? t.data_ptr() : nullptr; };
  if (two_level.has_value()) {
    const auto& t = *two_level;
    P.two_level.d = (const uint16_t*)t[0].data_ptr();
    P.two_level.sc = (const int8_t*)or_null(t[1]);
    P.two_level.dmin = (const uint16_t*)or_null(t[2]);
    P.two_level.mn = (const uint8_t*)or_null(t[3]);
    P.two_level.zc = t[4].data_ptr<float>();
    P.two_level.groups_per_super = groups_per_super;
  } else {
    P.scales = scales.data_ptr<float>();
    P.zscales = table ? nullptr : zscales.data_ptr<float>();
  }
  return P;
}

// bf16 x [M, Kp] as zero-padded whole AMX A tiles [M/16][Kp/32][16][32]: each tile one
// contiguous KB (loading 16 rows at the matrix's own stride thrashes L1 sets).
torch::Tensor row_tiles_of(const torch::Tensor& x) {
  const int64_t M = x.size(0), Kp = x.size(1);
  const int64_t row_tiles = (M + 15) / 16;
  const int64_t chunks = Kp / kChunk;
  auto xtiles = torch::empty({row_tiles, chunks, 16, kChunk}, x.options());
  const auto* src = (const uint16_t*)x.data_ptr();
  auto* dst = (uint16_t*)xtiles.data_ptr();
  at::parallel_for(0, row_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t c = 0; c < chunks; ++c)
        for (int64_t r = 0; r < 16; ++r) {
          uint16_t* d = dst + ((t * chunks + c) * 16 + r) * kChunk;
          const int64_t m = t * 16 + r;
          if (m < M)
            std::memcpy(d, src + m * Kp + c * kChunk, kChunk * sizeof(uint16_t));
          else
            std::memset(d, 0, kChunk * sizeof(uint16_t));
        }
  });
  return xtiles;
}

// x: bf16 [M, Kp] contiguous. Returns [M, N], fp32 if out_fp32 else bf16.
// M <= vnni_max_rows (bf16 output, integer codes) quantizes x to int8 and runs the VNNI path;
// otherwise M >= amx_min_rows uses AMX (when permitted), smaller M the AVX512-BF16 path.
// ``table`` (int16 [32], bf16 bit patterns of 16 levels then padding) makes 4-bit codes indices.
// ``two_level`` = (d, sc, dmin, mn, zc, groups_per_super) replaces scales / zscales (empty then),
// tensors as TwoLevelScales describes, an empty sc / dmin / mn standing for its nullptr.
torch::Tensor woq_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor zscales,
                         torch::Tensor chunks, c10::optional<torch::Tensor> bias, int64_t bits, int64_t n,
                         bool out_fp32, int64_t amx_min_rows, c10::optional<torch::Tensor> table,
                         int64_t group_cols, c10::optional<std::vector<torch::Tensor>> two_level,
                         int64_t groups_per_super, int64_t vnni_max_rows) {
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && x.dim() == 2, "x must be a 2-D bf16 tensor");
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 6 || bits == 8, "bits must be 4, 5, 6 or 8");
  TORCH_CHECK(!two_level.has_value() || (two_level->size() == 5 && !table.has_value()),
              "two-level scales are (d, sc, dmin, mn, zc), for integer codes");
  TORCH_CHECK(group_cols == kChunk || (group_cols == 16 && !table.has_value()),
              "group_cols must be 32, or 16 for integer codes");
  TORCH_CHECK(!table.has_value() || (bits == 4 && table->numel() == 32 && table->element_size() == 2 &&
                                      table->is_contiguous() && table->device().is_cpu()),
              "a code table needs 4-bit codes and 32 contiguous 16-bit entries on the CPU");
  x = x.contiguous();
  const int64_t M = x.size(0);
  const int64_t Kp = x.size(1);
  TORCH_CHECK(Kp % kChunk == 0, "padded width must be a multiple of 32");
  const int64_t G = chunks.size(0) - 1;
  // int8 activations only where the output is bf16 anyway (the float32 path is the exact one).
  const bool use_vnni = M <= vnni_max_rows && !out_fp32 && !table.has_value();
  // Groups of 16 run on AMX with their weights rounded to bf16: not for the exact float32 path.
  const bool use_amx = !use_vnni && M >= amx_min_rows && amx_ready() && (group_cols == kChunk || !out_fp32);
  torch::Tensor xtiles;
  if (use_amx) xtiles = row_tiles_of(x);
  auto out = torch::empty({M, n}, x.options().dtype(out_fp32 ? torch::kFloat32 : torch::kBFloat16));
  // Per-group sums of x feed only the zero-point term, which table codes do not have.
  // (Groups of 16 on AMX fold the zero point into the weights they convert.)
  const bool needs_xsum = !table.has_value() && !use_vnni && !(use_amx && group_cols == 16);
  auto xsum = use_amx ? torch::zeros({needs_xsum ? (M + 15) / 16 * 16 : 0, G}, x.options().dtype(torch::kFloat32))
                      : torch::empty({needs_xsum ? M : 0, G}, x.options().dtype(torch::kFloat32));
  Problem P = weight_problem(codes, scales, zscales, chunks, n, Kp, group_cols, two_level, groups_per_super,
                             table.has_value());
  P.x = (const uint16_t*)x.data_ptr();
  P.M = M;
  P.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  P.table = table.has_value() ? (const uint16_t*)table->data_ptr() : nullptr;
  P.xsum = xsum.data_ptr<float>();
  P.out = out.data_ptr();
  P.out_fp32 = out_fp32;
  if (needs_xsum) group_sums(P, xsum.data_ptr<float>());
  if (use_vnni) {
    // The quantized x lives in buffers kept by the calling thread: a decode step makes ~100 of
    // these calls, and three tensor allocations each were measurable.
    thread_local std::vector<int8_t> xq;
    thread_local std::vector<float> dx, xg;
    xq.resize(M * Kp);
    dx.resize(M * (Kp / kChunk));
    xg.resize(M * G);
    quantize_rows(P, xq.data(), dx.data(), xg.data());
    const QuantizedRows X{xq.data(), dx.data(), xg.data()};
    by_kind(bits, [&](auto kind) { vnni_m<kind>(P, X); });
  } else if (use_amx) {
    const auto* xt = (const uint16_t*)xtiles.data_ptr();
    if (P.table) large_m<kTable4>(P, xt);
    else by_kind(bits, [&](auto kind) { large_m<kind>(P, xt); });
  } else {
    if (P.table) small_m<kTable4>(P);
    else by_kind(bits, [&](auto kind) { small_m<kind>(P); });
  }
  return out;
}

// Rows ``ids`` of a weight of integer codes, dequantized into ``out`` float32 [R, Kp] (a tied
// embedding's lookup reads the output layer's packed blocks), in ggml's order for two-level blocks:
// (d * sc) * (q - zero) - dmin * mn, q - zero exact.
template <int Kind>
void dequantize_rows_of(const Problem& P, const int64_t* ids, int64_t count, float* out) {
  constexpr int OB = octet_bytes<Kind>();
  constexpr float offset = (float)code_offset<Kind>();  // the zero points include it
  auto half_to_float = [](uint16_t h) { return _mm512_cvtss_f32(_mm512_cvtph_ps(_mm256_set1_epi16((short)h))); };
  const TwoLevelScales& t = P.two_level;
  const int64_t unit_octets = P.unit_cols / 8;
  for (int64_t r = 0; r < count; ++r) {
    TORCH_CHECK(ids[r] >= 0 && ids[r] < P.N, "row ", ids[r], " out of range");
    const int64_t nb = ids[r] / kBlockN, lane = ids[r] % kBlockN;
    const uint8_t* w = P.codes + nb * (P.Kp / 8) * OB;
    float* row = out + r * P.Kp;
    for (int64_t g = 0; g < P.G; ++g) {
      const int64_t at = (nb * P.G + g) * kBlockN + lane;
      float scale, zero_code = 0.0f, min = 0.0f;
      if (t.d) {
        const int64_t super_at = (nb * (P.G / t.groups_per_super) + g / t.groups_per_super) * kBlockN + lane;
        scale = half_to_float(t.d[super_at]) * (t.sc ? (float)t.sc[at] : 1.0f);
        if (t.dmin) min = half_to_float(t.dmin[super_at]) * (t.mn ? (float)t.mn[at] : 1.0f);
        zero_code = t.zc[nb * kBlockN + lane] - offset;
      } else {
        scale = P.scales[at];
        min = P.zscales[at] - scale * offset;  // (zero + offset) * scale, the offset taken off
      }
      for (int64_t o = (int64_t)P.chunks[g] * unit_octets; o < (int64_t)P.chunks[g + 1] * unit_octets; ++o) {
        alignas(64) uint8_t half[2][64];
        __m512i lo, hi;
        octet_codes<Kind>(w + o * OB, lo, hi);
        _mm512_store_si512(half[0], lo);
        _mm512_store_si512(half[1], hi);
        for (int h = 0; h < 2; ++h)
          for (int i = 0; i < 4; ++i) row[8 * o + 4 * h + i] = scale * ((float)half[h][4 * lane + i] - zero_code) - min;
      }
    }
  }
}

// A packed weight with its fixed arguments, bound once: a decode step's call converts one
// tensor instead of fourteen (a 135M-parameter model makes ~120 such calls per token).
struct BoundWeight {
  torch::Tensor codes, scales, zscales, chunks;
  c10::optional<torch::Tensor> bias, table;
  int64_t bits, n, group_cols, groups_per_super;
  c10::optional<std::vector<torch::Tensor>> two_level;

  // bf16 x [M, Kp] -> bf16 [M, n], bias added.
  torch::Tensor forward(torch::Tensor x, int64_t amx_min_rows, int64_t vnni_max_rows) const {
    return woq_linear(x, codes, scales, zscales, chunks, bias, bits, n, false, amx_min_rows, table, group_cols,
                      two_level, groups_per_super, vnni_max_rows);
  }

  int64_t padded_in() const { return codes.size(1) * 8; }  // codes are [blocks, octets, bytes]

  Problem weight() const {
    TORCH_CHECK(!table.has_value(), "dequantizing needs integer codes, not a table");
    return weight_problem(codes, scales, zscales, chunks, n, padded_in(), group_cols, two_level, groups_per_super);
  }

  // bf16 x [M, Kp] -> bf16 [M, n], bias added, on weights dequantized panel by panel (panel_gemm):
  // for prefill-sized M, where each converted panel serves hundreds of rows.
  torch::Tensor prefill(torch::Tensor x) const {
    TORCH_CHECK(x.dtype() == torch::kBFloat16 && x.dim() == 2 && x.size(1) == padded_in(),
                "x must be bf16 [M, padded in_features]");
    TORCH_CHECK(amx_ready(), "the prefill GEMM needs AMX");
    Problem P = weight();
    x = x.contiguous();
    auto xtiles = row_tiles_of(x);
    auto out = torch::empty({x.size(0), n}, x.options());
    P.x = (const uint16_t*)x.data_ptr();
    P.M = x.size(0);
    P.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
    P.out = out.data_ptr();
    P.out_fp32 = false;
    by_kind(bits, [&](auto kind) { panel_gemm<kind>(P, (const uint16_t*)xtiles.data_ptr()); });
    return out;
  }

  // Rows ``ids`` (int64 [R]) dequantized: float32 [R, Kp] (see dequantize_rows_of).
  torch::Tensor rows(torch::Tensor ids) const {
    TORCH_CHECK(ids.scalar_type() == torch::kLong && ids.dim() == 1, "ids must be int64 [R]");
    const Problem P = weight();
    auto idx = ids.contiguous();
    auto out = torch::empty({idx.numel(), P.Kp}, codes.options().dtype(torch::kFloat32));
    by_kind(bits, [&](auto kind) {
      dequantize_rows_of<kind>(P, idx.data_ptr<int64_t>(), idx.numel(), out.data_ptr<float>());
    });
    return out;
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("woq_linear", &woq_linear, "weight-only int8/int4/NF4 linear (see woq_kernels.cpp)");
  pybind11::class_<BoundWeight>(m, "BoundWeight")
      .def(pybind11::init([](torch::Tensor codes, torch::Tensor scales, torch::Tensor zscales, torch::Tensor chunks,
                             c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> table, int64_t bits,
                             int64_t n, int64_t group_cols, c10::optional<std::vector<torch::Tensor>> two_level,
                             int64_t groups_per_super) {
        return BoundWeight{codes, scales, zscales, chunks, bias, table, bits, n, group_cols, groups_per_super,
                           two_level};
      }))
      .def("__call__", &BoundWeight::forward,
           "bf16 x [M, Kp], int8 activations up to vnni_max_rows rows, AMX from amx_min_rows -> bf16 y [M, n]")
      .def("prefill", &BoundWeight::prefill, "bf16 x [M, Kp] -> bf16 y [M, n] on panel-dequantized weights")
      .def("rows", &BoundWeight::rows, "rows ids of the weight -> float32 [R, Kp]");
  m.def("amx_ready", &amx_ready, "request AMX tile state from the kernel; true when granted");
}
