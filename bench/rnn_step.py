"""The RNN step on CUDA: ms per step, tokens/s, kernels per step, and the share of the bandwidth floor.

    python bench/rnn_step.py [--layers 12 --embd 768 --vocab 65536 --batches 1,64,256 --compile]

Each row times a greedy argmax loop of `--steps` steps (bf16 weights, fp32 state) replayed from a CUDA
graph, as decoding runs it: the eager step (what `rnn_stepper` captures today) and, with --compile, the
same step compiled by torch.compile (inductor, default mode, no inductor cudagraphs) and captured in the
same kind of graph. Kernels per step come from torch.profiler over one eager (or compiled) step. The floor
is the bytes one step must read (every block weight, the head, the state in and out) over the
device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import time

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
    args = ap.parse_args()
    from vision_rwkv import RWKV7, RWKV7Config

    device = torch.device("cuda")
    lm = RWKV7(RWKV7Config(vocab_size=args.vocab, n_layer=args.layers, n_embd=args.embd)).to(device,
                                                                                            torch.bfloat16).eval()
    bw = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, RWKV-7 L{args.layers}-D{args.embd} "
          f"V{args.vocab}, bf16 weights; copy bandwidth {bw / 1e12:.2f} TB/s")
    variants = [("eager step, graph", lm.step_unchecked)]
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


if __name__ == "__main__":
    main()
