// Causal attention of one sequence's new tokens on AMX tiles (flash attention, see flash_prefill.py).
// The T_q queries are the last T_q of the T_k positions whose keys and values are given (a whole
// prompt, or a chunk after a cached prefix); with a sliding window of W, a query at position p
// sees keys p - W + 1 .. p.
//
// Per (query head, block of 16 query rows): S = Q K^T for 64 keys at a time on four C tiles,
// an online softmax over S in float32 (base 2) (running max m and sum l per row; the rows' partial
// output O is rescaled by exp(m_old - m_new) whenever the max grows), P = exp(S - m) rounded to
// bf16 and O += P V on tiles again. Keys a row may not see get probability 0, and key blocks
// that no row of the block sees (above the diagonal, before the window) are never visited. K and V are first repacked per KV head into
// AMX B-tile order (pairs of consecutive elements along the reduced dimension), so every tile
// load reads one contiguous KB.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "amx.h"

namespace {

constexpr int64_t kRows = 16;    // query rows per block (one A tile)
constexpr int64_t kKeys = 64;    // keys per block (four S tiles of 16)
constexpr int64_t kPair = 32;    // bf16 values along the reduced dimension per tile step
constexpr int64_t kTileElems = 16 * kPair;

// K [T, heads, d] of one KV head -> B tiles of K^T: [key tiles][d / 32][16 pairs][16 keys][2].
void pack_keys(const uint16_t* k, int64_t stride, int64_t T, int64_t d, uint16_t* out, int64_t key_tiles) {
  const int64_t steps = d / kPair;
  for (int64_t kt = 0; kt < key_tiles; ++kt)
    for (int64_t s = 0; s < steps; ++s) {
      uint16_t* tile = out + (kt * steps + s) * kTileElems;
      for (int64_t n = 0; n < 16; ++n) {
        const int64_t key = kt * 16 + n;
        for (int64_t r = 0; r < 16; ++r) {
          const bool valid = key < T;
          tile[r * 32 + 2 * n] = valid ? k[key * stride + s * kPair + 2 * r] : 0;
          tile[r * 32 + 2 * n + 1] = valid ? k[key * stride + s * kPair + 2 * r + 1] : 0;
        }
      }
    }
}

// V [T, heads, d] of one KV head -> B tiles: [32-key steps][d / 16][16 key pairs][16 columns][2].
void pack_values(const uint16_t* v, int64_t stride, int64_t T, int64_t d, uint16_t* out, int64_t key_steps) {
  const int64_t cols = d / 16;
  for (int64_t ks = 0; ks < key_steps; ++ks)
    for (int64_t c = 0; c < cols; ++c) {
      uint16_t* tile = out + (ks * cols + c) * kTileElems;
      for (int64_t r = 0; r < 16; ++r)
        for (int64_t e = 0; e < 2; ++e) {
          const int64_t key = ks * kPair + 2 * r + e;
          for (int64_t n = 0; n < 16; ++n) tile[r * 32 + 2 * n + e] = key < T ? v[key * stride + c * 16 + n] : 0;
        }
    }
}

// 2^x for the probabilities, which are rounded to bf16 (2^-9 relative) right after: x = n + f with
// |f| <= 1/2, 2^f from its degree-4 Taylor polynomial (relative error under 5e-5), times 2^n.
inline __m512 exp2_for_bf16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(9.618129e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550411e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 bf16_to_float(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

// GCC's AMX intrinsics take tile numbers as literal tokens: S tile t of the four is tile t.
#define FLASH_SCORES(T_) \
  if (key_tiles > T_) {  \
    _tile_loadd(5, kt + ((kb * 4 + T_) * steps + s) * kTileElems, 64); \
    _tile_dpbf16ps(T_, 4, 5); \
  }
#define FLASH_VALUES(T_) \
  if (col_tiles > T_) {  \
    _tile_loadd(5, vt + ((kb * 2 + ks) * cols + c0 + T_) * kTileElems, 64); \
    _tile_dpbf16ps(T_, 4, 5); \
  }
#define FLASH_STORE(T_, buf, ld) \
  if (col_tiles > T_) _tile_stored(T_, buf + T_ * 16, ld);

// One (query head, 16-row block): rows [r0, r0 + rows) of q, at positions offset + r0 + i, against
// the keys each may see (``window`` 0: all earlier ones).
void attend_block(const uint16_t* q, int64_t q_stride, const uint16_t* kt, const uint16_t* vt, int64_t r0,
                  int64_t rows, int64_t offset, int64_t window, int64_t d, float scale, uint16_t* out,
                  int64_t out_stride) {
  const int64_t steps = d / kPair, cols = d / 16;
  alignas(64) uint16_t qa[kRows * 256];  // d <= 256
  alignas(64) float scores[kRows * kKeys];
  alignas(64) uint16_t probs[kRows * kKeys];
  alignas(64) float o[kRows * 256];
  alignas(64) float pv[kRows * 64];
  float m[kRows], l[kRows];
  for (int64_t i = 0; i < kRows; ++i) {
    if (i < rows)
      std::memcpy(qa + i * d, q + (r0 + i) * q_stride, d * sizeof(uint16_t));
    else
      std::memset(qa + i * d, 0, d * sizeof(uint16_t));
    m[i] = -std::numeric_limits<float>::infinity();
    l[i] = 0.0f;
  }
  std::fill(o, o + kRows * d, 0.0f);
  const float scale2 = scale * 1.44269504088896341f;  // scores in base 2: e^(scale s) = 2^(scale2 s)
  const int64_t keys = offset + r0 + rows;  // causal: the block's last row sees keys before this
  const int64_t first_key = window > 0 ? std::max<int64_t>(0, offset + r0 - window + 1) : 0;  // the first row's
  const int64_t blocks = (keys + kKeys - 1) / kKeys;
  const __m512 lane = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t kb = first_key / kKeys; kb < blocks; ++kb) {
    const int64_t key0 = kb * kKeys;
    const int64_t key_tiles = std::min<int64_t>(4, (keys - key0 + 15) / 16);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t s = 0; s < steps; ++s) {
      _tile_loadd(4, qa + s * kPair, d * sizeof(uint16_t));
      FLASH_SCORES(0)
      FLASH_SCORES(1)
      FLASH_SCORES(2)
      FLASH_SCORES(3)
    }
    _tile_stored(0, scores, kKeys * sizeof(float));
    _tile_stored(1, scores + 16, kKeys * sizeof(float));
    _tile_stored(2, scores + 32, kKeys * sizeof(float));
    _tile_stored(3, scores + 48, kKeys * sizeof(float));
    // Online softmax, row by row; probabilities of keys a row may not see (or padding) are 0.
    const int64_t key_steps = std::min<int64_t>(2, (keys - key0 + kPair - 1) / kPair);
    for (int64_t i = 0; i < kRows; ++i) {
      uint16_t* p_row = probs + i * kKeys;
      if (i >= rows) {
        std::memset(p_row, 0, kKeys * sizeof(uint16_t));
        continue;
      }
      const int64_t position = offset + r0 + i;
      const __m512 limit = _mm512_set1_ps((float)(position - key0));  // key offsets <= this are visible
      // and, in a window, those >= this (no bound: -1)
      const __m512 start = _mm512_set1_ps(window > 0 ? (float)(position - window + 1 - key0) : -1.0f);
      __m512 s[4];
      __mmask16 visible[4];
      __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int t = 0; t < 4; ++t) {
        const __m512 key = _mm512_add_ps(lane, _mm512_set1_ps(16.0f * t));
        visible[t] = _mm512_cmp_ps_mask(key, limit, _CMP_LE_OQ) & _mm512_cmp_ps_mask(key, start, _CMP_GE_OQ);
        s[t] = _mm512_mul_ps(_mm512_load_ps(scores + i * kKeys + 16 * t), _mm512_set1_ps(scale2));
        mx = _mm512_mask_max_ps(mx, visible[t], mx, s[t]);
      }
      const float m_new = std::max(m[i], _mm512_reduce_max_ps(mx));
      if (m_new == -std::numeric_limits<float>::infinity()) {  // nothing visible yet (a window's start)
        std::memset(p_row, 0, kKeys * sizeof(uint16_t));
        continue;
      }
      const float alpha = m[i] == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp2(m[i] - m_new);
      m[i] = m_new;
      __m512 sum = _mm512_setzero_ps();
      for (int t = 0; t < 4; ++t) {
        const __m512 p = _mm512_maskz_mov_ps(visible[t], exp2_for_bf16(_mm512_sub_ps(s[t], _mm512_set1_ps(m_new))));
        const __m256i pb = (__m256i)_mm512_cvtneps_pbh(p);
        // The sum is of the bf16 probabilities the product with V uses, so the row normalises exactly.
        sum = _mm512_add_ps(sum, bf16_to_float(pb));
        _mm256_store_si256((__m256i*)(p_row + 16 * t), pb);
      }
      l[i] = l[i] * alpha + _mm512_reduce_add_ps(sum);
      if (alpha != 1.0f) {
        const __m512 a = _mm512_set1_ps(alpha);
        for (int64_t j = 0; j < d; j += 16) _mm512_store_ps(o + i * d + j, _mm512_mul_ps(_mm512_load_ps(o + i * d + j), a));
      }
    }
    // O += P V, 64 output columns (four C tiles) at a time.
    for (int64_t c0 = 0; c0 < cols; c0 += 4) {
      const int64_t col_tiles = std::min<int64_t>(4, cols - c0);
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t ks = 0; ks < key_steps; ++ks) {
        _tile_loadd(4, probs + ks * kPair, kKeys * sizeof(uint16_t));
        FLASH_VALUES(0)
        FLASH_VALUES(1)
        FLASH_VALUES(2)
        FLASH_VALUES(3)
      }
      FLASH_STORE(0, pv, 64 * sizeof(float))
      FLASH_STORE(1, pv, 64 * sizeof(float))
      FLASH_STORE(2, pv, 64 * sizeof(float))
      FLASH_STORE(3, pv, 64 * sizeof(float))
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t t = 0; t < col_tiles; ++t) {
          float* dst = o + i * d + (c0 + t) * 16;
          _mm512_store_ps(dst, _mm512_add_ps(_mm512_load_ps(dst), _mm512_load_ps(pv + i * 64 + t * 16)));
        }
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    const __m512 inv = _mm512_set1_ps(1.0f / l[i]);
    for (int64_t j = 0; j < d; j += 16)
      _mm256_storeu_si256((__m256i*)(out + (r0 + i) * out_stride + j),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(o + i * d + j), inv)));
  }
}

}  // namespace

bool amx_ready() { return amx::ready(); }

// q [T_q, heads * d], k and v [T_k, kv_heads * d] with T_k >= T_q (bf16, rows may be strided, e.g.
// views of a fused qkv projection) -> bf16 [T_q, heads * d]: softmax(scale * q k^T) v per head over
// the keys each query may see (query i is at position T_k - T_q + i; ``window`` > 0 limits it to the
// last ``window`` positions), query head h reading KV head h / (heads / kv_heads).
torch::Tensor causal_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t heads, int64_t kv_heads,
                               double scale, int64_t window) {
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->dtype() == torch::kBFloat16 && t->dim() == 2 && t->stride(1) == 1 && t->device().is_cpu(),
                "q, k, v must be CPU bf16 [T, heads * d] with contiguous rows");
  const int64_t Tq = q.size(0), T = k.size(0);
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "heads must be a multiple of kv_heads");
  const int64_t d = q.size(1) / heads;
  TORCH_CHECK(q.size(1) == heads * d && k.size(1) == kv_heads * d && v.size(1) == kv_heads * d &&
                  v.size(0) == T && T >= Tq,
              "q, k, v shapes disagree");
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: none)");
  TORCH_CHECK(d % kPair == 0 && d <= 256, "head size must be a multiple of 32, at most 256");
  TORCH_CHECK(amx_ready(), "flash prefill attention needs AMX");
  const int64_t key_tiles = (T + kKeys - 1) / kKeys * 4, key_steps = key_tiles / 2;
  const int64_t k_elems = key_tiles * (d / kPair) * kTileElems, v_elems = key_steps * (d / 16) * kTileElems;
  auto packed = torch::empty({kv_heads, k_elems + v_elems}, q.options());
  auto* pk = (uint16_t*)packed.data_ptr();
  const auto* kp = (const uint16_t*)k.data_ptr();
  const auto* vp = (const uint16_t*)v.data_ptr();
  at::parallel_for(0, 2 * kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t h = i / 2;
      uint16_t* base = pk + h * (k_elems + v_elems);
      if (i % 2 == 0)
        pack_keys(kp + h * d, k.stride(0), T, d, base, key_tiles);
      else
        pack_values(vp + h * d, v.stride(0), T, d, base + k_elems, key_steps);
    }
  });
  auto out = torch::empty({Tq, heads * d}, q.options());
  const int64_t q_blocks = (Tq + kRows - 1) / kRows;
  const auto* qp = (const uint16_t*)q.data_ptr();
  auto* op = (uint16_t*)out.data_ptr();
  const int64_t group = heads / kv_heads;
  // Work item i: head i % heads, and query blocks taken from both ends in turn (cheap early
  // blocks, expensive late ones), so contiguous ranges of items cost about the same.
  at::parallel_for(0, heads * q_blocks, 1, [&](int64_t begin, int64_t end) {
    amx::configure_tiles();
    for (int64_t i = begin; i < end; ++i) {
      const int64_t h = i % heads, n = i / heads;
      const int64_t qb = n % 2 == 0 ? n / 2 : q_blocks - 1 - n / 2;
      const uint16_t* base = pk + (h / group) * (k_elems + v_elems);
      const int64_t r0 = qb * kRows;
      attend_block(qp + h * d, q.stride(0), base, base + k_elems, r0, std::min(kRows, Tq - r0), T - Tq, window, d,
                   (float)scale, op + h * d, heads * d);
    }
    _tile_release();
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("causal_attention", &causal_attention, "causal attention of one sequence's new tokens on AMX (see flash_prefill.cpp)");
  m.def("amx_ready", &amx_ready, "request AMX tile state from the kernel; true when granted");
}
