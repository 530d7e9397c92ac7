"""WKV-7 forward and forward+backward times, bf16, side by side in one run.

    python bench/wkv7.py [--shapes 8,1024,12 64,64,12 4,4096,32] [--layout 0|1|2|3] [--inner 10]
                         [--no-torch] [--no-fla] [--graph] [--chain 1]

Columns: this project's CUDA kernel, its PyTorch (chunked) path, and fla's chunk_rwkv7 when the
flash-linear-attention package is installed. Also the memory-traffic lower bound of each shape:
every input read once and every output written once (forward: r, w, k, v, a, b in, y out;
backward: the six inputs and dy in, six gradients out), over the device-to-device copy bandwidth
measured in the same run. Times are medians of CUDA-event timings after warm-up, per call, each timing
covering --inner calls back to back (default 10: the host's launch work overlaps the device's, as in a
training step; --inner 1 times a lone call, host overhead included). The PyTorch path is always timed
one call at a time (its device time dwarfs the host's). A forward+backward call includes a whole
autograd backward pass, whose host cost (0.24-0.35 ms on the H100 machines) can exceed the device
time at small shapes; --graph replays the calls from a CUDA graph instead, which times the device only.
--chain K runs K independent calls (as the layers of a model do) before one backward pass over all of
them, and reports the time per call: the backward pass's fixed host cost is shared as in training.
"""

from __future__ import annotations

import argparse
import math
import statistics

import _checkout  # noqa: F401 (this checkout's vision_rwkv before any installed one)
import torch

from vision_rwkv.ops.wkv7 import wkv7_chunked
from vision_rwkv.ops.wkv7.cuda import build, wkv7_cuda


def median_ms(fn, reps=30, warmup=5, inner=1, graph=False):
    """Median over reps of the time per call, each rep timing `inner` calls back to back (so the host's
    launch work overlaps the device's, as in a training step with many layers). graph: the `inner` calls
    are captured once in a CUDA graph and each rep replays it, so no host work is timed at all."""
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (allocations, builds, autotuning) outside the capture
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(inner):
                fn()
        run, calls_per_rep = g.replay, inner
    else:
        def run():
            for _ in range(inner):
                fn()
        calls_per_rep = inner
    for _ in range(2 if graph else warmup):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls_per_rep)
    return statistics.median(times)


def copy_bandwidth():
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # 256 MiB
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), reps=20)
    return 2 * x.numel() / (ms * 1e-3)  # bytes read + written per second


def inputs(B, T, H, N, requires_grad):
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda: torch.randn(B, T, H, N, device="cuda", generator=g)  # noqa: E731
    kk = torch.nn.functional.normalize(rnd(), dim=-1)
    a = torch.rand(B, T, H, N, device="cuda", generator=g)
    xs = [rnd(), 2 * rnd(), 0.5 * rnd(), rnd(), -kk, kk * a]
    return [x.bfloat16().requires_grad_(requires_grad) for x in xs]


def fwd_bwd(fn, xsets, dy):
    """len(xsets) calls on independent inputs, then one autograd backward pass over all of them."""
    def run():
        for xs in xsets:
            for x in xs:
                x.grad = None
        ys = [fn(*xs)[0] for xs in xsets]
        torch.autograd.backward(ys, [dy] * len(ys))
    return run


def fla_fn():
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except Exception:
        return None
    scale = math.exp(-0.5)

    def call(r, w, k, v, a, b):  # fla takes the log-decay; ours takes the raw logit
        return chunk_rwkv7(r, -scale * torch.sigmoid(w.float()).to(w.dtype), k, v, a, b, scale=1.0,
                           output_final_state=True)
    return call


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["8,1024,12", "64,64,12", "4,4096,32"], help="B,T,H (N=64)")
    ap.add_argument("--layout", type=int, default=None, help="kernel thread layout (default: automatic)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch path (slow at long T)")
    ap.add_argument("--no-fla", action="store_true", help="skip fla's chunk_rwkv7 even when it is installed")
    ap.add_argument("--graph", action="store_true",
                    help="replay the --inner calls from a CUDA graph: device time only, no host overhead")
    ap.add_argument("--chain", type=int, default=1,
                    help="fwd+bwd: this many calls per autograd backward pass, time per call (not the PyTorch path)")
    ap.add_argument("--inner", type=int, default=10,
                    help="calls back to back per timed repetition (1: each call timed alone, host launch included)")
    args = ap.parse_args()
    reason = build()
    if reason:
        raise SystemExit(f"kernel unavailable: {reason}")
    bw = copy_bandwidth()
    fla = None if args.no_fla else fla_fn()
    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s, bf16, N=64, "
          f"layout {'auto' if args.layout is None else args.layout}, {args.inner} calls per timing"
          f"{f', {args.chain} calls per backward pass' if args.chain > 1 else ''}"
          f"{', replayed from a CUDA graph' if args.graph else ''}")
    print(f"{'B,T,H':<12}{'pass':<9}{'ours ms':>9}{'torch ms':>10}{'fla ms':>9}{'bound ms':>10}"
          f"{'vs torch':>10}{'vs fla':>8}")
    N = 64
    for spec in args.shapes:
        B, T, H = map(int, spec.split(","))
        elems = B * T * H * N
        bounds = {"fwd": 7 * 2 * elems / bw * 1e3, "fwd+bwd": 20 * 2 * elems / bw * 1e3}
        ours = lambda *x: wkv7_cuda(*x, layout=args.layout)  # noqa: E731
        impls = {"ours": ours, "torch": None if args.no_torch else wkv7_chunked, "fla": fla}
        for pass_name in ("fwd", "fwd+bwd"):
            row = {}
            for key, fn in impls.items():
                inner = 1 if key == "torch" else args.inner
                if fn is None:
                    row[key] = float("nan")
                    continue
                try:
                    if pass_name == "fwd":
                        xs = inputs(B, T, H, N, False)
                        with torch.no_grad():
                            row[key] = median_ms(lambda fn=fn, xs=xs: fn(*xs), inner=inner, graph=args.graph)
                    else:
                        chain = 1 if key == "torch" else max(1, args.chain)
                        xsets = [inputs(B, T, H, N, True) for _ in range(chain)]
                        dy = torch.randn(B, T, H, N, device="cuda", dtype=torch.bfloat16)
                        row[key] = median_ms(fwd_bwd(fn, xsets, dy), inner=max(1, inner // chain),
                                             graph=args.graph) / chain
                except RuntimeError as e:  # e.g. an implementation that cannot be captured in a graph
                    if not args.graph:
                        raise
                    print(f"  ({key} {pass_name}: no graph timing: {str(e).splitlines()[0]})")
                    row[key] = float("nan")
                torch.cuda.empty_cache()
            ratio = {k: f"{row[k] / row['ours']:.2f}x" if not math.isnan(row[k]) else "-" for k in ("torch", "fla")}
            print(f"{spec:<12}{pass_name:<9}{row['ours']:9.3f}{row['torch']:10.3f}{row['fla']:9.3f}"
                  f"{bounds[pass_name]:10.3f}{ratio['torch']:>10}{ratio['fla']:>8}")


if __name__ == "__main__":
    main()
