// WKV-7 in chunks of 16 steps on tensor cores (head size 64): forward and backward, state in and out.
//
// The math is derived in vision_rwkv/ops/wkv7/chunked.py (wkv7_chunked, and wkv7_chunked_backward, the
// PyTorch mirror of this file's backward, which CI checks against autograd). Per chunk, with g the cumulative
// log-decay inside the chunk (G = e^g, Gp = e^{g - log d}, GC = G at the chunk's last step):
//
//   rt = r G, at = a Gp, bh = b / G, kh = k / G, bb = b GC / G, kb = k GC / G     (element-wise)
//   Aab = (at bh^T) strictly lower, Aak = (at kh^T) strictly lower,
//   Brb = (rt bh^T) lower, Brk = (rt kh^T) lower                                     (16 x 16)
//   [W | U0] = (I - Aab)^{-1} [at | Aak V]                                         (substitution)
//   U = W S^T + U0,  Y = (rt + Brb W) S^T + Brb U0 + Brk V
//   S' = S diag(GC) + U^T bb + V^T kb
//
// When a backward will follow, the forward also saves per chunk U and two solves that need no state,
// Pb = (I - Aab)^{-T} bh (times diag(GC)) and R = (I - Aab)^{-T} Brb^T, with Aak and Brk (11 KB next
// to the state's 16 KB), so that the backward recomputes none of the above. It walks the chunks in
// reverse with Z, the gradient of the chunk's final state; with Zs = Z diag(GC), bb Z^T, kb Z^T and
// GC (V Z) are bh Zs^T, kh Zs^T and V Zs (the code applies GC to the operands or the results, and
// keeps Z itself unscaled):
//
//   Q = (I - Aab)^{-T} (bb Z^T + Brb^T dY) = Pb Zs^T + R dY
//   dV = kb Z^T + Brk^T dY + Aak^T Q
//   M1 = (dY U^T) lower, M2 = (dY V^T) lower, M3 = (Q U^T) strict, M4 = (Q V^T) strict
//   dK = (GC (V Z) + M2^T rt + M4^T at) / G,   dB = (GC (U Z) + M1^T rt + M3^T at) / G
//   dR = G (dY S + M1 bh + M2 kh),             dA = Gp (Q S + M3 bh + M4 kh)
//   dlog d_t = sum_{s >= t} (r dR - b dB - k dK)_s + sum_{s > t} (a dA)_s + colsum(Z o S')
//   Z' = Z diag(GC) + dY^T rt + Q^T at
//
// One block of 8 warps per (batch, head) runs the chunks in order. Matrix products are mma.sync
// m16n8k8 tf32 tiles (fp32 accumulation) out of shared memory; the substitutions and everything
// element-wise run in fp32 on the CUDA cores. The state stays fp32 in shared memory and is never
// rounded: only the operands of the products are (tf32, 10-bit mantissa). Every log-decay is in
// (-0.6065, 0), so inside a chunk of 16 the factors e^{+-g} stay within e^{+-9.7}.
// The forward saves the state at the start of every chunk (N*N*4 bytes per head per 16 steps; not the
// first when the initial state is zero; the final state is the forward's output); the backward reads
// them back with the saved products (cp.async, requested while the chunk before ends) instead of
// recomputing them.
//
// Every product operand comes from shared memory, so every matrix there is stored with an XOR swizzle
// (at<COLS> below) that makes every access pattern of the kernels free of bank conflicts: the
// tensor-core fragments in both orientations, the tiles' float2 rows, the float4 rows of the I/O mapping
// and the columns of the scan mapping. Products that share an operand run in pairs (mma2, mma2b), which
// read the shared fragments once.

#include <cuda_pipeline.h>

#include <cstdint>
#include <type_traits>

#include "wkv7_common.h"

namespace wkv7 {
namespace chunked {

constexpr int N = 64;                 // head size
constexpr int C = 16;                 // steps per chunk
constexpr int WARPS = 8, THREADS = 32 * WARPS;
constexpr int VEC = C * N, MAT = N * N, CCM = C * C;  // C x N chunk vectors, N x N states, C x C matrices
// What the forward saves per chunk for the backward (next to the chunk's initial state), in the backward's
// shared-memory layout so that it lands there with one flat copy: U and Pb (C x N), Aak, R and Brk (C x C).
constexpr int SAVED = 2 * VEC + 3 * CCM;
// Element-wise work uses two thread mappings of a C x N chunk, 4 elements per thread:
//  - I/O: thread owns step tid / 16 and the 4 consecutive key columns 4 (tid % 16) (vector loads/stores);
//  - scan: thread owns key column tid / 4 and the steps tid % 4 + 4 i (i = 0..3), so sums over steps are
//    4-lane shuffle scans.
static_assert(THREADS * 4 == C * N && C == 16 && N == 64, "the two element-wise mappings");

// Shared-memory layout of a matrix with COLS (64 or 16) columns: element (row, col) sits at
// row * COLS + (col ^ swizzle(row)). The swizzle is a multiple of 4 below 32 that depends on row % 8, so
// groups of 4 columns stay contiguous (float2 / float4 access), a row offset that is a multiple of 8 can
// be folded into the pointer, and a column offset cannot (it goes through the XOR). The swizzles make
// each of these warp accesses hit 32 distinct banks:
//  - fragments, (row g + 8 i, col c + t) and (row c + t, col g + 8 i), for g < 8, t < 4, c % 8 == 0;
//  - 16 lanes of float2 at (row g, col c + 2 t), g < 4; 8 lanes of float4 at (row r, col 4 l), l < 8;
//  - the scan mapping's (row t + 4 i, col c + j), t < 4, j < 8.
template <int COLS> __device__ __forceinline__ int swizzle(int row);
template <> __device__ __forceinline__ int swizzle<N>(int row) { return ((row & 3) << 3) | (row & 4); }
template <> __device__ __forceinline__ int swizzle<C>(int row) { return ((row & 2) << 2) | (row & 4); }
template <int COLS>
__device__ __forceinline__ int at(int row, int col) {
  return row * COLS + (col ^ swizzle<COLS>(row));
}

// Matrix products run on mma.sync m16n8k8 tf32 tiles with fp32 accumulation. A 16 x 16 output tile is
// two m16n8 accumulators; with g = lane / 4 and t = lane % 4, element c[h][e] sits at row g + 8 (e / 2),
// column 8 h + 2 t + e % 2 (the PTX fragment layout), so masks and stores work on registers directly.
// Operands are read from shared memory as fp32 bit patterns; the tensor cores use their top 19 bits
// (tf32), i.e. they truncate (relative error below 2^-10).
struct Tile {
  float c[2][4];
};

// A product operand: a matrix with COLS columns (pointer at its first row in use) and its first column.
template <int COLS>
struct Op {
  const float* p;
  int c0;
};
template <int COLS>
__device__ __forceinline__ Op<COLS> op(const float* p, int row0 = 0, int col0 = 0) {
  return {p + row0 * COLS, col0};
}
__device__ __forceinline__ Op<N> vecs(const float* p, int col0 = 0) { return op<N>(p, 0, col0); }
__device__ __forceinline__ Op<C> small(const float* p) { return op<C>(p); }

__device__ __forceinline__ int lane_g() { return (threadIdx.x & 31) >> 2; }
__device__ __forceinline__ int lane_t() { return threadIdx.x & 3; }

__device__ __forceinline__ void zero(Tile& d) {
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int e = 0; e < 4; ++e) d.c[h][e] = 0.f;
}

// Column c8 + u (c8 % 8 == 0, u < 8) of a row whose row % 8 is r8, in the swizzled layout: the same as
// at<COLS>'s column, written so that the parts that do not depend on c8 % 32 fold into constants.
template <int COLS>
__device__ __forceinline__ int swizzled_col(int r8, int c8, int u) {
  return (c8 & ~31) + (((c8 & 31) ^ swizzle<COLS>(r8)) ^ u);
}

// Fragments of the m16n8k8 operands, read from shared memory. AT: A is stored transposed (element
// (m, k) at row k, column m); BT: B is stored transposed (element (k, n) at row n, column k). A's
// element (m = g + 8 r, k = k0 + t + 4 q) and B's (k = k0 + t + 4 q, n = 8 h + g); k0 % 8 == 0.
// a_scale (K floats, or null): A's column k is multiplied by a_scale[k] first.
template <bool AT, int AC>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], Op<AC> A, int k0, const float* a_scale) {
  const int g = lane_g(), t = lane_t();
#pragma unroll
  for (int q = 0; q < 2; ++q)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = AT ? (k0 + t + 4 * q) * AC + swizzled_col<AC>(t + 4 * q, A.c0 + 8 * r, g)
                       : (g + 8 * r) * AC + swizzled_col<AC>(g, A.c0 + k0, t + 4 * q);
      float v = A.p[i];
      if (a_scale) v *= a_scale[k0 + t + 4 * q];
      a[2 * q + r] = __float_as_uint(v);
    }
}

template <bool BT, int BC>
__device__ __forceinline__ void load_b(uint32_t (&b)[2], Op<BC> B, int k0, int h) {
  const int g = lane_g(), t = lane_t();
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const int i = BT ? (8 * h + g) * BC + swizzled_col<BC>(g, B.c0 + k0, t + 4 * q)
                     : (k0 + t + 4 * q) * BC + swizzled_col<BC>(t + 4 * q, B.c0 + 8 * h, g);
    b[q] = __float_as_uint(B.p[i]);
  }
}

// d.c[h] += A B for one k-step, on the tensor cores.
__device__ __forceinline__ void mma_step(Tile& d, int h, const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  (void)d; (void)h; (void)a; (void)b;
  __trap();  // tf32 mma.sync needs sm_80; the host entry points never launch this below it
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d.c[h][0]), "+f"(d.c[h][1]), "+f"(d.c[h][2]), "+f"(d.c[h][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

__device__ __forceinline__ void add(Tile& d, const Tile& x) {
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int e = 0; e < 4; ++e) d.c[h][e] += x.c[h][e];
}

// d += A (16 x K) B (K x 16); operand layouts as in load_a / load_b.
// ILP: for K >= 32 the odd k-steps accumulate separately (two dependency chains of K / 16 tensor-core
// ops instead of one of K / 8), which needs 8 more registers: for the one-block-per-SM launches.
template <bool AT, bool BT, int K, bool ILP = false, int AC, int BC>
__device__ __forceinline__ void mma(Tile& d, Op<AC> A, Op<BC> B, const float* a_scale = nullptr) {
  constexpr bool SPLIT = ILP && K >= 32;
  Tile d2;
  if (SPLIT) zero(d2);
#pragma unroll
  for (int k0 = 0; k0 < K; k0 += 8) {
    Tile& acc = (SPLIT && (k0 / 8) % 2 == 1) ? d2 : d;
    uint32_t a[4], b[2];
    load_a<AT>(a, A, k0, a_scale);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      load_b<BT>(b, B, k0, h);
      mma_step(acc, h, a, b);
    }
  }
  if (SPLIT) add(d, d2);
}

// d1 += A B1 and d2 += A B2: two tiles that share A's fragments.
template <bool AT, bool BT, int K, int AC, int BC>
__device__ __forceinline__ void mma2b(Tile& d1, Tile& d2, Op<AC> A, Op<BC> B1, Op<BC> B2) {
#pragma unroll
  for (int k0 = 0; k0 < K; k0 += 8) {
    uint32_t a[4], b[2];
    load_a<AT>(a, A, k0, nullptr);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      load_b<BT>(b, B1, k0, h);
      mma_step(d1, h, a, b);
      load_b<BT>(b, B2, k0, h);
      mma_step(d2, h, a, b);
    }
  }
}

// d1 += A1 B and d2 += A2 B: two tiles that share B's fragments (a third fewer operand loads).
template <bool AT, bool BT, int K, int AC, int BC>
__device__ __forceinline__ void mma2(Tile& d1, Tile& d2, Op<AC> A1, Op<AC> A2, Op<BC> B,
                                     const float* a2_scale = nullptr) {
#pragma unroll
  for (int k0 = 0; k0 < K; k0 += 8) {
    uint32_t a1[4], a2[4], b[2];
    load_a<AT>(a1, A1, k0, nullptr);
    load_a<AT>(a2, A2, k0, a2_scale);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      load_b<BT>(b, B, k0, h);
      mma_step(d1, h, a1, b);
      mma_step(d2, h, a2, b);
    }
  }
}

// The 16 x 16 tile at rows 0..15 of P (a COLS-column matrix, pointer at the tile's first row), columns
// c0..c0+15, to and from registers.
template <int COLS>
__device__ __forceinline__ void load(Tile& d, const float* P, int c0 = 0) {
  const int g = lane_g(), t = lane_t();
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float2 v = *reinterpret_cast<const float2*>(P + (g + 8 * r) * COLS + swizzled_col<COLS>(g, c0 + 8 * h, 2 * t));
      d.c[h][2 * r] = v.x;
      d.c[h][2 * r + 1] = v.y;
    }
}

template <int COLS>
__device__ __forceinline__ void store(float* P, const Tile& d, int c0 = 0) {
  const int g = lane_g(), t = lane_t();
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      *reinterpret_cast<float2*>(P + (g + 8 * r) * COLS + swizzled_col<COLS>(g, c0 + 8 * h, 2 * t)) =
          make_float2(d.c[h][2 * r], d.c[h][2 * r + 1]);
}

// The transposed tile of a C x C matrix: element (row, col) to (col, row).
__device__ __forceinline__ void store_transposed(float* P, const Tile& d) {
  const int g = lane_g(), t = lane_t();
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int e = 0; e < 4; ++e) P[at<C>(8 * h + 2 * t + e % 2, g + 8 * (e / 2))] = d.c[h][e];
}

// n float4 from shared to global memory, all threads (layout-blind: the backward copies them back flat).
__device__ __forceinline__ void copy_out(float* dst, const float* src, int n) {
  for (int i = threadIdx.x; i < n; i += THREADS)
    reinterpret_cast<float4*>(dst)[i] = reinterpret_cast<const float4*>(src)[i];
}

// A tile to a dense N-column fp32 matrix in global memory (P at the tile's origin).
__device__ __forceinline__ void store_global(float* P, const Tile& d) {
  const int g = lane_g(), t = lane_t();
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      *reinterpret_cast<float2*>(P + (g + 8 * r) * N + 8 * h + 2 * t) = make_float2(d.c[h][2 * r], d.c[h][2 * r + 1]);
}

// An N x N state between dense global memory (row-major) and the swizzled shared layout.
__device__ __forceinline__ int state_at(int e) { return at<N>(e / N, e % N); }

// Multiply a tile's columns by scale[0..15].
__device__ __forceinline__ void scale_columns(Tile& d, const float* scale) {
  const int t = lane_t();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float2 sc = *reinterpret_cast<const float2*>(scale + 8 * h + 2 * t);
    d.c[h][0] *= sc.x;
    d.c[h][1] *= sc.y;
    d.c[h][2] *= sc.x;
    d.c[h][3] *= sc.y;
  }
}

// Keep the lower triangle (strict: below the diagonal only) of a 16 x 16 tile.
__device__ __forceinline__ void mask_lower(Tile& d, bool strict) {
  const int g = lane_g(), t = lane_t();
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e / 2), col = 8 * h + 2 * t + e % 2;
      if (col > row || (strict && col == row)) d.c[h][e] = 0.f;
    }
}

// out[0..15] = the column sums of the tile d times (elementwise) the tile of P at columns c0..c0+15.
__device__ __forceinline__ void tile_column_sums(float* out, const Tile& d, const float* P, int c0) {
  Tile p;
  load<N>(p, P, c0);
  float cs[2][2];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float v = d.c[h][e] * p.c[h][e] + d.c[h][e + 2] * p.c[h][e + 2];  // rows g and g + 8
#pragma unroll
      for (int m = 4; m < 32; m <<= 1) v += __shfl_xor_sync(0xffffffffu, v, m);  // over g
      cs[h][e] = v;
    }
  if (lane_g() == 0) {
    const int t = lane_t();
#pragma unroll
    for (int h = 0; h < 2; ++h) *reinterpret_cast<float2*>(out + 8 * h + 2 * t) = make_float2(cs[h][0], cs[h][1]);
  }
}

// x_t += sum_{s<t} L[t][s] x_s for column `col` of a C-row matrix x with COLS columns (in place): solves
// (I - L) x = rhs, L strictly lower (C x C).
template <int COLS>
__device__ __forceinline__ void solve_lower(float* x, int col, const float* L) {
  float v[C];
#pragma unroll
  for (int t = 0; t < C; ++t) v[t] = x[at<COLS>(t, col)];
#pragma unroll
  for (int t = 1; t < C; ++t) {
    float acc = v[t];
#pragma unroll
    for (int s = 0; s < t; ++s) acc += L[at<C>(t, s)] * v[s];
    v[t] = acc;
  }
#pragma unroll
  for (int t = 0; t < C; ++t) x[at<COLS>(t, col)] = v[t];
}

// The transposed solve: (I - L)^T x = rhs, i.e. x_t += sum_{s>t} L[s][t] x_s, from the last step back.
template <int COLS>
__device__ __forceinline__ void solve_upper(float* x, int col, const float* L) {
  float v[C];
#pragma unroll
  for (int t = 0; t < C; ++t) v[t] = x[at<COLS>(t, col)];
#pragma unroll
  for (int t = C - 2; t >= 0; --t) {
    float acc = v[t];
#pragma unroll
    for (int s = t + 1; s < C; ++s) acc += L[at<C>(s, t)] * v[s];
    v[t] = acc;
  }
#pragma unroll
  for (int t = 0; t < C; ++t) x[at<COLS>(t, col)] = v[t];
}

// Four consecutive values of F moved as raw bits with one vector access (8 bytes for bf16 and fp16, 16 for
// fp32), converted only where they are used. Element e sits in the bits a little-endian load gives it.
// (A struct of four F made the compiler split the loaded registers into 16-bit values right after the
// load, so the thread waited for the load there instead of where the values are used.)
template <typename F>
struct Packed4 {
  uint2 u;
};
template <>
struct Packed4<float> {
  uint4 u;
};

__device__ __forceinline__ float4 unpack(Packed4<float> p) {
  return make_float4(__uint_as_float(p.u.x), __uint_as_float(p.u.y), __uint_as_float(p.u.z), __uint_as_float(p.u.w));
}
__device__ __forceinline__ float4 unpack(Packed4<__nv_bfloat16> p) {  // a bf16 is the top half of its fp32
  return make_float4(__uint_as_float(p.u.x << 16), __uint_as_float(p.u.x & 0xffff0000u), __uint_as_float(p.u.y << 16),
                     __uint_as_float(p.u.y & 0xffff0000u));
}
__device__ __forceinline__ float4 unpack(Packed4<__half> p) {
  const auto h = [](uint32_t bits) { return __half2float(__ushort_as_half(static_cast<unsigned short>(bits))); };
  return make_float4(h(p.u.x), h(p.u.x >> 16), h(p.u.y), h(p.u.y >> 16));
}

__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ uint32_t bits16(__half x) { return __half_as_ushort(x); }
template <typename F>
__device__ __forceinline__ Packed4<F> pack(float4 v) {  // rounded as from_f rounds
  if constexpr (std::is_same<F, float>::value) {
    return {make_uint4(__float_as_uint(v.x), __float_as_uint(v.y), __float_as_uint(v.z), __float_as_uint(v.w))};
  } else {
    return {make_uint2(bits16(from_f<F>(v.x)) | bits16(from_f<F>(v.y)) << 16,
                       bits16(from_f<F>(v.z)) | bits16(from_f<F>(v.w)) << 16)};
  }
}

// The I/O mapping's place in the chunk: offset in shared memory and step within the chunk.
__device__ __forceinline__ int io_row() { return threadIdx.x >> 4; }
__device__ __forceinline__ int io_col() { return 4 * (threadIdx.x & 15); }
__device__ __forceinline__ int io_off() { return at<N>(io_row(), io_col()); }

__device__ __forceinline__ void put4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }

template <typename F>
__device__ __forceinline__ void store4(F* dst, const float* src) {  // 4 fp32 from shared memory to 4 F
  *reinterpret_cast<Packed4<F>*>(dst) = pack<F>(*reinterpret_cast<const float4*>(src));
}

// One chunk of a (batch, head)'s inputs (r w k v a b, and dy in the backward), prefetched into registers
// in the I/O mapping, then staged in shared memory as fp32: zero past T, where the log-decay is 0 too
// (decay 1: the state passes through unchanged).
template <typename F, int NSRC>
struct Inputs {
  Packed4<F> x[NSRC];
  // Unconditional loads (steps past T read the last step; stage() zeroes them): a conditional load would
  // make the compiler merge old and new register values right here, waiting for the loads to land.
  __device__ __forceinline__ void fetch(const F* const (&src)[NSRC], int64_t base, int64_t stride_t, int t0, int T) {
    const int t = min(t0 + io_row(), T - 1);
    const int64_t idx = base + int64_t(t) * stride_t + io_col();
#pragma unroll
    for (int i = 0; i < NSRC; ++i) x[i] = *reinterpret_cast<const Packed4<F>*>(src[i] + idx);
  }
  // The chunk into shared memory: input i to dst[i] (in the order of src), w (i = 1) as its log-decay
  // -scale sigmoid(w), with the fast reciprocal (2 ulp).
  __device__ __forceinline__ void stage(float* const (&dst)[NSRC], bool live) const {
    const auto l = [&](float w) { return live ? __fdividef(-LOG_DECAY_SCALE, 1.f + __expf(-w)) : 0.f; };
#pragma unroll
    for (int i = 0; i < NSRC; ++i) {
      float4 v = unpack(x[i]);
      if (i == 1) v = make_float4(l(v.x), l(v.y), l(v.z), l(v.w));
      else if (!live) v = make_float4(0.f, 0.f, 0.f, 0.f);
      put4(dst[i] + io_off(), v);
    }
  }
};

// The scan mapping: key column tid / 4, steps scan_step(i) = tid % 4 + 4 i.
__device__ __forceinline__ int scan_col() { return threadIdx.x >> 2; }
__device__ __forceinline__ int scan_part() { return threadIdx.x & 3; }
__device__ __forceinline__ int scan_step(int i) { return scan_part() + 4 * i; }

// The chunk's element-wise preparation, in the scan mapping: cumulative log-decays g over the steps,
// then in place: r -> rt = r e^g, a -> at = a e^{g - log d}, b -> bh = b e^-g, k -> kh = k e^-g (and,
// WITH_TAIL, bb = b e^{gC - g}, kb = k e^{gC - g} for the forward's state update).
struct Prep {
  float g[4], l[4], gC;  // this thread's steps: cumulative and own log-decays; the chunk's total
};

template <bool WITH_TAIL>
__device__ __forceinline__ Prep prepare(const float* lw, float* rt, float* at_, float* bh, float* kh, float* bb,
                                        float* kb) {
  const int j = scan_col(), part = scan_part();
  Prep p;
  float before = 0.f;  // the log-decays of the rounds before this one (steps < 4 i)
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    p.l[i] = lw[at<N>(scan_step(i), j)];
    float incl = p.l[i];  // inclusive scan over the 4 lanes (steps 4 i .. 4 i + 3) of this column
#pragma unroll
    for (int d = 1; d < 4; d <<= 1) {
      const float up = __shfl_up_sync(0xffffffffu, incl, d, 4);
      if (part >= d) incl += up;
    }
    p.g[i] = before + incl;
    before += __shfl_sync(0xffffffffu, incl, 3, 4);
  }
  p.gC = before;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int o = at<N>(scan_step(i), j);
    const float G = __expf(p.g[i]), Gp = __expf(p.g[i] - p.l[i]), inv = __expf(-p.g[i]);
    const float b = bh[o], k = kh[o];
    rt[o] *= G;
    at_[o] *= Gp;
    bh[o] = b * inv;
    kh[o] = k * inv;
    if (WITH_TAIL) {
      const float tail = __expf(p.gC - p.g[i]);
      bb[o] = b * tail;
      kb[o] = k * tail;
    }
  }
  return p;
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

template <typename F, int MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
forward_kernel(int T, int H, const F* __restrict__ r_, const F* __restrict__ w_, const F* __restrict__ k_,
               const F* __restrict__ v_, const F* __restrict__ a_, const F* __restrict__ b_,
               const float* __restrict__ s0_, F* __restrict__ y_, float* __restrict__ sT_,
               float* __restrict__ ckpt_, float* __restrict__ saved_) {
  constexpr bool ILP = MIN_BLOCKS == 1;  // registers to spare: see mma
  extern __shared__ __align__(128) float sm[];
  float* S = sm;
  float* lw = S + MAT;
  float* rt = lw + VEC;  // later rt + Brb W
  float* at_ = rt + VEC;  // later W
  float* bh = at_ + VEC;  // later Pb, then Pb diag(GC) (saved for the backward)
  float* kh = bh + VEC;
  float* bb = kh + VEC;
  float* kb = bb + VEC;
  float* V = kb + VEC;
  float* X = V + VEC;    // Aak V, then U0, then U
  float* Y = X + VEC;    // Brk V, then + Brb U0, then y
  float* Aab = Y + VEC;
  float* Aak = Aab + CCM;
  float* Brb = Aak + CCM;
  float* Brk = Brb + CCM;
  float* R = Brk + CCM;   // Brb^T, then R (saved for the backward)
  float* gC = R + CCM;    // [N]: e^{g} at the chunk's last step

  const int bhi = blockIdx.x, bi = bhi / H, hi = bhi % H;
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t stride_t = int64_t(H) * N, base = int64_t(bi) * T * stride_t + int64_t(hi) * N;
  const int n_chunks = (T + C - 1) / C;
  float* ckpt = ckpt_ ? ckpt_ + int64_t(bhi) * n_chunks * N * N : nullptr;
  const bool keep_first = s0_ != nullptr;  // a zero initial state is not saved (the backward knows it)
  float* saved = saved_ ? saved_ + int64_t(bhi) * n_chunks * SAVED : nullptr;

  for (int e = tid * 4; e < N * N; e += THREADS * 4)
    *reinterpret_cast<float4*>(S + state_at(e)) =
        s0_ ? *reinterpret_cast<const float4*>(s0_ + int64_t(bhi) * N * N + e) : make_float4(0.f, 0.f, 0.f, 0.f);

  const F* const src[6] = {r_, w_, k_, v_, a_, b_};
  Inputs<F, 6> in;
  in.fetch(src, base, stride_t, 0, T);
  for (int c = 0; c < n_chunks; ++c) {
    const int t0 = c * C;
    const bool live = t0 + io_row() < T;
    in.stage({rt, lw, kh, V, at_, bh}, live);
    __syncthreads();
    const Prep p = prepare<true>(lw, rt, at_, bh, kh, bb, kb);
    if (scan_part() == 0) gC[scan_col()] = __expf(p.gC);
    __syncthreads();
    if (c + 1 < n_chunks) in.fetch(src, base, stride_t, t0 + C, T);  // in flight meanwhile

    Tile acc;
    // The next three stages: with one block per SM (ILP), one product per warp, for the shortest stage;
    // with two, the warps that share an operand pair up (fewer operand loads), the other warps idle.
    if (ILP && warp < 4) {  // the four 16 x 16 interaction matrices
      zero(acc);
      mma<false, true, N, ILP>(acc, vecs(warp < 2 ? at_ : rt), vecs((warp & 1) ? kh : bh));
      mask_lower(acc, warp < 2);
      store<C>(warp == 0 ? Aab : warp == 1 ? Aak : warp == 2 ? Brb : Brk, acc);
      if (saved && warp == 2) store_transposed(R, acc);
    } else if (!ILP && warp < 2) {  // the same, in pairs sharing at (Aab, Aak) or rt (Brb, Brk)
      Tile x, y;
      zero(x);
      zero(y);
      mma2b<false, true, N>(x, y, vecs(warp == 0 ? at_ : rt), vecs(bh), vecs(kh));
      mask_lower(x, warp == 0);
      mask_lower(y, warp == 0);
      store<C>(warp == 0 ? Aab : Brb, x);
      store<C>(warp == 0 ? Aak : Brk, y);
      if (saved && warp == 1) store_transposed(R, x);
    }
    __syncthreads();
    if (ILP) {  // X = Aak V (warps 0-3), Y = Brk V (warps 4-7)
      const int n = (warp & 3) * 16;
      zero(acc);
      mma<false, false, C, ILP>(acc, small(warp < 4 ? Aak : Brk), vecs(V, n));
      store<N>(warp < 4 ? X : Y, acc, n);
    } else if (warp < 4) {  // the same, sharing V
      const int n = warp * 16;
      Tile x, y;
      zero(x);
      zero(y);
      mma2<false, false, C>(x, y, small(Aak), small(Brk), vecs(V, n));
      store<N>(X, x, n);
      store<N>(Y, y, n);
    }
    __syncthreads();
    if (tid < 2 * N) solve_lower<N>(tid < N ? at_ : X, tid % N, Aab);  // at -> W, X -> U0
    else if (saved && tid < 3 * N) solve_upper<N>(bh, tid - 2 * N, Aab);  // bh -> Pb
    else if (saved && tid < 3 * N + C) solve_upper<C>(R, tid - 3 * N, Aab);  // Brb^T -> R
    __syncthreads();
    if (ILP) {  // rt += Brb W (warps 0-3), Y += Brb U0 (warps 4-7)
      const int n = (warp & 3) * 16;
      float* out = warp < 4 ? rt : Y;
      load<N>(acc, out, n);
      mma<false, false, C, ILP>(acc, small(Brb), vecs(warp < 4 ? at_ : X, n));
      store<N>(out, acc, n);
    } else if (warp < 4) {  // the same, sharing Brb
      const int n = warp * 16;
      Tile x, y;
      load<N>(x, rt, n);
      load<N>(y, Y, n);
      mma2b<false, false, C>(x, y, small(Brb), vecs(at_, n), vecs(X, n));
      store<N>(rt, x, n);
      store<N>(Y, y, n);
    }
    if (saved) {  // Pb -> Pb diag(GC), as the backward uses it
      float4* pb = reinterpret_cast<float4*>(bh + io_off());
      const float4 gc = *reinterpret_cast<const float4*>(gC + io_col()), v = *pb;
      *pb = make_float4(v.x * gc.x, v.y * gc.y, v.z * gc.z, v.w * gc.w);
    }
    __syncthreads();
    if (ILP) {  // U = W S^T + U0 (warps 0-3), Y = (rt + Brb W) S^T + Y (warps 4-7)
      const int n = (warp & 3) * 16;
      float* out = warp < 4 ? X : Y;
      load<N>(acc, out, n);
      mma<false, true, N, ILP>(acc, vecs(warp < 4 ? at_ : rt), op<N>(S, n));
      store<N>(out, acc, n);
    } else if (warp < 4) {  // the same with fewer operand loads, U and Y sharing S^T (two blocks per SM)
      const int n = warp * 16;
      Tile u, y;
      load<N>(u, X, n);
      load<N>(y, Y, n);
      mma2<false, true, N>(u, y, vecs(at_), vecs(rt), op<N>(S, n));
      store<N>(X, u, n);
      store<N>(Y, y, n);
    }
    __syncthreads();
    if (live) store4(y_ + base + int64_t(t0 + io_row()) * stride_t + io_col(), Y + io_off());
    if (saved) {  // U, Pb, Aak, R, Brk in their shared-memory layout
      float* dst = saved + int64_t(c) * SAVED;
      copy_out(dst, X, VEC / 4);
      copy_out(dst + VEC, bh, VEC / 4);
      copy_out(dst + 2 * VEC, Aak, CCM / 4);
      copy_out(dst + 2 * VEC + CCM, R, CCM / 4);
      copy_out(dst + 2 * VEC + 2 * CCM, Brk, CCM / 4);
    }
    {  // S = S diag(GC) + U^T bb + V^T kb: each warp the tiles (mi, ni) and (mi + 32, ni), sharing bb, kb
      const int mi = (warp / 4) * 16, ni = (warp % 4) * 16;
      Tile s1, s2;
      load<N>(s1, S + mi * N, ni);
      load<N>(s2, S + (mi + 32) * N, ni);
      if (ckpt && (c > 0 || keep_first)) {  // the chunk's initial state
        store_global(ckpt + int64_t(c) * N * N + mi * N + ni, s1);
        store_global(ckpt + int64_t(c) * N * N + (mi + 32) * N + ni, s2);
      }
      scale_columns(s1, gC + ni);
      scale_columns(s2, gC + ni);
      mma2<true, false, C>(s1, s2, vecs(X, mi), vecs(X, mi + 32), vecs(bb, ni));
      mma2<true, false, C>(s1, s2, vecs(V, mi), vecs(V, mi + 32), vecs(kb, ni));
      store<N>(S + mi * N, s1, ni);
      store<N>(S + (mi + 32) * N, s2, ni);
    }
    __syncthreads();
  }
  for (int e = tid * 4; e < N * N; e += THREADS * 4)  // (the backward reads the final state from here)
    *reinterpret_cast<float4*>(sT_ + int64_t(bhi) * N * N + e) = *reinterpret_cast<const float4*>(S + state_at(e));
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

// Per chunk, the state and the forward's saved products (U, Pb, Aak, R, Brk) arrive by cp.async while
// the inputs are staged; what is left is three stages of products: the ones that need only Zs (Q among
// them), the ones that need Q, and the ones that need those. Shared memory stays under half a
// multiprocessor's (two blocks per SM): one state buffer, one gradient buffer updated in place, and
// arrays reused once their last reader has passed a barrier.
template <typename F, int MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
backward_kernel(int T, int H, const F* __restrict__ r_, const F* __restrict__ w_, const F* __restrict__ k_,
                const F* __restrict__ v_, const F* __restrict__ a_, const F* __restrict__ b_,
                const F* __restrict__ dy_, const float* __restrict__ dsT_, const float* __restrict__ ckpt_,
                const float* __restrict__ saved_, const float* __restrict__ sT_, bool zero_s0, F* __restrict__ dr_, F* __restrict__ dw_, F* __restrict__ dk_,
                F* __restrict__ dv_, F* __restrict__ da_, F* __restrict__ db_, float* __restrict__ ds0_) {
  constexpr bool ILP = MIN_BLOCKS == 1;  // registers to spare: see mma
  extern __shared__ __align__(128) float sm[];
  float* const S = sm;        // the chunk's initial state
  float* const Z = S + MAT;   // gradient of the chunk's final state; scaled, then updated in place
  float* const U = Z + MAT;   // the forward's saved products, in this order (SAVED floats)
  float* const Pb = U + VEC;
  float* const Aak = Pb + VEC;
  float* const R = Aak + CCM;
  float* const Brk = R + CCM;
  float* const lw = Brk + CCM;  // log-decays; later dA
  float* const rt = lw + VEC;
  float* const at_ = rt + VEC;
  float* const bh = at_ + VEC;
  float* const kh = bh + VEC;
  float* const V = kh + VEC;  // later dw
  float* const dY = V + VEC;
  float* const Q = dY + VEC;
  float* const dV = Q + VEC;
  float* const dK = dV + VEC;
  float* const dB = dK + VEC;
  float* const dR = dB + VEC;
  float* const M1 = dR + VEC;
  float* const M2 = M1 + CCM;
  float* const M3 = M2 + CCM;
  float* const M4 = M3 + CCM;
  float* const colsum = M4 + CCM;  // [2][4][N]: partial sums over row quarters of Z o S', double-buffered
  float* const gC = colsum + 8 * N;  // [N]: e^{g} at the chunk's last step
  float* const dA = lw;

  const int bhi = blockIdx.x, bi = bhi / H, hi = bhi % H;
  const int tid = threadIdx.x, warp = tid / 32;
  const int jb = scan_col(), part = scan_part();
  const int64_t stride_t = int64_t(H) * N, base = int64_t(bi) * T * stride_t + int64_t(hi) * N;
  const int n_chunks = (T + C - 1) / C;
  const float* ckpt = ckpt_ + int64_t(bhi) * n_chunks * N * N;
  const float* saved = saved_ + int64_t(bhi) * n_chunks * SAVED;

  // An N x N state from global memory (async: 4 x 16 bytes per thread), or zeros where src is null.
  auto load_state = [&](float* dst, const float* src) {
    for (int e = tid * 4; e < N * N; e += THREADS * 4) {
      if (src) __pipeline_memcpy_async(dst + state_at(e), src + e, 16);
      else *reinterpret_cast<float4*>(dst + state_at(e)) = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  };
  auto load_saved = [&](int c) {  // async: one flat copy of SAVED floats
    const float* src = saved + int64_t(c) * SAVED;
    for (int e = tid * 4; e < SAVED; e += THREADS * 4) __pipeline_memcpy_async(U + e, src + e, 16);
  };
  // colsum(Z o S') in the scan mapping, by row quarter (rows part + 4 i) into colsum[slot] (for the last
  // chunk; the others' come from the Z update's tiles, by row block, see tile_column_sums)
  auto column_sums = [&](int slot) {
    float cs = 0.f;
    for (int i = part; i < N; i += 4) cs += Z[at<N>(i, jb)] * S[at<N>(i, jb)];
    colsum[(slot & 1) * 4 * N + part * N + jb] = cs;
  };
  // The last chunk's colsum reads the final state, the others the next chunk's initial state (below).
  if (dsT_) {
    load_state(Z, dsT_ + int64_t(bhi) * N * N);
    load_state(S, sT_ + int64_t(bhi) * N * N);
    __pipeline_commit();
    __pipeline_wait_prior(0);
    __syncthreads();
    column_sums(n_chunks - 1);
    __syncthreads();
  } else {  // no gradient for the final state (its output was not used): Z = 0, colsum = 0
    load_state(Z, nullptr);
    colsum[((n_chunks - 1) & 1) * 4 * N + tid] = 0.f;
    static_assert(THREADS == 4 * N, "one colsum entry per thread");
  }
  // Each chunk's state and saved products are requested while the chunk before it (in this walk) ends.
  auto request_chunk_state = [&](int c) {
    load_state(S, c == 0 && zero_s0 ? nullptr : ckpt + int64_t(c) * N * N);
    __pipeline_commit();
  };
  auto request_saved = [&](int c) {
    load_saved(c);
    __pipeline_commit();
  };
  request_chunk_state(n_chunks - 1);
  request_saved(n_chunks - 1);

  // A chunk's gradients, from shared memory in the I/O mapping (vector stores), once the chunk is done.
  auto write_grads = [&](int c) {
    if (c * C + io_row() >= T) return;
    const int64_t idx = base + int64_t(c * C + io_row()) * stride_t + io_col();
    const int o = io_off();
    store4(dr_ + idx, dR + o);
    store4(dw_ + idx, V + o);
    store4(dk_ + idx, dK + o);
    store4(dv_ + idx, dV + o);
    store4(da_ + idx, dA + o);
    store4(db_ + idx, dB + o);
  };
  const F* const src[7] = {r_, w_, k_, v_, a_, b_, dy_};
  Inputs<F, 7> in;
  in.fetch(src, base, stride_t, (n_chunks - 1) * C, T);
  for (int c = n_chunks - 1; c >= 0; --c) {
    const int t0 = c * C;
    __syncthreads();  // the previous chunk is done with every buffer
    if (c + 1 < n_chunks) write_grads(c + 1);  // before staging reuses lw and V (same thread, same elements)

    const bool live = t0 + io_row() < T;
    in.stage({rt, lw, kh, V, at_, bh, dY}, live);
    __syncthreads();
    const Prep p = prepare<false>(lw, rt, at_, bh, kh, nullptr, nullptr);
    if (part == 0) gC[jb] = __expf(p.gC);
    __pipeline_wait_prior(0);
    __syncthreads();  // S and the saved products have landed too
    if (c > 0) in.fetch(src, base, stride_t, t0 - C, T);

    Tile acc;
    // A warp's jobs in a stage are warp + 8 i, so they share one column block n (job % 4 == warp % 4).
    const int n = (warp & 3) * 16;
    for (int job = warp; job < 13; job += WARPS) {  // what needs only Zs
      if (job < 4) {  // Q = Pb Zs^T + R dY and dV = kh Zs^T + Brk^T dY (+ Aak^T Q below), sharing Zs^T
        Tile q, v;  // (Pb as saved is Pb diag(GC); kh Zs^T = (kh diag(GC)) Z^T)
        zero(q);
        zero(v);
        mma2<false, true, N>(q, v, vecs(Pb), vecs(kh), op<N>(Z, n), gC);
        mma<false, false, C>(q, small(R), vecs(dY, n));
        mma<true, false, C>(v, small(Brk), vecs(dY, n));
        store<N>(Q, q, n);
        store<N>(dV, v, n);
      } else if (job < 8) {  // dK = V Zs and dB = U Zs (each + more below), sharing Z: (V Z) diag(GC)
        Tile k, b;
        zero(k);
        zero(b);
        mma2<false, false, N>(k, b, vecs(V), vecs(U), op<N>(Z, 0, n));
        scale_columns(k, gC + n);
        scale_columns(b, gC + n);
        store<N>(dK, k, n);
        store<N>(dB, b, n);
      } else if (job < 12) {  // dR = dY S (+ more below)
        zero(acc);
        mma<false, false, N, ILP>(acc, vecs(dY), op<N>(S, 0, n));
        store<N>(dR, acc, n);
      } else {  // M1 = dY U^T (lower) and M2 = dY V^T (lower), sharing dY
        Tile m1, m2;
        zero(m1);
        zero(m2);
        mma2b<false, true, N>(m1, m2, vecs(dY), vecs(U), vecs(V));
        mask_lower(m1, false);
        mask_lower(m2, false);
        store<C>(M1, m1);
        store<C>(M2, m2);
      }
    }
    __syncthreads();
    if (ILP) {
      for (int job = warp; job < 10; job += WARPS) {  // what needs Q
        if (job < 2) {  // M3 = Q U^T (strict), M4 = Q V^T (strict)
          zero(acc);
          mma<false, true, N, ILP>(acc, vecs(Q), vecs(job == 0 ? U : V));
          mask_lower(acc, true);
          store<C>(job == 0 ? M3 : M4, acc);
        } else if (job < 6) {  // dA = Q S
          zero(acc);
          mma<false, false, N, ILP>(acc, vecs(Q), op<N>(S, 0, n));
          store<N>(dA, acc, n);
        } else {  // dV += Aak^T Q
          load<N>(acc, dV, n);
          mma<true, false, C, ILP>(acc, small(Aak), vecs(Q, n));
          store<N>(dV, acc, n);
        }
      }
    } else if (warp < 3) {  // the same in pairs sharing Q: (M3, M4), dA at columns (0, 16) and (32, 48)
      Tile x, y;
      zero(x);
      zero(y);
      if (warp == 0) {
        mma2b<false, true, N>(x, y, vecs(Q), vecs(U), vecs(V));
        mask_lower(x, true);
        mask_lower(y, true);
        store<C>(M3, x);
        store<C>(M4, y);
      } else {
        const int n0 = (warp - 1) * 32;
        mma2b<false, false, N>(x, y, vecs(Q), op<N>(S, 0, n0), op<N>(S, 0, n0 + 16));
        store<N>(dA, x, n0);
        store<N>(dA, y, n0 + 16);
      }
    } else if (warp < 7) {  // dV += Aak^T Q
      const int n1 = (warp - 3) * 16;
      load<N>(acc, dV, n1);
      mma<true, false, C>(acc, small(Aak), vecs(Q, n1));
      store<N>(dV, acc, n1);
    }
    __syncthreads();
    if (c > 0) request_saved(c - 1);  // U, Pb, Aak, R and Brk have had their last reader
    for (int job = warp; job < 24; job += WARPS) {  // what needs M3 and M4 (or is left); the state gradient
      if (job < 8) {  // Z = Zs + dY^T rt + Q^T at (the gradient of this chunk's initial state): row blocks
        const int mi = (job / 4) * 16;  // mi and mi + 32, sharing rt's and at's fragments
        Tile z1, z2;
        load<N>(z1, Z + mi * N, n);
        load<N>(z2, Z + (mi + 32) * N, n);
        scale_columns(z1, gC + n);
        scale_columns(z2, gC + n);
        mma2<true, false, C>(z1, z2, vecs(dY, mi), vecs(dY, mi + 32), vecs(rt, n));
        mma2<true, false, C>(z1, z2, vecs(Q, mi), vecs(Q, mi + 32), vecs(at_, n));
        store<N>(Z + mi * N, z1, n);
        store<N>(Z + (mi + 32) * N, z2, n);
        float* cs = colsum + ((c - 1) & 1) * 4 * N + n;
        tile_column_sums(cs + (mi / 16) * N, z1, S + mi * N, n);
        tile_column_sums(cs + (mi / 16 + 2) * N, z2, S + (mi + 32) * N, n);
      } else {
        const int which = (job - 8) / 4;
        float* out = which == 0 ? dA : which == 1 ? dK : which == 2 ? dB : dR;
        load<N>(acc, out, n);
        if (which == 0 || which == 3) {  // dA += M3 bh + M4 kh, dR += M1 bh + M2 kh
          mma<false, false, C, ILP>(acc, small(which == 0 ? M3 : M1), vecs(bh, n));
          mma<false, false, C, ILP>(acc, small(which == 0 ? M4 : M2), vecs(kh, n));
        } else {  // dK += M2^T rt + M4^T at, dB += M1^T rt + M3^T at
          mma<true, false, C, ILP>(acc, small(which == 1 ? M2 : M1), vecs(rt, n));
          mma<true, false, C, ILP>(acc, small(which == 1 ? M4 : M3), vecs(at_, n));
        }
        store<N>(out, acc, n);
      }
    }
    __syncthreads();
    if (c > 0) request_chunk_state(c - 1);  // S has had its last reader
    {  // final gradients in the scan mapping, in place (dw into V, free since the products above)
      float dG[4], e[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int o = at<N>(scan_step(i), jb);
        const float G = __expf(p.g[i]), Gp = __expf(p.g[i] - p.l[i]), inv = __expf(-p.g[i]);
        const float xr = dR[o], xa = dA[o], xk = dK[o], xb = dB[o];
        // r dR - b dB - k dK with dR = G xr, dB = xb / G, ..., and r = rt / G, b = bh G, ...: the scalings cancel
        dG[i] = rt[o] * xr - bh[o] * xb - kh[o] * xk;
        e[i] = dG[i] + at_[o] * xa;
        dR[o] = G * xr;
        dA[o] = Gp * xa;
        dK[o] = inv * xk;
        dB[o] = inv * xb;
      }
      // dlog d_t = dG_t + sum_{s>t} (dG + a dA)_s + colsum. Step part + 4 i: the later steps of its round
      // sit in the higher lanes of the column, the later rounds are summed in `later`.
      const float* mine = colsum + (c & 1) * 4 * N;
      float later = mine[jb] + mine[N + jb] + mine[2 * N + jb] + mine[3 * N + jb];
#pragma unroll
      for (int i = 3; i >= 0; --i) {
        float incl = e[i];  // inclusive suffix sum over the lanes of this round
#pragma unroll
        for (int d = 1; d < 4; d <<= 1) {
          const float down = __shfl_down_sync(0xffffffffu, incl, d, 4);
          if (part + d < 4) incl += down;
        }
        // d(log d)/dw = log d (1 - sigmoid(w)) = log d (1 + log d / LOG_DECAY_SCALE)
        const float dlogd = p.l[i] * (1.f + p.l[i] * (1.f / LOG_DECAY_SCALE));
        V[at<N>(scan_step(i), jb)] = (dG[i] + later + incl - e[i]) * dlogd;
        later += __shfl_sync(0xffffffffu, incl, 0, 4);
      }
    }
  }
  __syncthreads();
  write_grads(0);
  __syncthreads();
  if (ds0_)
    for (int e = tid; e < N * N; e += THREADS) ds0_[int64_t(bhi) * N * N + e] = Z[state_at(e)];
}

constexpr size_t FORWARD_SMEM = sizeof(float) * (MAT + 10 * VEC + 5 * CCM + N);
constexpr size_t BACKWARD_SMEM = sizeof(float) * (2 * MAT + SAVED + 12 * VEC + 4 * CCM + 9 * N);
static_assert(SAVED == 2816, "the size of the saved products is also stated in wkv7_op.cpp");
static_assert(BACKWARD_SMEM == 99584 && FORWARD_SMEM < BACKWARD_SMEM,
              "the shared memory layer 3 needs is also stated in wkv7_op.cpp and vision_rwkv/ops/wkv7/cuda.py");

}  // namespace chunked
}  // namespace wkv7

// ------------------------------------------------------------------------------------------------
// Host entry points (called from wkv7_op.cpp), dtype 0 fp32, 1 bf16, 2 fp16; head size 64 only.
// Each returns false when the GPU cannot run the kernel (see fits) or the dtype is unknown.
// ------------------------------------------------------------------------------------------------

namespace {

template <typename Fn>
bool by_dtype(int dtype, Fn&& fn) {
  switch (dtype) {
    case 0: return fn(float{});
    case 1: return fn(__nv_bfloat16{});
    case 2: return fn(__half{});
    default: return false;
  }
}

template <typename K>
void allow_smem(K kernel, size_t bytes) {
  static_assert(std::is_pointer<K>::value, "a kernel function pointer");
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

// Two register budgets per kernel: with at most one (batch, head) per multiprocessor the chunk loop is
// latency-bound and gets all the registers it wants (one block per SM); with more, two blocks share an
// SM (128 registers per thread) so one block's barriers and dependency chains hide behind the other's.
// The current GPU runs these kernels: tf32 mma.sync needs sm_80 or newer, and the launch needs `bytes`
// of shared memory per block (the backward's 97 KB fit the 99 KB of the smallest parts, sm_86/89, where
// one block shares an SM with nothing: the two-block budget then buys nothing but costs nothing).
bool fits(size_t bytes) {
  int device = 0, major = 0, optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return major >= 8 && size_t(optin) >= bytes;
}

bool few_heads(int B, int H) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return int64_t(B) * H <= sms;
}

}  // namespace

bool wkv7_chunk_forward_cuda(int dtype, cudaStream_t stream, int B, int T, int H, const void* r, const void* w,
                             const void* k, const void* v, const void* a, const void* b, const float* s0, void* y,
                             float* sT, float* ckpt, float* saved) {
  using namespace wkv7::chunked;
  if (!fits(FORWARD_SMEM)) return false;
  return by_dtype(dtype, [&](auto tag) {
    using F = decltype(tag);
    auto kernel = few_heads(B, H) ? &forward_kernel<F, 1> : &forward_kernel<F, 2>;
    allow_smem(kernel, FORWARD_SMEM);
    kernel<<<B * H, THREADS, FORWARD_SMEM, stream>>>(T, H, (const F*)r, (const F*)w, (const F*)k, (const F*)v,
                                                      (const F*)a, (const F*)b, s0, (F*)y, sT, ckpt,
                                                      saved);
    return true;
  });
}

bool wkv7_chunk_backward_cuda(int dtype, cudaStream_t stream, int B, int T, int H, const void* r, const void* w,
                              const void* k, const void* v, const void* a, const void* b, const void* dy,
                              const float* dsT, const float* ckpt, const float* saved, const float* sT, bool zero_s0,
                              void* dr, void* dw, void* dk, void* dv, void* da, void* db, float* ds0) {
  using namespace wkv7::chunked;
  if (!fits(BACKWARD_SMEM)) return false;
  return by_dtype(dtype, [&](auto tag) {
    using F = decltype(tag);
    auto kernel = few_heads(B, H) ? &backward_kernel<F, 1> : &backward_kernel<F, 2>;
    allow_smem(kernel, BACKWARD_SMEM);
    kernel<<<B * H, THREADS, BACKWARD_SMEM, stream>>>(T, H, (const F*)r, (const F*)w, (const F*)k, (const F*)v,
                                                       (const F*)a, (const F*)b, (const F*)dy, dsT, ckpt, saved, sT,
                                                       zero_s0, (F*)dr, (F*)dw, (F*)dk, (F*)dv, (F*)da, (F*)db, ds0);
    return true;
  });
}
