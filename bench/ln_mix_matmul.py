"""The RNN step's product kernels (ops/rwkv7) against cuBLAS's product alone, block sizes swept.

    python bench/ln_mix_matmul.py [--only ln_mix_matmul|linear|wkv]

For the RNN step's shapes at L12-D768: ln_mix_matmul_ (LayerNorm + mixes + product) for the time-mix
input (3C + 4R outputs), the channel-mix key (4C) and the head (65,536); linear_ (one-pass products) for
the output projection (C x C), the channel-mix value (C x 4C) and the four grouped second low-rank
products (4C x R). At batch 1 to GEMV_MAX_ROWS the one-pass kernels run (their block of output columns
and warps swept), above it the tiled kernel (block_n, block_k, warps swept). Each timing: microseconds
per call, 50 calls captured in one CUDA graph and replayed (as the step runs; timing calls launched from
Python measures the launches instead), beside F.linear on an already mixed input in the same kind of
graph (which leaves out the LayerNorm and mix the fused kernel also does). Last, the WKV step's warps.
"""

from functools import partial

import _checkout  # noqa: F401 (this checkout's vision_rwkv before any installed one)
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


def best(candidates):
    rows = []
    for label, fn in candidates:
        try:
            rows.append((timed(fn), label))
        except Exception:  # a block too big for registers or shared memory at this shape
            continue
    rows.sort()
    return ", ".join(f"{us:.1f} us ({label})" for us, label in rows[:3])


def sweep_ln_mix_matmul(dev, C, R):
    for name, n_out in (("time-mix in", 3 * C + 4 * R), ("key", 4 * C), ("head", 65536)):
        w = torch.randn(n_out, C, device=dev, dtype=torch.bfloat16) / 30
        for B in (1, 2, 4, 16, 64):
            x, dx, shift = (torch.randn(B, C, device=dev) for _ in range(3))
            x_out, xl_out = torch.empty_like(x), torch.empty_like(x)
            lnw, lnb, mix = torch.ones(C, device=dev), torch.zeros(C, device=dev), torch.rand(6, C, device=dev)
            out = torch.empty(B, n_out, device=dev, dtype=torch.bfloat16)
            base = timed(partial(F.linear, x.bfloat16(), w))
            seg = torch.zeros(-(-n_out // 64), dtype=torch.int32, device=dev)
            call = partial(triton_step.ln_mix_matmul_, x, dx, x_out, xl_out, lnw, lnb, shift, mix, w, seg, out, 64)
            if B <= triton_step.GEMV_MAX_ROWS:
                cands = [(f"one-pass n{bn} w{nw}", partial(call, gemv_block_n=bn, num_warps=nw))
                         for bn in (2, 4, 8, 16) for nw in (1, 2, 4)]
            else:
                cands = []
                for bn in (32, 64):
                    seg_bn = torch.zeros(-(-n_out // bn), dtype=torch.int32, device=dev)
                    cands += [(f"tiled n{bn} k{bk} w{nw}",
                               partial(triton_step.ln_mix_matmul_, x, dx, x_out, xl_out, lnw, lnb, shift, mix, w,
                                       seg_bn, out, bn, block_k=bk, num_warps=nw))
                              for bk in (64, 128) for nw in (4, 8)]
            print(f"ln_mix_matmul {name:<12} B{B:<3} F.linear {base:6.1f} us | best: {best(cands)}", flush=True)


def sweep_linear(dev, C, R):
    for name, K, N, groups in (("output", C, C, 1), ("value", 4 * C, C, 1), ("low-rank 2", R, 4 * C, 4)):
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) / 30
        for B in (1, 2, 4):
            x = torch.randn(B, groups * K, device=dev, dtype=torch.bfloat16)
            out = torch.empty(B, N, device=dev, dtype=torch.bfloat16)
            if groups == 1:
                base = timed(partial(F.linear, x, w))
            else:  # cuBLAS's best single call: the same product as one block-diagonal matrix
                diag = torch.block_diag(*w.view(groups, N // groups, K))
                base = timed(partial(F.linear, x, diag))
            cands = [(f"n{bn} w{nw}", partial(triton_step.linear_, x, w, out, groups, block_n=bn, num_warps=nw))
                     for bn in (1, 2, 4, 8) for nw in (1, 2, 4)]
            print(f"linear {name:<12} B{B:<3} F.linear {base:6.1f} us | best: {best(cands)}", flush=True)


def sweep_wkv(dev, C, N=64):
    H = C // N
    for B in (1, 64, 256):
        state = torch.randn(B, H, N, N, device=dev)
        rkv = torch.randn(3, B, C, device=dev, dtype=torch.bfloat16)
        lora = torch.randn(4, B, C, device=dev, dtype=torch.bfloat16)
        vec, v_first = torch.randn(8, C, device=dev), torch.randn(B, C, device=dev)
        out = torch.empty(B, C, device=dev, dtype=torch.bfloat16)
        cands = [(f"w{nw}", partial(triton_step.wkv_step_, state, rkv, lora, vec, v_first, False, out, num_warps=nw))
                 for nw in (1, 2, 4, 8, 16)]
        print(f"wkv_step B{B:<3} ({2 * state.numel() * 4 / 1e6:.1f} MB of state read and written) | "
              f"best: {best(cands)}", flush=True)


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("ln_mix_matmul", "linear", "wkv"),
                    help="one sweep (each compiles a kernel per block, warps and batch: all three take minutes)")
    args = ap.parse_args()
    dev, C, R = "cuda", 768, 128
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}")
    sweeps = {"ln_mix_matmul": sweep_ln_mix_matmul, "linear": sweep_linear, "wkv": lambda d, c, r: sweep_wkv(d, c)}
    for name, sweep in sweeps.items():
        if args.only in (None, name):
            sweep(dev, C, R)


if __name__ == "__main__":
    main()
