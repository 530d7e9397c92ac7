"""CPU throughput of the RWKV-7 decoder, side by side with the `rwkv` package on the same weights.

    python bench/decoder_cpu.py [--layers 12 --embd 768 --vocab 65536 --threads N]

RNN mode: tokens/s at batch 1 (and batch 8) through rnn_stepper (the fused step, lm/engine.py, with the C++
kernels of ops/rwkv7/cpu_step.py; their build on first use is timed apart), the same step with the PyTorch
reference ops and oneDNN's packed products (the default before the kernels), the same compiled
(VISION_RWKV_COMPILE_STEP=1; its first call, the compile, is timed apart) and plain lm.step. GPT mode: prefill
tokens/s through prefill_runner (the engine's prefill, as captioning runs it on the CPU: oneDNN's packed
products, the WKV-7 CPU kernel) and through lm(..., last_only=True), the last position's logits, as a prefill
needs and as the baseline computes. The baseline is RWKV-LM's own inference code (pip package `rwkv`,
RWKV_V7_ON=1, strategy "cpu fp32", and "cpu bf16" beside our bf16 rows), batch 1 only (it has no batched
mode), run in a subprocess because it sets global TorchScript flags. The bf16 rows run a bf16 copy of the same
model: our fused step reads its bf16 weights and keeps everything else in fp32 (ops/rwkv7/cpu_step.py); the
prefill with bf16 weights runs torch's bf16 products between the kernels' fp32 activations (and, for comparison,
the reference ops in bf16 around them, as it did before). Every timing, ours and the
baseline's, takes two warm-up runs and then the best of three. The floor is the time to read the step's fp32
weights once (every matrix but the embedding) with torch's sum over a buffer of that size, on the same
threads: no step can read its weights faster (the bf16 floor: a buffer of half the bytes). The prefill's
matrix products alone (every block's matrices at T rows, fp32), through torch's products and through oneDNN's
packed weights (the engine's), bound any prefill made of them the same way; the table's last row sets that
bound beside the baseline's prefill.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _checkout  # noqa: F401 (this checkout's vision_rwkv before any installed one)
import torch

BASELINE = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from rwkv.model import RWKV
m = RWKV(model=sys.argv[1], strategy=sys.argv[4])
T, steps = json.loads(sys.argv[2])
toks = list(range(1, T + 1))
def timed(fn, repeats=3):  # as ours: two warm-up runs, then the best of three
    fn(); fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); best = min(best, time.perf_counter() - t0)
    return best
out, s0 = m.forward(toks[:8], None)
def rnn_run():
    s = [t.clone() for t in s0]
    for i in range(steps): out, s = m.forward([i + 1], s)
gpt = T / timed(lambda: m.forward(toks, None))
rnn = steps / timed(rnn_run)
print(json.dumps({"gpt": gpt, "rnn": rnn}))
"""


def timed(fn, repeats=3):
    """Two warm-up runs, then the best of `repeats` (the baseline's timings are made the same way)."""
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--prefill", type=int, default=256, help="GPT-mode sequence length")
    ap.add_argument("--steps", type=int, default=64, help="RNN-mode steps timed")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--batches", default="", help="only time the C++ kernels' fused path against the split path "
                    "(oneDNN's products) at these batch sizes, e.g. 1,2,4,8,16: what cpu_step.fused_max_batch "
                    "is chosen from")
    ap.add_argument("--bf16", action="store_true", help="with --batches: a bf16 copy of the model (the fused path "
                    "reads its bf16 weights; the split path runs torch's bf16 products between fp32 activations), "
                    "and the split path through the PyTorch reference ops in bf16 beside it")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from vision_rwkv import RWKV7, RWKV7Config, save_official
    from vision_rwkv.lm.engine import StepEngine
    from vision_rwkv.lm.graphs import prefill_runner, rnn_stepper
    from vision_rwkv.ops.rwkv7 import cpu_step, reference

    lm = RWKV7(RWKV7Config(vocab_size=args.vocab, n_layer=args.layers, n_embd=args.embd)).eval()
    T, steps = args.prefill, args.steps
    if args.batches:
        return sweep(lm.to(torch.bfloat16) if args.bf16 else lm, [int(b) for b in args.batches.split(",")], steps)

    def rnn(batch, step):
        tok = torch.ones(batch, dtype=torch.long)
        _, s = lm(torch.ones(batch, 8, dtype=torch.long))

        def run():
            state = s
            for _ in range(steps):
                _, state = step(tok, state)

        return batch * steps / timed(run)

    def gpt(batch, length, plain=False):
        x = torch.randint(1, args.vocab, (batch, length))
        if plain:
            return batch * length / timed(lambda: lm(x, last_only=True))
        runner = prefill_runner(lm)  # the engine's prefill on the CPU, as captioning runs it
        return batch * length / timed(lambda: runner(lm.emb(x)))

    def products(length, packed):
        """The prefill's matrix products alone: every block's 2-D weights at `length` rows, fp32, through torch's
        products or (packed) oneDNN's packed weights as the engine runs them; best of 2."""
        from vision_rwkv.lm.engine import _onednn_linear, _onednn_weight

        mats = [p if name.endswith(".weight") else p.t() for block in lm.blocks  # (out, in) each
                for name, p in block.named_parameters() if p.dim() == 2 and not name.endswith("r_k")]
        if packed:
            mats = [(_onednn_weight(w), w.shape[1]) for w in mats]
        else:
            mats = [(w.contiguous(), w.shape[1]) for w in mats]
        xs = {n: torch.randn(length, n) for _, n in mats}
        product = _onednn_linear if packed else torch.nn.functional.linear

        def run():
            for w, n in mats:
                product(xs[n], w)
        return timed(run)

    gemm = {packed: products(T, packed) for packed in (False, True)}
    weight_bytes = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if not n.startswith("emb"))
    buffer = torch.ones(weight_bytes // 4)
    floor = timed(buffer.sum, 5)
    floor16 = timed(buffer[: buffer.numel() // 2].sum, 5)
    del buffer
    t0 = time.perf_counter()
    build_failed = cpu_step.build()
    build_s = time.perf_counter() - t0
    fused = rnn_stepper(lm)
    onednn = StepEngine(lm, ops=reference)

    own = []

    def onednn_step(tokens, state):
        if not own or state is not own[0]:  # a buffer of its own, updated in place from here on
            own[:] = [state.contiguous_float()]
        return onednn.step(tokens, own[0]), own[0]

    ours = {"rnn_b1": rnn(1, fused), "rnn_b1_onednn": rnn(1, onednn_step), "rnn_b1_plain": rnn(1, lm.step),
            "rnn_b8": rnn(8, fused), "rnn_b8_onednn": rnn(8, onednn_step),
            "gpt_b1": gpt(1, T), "gpt_b1_plain": gpt(1, T, plain=True), "gpt_b8": gpt(8, T // 8)}
    os.environ["VISION_RWKV_COMPILE_STEP"] = "1"
    t0 = time.perf_counter()
    fused(torch.ones(1, dtype=torch.long), None)
    compile_s = time.perf_counter() - t0
    ours["rnn_b1_compiled"] = rnn(1, fused)
    del os.environ["VISION_RWKV_COMPILE_STEP"]
    lm32, lm = lm, copy.deepcopy(lm).to(torch.bfloat16)  # rnn() and gpt() run `lm`: the bf16 copy, here
    fused16 = rnn_stepper(lm)
    ours |= {"rnn_b1_bf16": rnn(1, fused16), "rnn_b8_bf16": rnn(8, fused16), "gpt_b1_bf16": gpt(1, T)}
    x16 = lm.emb(torch.randint(1, args.vocab, (1, T)))
    ref16 = StepEngine(lm, ops=reference)  # the bf16 prefill as it ran before: the reference ops in bf16
    ours["gpt_b1_bf16_ref"] = T / timed(lambda: ref16.prefill_from(x16, None))
    lm = lm32
    base = base16 = None
    if not args.no_baseline:
        with tempfile.TemporaryDirectory() as d:
            save_official(lm, Path(d) / "m.pth")
            env = {**os.environ, "RWKV_V7_ON": "1", "RWKV_JIT_ON": "1", "RWKV_CUDA_ON": "0"}
            for strategy in ("cpu fp32", "cpu bf16"):
                proc = subprocess.run([sys.executable, "-c", BASELINE, str(Path(d) / "m"), json.dumps([T, steps]),
                                       str(args.threads), strategy], env=env, capture_output=True, text=True)
                if proc.returncode == 0:
                    result = json.loads(proc.stdout.strip().splitlines()[-1])
                    base, base16 = (result, base16) if strategy == "cpu fp32" else (base, result)
                else:
                    print(f"baseline ({strategy}) failed:", proc.stderr.strip().splitlines()[-1:], file=sys.stderr)

    print(f"RWKV-7 L{args.layers}-D{args.embd} V{args.vocab}, fp32 (and a bf16 copy), "
          f"CPU: {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, torch {torch.__version__}")
    print(f"fp32 weight-read floor: {weight_bytes / 1e6:.0f} MB in {floor * 1e3:.1f} ms "
          f"({weight_bytes / floor / 1e9:.1f} GB/s) = {1 / floor:.1f} steps/s at batch 1")
    print(f"bf16 weight-read floor: {weight_bytes / 2e6:.0f} MB in {floor16 * 1e3:.1f} ms "
          f"({weight_bytes / 2 / floor16 / 1e9:.1f} GB/s) = {1 / floor16:.1f} steps/s at batch 1")
    for packed, t in gemm.items():
        print(f"the prefill's matrix products alone at batch 1 x T{T}, {'oneDNN packed' if packed else 'torch'}: "
              f"{t * 1e3:.1f} ms = {T / t:.1f} tokens/s at most for any fp32 prefill with these products")
    print(f"{'mode':<44}{'vision_rwkv tok/s':>18}{'rwkv pkg tok/s':>16}{'ratio':>8}{'of floor':>11}")
    print(f"CPU kernels: {build_failed or f'built or loaded from the cache in {build_s:.1f} s'}; compiled step: "
          f"first call (the compile) {compile_s:.1f} s")
    rows = [("RNN step (fused), batch 1", ours["rnn_b1"], base and base["rnn"]),
            ("RNN step (reference ops, oneDNN), batch 1", ours["rnn_b1_onednn"], base and base["rnn"]),
            ("RNN step (fused, compiled), batch 1", ours["rnn_b1_compiled"], base and base["rnn"]),
            ("RNN step (lm.step), batch 1", ours["rnn_b1_plain"], base and base["rnn"]),
            ("RNN step (fused), batch 8", ours["rnn_b8"], None),
            ("RNN step (reference ops, oneDNN), batch 8", ours["rnn_b8_onednn"], None),
            (f"GPT prefill, batch 1 x T{T}", ours["gpt_b1"], base and base["gpt"]),
            (f"GPT prefill (lm(...)), batch 1 x T{T}", ours["gpt_b1_plain"], base and base["gpt"]),
            (f"GPT prefill, batch 8 x T{T // 8}", ours["gpt_b8"], None),
            ("  bound: the products alone, oneDNN packed", T / gemm[True], base and base["gpt"]),
            ("bf16 weights: RNN step (fused), batch 1", ours["rnn_b1_bf16"], base16 and base16["rnn"]),
            ("bf16 weights: RNN step (fused), batch 8", ours["rnn_b8_bf16"], None),
            (f"bf16 weights: GPT prefill, batch 1 x T{T}", ours["gpt_b1_bf16"], base16 and base16["gpt"]),
            ("  the same through the reference ops (before)", ours["gpt_b1_bf16_ref"], base16 and base16["gpt"])]
    for name, a, b in rows:
        bs = f"{b:16.1f}" if b else f"{'-':>16}"
        ratio = f"{a / b:8.2f}" if b else f"{'-':>8}"
        at_floor = f"{a * (floor16 if name.startswith('bf16') else floor):11.2f}" if name.endswith("batch 1") \
            else f"{'-':>11}"
        print(f"{name:<44}{a:18.1f}{bs}{ratio}{at_floor}")


def sweep(lm, batches, steps):
    """tokens/s of the engine's fused path (the C++ kernels) and its split path at each batch size."""
    from vision_rwkv.lm.engine import StepEngine
    from vision_rwkv.ops.rwkv7 import cpu_step, reference

    engine = StepEngine(lm)
    if engine.ops is not cpu_step:
        raise SystemExit(f"decoder_cpu.py: the CPU kernels cannot run: {cpu_step.build()}")
    bf16 = lm.head.weight.dtype == torch.bfloat16
    paths = [("fused", engine, cpu_step.MAX_ROWS), ("split", engine, 0)]
    if bf16:  # the split path as it ran before: the reference ops, bf16 activations
        paths.append(("split, ref. ops", StepEngine(lm, ops=reference), 0))
    print(f"fused (C++ kernels) against split ({'torch bf16' if bf16 else 'oneDNN'} products) path, "
          f"{'bf16 weights' if bf16 else 'fp32'}, {steps} steps, tokens/s; the engine's fused path takes up to "
          f"{cpu_step.fused_max_batch(lm.config.n_embd)} rows at this width")
    print(f"{'batch':>6}" + "".join(f"{name:>17}" for name, _, _ in paths))
    for B in batches:
        tok = torch.ones(B, dtype=torch.long)
        speed = {}
        for name, eng, fused_max in paths:
            if B > cpu_step.MAX_ROWS and fused_max:
                continue  # the one-pass products take at most MAX_ROWS rows
            eng.fused_max_batch = fused_max
            state = lm.init_state(B).contiguous_float()

            def run(tok=tok, state=state, eng=eng):
                for _ in range(steps):
                    eng.step(tok, state)

            speed[name] = B * steps / timed(run)
        print(f"{B:6d}" + "".join(f"{speed[name]:17.1f}" if name in speed else f"{'-':>17}" for name, _, _ in paths))


if __name__ == "__main__":
    main()
