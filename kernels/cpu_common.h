// The CPU kernels' shared parts (library vision_rwkv_cpu): 16-float vectors and their helpers, the one-pass
// products that read each weight row once for up to MAX_ROWS input rows (fp32 or bf16 weights), LayerNorm,
// and the two product operations every recurrent step is made of: ln_mix_matmul (LayerNorm, the token-shift
// mixes and the products that read them, with an activation per block of output columns) and linear (a
// product, in groups). rwkv7_cpu.cpp (RWKV-7's step and prefill) and rwkv4_cpu.cpp (RWKV-4's step) build
// on them; see rwkv7_cpu.cpp's opening comment for why a step is made this way.
// Everything is inline in namespace cpu_kernels: each library source includes it.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace cpu_kernels {

constexpr int ACT_NONE = 0, ACT_TANH = 1, ACT_SIGMOID = 2, ACT_RELU2 = 3;  // reference.ACT_*
constexpr float LN_EPS = 1e-5f;                                           // reference.LN_EPS
constexpr float LN_X_EPS = 64e-5f;                                        // reference.LN_X_EPS
constexpr int MAX_ROWS = 16;  // input rows a product takes at once (cpu_step.MAX_ROWS; the engine sends no more)
// output rows per thread task: at least this many bytes of weights, so a task outweighs its start
constexpr int64_t TASK_BYTES = 32 * 1024;

typedef float v16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));  // an unaligned vector load
  return v;
}

// The sum of a vector's 16 lanes: AVX-512's shuffle tree where the build has it, one lane at a time otherwise.
inline float hsum(v16 v) {
#if defined(__AVX512F__)
  __m512 x;
  std::memcpy(&x, &v, sizeof(x));
  return _mm512_reduce_add_ps(x);
#else
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
#endif
}

typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint32_t vu32x16 __attribute__((vector_size(64)));
typedef uint16_t vu16x16 __attribute__((vector_size(32)));

// 16 bf16 values (their bits) as floats: a bf16 is the top half of the float with the same bits, so each is
// widened to 32 bits and shifted up, exactly.
inline v16 load16(const uint16_t* p) {
  vu16x16 h;
  std::memcpy(&h, p, sizeof(h));
  const vu32x16 bits = __builtin_convertvector(h, vu32x16) << 16;
  v16 v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }

// exp(x) for 16 floats: x = n ln2 + f with |f| <= ln2/2, e^f by its Taylor series to f^7 (relative error
// under 1e-8 there), times 2^n built in the exponent bits. x is clamped to [-87, 88], where 2^n stays normal;
// a NaN stays NaN (the comparisons are false for it, so it passes the clamps).
inline v16 exp16(v16 x) {
  const v16 shifter = v16{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer, kept in the low bits
  x = x > 88.f ? v16{} + 88.f : x;
  x = x < -87.f ? v16{} - 87.f : x;
  const v16 t = x * 1.44269504088896341f + shifter;
  const v16 n = t - shifter;
  const v16 f = x - n * 0.693145751953125f - n * 1.42860682030941723e-6f;  // ln2 in two parts
  v16 p = v16{} + 1.f / 5040.f;
  p = p * f + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const vi16 e = ((vi16)t - (vi16)shifter + 127) << 23;
  return p * (v16)e;
}

// Element-wise helpers on one float or on 16 (V = float or v16), so that one loop body serves a row's
// vectorised part and its tail.
inline float load_as(float, const float* p) { return *p; }
inline v16 load_as(v16, const float* p) { return load16(p); }
inline void store_as(float* p, float v) { *p = v; }
inline void store_as(float* p, v16 v) { store16(p, v); }
inline float exp_of(float x) { return std::exp(x); }
inline v16 exp_of(v16 x) { return exp16(x); }
inline float max_of(float a, float b) { return std::max(a, b); }
inline v16 max_of(v16 a, v16 b) { return a > b ? a : b; }
template <class V> inline V sigmoid_of(V x) { return 1.f / (1.f + exp_of(-x)); }

// f(V, j) for j = 0, 16, 32, ... with V a v16 while 16 elements remain, then one at a time with V a float.
template <class F>
inline void each16(int64_t n, F&& f) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) f(v16{}, j);
  for (; j < n; ++j) f(0.f, j);
}

// A float sum fed 16 or 1 values at a time (each16's two forms).
struct Sum {
  v16 lanes{};
  float rest = 0.f;
  void operator+=(v16 x) { lanes += x; }
  void operator+=(float x) { rest += x; }
  float value() const { return hsum(lanes) + rest; }
};

// y[r * B + b] = dot(x[b], w[r]) for R consecutive weight rows w[r] (K values apart) and B input rows x[b]
// (sx apart), each weight read once. B and R are compile-time, so the B x R accumulators stay in registers;
// two weight rows at a time (at 6 to 8 input rows: `pairs`) let each load of an input feed two products.
// W: float, or uint16_t for bf16 weights (widened to fp32 as they are read; the sums are fp32 either way).
template <int B, int R, class W>
void dots_t(const float* x, int64_t sx, const W* w, int64_t K, float* y) {
  v16 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = v16{};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    v16 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load16(w + r * K + k);
    for (int b = 0; b < B; ++b) {
      const v16 xv = load16(x + b * sx + k);
      for (int r = 0; r < R; ++r) acc[r][b] += xv * wv[r];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) {
      float s = hsum(acc[r][b]);
      for (int64_t kk = k; kk < K; ++kk) s = std::fma(x[b * sx + kk], to_float(w[r * K + kk]), s);
      y[r * B + b] = s;
    }
}

template <class W>
using DotsFn = void (*)(const float*, int64_t, const W*, int64_t, float*);

template <class W, int... Bs>
constexpr std::array<DotsFn<W>, sizeof...(Bs)> dots_table(int rows_at_once) {
  return rows_at_once == 2
             ? std::array<DotsFn<W>, sizeof...(Bs)>{(Bs <= 8 ? &dots_t<Bs, 2, W> : &dots_t<Bs, 1, W>)...}
             : std::array<DotsFn<W>, sizeof...(Bs)>{&dots_t<Bs, 1, W>...};
}

// dots_t for 1 to MAX_ROWS input rows, one (DOTS<W>::one) or two (::two) weight rows at a time
template <class W>
struct DOTS {
  static constexpr auto one = dots_table<W, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16>(1);
  static constexpr auto two = dots_table<W, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16>(2);
};

// Whether B input rows take two weight rows at a time: faster at 8 rows, slower at 1 and 4 (BENCHMARKS.md)
inline bool pairs(int64_t B) { return B >= 6 && B <= 8; }

inline float activate(float y, int act) {
  switch (act) {
    case ACT_TANH: return std::tanh(y);
    case ACT_SIGMOID: return 1.f / (1.f + std::exp(-y));
    case ACT_RELU2: return y > 0.f ? y * y : 0.f;
    default: return y;
  }
}

inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

inline int64_t grain(int64_t row_bytes) { return std::max<int64_t>(1, TASK_BYTES / std::max<int64_t>(row_bytes, 1)); }

inline void check_f32(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat,
              "vision_rwkv_cpu: ", what, " must be an fp32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

inline void check_contiguous(const at::Tensor& t, const char* what) {
  check_f32(t, what);
  TORCH_CHECK(t.is_contiguous(), "vision_rwkv_cpu: ", what, " must be contiguous");
}

// A product's weights: fp32, or bf16 (read as their bits and widened to fp32 in the products).
inline void check_weights(const at::Tensor& w, const char* what) {
  TORCH_CHECK(w.device().is_cpu() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "vision_rwkv_cpu: ", what, " must be an fp32 or bf16 CPU tensor, got ", w.scalar_type(), " on ",
              w.device());
  TORCH_CHECK(w.is_contiguous(), "vision_rwkv_cpu: ", what, " must be contiguous");
}

// f(pointer to w's first element): const float* for fp32 weights, const uint16_t* (the bits) for bf16.
template <class F>
void with_weights(const at::Tensor& w, F&& f) {
  if (w.scalar_type() == at::kBFloat16)
    f(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()));
  else
    f(w.data_ptr<float>());
}

template <class P>
using pointee = std::remove_const_t<std::remove_pointer_t<P>>;

// LayerNorm of one row of C floats, 16 at a time: out may alias nothing else.
inline void layer_norm(const float* x, const float* w, const float* b, int64_t C, float* out) {
  Sum sum;
  each16(C, [&](auto V, int64_t c) { sum += load_as(V, x + c); });
  const float mean = sum.value() / C;
  Sum var;
  each16(C, [&](auto V, int64_t c) {
    const auto d = load_as(V, x + c) - mean;
    var += d * d;
  });
  const float inv = 1.f / std::sqrt(var.value() / C + LN_EPS);
  each16(C, [&](auto V, int64_t c) {
    store_as(out + c, (load_as(V, x + c) - mean) * inv * load_as(V, w + c) + load_as(V, b + c));
  });
}

// A step's first operation: x (B,C) <- LayerNorm(emb[tokens[b]]) row by row (tokens (B,) int64, each checked
// against the embedding's rows first; emb (V,C) fp32 or bf16). `op` names the caller in the error.
inline void embed_layer_norm(const at::Tensor& tokens, const at::Tensor& emb, const at::Tensor& weight,
                             const at::Tensor& bias, const at::Tensor& x, const char* op) {
  const int64_t B = tokens.size(0), V = emb.size(0), C = emb.size(1);
  const int64_t* tok = tokens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(tok[b] >= 0 && tok[b] < V, "vision_rwkv_cpu: ", op, ": token ", tok[b], " is outside 0..", V - 1);
  std::vector<float> row(C);
  for (int64_t b = 0; b < B; ++b) {
    with_weights(emb, [&](auto ep) {
      for (int64_t c = 0; c < C; ++c) row[c] = to_float(ep[tok[b] * C + c]);
    });
    layer_norm(row.data(), weight.data_ptr<float>(), bias.data_ptr<float>(), C, x.data_ptr<float>() + b * C);
  }
}

// A step's last operation: x (B,C) += dx; out (B,C) <- LayerNorm(x) row by row (all fp32, contiguous).
inline void add_layer_norm(const at::Tensor& x, const at::Tensor& dx, const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor& out) {
  const int64_t B = x.size(0), C = x.size(1);
  float* xp = x.data_ptr<float>();
  const float* dp = dx.data_ptr<float>();
  for (int64_t i = 0; i < B * C; ++i) xp[i] += dp[i];
  for (int64_t b = 0; b < B; ++b)
    layer_norm(xp + b * C, weight.data_ptr<float>(), bias.data_ptr<float>(), C, out.data_ptr<float>() + b * C);
}

// x (B,C) is read; x_out <- x + dx; xl_out <- xl = LayerNorm(x + dx); for each output row n of w (N,C),
// out[:, n] = act(a_m . w[n]) where a_m = xl + (shift - xl) * mix[m] (xl when shift is None) and
// (m, act) = segments[n / block_n] as m + 256 * act. prev_shift <- prev_xl first, when given.
inline void ln_mix_matmul(const at::Tensor& x, const c10::optional<at::Tensor>& dx, const at::Tensor& x_out,
                   const at::Tensor& xl_out, const at::Tensor& weight, const at::Tensor& bias,
                   const c10::optional<at::Tensor>& shift, const at::Tensor& mix, const at::Tensor& w,
                   const at::Tensor& segments, const at::Tensor& out, int64_t block_n,
                   const c10::optional<at::Tensor>& prev_xl, const c10::optional<at::Tensor>& prev_shift) {
  for (const auto* t : {&x, &x_out, &xl_out, &weight, &bias, &mix, &out}) check_contiguous(*t, "ln_mix_matmul_'s tensors");
  check_weights(w, "ln_mix_matmul_'s w");
  const int64_t B = x.size(0), C = x.size(1), N = w.size(0), G = mix.size(0);
  TORCH_CHECK(B <= MAX_ROWS, "vision_rwkv_cpu: ln_mix_matmul_ takes at most ", MAX_ROWS, " rows, got ", B);
  TORCH_CHECK(w.size(1) == C && out.size(0) == B && out.size(1) == N, "vision_rwkv_cpu: ln_mix_matmul_: shapes");
  TORCH_CHECK(segments.scalar_type() == at::kInt && segments.is_contiguous() && segments.device().is_cpu() &&
                  segments.numel() * block_n >= N,
              "vision_rwkv_cpu: ln_mix_matmul_: segments must be contiguous int32, one per block of columns");
  if (prev_xl.has_value()) {
    check_contiguous(*prev_xl, "prev_xl");
    check_contiguous(*prev_shift, "prev_shift");
    prev_shift->copy_(*prev_xl);
  }
  const float* xp = x.data_ptr<float>();
  float* xo = x_out.data_ptr<float>();
  float* xl = xl_out.data_ptr<float>();
  for (int64_t i = 0; i < B * C; ++i) xo[i] = xp[i];
  if (dx.has_value()) {
    check_contiguous(*dx, "dx");
    const float* d = dx->data_ptr<float>();
    for (int64_t i = 0; i < B * C; ++i) xo[i] += d[i];
  }
  for (int64_t b = 0; b < B; ++b)
    layer_norm(xo + b * C, weight.data_ptr<float>(), bias.data_ptr<float>(), C, xl + b * C);
  // the mixed inputs, (G, B, C): small, written once and read by every output row
  std::vector<float> a(shift.has_value() ? G * B * C : 0);
  const float* mixp = mix.data_ptr<float>();
  if (shift.has_value()) {
    check_contiguous(*shift, "shift");
    const float* s = shift->data_ptr<float>();
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < B * C; ++i) {
        const float l = xl[i];
        a[g * B * C + i] = l + (s[i] - l) * mixp[g * C + i % C];
      }
  }
  const int32_t* seg = segments.data_ptr<int32_t>();
  for (int64_t j = 0; j < segments.numel(); ++j)
    TORCH_CHECK(seg[j] >= 0 && seg[j] % 256 < G && seg[j] / 256 <= ACT_RELU2, "vision_rwkv_cpu: ln_mix_matmul_: "
                "segment ", j, " is ", seg[j], ", expected a mix row below ", G, " plus 256 times an activation 0-3");
  if (B == 0) return;
  float* op = out.data_ptr<float>();
  with_weights(w, [&](auto wp) {
    using W = pointee<decltype(wp)>;
    at::parallel_for(0, N, grain(C * w.element_size()), [&](int64_t n0, int64_t n1) {
      float y[2 * MAX_ROWS];
      for (int64_t n = n0; n < n1;) {
        const int32_t s = seg[n / block_n];
        const int64_t m = s % 256;
        const int act = s / 256;
        const float* in = shift.has_value() ? a.data() + m * B * C : xl;
        const int R = pairs(B) && n + 1 < n1 && seg[(n + 1) / block_n] == s ? 2 : 1;  // one segment
        (R == 2 ? DOTS<W>::two : DOTS<W>::one)[B - 1](in, C, wp + n * C, C, y);
        for (int r = 0; r < R; ++r)
          for (int64_t b = 0; b < B; ++b) op[b * N + n + r] = activate(y[r * B + b], act);
        n += R;
      }
    });
  });
}

// out (B, G*N) <- x @ w.T in G groups: x (B, G*K), rows at any stride, columns contiguous; w (G*N, K).
// Output columns [g*N, (g+1)*N) read input columns [g*K, (g+1)*K).
inline void linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& out, int64_t groups) {
  check_f32(x, "linear_'s x");
  check_weights(w, "linear_'s w");
  check_contiguous(out, "linear_'s out");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "vision_rwkv_cpu: linear_'s x must be (B, K) with contiguous rows");
  const int64_t B = x.size(0), K = w.size(1), N = w.size(0) / groups;
  TORCH_CHECK(B <= MAX_ROWS, "vision_rwkv_cpu: linear_ takes at most ", MAX_ROWS, " rows, got ", B);
  TORCH_CHECK(x.size(1) == groups * K && out.size(0) == B && out.size(1) == groups * N && w.size(0) % groups == 0,
              "vision_rwkv_cpu: linear_: shapes");
  if (B == 0) return;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t sx = x.stride(0), GN = groups * N;
  with_weights(w, [&](auto wp) {
    using W = pointee<decltype(wp)>;
    at::parallel_for(0, GN, grain(K * w.element_size()), [&](int64_t n0, int64_t n1) {
      float y[2 * MAX_ROWS];
      for (int64_t n = n0; n < n1;) {
        const int R = pairs(B) && n + 1 < n1 && (n + 1) / N == n / N ? 2 : 1;  // one group
        (R == 2 ? DOTS<W>::two : DOTS<W>::one)[B - 1](xp + (n / N) * K, sx, wp + n * K, K, y);
        for (int r = 0; r < R; ++r)
          for (int64_t b = 0; b < B; ++b) op[b * GN + n + r] = y[r * B + b];
        n += R;
      }
    });
  });
}

}  // namespace cpu_kernels
