"""The WKV-7 recurrence on the CPU, forward only, fp32, side by side in one run.

    python bench/wkv7_cpu.py [--shapes 1,256,12 8,32,12 1,1024,12] [--threads N]

Columns (ms per call, the best of --repeats after two warm-ups): the C++ kernel (impl "cpu",
kernels/rwkv7_cpu.cpp, the default for fp32 CPU inputs without gradients), the chunked PyTorch form
(impl "chunked", the default before it, and still the path when gradients are needed) and the per-step
reference. Shapes are B,T,H with head size 64; inputs are random, with a random initial state. The last
column is the kernel's largest error against the fp64 reference, relative to the largest output.
"""

from __future__ import annotations

import argparse

import _checkout  # noqa: F401 (this checkout's vision_rwkv before any installed one)
import torch
from decoder_cpu import timed

from vision_rwkv.ops import _build
from vision_rwkv.ops.wkv7 import wkv7


def best_ms(fn, repeats):
    return timed(fn, repeats) * 1e3  # two warm-up runs, then the best of `repeats`


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["1,256,12", "8,32,12", "1,1024,12"], help="B,T,H (N=64)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    failed = _build.cpu_kernels()
    if failed:
        raise SystemExit(f"wkv7_cpu.py: the CPU kernel cannot run: {failed}")
    print(f"WKV-7 forward, fp32, CPU, {args.threads} threads, torch {torch.__version__}; ms per call")
    print(f"{'B,T,H':<12}{'cpu kernel':>12}{'chunked':>10}{'reference':>11}{'chunked/cpu':>13}{'cpu error':>11}")
    for shape in args.shapes:
        B, T, H = map(int, shape.split(","))
        g = torch.Generator().manual_seed(0)
        r, w, k, v = (torch.randn(B, T, H, 64, generator=g) for _ in range(4))
        kk = torch.nn.functional.normalize(torch.randn(B, T, H, 64, generator=g), dim=-1)
        xs = (r, w, k, v, -kk, kk * torch.rand(B, T, H, 64, generator=g))
        s0 = torch.randn(B, H, 64, 64, generator=g) * 0.1
        times = {impl: best_ms(lambda impl=impl, xs=xs, s0=s0: wkv7(*xs, state=s0, impl=impl), args.repeats)
                 for impl in ("cpu", "chunked", "reference")}
        truth, _ = wkv7(*(x.double() for x in xs), state=s0.double(), impl="reference")
        y, _ = wkv7(*xs, state=s0, impl="cpu")
        err = float((y.double() - truth).abs().max() / truth.abs().max())
        print(f"{shape:<12}{times['cpu']:12.2f}{times['chunked']:10.2f}{times['reference']:11.2f}"
              f"{times['chunked'] / times['cpu']:13.2f}{err:11.1e}")


if __name__ == "__main__":
    main()
