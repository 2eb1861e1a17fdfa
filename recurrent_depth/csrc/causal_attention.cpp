// Causal self-attention on CPU for training: forward (output and per-row log-sum-exp) and backward.
//
//   rdepth::causal_attention(q, k, v, scale) -> (out, lse)
//   rdepth::causal_attention_backward(grad_out, q, k, v, out, lse, scale) -> (dq, dk, dv)
//   rdepth::rope_attention(qkv, bias, cos, sin, scale) -> (out, lse)
//   rdepth::rope_attention_backward(grad_out, qkv, bias, cos, sin, out, lse, scale) -> (dqkv, dbias)
//
// q, k, v: (B, T, H, D) fp32 on CPU, any strides with a contiguous last dim (so views of a fused qkv projection
// need no copy); out, dq, dk, dv: (B, T, H, D) contiguous; lse: (B, H, T). Query t sees keys 0..t.
//
// Per (batch, head) and per block of 64 query rows starting at r0, the scores are computed only against the keys
// the block can see (0 .. r0 + 64), so a causal forward does about (n + 1) / 2n of the full product's work for n
// blocks, where PyTorch's CPU flash kernel (key blocks of 512) computes all of it at these lengths. The softmax is
// exact (a block's row holds all its visible keys), normalised after the value product. The backward recomputes
// the probabilities from the saved log-sum-exp. rope_attention takes the fused projection (B, T, 3, H, D) instead:
// per (batch, head) it adds the q/k bias and applies RoPE into a small contiguous buffer, then attends as above; its
// backward recomputes that buffer, and writes dqkv in one piece with the rotation undone (see check_rope).
// Products go to the BLAS sgemm that libtorch exports (MKL in the x86 wheels), or to at::mm when the symbol is absent.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace {

constexpr int64_t kBlock = 64;  // query rows per block

// Row-major C (M x N) = alpha * op(A) * op(B) + beta * C, op = transpose when ta / tb.
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (sgemm_ != nullptr) {  // column-major: C^T = op(B)^T op(A)^T
    const char a = tb ? 'T' : 'N', b = ta ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    sgemm_(&a, &b, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  auto a = ta ? at::from_blob(const_cast<float*>(A), {K, M}, {lda, 1}, opts).t()
              : at::from_blob(const_cast<float*>(A), {M, K}, {lda, 1}, opts);
  auto b = tb ? at::from_blob(const_cast<float*>(B), {N, K}, {ldb, 1}, opts).t()
              : at::from_blob(const_cast<float*>(B), {K, N}, {ldb, 1}, opts);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (beta == 0.0f) {
    at::mm_out(c, a, b);
    if (alpha != 1.0f) c.mul_(alpha);
  } else {
    c.mul_(beta).addmm_(a, b, 1.0f, alpha);
  }
}

#if defined(__AVX512F__)
// exp for x <= 0 (inputs below -87 give about 1e-38 instead of 0): Cephes' expf polynomial, 2^n by scalef.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
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
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}
#endif

float row_max(const float* x, int64_t n) {
#if defined(__AVX512F__)
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    m = _mm512_mask_max_ps(m, k, m, _mm512_maskz_loadu_ps(k, x + i));
  }
  return _mm512_reduce_max_ps(m);
#else
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
#endif
}

// x[i] = exp(x[i] - sub) for i < n; returns their sum.
float exp_shift(float* x, int64_t n, float sub) {
#if defined(__AVX512F__)
  const __m512 s = _mm512_set1_ps(sub);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), s));
    _mm512_mask_storeu_ps(x + i, k, e);
    acc = _mm512_mask_add_ps(acc, k, acc, e);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - sub);
    acc += x[i];
  }
  return acc;
#endif
}

float dot(const float* a, const float* b, int64_t n) {
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + i), _mm512_maskz_loadu_ps(k, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
#endif
}

// ds[i] = p[i] * (ds[i] - delta)
void softmax_grad(const float* p, float* ds, int64_t n, float delta) {
#if defined(__AVX512F__)
  const __m512 d = _mm512_set1_ps(delta);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p + i), _mm512_sub_ps(_mm512_maskz_loadu_ps(k, ds + i), d));
    _mm512_mask_storeu_ps(ds + i, k, v);
  }
#else
  for (int64_t i = 0; i < n; ++i) ds[i] = p[i] * (ds[i] - delta);
#endif
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "causal_attention: q must be (B, T, H, D), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "causal_attention: q, k, v shapes differ: ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat,
                "causal_attention: q, k, v must be float32 CPU tensors");
    TORCH_CHECK(t->stride(3) == 1, "causal_attention: the last dim of q, k, v must be contiguous");
  }
}

struct Rows {  // one (batch, head): its row pointer and row stride
  const float* p;
  int64_t ld;
};

inline Rows rows(const at::Tensor& t, int64_t b, int64_t h) {
  return {t.data_ptr<float>() + b * t.stride(0) + h * t.stride(2), t.stride(1)};
}

// One (batch, head): O (T x D, row stride ldo) and L (T) from Q, K, V (T x D each, row strides given).
void forward_head(const float* Q, int64_t ldq, const float* K, int64_t ldk, const float* V, int64_t ldv, float* O,
                  int64_t ldo, float* L, int64_t T, int64_t D, float sc, float* S, float* inv) {
  for (int64_t r0 = 0; r0 < T; r0 += kBlock) {
    const int64_t m = std::min(kBlock, T - r0), n = r0 + m;
    gemm_rm(false, true, m, n, D, sc, Q + r0 * ldq, ldq, K, ldk, 0.0f, S, n);
    for (int64_t j = 0; j < m; ++j) {
      float* row = S + j * n;
      const int64_t valid = r0 + j + 1;
      const float mx = row_max(row, valid);
      const float sum = exp_shift(row, valid, mx);
      std::fill(row + valid, row + n, 0.0f);
      L[r0 + j] = mx + std::log(sum);
      inv[j] = 1.0f / sum;
    }
    gemm_rm(false, false, m, D, n, 1.0f, S, n, V, ldv, 0.0f, O + r0 * ldo, ldo);
    for (int64_t j = 0; j < m; ++j) {
      float* o = O + (r0 + j) * ldo;
      for (int64_t c = 0; c < D; ++c) o[c] *= inv[j];
    }
  }
}

// One (batch, head) backward: dQ, dK, dV (T x D, row strides given; dK and dV are overwritten, not accumulated)
// from dO and O (row stride ld), L, Q, K, V. P, dS: kBlock * T scratch; delta: T scratch.
void backward_head(const float* dO, const float* O, int64_t ld, const float* L, const float* Q, int64_t ldq,
                   const float* K, int64_t ldk, const float* V, int64_t ldv, float* dQ, int64_t lddq, float* dK,
                   int64_t lddk, float* dV, int64_t lddv, int64_t T, int64_t D, float sc, float* P, float* dS,
                   float* delta) {
  for (int64_t t = 0; t < T; ++t) delta[t] = dot(dO + t * ld, O + t * ld, D);
  // last block first: it sees every key, so its products initialise dK and dV (beta = 0)
  const int64_t last = ((T - 1) / kBlock) * kBlock;
  for (int64_t r0 = last; r0 >= 0; r0 -= kBlock) {
    const int64_t m = std::min(kBlock, T - r0), n = r0 + m;
    const float beta = r0 == last ? 0.0f : 1.0f;
    gemm_rm(false, true, m, n, D, sc, Q + r0 * ldq, ldq, K, ldk, 0.0f, P, n);
    for (int64_t j = 0; j < m; ++j) {
      float* row = P + j * n;
      const int64_t valid = r0 + j + 1;
      exp_shift(row, valid, L[r0 + j]);
      std::fill(row + valid, row + n, 0.0f);
    }
    gemm_rm(true, false, n, D, m, 1.0f, P, n, dO + r0 * ld, ld, beta, dV, lddv);
    gemm_rm(false, true, m, n, D, 1.0f, dO + r0 * ld, ld, V, ldv, 0.0f, dS, n);
    for (int64_t j = 0; j < m; ++j) softmax_grad(P + j * n, dS + j * n, n, delta[r0 + j]);
    gemm_rm(false, false, m, D, n, sc, dS, n, K, ldk, 0.0f, dQ + r0 * lddq, lddq);
    gemm_rm(true, false, n, D, m, sc, dS, n, Q + r0 * ldq, ldq, beta, dK, lddk);
  }
}

std::tuple<at::Tensor, at::Tensor> causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     double scale) {
  check_qkv(q, k, v);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  auto out = at::empty({B, T, H, D}, q.options());
  auto lse = at::empty({B, H, T}, q.options());
  if (out.numel() == 0) return {out, lse};
  const float sc = static_cast<float>(scale);
  float* O = out.data_ptr<float>();
  float* L = lse.data_ptr<float>();
  const int64_t ldo = H * D;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(kBlock * T), inv(kBlock);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / H, h = u % H;
      const Rows Q = rows(q, b, h), K = rows(k, b, h), V = rows(v, b, h);
      forward_head(Q.p, Q.ld, K.p, K.ld, V.p, V.ld, O + b * T * ldo + h * D, ldo, L + u * T, T, D, sc, S.data(),
                   inv.data());
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double scale) {
  check_qkv(q, k, v);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "causal_attention_backward: grad_out and out must be (B, T, H, D) like q");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == T,
              "causal_attention_backward: lse must be (B, H, T)");
  const auto go = grad_out.to(at::kFloat).contiguous(), o = out.contiguous(), l = lse.contiguous();
  auto dq = at::empty({B, T, H, D}, q.options()), dk = at::empty_like(dq), dv = at::empty_like(dq);
  if (dq.numel() == 0) return {dq, dk, dv};
  const float sc = static_cast<float>(scale);
  const int64_t ld = H * D;  // rows of go, o, dq, dk, dv
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> P(kBlock * T), dS(kBlock * T), delta(T);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / H, h = u % H;
      const Rows Q = rows(q, b, h), K = rows(k, b, h), V = rows(v, b, h);
      const int64_t off = b * T * ld + h * D;
      backward_head(go.data_ptr<float>() + off, o.data_ptr<float>() + off, ld, l.data_ptr<float>() + u * T, Q.p,
                    Q.ld, K.p, K.ld, V.p, V.ld, dq.data_ptr<float>() + off, ld, dk.data_ptr<float>() + off, ld,
                    dv.data_ptr<float>() + off, ld, T, D, sc, P.data(), dS.data(), delta.data());
    }
  });
  return {dq, dk, dv};
}

// ------------------------------------------------------------------------------- RoPE + causal attention
// qkv: (B, T, 3, H, D), the fused projection's output viewed per head (last dim contiguous), with q and k in "pair
// order": each head's even dims first, then its odd dims (a = x[:D/2], b = x[D/2:]). bias: (2, H, D) in the same
// order, or undefined. cos, sin: (1 or B, T, D/2) contiguous. Rotation per token t: [a c - b s, b c + a s].
void check_rope(const at::Tensor& qkv, const c10::optional<at::Tensor>& bias, const at::Tensor& cos,
                const at::Tensor& sin) {
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(2) == 3, "rope_attention: qkv must be (B, T, 3, H, D), got ", qkv.sizes());
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && qkv.stride(4) == 1,
              "rope_attention: qkv must be a float32 CPU tensor with a contiguous last dim");
  const int64_t B = qkv.size(0), T = qkv.size(1), H = qkv.size(3), D = qkv.size(4);
  TORCH_CHECK(D % 2 == 0, "rope_attention: the head dim must be even, got ", D);
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->dim() == 3 && bias->size(0) == 2 && bias->size(1) == H && bias->size(2) == D &&
                    bias->is_contiguous() &&
                    bias->scalar_type() == at::kFloat,
                "rope_attention: bias must be a contiguous float32 (2, H, D) tensor, got ", bias->sizes());
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->dim() == 3 && (t->size(0) == 1 || t->size(0) == B) && t->size(1) == T && t->size(2) == D / 2 &&
                    t->is_contiguous() && t->scalar_type() == at::kFloat,
                "rope_attention: cos and sin must be contiguous float32 (1 or B, T, D/2) tensors, got ", t->sizes());
}

// RoPE on the rows of one (batch, head) of q or k, pair order: (a, b) = (x[:D/2], x[D/2:]) -> (a c - b s, b c + a s).
// Forward (kInverse false): dst = rotate(src + bias), the bias added when kBias. Backward (kInverse true): dst = the
// rotation's transpose applied to src (the same with -s), and when kBias, grad (the bias gradient) += dst's column
// sums. src and dst rows are lds and ldd apart. Templated so that the inner loop has no branch (it vectorises).
template <bool kInverse, bool kBias>
void rope_rows(const float* __restrict src, int64_t lds, float* __restrict dst, int64_t ldd,
               const float* __restrict bias, float* __restrict grad, const float* __restrict c,
               const float* __restrict s, int64_t T, int64_t D) {
  const int64_t half = D / 2;
  const float sign = kInverse ? -1.0f : 1.0f;
  for (int64_t t = 0; t < T; ++t) {
    const float* x = src + t * lds;
    const float* ct = c + t * half;
    const float* st = s + t * half;
    float* y = dst + t * ldd;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float a = kBias && !kInverse ? x[i] + bias[i] : x[i];
      const float b = kBias && !kInverse ? x[half + i] + bias[half + i] : x[half + i];
      const float sn = sign * st[i];
      y[i] = a * ct[i] - b * sn;
      y[half + i] = b * ct[i] + a * sn;
      if (kBias && kInverse) {
        grad[i] += y[i];
        grad[half + i] += y[half + i];
      }
    }
  }
}

// Forward rotation into a contiguous T x D buffer, with the bias (this head's D values) when given.
void rotate_head(const float* src, int64_t lds, const float* bias, const float* c, const float* s, float* dst,
                 int64_t T, int64_t D) {
  if (bias)
    rope_rows<false, true>(src, lds, dst, D, bias, nullptr, c, s, T, D);
  else
    rope_rows<false, false>(src, lds, dst, D, nullptr, nullptr, c, s, T, D);
}

// Backward: dst (rows ldd apart) = the rotation undone on g (T x D, contiguous); gb += its column sums when given.
void unrotate_head(const float* g, const float* c, const float* s, float* dst, int64_t ldd, float* gb, int64_t T,
                   int64_t D) {
  if (gb)
    rope_rows<true, true>(g, D, dst, ldd, nullptr, gb, c, s, T, D);
  else
    rope_rows<true, false>(g, D, dst, ldd, nullptr, nullptr, c, s, T, D);
}

// The fused projection of one rope_attention call, read per (batch, head).
struct RopeInput {
  const float* X;
  int64_t sb, st, sw, sh, cs, H, T, D;
  const float* bias;  // (2, H, D) or null
  const float* cos;
  const float* sin;

  RopeInput(const at::Tensor& qkv, const c10::optional<at::Tensor>& b, const at::Tensor& c, const at::Tensor& s)
      : X(qkv.data_ptr<float>()), sb(qkv.stride(0)), st(qkv.stride(1)), sw(qkv.stride(2)), sh(qkv.stride(3)),
        cs(c.size(0) == 1 ? 0 : qkv.size(1) * (qkv.size(4) / 2)), H(qkv.size(3)), T(qkv.size(1)), D(qkv.size(4)),
        bias(b.has_value() && b->defined() ? b->data_ptr<float>() : nullptr), cos(c.data_ptr<float>()),
        sin(s.data_ptr<float>()) {}

  // Rotates q and k of (b, h) into Qr and Kr (T x D each); returns v's rows (st apart) and this row's cos/sin.
  const float* load(int64_t b, int64_t h, float* Qr, float* Kr, const float** c, const float** s) const {
    const float* base = X + b * sb + h * sh;
    *c = cos + b * cs;
    *s = sin + b * cs;
    rotate_head(base, st, bias ? bias + h * D : nullptr, *c, *s, Qr, T, D);
    rotate_head(base + sw, st, bias ? bias + (H + h) * D : nullptr, *c, *s, Kr, T, D);
    return base + 2 * sw;
  }
};

std::tuple<at::Tensor, at::Tensor> rope_attention(const at::Tensor& qkv, const c10::optional<at::Tensor>& bias,
                                                   const at::Tensor& cos, const at::Tensor& sin, double scale) {
  check_rope(qkv, bias, cos, sin);
  const int64_t B = qkv.size(0), T = qkv.size(1), H = qkv.size(3), D = qkv.size(4);
  auto out = at::empty({B, T, H, D}, qkv.options());
  auto lse = at::empty({B, H, T}, qkv.options());
  if (out.numel() == 0) return {out, lse};
  const float sc = static_cast<float>(scale);
  const RopeInput in(qkv, bias, cos, sin);
  float* O = out.data_ptr<float>();
  float* L = lse.data_ptr<float>();
  const int64_t ldo = H * D;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(kBlock * T), inv(kBlock), Qr(T * D), Kr(T * D);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / H, h = u % H;
      const float *c, *s;
      const float* V = in.load(b, h, Qr.data(), Kr.data(), &c, &s);
      forward_head(Qr.data(), D, Kr.data(), D, V, in.st, O + b * T * ldo + h * D, ldo, L + u * T, T, D, sc,
                   S.data(), inv.data());
    }
  });
  return {out, lse};
}

// -> (dqkv (B, T, 3, H, D) contiguous, dbias (2, H, D), zeros when there is no bias)
std::tuple<at::Tensor, at::Tensor> rope_attention_backward(const at::Tensor& grad_out, const at::Tensor& qkv,
                                                           const c10::optional<at::Tensor>& bias,
                                                           const at::Tensor& cos, const at::Tensor& sin,
                                                           const at::Tensor& out, const at::Tensor& lse,
                                                           double scale) {
  check_rope(qkv, bias, cos, sin);
  const int64_t B = qkv.size(0), T = qkv.size(1), H = qkv.size(3), D = qkv.size(4);
  const std::vector<int64_t> shape{B, T, H, D};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(shape) && out.sizes() == at::IntArrayRef(shape),
              "rope_attention_backward: grad_out and out must be (B, T, H, D)");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == T,
              "rope_attention_backward: lse must be (B, H, T)");
  const auto go = grad_out.to(at::kFloat).contiguous(), o = out.contiguous(), l = lse.contiguous();
  auto dqkv = at::empty({B, T, 3, H, D}, qkv.options());
  const RopeInput in(qkv, bias, cos, sin);
  if (dqkv.numel() == 0) return {dqkv, at::zeros({2, H, D}, qkv.options())};
  // with a bias: its gradient per (batch, head), summed over the batch at the end
  auto partial = in.bias ? at::zeros({B * H, 2, D}, qkv.options()) : at::Tensor();
  const float sc = static_cast<float>(scale);
  const int64_t ld = H * D, ldx = 3 * H * D;  // rows of go and o; rows of dqkv
  float* G = dqkv.data_ptr<float>();
  float* PB = in.bias ? partial.data_ptr<float>() : nullptr;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> P(kBlock * T), dS(kBlock * T), delta(T), Qr(T * D), Kr(T * D), dQ(T * D), dK(T * D);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / H, h = u % H;
      const float *c, *s;
      const float* V = in.load(b, h, Qr.data(), Kr.data(), &c, &s);
      const int64_t off = b * T * ld + h * D;
      float* g = G + b * T * ldx + h * D;  // this head's q row; k at + ld, v at + 2 ld
      backward_head(go.data_ptr<float>() + off, o.data_ptr<float>() + off, ld, l.data_ptr<float>() + u * T,
                    Qr.data(), D, Kr.data(), D, V, in.st, dQ.data(), D, dK.data(), D, g + 2 * ld, ldx, T, D, sc,
                    P.data(), dS.data(), delta.data());
      unrotate_head(dQ.data(), c, s, g, ldx, PB ? PB + u * 2 * D : nullptr, T, D);
      unrotate_head(dK.data(), c, s, g + ld, ldx, PB ? PB + u * 2 * D + D : nullptr, T, D);
    }
  });
  if (!in.bias) return {dqkv, at::zeros({2, H, D}, qkv.options())};
  return {dqkv, partial.view({B, H, 2, D}).sum(0).permute({1, 0, 2}).contiguous()};  // (B, H, 2, D) -> (2, H, D)
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rdepth, m) {
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("causal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale) -> (Tensor, Tensor, Tensor)");
  m.def("rope_attention(Tensor qkv, Tensor? bias, Tensor cos, Tensor sin, float scale) -> (Tensor, Tensor)");
  m.def("rope_attention_backward(Tensor grad_out, Tensor qkv, Tensor? bias, Tensor cos, Tensor sin, Tensor out, "
        "Tensor lse, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rdepth, CPU, m) {
  m.impl("causal_attention", &causal_attention);
  m.impl("causal_attention_backward", &causal_attention_backward);
  m.impl("rope_attention", &rope_attention);
  m.impl("rope_attention_backward", &rope_attention_backward);
}
