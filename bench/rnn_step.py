"""The RNN step on CUDA: ms per step, tokens/s, kernels per step, and the share of the bandwidth floor.

    python bench/rnn_step.py [--layers 12 --embd 768 --vocab 65536 --batches 1,64,256 --compile]

Each row times a greedy argmax loop of `--steps` steps (bf16 weights, fp32 state) replayed from a CUDA
graph, as decoding runs it: the fused step (lm/engine.py, what `rnn_stepper` captures), the plain step
(lm.step's PyTorch operations, the baseline and the exportable path) and, with --compile, the plain step
compiled by torch.compile (inductor, default mode, no inductor cudagraphs) in the same kind of graph.
With --check, a random-weight copy of the model (every matrix random, so every layer matters) decodes
greedily from random prompts with the fused graph and with eager lm.step, and the tokens are compared:
rows that differ are reported with the eager logits' top-two gap where they first part (a tie in bf16).
Kernels per step come from torch.profiler over one step of each variant. The floor
is the bytes one step must read (every block weight, the head, the state in and out) over the
device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import _checkout  # noqa: F401 (this checkout's vision_rwkv before any installed one)
import torch


def copy_bandwidth(device) -> float:
    """Bytes/s of a device-to-device copy of 2 GiB (read + write counted once each)."""
    x = torch.empty(1 << 30, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 10 * 2 * x.numel() * x.element_size() / (time.perf_counter() - t)


def step_bytes(lm, batch: int) -> int:
    weights = sum(p.numel() * p.element_size() for name, p in lm.named_parameters() if not name.startswith("emb"))
    state = lm.init_state(batch)
    state_bytes = sum(t.numel() * t.element_size() for t in (state.att_shift, state.wkv, state.ffn_shift))
    return weights + 2 * state_bytes


def kernels_per_step(fn, *args) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def graphed_loop(step, tokens, state, steps: int):
    """A CUDA graph of `steps` greedy steps: step -> argmax -> next step."""
    def body():
        tok, st = tokens, state
        for _ in range(steps):
            logits, st2 = step(tok, st)
            if st2 is not st:
                st.att_shift.copy_(st2.att_shift)
                st.wkv.copy_(st2.wkv)
                st.ffn_shift.copy_(st2.ffn_shift)
            tok = logits.argmax(-1)
        return tok

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        body()
    return graph


def timed(graph, repeats: int = 20) -> float:
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--steps", type=int, default=16, help="steps per graph")
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd step in a graph")
    ap.add_argument("--check", action="store_true", help="compare greedy tokens, fused graph against eager")
    ap.add_argument("--profile", action="store_true", help="print the fused step's kernels by GPU time")
    ap.add_argument("--paths", action="store_true",
                    help="also time the engine's two paths apart at every batch: fused (one-pass or tiled "
                         "products with LayerNorm inside) and split (cuBLAS products)")
    args = ap.parse_args()
    from vision_rwkv import RWKV7, RWKV7Config
    from vision_rwkv.lm.engine import StepEngine

    device = torch.device("cuda")
    lm = RWKV7(RWKV7Config(vocab_size=args.vocab, n_layer=args.layers, n_embd=args.embd)).to(device,
                                                                                            torch.bfloat16).eval()
    bw = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, RWKV-7 L{args.layers}-D{args.embd} "
          f"V{args.vocab}, bf16 weights; copy bandwidth {bw / 1e12:.2f} TB/s")
    engine = StepEngine(lm)
    print(f"fused step: {'Triton kernels' if engine.uses_kernels else 'REFERENCE ops (kernels unavailable)'}")
    variants = [("fused step, graph", lambda tok, st: (engine.step(tok, st), st)),
                ("plain step, graph", lm.step_unchecked)]
    if args.paths:
        for label, most in (("fused path, graph", 1 << 30), ("split path, graph", 0)):
            apart = StepEngine(lm)
            apart.fused_max_batch = most
            variants.append((label, lambda tok, st, e=apart: (e.step(tok, st), st)))
    if args.compile:
        variants.append(("compiled step, graph", torch.compile(lm.step_unchecked, dynamic=False)))
    print(f"{'variant':<24}{'batch':>6}{'ms/step':>9}{'tok/s':>11}{'kernels':>9}{'floor %':>9}")
    for name, step in variants:
        for batch in map(int, args.batches.split(",")):
            tokens = torch.zeros(batch, dtype=torch.long, device=device)
            state = lm.init_state(batch)
            kernels = kernels_per_step(step, tokens, state)
            graph = graphed_loop(step, tokens, state, args.steps)
            sec = timed(graph) / args.steps
            floor = step_bytes(lm, batch) / bw
            print(f"{name:<24}{batch:>6}{sec * 1e3:>9.3f}{batch / sec:>11.0f}{kernels:>9}{100 * floor / sec:>8.1f}%")
    if args.profile:
        profile_kernels(lambda tok, st: (engine.step(tok, st), st), lm, device, args.batches)
    if args.check:
        check_greedy(lm, device)


def profile_kernels(step, lm, device, batches: str):
    """GPU time by kernel name over one graphed step (CUPTI sees the kernels inside a graph replay)."""
    from torch.profiler import ProfilerActivity, profile

    for batch in map(int, batches.split(",")):
        tokens = torch.zeros(batch, dtype=torch.long, device=device)
        graph = graphed_loop(step, tokens, lm.init_state(batch), 1)
        graph.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize()
        totals: dict[str, list] = {}
        for e in prof.events():
            if e.device_type.name == "CUDA":
                t = totals.setdefault(e.name[:70], [0, 0.0])
                t[0] += 1
                t[1] += e.device_time
        print(f"batch {batch}: {sum(n for n, _ in totals.values())} kernels, "
              f"{sum(us for _, us in totals.values()):.0f} us of kernel time")
        for name, (n, us) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:12]:
            print(f"  {us:8.1f} us {n:4d}x  {name}")


def randomize(lm, seed: int = 0):
    """Every matrix random (std 1/sqrt(fan_in)) and every vector random: the official init zeroes the
    output projections, so its blocks would add nothing and any step would agree."""
    g = torch.Generator(device=lm.emb.weight.device).manual_seed(seed)
    for name, p in lm.named_parameters():
        noise = torch.randn(p.shape, generator=g, device=p.device)
        if p.dim() == 2 and not name.endswith("r_k"):
            p.copy_(noise * (1.0 if name == "emb.weight" else p.shape[1] ** -0.5))
        elif name.endswith("weight"):  # the norms
            p.copy_(1 + 0.2 * noise)
        else:
            p.copy_(0.5 * noise)
    return lm


def check_greedy(lm, device, batch: int = 64, prompt: int = 8, steps: int = 64):
    """Greedy tokens through rnn_stepper (the fused step in a graph) against eager lm.step, bf16 autocast."""
    from vision_rwkv.lm.graphs import rnn_stepper

    lm = randomize(lm.float()).to(torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(1)
    prompts = torch.randint(0, lm.config.vocab_size, (batch, prompt), device=device, generator=g)
    runs = {}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for name, step in (("fused", rnn_stepper(lm)), ("eager", lm.step)):
            logits, state = lm(prompts, last_only=True)
            tokens, gaps = [], []
            for _ in range(steps):
                top = logits.float().topk(2, dim=-1).values
                gaps.append(top[:, 0] - top[:, 1])
                tok = logits.argmax(-1)
                tokens.append(tok)
                logits, state = step(tok, state)
            runs[name] = torch.stack(tokens, 1), torch.stack(gaps, 1)
    (fused, _), (eager, gap) = runs["fused"], runs["eager"]
    differ = (fused != eager).any(1).nonzero().flatten().tolist()
    print(f"greedy check (random-weight L{lm.config.n_layer}-D{lm.config.n_embd}, bf16 autocast, {batch} rows x "
          f"{steps} tokens): {batch - len(differ)} of {batch} rows identical to eager lm.step")
    for row in differ:
        at = int((fused[row] != eager[row]).nonzero()[0])
        print(f"  row {row}: first differs at token {at}; eager's top-two logit gap there {gap[row, at]:.4f}")


if __name__ == "__main__":
    main()
