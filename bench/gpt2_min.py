"""A minimal GPT-2 with a preallocated KV cache: the transformer baseline at its best, for decoding benches.

    gpt = MinimalGPT2(transformers_gpt2_lm_head_model, batch_size=B, max_len=P + new_tokens)
    tokens = gpt.greedy(prefix_embeds, new_tokens)        # (B, new_tokens)
    gpt.compile()   # torch.compile: the prefill in default mode, the step with mode="reduce-overhead"

It runs the weights of a transformers GPT2LMHeadModel (shared, not copied) with the same arithmetic:
pre-norm blocks, fused qkv, GELU (tanh), tied head. Unlike transformers' generate(), every shape is fixed:
the cache is (layers, B, heads, max_len, head_dim), written in place at the step's position, and each step
attends over the whole cache with a mask of the positions written so far, its position a tensor. So the
step compiles once and replays as a CUDA graph (reduce-overhead) for every position, the way our RNN step
replays. tests/test_bench_gpt2_min.py checks its greedy tokens and logits against transformers' own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class MinimalGPT2(torch.nn.Module):
    def __init__(self, hf_model, batch_size: int, max_len: int):
        super().__init__()
        cfg = hf_model.config
        if max_len > cfg.n_positions:
            raise ValueError(f"max_len {max_len} is over the model's {cfg.n_positions} positions")
        self.hf = hf_model.eval()
        self.n_head, self.n_embd, self.eps = cfg.n_head, cfg.n_embd, cfg.layer_norm_epsilon
        self.head_dim = cfg.n_embd // cfg.n_head
        p = next(hf_model.parameters())
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=p.dtype, device=p.device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=p.dtype, device=p.device), persistent=False)
        for cache in (self.k_cache, self.v_cache):  # written in place by the step: its graph keeps their address
            torch._dynamo.mark_static_address(cache)
        self.batch_size, self.max_len = batch_size, max_len
        self._prefill, self._step = self.prefill, self.step

    def compile(self) -> MinimalGPT2:
        """The prefill compiled, the step compiled with mode="reduce-overhead" (a CUDA graph on CUDA); see
        cudagraph_skips() for whether inductor really graphed it."""
        self._prefill = torch.compile(self.prefill, dynamic=False)
        self._step = torch.compile(self.step, mode="reduce-overhead", dynamic=False)
        return self

    @staticmethod
    def cudagraph_skips() -> int:
        """How many times so far in this process inductor ran a reduce-overhead function without CUDA graphs
        (0: every one was graphed; it logs each reason)."""
        from torch._dynamo.utils import counters

        return counters["inductor"]["cudagraph_skips"]

    def _attention_inputs(self, block, x):
        B, T, C = x.shape
        h = F.layer_norm(x, (C,), block.ln_1.weight, block.ln_1.bias, self.eps)
        qkv = torch.addmm(block.attn.c_attn.bias, h.view(B * T, C), block.attn.c_attn.weight)  # Conv1D: (C, 3C)
        q, k, v = qkv.view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # each (B,H,T,D)
        return q, k, v

    def _finish_block(self, block, x, attn):
        B, T, C = x.shape
        attn = attn.transpose(1, 2).reshape(B * T, C)
        x = x + torch.addmm(block.attn.c_proj.bias, attn, block.attn.c_proj.weight).view(B, T, C)
        h = F.layer_norm(x, (C,), block.ln_2.weight, block.ln_2.bias, self.eps)
        h = F.gelu(torch.addmm(block.mlp.c_fc.bias, h.view(B * T, C), block.mlp.c_fc.weight), approximate="tanh")
        return x + torch.addmm(block.mlp.c_proj.bias, h, block.mlp.c_proj.weight).view(B, T, C)

    def _logits(self, x):
        t = self.hf.transformer
        x = F.layer_norm(x, (self.n_embd,), t.ln_f.weight, t.ln_f.bias, self.eps)
        return x @ self.hf.lm_head.weight.t()

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds (B,P,C) at positions 0..P-1 -> the last position's logits (B,V); the cache holds 0..P-1."""
        t = self.hf.transformer
        P = embeds.shape[1]
        x = embeds.to(self.k_cache.dtype) + t.wpe.weight[:P]
        for i, block in enumerate(t.h):
            q, k, v = self._attention_inputs(block, x)
            self.k_cache[i, :, :, :P] = k
            self.v_cache[i, :, :, :P] = v
            x = self._finish_block(block, x, F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return self._logits(x[:, -1:])[:, 0]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens (B,) at position pos (a 0-dim long tensor) -> logits (B,V); writes the cache at pos."""
        t = self.hf.transformer
        x = (t.wte(tokens) + t.wpe(pos.view(1))).unsqueeze(1)  # (B,1,C)
        seen = (torch.arange(self.max_len, device=tokens.device) <= pos).view(1, 1, 1, -1)
        for i, block in enumerate(t.h):
            q, k, v = self._attention_inputs(block, x)
            self.k_cache[i].index_copy_(2, pos.view(1), k)
            self.v_cache[i].index_copy_(2, pos.view(1), v)
            attn = F.scaled_dot_product_attention(q, self.k_cache[i], self.v_cache[i], attn_mask=seen)
            x = self._finish_block(block, x, attn)
        return self._logits(x)[:, 0]

    @torch.no_grad()
    def greedy(self, embeds: torch.Tensor, new_tokens: int, logits_out: list | None = None) -> torch.Tensor:
        """Greedy decoding of new_tokens after the prefix embeds (B,P,C) -> (B, new_tokens) token ids.
        logits_out, if a list, receives each step's logits (B,V) (the prefill's first)."""
        B, P, _ = embeds.shape
        if B != self.batch_size or P + new_tokens > self.max_len + 1:
            raise ValueError(f"a batch of {B} x {P} positions + {new_tokens} new tokens does not fit the cache "
                             f"({self.batch_size} x {self.max_len})")
        logits = self._prefill(embeds)
        out = torch.empty(B, new_tokens, dtype=torch.long, device=embeds.device)
        pos = torch.tensor(P, device=embeds.device)
        for n in range(new_tokens):
            if logits_out is not None:
                logits_out.append(logits.clone())
            out[:, n] = logits.argmax(-1)
            if n + 1 < new_tokens:
                logits = self._step(out[:, n].clone(), pos)
                pos += 1
        return out

