// Fused CPU ops for the non-GEMM part of a decoder layer: RMSNorm (optionally after the residual
// add), rotary embedding, SiLU-and-multiply, and one-query-per-sequence
// attention read straight from the paged cache.
//
// Why: at batch 1 a TinyLlama-sized decode step spends ~11 ms outside the matrix products, almost
// all of it in ~1,500 small PyTorch calls (casts, slices, reductions, gathers), each of which
// costs a few microseconds of dispatch and a pass over memory. One C++ call per job does the
// same arithmetic in one pass.
//
// Numerics follow the PyTorch reference in ``layers/`` (which follows HF transformers): every
// value PyTorch would store in the activation dtype is rounded to it at the same point here
// (``round_as``), and reductions run in float32. What differs: the order of float32 additions,
// SiLU's exp (a Cephes polynomial, ~1 ulp, where PyTorch uses Sleef), and attention, which keeps
// scores, softmax and the weighted sum in float32 (the reference rounds q.k and the
// probabilities to bf16 on the way; bf16 dot products also flush denormals).
//
// Every op takes bf16 or float32 tensors (the ``Act`` template parameter) whose last dimension
// is contiguous; rows may be strided.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using BF16 = at::BFloat16;

inline __mmask16 lanes(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

inline __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load(const BF16* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void store(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store(BF16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));  // round to nearest even, as torch
}

// ``v`` rounded to the precision of Act: what PyTorch holds after an op whose result is an Act tensor.
inline __m512 round_as(const float*, __m512 v) { return v; }
inline __m512 round_as(const BF16*, __m512 v) {
  __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <typename Act>
inline __m512 round_to(__m512 v) { return round_as(static_cast<const Act*>(nullptr), v); }

// e^x for float32 lanes (Cephes' expf: range reduction by ln 2, degree-6 polynomial, ~1 ulp).
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.3762626647949f)), _mm512_set1_ps(88.3762626647950f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == torch::kBFloat16 || t.scalar_type() == torch::kFloat, name,
              " must be bfloat16 or float32");
  TORCH_CHECK(t.stride(-1) == 1, name, "'s last dimension must be contiguous");
}

// Rows of work are spread over threads only when there is enough of it to pay for waking them.
inline int64_t grain(int64_t work_per_row) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, work_per_row)); }

// ---- RMSNorm ------------------------------------------------------------------------------------
// out = weight * Act(x * rsqrt(mean(x^2) + eps)), x in float32; with ``residual``, x is first
// Act(x + residual) and is also returned (the new residual stream).
template <typename Act>
void rms_norm_rows(const Act* x, int64_t x_stride, const Act* residual, int64_t res_stride, const Act* weight,
                   Act* out, Act* sum_out, int64_t rows, int64_t hidden, double eps) {
  at::parallel_for(0, rows, grain(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const Act* xr = x + r * x_stride;
      __m512 squares = _mm512_setzero_ps();
      for (int64_t i = 0; i < hidden; i += 16) {
        const __mmask16 m = lanes(hidden - i);
        __m512 v = load(xr + i, m);
        if (residual) {
          v = round_to<Act>(_mm512_add_ps(v, load(residual + r * res_stride + i, m)));
          store(sum_out + r * hidden + i, v, m);
        }
        squares = _mm512_fmadd_ps(v, v, squares);
      }
      const Act* row = residual ? sum_out + r * hidden : xr;  // the summed row, when there is one
      const float inv_rms = 1.0f / std::sqrt(_mm512_reduce_add_ps(squares) / (float)hidden + (float)eps);
      const __m512 scale = _mm512_set1_ps(inv_rms);
      for (int64_t i = 0; i < hidden; i += 16) {
        const __mmask16 m = lanes(hidden - i);
        const __m512 normed = round_to<Act>(_mm512_mul_ps(load(row + i, m), scale));
        store(out + r * hidden + i, _mm512_mul_ps(load(weight + i, m), normed), m);
      }
    }
  });
}

// ---- rotary embedding ----------------------------------------------------------------------------
// qk: [T, heads + kv_heads, d] (queries then keys), rotated in place, HF's rotate_half pairing
// (i, i + d/2): out = Act(Act(x * cos) + Act(rotate_half(x) * sin)).
template <typename Act>
void rotary_rows(Act* qk, int64_t qk_stride, int64_t heads, int64_t d, const Act* cos, const Act* sin,
                 int64_t cs_stride, int64_t tokens) {
  const int64_t half = d / 2;
  at::parallel_for(0, tokens, grain(heads * d), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Act* c = cos + t * cs_stride;
      const Act* s = sin + t * cs_stride;
      for (int64_t h = 0; h < heads; ++h) {
        Act* x = qk + t * qk_stride + h * d;
        for (int64_t i = 0; i < half; i += 16) {
          const __mmask16 m = lanes(half - i);
          const __m512 x1 = load(x + i, m), x2 = load(x + half + i, m);
          const __m512 lo = _mm512_sub_ps(round_to<Act>(_mm512_mul_ps(x1, load(c + i, m))),
                                          round_to<Act>(_mm512_mul_ps(x2, load(s + i, m))));
          const __m512 hi = _mm512_add_ps(round_to<Act>(_mm512_mul_ps(x2, load(c + half + i, m))),
                                          round_to<Act>(_mm512_mul_ps(x1, load(s + half + i, m))));
          store(x + i, lo, m);
          store(x + half + i, hi, m);
        }
      }
    }
  });
}

// ---- SiLU(gate) * up ------------------------------------------------------------------------------
// gate_up: [T, 2I] (gate columns, then up); out [T, I] = Act(Act(silu(gate)) * up).
template <typename Act>
void silu_mul_rows(const Act* gate_up, int64_t stride, Act* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, grain(inter), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const Act* g = gate_up + r * stride;
      const Act* u = g + inter;
      for (int64_t i = 0; i < inter; i += 16) {
        const __mmask16 m = lanes(inter - i);
        const __m512 x = load(g + i, m);
        const __m512 silu = round_to<Act>(
            _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x)))));
        store(out + r * inter + i, _mm512_mul_ps(silu, load(u + i, m)), m);
      }
    }
  });
}

// ---- attention of one new token per sequence over its paged context ------------------------------
// For each (sequence, KV head): the ``group`` query heads that share the KV head score every
// visible cached key, softmax in float32, and sum the values. Keys and values are read in place
// from their blocks (no gathered copy of the context). The query heads of a group sit in the 16
// lanes of a vector, so one key is scored against all of them at once (bf16: one dot-product
// instruction per channel pair) and the softmax runs lane-wise, with no horizontal sums.
template <typename Act>
void decode_attention_rows(const Act* q, int64_t q_stride, const Act* k_cache, const Act* v_cache,
                           const int64_t* block_tables, int64_t max_blocks, const int64_t* context_lens,
                           int64_t block_size, int64_t num_seqs, int64_t heads, int64_t kv_heads, int64_t d,
                           double scale, int64_t window, Act* out) {
  const int64_t group = heads / kv_heads;
  const int64_t vecs = (d + 15) / 16;
  const int64_t heads_per_pass = std::max<int64_t>(1, 16 / vecs);  // output accumulators that fit in registers
  at::parallel_for(0, num_seqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;                    // [key][16 query heads]
    std::vector<float> q_t(d * 16);               // [channel][16 query heads]
    std::vector<uint32_t> q_pairs(d / 2 * 16);    // bf16 only: [channel pair][16 query heads]
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, kvh = task % kv_heads;
      const int64_t ctx = context_lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
      const int64_t len = ctx - first;
      const int64_t* table = block_tables + b * max_blocks;
      auto slot_row = [&](const Act* cache, int64_t t) {
        const int64_t pos = first + t;
        return cache + ((table[pos / block_size] * block_size + pos % block_size) * kv_heads + kvh) * d;
      };
      scores.resize(len * 16);
      for (int64_t g0 = 0; g0 < group; g0 += 16) {
        const int64_t gs = std::min<int64_t>(16, group - g0);
        const Act* q0 = q + b * q_stride + (kvh * group + g0) * d;
        std::fill(q_t.begin(), q_t.end(), 0.0f);
        std::fill(q_pairs.begin(), q_pairs.end(), 0u);
        for (int64_t g = 0; g < gs; ++g)
          for (int64_t i = 0; i < d; ++i) {
            q_t[i * 16 + g] = (float)q0[g * d + i];
            if (i % 2 == 0) std::memcpy(&q_pairs[i / 2 * 16 + g], q0 + g * d + i, 4);
          }
        __m512 best = _mm512_set1_ps(-INFINITY);
        const __m512 scale_v = _mm512_set1_ps((float)scale);
        int64_t t = 0;
        if constexpr (std::is_same_v<Act, BF16>) {
          // Eight keys at a time: eight independent dot-product chains (their latency, not their
          // rate, bounds fewer), each channel pair broadcast straight from the cache row.
          for (; t + 8 <= len; t += 8) {
            // The rows are scattered over the cache, and the weights streamed since the last step
            // have evicted them: fetch the next eight keys and values while these are scored.
            for (int64_t u = t + 8; u < std::min<int64_t>(t + 16, len); ++u)
              for (int64_t byte = 0; byte < d * 2; byte += 64) {
                _mm_prefetch((const char*)slot_row(k_cache, u) + byte, _MM_HINT_T0);
                _mm_prefetch((const char*)slot_row(v_cache, u) + byte, _MM_HINT_T0);
              }
            const float* pairs[8];
            __m512 acc[8];
            for (int u = 0; u < 8; ++u) {
              pairs[u] = (const float*)slot_row(k_cache, t + u);
              acc[u] = _mm512_setzero_ps();
            }
            for (int64_t p = 0; p < d / 2; ++p) {
              const __m512bh qv = (__m512bh)_mm512_loadu_si512(&q_pairs[p * 16]);
              for (int u = 0; u < 8; ++u)
                acc[u] = _mm512_dpbf16_ps(acc[u], (__m512bh)_mm512_broadcastss_ps(_mm_load_ss(pairs[u] + p)), qv);
            }
            for (int u = 0; u < 8; ++u) {
              const __m512 sc = _mm512_mul_ps(acc[u], scale_v);
              _mm512_storeu_ps(&scores[(t + u) * 16], sc);
              best = _mm512_max_ps(best, sc);
            }
          }
        }
        for (; t < len; ++t) {  // float32, and the last few keys of bf16
          const Act* k = slot_row(k_cache, t);
          __m512 sc = _mm512_setzero_ps();
          for (int64_t i = 0; i < d; ++i) sc = _mm512_fmadd_ps(_mm512_set1_ps((float)k[i]), _mm512_loadu_ps(&q_t[i * 16]), sc);
          sc = _mm512_mul_ps(sc, scale_v);
          _mm512_storeu_ps(&scores[t * 16], sc);
          best = _mm512_max_ps(best, sc);
        }
        __m512 total = _mm512_setzero_ps();
        for (int64_t t = 0; t < len; ++t) {  // softmax numerators, lane-wise over the keys
          const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(&scores[t * 16]), best));
          _mm512_storeu_ps(&scores[t * 16], e);
          total = _mm512_add_ps(total, e);
        }
        alignas(64) float inv[16];
        _mm512_store_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.0f), total));
        for (int64_t h0 = 0; h0 < gs; h0 += heads_per_pass) {  // weighted sums of the values
          const int64_t hn = std::min<int64_t>(heads_per_pass, gs - h0);
          __m512 acc[16];
          for (int64_t a = 0; a < hn * vecs; ++a) acc[a] = _mm512_setzero_ps();
          for (int64_t t = 0; t < len; ++t) {
            const Act* v = slot_row(v_cache, t);
            for (int64_t j = 0; j < vecs; ++j) {
              const __m512 vv = load(v + j * 16, lanes(d - j * 16));
              for (int64_t h = 0; h < hn; ++h)
                acc[h * vecs + j] = _mm512_fmadd_ps(_mm512_set1_ps(scores[t * 16 + h0 + h]), vv, acc[h * vecs + j]);
            }
          }
          for (int64_t h = 0; h < hn; ++h)
            for (int64_t j = 0; j < vecs; ++j)
              store(out + (b * heads + kvh * group + g0 + h0 + h) * d + j * 16,
                    _mm512_mul_ps(acc[h * vecs + j], _mm512_set1_ps(inv[h0 + h])), lanes(d - j * 16));
        }
      }
    }
  });
}

template <typename F>
void by_dtype(const torch::Tensor& t, F&& fn) {
  if (t.scalar_type() == torch::kBFloat16) fn(static_cast<BF16*>(nullptr));
  else fn(static_cast<float*>(nullptr));
}

}  // namespace

// x: [T, hidden]; returns the normalized rows, and with ``residual`` also x + residual.
std::vector<torch::Tensor> rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor weight,
                                    double eps) {
  check_rows(x, "x");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type() && weight.device().is_cpu(),
              "rms_norm: x [T, hidden] and a contiguous weight [hidden] of x's dtype");
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  torch::Tensor sum;
  if (residual) {
    check_rows(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(), "residual must match x");
    sum = torch::empty_like(out);
  }
  by_dtype(x, [&](auto* tag) {
    using Act = std::remove_pointer_t<decltype(tag)>;
    rms_norm_rows<Act>(x.data_ptr<Act>(), x.stride(0), residual ? residual->data_ptr<Act>() : nullptr,
                       residual ? residual->stride(0) : 0, weight.data_ptr<Act>(), out.data_ptr<Act>(),
                       residual ? sum.data_ptr<Act>() : nullptr, x.size(0), x.size(1), eps);
  });
  if (residual) return {out, sum};
  return {out};
}

// qk: [T, heads, d] (queries and keys side by side), rotated in place; cos, sin: [T, d].
void rotary_(torch::Tensor qk, torch::Tensor cos, torch::Tensor sin) {
  check_rows(qk, "qk");
  TORCH_CHECK(qk.dim() == 3 && qk.stride(1) == qk.size(2) && qk.size(2) % 2 == 0, "qk must be [T, heads, d] with even d");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == qk.size(0) && cos.size(1) == qk.size(2) &&
                  cos.stride(1) == 1 && sin.stride(1) == 1 && cos.stride(0) == sin.stride(0) &&
                  cos.scalar_type() == qk.scalar_type() && sin.scalar_type() == qk.scalar_type() &&
                  cos.device().is_cpu() && sin.device().is_cpu(),
              "cos and sin must be [T, d] rows of qk's dtype");
  by_dtype(qk, [&](auto* tag) {
    using Act = std::remove_pointer_t<decltype(tag)>;
    rotary_rows<Act>(qk.data_ptr<Act>(), qk.stride(0), qk.size(1), qk.size(2), cos.data_ptr<Act>(),
                     sin.data_ptr<Act>(), cos.stride(0), qk.size(0));
  });
}

torch::Tensor silu_and_mul(torch::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be [T, 2 * intermediate]");
  const int64_t inter = gate_up.size(1) / 2;
  auto out = torch::empty({gate_up.size(0), inter}, gate_up.options());
  by_dtype(gate_up, [&](auto* tag) {
    using Act = std::remove_pointer_t<decltype(tag)>;
    silu_mul_rows<Act>(gate_up.data_ptr<Act>(), gate_up.stride(0), out.data_ptr<Act>(), gate_up.size(0), inter);
  });
  return out;
}

// q: [B, heads, d]; caches [blocks, block_size, kv_heads, d]; block_tables [B, max_blocks] int64;
// context_lens [B] int64 (the new token included, already in the cache). Returns [B, heads * d].
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                               torch::Tensor context_lens, double scale, int64_t window) {
  check_rows(q, "q");
  TORCH_CHECK(q.dim() == 3 && q.stride(1) == q.size(2), "q must be [B, heads, d] with contiguous heads");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.scalar_type() == q.scalar_type() &&
                  v_cache.scalar_type() == q.scalar_type() && k_cache.size(3) == q.size(2) &&
                  k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "caches must be contiguous CPU [blocks, block_size, kv_heads, d] of q's dtype");
  const int64_t heads = q.size(1), kv_heads = k_cache.size(2), d = q.size(2);
  TORCH_CHECK(kv_heads >= 1 && heads % kv_heads == 0 && d >= 2 && d <= 256 && d % 2 == 0,
              "heads must be a multiple of kv_heads, head_dim even and 2-256");
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  TORCH_CHECK(tables.scalar_type() == torch::kLong && lens.scalar_type() == torch::kLong && tables.dim() == 2 &&
                  tables.size(0) == q.size(0) && lens.numel() == q.size(0) && tables.device().is_cpu() &&
                  lens.device().is_cpu(),
              "block_tables [B, max_blocks] and context_lens [B] must be int64");
  const int64_t block_size = k_cache.size(1), num_blocks = k_cache.size(0);
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < q.size(0); ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= tables.size(1) * block_size, "context length ", lp[b], " does not fit its block table");
    for (int64_t i = 0; i < (lp[b] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(tp[b * tables.size(1) + i] >= 0 && tp[b * tables.size(1) + i] < num_blocks, "block table entry out of range");
  }
  auto out = torch::empty({q.size(0), heads * d}, q.options());
  by_dtype(q, [&](auto* tag) {
    using Act = std::remove_pointer_t<decltype(tag)>;
    decode_attention_rows<Act>(q.data_ptr<Act>(), q.stride(0), k_cache.data_ptr<Act>(), v_cache.data_ptr<Act>(), tp,
                               tables.size(1), lp, block_size, q.size(0), heads, kv_heads, d, scale, window,
                               out.data_ptr<Act>());
  });
  return out;
}

// k, v [T, kv_heads, d] (rows may be strided, as slices of the fused qkv output) into their cache
// slots: the two index_copy_ calls of the reference, in one call.
void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.scalar_type() == k_cache.scalar_type() &&
                  v.scalar_type() == v_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "k and v must be [T, kv_heads, d] of the caches' dtype");
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(2) == 1 && v.stride(1) == v.size(2),
              "k and v rows must be contiguous [kv_heads, d]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.dim() == 4 && k_cache.size(2) * k_cache.size(3) == k.size(1) * k.size(2),
              "caches must be contiguous [blocks, block_size, kv_heads, d] matching k");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.dim() == 1 && slots.numel() == k.size(0),
              "slot_mapping must be int64 [T]");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t row_bytes = k.size(1) * k.size(2) * k.element_size();
  auto s = slots.contiguous();
  const int64_t* sp = s.data_ptr<int64_t>();
  auto* kc = (char*)k_cache.data_ptr();
  auto* vc = (char*)v_cache.data_ptr();
  const auto* kp = (const char*)k.data_ptr();
  const auto* vp = (const char*)v.data_ptr();
  for (int64_t t = 0; t < k.size(0); ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "slot ", sp[t], " out of range");
    std::memcpy(kc + sp[t] * row_bytes, kp + t * k.stride(0) * k.element_size(), row_bytes);
    std::memcpy(vc + sp[t] * row_bytes, vp + t * v.stride(0) * v.element_size(), row_bytes);
  }
}

// A decoder layer's attention for one new token per sequence, from the fused q/k/v projection
// qkv [T, (heads + 2 kv_heads) d]: rotary on q and k in place, k and v into their cache slots, then
// decode_attention. One call where the layer would make a dozen small ones (the Python glue
// between them costs more than their arithmetic at batch 1).
torch::Tensor decode_attention_block(torch::Tensor qkv, int64_t heads, int64_t kv_heads, torch::Tensor cos,
                                     torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor slots, torch::Tensor block_tables, torch::Tensor context_lens,
                                     double scale, int64_t window) {
  const int64_t d = k_cache.size(3);
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) == (heads + 2 * kv_heads) * d,
              "qkv must be [T, (heads + 2 kv_heads) head_dim] with contiguous rows");
  const int64_t tokens = qkv.size(0);
  auto qk = qkv.narrow(1, 0, (heads + kv_heads) * d).view({tokens, heads + kv_heads, d});
  rotary_(qk, cos, sin);
  auto v = qkv.narrow(1, (heads + kv_heads) * d, kv_heads * d).view({tokens, kv_heads, d});
  store_kv(qk.narrow(1, heads, kv_heads), v, k_cache, v_cache, slots);
  return decode_attention(qk.narrow(1, 0, heads), k_cache, v_cache, block_tables, context_lens, scale, window);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention_block", &decode_attention_block,
        "rotary, KV store and paged decode attention of one layer, from its qkv projection");
  m.def("store_kv", &store_kv, "k, v rows into their paged cache slots");
  m.def("rms_norm", &rms_norm, "RMSNorm, optionally of x + residual (see fused_ops.cpp)");
  m.def("rotary_", &rotary_, "rotary embedding, in place");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up");
  m.def("decode_attention", &decode_attention, "one query per sequence over the paged KV cache");
}
