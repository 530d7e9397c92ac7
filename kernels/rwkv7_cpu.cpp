// The RWKV-7 decoder's fused inference operations on the CPU (library vision_rwkv_cpu), with the contracts
// of their PyTorch references (vision_rwkv/ops/rwkv7/reference.py; the recurrence: ops/wkv7/reference.py):
//
//   RNN mode (a step):   ln_mix_matmul_, linear_ (one-pass products) and wkv_step_
//   GPT mode (a prefill): ln_mix_seq_, wkv_pre_, wkv_post_, relu2_ and lora_act_ around torch's products,
//                        and wkv7_forward, the WKV-7 recurrence over a sequence (forward only)
//
// A step at a few rows reads every weight once and does little arithmetic per byte, so its speed is the
// speed at which the weights stream from memory. BLAS's and oneDNN's products at one row read fp32 weights
// at a fraction of that on a 2-core machine (BENCHMARKS.md); these products read each weight row once,
// for all rows of the input together, 16 floats at a time, with the output rows split over torch's
// OpenMP threads. The small operations around them (LayerNorm with the token-shift mixes, the activations,
// the WKV state update with ln_x, the bonus and the gate) run in the same loops or in one pass per head,
// instead of as about eighty PyTorch operations a layer; a prefill's, in one pass over the rows each.
//
// Everything is fp32 (the products' inputs and outputs, the residual stream and the state) but the weights
// of the step's products and its embedding, which may be bf16: widened to fp32 as they are read, they halve
// the bytes a step streams.
// Built with -march=native for the machine that runs it (the build's cache key has the CPU's flags). The
// vectors, the products, LayerNorm and ln_mix_matmul / linear are in cpu_common.h, which RWKV-4's step
// (rwkv4_cpu.cpp, in the same library) shares.

#include "cpu_common.h"

namespace {

using namespace cpu_kernels;

// One time-mix step after its products (reference.wkv_step_): state (B,H,N,N) [value, key], updated in
// place; rkv (3,B,C) and lora (4,B,C) views with contiguous columns; vec (8,C) in VEC_ROWS order;
// v_first (B,C), written by layer 0 and read by the others; out (B,C) <- (GroupNorm(S r) + bonus) * g.
void wkv_step(const at::Tensor& state, const at::Tensor& rkv, const at::Tensor& lora, const at::Tensor& vec,
              const at::Tensor& v_first, bool layer0, const at::Tensor& out, double log_decay_scale) {
  check_contiguous(state, "the state");
  check_contiguous(vec, "vec");
  check_contiguous(v_first, "v_first");
  check_contiguous(out, "wkv_step_'s out");
  check_f32(rkv, "rkv");
  check_f32(lora, "lora");
  TORCH_CHECK(rkv.stride(2) == 1 && lora.stride(2) == 1, "vision_rwkv_cpu: rkv and lora need contiguous columns");
  const int64_t B = state.size(0), H = state.size(1), N = state.size(2), C = H * N;
  TORCH_CHECK(rkv.size(1) == B && rkv.size(2) == C && lora.size(1) == B && lora.size(2) == C && vec.size(1) == C,
              "vision_rwkv_cpu: wkv_step_: shapes");
  const float* rp = rkv.data_ptr<float>();
  const float* lp = lora.data_ptr<float>();
  const int64_t rg = rkv.stride(0), rb = rkv.stride(1), lg = lora.stride(0), lb = lora.stride(1);
  const float* vp = vec.data_ptr<float>();
  float* sp = state.data_ptr<float>();
  float* vf = v_first.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float scale = float(log_decay_scale);
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(7 * N);
    float *kk = buf.data(), *ka = kk + N, *k = ka + N, *v = k + N, *decay = v + N, *y = decay + N, *r = y + N;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H, c0 = h * N;
      const float* row = rp + b * rb + c0;
      const float* lrow = lp + b * lb + c0;
      const float* vec_h = vp + c0;
      double norm = 0.0;
      for (int64_t i = 0; i < N; ++i) {
        const float w0 = vec_h[i], a0 = vec_h[C + i], v0 = vec_h[2 * C + i], k_k = vec_h[3 * C + i],
                    k_a = vec_h[4 * C + i];
        const float kv = row[rg + i], vv = row[2 * rg + i];
        const float v_l = lrow[i], w_l = lrow[lg + i], a_l = lrow[2 * lg + i];
        r[i] = row[i];
        float vm = vv;
        if (layer0) vf[b * C + c0 + i] = vv;
        else vm = vv + (vf[b * C + c0 + i] - vv) * sigmoid(v0 + v_l);
        v[i] = vm;
        decay[i] = std::exp(-scale * sigmoid(w0 + w_l));
        const float a = sigmoid(a0 + a_l);
        kk[i] = kv * k_k;
        norm += double(kk[i]) * kk[i];
        k[i] = kv * (1.f + (a - 1.f) * k_a);
        ka[i] = a;  // kk * a once kk is normalised
      }
      const float inv = 1.f / std::max(float(std::sqrt(norm)), 1e-12f);  // F.normalize's eps
      for (int64_t i = 0; i < N; ++i) {
        kk[i] *= inv;
        ka[i] *= kk[i];
      }
      float* S = sp + t * N * N;
      for (int64_t i = 0; i < N; ++i) {  // value row i: S[i,:] <- S[i,:] * decay + (S[i,:] . -kk) kk*a + v_i k
        float* Si = S + i * N;
        float sa = 0.f;
        for (int64_t j = 0; j < N; ++j) sa -= Si[j] * kk[j];
        float acc = 0.f;
        for (int64_t j = 0; j < N; ++j) {
          const float s = Si[j] * decay[j] + sa * ka[j] + v[i] * k[j];
          Si[j] = s;
          acc += s * r[j];
        }
        y[i] = acc;
      }
      double mean = 0.0, var = 0.0, bonus = 0.0;
      for (int64_t i = 0; i < N; ++i) mean += y[i];
      mean /= N;
      for (int64_t i = 0; i < N; ++i) var += (y[i] - mean) * (y[i] - mean);
      const double istd = 1.0 / std::sqrt(var / N + LN_X_EPS);
      const float* r_k = vec_h + 5 * C;
      for (int64_t i = 0; i < N; ++i) bonus += double(r[i]) * k[i] * r_k[i];
      const float* ln_w = vec_h + 6 * C;
      const float* ln_b = vec_h + 7 * C;
      const float* g = lrow + 3 * lg;
      for (int64_t i = 0; i < N; ++i)
        op[b * C + c0 + i] = (float((y[i] - mean) * istd) * ln_w[i] + ln_b[i] + float(bonus) * v[i]) * g[i];
    }
  });
}

// One head's T steps on its transposed state ST [key j][value i] (N x N): sa = S a, then
// S <- S diag(d) + sa b^T + v k^T and y = S r, each a sum over columns of values (contiguous, no horizontal
// sums). x points at the head's inputs at t = 0; consecutive steps are `stride` floats apart.
void wkv_head(float* ST, int64_t N, const float* r, const float* d, const float* k, const float* v,
              const float* a, const float* b, float* y, int64_t T, int64_t stride) {
  std::vector<float> buf(2 * N);
  float *sa = buf.data(), *yt = sa + N;
  for (int64_t t = 0; t < T; ++t, r += stride, d += stride, k += stride, v += stride, a += stride, b += stride,
               y += stride) {
    for (int64_t i = 0; i < N; ++i) sa[i] = 0.f, yt[i] = 0.f;
    for (int64_t j = 0; j < N; ++j) {
      const float* col = ST + j * N;
      for (int64_t i = 0; i < N; ++i) sa[i] += col[i] * a[j];
    }
    for (int64_t j = 0; j < N; ++j) {
      float* col = ST + j * N;
      for (int64_t i = 0; i < N; ++i) {
        const float s = col[i] * d[j] + sa[i] * b[j] + v[i] * k[j];
        col[i] = s;
        yt[i] += s * r[j];
      }
    }
    std::memcpy(y, yt, N * sizeof(float));
  }
}

// The same with N fixed at compile time (a multiple of 16): sa, v and y live in registers as N/16 vectors,
// and each sum over columns runs as two chains (even and odd columns), so that no sum waits on the last.
template <int N>
void wkv_head_t(float* ST, const float* r, const float* d, const float* k, const float* v, const float* a,
                const float* b, float* y, int64_t T, int64_t stride) {
  constexpr int V = N / 16;
  for (int64_t t = 0; t < T; ++t, r += stride, d += stride, k += stride, v += stride, a += stride, b += stride,
               y += stride) {
    v16 s0[V], s1[V], sa[V], vv[V];
    for (int u = 0; u < V; ++u) s0[u] = v16{}, s1[u] = v16{}, vv[u] = load16(v + 16 * u);
    for (int j = 0; j < N; j += 2) {
      const float* c0 = ST + j * N;
      for (int u = 0; u < V; ++u) {
        s0[u] += load16(c0 + 16 * u) * a[j];
        s1[u] += load16(c0 + N + 16 * u) * a[j + 1];
      }
    }
    for (int u = 0; u < V; ++u) sa[u] = s0[u] + s1[u], s0[u] = v16{}, s1[u] = v16{};
    for (int j = 0; j < N; j += 2) {
      float* c0 = ST + j * N;
      float* c1 = c0 + N;
      for (int u = 0; u < V; ++u) {
        const v16 n0 = load16(c0 + 16 * u) * d[j] + sa[u] * b[j] + vv[u] * k[j];
        const v16 n1 = load16(c1 + 16 * u) * d[j + 1] + sa[u] * b[j + 1] + vv[u] * k[j + 1];
        std::memcpy(c0 + 16 * u, &n0, sizeof(n0));
        std::memcpy(c1 + 16 * u, &n1, sizeof(n1));
        s0[u] += n0 * r[j];
        s1[u] += n1 * r[j + 1];
      }
    }
    for (int u = 0; u < V; ++u) {
      const v16 o = s0[u] + s1[u];
      std::memcpy(y + 16 * u, &o, sizeof(o));
    }
  }
}

// The WKV-7 recurrence over T steps (kernels/README.md): r, d, k, v, a, b (B,T,H,N) contiguous fp32, where
// d is the decay itself (exp(-exp(-0.5) sigmoid(w)), computed by the caller in one vectorised pass); s0
// (B,H,N,N) fp32 [value, key] or None (zeros). Returns y (B,T,H,N) and the final state. One head per task,
// on a transposed copy of its state [key, value] (wkv_head); head sizes 16, 32, 64 and 128 take the
// register form (wkv_head_t).
std::tuple<at::Tensor, at::Tensor> wkv7_forward(const at::Tensor& r, const at::Tensor& d, const at::Tensor& k,
                                                const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
                                                const c10::optional<at::Tensor>& s0) {
  TORCH_CHECK(r.dim() == 4, "vision_rwkv_cpu: wkv7_forward takes (B, T, H, N) inputs");
  for (const auto* t : {&r, &d, &k, &v, &a, &b}) {
    check_contiguous(*t, "wkv7_forward's inputs");
    TORCH_CHECK(t->sizes() == r.sizes(), "vision_rwkv_cpu: wkv7_forward's inputs must share one shape (B, T, H, N)");
  }
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  at::Tensor state;
  if (s0.has_value()) {
    check_contiguous(*s0, "the initial state");
    TORCH_CHECK(s0->dim() == 4 && s0->size(0) == B && s0->size(1) == H && s0->size(2) == N && s0->size(3) == N,
                "vision_rwkv_cpu: wkv7_forward's state must be (B, H, N, N)");
    state = s0->clone();
  } else {
    state = at::zeros({B, H, N, N}, r.options());
  }
  at::Tensor y = at::empty_like(r);
  const float *rp = r.data_ptr<float>(), *dp = d.data_ptr<float>(), *kp = k.data_ptr<float>(),
              *vp = v.data_ptr<float>(), *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* sp = state.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(N * N);
    float* ST = buf.data();
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bi = task / H, h = task % H, at = (bi * T * H + h) * N, stride = H * N;
      float* S = sp + task * N * N;
      for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < N; ++j) ST[j * N + i] = S[i * N + j];
      const float *rt = rp + at, *dt = dp + at, *kt = kp + at, *vt = vp + at, *aa = ap + at, *bt = bp + at;
      switch (N) {
        case 16: wkv_head_t<16>(ST, rt, dt, kt, vt, aa, bt, yp + at, T, stride); break;
        case 32: wkv_head_t<32>(ST, rt, dt, kt, vt, aa, bt, yp + at, T, stride); break;
        case 64: wkv_head_t<64>(ST, rt, dt, kt, vt, aa, bt, yp + at, T, stride); break;
        case 128: wkv_head_t<128>(ST, rt, dt, kt, vt, aa, bt, yp + at, T, stride); break;
        default: wkv_head(ST, N, rt, dt, kt, vt, aa, bt, yp + at, T, stride);
      }
      for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < N; ++j) S[i * N + j] = ST[j * N + i];
    }
  });
  return {y, state};
}

// ---- GPT mode's (a prefill's) operations around its products: reference.ln_mix_seq_, wkv_pre_, wkv_post_,
// relu2_ and lora_act_, row by row in one pass each, the rows split over torch's threads.

// Row m's element c of a (G, M, C) view with contiguous columns.
inline const float* row_of(const at::Tensor& t, int64_t g, int64_t m) {
  return t.data_ptr<float>() + g * t.stride(0) + m * t.stride(1);
}

void check_rows(const at::Tensor& t, int64_t G, int64_t M, int64_t C, const char* what) {
  check_f32(t, what);
  TORCH_CHECK(t.dim() == 3 && t.size(0) == G && t.size(1) == M && t.size(2) == C && t.stride(2) == 1,
              "vision_rwkv_cpu: ", what, " must be (", G, ", ", M, ", ", C, ") with contiguous columns");
}

// x (B,T,C) read; x_out <- x + dx (when dx is given); xl = LayerNorm(x + dx); out (G,B,T,C) <- xl + (prev - xl)
// * mix[g], prev being xl one position earlier and shift (B,C) at the first; shift <- xl[:, -1].
void ln_mix_seq(const at::Tensor& x, const c10::optional<at::Tensor>& dx, const c10::optional<at::Tensor>& x_out,
                const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& shift, const at::Tensor& mix,
                const at::Tensor& out) {
  for (const auto* t : {&x, &weight, &bias, &shift, &mix, &out}) check_contiguous(*t, "ln_mix_seq_'s tensors");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), G = mix.size(0), M = B * T;
  TORCH_CHECK(out.numel() == G * M * C && shift.numel() == B * C, "vision_rwkv_cpu: ln_mix_seq_: shapes");
  std::vector<float> xl(M * C);
  const float* xp = x.data_ptr<float>();
  const float* dp = nullptr;
  float* xo = nullptr;
  if (dx.has_value()) {
    check_contiguous(*dx, "dx");
    check_contiguous(*x_out, "x_out");
    dp = dx->data_ptr<float>();
    xo = x_out->data_ptr<float>();
  }
  const float *w = weight.data_ptr<float>(), *bb = bias.data_ptr<float>();
  at::parallel_for(0, M, grain(C * 16), [&](int64_t m0, int64_t m1) {
    std::vector<float> xs(C);
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = xp + m * C;
      if (dp != nullptr) {
        for (int64_t c = 0; c < C; ++c) xs[c] = xr[c] + dp[m * C + c];
        std::memcpy(xo + m * C, xs.data(), C * sizeof(float));
        xr = xs.data();
      }
      layer_norm(xr, w, bb, C, xl.data() + m * C);
    }
  });
  float* sp = shift.data_ptr<float>();
  const float* mixp = mix.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, grain(C * 4 * G), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* cur = xl.data() + m * C;
      const float* prev = m % T ? cur - C : sp + (m / T) * C;
      for (int64_t g = 0; g < G; ++g) {
        float* o = op + (g * M + m) * C;
        const float* mg = mixp + g * C;
        each16(C, [&](auto V, int64_t c) {
          const auto x = load_as(V, cur + c);
          store_as(o + c, x + (load_as(V, prev + c) - x) * load_as(V, mg + c));
        });
      }
    }
  });
  for (int64_t b = 0; b < B; ++b) std::memcpy(sp + b * C, xl.data() + (b * T + T - 1) * C, C * sizeof(float));
}

// rkv (3,M,C) = r, k, v and lora (4,M,C) in LORA_ROWS order; vec (8,C); v_first (M,C), written by layer 0 and
// read by the others. out (5,M,C) <- w (the raw decay logit), k, v, -kk, kk*a: the WKV kernel's inputs.
void wkv_pre(const at::Tensor& rkv, const at::Tensor& lora, const at::Tensor& vec, const at::Tensor& v_first,
             bool layer0, const at::Tensor& out, int64_t n_head) {
  const int64_t M = rkv.size(1), C = rkv.size(2), N = C / n_head;
  check_rows(rkv, 3, M, C, "rkv");
  check_rows(lora, 4, M, C, "lora");
  check_contiguous(vec, "vec");
  check_contiguous(v_first, "v_first");
  check_contiguous(out, "wkv_pre_'s out");
  TORCH_CHECK(out.numel() == 5 * M * C && v_first.numel() == M * C && C % n_head == 0,
              "vision_rwkv_cpu: wkv_pre_: shapes");
  const float* vp = vec.data_ptr<float>();
  float* vf = v_first.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, grain(C * 32), [&](int64_t m0, int64_t m1) {
    std::vector<float> kk(N), a(N);
    for (int64_t m = m0; m < m1; ++m) {
      const float *k = row_of(rkv, 1, m), *v = row_of(rkv, 2, m);
      const float *v_l = row_of(lora, 0, m), *w_l = row_of(lora, 1, m), *a_l = row_of(lora, 2, m);
      float* o[5];
      for (int i = 0; i < 5; ++i) o[i] = op + (i * M + m) * C;
      float* vfm = vf + m * C;
      for (int64_t c0 = 0; c0 < C; c0 += N) {
        // everything but the normalisation, and sum(kk^2) for it
        Sum norm;
        each16(N, [&](auto V, int64_t j) {
          using T = decltype(V);
          const int64_t c = c0 + j;
          const T kc = load_as(V, k + c), vc = load_as(V, v + c);
          T vm = vc;
          if (layer0) store_as(vfm + c, vc);
          else vm = vc + (load_as(V, vfm + c) - vc) * sigmoid_of(load_as(V, vp + 2 * C + c) + load_as(V, v_l + c));
          const T ac = sigmoid_of(load_as(V, vp + C + c) + load_as(V, a_l + c));
          const T kkc = kc * load_as(V, vp + 3 * C + c);
          store_as(a.data() + j, ac);
          store_as(kk.data() + j, kkc);
          store_as(o[0] + c, load_as(V, vp + c) + load_as(V, w_l + c));
          store_as(o[1] + c, kc * (1.f + (ac - 1.f) * load_as(V, vp + 4 * C + c)));
          store_as(o[2] + c, vm);
          norm += kkc * kkc;
        });
        const float inv = 1.f / std::max(std::sqrt(norm.value()), 1e-12f);  // F.normalize's eps
        for (int64_t j = 0; j < N; ++j) {
          o[3][c0 + j] = -kk[j] * inv;
          o[4][c0 + j] = kk[j] * inv * a[j];
        }
      }
    }
  });
}

// y (M,C) the WKV kernel's output; r, k, v (M,C) as it took them; g (M,C) the gate; vec (8,C).
// out (M,C) <- (GroupNorm(y) + bonus) * g, bonus = sum(r * k * r_k) * v a head.
void wkv_post(const at::Tensor& y, const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& g, const at::Tensor& vec, const at::Tensor& out, int64_t n_head) {
  const int64_t M = y.size(0), C = y.size(1), N = C / n_head;
  for (const auto* t : {&y, &r, &k, &v, &g, &out}) {
    check_f32(*t, "wkv_post_'s tensors");
    TORCH_CHECK(t->dim() == 2 && t->size(0) == M && t->size(1) == C && t->stride(1) == 1,
                "vision_rwkv_cpu: wkv_post_'s tensors must be (M, C) with contiguous columns");
  }
  check_contiguous(vec, "vec");
  const float* vp = vec.data_ptr<float>();
  const float *r_k = vp + 5 * C, *ln_w = vp + 6 * C, *ln_b = vp + 7 * C;
  at::parallel_for(0, M, grain(C * 24), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float *yr = y.data_ptr<float>() + m * y.stride(0), *rr = r.data_ptr<float>() + m * r.stride(0),
                  *kr = k.data_ptr<float>() + m * k.stride(0), *vr = v.data_ptr<float>() + m * v.stride(0),
                  *gr = g.data_ptr<float>() + m * g.stride(0);
      float* o = out.data_ptr<float>() + m * out.stride(0);
      for (int64_t c0 = 0; c0 < C; c0 += N) {
        Sum sum, bonus;
        each16(N, [&](auto V, int64_t j) {
          const int64_t c = c0 + j;
          sum += load_as(V, yr + c);
          bonus += load_as(V, rr + c) * load_as(V, kr + c) * load_as(V, r_k + c);
        });
        const float mean = sum.value() / N, bon = bonus.value();
        Sum var;
        each16(N, [&](auto V, int64_t j) {
          const auto d = load_as(V, yr + c0 + j) - mean;
          var += d * d;
        });
        const float istd = 1.f / std::sqrt(var.value() / N + LN_X_EPS);
        each16(N, [&](auto V, int64_t j) {
          const int64_t c = c0 + j;
          store_as(o + c, ((load_as(V, yr + c) - mean) * istd * load_as(V, ln_w + c) + load_as(V, ln_b + c) +
                           bon * load_as(V, vr + c)) * load_as(V, gr + c));
        });
      }
    }
  });
}

// h <- relu(h)^2, in place (contiguous, fp32).
void relu2(const at::Tensor& h) {
  check_contiguous(h, "relu2_'s h");
  float* p = h.data_ptr<float>();
  at::parallel_for(0, h.numel(), 1 << 14, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) p[i] = p[i] > 0.f ? p[i] * p[i] : 0.f;
  });
}

// h (4,B,R) in LORA_ROWS order: tanh on w (row 1), sigmoid on g (row 3), in place.
void lora_act(const at::Tensor& h) {
  check_contiguous(h, "lora_act_'s h");
  TORCH_CHECK(h.dim() == 3 && h.size(0) == 4, "vision_rwkv_cpu: lora_act_ takes (4, B, R)");
  const int64_t n = h.size(1) * h.size(2);
  float* w = h.data_ptr<float>() + n;
  float* g = h.data_ptr<float>() + 3 * n;
  at::parallel_for(0, n, 1 << 13, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      w[i] = std::tanh(w[i]);
      g[i] = sigmoid(g[i]);
    }
  });
}

// ---- The whole fused step in one call: the engine's _step_fused (lm/engine.py) without a Python round trip
// between its operations, which at a small model's size cost about as much as the operations themselves.

constexpr int64_t LAYER_TENSORS = 12;  // the order of engine.StepEngine._step_layers

// tokens (B,) int64 -> xf (B,C) <- LayerNorm_out of the last residual stream; the state (att_shift, wkv,
// ffn_shift: (L,B,C), (L,B,H,N,N), (L,B,C) fp32) is updated in place. layers holds LAYER_TENSORS a layer:
// ln1 weight and bias, mix_att, w_in, lora2_in, vec, w_out, ln2 weight and bias, mix_ffn, w_key, w_value.
void step_fused(const at::Tensor& tokens, const at::Tensor& emb, const at::Tensor& ln0_w, const at::Tensor& ln0_b,
                at::TensorList layers, const at::Tensor& seg_in, const at::Tensor& seg_key,
                const at::Tensor& att_shift, const at::Tensor& wkv, const at::Tensor& ffn_shift,
                const at::Tensor& ln_out_w, const at::Tensor& ln_out_b, const at::Tensor& xf, int64_t block_n,
                int64_t lora_rank, double log_decay_scale) {
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.dim() == 1 && tokens.is_contiguous(),
              "vision_rwkv_cpu: step_fused_ takes contiguous int64 tokens (B,)");
  for (const auto* t : {&ln0_w, &ln0_b, &ln_out_w, &ln_out_b, &xf}) check_contiguous(*t, "step_fused_'s tensors");
  check_weights(emb, "step_fused_'s emb");
  const int64_t B = tokens.size(0), C = emb.size(1), R = lora_rank;
  const int64_t L = static_cast<int64_t>(layers.size()) / LAYER_TENSORS;
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(layers.size()) == L * LAYER_TENSORS && xf.size(0) == B &&
                  xf.size(1) == C,
              "vision_rwkv_cpu: step_fused_: ", LAYER_TENSORS, " tensors a layer, and xf (B, C)");
  TORCH_CHECK(att_shift.dim() == 3 && att_shift.size(0) == L && att_shift.size(1) == B && att_shift.size(2) == C &&
                  ffn_shift.sizes() == att_shift.sizes() && wkv.dim() == 5 && wkv.size(0) == L && wkv.size(1) == B,
              "vision_rwkv_cpu: step_fused_: the state must hold ", L, " layers of ", B, " rows of width ", C);
  const auto f32 = xf.options();
  at::Tensor xa = at::empty({B, C}, f32), xb = at::empty({B, C}, f32), xl_att = at::empty({B, C}, f32),
             xl_ffn = at::empty({B, C}, f32), v_first = at::empty({B, C}, f32), y = at::empty({B, C}, f32),
             dx = at::empty({B, C}, f32), out_in = at::empty({B, 3 * C + 4 * R}, f32),
             lora_out = at::empty({B, 4 * C}, f32);
  embed_layer_norm(tokens, emb, ln0_w, ln0_b, xa, "step_fused_");
  const at::Tensor rkv = out_in.narrow(1, 0, 3 * C).view({B, 3, C}).transpose(0, 1);
  const at::Tensor lora = lora_out.view({B, 4, C}).transpose(0, 1);
  const at::Tensor lora_in = out_in.narrow(1, 3 * C, 4 * R);
  at::Tensor k;
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor* w = layers.data() + i * LAYER_TENSORS;
    if (i == 0) k = at::empty({B, w[10].size(0)}, f32);
    const at::Tensor att_i = att_shift.select(0, i), ffn_i = ffn_shift.select(0, i);
    ln_mix_matmul(xa, i ? c10::optional<at::Tensor>(dx) : c10::nullopt, xb, xl_att, w[0], w[1], att_i, w[2],
                  w[3], seg_in, out_in, block_n, i ? c10::optional<at::Tensor>(xl_ffn) : c10::nullopt,
                  i ? c10::optional<at::Tensor>(ffn_shift.select(0, i - 1)) : c10::nullopt);
    linear(lora_in, w[4], lora_out, 4);
    wkv_step(wkv.select(0, i), rkv, lora, w[5], v_first, i == 0, y, log_decay_scale);
    linear(y, w[6], dx, 1);
    ln_mix_matmul(xb, dx, xa, xl_ffn, w[7], w[8], ffn_i, w[9], w[10], seg_key, k, block_n, xl_att, att_i);
    linear(k, w[11], dx, 1);
  }
  ffn_shift.select(0, L - 1).copy_(xl_ffn);
  add_layer_norm(xa, dx, ln_out_w, ln_out_b, xf);
}

}  // namespace

TORCH_LIBRARY(vision_rwkv_cpu, m) {
  m.def("ln_mix_matmul_(Tensor x, Tensor? dx, Tensor(a!) x_out, Tensor(b!) xl_out, Tensor weight, Tensor bias, "
        "Tensor? shift, Tensor mix, Tensor w, Tensor segments, Tensor(c!) out, int block_n, Tensor? prev_xl, "
        "Tensor(d!)? prev_shift) -> ()");
  m.def("linear_(Tensor x, Tensor w, Tensor(a!) out, int groups) -> ()");
  m.def("wkv_step_(Tensor(a!) state, Tensor rkv, Tensor lora, Tensor vec, Tensor(b!) v_first, bool layer0, "
        "Tensor(c!) out, float log_decay_scale) -> ()");
  m.def("ln_mix_seq_(Tensor x, Tensor? dx, Tensor(a!)? x_out, Tensor weight, Tensor bias, Tensor(b!) shift, "
        "Tensor mix, Tensor(c!) out) -> ()");
  m.def("wkv_pre_(Tensor rkv, Tensor lora, Tensor vec, Tensor(a!) v_first, bool layer0, Tensor(b!) out, "
        "int n_head) -> ()");
  m.def("wkv_post_(Tensor y, Tensor r, Tensor k, Tensor v, Tensor g, Tensor vec, Tensor(a!) out, int n_head) -> ()");
  m.def("relu2_(Tensor(a!) h) -> ()");
  m.def("lora_act_(Tensor(a!) h) -> ()");
  m.def("wkv7_forward(Tensor r, Tensor d, Tensor k, Tensor v, Tensor a, Tensor b, Tensor? s0) -> (Tensor, Tensor)");
  m.def("step_fused_(Tensor tokens, Tensor emb, Tensor ln0_w, Tensor ln0_b, Tensor[] layers, Tensor seg_in, "
        "Tensor seg_key, Tensor(a!) att_shift, Tensor(b!) wkv, Tensor(c!) ffn_shift, Tensor ln_out_w, "
        "Tensor ln_out_b, Tensor(d!) xf, int block_n, int lora_rank, float log_decay_scale) -> ()");
}

TORCH_LIBRARY_IMPL(vision_rwkv_cpu, CPU, m) {
  m.impl("ln_mix_matmul_", &ln_mix_matmul);
  m.impl("linear_", &linear);
  m.impl("wkv_step_", &wkv_step);
  m.impl("wkv7_forward", &wkv7_forward);
  m.impl("ln_mix_seq_", &ln_mix_seq);
  m.impl("wkv_pre_", &wkv_pre);
  m.impl("wkv_post_", &wkv_post);
  m.impl("relu2_", &relu2);
  m.impl("lora_act_", &lora_act);
  m.impl("step_fused_", &step_fused);
}
