// Fused forward of sandwich blocks for a few new tokens per row with a KV cache (decoding: T = 1; short prefills and
// speculative verification: T > 1) on the CPU, for fp32 or bf16 weights: the arithmetic is fp32 either way.
//
// One call runs a stage of the network on x (B, T, d): the prelude's or the coda's blocks, or `n_steps` recurrences of
// the core (adapter, then its blocks, repeated). Everything runs here in plain loops: RMSNorm, q/k bias,
// interleaved-pair RoPE, the KV write, masked softmax attention over the cached positions, the SiLU gate, residuals,
// and, for a few rows, the matrix-vector products (more rows go to ATen's GEMM), so a decode token costs a handful
// of Python-to-C++ calls instead of about forty small tensor operations per layer. Registered as
// torch.ops.rdepth.blocks; built on first use by recurrent_depth/inference/fused.py, which falls back to the eager
// network when no compiler is available.
//
// Arguments (St, the storage type, is the weight matrices' dtype, fp32 or bf16; x, e, the adapter and the cache slots
// are St too, the norm weights, biases and rope fp32):
//   x        (B, T, d) input of the first block, or with `adapter` (d, 2d) and `e` (B, T, d) the state of the core:
//            each of the n_steps recurrences runs the blocks on adapter([x, e])
//   weights  9 tensors per block: norm_1 (d), Wqkv (3d, d), qk_bias (2, H*D) or empty, attn.proj (d, d), norm_2 (d),
//            norm_3 (d), mlp.fc (2I, d), mlp.proj (d, I), norm_4 (d)
//   kslots, vslots  one (B, H, C, D) cache slot per (step, block), step-major, any strides but a contiguous D (k and
//            v alike); token t's key and value are written at position pos + t, and it attends causally to positions
//            0 .. pos + t
//   masks    one per (step, block): empty (every such position visible), or a bool tensor of visible keys, (B, S)
//            for all tokens of a row or (B, T, S) per token, S = pos + T; a token always sees itself
//   rope     (B or 1, T, D/2, 2) cos/sin of each token's position
//
// rdepth.blocks_paged takes, instead of kslots / vslots / pos / masks, a paged store's pools: one (pages, P, H, D)
// key pool and value pool per block, one (B, max_pages) page table per (step, block), each row's first new position
// (B,) and the validity flags of the pool's positions (pages * P): every row at its own position (see PagedSlot).
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
#include <string>
#include <type_traits>
#include <vector>

namespace {

// At most this many rows: our loops; more: ATen's GEMM. bf16 hands over sooner: ATen's bf16 GEMM (oneDNN, AMX where
// the CPU has it) is memory-bound from a few rows on, while our tiles are FMA-bound (35840 x 5280, one thread:
// 4 rows ours 27.7 ms, ATen 30.4; 8 rows 39.3 vs 31.0; 16 rows 56.3 vs 32.1).
template <typename Wt>
constexpr int64_t kGemmRows = std::is_same_v<Wt, float> ? 16 : 4;

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

// Storage types: the weight matrices, the KV cache and x / e at the op's boundary are fp32 or bf16 (`St`); everything
// computed here (activations, accumulators, norms, softmax) is fp32. A bf16 value widens exactly to fp32 (its 16 bits
// are the high half of the float); fp32 narrows to bf16 with round-to-nearest-even, as torch's own casts.
inline float widen(float v) { return v; }
inline float widen(at::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
template <typename St>
St narrow(float v);
template <>
inline float narrow<float>(float v) {
  return v;
}
template <>
inline at::BFloat16 narrow<at::BFloat16>(float v) {
  return at::BFloat16(v);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define RDEPTH_AVX512 1
// A weight row is read as P fp32 vectors (16 P weights) at a time, the lanes past the row's end zero. bf16 widens
// in-register: 32 bf16 loaded as sixteen 32-bit lanes hold an even element in each low half and an odd one in each
// high half, so a shift gives the even weights as fp32 and a mask the odd ones, two instructions per 32 weights, and
// the x vectors come in the matching order (`arrange`). A bf16 matrix thus streams half the bytes of an fp32 one for
// the same fp32 products. Not AVX512-BF16's vdpbf16ps: it would round x to bf16, and with the product memory-bound the
// exact widening costs no time (35840 x 5280, one thread: bf16 within ~6% of fp32's GB/s).
template <typename Wt>
struct Stream;
template <>
struct Stream<float> {
  static constexpr int P = 1;
  static void load(const float* p, int64_t left, __m512* v) {
    v[0] = _mm512_maskz_loadu_ps(left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1), p);
  }
};
template <>
struct Stream<at::BFloat16> {
  static constexpr int P = 2;
  static void load(const at::BFloat16* p, int64_t left, __m512* v) {
    const __m512i raw = _mm512_maskz_loadu_epi16(left >= 32 ? ~__mmask32(0) : __mmask32((1u << left) - 1), p);
    v[0] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
    v[1] = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
};

// xa (B, Kp) = the rows of x (B, K) in Stream<Wt>'s order: chunk c of 16 P inputs holds, in its vector p, the inputs
// c 16 P + P i + p (i < 16); zero past K (Kp is K rounded up to 16 P).
template <int P>
void arrange(const float* x, float* xa, int64_t B, int64_t K, int64_t Kp) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < Kp; c += 16 * P)
      for (int p = 0; p < P; ++p)
        for (int i = 0; i < 16; ++i) {
          const int64_t src = c + P * i + p;
          xa[b * Kp + c + 16 * p + i] = src < K ? x[b * K + src] : 0.f;
        }
}

// y[b:b+NB, n:n+NW] = x[b:b+NB] @ W[n:n+NW]^T, x arranged (xa, rows of Kp): NB x NW 512-bit accumulators, each weight
// vector loaded (and widened) once for the NB x rows, one horizontal sum per output at the end. Every output is the
// same 16-lane sum in the same order whichever tile computes it, so a row's result depends neither on the rows
// batched with it nor on how the weight rows are split over threads.
template <int NB, int NW, typename Wt>
inline void tile(const float* xa, int64_t Kp, const Wt* W, float* y, int64_t N, int64_t K, int64_t b, int64_t n) {
  constexpr int P = Stream<Wt>::P;
  __m512 acc[NB][NW];
#pragma GCC unroll 4
  for (int i = 0; i < NB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NW; ++j) acc[i][j] = _mm512_setzero_ps();
  const Wt* w = W + n * K;
  const float* xs = xa + b * Kp;
  for (int64_t k = 0; k < K; k += 16 * P) {
    __m512 xv[NB][P];
#pragma GCC unroll 4
    for (int i = 0; i < NB; ++i)
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p) xv[i][p] = _mm512_loadu_ps(xs + i * Kp + k + 16 * p);
#pragma GCC unroll 8
    for (int j = 0; j < NW; ++j) {
      // 16 cache lines ahead in each row: the hardware prefetcher alone left bf16 rows (half the bytes per product)
      // about 7% short of fp32's bandwidth on one core
      _mm_prefetch(reinterpret_cast<const char*>(w + j * K + k) + 1024, _MM_HINT_T0);
      __m512 wv[P];
      Stream<Wt>::load(w + j * K + k, K - k, wv);
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
        for (int i = 0; i < NB; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i][p], wv[p], acc[i][j]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < NB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NW; ++j) y[(b + i) * N + n + j] = _mm512_reduce_add_ps(acc[i][j]);
}
#endif

// y[:, n0:n1] = x (B, K) @ W[n0:n1]^T with W (N, K) row-major (fp32 or bf16) and x, y (B, K), (B, N) fp32 (with
// AVX-512, x arranged: xa, rows of Kp): eight weight rows at a time (kept in cache while every x row passes over
// them), so each weight is read from memory once for all B rows.
template <typename Wt>
void linear_rows(const float* x, const float* xa, int64_t Kp, const Wt* W, float* y, int64_t B, int64_t N, int64_t K,
                 int64_t n0, int64_t n1) {
#ifdef RDEPTH_AVX512
  int64_t n = n0;
  for (; n + 8 <= n1; n += 8) {
    int64_t b = 0;
    for (; b + 4 <= B; b += 4) {  // four x rows at a time against each half of the block
      tile<4, 4>(xa, Kp, W, y, N, K, b, n);
      tile<4, 4>(xa, Kp, W, y, N, K, b, n + 4);
    }
    if (b + 2 <= B) {
      tile<2, 8>(xa, Kp, W, y, N, K, b, n);
      b += 2;
    }
    if (b < B) tile<1, 8>(xa, Kp, W, y, N, K, b, n);
  }
  for (; n < n1; ++n)
    for (int64_t b = 0; b < B; ++b) tile<1, 1>(xa, Kp, W, y, N, K, b, n);
#else  // portable: one dot product at a time, vectorised by the compiler
  for (int64_t n = n0; n < n1; ++n) {
    const Wt* w = W + n * K;
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + b * K;
      float a = 0.f;
#pragma omp simd reduction(+ : a)
      for (int64_t k = 0; k < K; ++k) a += xb[k] * widen(w[k]);
      y[b * N + n] = a;
    }
  }
#endif
}

// out (B, N) = in (B, K) @ W^T, in and out fp32, W of the storage type; the weight rows are split across ATen's
// intra-op threads (torch.set_num_threads). More than kGemmRows<Wt> rows go to ATen's GEMM, for bf16 weights on
// activations rounded to bf16 (as the eager bf16 network computes every product).
template <typename Wt>
void linear(const at::Tensor& in, const at::Tensor& W, at::Tensor& out) {
  const int64_t B = in.size(0), N = W.size(0), K = W.size(1);
  if (B > kGemmRows<Wt>) {
    if constexpr (std::is_same_v<Wt, float>) {
      at::mm_out(out, in, W.t());
    } else {
      out.copy_(at::mm(in.to(W.scalar_type()), W.t()));
    }
    return;
  }
  const float* x = in.data_ptr<float>();
  const Wt* w = W.data_ptr<Wt>();
  float* y = out.data_ptr<float>();
#ifdef RDEPTH_AVX512
  constexpr int64_t step = 16 * Stream<Wt>::P;
  const int64_t Kp = (K + step - 1) / step * step;
  std::vector<float> arranged(B * Kp);
  arrange<Stream<Wt>::P>(x, arranged.data(), B, K, Kp);
  const float* xa = arranged.data();
#else
  const int64_t Kp = K;
  const float* xa = x;
#endif
  const int64_t blocks = (N + 7) / 8;
  // at least 256 KiB of weights per task: smaller products stay on one thread, where a fork and join would cost
  // about what splitting them saves (measured on the `small` preset at 2 threads: 1 MiB 51, 256 KiB 68, 64 KiB 63
  // tokens/s)
  const int64_t block_bytes = 8 * static_cast<int64_t>(sizeof(Wt)) * std::max<int64_t>(K, 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / block_bytes);
  at::parallel_for(0, blocks, grain, [&](int64_t lo, int64_t hi) {
    linear_rows(x, xa, Kp, w, y, B, N, K, lo * 8, std::min(hi * 8, N));
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

// t is a contiguous CPU tensor of dtype st (kFloat: "fp32", kBFloat16: "bf16" in the message)
void check(const at::Tensor& t, at::ScalarType st, const char* name, const char* op = "rdepth.blocks") {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == st && t.is_contiguous(), op, ": ", name,
              " must be a contiguous ", st == at::kFloat ? "fp32" : "bf16", " CPU tensor");
}

// A cache slot: a CPU tensor of dtype st whose last dim (D) is contiguous; the other dims may be strided (a view of
// (B, S, H, D) memory as its (B, H, S, D) transpose is read without a copy).
void check_slot(const at::Tensor& t, at::ScalarType st, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == st && t.dim() == 4 && t.stride(3) == 1,
              "rdepth.blocks: ", name, " must be a contiguous ", st == at::kFloat ? "fp32" : "bf16",
              " CPU tensor along D: (B, H, C, D) with D's stride 1");
}

// How one (step, block) call addresses its cache: where row b's key and value at position s of head hh live, which
// position token t of row b writes (and so the last it attends to), and which positions it may not see.
//
// DenseSlot: a (B, H, C, D) slot tensor (any strides but a contiguous D), every row's new tokens at pos + t,
// visibility from an optional mask (B, S) or (B, T, S).
template <typename St>
struct DenseSlot {
  St* k;
  St* v;
  int64_t sr, sh, sp;      // row, head, position strides (elements)
  int64_t pos, T, S;
  const bool* mp;          // visible keys (nullptr: all)
  bool per_token;
  int64_t own(int64_t, int64_t t) const { return pos + t; }
  int64_t at(int64_t b, int64_t hh, int64_t s) const { return b * sr + hh * sh + s * sp; }
  bool hidden(int64_t b, int64_t t, int64_t s) const {
    return mp != nullptr && !mp[(per_token ? (b * T + t) : b) * S + s];
  }
  void wrote(int64_t, int64_t) const {}
};

// PagedSlot: pools of pages (pages, P, H, D) contiguous, a page table (B, max_pages) of page ids (-1: none) for this
// slot, row b's new tokens at start[b] + t; a position is visible where its page exists and its flag in `valid`
// (pages * P, shared by a stage's blocks) is set, which the op sets for every position it writes.
template <typename St>
struct PagedSlot {
  St* k;
  St* v;
  const int64_t* table;
  int64_t max_pages, P, H, D;
  const int64_t* start;
  bool* valid;
  int64_t own(int64_t b, int64_t t) const { return start[b] + t; }
  int64_t flat(int64_t b, int64_t s) const {
    const int64_t page = table[b * max_pages + s / P];
    return page < 0 ? -1 : page * P + s % P;
  }
  int64_t at(int64_t b, int64_t hh, int64_t s) const { return (flat(b, s) * H + hh) * D; }
  bool hidden(int64_t b, int64_t, int64_t s) const {
    const int64_t f = flat(b, s);
    return f < 0 || !valid[f];
  }
  void wrote(int64_t b, int64_t s) const { valid[flat(b, s)] = true; }
};

// The checks every entry point shares: x (B, T, d), rope, 9 weights per block fitting d, the adapter and e; returns
// the number of blocks L.
int64_t check_call(const at::Tensor& x, const c10::optional<at::Tensor>& e, const c10::optional<at::Tensor>& adapter,
                   int64_t n_steps, at::TensorList weights, const at::Tensor& rope, int64_t n_heads,
                   at::ScalarType st, size_t n_slots, int64_t window) {
  check(x, st, "x");
  check(rope, at::kFloat, "rope");
  TORCH_CHECK(x.dim() == 3, "rdepth.blocks: x must be (B, T, d)");
  TORCH_CHECK(n_steps >= 1, "rdepth.blocks: n_steps must be at least 1");
  TORCH_CHECK(window >= 0, "rdepth.blocks: window must be >= 0");
  const int64_t L = static_cast<int64_t>(weights.size()) / 9;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 9 * L && L >= 1, "rdepth.blocks: expected 9 weights per block");
  TORCH_CHECK(static_cast<int64_t>(n_slots) == n_steps * L,
              "rdepth.blocks: expected one k slot, one v slot and one mask (or page table) per step and block");
  TORCH_CHECK(adapter.has_value() || n_steps == 1, "rdepth.blocks: several steps need the core's adapter");
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2);
  const int64_t D = d / n_heads, half = D / 2;
  TORCH_CHECK(T >= 1 && n_heads >= 1 && D * n_heads == d && D % 2 == 0,
              "rdepth.blocks: n_heads must divide d into even head sizes");
  TORCH_CHECK(rope.dim() == 4 && (rope.size(0) == 1 || rope.size(0) == B) && rope.size(1) == T &&
                  rope.size(2) == half && rope.size(3) == 2,
              "rdepth.blocks: rope must be (B or 1, T, D/2, 2)");
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = weights.data() + 9 * l;
    for (int j = 0; j < 9; ++j) {
      if (j == 2 && w[j].numel() == 0) continue;
      const bool matrix = j == 1 || j == 3 || j == 6 || j == 7;
      check(w[j], matrix ? st : at::kFloat, matrix ? "a block's weight matrix" : "a block's norm weight or bias");
    }
    TORCH_CHECK(w[1].size(0) == 3 * d && w[1].size(1) == d && w[3].size(0) == d && w[3].size(1) == d &&
                    w[6].size(1) == d && w[7].size(0) == d && w[7].size(1) * 2 == w[6].size(0),
                "rdepth.blocks: block weights do not fit d = ", d);
  }
  if (adapter.has_value()) {
    TORCH_CHECK(e.has_value() && e->sizes() == x.sizes(), "rdepth.blocks: the adapter needs e shaped like x");
    check(*e, st, "e");
    check(*adapter, st, "adapter");
    TORCH_CHECK(adapter->size(0) == d && adapter->size(1) == 2 * d, "rdepth.blocks: adapter must be (d, 2d)");
  }
  return L;
}

// The stage itself, over checked arguments: `slots` holds one Slot per (step, block), step-major; S bounds every
// token's last visible position + 1 (the scores' length).
template <typename St, typename Slot>
at::Tensor run_stage(const at::Tensor& x_arg, const c10::optional<at::Tensor>& e,
                     const c10::optional<at::Tensor>& adapter, int64_t n_steps, at::TensorList weights,
                     const std::vector<Slot>& slots, int64_t S, const at::Tensor& rope, double eps, int64_t n_heads,
                     int64_t window) {
  const int64_t L = static_cast<int64_t>(weights.size()) / 9;
  const int64_t B = x_arg.size(0), T = x_arg.size(1), d = x_arg.size(2), R = B * T;
  const int64_t H = n_heads, D = d / n_heads;
  const int64_t half = D / 2;
  at::Tensor xe;
  if (adapter.has_value()) {
    xe = at::empty({R, 2 * d}, x_arg.options().dtype(at::kFloat));  // [state | e]
    float* xep = xe.data_ptr<float>();
    const St* ep = e->data_ptr<St>();
    for (int64_t r = 0; r < R; ++r)
      for (int64_t i = 0; i < d; ++i) xep[r * 2 * d + d + i] = widen(ep[r * d + i]);
  }
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t I = weights[6].size(0) / 2;

  // the residual stream (R = B * T rows, d), fp32 whatever the storage type
  at::Tensor x = x_arg.reshape({R, d}).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
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
      linear<St>(xe, *adapter, x);
    }
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor* w = weights.data() + 9 * l;
      const Slot& slot = slots[step * L + l];

      // attention half: x = norm_2(attn(norm_1(x)) + x)
      rms_norm_rows(xp, w[0].data_ptr<float>(), hp, R, d, eps);
      linear<St>(h, w[1], qkv);  // (R, 3d): q | k | v
      const bool has_bias = w[2].numel() > 0;
      const float* bias = has_bias ? w[2].data_ptr<float>() : nullptr;
      St* kc = slot.k;
      St* vc = slot.v;
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
          const int64_t own = slot.own(b, t);
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
            St* kdst = kc + slot.at(b, hh, own);
            St* vdst = vc + slot.at(b, hh, own);
            for (int64_t i = 0; i < D; ++i) {
              kdst[i] = narrow<St>(k[hh * D + i]);
              vdst[i] = narrow<St>(v[hh * D + i]);
            }
          }
          slot.wrote(b, own);
        }
      }
      for (int64_t b = 0; b < B; ++b) {  // causal attention: token t sees keys lo .. own (itself always)
        for (int64_t t = 0; t < T; ++t) {
          const float* q = qp + (b * T + t) * 3 * d;
          const int64_t own = slot.own(b, t);
          const int64_t lo = window > 0 ? std::max<int64_t>(0, own - window + 1) : 0;  // a window: the last w only
          for (int64_t hh = 0; hh < H; ++hh) {
            const float* qh = q + hh * D;
            float m = -INFINITY;
            for (int64_t s = lo; s <= own; ++s) {
              if (s != own && slot.hidden(b, t, s)) {
                scores[s] = -INFINITY;
                continue;
              }
              const St* kr = kc + slot.at(b, hh, s);  // as stored (rounded), the token's own key included
              float dot = 0.f;
#pragma omp simd reduction(+ : dot)
              for (int64_t i = 0; i < D; ++i) dot += qh[i] * widen(kr[i]);
              scores[s] = dot * scale;
              if (scores[s] > m) m = scores[s];
            }
            float total = 0.f;
            float* sc = scores.data();
#pragma omp simd reduction(+ : total)
            for (int64_t s = lo; s <= own; ++s) {
              const float p = (sc[s] == -INFINITY) ? 0.f : exp_approx(sc[s] - m);
              sc[s] = p;
              total += p;
            }
            float* out = yp + (b * T + t) * d + hh * D;
            for (int64_t i = 0; i < D; ++i) out[i] = 0.f;
            for (int64_t s = lo; s <= own; ++s) {
              const float p = sc[s] / total;
              if (p == 0.f) continue;
              const St* vr = vc + slot.at(b, hh, s);
#pragma omp simd
              for (int64_t i = 0; i < D; ++i) out[i] += p * widen(vr[i]);
            }
          }
        }
      }
      linear<St>(y, w[3], o);
      add_rms_norm_rows(op, xp, w[4].data_ptr<float>(), hp, xp, R, d, eps);

      // MLP half: x = norm_4(mlp(norm_3(x)) + x)
      rms_norm_rows(xp, w[5].data_ptr<float>(), hp, R, d, eps);
      linear<St>(h, w[6], gu);  // (R, 2I): gate | up
      for (int64_t r = 0; r < R; ++r) {
        const float* g = gp + r * 2 * I;
        float* ar = ap + r * I;
#pragma omp simd
        for (int64_t i = 0; i < I; ++i) ar[i] = (g[i] / (1.f + exp_approx(-g[i]))) * g[I + i];
      }
      linear<St>(a, w[7], o);
      add_rms_norm_rows(op, xp, w[8].data_ptr<float>(), hp, xp, R, d, eps);
    }
  }
  return x.to(c10::CppTypeToScalarType<St>::value).view({B, T, d});
}

template <typename St>
at::Tensor blocks_impl(const at::Tensor& x, const c10::optional<at::Tensor>& e,
                       const c10::optional<at::Tensor>& adapter, int64_t n_steps, at::TensorList weights,
                       at::TensorList kslots, at::TensorList vslots, int64_t pos, at::TensorList masks,
                       const at::Tensor& rope, double eps, int64_t n_heads, int64_t window) {
  const at::ScalarType st = c10::CppTypeToScalarType<St>::value;
  check_call(x, e, adapter, n_steps, weights, rope, n_heads, st, kslots.size(), window);
  TORCH_CHECK(vslots.size() == kslots.size() && masks.size() == kslots.size(),
              "rdepth.blocks: expected one k slot, one v slot and one mask per step and block");
  TORCH_CHECK(pos >= 0, "rdepth.blocks: pos must be >= 0");
  const int64_t B = x.size(0), T = x.size(1), H = n_heads, D = x.size(2) / n_heads, S = pos + T;
  std::vector<DenseSlot<St>> slots;
  for (size_t i = 0; i < kslots.size(); ++i) {
    const at::Tensor& ks = kslots[i];
    const at::Tensor& vs = vslots[i];
    check_slot(ks, st, "k slot");
    check_slot(vs, st, "v slot");
    TORCH_CHECK(ks.dim() == 4 && ks.size(0) == B && ks.size(1) == H && ks.size(3) == D && ks.size(2) >= S &&
                    vs.sizes() == ks.sizes() && vs.strides() == ks.strides(),
                "rdepth.blocks: cache slots must be (B, H, C >= pos + T, D), k and v alike");
    const at::Tensor& mask = masks[i];
    if (mask.numel() > 0) {
      TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.size(0) == B &&
                      ((mask.dim() == 2 && mask.size(1) == S) ||
                       (mask.dim() == 3 && mask.size(1) == T && mask.size(2) == S)),
                  "rdepth.blocks: a mask must be a contiguous bool tensor (B, pos + T) or (B, T, pos + T)");
    }
    slots.push_back({ks.data_ptr<St>(), vs.data_ptr<St>(), ks.stride(0), ks.stride(1), ks.stride(2), pos, T, S,
                     mask.numel() > 0 ? mask.data_ptr<bool>() : nullptr, mask.numel() > 0 && mask.dim() == 3});
  }
  return run_stage<St>(x, e, adapter, n_steps, weights, slots, S, rope, eps, n_heads, window);
}

// The paged form: kpools / vpools one (pages, P, H, D) pool per block (the same pools at every step), tables one
// (B, max_pages) int64 page table per (step, block), step-major, starts (B,) int64 the position row b's first new
// token takes, valid (pages * P,) bool the positions holding a key (set here for the positions written).
template <typename St>
at::Tensor paged_impl(const at::Tensor& x, const c10::optional<at::Tensor>& e,
                      const c10::optional<at::Tensor>& adapter, int64_t n_steps, at::TensorList weights,
                      at::TensorList kpools, at::TensorList vpools, at::TensorList tables, const at::Tensor& starts,
                      const at::Tensor& valid, const at::Tensor& rope, double eps, int64_t n_heads,
                      int64_t window) {
  const at::ScalarType st = c10::CppTypeToScalarType<St>::value;
  const int64_t L = check_call(x, e, adapter, n_steps, weights, rope, n_heads, st, tables.size(), window);
  const int64_t B = x.size(0), T = x.size(1), H = n_heads, D = x.size(2) / n_heads;
  TORCH_CHECK(static_cast<int64_t>(kpools.size()) == L && static_cast<int64_t>(vpools.size()) == L,
              "rdepth.blocks_paged: expected one k pool and one v pool per block");
  TORCH_CHECK(starts.device().is_cpu() && starts.scalar_type() == at::kLong && starts.is_contiguous() &&
                  starts.dim() == 1 && starts.size(0) == B,
              "rdepth.blocks_paged: starts must be a contiguous int64 tensor of B positions");
  TORCH_CHECK(valid.device().is_cpu() && valid.scalar_type() == at::kBool && valid.is_contiguous() && valid.dim() == 1,
              "rdepth.blocks_paged: valid must be a contiguous 1-D bool tensor (pages * P)");
  const int64_t* sp = starts.data_ptr<int64_t>();
  int64_t S = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(sp[b] >= 0, "rdepth.blocks_paged: starts must be >= 0");
    S = std::max(S, sp[b] + T);
  }
  const int64_t P = kpools[0].size(1), pages = kpools[0].size(0);
  TORCH_CHECK(valid.size(0) == pages * P, "rdepth.blocks_paged: valid must hold pages * P flags");
  for (int64_t l = 0; l < L; ++l) {
    check(kpools[l], st, "k pool", "rdepth.blocks_paged");
    check(vpools[l], st, "v pool", "rdepth.blocks_paged");
    TORCH_CHECK(kpools[l].dim() == 4 && kpools[l].size(0) == pages && kpools[l].size(1) == P &&
                    kpools[l].size(2) == H && kpools[l].size(3) == D && vpools[l].sizes() == kpools[l].sizes(),
                "rdepth.blocks_paged: pools must be (pages, P, H, D), the same for every block, k and v alike");
  }
  std::vector<PagedSlot<St>> slots;
  for (int64_t i = 0; i < n_steps * L; ++i) {
    const at::Tensor& table = tables[i];
    TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong && table.is_contiguous() &&
                    table.dim() == 2 && table.size(0) == B && table.size(1) * P >= S,
                "rdepth.blocks_paged: a page table must be a contiguous int64 (B, max_pages) covering every position");
    const int64_t* tp = table.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {  // the pages written must exist: reads of missing pages are masked instead
      for (int64_t n = sp[b] / P; n <= (sp[b] + T - 1) / P; ++n) {
        TORCH_CHECK(tp[b * table.size(1) + n] >= 0 && tp[b * table.size(1) + n] < pages,
                    "rdepth.blocks_paged: a written position has no page (bind the rows first)");
      }
    }
    const int64_t l = i % L;
    slots.push_back({kpools[l].data_ptr<St>(), vpools[l].data_ptr<St>(), tp, table.size(1), P, H, D, sp,
                     valid.data_ptr<bool>()});
  }
  return run_stage<St>(x, e, adapter, n_steps, weights, slots, S, rope, eps, n_heads, window);
}

// The storage type is the weight matrices' dtype: fp32 or bf16.
at::Tensor blocks(const at::Tensor& x, const c10::optional<at::Tensor>& e, const c10::optional<at::Tensor>& adapter,
                  int64_t n_steps, at::TensorList weights, at::TensorList kslots, at::TensorList vslots, int64_t pos,
                  at::TensorList masks, const at::Tensor& rope, double eps, int64_t n_heads, int64_t window) {
  TORCH_CHECK(weights.size() >= 2, "rdepth.blocks: expected 9 weights per block");
  const at::ScalarType st = weights[1].scalar_type();
  if (st == at::kBFloat16)
    return blocks_impl<at::BFloat16>(x, e, adapter, n_steps, weights, kslots, vslots, pos, masks, rope, eps,
                                     n_heads, window);
  TORCH_CHECK(st == at::kFloat, "rdepth.blocks: the weight matrices must be fp32 or bf16, not ", st);
  return blocks_impl<float>(x, e, adapter, n_steps, weights, kslots, vslots, pos, masks, rope, eps, n_heads,
                            window);
}

at::Tensor blocks_paged(const at::Tensor& x, const c10::optional<at::Tensor>& e,
                        const c10::optional<at::Tensor>& adapter, int64_t n_steps, at::TensorList weights,
                        at::TensorList kpools, at::TensorList vpools, at::TensorList tables, const at::Tensor& starts,
                        const at::Tensor& valid, const at::Tensor& rope, double eps, int64_t n_heads,
                        int64_t window) {
  TORCH_CHECK(weights.size() >= 2 && !kpools.empty(), "rdepth.blocks_paged: expected 9 weights and a pool per block");
  const at::ScalarType st = weights[1].scalar_type();
  if (st == at::kBFloat16)
    return paged_impl<at::BFloat16>(x, e, adapter, n_steps, weights, kpools, vpools, tables, starts, valid, rope, eps,
                                    n_heads, window);
  TORCH_CHECK(st == at::kFloat, "rdepth.blocks_paged: the weight matrices must be fp32 or bf16, not ", st);
  return paged_impl<float>(x, e, adapter, n_steps, weights, kpools, vpools, tables, starts, valid, rope, eps, n_heads,
                           window);
}

// fp32 x (B, K) @ W^T, W fp32 or bf16, through the same matrix-vector path the blocks use (tests and benchmarks)
at::Tensor linear_op(const at::Tensor& x, const at::Tensor& W) {
  check(x, at::kFloat, "x", "rdepth.linear");
  const bool bf16 = W.scalar_type() == at::kBFloat16;
  check(W, bf16 ? at::kBFloat16 : at::kFloat, "W", "rdepth.linear");
  TORCH_CHECK(x.dim() == 2 && W.dim() == 2 && x.size(1) == W.size(1), "rdepth.linear: x (B, K) and W (N, K)");
  at::Tensor out = at::empty({x.size(0), W.size(0)}, x.options());
  if (bf16) {
    linear<at::BFloat16>(x, W, out);
  } else {
    linear<float>(x, W, out);
  }
  return out;
}

// The vector instruction set the matrix-vector kernel was built for: "avx512" (AVX-512 F, BW and VL: the fast
// in-register bf16 widening) or "portable" (the compiler's own vectorisation).
std::string vector_isa() {
#ifdef RDEPTH_AVX512
  return "avx512";
#else
  return "portable";
#endif
}

}  // namespace

TORCH_LIBRARY(rdepth, m) {
  m.def("linear(Tensor x, Tensor W) -> Tensor");
  m.def("vector_isa() -> str", &vector_isa);
  m.def("blocks(Tensor x, Tensor? e, Tensor? adapter, int n_steps, Tensor[] weights, Tensor[] kslots, "
        "Tensor[] vslots, int pos, Tensor[] masks, Tensor rope, float eps, int n_heads, int window=0) -> Tensor");
  m.def("blocks_paged(Tensor x, Tensor? e, Tensor? adapter, int n_steps, Tensor[] weights, Tensor[] kpools, "
        "Tensor[] vpools, Tensor[] tables, Tensor starts, Tensor valid, Tensor rope, float eps, int n_heads, "
        "int window=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(rdepth, CPU, m) {
  m.impl("blocks", &blocks);
  m.impl("blocks_paged", &blocks_paged);
  m.impl("linear", &linear_op);
}
