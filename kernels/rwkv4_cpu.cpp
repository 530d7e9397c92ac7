// The RWKV-4 decoder's RNN step on the CPU (library vision_rwkv_cpu, beside rwkv7_cpu.cpp), with the
// contract of lm.step (vision_rwkv/lm/rwkv4.py; the recurrence: ops/wkv4/reference.py's wkv4_step):
//
//   rwkv4_step_fused_   every layer of one step in one call, for up to MAX_ROWS rows; the head is the
//                       caller's (linear_, or any product)
//   wkv4_forward        the WKV-4 recurrence over a sequence, forward only (GPT mode's inference:
//                       ops/wkv4/cpu.py)
//
// A layer is five operations, each reading its weights once for all rows (cpu_common.h):
//   ln_mix_matmul   LayerNorm 1 + the time mix's three token-shift mixes + the key, value and receptance
//                   products (one (3C, C) matrix; sigmoid on the receptance's columns)
//   wkv4_rows       the WKV-4 step (numerator, denominator and running maximum per channel), times r
//   linear          the output product
//   ln_mix_matmul   LayerNorm 2 + the channel mix's two mixes + its key (relu^2) and receptance (sigmoid)
//                   products (one (F + C, C) matrix)
//   linear          the value product, then times the receptance
//
// RWKV-4's mix is mix * x + (1 - mix) * previous; ln_mix_matmul computes x + (previous - x) * m, so the
// caller passes m = 1 - mix. Everything is fp32 but the products' weights and the embedding (fp32 or bf16).

#include "cpu_common.h"

namespace {

using namespace cpu_kernels;

// The WKV-4 step for B rows of C channels (ops/wkv4/reference.py's wkv4_step), times the receptance:
// kvr (B, 3C) holds k, v and r = sigmoid(...) side by side; num, den, mx (B, C) are updated in place;
// y (B, C) <- r * (e1 num + e2 v) / (e1 den + e2).
void wkv4_rows(const float* kvr, int64_t B, int64_t C, const float* decay, const float* first, float* num,
               float* den, float* mx, float* y) {
  for (int64_t b = 0; b < B; ++b) {
    const float* k = kvr + b * 3 * C;
    const float* v = k + C;
    const float* r = k + 2 * C;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = b * C + c;
      const float uk = first[c] + k[c];
      float q = std::max(mx[i], uk);
      float e1 = std::exp(mx[i] - q), e2 = std::exp(uk - q);
      const float wkv = (e1 * num[i] + e2 * v[c]) / (e1 * den[i] + e2);
      y[i] = r[c] * wkv;
      const float decayed = mx[i] + decay[c];
      q = std::max(decayed, k[c]);
      e1 = std::exp(decayed - q);
      e2 = std::exp(k[c] - q);
      num[i] = e1 * num[i] + e2 * v[c];
      den[i] = e1 * den[i] + e2;
      mx[i] = q;
    }
  }
}

constexpr int64_t LAYER_TENSORS = 12;  // the order of engine4.Step4Engine._layers

// One layer's slice of a state field (L, B, C): its (B, C) rows, which must be contiguous (the field itself
// may be a slice of a wider batch).
at::Tensor layer_rows(const at::Tensor& field, int64_t i, const char* what) {
  at::Tensor rows = field.select(0, i);
  check_contiguous(rows, what);
  return rows;
}

// tokens (B,) int64 -> xf (B,C) <- ln_out of the last residual stream; the state fields (L,B,C) fp32 are
// updated in place. layers holds LAYER_TENSORS a layer: ln1 weight and bias, mix_att (3,C) (1 - time_mix_k,
// _v, _r), w_att (3C,C) (key, value, receptance), decay (C) (-exp(time_decay)), first (C) (time_first),
// w_out (C,C), ln2 weight and bias, mix_ffn (2,C) (1 - time_mix_k, _r), w_ffn (F+C,C) (key, receptance),
// w_value (C,F). seg_att and seg_ffn are ln_mix_matmul's segment tables for w_att and w_ffn.
void rwkv4_step_fused(const at::Tensor& tokens, const at::Tensor& emb, const at::Tensor& ln0_w,
                      const at::Tensor& ln0_b, at::TensorList layers, const at::Tensor& seg_att,
                      const at::Tensor& seg_ffn, const at::Tensor& att_shift, const at::Tensor& num,
                      const at::Tensor& den, const at::Tensor& mx, const at::Tensor& ffn_shift,
                      const at::Tensor& ln_out_w, const at::Tensor& ln_out_b, const at::Tensor& xf, int64_t block_n) {
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.dim() == 1 && tokens.is_contiguous(),
              "vision_rwkv_cpu: rwkv4_step_fused_ takes contiguous int64 tokens (B,)");
  for (const auto* t : {&ln0_w, &ln0_b, &ln_out_w, &ln_out_b, &xf})
    check_contiguous(*t, "rwkv4_step_fused_'s tensors");
  check_weights(emb, "rwkv4_step_fused_'s emb");
  const int64_t B = tokens.size(0), C = emb.size(1);
  const int64_t L = static_cast<int64_t>(layers.size()) / LAYER_TENSORS;
  TORCH_CHECK(B <= MAX_ROWS, "vision_rwkv_cpu: rwkv4_step_fused_ takes at most ", MAX_ROWS, " rows, got ", B);
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(layers.size()) == L * LAYER_TENSORS && xf.size(0) == B &&
                  xf.size(1) == C,
              "vision_rwkv_cpu: rwkv4_step_fused_: ", LAYER_TENSORS, " tensors a layer, and xf (B, C)");
  for (const auto* t : {&att_shift, &num, &den, &mx, &ffn_shift})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == L && t->size(1) == B && t->size(2) == C,
                "vision_rwkv_cpu: rwkv4_step_fused_: each state field must be (", L, ", ", B, ", ", C, ")");
  const int64_t F = layers[11].size(1);
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor* w = layers.data() + i * LAYER_TENSORS;
    TORCH_CHECK(w[0].numel() == C && w[1].numel() == C && w[2].dim() == 2 && w[2].size(0) == 3 &&
                    w[2].size(1) == C && w[3].size(0) == 3 * C && w[4].numel() == C && w[5].numel() == C &&
                    w[6].size(0) == C && w[7].numel() == C && w[8].numel() == C && w[9].dim() == 2 &&
                    w[9].size(0) == 2 && w[9].size(1) == C && w[10].size(0) == F + C && w[11].size(0) == C &&
                    w[11].size(1) == F,
                "vision_rwkv_cpu: rwkv4_step_fused_: layer ", i, "'s weights do not have RWKV-4's shapes for width ",
                C, " and channel-mix width ", F);
    for (int j : {4, 5}) check_contiguous(w[j], "decay and first");
  }
  const auto f32 = xf.options();
  at::Tensor xa = at::empty({B, C}, f32), xb = at::empty({B, C}, f32), xl_att = at::empty({B, C}, f32),
             xl_ffn = at::empty({B, C}, f32), y = at::empty({B, C}, f32), dx = at::empty({B, C}, f32),
             kvr = at::empty({B, 3 * C}, f32), kr = at::empty({B, F + C}, f32), vals = at::empty({B, C}, f32);
  embed_layer_norm(tokens, emb, ln0_w, ln0_b, xa, "rwkv4_step_fused_");
  const at::Tensor keys = kr.narrow(1, 0, F);  // relu(key)^2, rows F + C apart
  float* dxp = dx.data_ptr<float>();
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor* w = layers.data() + i * LAYER_TENSORS;
    const at::Tensor att_i = layer_rows(att_shift, i, "att_shift"), ffn_i = layer_rows(ffn_shift, i, "ffn_shift");
    ln_mix_matmul(xa, i ? c10::optional<at::Tensor>(dx) : c10::nullopt, xb, xl_att, w[0], w[1], att_i, w[2], w[3],
                  seg_att, kvr, block_n, i ? c10::optional<at::Tensor>(xl_ffn) : c10::nullopt,
                  i ? c10::optional<at::Tensor>(layer_rows(ffn_shift, i - 1, "ffn_shift")) : c10::nullopt);
    wkv4_rows(kvr.data_ptr<float>(), B, C, w[4].data_ptr<float>(), w[5].data_ptr<float>(),
              layer_rows(num, i, "num").data_ptr<float>(), layer_rows(den, i, "den").data_ptr<float>(),
              layer_rows(mx, i, "max").data_ptr<float>(), y.data_ptr<float>());
    linear(y, w[6], dx, 1);
    ln_mix_matmul(xb, dx, xa, xl_ffn, w[7], w[8], ffn_i, w[9], w[10], seg_ffn, kr, block_n, xl_att, att_i);
    linear(keys, w[11], vals, 1);
    const float* rp = kr.data_ptr<float>() + F;
    const float* vp = vals.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) dxp[b * C + c] = rp[b * (F + C) + c] * vp[b * C + c];
  }
  layer_rows(ffn_shift, L - 1, "ffn_shift").copy_(xl_ffn);
  add_layer_norm(xa, dx, ln_out_w, ln_out_b, xf);
}

// The WKV-4 recurrence over a sequence, forward only (ops/wkv4/reference.py's wkv4_reference): w, u (C,);
// k, v (B,T,C); the state (num, den, max) each (B,C), or none (a fresh one) -> y (B,T,C) and the final state,
// all fp32. Channels are independent: a task takes one row's block of channels through every position,
// 16 at a time, their state in registers.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv4_forward(
    const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& num0, const c10::optional<at::Tensor>& den0,
    const c10::optional<at::Tensor>& max0, double max_init) {
  for (const auto* t : {&w, &u, &k, &v}) check_contiguous(*t, "wkv4_forward's inputs");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && w.numel() == k.size(2) && u.numel() == k.size(2),
              "vision_rwkv_cpu: wkv4_forward takes k and v (B, T, C) and w and u (C,)");
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  at::Tensor y = at::empty_like(k), num = at::empty({B, C}, k.options()), den = at::empty({B, C}, k.options()),
             mx = at::empty({B, C}, k.options());
  TORCH_CHECK(num0.has_value() == den0.has_value() && num0.has_value() == max0.has_value(),
              "vision_rwkv_cpu: wkv4_forward takes the whole state (num, den, max) or none of it");
  if (num0.has_value()) {
    for (const auto* t : {&*num0, &*den0, &*max0}) {
      check_contiguous(*t, "wkv4_forward's state");
      TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == C,
                  "vision_rwkv_cpu: wkv4_forward's state must be (", B, ", ", C, ") each");
    }
    num.copy_(*num0);
    den.copy_(*den0);
    mx.copy_(*max0);
  } else {
    num.zero_();
    den.zero_();
    mx.fill_(max_init);
  }
  constexpr int64_t BLOCK = 64;  // channels a task
  const int64_t blocks = (C + BLOCK - 1) / BLOCK;
  const float *wp = w.data_ptr<float>(), *up = u.data_ptr<float>(), *kp = k.data_ptr<float>(),
              *vp = v.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *np = num.data_ptr<float>(), *dp = den.data_ptr<float>(),
        *mp = mx.data_ptr<float>();
  at::parallel_for(0, B * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / blocks, c0 = (task % blocks) * BLOCK, n = std::min(BLOCK, C - c0);
      float* sn = np + b * C + c0;
      float* sd = dp + b * C + c0;
      float* sm = mp + b * C + c0;
      each16(n, [&](auto V, int64_t j) {
        using Vt = decltype(V);
        const auto ww = load_as(Vt{}, wp + c0 + j), uu = load_as(Vt{}, up + c0 + j);
        auto a = load_as(Vt{}, sn + j), d = load_as(Vt{}, sd + j), m = load_as(Vt{}, sm + j);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t at = (b * T + t) * C + c0 + j;
          const auto kk = load_as(Vt{}, kp + at), vv = load_as(Vt{}, vp + at);
          const auto uk = uu + kk;
          auto q = max_of(m, uk);
          auto e1 = exp_of(m - q), e2 = exp_of(uk - q);
          store_as(yp + at, (e1 * a + e2 * vv) / (e1 * d + e2));
          const auto decayed = m + ww;
          q = max_of(decayed, kk);
          e1 = exp_of(decayed - q);
          e2 = exp_of(kk - q);
          a = e1 * a + e2 * vv;
          d = e1 * d + e2;
          m = q;
        }
        store_as(sn + j, a);
        store_as(sd + j, d);
        store_as(sm + j, m);
      });
    }
  });
  return {y, num, den, mx};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vision_rwkv_cpu, m) {
  m.def("rwkv4_step_fused_(Tensor tokens, Tensor emb, Tensor ln0_w, Tensor ln0_b, Tensor[] layers, Tensor seg_att, "
        "Tensor seg_ffn, Tensor(a!) att_shift, Tensor(b!) num, Tensor(c!) den, Tensor(d!) max, "
        "Tensor(e!) ffn_shift, Tensor ln_out_w, Tensor ln_out_b, Tensor(f!) xf, int block_n) -> ()");
  m.def("wkv4_forward(Tensor w, Tensor u, Tensor k, Tensor v, Tensor? num, Tensor? den, Tensor? max, "
        "float max_init) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vision_rwkv_cpu, CPU, m) {
  m.impl("rwkv4_step_fused_", &rwkv4_step_fused);
  m.impl("wkv4_forward", &wkv4_forward);
}
