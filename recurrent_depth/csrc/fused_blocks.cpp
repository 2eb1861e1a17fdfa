// Fused forward of sandwich blocks for a few new tokens per row with a KV cache (decoding: T = 1; short prefills and
// speculative verification: T > 1), fp32 on the CPU.
//
// One call runs a stage of the network on x (B, T, d): the prelude's or the coda's blocks, or `n_steps` recurrences of
// the core (adapter, then its blocks, repeated). Everything runs here in plain loops: RMSNorm, q/k bias,
// interleaved-pair RoPE, the KV write, masked softmax attention over the cached positions, the SiLU gate, residuals,
// and, for a few rows, the matrix-vector products (more rows go to ATen's GEMM), so a decode token costs a handful
// of Python-to-C++ calls instead of about forty small tensor operations per layer. Registered as
// torch.ops.rdepth.blocks; built on first use by recurrent_depth/inference/fused.py, which falls back to the eager
// network when no compiler is available.
//
// Arguments:
//   x        (B, T, d) input of the first block, or with `adapter` (d, 2d) and `e` (B, T, d) the state of the core:
//            each of the n_steps recurrences runs the blocks on adapter([x, e])
//   weights  9 tensors per block: norm_1 (d), Wqkv (3d, d), qk_bias (2, H*D) or empty, attn.proj (d, d), norm_2 (d),
//            norm_3 (d), mlp.fc (2I, d), mlp.proj (d, I), norm_4 (d)
//   kslots, vslots  one (B, H, C, D) cache slot per (step, block), step-major; token t's key and value are written
//            at position pos + t, and it attends causally to positions 0 .. pos + t
//   masks    one per (step, block): empty (every such position visible), or a bool tensor of visible keys, (B, S)
//            for all tokens of a row or (B, T, S) per token, S = pos + T; a token always sees itself
//   rope     (B or 1, T, D/2, 2) cos/sin of each token's position
//   rows     optional (B,) int64: x row b reads and writes cache row rows[b] (a subset of a larger batch: rows still
//            iterating under adaptive exit, rows still generating); without it x row b is cache row b
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kGemmRows = 16;  // at most this many rows: our loops; more: ATen's GEMM

// exp(x) for x in float range, arithmetic only so that loops over it vectorise: x = n ln2 + r (Cody-Waite split),
// exp(r) by a degree-6 polynomial (Cephes' expf coefficients), times 2^n built in the exponent bits. Within about
// 2 ulp of std::exp; inputs are clamped to [-87.3, 88.7] (exp(-87.3) ~ 1e-38 stands in for anything smaller).
#pragma omp declare simd notinbranch
inline float exp_approx(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#ifdef __AVX512F__
// y[b0:b0+4, n:n+4] = x[b0:b0+4] @ W[n:n+4]^T for K a multiple of 16: sixteen 512-bit accumulators, each weight and
// x vector loaded once per 16 products, one horizontal sum per output at the end.
inline void block4x4(const float* x, const float* W, float* y, int64_t N, int64_t K, int64_t b0, int64_t n) {
  __m512 acc[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  const float* w = W + n * K;
  const float* xs = x + b0 * K;
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 w0 = _mm512_loadu_ps(w + k), w1 = _mm512_loadu_ps(w + K + k);
    const __m512 w2 = _mm512_loadu_ps(w + 2 * K + k), w3 = _mm512_loadu_ps(w + 3 * K + k);
    for (int i = 0; i < 4; ++i) {
      const __m512 xv = _mm512_loadu_ps(xs + i * K + k);
      acc[i][0] = _mm512_fmadd_ps(xv, w0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(xv, w1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(xv, w2, acc[i][2]);
      acc[i][3] = _mm512_fmadd_ps(xv, w3, acc[i][3]);
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) y[(b0 + i) * N + n + j] = _mm512_reduce_add_ps(acc[i][j]);
}
#endif

// y[:, n0:n1] = x (B, K) @ W[n0:n1]^T with W (N, K) row-major and y (B, N): eight weight rows at a time (kept in L1
// while every x row passes over them), so each weight is read from memory once for all B rows.
void linear_rows(const float* x, const float* W, float* y, int64_t B, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 8 <= n1; n += 8) {
    const float* w0 = W + n * K;
    const float* w1 = w0 + K;
    const float* w2 = w1 + K;
    const float* w3 = w2 + K;
    const float* w4 = w3 + K;
    const float* w5 = w4 + K;
    const float* w6 = w5 + K;
    const float* w7 = w6 + K;
    int64_t b = 0;
#ifdef __AVX512F__
    if (K % 16 == 0) {
      for (; b + 4 <= B; b += 4) {  // four x rows at a time against each half of the block
        block4x4(x, W, y, N, K, b, n);
        block4x4(x, W, y, N, K, b, n + 4);
      }
    }
#endif
    for (; b + 2 <= B; b += 2) {  // two x rows against the eight weight rows: 16 independent accumulators
      const float* xa = x + b * K;
      const float* xc = xa + K;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, a4 = 0.f, a5 = 0.f, a6 = 0.f, a7 = 0.f;
      float c0 = 0.f, c1 = 0.f, c2 = 0.f, c3 = 0.f, c4 = 0.f, c5 = 0.f, c6 = 0.f, c7 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7, c0, c1, c2, c3, c4, c5, c6, c7)
      for (int64_t k = 0; k < K; ++k) {
        const float xv = xa[k], xw = xc[k];
        const float v0 = w0[k], v1 = w1[k], v2 = w2[k], v3 = w3[k], v4 = w4[k], v5 = w5[k], v6 = w6[k], v7 = w7[k];
        a0 += xv * v0;
        a1 += xv * v1;
        a2 += xv * v2;
        a3 += xv * v3;
        a4 += xv * v4;
        a5 += xv * v5;
        a6 += xv * v6;
        a7 += xv * v7;
        c0 += xw * v0;
        c1 += xw * v1;
        c2 += xw * v2;
        c3 += xw * v3;
        c4 += xw * v4;
        c5 += xw * v5;
        c6 += xw * v6;
        c7 += xw * v7;
      }
      float* ya = y + b * N + n;
      float* yc = ya + N;
      ya[0] = a0;
      ya[1] = a1;
      ya[2] = a2;
      ya[3] = a3;
      ya[4] = a4;
      ya[5] = a5;
      ya[6] = a6;
      ya[7] = a7;
      yc[0] = c0;
      yc[1] = c1;
      yc[2] = c2;
      yc[3] = c3;
      yc[4] = c4;
      yc[5] = c5;
      yc[6] = c6;
      yc[7] = c7;
    }
    for (; b < B; ++b) {
      const float* xb = x + b * K;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, a4 = 0.f, a5 = 0.f, a6 = 0.f, a7 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7)
      for (int64_t k = 0; k < K; ++k) {
        const float xv = xb[k];
        a0 += xv * w0[k];
        a1 += xv * w1[k];
        a2 += xv * w2[k];
        a3 += xv * w3[k];
        a4 += xv * w4[k];
        a5 += xv * w5[k];
        a6 += xv * w6[k];
        a7 += xv * w7[k];
      }
      float* yb = y + b * N + n;
      yb[0] = a0;
      yb[1] = a1;
      yb[2] = a2;
      yb[3] = a3;
      yb[4] = a4;
      yb[5] = a5;
      yb[6] = a6;
      yb[7] = a7;
    }
  }
  for (; n < n1; ++n) {
    const float* w0 = W + n * K;
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + b * K;
      float a0 = 0.f;
#pragma omp simd reduction(+ : a0)
      for (int64_t k = 0; k < K; ++k) a0 += xb[k] * w0[k];
      y[b * N + n] = a0;
    }
  }
}

// out (B, N) = in (B, K) @ W^T; the weight rows are split across ATen's intra-op threads (torch.set_num_threads).
void linear(const at::Tensor& in, const at::Tensor& W, at::Tensor& out) {
  const int64_t B = in.size(0), N = W.size(0), K = W.size(1);
  if (B > kGemmRows) {
    at::mm_out(out, in, W.t());
    return;
  }
  const float* x = in.data_ptr<float>();
  const float* w = W.data_ptr<float>();
  float* y = out.data_ptr<float>();
  const int64_t blocks = (N + 7) / 8;
  // at least 256 KiB of weights per task: smaller products stay on one thread, where a fork and join would cost
  // about what splitting them saves (measured on the `small` preset at 2 threads: 1 MiB 51, 256 KiB 68, 64 KiB 63
  // tokens/s)
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / (8 * 4 * std::max<int64_t>(K, 1)));
  at::parallel_for(0, blocks, grain, [&](int64_t lo, int64_t hi) {
    linear_rows(x, w, y, B, N, K, lo * 8, std::min(hi * 8, N));
  });
}

void rms_norm_rows(const float* in, const float* w, float* out, int64_t rows, int64_t d, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = in + r * d;
    float* o = out + r * d;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < d; ++i) ss += a[i] * a[i];
    const float scale = 1.f / std::sqrt(ss / static_cast<float>(d) + static_cast<float>(eps));
    for (int64_t i = 0; i < d; ++i) o[i] = (a[i] * scale) * w[i];
  }
}

// out = rms_norm(a + b) * w; the sum is written to `sum` (scratch).
void add_rms_norm_rows(const float* a, const float* b, const float* w, float* sum, float* out, int64_t rows,
                       int64_t d, double eps) {
  for (int64_t r = 0; r < rows * d; ++r) sum[r] = a[r] + b[r];
  rms_norm_rows(sum, w, out, rows, d, eps);
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "rdepth.blocks: ", name,
              " must be a contiguous fp32 CPU tensor");
}

at::Tensor blocks(const at::Tensor& x_arg, const c10::optional<at::Tensor>& e, const c10::optional<at::Tensor>& adapter,
                  int64_t n_steps, at::TensorList weights, at::TensorList kslots, at::TensorList vslots, int64_t pos,
                  at::TensorList masks, const at::Tensor& rope, double eps, int64_t n_heads,
                  const c10::optional<at::Tensor>& rows) {
  check_f32(x_arg, "x");
  check_f32(rope, "rope");
  TORCH_CHECK(x_arg.dim() == 3, "rdepth.blocks: x must be (B, T, d)");
  TORCH_CHECK(n_steps >= 1, "rdepth.blocks: n_steps must be at least 1");
  TORCH_CHECK(pos >= 0, "rdepth.blocks: pos must be >= 0");
  const int64_t L = static_cast<int64_t>(weights.size()) / 9;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 9 * L && L >= 1, "rdepth.blocks: expected 9 weights per block");
  TORCH_CHECK(static_cast<int64_t>(kslots.size()) == n_steps * L &&
                  static_cast<int64_t>(vslots.size()) == n_steps * L &&
                  static_cast<int64_t>(masks.size()) == n_steps * L,
              "rdepth.blocks: expected one k slot, one v slot and one mask per step and block");
  TORCH_CHECK(adapter.has_value() || n_steps == 1, "rdepth.blocks: several steps need the core's adapter");
  const int64_t B = x_arg.size(0), T = x_arg.size(1), d = x_arg.size(2), R = B * T;
  const int64_t H = n_heads, D = d / n_heads, S = pos + T;
  const int64_t half = D / 2;
  TORCH_CHECK(T >= 1 && H >= 1 && D * H == d && D % 2 == 0,
              "rdepth.blocks: n_heads must divide d into even head sizes");
  TORCH_CHECK(rope.dim() == 4 && (rope.size(0) == 1 || rope.size(0) == B) && rope.size(1) == T &&
                  rope.size(2) == half && rope.size(3) == 2,
              "rdepth.blocks: rope must be (B or 1, T, D/2, 2)");
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = weights.data() + 9 * l;
    for (int j = 0; j < 9; ++j) {
      if (j == 2 && w[j].numel() == 0) continue;
      check_f32(w[j], "a block weight");
    }
    TORCH_CHECK(w[1].size(0) == 3 * d && w[1].size(1) == d && w[3].size(0) == d && w[3].size(1) == d &&
                    w[6].size(1) == d && w[7].size(0) == d && w[7].size(1) * 2 == w[6].size(0),
                "rdepth.blocks: block weights do not fit d = ", d);
  }
  at::Tensor xe;
  if (adapter.has_value()) {
    TORCH_CHECK(e.has_value() && e->sizes() == x_arg.sizes(), "rdepth.blocks: the adapter needs e shaped like x");
    check_f32(*e, "e");
    check_f32(*adapter, "adapter");
    TORCH_CHECK(adapter->size(0) == d && adapter->size(1) == 2 * d, "rdepth.blocks: adapter must be (d, 2d)");
    xe = at::empty({R, 2 * d}, x_arg.options());  // [state | e]
    float* xep = xe.data_ptr<float>();
    const float* ep = e->data_ptr<float>();
    for (int64_t r = 0; r < R; ++r)
      for (int64_t i = 0; i < d; ++i) xep[r * 2 * d + d + i] = ep[r * d + i];
  }
  const int64_t* rowp = nullptr;  // x row b lives in cache row rowp[b] (all rows in order without `rows`)
  if (rows.has_value()) {
    TORCH_CHECK(rows->device().is_cpu() && rows->scalar_type() == at::kLong && rows->is_contiguous() &&
                    rows->dim() == 1 && rows->size(0) == B,
                "rdepth.blocks: rows must be a contiguous int64 tensor of B cache row indices");
    rowp = rows->data_ptr<int64_t>();
  }
  int64_t row_end = B;  // one past the largest cache row read or written
  if (rowp != nullptr) {
    row_end = 0;
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(rowp[b] >= 0, "rdepth.blocks: a row index is outside the cache");
      row_end = std::max(row_end, rowp[b] + 1);
    }
  }
  for (int64_t i = 0; i < n_steps * L; ++i) {
    const at::Tensor& ks = kslots[i];
    const at::Tensor& vs = vslots[i];
    check_f32(ks, "k slot");
    check_f32(vs, "v slot");
    TORCH_CHECK(ks.dim() == 4 && (rowp != nullptr || ks.size(0) == B) && ks.size(1) == H && ks.size(3) == D &&
                    ks.size(2) >= S && vs.sizes() == ks.sizes(),
                "rdepth.blocks: cache slots must be (B, H, C >= pos + T, D)");
    TORCH_CHECK(row_end <= ks.size(0), "rdepth.blocks: a row index is outside the cache");
    const at::Tensor& mask = masks[i];
    if (mask.numel() > 0) {
      TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.size(0) == B &&
                      ((mask.dim() == 2 && mask.size(1) == S) ||
                       (mask.dim() == 3 && mask.size(1) == T && mask.size(2) == S)),
                  "rdepth.blocks: a mask must be a contiguous bool tensor (B, pos + T) or (B, T, pos + T)");
    }
  }
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t I = weights[6].size(0) / 2;

  at::Tensor x = x_arg.reshape({R, d}).clone();  // the residual stream (R = B * T rows, d)
  at::Tensor h = at::empty({R, d}, x.options());
  at::Tensor y = at::empty({R, d}, x.options());
  at::Tensor o = at::empty({R, d}, x.options());
  at::Tensor qkv = at::empty({R, 3 * d}, x.options());
  at::Tensor gu = at::empty({R, 2 * I}, x.options());
  at::Tensor a = at::empty({R, I}, x.options());
  std::vector<float> scores(S);
  float* xp = x.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* op = o.data_ptr<float>();
  float* qp = qkv.data_ptr<float>();
  float* gp = gu.data_ptr<float>();
  float* ap = a.data_ptr<float>();
  const float* rp = rope.data_ptr<float>();

  for (int64_t step = 0; step < n_steps; ++step) {
    if (adapter.has_value()) {  // x = adapter([x, e])
      float* xep = xe.data_ptr<float>();
      for (int64_t r = 0; r < R; ++r)
        for (int64_t i = 0; i < d; ++i) xep[r * 2 * d + i] = xp[r * d + i];
      linear(xe, *adapter, x);
    }
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor* w = weights.data() + 9 * l;
      const at::Tensor& ks = kslots[step * L + l];
      const at::Tensor& vs = vslots[step * L + l];
      const at::Tensor& mask = masks[step * L + l];
      const bool* mp = mask.numel() > 0 ? mask.data_ptr<bool>() : nullptr;
      const bool mask_per_token = mp != nullptr && mask.dim() == 3;
      const int64_t C = ks.size(2);

      // attention half: x = norm_2(attn(norm_1(x)) + x)
      rms_norm_rows(xp, w[0].data_ptr<float>(), hp, R, d, eps);
      linear(h, w[1], qkv);  // (R, 3d): q | k | v
      const bool has_bias = w[2].numel() > 0;
      const float* bias = has_bias ? w[2].data_ptr<float>() : nullptr;
      float* kc = ks.data_ptr<float>();
      float* vc = vs.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {  // bias, RoPE and the cache write of every new token first
        for (int64_t t = 0; t < T; ++t) {
          float* q = qp + (b * T + t) * 3 * d;
          float* k = q + d;
          const float* v = q + 2 * d;
          const float* cs = rp + ((rope.size(0) == 1 ? 0 : b) * T + t) * half * 2;
          if (has_bias) {
            for (int64_t i = 0; i < d; ++i) {
              q[i] += bias[i];
              k[i] += bias[d + i];
            }
          }
          for (int64_t hh = 0; hh < H; ++hh) {
            for (int64_t i = 0; i < half; ++i) {
              const float c = cs[2 * i], sn = cs[2 * i + 1];
              float* qq = q + hh * D + 2 * i;
              float* kk = k + hh * D + 2 * i;
              const float q0 = qq[0], q1 = qq[1], k0 = kk[0], k1 = kk[1];
              qq[0] = q0 * c + q1 * (-sn);
              qq[1] = q1 * c + q0 * sn;
              kk[0] = k0 * c + k1 * (-sn);
              kk[1] = k1 * c + k0 * sn;
            }
            const int64_t cb = rowp != nullptr ? rowp[b] : b;
            float* kdst = kc + ((cb * H + hh) * C + pos + t) * D;
            float* vdst = vc + ((cb * H + hh) * C + pos + t) * D;
            for (int64_t i = 0; i < D; ++i) {
              kdst[i] = k[hh * D + i];
              vdst[i] = v[hh * D + i];
            }
          }
        }
      }
      for (int64_t b = 0; b < B; ++b) {  // causal attention: token t sees keys 0 .. pos + t (itself always)
        for (int64_t t = 0; t < T; ++t) {
          const float* q = qp + (b * T + t) * 3 * d;
          const int64_t own = pos + t;
          const bool* mrow = mp == nullptr ? nullptr : mp + (mask_per_token ? (b * T + t) : b) * S;
          for (int64_t hh = 0; hh < H; ++hh) {
            const float* qh = q + hh * D;
            const int64_t cb = rowp != nullptr ? rowp[b] : b;
            const float* kbase = kc + (cb * H + hh) * C * D;
            const float* vbase = vc + (cb * H + hh) * C * D;
            float m = -INFINITY;
            for (int64_t s = 0; s <= own; ++s) {
              if (mrow && !mrow[s] && s != own) {
                scores[s] = -INFINITY;
                continue;
              }
              const float* kr = kbase + s * D;
              float dot = 0.f;
#pragma omp simd reduction(+ : dot)
              for (int64_t i = 0; i < D; ++i) dot += qh[i] * kr[i];
              scores[s] = dot * scale;
              if (scores[s] > m) m = scores[s];
            }
            float total = 0.f;
            float* sc = scores.data();
#pragma omp simd reduction(+ : total)
            for (int64_t s = 0; s <= own; ++s) {
              const float p = (sc[s] == -INFINITY) ? 0.f : exp_approx(sc[s] - m);
              sc[s] = p;
              total += p;
            }
            float* out = yp + (b * T + t) * d + hh * D;
            for (int64_t i = 0; i < D; ++i) out[i] = 0.f;
            for (int64_t s = 0; s <= own; ++s) {
              const float p = sc[s] / total;
              if (p == 0.f) continue;
              const float* vr = vbase + s * D;
#pragma omp simd
              for (int64_t i = 0; i < D; ++i) out[i] += p * vr[i];
            }
          }
        }
      }
      linear(y, w[3], o);
      add_rms_norm_rows(op, xp, w[4].data_ptr<float>(), hp, xp, R, d, eps);

      // MLP half: x = norm_4(mlp(norm_3(x)) + x)
      rms_norm_rows(xp, w[5].data_ptr<float>(), hp, R, d, eps);
      linear(h, w[6], gu);  // (R, 2I): gate | up
      for (int64_t r = 0; r < R; ++r) {
        const float* g = gp + r * 2 * I;
        float* ar = ap + r * I;
#pragma omp simd
        for (int64_t i = 0; i < I; ++i) ar[i] = (g[i] / (1.f + exp_approx(-g[i]))) * g[I + i];
      }
      linear(a, w[7], o);
      add_rms_norm_rows(op, xp, w[8].data_ptr<float>(), hp, xp, R, d, eps);
    }
  }
  return x.view({B, T, d});
}

// x (B, K) @ W^T through the same matrix-vector path the blocks use (tests and benchmarks)
at::Tensor linear_op(const at::Tensor& x, const at::Tensor& W) {
  check_f32(x, "x");
  check_f32(W, "W");
  TORCH_CHECK(x.dim() == 2 && W.dim() == 2 && x.size(1) == W.size(1), "rdepth.linear: x (B, K) and W (N, K)");
  at::Tensor out = at::empty({x.size(0), W.size(0)}, x.options());
  linear(x, W, out);
  return out;
}

}  // namespace

TORCH_LIBRARY(rdepth, m) {
  m.def("linear(Tensor x, Tensor W) -> Tensor");
  m.def("blocks(Tensor x, Tensor? e, Tensor? adapter, int n_steps, Tensor[] weights, Tensor[] kslots, "
        "Tensor[] vslots, int pos, Tensor[] masks, Tensor rope, float eps, int n_heads, Tensor? rows=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(rdepth, CPU, m) {
  m.impl("blocks", &blocks);
  m.impl("linear", &linear_op);
}
