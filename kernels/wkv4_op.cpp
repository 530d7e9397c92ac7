// Torch bindings for the WKV-4 CUDA kernel: ops vision_rwkv::wkv4_forward and vision_rwkv::wkv4_backward.
//
// k, v (and gy) are (B, T, C), contiguous, one dtype (fp32, bf16 or fp16); w, u are (C,) fp32; the state is
// three (B, C) fp32 tensors (num, den, max). The ops are a fragment of the vision_rwkv namespace, so this
// library and the WKV-7 one (which defines the namespace) load together in either order.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

bool wkv4_forward_cuda(int dtype, cudaStream_t stream, int B, int T, int C, const float* w, const float* u,
                       const void* k, const void* v, const float* num0, const float* den0, const float* max0,
                       void* y, float* numT, float* denT, float* maxT, float* ckpt);
bool wkv4_backward_cuda(int dtype, cudaStream_t stream, int B, int T, int C, const float* w, const float* u,
                        const void* k, const void* v, const void* gy, const float* num0, const float* den0,
                        const float* numT, const float* denT, const float* gnumT, const float* gdenT,
                        const float* gmaxT, const float* ckpt, void* gk, void* gv, float* gw_part, float* gu_part,
                        float* gnum0, float* gden0, float* gmax0);

namespace {

constexpr int64_t CKPT = 8;  // steps per state checkpoint: wkv4::CKPT in wkv4.cu
int64_t n_checkpoints(int64_t T) { return (T + CKPT - 1) / CKPT; }

using OptTensor = c10::optional<at::Tensor>;

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: TORCH_CHECK(false, "wkv4: k and v must be float32, bfloat16 or float16, got ", t);
  }
}

void check_seq(const at::Tensor& x, const at::Tensor& like, const char* name) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous(), "wkv4: ", name, " must be a contiguous CUDA tensor");
  TORCH_CHECK(x.sizes() == like.sizes() && x.scalar_type() == like.scalar_type(), "wkv4: ", name,
              " must match k in shape (B, T, C) and dtype");
}

void check_f32(const at::Tensor& x, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.scalar_type() == at::kFloat, "wkv4: ", name,
              " must be a contiguous fp32 CUDA tensor");
  TORCH_CHECK(x.sizes() == shape, "wkv4: ", name, " has shape ", x.sizes(), ", expected ", shape);
}

const float* opt_ptr(const OptTensor& x) { return x.has_value() ? x->data_ptr<float>() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv4_forward(
    const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v, const OptTensor& num0,
    const OptTensor& den0, const OptTensor& max0, bool save_for_backward) {
  TORCH_CHECK(k.dim() == 3, "wkv4: k must be (B, T, C)");
  check_seq(k, k, "k");
  check_seq(v, k, "v");
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  check_f32(w, {C}, "w");
  check_f32(u, {C}, "u");
  const bool has_state = num0.has_value();
  TORCH_CHECK(has_state == den0.has_value() && has_state == max0.has_value(),
              "wkv4: pass all three of (num, den, max) or none");
  if (has_state) {
    check_f32(*num0, {B, C}, "num");
    check_f32(*den0, {B, C}, "den");
    check_f32(*max0, {B, C}, "max");
  }
  const c10::cuda::OptionalCUDAGuard guard(k.device());
  auto f32 = k.options().dtype(at::kFloat);
  auto y = at::empty_like(k);
  auto numT = at::empty({B, C}, f32), denT = at::empty({B, C}, f32), maxT = at::empty({B, C}, f32);
  auto ckpt = at::empty({save_for_backward ? B : 0, n_checkpoints(T), 3, C}, f32);
  if (T == 0 || B * C == 0) {
    if (has_state) { numT.copy_(*num0); denT.copy_(*den0); maxT.copy_(*max0); }
    else { numT.zero_(); denT.zero_(); maxT.fill_(-1e38); }
    return {y, numT, denT, maxT, ckpt};
  }
  const bool ok = wkv4_forward_cuda(
      dtype_code(k.scalar_type()), c10::cuda::getCurrentCUDAStream(), B, T, C, w.data_ptr<float>(),
      u.data_ptr<float>(), k.data_ptr(), v.data_ptr(), opt_ptr(num0), opt_ptr(den0), opt_ptr(max0), y.data_ptr(),
      numT.data_ptr<float>(), denT.data_ptr<float>(), maxT.data_ptr<float>(),
      save_for_backward ? ckpt.data_ptr<float>() : nullptr);
  TORCH_CHECK(ok, "wkv4: no kernel for dtype ", k.scalar_type());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, numT, denT, maxT, ckpt};
}

// Returns (gw, gu, gk, gv, gnum0, gden0, gmax0); the last three are empty unless need_dstate.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv4_backward(
    const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v, const OptTensor& num0,
    const OptTensor& den0, const at::Tensor& numT, const at::Tensor& denT, const at::Tensor& ckpt,
    const OptTensor& gy, const OptTensor& gnumT, const OptTensor& gdenT, const OptTensor& gmaxT, bool need_dstate) {
  check_seq(k, k, "k");
  check_seq(v, k, "v");
  if (gy.has_value()) check_seq(*gy, k, "the gradient of y");
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  check_f32(w, {C}, "w");
  check_f32(u, {C}, "u");
  for (const auto* s : {&num0, &den0}) if (s->has_value()) check_f32(**s, {B, C}, "the initial state");
  check_f32(numT, {B, C}, "numT");
  check_f32(denT, {B, C}, "denT");
  for (const auto* s : {&gnumT, &gdenT, &gmaxT}) if (s->has_value()) check_f32(**s, {B, C}, "a final-state gradient");
  const c10::cuda::OptionalCUDAGuard guard(k.device());
  auto f32 = k.options().dtype(at::kFloat);
  auto gk = at::empty_like(k), gv = at::empty_like(k);
  const int64_t nB = need_dstate ? B : 0;
  auto gnum0 = at::empty({nB, C}, f32), gden0 = at::empty({nB, C}, f32), gmax0 = at::empty({nB, C}, f32);
  if (T == 0 || B * C == 0) {  // the state passes through: its gradient is the final state's
    if (need_dstate) {
      if (gnumT.has_value()) gnum0.copy_(*gnumT); else gnum0.zero_();
      if (gdenT.has_value()) gden0.copy_(*gdenT); else gden0.zero_();
      if (gmaxT.has_value()) gmax0.copy_(*gmaxT); else gmax0.zero_();
    }
    return {at::zeros({C}, f32), at::zeros({C}, f32), gk, gv, gnum0, gden0, gmax0};
  }
  TORCH_CHECK(ckpt.sizes() == at::IntArrayRef({B, n_checkpoints(T), 3, C}),
              "wkv4_backward: the forward was run without save_for_backward");
  auto gw_part = at::empty({B, C}, f32), gu_part = at::empty({B, C}, f32);
  const bool ok = wkv4_backward_cuda(
      dtype_code(k.scalar_type()), c10::cuda::getCurrentCUDAStream(), B, T, C, w.data_ptr<float>(),
      u.data_ptr<float>(), k.data_ptr(), v.data_ptr(), gy.has_value() ? gy->data_ptr() : nullptr, opt_ptr(num0),
      opt_ptr(den0), numT.data_ptr<float>(), denT.data_ptr<float>(), opt_ptr(gnumT), opt_ptr(gdenT), opt_ptr(gmaxT),
      ckpt.data_ptr<float>(), gk.data_ptr(), gv.data_ptr(), gw_part.data_ptr<float>(), gu_part.data_ptr<float>(),
      need_dstate ? gnum0.data_ptr<float>() : nullptr, need_dstate ? gden0.data_ptr<float>() : nullptr,
      need_dstate ? gmax0.data_ptr<float>() : nullptr);
  TORCH_CHECK(ok, "wkv4: no kernel for dtype ", k.scalar_type());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // A sum over the batch in a fixed order (no atomics): the same inputs give the same bits.
  return {gw_part.sum(0), gu_part.sum(0), gk, gv, gnum0, gden0, gmax0};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vision_rwkv, m) {
  m.def("wkv4_forward(Tensor w, Tensor u, Tensor k, Tensor v, Tensor? num0, Tensor? den0, Tensor? max0, "
        "bool save_for_backward) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("wkv4_backward(Tensor w, Tensor u, Tensor k, Tensor v, Tensor? num0, Tensor? den0, Tensor numT, "
        "Tensor denT, Tensor ckpt, Tensor? gy, Tensor? gnumT, Tensor? gdenT, Tensor? gmaxT, bool need_dstate) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vision_rwkv, CUDA, m) {
  m.impl("wkv4_forward", &wkv4_forward);
  m.impl("wkv4_backward", &wkv4_backward);
}
