"""The fused LayerNorm + mix + product kernel (ops/rwkv7 ln_mix_matmul_) against cuBLAS's product alone.

    python bench/ln_mix_matmul.py

For the RNN step's three shapes at L12-D768 (the time-mix input: 3C + 4R outputs; the channel-mix key:
4C; the head: 65,536), at batch 1, 16 and 64, each (block_n, block_k, warps) tried: microseconds per
call, 50 calls captured in one CUDA graph and replayed (as the step runs; timing calls launched from
Python measures the launches instead), beside F.linear on an already mixed input, in the same kind of
graph (which leaves out the LayerNorm and mix the kernel also does).
"""

from functools import partial

import torch
import torch.nn.functional as F

from vision_rwkv.ops.rwkv7 import triton_step


def timed(fn, calls=50, replays=20):
    """Microseconds per call of fn, from replays of a CUDA graph of `calls` calls (median replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        for _ in range(calls):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def main():
    dev, C = "cuda", 768
    print(torch.cuda.get_device_name())
    for name, n_out in (("time-mix in", 3 * C + 512), ("key", 4 * C), ("head", 65536)):
        w = torch.randn(n_out, C, device=dev, dtype=torch.bfloat16) / 30
        for B in (1, 16, 64):
            x, dx, shift = (torch.randn(B, C, device=dev) for _ in range(3))
            x_out, xl_out = torch.empty_like(x), torch.empty_like(x)
            lnw, lnb, mix = torch.ones(C, device=dev), torch.zeros(C, device=dev), torch.rand(6, C, device=dev)
            out = torch.empty(B, n_out, device=dev, dtype=torch.bfloat16)
            a = x.bfloat16()
            base = timed(partial(F.linear, a, w))
            rows = []
            for bn in (16, 32, 64):
                seg = torch.zeros(-(-n_out // bn), dtype=torch.int32, device=dev)
                for bk in (64, 128, 256):
                    for nw in (2, 4, 8):
                        try:
                            us = timed(partial(triton_step.ln_mix_matmul_, x, dx, x_out, xl_out, lnw, lnb, shift,
                                               mix, w, seg, out, bn, block_k=bk, num_warps=nw))
                        except Exception:  # a block too big for shared memory at this batch
                            continue
                        rows.append((us, bn, bk, nw))
            rows.sort()
            best = ", ".join(f"{us:.1f} us (n{bn} k{bk} w{nw})" for us, bn, bk, nw in rows[:3])
            print(f"{name:<12} B{B:<3} F.linear {base:6.1f} us | fused best: {best}")


if __name__ == "__main__":
    main()
