// Torch bindings for the WKV-7 CUDA kernels: ops vision_rwkv::wkv7_forward and vision_rwkv::wkv7_backward.
//
// Inputs r, w, k, v, a, b (and dy) are (B, T, H, N), contiguous, one dtype (fp32, bf16 or fp16).
// States are (B, H, N, N) fp32 indexed [value, key]. w is the raw decay logit.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

bool wkv7_forward_cuda(int dtype, int N, int layout, cudaStream_t stream, int B, int T, int H, const void* r,
                       const void* w, const void* k, const void* v, const void* a, const void* b, const float* s0,
                       void* y, float* sT, float* sa, float* ckpt);
bool wkv7_backward_cuda(int dtype, int N, int layout, cudaStream_t stream, int B, int T, int H, const void* r,
                        const void* w, const void* k, const void* v, const void* a, const void* b, const void* dy,
                        const float* dsT, const float* sa, const float* ckpt, void* dr, void* dw, void* dk,
                        void* dv, void* da, void* db, float* ds0);

bool wkv7_chunk_forward_cuda(int dtype, cudaStream_t stream, int B, int T, int H, const void* r, const void* w,
                             const void* k, const void* v, const void* a, const void* b, const float* s0, void* y,
                             float* sT, float* ckpt, float* saved);
bool wkv7_chunk_backward_cuda(int dtype, cudaStream_t stream, int B, int T, int H, const void* r, const void* w,
                              const void* k, const void* v, const void* a, const void* b, const void* dy,
                              const float* dsT, const float* ckpt, const float* saved, const float* sT, bool zero_s0,
                              void* dr, void* dw, void* dk, void* dv, void* da, void* db, float* ds0);

namespace {

constexpr int64_t CHUNK = 16;  // must match wkv7::CHUNK in wkv7.cu and wkv7::chunked::C in wkv7_chunk.cu
constexpr int64_t TENSOR_CORE_LAYOUT = 3;  // wkv7_chunk.cu: chunks on tensor cores, head size 64

// What the forward saves for the backward. The row kernels keep the state at the end of every chunk
// (transposed, in ckpt) plus S a per step (in sa). The tensor-core kernel keeps the state at the start
// of every chunk (in ckpt; the first only when the initial state is not zero; the backward reads the
// final state from the forward's output), and in the sa slot, per chunk, the products of the chunk's
// inputs that its backward would otherwise recompute (SAVED in wkv7_chunk.cu).
constexpr int64_t TENSOR_CORE_SAVED = 2816;
int64_t n_checkpoints(int64_t T) { return (T + CHUNK - 1) / CHUNK; }
int64_t sa_numel(int64_t B, int64_t T, int64_t H, int64_t N, int64_t layout) {
  return layout == TENSOR_CORE_LAYOUT ? B * H * n_checkpoints(T) * TENSOR_CORE_SAVED : B * T * H * N;
}
constexpr const char* TENSOR_CORE_NEEDS =
    "wkv7: the tensor-core kernel (layout 3) needs a GPU of compute capability 8.0 or newer with at least "
    "99584 bytes of shared memory per block; layouts 0-2 run anywhere";

void check_inputs(const std::vector<at::Tensor>& xs, const at::Tensor& like) {
  for (const auto& x : xs) {
    TORCH_CHECK(x.is_cuda(), "wkv7: all inputs must be CUDA tensors");
    TORCH_CHECK(x.sizes() == like.sizes(), "wkv7: inputs must share one shape (B, T, H, N)");
    TORCH_CHECK(x.scalar_type() == like.scalar_type(), "wkv7: inputs must share one dtype");
    TORCH_CHECK(x.is_contiguous(), "wkv7: inputs must be contiguous");
  }
}

void check_state(const c10::optional<at::Tensor>& s, int64_t B, int64_t H, int64_t N) {
  if (!s.has_value()) return;
  TORCH_CHECK(s->is_cuda() && s->scalar_type() == at::kFloat && s->is_contiguous(),
              "wkv7: states must be contiguous fp32 CUDA tensors");
  TORCH_CHECK(s->sizes() == at::IntArrayRef({B, H, N, N}), "wkv7: state must have shape (B, H, N, N)");
}

const float* opt_ptr(const c10::optional<at::Tensor>& s) { return s.has_value() ? s->data_ptr<float>() : nullptr; }

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: TORCH_CHECK(false, "wkv7: dtype must be float32, bfloat16 or float16");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv7_forward(
    const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v, const at::Tensor& a,
    const at::Tensor& b, const c10::optional<at::Tensor>& s0, bool save_for_backward, int64_t layout) {
  check_inputs({r, w, k, v, a, b}, r);
  TORCH_CHECK(r.dim() == 4, "wkv7: inputs must be (B, T, H, N)");
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  check_state(s0, B, H, N);
  const c10::cuda::OptionalCUDAGuard guard(r.device());
  auto f32 = r.options().dtype(at::kFloat);
  auto y = at::empty_like(r);
  auto sT = at::empty({B, H, N, N}, f32);
  const int64_t n_ckpt = n_checkpoints(T);
  auto sa = save_for_backward ? at::empty({sa_numel(B, T, H, N, layout)}, f32) : at::empty({0}, f32);
  auto ckpt = save_for_backward ? at::empty({B, H, n_ckpt, N, N}, f32) : at::empty({0}, f32);
  if (T == 0) {
    if (s0.has_value()) sT.copy_(*s0); else sT.zero_();
    return {y, sT, sa, ckpt};
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (layout == TENSOR_CORE_LAYOUT) {
    TORCH_CHECK(N == 64, "wkv7: the tensor-core kernel (layout 3) needs head size 64, got ", N);
    const bool ok = wkv7_chunk_forward_cuda(
        dtype_code(r.scalar_type()), stream, B, T, H, r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(),
        a.data_ptr(), b.data_ptr(), opt_ptr(s0), y.data_ptr(), sT.data_ptr<float>(),
        save_for_backward ? ckpt.data_ptr<float>() : nullptr, save_for_backward ? sa.data_ptr<float>() : nullptr);
    TORCH_CHECK(ok, TENSOR_CORE_NEEDS);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {y, sT, sa, ckpt};
  }
  const bool ok = wkv7_forward_cuda(
      dtype_code(r.scalar_type()), N, layout, stream, B, T, H, r.data_ptr(), w.data_ptr(), k.data_ptr(),
      v.data_ptr(), a.data_ptr(), b.data_ptr(), opt_ptr(s0), y.data_ptr(), sT.data_ptr<float>(),
      save_for_backward ? sa.data_ptr<float>() : nullptr, save_for_backward ? ckpt.data_ptr<float>() : nullptr);
  TORCH_CHECK(ok, "wkv7: no kernel for head size ", N, " and layout ", layout);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, sT, sa, ckpt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv7_backward(
    const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& dy, const c10::optional<at::Tensor>& dsT, const at::Tensor& sa,
    const at::Tensor& ckpt, const c10::optional<at::Tensor>& sT, bool zero_s0, bool need_ds0, int64_t layout) {
  check_inputs({r, w, k, v, a, b, dy}, r);
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  check_state(dsT, B, H, N);
  const c10::cuda::OptionalCUDAGuard guard(r.device());
  auto dr = at::empty_like(r), dw = at::empty_like(r), dk = at::empty_like(r), dv = at::empty_like(r);
  auto da = at::empty_like(r), db = at::empty_like(r);
  auto ds0 = at::empty({need_ds0 ? B : 0, H, N, N}, r.options().dtype(at::kFloat));
  if (T == 0) {
    if (need_ds0) { if (dsT.has_value()) ds0.copy_(*dsT); else ds0.zero_(); }
    return {dr, dw, dk, dv, da, db, ds0};
  }
  TORCH_CHECK(sa.numel() == sa_numel(B, T, H, N, layout) &&
                  ckpt.numel() == B * H * n_checkpoints(T) * N * N,
              "wkv7_backward: the forward was run without save_for_backward (or with another layout)");
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (layout == TENSOR_CORE_LAYOUT) {
    TORCH_CHECK(N == 64, "wkv7: the tensor-core kernel (layout 3) needs head size 64, got ", N);
    TORCH_CHECK(sT.has_value(), "wkv7_backward: layout 3 needs the forward's final state");
    check_state(sT, B, H, N);
    const bool ok = wkv7_chunk_backward_cuda(
        dtype_code(r.scalar_type()), stream, B, T, H, r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(),
        a.data_ptr(), b.data_ptr(), dy.data_ptr(), opt_ptr(dsT), ckpt.data_ptr<float>(), sa.data_ptr<float>(),
        sT->data_ptr<float>(), zero_s0, dr.data_ptr(), dw.data_ptr(), dk.data_ptr(), dv.data_ptr(), da.data_ptr(),
        db.data_ptr(), need_ds0 ? ds0.data_ptr<float>() : nullptr);
    TORCH_CHECK(ok, TENSOR_CORE_NEEDS);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {dr, dw, dk, dv, da, db, ds0};
  }
  const bool ok = wkv7_backward_cuda(
      dtype_code(r.scalar_type()), N, layout, stream, B, T, H, r.data_ptr(), w.data_ptr(), k.data_ptr(),
      v.data_ptr(), a.data_ptr(), b.data_ptr(), dy.data_ptr(), opt_ptr(dsT), sa.data_ptr<float>(),
      ckpt.data_ptr<float>(), dr.data_ptr(), dw.data_ptr(), dk.data_ptr(), dv.data_ptr(), da.data_ptr(),
      db.data_ptr(), need_ds0 ? ds0.data_ptr<float>() : nullptr);
  TORCH_CHECK(ok, "wkv7: no kernel for head size ", N, " and layout ", layout);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dr, dw, dk, dv, da, db, ds0};
}

}  // namespace

TORCH_LIBRARY(vision_rwkv, m) {
  m.def("wkv7_forward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor? s0, "
        "bool save_for_backward, int layout) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("wkv7_backward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor dy, Tensor? dsT, "
        "Tensor sa, Tensor ckpt, Tensor? sT, bool zero_s0, bool need_ds0, int layout) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vision_rwkv, CUDA, m) {
  m.impl("wkv7_forward", &wkv7_forward);
  m.impl("wkv7_backward", &wkv7_backward);
}
