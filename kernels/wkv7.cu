// WKV-7 forward and backward, with the state in and out. See kernels/README.md for the math.
//
// One block per (batch, head). Row i of the state S (a value channel) evolves on its own given the
// step's vectors, so the rows are dealt out R to a thread and each row's key columns are split across
// LANES threads (float4 groups); dot products over a row finish with log2(LANES) warp shuffles. Each
// column value a thread reads from shared memory thus serves R rows, which keeps the kernel off the
// shared-memory bandwidth limit. Steps come in tiles of CHUNK, prefetched into registers while the
// previous tile computes, and are staged in shared memory as fp32 (decay already computed). Every
// CHUNK steps the forward writes a checkpoint of S (transposed); the backward walks each chunk in
// reverse, recovering S_{t-1} from S_t by inverting one step: S_{t-1}[:, i] = (S_t[:, i] - v k_i - sa b_i) / d_i.

#include <cstdint>
#include <type_traits>
#include <utility>

#include "wkv7_common.h"

namespace wkv7 {

constexpr int CHUNK = 16;  // steps per tile and per state checkpoint

// Thread layout shared by both kernels. A block serves one (batch, head). Thread (g, lane) owns the R
// state rows (or, in the backward, indices) i = g*R + rr, and the key columns of the float4 groups
// lane, lane + LANES, ...: j = 4 * (lane + LANES * m) + e. A warp's LANES lanes thus read consecutive
// float4s of each step vector (no bank conflicts), its row groups read the same ones (broadcast), and
// every value read from shared memory serves R rows.
template <int N, int LANES, int R>
struct Layout {
  static constexpr int THREADS = (N / R) * LANES;
  static constexpr int COLS = N / LANES;      // columns per thread
  static constexpr int GROUPS = COLS / 4;     // float4 groups per thread
  static constexpr int PER = CHUNK * N / THREADS;  // elements of one input a thread prefetches per tile
  static constexpr unsigned MASK = THREADS >= 32 ? 0xffffffffu : (1u << THREADS) - 1u;
  static_assert(COLS % 4 == 0 && N % R == 0 && (CHUNK * N) % THREADS == 0, "unsupported layout");
  static_assert(R == 1 || R == 2 || R == 4, "R must be 1, 2 or 4");
  __device__ static int col(int lane, int m) { return 4 * (lane + LANES * m); }
};

template <int LANES, unsigned MASK>
__device__ __forceinline__ float lane_sum(float x) {
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) x += __shfl_xor_sync(MASK, x, o, LANES);
  return x;
}

__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float at(const float4& v, int e) { return e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w; }

// R consecutive floats (R = 1, 2 or 4) from shared memory, as an array.
template <int R>
__device__ __forceinline__ void ldr(float (&out)[R], const float* p) {
  if constexpr (R == 4) {
    const float4 v = ld4(p);
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
  } else if constexpr (R == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    out[0] = v.x; out[1] = v.y;
  } else {
    out[0] = p[0];
  }
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

template <typename F, int N, int LANES, int R>
__global__ void __launch_bounds__(Layout<N, LANES, R>::THREADS)
forward_kernel(int T, int H, const F* __restrict__ r_, const F* __restrict__ w_, const F* __restrict__ k_,
               const F* __restrict__ v_, const F* __restrict__ a_, const F* __restrict__ b_,
               const float* __restrict__ s0_, F* __restrict__ y_, float* __restrict__ sT_,
               float* __restrict__ sa_, float* __restrict__ ckpt_) {
  using L = Layout<N, LANES, R>;
  constexpr int THREADS = L::THREADS, GROUPS = L::GROUPS, PER = L::PER;
  __shared__ __align__(16) float s_r[CHUNK][N], s_d[CHUNK][N], s_k[CHUNK][N], s_v[CHUNK][N], s_a[CHUNK][N],
      s_b[CHUNK][N];

  const int bh = blockIdx.x, bb = bh / H, hh = bh % H;
  const int tid = threadIdx.x, lane = tid % LANES, i0 = (tid / LANES) * R;
  const int64_t stride_t = int64_t(H) * N;  // elements between consecutive steps
  const int64_t base = int64_t(bb) * T * stride_t + int64_t(hh) * N;
  const int n_chunks = (T + CHUNK - 1) / CHUNK;

  float S[R][GROUPS][4];  // S[i0 + rr, col(lane, m) + e]
#pragma unroll
  for (int rr = 0; rr < R; ++rr)
#pragma unroll
    for (int m = 0; m < GROUPS; ++m)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        S[rr][m][e] = s0_ ? s0_[(int64_t(bh) * N + i0 + rr) * N + L::col(lane, m) + e] : 0.f;

  F pr[PER], pw[PER], pk[PER], pv[PER], pa[PER], pb[PER];
  auto prefetch = [&](int t0) {
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      const int flat = tid + p * THREADS, tt = flat / N, n = flat % N;
      if (t0 + tt < T) {
        const int64_t idx = base + int64_t(t0 + tt) * stride_t + n;
        pr[p] = r_[idx]; pw[p] = w_[idx]; pk[p] = k_[idx]; pv[p] = v_[idx]; pa[p] = a_[idx]; pb[p] = b_[idx];
      }
    }
  };
  auto stage = [&](int t0) {
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      const int flat = tid + p * THREADS, tt = flat / N, n = flat % N;
      const bool live = t0 + tt < T;  // steps past T: no input and decay 1, so nothing changes
      s_r[tt][n] = live ? to_f(pr[p]) : 0.f;
      s_d[tt][n] = live ? __expf(-LOG_DECAY_SCALE * sigmoid(to_f(pw[p]))) : 1.f;
      s_k[tt][n] = live ? to_f(pk[p]) : 0.f;
      s_v[tt][n] = live ? to_f(pv[p]) : 0.f;
      s_a[tt][n] = live ? to_f(pa[p]) : 0.f;
      s_b[tt][n] = live ? to_f(pb[p]) : 0.f;
    }
  };

  prefetch(0);
  for (int ch = 0; ch < n_chunks; ++ch) {
    const int t0 = ch * CHUNK, steps = min(CHUNK, T - t0);
    __syncthreads();  // everyone is done reading the previous tile
    stage(t0);
    __syncthreads();
    if (ch + 1 < n_chunks) prefetch(t0 + CHUNK);  // loads in flight while this tile computes

    for (int tt = 0; tt < steps; ++tt) {
      float sa[R] = {}, y[R] = {}, v[R];
#pragma unroll
      for (int m = 0; m < GROUPS; ++m) {
        const float4 a4 = ld4(&s_a[tt][L::col(lane, m)]);
#pragma unroll
        for (int rr = 0; rr < R; ++rr)
          sa[rr] += S[rr][m][0] * a4.x + S[rr][m][1] * a4.y + S[rr][m][2] * a4.z + S[rr][m][3] * a4.w;
      }
#pragma unroll
      for (int rr = 0; rr < R; ++rr) sa[rr] = lane_sum<LANES, L::MASK>(sa[rr]);
      ldr<R>(v, &s_v[tt][i0]);
#pragma unroll
      for (int m = 0; m < GROUPS; ++m) {
        const int j = L::col(lane, m);
        const float4 d4 = ld4(&s_d[tt][j]), b4 = ld4(&s_b[tt][j]), k4 = ld4(&s_k[tt][j]), r4 = ld4(&s_r[tt][j]);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float d = at(d4, e), b = at(b4, e), k = at(k4, e), rj = at(r4, e);
#pragma unroll
          for (int rr = 0; rr < R; ++rr) {
            S[rr][m][e] = S[rr][m][e] * d + (sa[rr] * b + v[rr] * k);
            y[rr] += S[rr][m][e] * rj;
          }
        }
      }
#pragma unroll
      for (int rr = 0; rr < R; ++rr) y[rr] = lane_sum<LANES, L::MASK>(y[rr]);
      const int64_t idx = base + int64_t(t0 + tt) * stride_t + i0;
#pragma unroll
      for (int rr = 0; rr < R; ++rr) {  // spread the stores over the lanes
        if (lane == rr % LANES) y_[idx + rr] = from_f<F>(y[rr]);
        if (sa_ && lane == (rr + R) % LANES) sa_[idx + rr] = sa[rr];
      }
    }
    if (ckpt_) {  // S^T at the end of this chunk, so the backward reads its columns contiguously
      float* dst = ckpt_ + (int64_t(bh) * n_chunks + ch) * N * N;
#pragma unroll
      for (int m = 0; m < GROUPS; ++m)
#pragma unroll
        for (int e = 0; e < 4; ++e)
#pragma unroll
          for (int rr = 0; rr < R; ++rr) dst[(L::col(lane, m) + e) * N + i0 + rr] = S[rr][m][e];
    }
  }
#pragma unroll
  for (int rr = 0; rr < R; ++rr)
#pragma unroll
    for (int m = 0; m < GROUPS; ++m)
      *reinterpret_cast<float4*>(&sT_[(int64_t(bh) * N + i0 + rr) * N + L::col(lane, m)]) =
          make_float4(S[rr][m][0], S[rr][m][1], S[rr][m][2], S[rr][m][3]);
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------
//
// Thread (g, lane) owns the indices i = g*R + rr and, for its columns j: Sc = S[j, i] (column i of S),
// dR = dS[i, j] (row i of dS) and dC = dS[j, i] (column i of dS). Per step t, walking backwards, with
// dS including dy r^T:
//   dr_i = sum_j S_t[j,i] dy_j            dw_i = sum_j dS[j,i] S_{t-1}[j,i] * dd/dw
//   dk_i = sum_j dS[j,i] v_j               dv_i = sum_j dS[i,j] k_j
//   q_i  = sum_j dS[i,j] b_j               db_i = sum_j dS[j,i] sa_j
//   da_i = sum_j S_{t-1}[j,i] q_j          dS_{t-1} = dS diag(d) + q a^T

template <typename F, int N, int LANES, int R>
__global__ void __launch_bounds__(Layout<N, LANES, R>::THREADS)
backward_kernel(int T, int H, const F* __restrict__ r_, const F* __restrict__ w_, const F* __restrict__ k_,
                const F* __restrict__ v_, const F* __restrict__ a_, const F* __restrict__ b_,
                const F* __restrict__ dy_, const float* __restrict__ dsT_, const float* __restrict__ sa_,
                const float* __restrict__ ckpt_, F* __restrict__ dr_, F* __restrict__ dw_, F* __restrict__ dk_,
                F* __restrict__ dv_, F* __restrict__ da_, F* __restrict__ db_, float* __restrict__ ds0_) {
  using L = Layout<N, LANES, R>;
  constexpr int THREADS = L::THREADS, GROUPS = L::GROUPS, PER = L::PER;
  constexpr unsigned MASK = L::MASK;
  __shared__ __align__(16) float s_r[CHUNK][N], s_d[CHUNK][N], s_g[CHUNK][N], s_k[CHUNK][N], s_v[CHUNK][N],
      s_a[CHUNK][N], s_b[CHUNK][N], s_dy[CHUNK][N], s_sa[CHUNK][N];
  __shared__ __align__(16) float s_q[2][N];  // q of the current step, double-buffered by step parity

  const int bh = blockIdx.x, bb = bh / H, hh = bh % H;
  const int tid = threadIdx.x, lane = tid % LANES, i0 = (tid / LANES) * R;
  const int64_t stride_t = int64_t(H) * N;
  const int64_t base = int64_t(bb) * T * stride_t + int64_t(hh) * N;
  const int n_chunks = (T + CHUNK - 1) / CHUNK;

  float Sc[R][GROUPS][4], dR[R][GROUPS][4], dC[R][GROUPS][4];
#pragma unroll
  for (int rr = 0; rr < R; ++rr)
#pragma unroll
    for (int m = 0; m < GROUPS; ++m)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = i0 + rr, j = L::col(lane, m) + e;
        dR[rr][m][e] = dsT_ ? dsT_[(int64_t(bh) * N + i) * N + j] : 0.f;
        dC[rr][m][e] = dsT_ ? dsT_[(int64_t(bh) * N + j) * N + i] : 0.f;
      }

  F pr[PER], pw[PER], pk[PER], pv[PER], pa[PER], pb[PER], pdy[PER];
  float psa[PER];
  auto prefetch = [&](int t0) {
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      const int flat = tid + p * THREADS, tt = flat / N, n = flat % N;
      if (t0 + tt < T) {
        const int64_t idx = base + int64_t(t0 + tt) * stride_t + n;
        pr[p] = r_[idx]; pw[p] = w_[idx]; pk[p] = k_[idx]; pv[p] = v_[idx];
        pa[p] = a_[idx]; pb[p] = b_[idx]; pdy[p] = dy_[idx]; psa[p] = sa_[idx];
      }
    }
  };
  auto stage = [&](int t0) {
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      const int flat = tid + p * THREADS, tt = flat / N, n = flat % N;
      const bool live = t0 + tt < T;
      const float sig = sigmoid(live ? to_f(pw[p]) : 0.f);
      const float d = __expf(-LOG_DECAY_SCALE * sig);
      s_r[tt][n] = live ? to_f(pr[p]) : 0.f;
      s_d[tt][n] = live ? d : 1.f;
      s_g[tt][n] = live ? -LOG_DECAY_SCALE * d * sig * (1.f - sig) : 0.f;  // d(decay)/dw
      s_k[tt][n] = live ? to_f(pk[p]) : 0.f;
      s_v[tt][n] = live ? to_f(pv[p]) : 0.f;
      s_a[tt][n] = live ? to_f(pa[p]) : 0.f;
      s_b[tt][n] = live ? to_f(pb[p]) : 0.f;
      s_dy[tt][n] = live ? to_f(pdy[p]) : 0.f;
      s_sa[tt][n] = live ? psa[p] : 0.f;
    }
  };

  prefetch((n_chunks - 1) * CHUNK);
  int parity = 0;
  for (int ch = n_chunks - 1; ch >= 0; --ch) {
    const int t0 = ch * CHUNK, steps = min(CHUNK, T - t0);
    {  // S at the end of this chunk, from the forward's checkpoint (stored transposed)
      const float* src = ckpt_ + (int64_t(bh) * n_chunks + ch) * N * N;
#pragma unroll
      for (int rr = 0; rr < R; ++rr)
#pragma unroll
        for (int m = 0; m < GROUPS; ++m) {
          const float4 v4 = *reinterpret_cast<const float4*>(src + (i0 + rr) * N + L::col(lane, m));
          Sc[rr][m][0] = v4.x; Sc[rr][m][1] = v4.y; Sc[rr][m][2] = v4.z; Sc[rr][m][3] = v4.w;
        }
    }
    __syncthreads();
    stage(t0);
    __syncthreads();
    if (ch > 0) prefetch(t0 - CHUNK);

    for (int tt = steps - 1; tt >= 0; --tt) {
      float ri[R], di[R], ki[R], bi[R], dyi[R], ai[R], inv_di[R];
      ldr<R>(ri, &s_r[tt][i0]); ldr<R>(di, &s_d[tt][i0]); ldr<R>(ki, &s_k[tt][i0]); ldr<R>(bi, &s_b[tt][i0]);
      ldr<R>(dyi, &s_dy[tt][i0]); ldr<R>(ai, &s_a[tt][i0]);
#pragma unroll
      for (int rr = 0; rr < R; ++rr) inv_di[rr] = 1.f / di[rr];
      float dr[R] = {}, dw[R] = {}, dk[R] = {}, dv[R] = {}, q[R] = {}, db[R] = {};
#pragma unroll
      for (int m = 0; m < GROUPS; ++m) {
        const int j = L::col(lane, m);
        const float4 dy4 = ld4(&s_dy[tt][j]), v4 = ld4(&s_v[tt][j]), sa4 = ld4(&s_sa[tt][j]);
        const float4 r4 = ld4(&s_r[tt][j]), k4 = ld4(&s_k[tt][j]), b4 = ld4(&s_b[tt][j]);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float dyj = at(dy4, e), vj = at(v4, e), saj = at(sa4, e), rj = at(r4, e), kj = at(k4, e),
                      bj = at(b4, e);
#pragma unroll
          for (int rr = 0; rr < R; ++rr) {
            float& sc = Sc[rr][m][e];
            dr[rr] += sc * dyj;
            sc = (sc - vj * ki[rr] - saj * bi[rr]) * inv_di[rr];  // now S_{t-1}[j, i]
            float& dri = dR[rr][m][e];
            float& dci = dC[rr][m][e];
            dri += dyi[rr] * rj;
            dci += dyj * ri[rr];
            dw[rr] += dci * sc;
            dk[rr] += dci * vj;
            dv[rr] += dri * kj;
            q[rr] += dri * bj;
            db[rr] += dci * saj;
          }
        }
      }
#pragma unroll
      for (int rr = 0; rr < R; ++rr) {
        dr[rr] = lane_sum<LANES, MASK>(dr[rr]);
        dw[rr] = lane_sum<LANES, MASK>(dw[rr]);
        dk[rr] = lane_sum<LANES, MASK>(dk[rr]);
        dv[rr] = lane_sum<LANES, MASK>(dv[rr]);
        q[rr] = lane_sum<LANES, MASK>(q[rr]);
        db[rr] = lane_sum<LANES, MASK>(db[rr]);
      }
      if (lane == 0)
#pragma unroll
        for (int rr = 0; rr < R; ++rr) s_q[parity][i0 + rr] = q[rr];
      __syncthreads();
      float da[R] = {};
#pragma unroll
      for (int m = 0; m < GROUPS; ++m) {
        const int j = L::col(lane, m);
        const float4 q4 = ld4(&s_q[parity][j]), d4 = ld4(&s_d[tt][j]), a4 = ld4(&s_a[tt][j]);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float qj = at(q4, e), dj = at(d4, e), aj = at(a4, e);
#pragma unroll
          for (int rr = 0; rr < R; ++rr) {
            da[rr] += Sc[rr][m][e] * qj;
            dR[rr][m][e] = dR[rr][m][e] * dj + q[rr] * aj;
            dC[rr][m][e] = dC[rr][m][e] * di[rr] + qj * ai[rr];
          }
        }
      }
#pragma unroll
      for (int rr = 0; rr < R; ++rr) da[rr] = lane_sum<LANES, MASK>(da[rr]);
      parity ^= 1;

      float gi[R];
      ldr<R>(gi, &s_g[tt][i0]);
      const int64_t idx = base + int64_t(t0 + tt) * stride_t + i0;
#pragma unroll
      for (int rr = 0; rr < R; ++rr) {  // spread the six stores per index over the lanes
        const int o = (rr * 6) % LANES;
        if (lane == o % LANES) dr_[idx + rr] = from_f<F>(dr[rr]);
        if (lane == (o + 1) % LANES) dw_[idx + rr] = from_f<F>(dw[rr] * gi[rr]);
        if (lane == (o + 2) % LANES) dk_[idx + rr] = from_f<F>(dk[rr]);
        if (lane == (o + 3) % LANES) dv_[idx + rr] = from_f<F>(dv[rr]);
        if (lane == (o + 4) % LANES) db_[idx + rr] = from_f<F>(db[rr]);
        if (lane == (o + 5) % LANES) da_[idx + rr] = from_f<F>(da[rr]);
      }
    }
  }
  if (ds0_) {
#pragma unroll
    for (int rr = 0; rr < R; ++rr)
#pragma unroll
      for (int m = 0; m < GROUPS; ++m)
        *reinterpret_cast<float4*>(&ds0_[(int64_t(bh) * N + i0 + rr) * N + L::col(lane, m)]) =
            make_float4(dR[rr][m][0], dR[rr][m][1], dR[rr][m][2], dR[rr][m][3]);
  }
}

}  // namespace wkv7

// ------------------------------------------------------------------------------------------------
// Host entry points (called from wkv7_op.cpp): dispatch on dtype (0 fp32, 1 bf16, 2 fp16), N and LANES.
// Each returns false when no kernel exists for that combination.
// ------------------------------------------------------------------------------------------------

namespace {

template <int N, int LANES, int R>
using Shape = std::integer_sequence<int, N, LANES, R>;

// The compiled (head size, lanes per row, rows per thread) layouts; "layout" picks one per head size.
template <typename Fn>
bool dispatch(int dtype, int N, int layout, Fn&& fn) {
  auto by_shape = [&](auto tag) {
    using F = decltype(tag);
    if (N == 16 && layout == 0) return fn(F{}, Shape<16, 4, 2>{});
    if (N == 32 && layout == 0) return fn(F{}, Shape<32, 8, 2>{});
    if (N == 64 && layout == 0) return fn(F{}, Shape<64, 8, 2>{});
    if (N == 64 && layout == 1) return fn(F{}, Shape<64, 8, 4>{});
    if (N == 64 && layout == 2) return fn(F{}, Shape<64, 4, 2>{});
    return false;
  };
  switch (dtype) {
    case 0: return by_shape(float{});
    case 1: return by_shape(__nv_bfloat16{});
    case 2: return by_shape(__half{});
    default: return false;
  }
}

template <typename F, int N, int LANES, int R, typename... Args>
bool launch_forward(std::integer_sequence<int, N, LANES, R>, cudaStream_t stream, int B, int H, Args... args) {
  wkv7::forward_kernel<F, N, LANES, R><<<B * H, wkv7::Layout<N, LANES, R>::THREADS, 0, stream>>>(args...);
  return true;
}

template <typename F, int N, int LANES, int R, typename... Args>
bool launch_backward(std::integer_sequence<int, N, LANES, R>, cudaStream_t stream, int B, int H, Args... args) {
  wkv7::backward_kernel<F, N, LANES, R><<<B * H, wkv7::Layout<N, LANES, R>::THREADS, 0, stream>>>(args...);
  return true;
}

}  // namespace

bool wkv7_forward_cuda(int dtype, int N, int layout, cudaStream_t stream, int B, int T, int H, const void* r,
                       const void* w, const void* k, const void* v, const void* a, const void* b, const float* s0,
                       void* y, float* sT, float* sa, float* ckpt) {
  return dispatch(dtype, N, layout, [&](auto tag, auto shape) {
    using F = decltype(tag);
    return launch_forward<F>(shape, stream, B, H, T, H, (const F*)r, (const F*)w, (const F*)k, (const F*)v,
                             (const F*)a, (const F*)b, s0, (F*)y, sT, sa, ckpt);
  });
}

bool wkv7_backward_cuda(int dtype, int N, int layout, cudaStream_t stream, int B, int T, int H, const void* r,
                        const void* w, const void* k, const void* v, const void* a, const void* b, const void* dy,
                        const float* dsT, const float* sa, const float* ckpt, void* dr, void* dw, void* dk,
                        void* dv, void* da, void* db, float* ds0) {
  return dispatch(dtype, N, layout, [&](auto tag, auto shape) {
    using F = decltype(tag);
    return launch_backward<F>(shape, stream, B, H, T, H, (const F*)r, (const F*)w, (const F*)k, (const F*)v,
                              (const F*)a, (const F*)b, (const F*)dy, dsT, sa, ckpt, (F*)dr, (F*)dw, (F*)dk,
                              (F*)dv, (F*)da, (F*)db, ds0);
  });
}
