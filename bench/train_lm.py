"""Language-model training steps on one GPU: our RWKV-7 against GPT-2 (and fla's RWKV-7 when installed),
each eager and compiled, in one process.

    python bench/train_lm.py [--shapes 8x1024,64x64] [--steps 10] [--compile | --modes eager,compiled,graphs]
                             [--models ours,gpt2,fla] [--profile]

A step: bf16 autocast forward and backward of the language-model loss over every position, then fused AdamW
(lr 1e-4). Ours computes its loss with vision_rwkv.ops.linear_ce (the (B*T, V) logits never exist at once);
GPT-2 is transformers' GPT2LMHeadModel with SDPA attention and labels=tokens; fla is RWKV7ForCausalLM.
Models: 12 layers, width 768, vocabulary 50,304, random init. Timing: CUDA events over `--steps` steps after
3 warm-ups, the median step; peak memory: torch.cuda.max_memory_allocated over the timed steps.

MFU = 6 x (parameters) x (tokens/s) / (dense bf16 peak: 989 TFLOP/s for an H100 or H200 SXM). It counts the
matrix products of the weights only (attention's and the WKV recurrence's own work are left out), the
usual convention, so it is comparable across the three.
"""

from __future__ import annotations

import argparse
import statistics

import _checkout  # noqa: F401 (this checkout's vision_rwkv before any installed one)
import torch

PEAK_FLOPS = 989e12
VOCAB = 50304


def ours(device):
    from vision_rwkv import RWKV7, RWKV7Config
    from vision_rwkv.lm.rwkv7 import COMPILE_OPTIONS
    from vision_rwkv.ops.linear_ce import linear_cross_entropy

    lm = RWKV7(RWKV7Config(vocab_size=VOCAB, n_layer=12, n_embd=768)).to(device)

    def loss_fn(model, tokens):
        h, _ = model.hidden(tokens[:, :-1])
        return linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.head.weight,
                                    tokens[:, 1:].reshape(-1)) / tokens[:, 1:].numel()

    lm.check_inputs = False  # no host read of the token range each step
    lm.compile_options = COMPILE_OPTIONS  # inductor's mix-order reduction off (lm/rwkv7.py says why)
    return lm, loss_fn


def gpt2(device):
    from transformers import AutoModelForCausalLM, GPT2Config

    cfg = GPT2Config(vocab_size=VOCAB, n_layer=12, n_embd=768, n_head=12, n_positions=1024)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(device)
    return model, lambda m, tokens: m(input_ids=tokens, labels=tokens).loss


def fla(device):
    import fla  # noqa: F401  (registers the model with transformers)
    from fla.models import RWKV7Config, RWKV7ForCausalLM

    model = RWKV7ForCausalLM(RWKV7Config(vocab_size=VOCAB, hidden_size=768, num_hidden_layers=12,
                                         head_dim=64)).to(device)
    return model, lambda m, tokens: m(input_ids=tokens, labels=tokens).loss


MODELS = {"ours": ours, "gpt2": gpt2, "fla": fla}
COMPILE_MODES = {"eager": None, "compiled": "default", "graphs": "reduce-overhead"}  # --modes -> torch.compile mode


def profile_step(step, top: int = 30) -> None:
    """One step under torch.profiler: the kernels grouped by name, by total GPU time."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    total, calls = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name] += e.device_time_total
            calls[e.name] += 1
    whole = sum(total.values())
    print(f"  profile: {sum(calls.values())} kernels, {whole / 1e3:.2f} ms of GPU time in one step")
    for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {us / 1e3:8.3f} ms {100 * us / whole:5.1f}% {calls[name]:6d}x  {name[:110]}")


def measure(make, batch, length, steps, compiled, device, profile=False, mode="default"):
    torch.manual_seed(0)
    model, loss_fn = make(device)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    options = dict(getattr(model, "compile_options", {}))
    if mode == "reduce-overhead":
        options["triton.cudagraphs"] = True  # what that mode sets; torch.compile takes mode= or options=
    compile_kw = {"options": options} if options else {"mode": mode}
    step_loss = torch.compile(loss_fn, dynamic=False, **compile_kw) if compiled else loss_fn  # a graph per shape
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, VOCAB, (batch, length + (1 if make is ours else 0)), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_loss(model, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    sec = statistics.median(times)
    if profile:
        profile_step(step)
    peak = torch.cuda.max_memory_allocated() / 2**30
    tps = batch * length / sec
    return params, tps, peak, 6 * params * tps / PEAK_FLOPS


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8x1024,64x64")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--models", default="ours,gpt2,fla")
    ap.add_argument("--compile", action="store_true", help="also time each model under torch.compile")
    ap.add_argument("--modes", default=None,
                    help="comma-separated, instead of --compile: eager, compiled (torch.compile's default mode), "
                         "graphs (its reduce-overhead mode: the compiled step replayed as CUDA graphs)")
    ap.add_argument("--profile", action="store_true", help="print each variant's kernels by GPU time (one step)")
    args = ap.parse_args()
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; MFU = 6 x params x tokens/s / 989e12")
    print(f"{'model':<8}{'mode':<10}{'shape':>9}{'params':>9}{'tokens/s':>12}{'peak GiB':>10}{'MFU':>7}")
    for name in args.models.split(","):
        modes = args.modes.split(",") if args.modes else (["eager", "compiled"] if args.compile else ["eager"])
        for mode in modes:
            if mode not in COMPILE_MODES:
                raise SystemExit(f"--modes: unknown mode {mode!r}; expected some of {', '.join(COMPILE_MODES)}")
            compiled = COMPILE_MODES[mode]
            for shape in args.shapes.split(","):
                batch, length = map(int, shape.split("x"))
                try:
                    params, tps, peak, mfu = measure(MODELS[name], batch, length, args.steps, compiled is not None,
                                                       device, args.profile, compiled or "default")
                    torch.cuda.empty_cache()  # the model and its optimizer went with measure's frame
                except ImportError as e:
                    print(f"{name:<8}not installed ({e.name})")
                    break
                except Exception as e:  # one variant failing (a compiler error) must not hide the others
                    import traceback

                    traceback.print_exc()
                    print(f"{name:<8}{mode:<10}{shape:>9}  failed: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
                    continue
                print(f"{name:<8}{mode:<10}{shape:>9}{params / 1e6:>8.0f}M{tps:>12,.0f}{peak:>10.1f}{100 * mfu:>6.1f}%",
                      flush=True)


if __name__ == "__main__":
    main()
