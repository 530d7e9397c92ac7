// WKV-4 forward and backward, with the state (num, den, max) in and out. See kernels/README.md for the math.
//
// One thread per (batch, channel), threads consecutive over channels so every step's loads and stores
// are coalesced. The recurrence is latency-bound (few threads per multiprocessor at small B*C), so the
// loop is arranged for instruction-level parallelism: steps come in register tiles (the next tile's
// loads are issued before the current one computes), the tiles are fully unrolled, and the only true
// serial chains are max_{t+1} = max(max_t + w, k_t) (an add and a max) and one FMA per state value;
// the exponentials hang off those chains, so the scheduler overlaps them across steps.
//
// The forward writes a checkpoint of the state every CKPT steps when the backward will need it. The
// backward walks the checkpoint intervals in reverse: it recomputes each interval's steps from its
// checkpoint into registers (one interval ahead, so that work overlaps the reverse pass of the one
// after it), then runs the adjoint recurrence backwards over them, in the scaled form
// gaa_t = dL/da_t * e^{max_t}, gbb_t = dL/db_t * e^{max_t}, where every exponent is <= 0.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace wkv4 {

constexpr int TILE = 16;  // forward: steps per register tile
constexpr int CKPT = 8;   // steps per state checkpoint (and per backward tile); TILE is a multiple of it
constexpr int BLOCK = 32; // threads per block: small blocks spread a small B*C over every multiprocessor
// The backward's register budget: 12 blocks of 32 per multiprocessor (<= 168 registers a thread), so that
// 64 x 768 channels (1536 blocks) fit the 132 SMs of an H100/H200 in one wave.
constexpr int BACKWARD_BLOCKS_PER_SM = 12;
constexpr float MAX_INIT = -1e38f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename F> __device__ __forceinline__ F from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Every exponent below is <= 0 (or -1e38-ish for a fresh state): ex2.approx is accurate to ~2 ulp there.
__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }

struct State {
  float num, den, max;
};

// Where one checkpoint's three values live: ckpt is (B, n_ckpt, 3, C), coalesced over channels.
__device__ __forceinline__ size_t ckpt_index(int b, int j, int n_ckpt, int C, int c) {
  return (static_cast<size_t>(b) * n_ckpt + j) * 3 * C + c;
}

// The two weights of a log-sum-exp pair (x, z): (e^{x-q}, e^{z-q}) with q = max(x, z). One of them is 1,
// so one exponential serves both (MUFU throughput bounds the kernel at large B*C). Ties give (1, 1).
struct Pair {
  float first, second;
};
__device__ __forceinline__ Pair softmax_weights(float x, float z) {
  const float d = x - z;
  const float e = fast_exp(-fabsf(d));
  return d >= 0.f ? Pair{1.f, e} : Pair{e, 1.f};
}

// One step: y_t from the state before token t, then the state after it.
__device__ __forceinline__ float forward_step(State& s, float w, float u, float k, float v) {
  const Pair x = softmax_weights(s.max, u + k);
  const float y = __fdividef(x.first * s.num + x.second * v, x.first * s.den + x.second);
  const float decayed = s.max + w;
  const Pair e = softmax_weights(decayed, k);
  s.num = e.first * s.num + e.second * v;
  s.den = e.first * s.den + e.second;
  s.max = fmaxf(decayed, k);  // the serial chain: an add and a max
  return y;
}

template <typename F>
__global__ void __launch_bounds__(BLOCK) forward_kernel(int B, int T, int C, const float* __restrict__ w_,
                                                        const float* __restrict__ u_, const F* __restrict__ k_,
                                                        const F* __restrict__ v_, const float* __restrict__ num0,
                                                        const float* __restrict__ den0, const float* __restrict__ max0,
                                                        F* __restrict__ y_, float* __restrict__ numT,
                                                        float* __restrict__ denT, float* __restrict__ maxT,
                                                        float* __restrict__ ckpt) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= B * C) return;
  const int b = idx / C, c = idx % C;
  const float w = w_[c], u = u_[c];
  State s = num0 ? State{num0[idx], den0[idx], max0[idx]} : State{0.f, 0.f, MAX_INIT};
  const size_t base = static_cast<size_t>(b) * T * C + c;
  const F* __restrict__ k = k_ + base;
  const F* __restrict__ v = v_ + base;
  F* __restrict__ y = y_ + base;
  const int n_ckpt = (T + CKPT - 1) / CKPT;

  F kc[TILE], vc[TILE], kn[TILE], vn[TILE];  // raw inputs: this tile and the next
#pragma unroll
  for (int i = 0; i < TILE; ++i) {
    if (i < T) { kc[i] = k[static_cast<size_t>(i) * C]; vc[i] = v[static_cast<size_t>(i) * C]; }
  }
  for (int t0 = 0; t0 < T; t0 += TILE) {
    const int t1 = t0 + TILE;
#pragma unroll
    for (int i = 0; i < TILE; ++i) {
      if (t1 + i < T) { kn[i] = k[static_cast<size_t>(t1 + i) * C]; vn[i] = v[static_cast<size_t>(t1 + i) * C]; }
    }
    if (t1 <= T) {  // a whole tile: no per-step bounds
#pragma unroll
      for (int i = 0; i < TILE; ++i) {
        if (ckpt && i % CKPT == 0) {
          const size_t at = ckpt_index(b, (t0 + i) / CKPT, n_ckpt, C, c);
          ckpt[at] = s.num; ckpt[at + C] = s.den; ckpt[at + 2 * C] = s.max;
        }
        y[static_cast<size_t>(t0 + i) * C] = from_float<F>(forward_step(s, w, u, to_float(kc[i]), to_float(vc[i])));
      }
    } else {
#pragma unroll
      for (int i = 0; i < TILE; ++i) {
        if (t0 + i < T) {
          if (ckpt && i % CKPT == 0) {
            const size_t at = ckpt_index(b, (t0 + i) / CKPT, n_ckpt, C, c);
            ckpt[at] = s.num; ckpt[at + C] = s.den; ckpt[at + 2 * C] = s.max;
          }
          y[static_cast<size_t>(t0 + i) * C] =
              from_float<F>(forward_step(s, w, u, to_float(kc[i]), to_float(vc[i])));
        }
      }
    }
#pragma unroll
    for (int i = 0; i < TILE; ++i) { kc[i] = kn[i]; vc[i] = vn[i]; }
  }
  numT[idx] = s.num;
  denT[idx] = s.den;
  maxT[idx] = s.max;
}

// What the reverse pass needs of one step, recomputed from the checkpoint.
struct Saved {
  float p;       // gy_t e^{max_t} / D_t: feeds gaa_t and gbb_t
  float r;       // gy_t e^{u+k_t} / D_t
  float y;       // y_t
  float e1;      // e^{w + max_t - max_{t+1}}
  float e2;      // e^{k_t - max_{t+1}}, negated (-1) when k_t won the max: the max gradient stops there
  float num, den, v;
};

// An interval's inputs (raw) and the checkpoint it starts from.
template <typename F>
struct Interval {
  F k[CKPT], v[CKPT], g[CKPT];
  float num, den, max;
};

template <typename F>
__device__ __forceinline__ void load_interval(Interval<F>& in, int j, int T, int C, size_t ck,
                                              const F* __restrict__ k, const F* __restrict__ v,
                                              const F* __restrict__ gy, const float* __restrict__ ckpt) {
#pragma unroll
  for (int i = 0; i < CKPT; ++i) {
    const int t = j * CKPT + i;
    if (t < T) {
      in.k[i] = k[static_cast<size_t>(t) * C];
      in.v[i] = v[static_cast<size_t>(t) * C];
      in.g[i] = gy ? gy[static_cast<size_t>(t) * C] : from_float<F>(0.f);
    }
  }
  in.num = ckpt[ck];
  in.den = ckpt[ck + C];
  in.max = ckpt[ck + 2 * C];
}

// The forward over one interval from its checkpoint, keeping what the reverse pass reads.
template <typename F>
__device__ __forceinline__ void recompute(Saved (&sv)[CKPT], const Interval<F>& in, int t0, int T, float w,
                                          float u) {
  float num = in.num, den = in.den, m = in.max;
#pragma unroll
  for (int i = 0; i < CKPT; ++i) {
    if (t0 + i < T) {
      const float kk = to_float(in.k[i]), vv = to_float(in.v[i]), g = to_float(in.g[i]);
      const Pair x = softmax_weights(m, u + kk);
      const float inv = __fdividef(1.f, x.first * den + x.second);
      sv[i].y = (x.first * num + x.second * vv) * inv;
      sv[i].p = g * x.first * inv;
      sv[i].r = g * x.second * inv;
      const float decayed = m + w;
      const Pair e = softmax_weights(decayed, kk);
      sv[i].e1 = e.first;
      sv[i].e2 = kk > decayed ? -1.f : e.second;
      sv[i].num = num;
      sv[i].den = den;
      sv[i].v = vv;
      num = e.first * num + e.second * vv;
      den = e.first * den + e.second;
      m = fmaxf(decayed, kk);
    }
  }
}

template <typename F>
__global__ void __launch_bounds__(BLOCK, BACKWARD_BLOCKS_PER_SM) backward_kernel(
    int B, int T, int C, const float* __restrict__ w_, const float* __restrict__ u_, const F* __restrict__ k_,
    const F* __restrict__ v_, const F* __restrict__ gy_, const float* __restrict__ num0,
    const float* __restrict__ den0, const float* __restrict__ numT, const float* __restrict__ denT,
    const float* __restrict__ gnumT, const float* __restrict__ gdenT, const float* __restrict__ gmaxT,
    const float* __restrict__ ckpt, F* __restrict__ gk_, F* __restrict__ gv_, float* __restrict__ gw_part,
    float* __restrict__ gu_part, float* __restrict__ gnum0, float* __restrict__ gden0, float* __restrict__ gmax0) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= B * C) return;
  const int b = idx / C, c = idx % C;
  const float w = w_[c], u = u_[c];
  const size_t base = static_cast<size_t>(b) * T * C + c;
  const F* __restrict__ k = k_ + base;
  const F* __restrict__ v = v_ + base;
  const F* __restrict__ gy = gy_ ? gy_ + base : nullptr;
  F* __restrict__ gk = gk_ + base;
  F* __restrict__ gv = gv_ + base;
  const int n_ckpt = (T + CKPT - 1) / CKPT;

  float gaa = gnumT ? gnumT[idx] : 0.f, gbb = gdenT ? gdenT[idx] : 0.f;
  // The final max's own gradient, net of what numT = a_T e^{-max_T} and denT carry: it runs back along
  // the chain of maxima to the step whose key won (or to the initial max).
  float e_max = (gmaxT ? gmaxT[idx] : 0.f) - gaa * numT[idx] - gbb * denT[idx];
  float gw = 0.f, gu = 0.f;

  // Software pipeline over the intervals, last to first: while the reverse pass runs over interval j
  // (a chain of FMAs), the forward recomputation of interval j-1 (the max chain and the exponentials)
  // is independent work beside it, and the inputs of interval j-2 are in flight.
  Interval<F> next;
  Saved cur[CKPT], prev[CKPT];
  {
    Interval<F> last;
    load_interval(last, n_ckpt - 1, T, C, ckpt_index(b, n_ckpt - 1, n_ckpt, C, c), k, v, gy, ckpt);
    if (n_ckpt > 1) load_interval(next, n_ckpt - 2, T, C, ckpt_index(b, n_ckpt - 2, n_ckpt, C, c), k, v, gy, ckpt);
    recompute(cur, last, (n_ckpt - 1) * CKPT, T, w, u);
  }
  for (int j = n_ckpt - 1; j >= 0; --j) {
    if (j > 0) {
      recompute(prev, next, (j - 1) * CKPT, T, w, u);
      if (j > 1) load_interval(next, j - 2, T, C, ckpt_index(b, j - 2, n_ckpt, C, c), k, v, gy, ckpt);
    }
    const int t0 = j * CKPT;
#pragma unroll
    for (int i = CKPT - 1; i >= 0; --i) {
      if (t0 + i < T) {
        const Saved& s = cur[i];
        const bool k_won = s.e2 < 0.f;
        const float e2 = k_won ? 1.f : s.e2;
        const float dy_direct = s.r * (s.v - s.y);
        gk[static_cast<size_t>(t0 + i) * C] =
            from_float<F>(dy_direct + e2 * (gaa * s.v + gbb) + (k_won ? e_max : 0.f));
        gv[static_cast<size_t>(t0 + i) * C] = from_float<F>(s.r + e2 * gaa);
        gu += dy_direct;
        gw += s.e1 * (gaa * s.num + gbb * s.den) + (k_won ? 0.f : e_max);
        e_max = k_won ? 0.f : e_max;
        gaa = s.p + s.e1 * gaa;
        gbb = s.e1 * gbb - s.p * s.y;
      }
    }
#pragma unroll
    for (int i = 0; i < CKPT; ++i) cur[i] = prev[i];
  }
  gw_part[idx] = gw;
  gu_part[idx] = gu;
  if (gnum0) {
    const float n0 = num0 ? num0[idx] : 0.f, d0 = den0 ? den0[idx] : 0.f;
    gnum0[idx] = gaa;
    gden0[idx] = gbb;
    gmax0[idx] = gaa * n0 + gbb * d0 + e_max;
  }
}

template <typename F>
void launch_forward(cudaStream_t stream, int B, int T, int C, const float* w, const float* u, const void* k,
                    const void* v, const float* num0, const float* den0, const float* max0, void* y, float* numT,
                    float* denT, float* maxT, float* ckpt) {
  const int blocks = (B * C + BLOCK - 1) / BLOCK;
  forward_kernel<F><<<blocks, BLOCK, 0, stream>>>(B, T, C, w, u, static_cast<const F*>(k),
                                                  static_cast<const F*>(v), num0, den0, max0, static_cast<F*>(y),
                                                  numT, denT, maxT, ckpt);
}

template <typename F>
void launch_backward(cudaStream_t stream, int B, int T, int C, const float* w, const float* u, const void* k,
                     const void* v, const void* gy, const float* num0, const float* den0, const float* numT,
                     const float* denT, const float* gnumT, const float* gdenT, const float* gmaxT,
                     const float* ckpt, void* gk, void* gv, float* gw_part, float* gu_part, float* gnum0,
                     float* gden0, float* gmax0) {
  const int blocks = (B * C + BLOCK - 1) / BLOCK;
  backward_kernel<F><<<blocks, BLOCK, 0, stream>>>(
      B, T, C, w, u, static_cast<const F*>(k), static_cast<const F*>(v), static_cast<const F*>(gy), num0, den0,
      numT, denT, gnumT, gdenT, gmaxT, ckpt, static_cast<F*>(gk), static_cast<F*>(gv), gw_part, gu_part, gnum0,
      gden0, gmax0);
}

}  // namespace wkv4

// dtype: 0 fp32, 1 bf16, 2 fp16. Returns false for an unknown dtype.
bool wkv4_forward_cuda(int dtype, cudaStream_t stream, int B, int T, int C, const float* w, const float* u,
                       const void* k, const void* v, const float* num0, const float* den0, const float* max0,
                       void* y, float* numT, float* denT, float* maxT, float* ckpt) {
  switch (dtype) {
    case 0: wkv4::launch_forward<float>(stream, B, T, C, w, u, k, v, num0, den0, max0, y, numT, denT, maxT, ckpt); return true;
    case 1: wkv4::launch_forward<__nv_bfloat16>(stream, B, T, C, w, u, k, v, num0, den0, max0, y, numT, denT, maxT, ckpt); return true;
    case 2: wkv4::launch_forward<__half>(stream, B, T, C, w, u, k, v, num0, den0, max0, y, numT, denT, maxT, ckpt); return true;
    default: return false;
  }
}

bool wkv4_backward_cuda(int dtype, cudaStream_t stream, int B, int T, int C, const float* w, const float* u,
                        const void* k, const void* v, const void* gy, const float* num0, const float* den0,
                        const float* numT, const float* denT, const float* gnumT, const float* gdenT,
                        const float* gmaxT, const float* ckpt, void* gk, void* gv, float* gw_part, float* gu_part,
                        float* gnum0, float* gden0, float* gmax0) {
#define WKV4_BACKWARD(F)                                                                                          \
  wkv4::launch_backward<F>(stream, B, T, C, w, u, k, v, gy, num0, den0, numT, denT, gnumT, gdenT, gmaxT, ckpt, gk, \
                           gv, gw_part, gu_part, gnum0, gden0, gmax0)
  switch (dtype) {
    case 0: WKV4_BACKWARD(float); return true;
    case 1: WKV4_BACKWARD(__nv_bfloat16); return true;
    case 2: WKV4_BACKWARD(__half); return true;
    default: return false;
  }
#undef WKV4_BACKWARD
}
