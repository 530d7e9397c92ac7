"""CPU throughput of the RWKV-4 decoder (its RNN step and GPT mode), side by side with the `rwkv` package.

    python bench/rwkv4_cpu.py [--layers 12 --embd 768 --vocab 50277 --threads N]

The defaults are RWKV-4 169M's shape (the Pile models' vocabulary), with random weights. Tokens/s of the RNN
step through rnn_stepper (the C++ step, lm/engine4.py, kernels/rwkv4_cpu.cpp) and through lm.step (the
PyTorch operations, the path before it), at batch 1 and 8, with fp32 weights and with a bf16 copy of the
same model (the C++ step reads the bf16 weights and keeps everything else in fp32). GPT mode (fp32 and bf16
weights, batch 1, --prefill tokens, the last position's logits as a prefill needs): lm(...) with the WKV-4
recurrence through the C++ kernel (ops/wkv4/cpu.py, the default for inference) and through the per-step
PyTorch reference (decoder.wkv_impl=reference, the path before). The baseline is RWKV-LM's own inference
code (pip package `rwkv`, strategy "cpu fp32", and "cpu bf16" beside our bf16 rows), batch 1 only, in a
subprocess (bench/decoder_cpu.py's). Every timing takes two warm-up runs and then the best of three. The floor is the
time to read the step's fp32 weights once (every matrix but the embedding) with torch's sum over a buffer of
that size, on the same threads (bf16: half the bytes); "of floor" is the floor's time over the step's.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import _checkout  # noqa: F401 (this checkout's vision_rwkv before any installed one)
import torch
from decoder_cpu import BASELINE, timed


@torch.no_grad()
def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50277)
    ap.add_argument("--steps", type=int, default=32, help="RNN-mode steps timed")
    ap.add_argument("--prefill", type=int, default=256, help="GPT-mode sequence length")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from vision_rwkv import RWKV4, DecoderConfig, save_official
    from vision_rwkv.lm.engine import EngineStepper
    from vision_rwkv.lm.graphs import rnn_stepper
    from vision_rwkv.ops.rwkv7 import cpu_step

    cfg = DecoderConfig(arch="rwkv4", vocab_size=args.vocab, n_layer=args.layers, n_embd=args.embd)
    lm32 = RWKV4(cfg).eval()
    for p in lm32.parameters():  # the initialisation zeroes whole projections: random values everywhere
        p.normal_(0, 0.02)
    weight_bytes = sum(p.numel() * 4 for n, p in lm32.named_parameters() if p.dim() == 2 and not n.startswith("emb"))
    buffer = torch.ones(weight_bytes // 4)
    floor = {torch.float32: timed(buffer.sum, 5), torch.bfloat16: timed(buffer[: buffer.numel() // 2].sum, 5)}
    del buffer
    build = cpu_step.build()

    def rate(lm, step, batch):
        tok = torch.ones(batch, dtype=torch.long)
        _, s0 = lm(torch.ones(batch, 8, dtype=torch.long))

        def run():
            state = s0
            for _ in range(args.steps):
                _, state = step(tok, state)

        return batch * args.steps / timed(run)

    ours = {}
    for dtype in (torch.float32, torch.bfloat16):
        lm = lm32 if dtype == torch.float32 else copy.deepcopy(lm32).to(dtype)
        step = rnn_stepper(lm)
        if not isinstance(step, EngineStepper):
            raise SystemExit(f"rwkv4_cpu.py: the C++ step cannot run here ({build or 'not taken'})")
        for batch in (1, 8):
            ours[(dtype, batch)] = rate(lm, step, batch), rate(lm, lm.step, batch)

    x = torch.randint(1, args.vocab, (1, args.prefill))
    plain = RWKV4(dataclasses.replace(cfg, wkv_impl="reference"), init=False).eval()
    plain.load_state_dict(lm32.state_dict())
    gpt = {}
    for dtype in (torch.float32, torch.bfloat16):
        for impl, m in (("kernel", lm32), ("reference", plain)):
            m = m if dtype == torch.float32 else copy.deepcopy(m).to(dtype)
            gpt[(dtype, impl)] = args.prefill / timed(lambda m=m: m(x, last_only=True))

    base, base_gpt = {}, {}
    if not args.no_baseline:
        with tempfile.TemporaryDirectory() as d:
            save_official(lm32, Path(d) / "m.pth")
            env = {**os.environ, "RWKV_JIT_ON": "1", "RWKV_CUDA_ON": "0"}
            env.pop("RWKV_V7_ON", None)
            for dtype, strategy in ((torch.float32, "cpu fp32"), (torch.bfloat16, "cpu bf16")):
                shape = json.dumps([args.prefill, args.steps])
                proc = subprocess.run([sys.executable, "-c", BASELINE, str(Path(d) / "m"), shape, str(args.threads),
                                       strategy], env=env, capture_output=True, text=True)
                if proc.returncode == 0:
                    result = json.loads(proc.stdout.strip().splitlines()[-1])
                    base[dtype], base_gpt[dtype] = result["rnn"], result["gpt"]
                else:
                    print(f"baseline ({strategy}) failed:", proc.stderr.strip().splitlines()[-1:], file=sys.stderr)

    print(f"RWKV-4 L{args.layers}-D{args.embd} V{args.vocab}, CPU: {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, torch {torch.__version__}, {args.steps} steps")
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        mb = weight_bytes / (1 if dtype == torch.float32 else 2) / 1e6
        print(f"{name} weight-read floor: {mb:.0f} MB in {floor[dtype] * 1e3:.1f} ms = {1 / floor[dtype]:.1f} steps/s")
    print(f"{'weights':<8}{'batch':>6}{'C++ step tok/s':>16}{'lm.step tok/s':>15}{'rwkv pkg tok/s':>16}"
          f"{'vs pkg':>8}{'vs lm.step':>11}{'of floor':>10}")
    rows = []
    for (dtype, batch), (fused, plain) in ours.items():
        b = base.get(dtype) if batch == 1 else None
        name = "fp32" if dtype == torch.float32 else "bf16"
        at_floor = f"{fused * floor[dtype]:10.2f}" if batch == 1 else f"{'-':>10}"
        against = f"{b:16.1f}{fused / b:8.2f}" if b else f"{'-':>16}{'-':>8}"
        print(f"{name:<8}{batch:6d}{fused:16.1f}{plain:15.1f}{against}{fused / plain:11.2f}{at_floor}")
        rows.append({"weights": name, "batch": batch, "cpp_step": fused, "lm_step": plain, "rwkv_pkg": b})
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        fast, slow, b = gpt[(dtype, "kernel")], gpt[(dtype, "reference")], base_gpt.get(dtype)
        print(f"GPT mode, {name} weights, batch 1 x T{args.prefill}, tokens/s: WKV-4 kernel {fast:.1f}, per-step "
              f"reference {slow:.1f} ({fast / slow:.2f}x)" + (f", rwkv pkg {b:.1f} ({fast / b:.2f}x)" if b else ""))
        rows.append({"prefill": args.prefill, "weights": name, "wkv4_kernel": fast, "wkv4_reference": slow,
                     "rwkv_pkg": b})
    return rows


if __name__ == "__main__":
    main()
