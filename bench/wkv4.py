"""WKV-4 forward and forward+backward times: our CUDA kernel against RWKV-LM's, side by side in one run.

    python bench/wkv4.py --baseline-dir third_party_wkv4/ [--shapes 8,1024,768 64,64,768] [--inner 20]

The baseline is RWKV-LM's RWKV-4 kernel (github.com/BlinkDL/RWKV-LM): fp32 from RWKV-v4/cuda/wkv_cuda.cu
and wkv_op.cpp, bf16 from RWKV-v4neo/cuda/wkv_cuda_bf16.cu and wkv_op_bf16.cpp. Its sources are not part
of this project: put them under --baseline-dir with those paths (the folder is git-ignored). They are
built as RWKV-LM builds them (its flags: --use_fast_math, --maxrregcount 60, -O3, Tmax = the longest T
here), called through pybind as RWKV-LM calls them; the bench only drops their TORCH_LIBRARY blocks, which
both define under one name and so cannot load together.

Both sides are timed the same way, on the raw ops (no autograd): "fwd" is one inference forward (ours
without checkpoints); "fwd+bwd" is a training forward plus the backward, with each side's own extras
(ours: checkpoints, the sums of dw and du over the batch; RWKV-LM: its zero-fill and sums of the per-row
dw and du, as its model.py does). Times are device times: each rep first queues a spin kernel long
enough to cover the host's launch work, then `--inner` calls behind it, between two CUDA events, so the
calls run back to back and no launch overhead is timed (CUDA graphs cannot capture RWKV-LM's launches,
which go to the legacy default stream). Median over --reps reps after warm-up. The outputs and gradients
of both are compared first (relative error over each tensor); RWKV-LM's dw is the gradient with respect
to time_decay (dw * w) and its state starts fresh, so ours is run from a fresh state.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
from pathlib import Path

import _checkout  # noqa: F401 (this checkout's vision_rwkv before any installed one)
import torch

from vision_rwkv.ops.wkv4.cuda import build

BASELINES = {
    torch.float32: ("RWKV-v4/cuda/wkv_op.cpp", "RWKV-v4/cuda/wkv_cuda.cu"),
    torch.bfloat16: ("RWKV-v4neo/cuda/wkv_op_bf16.cpp", "RWKV-v4neo/cuda/wkv_cuda_bf16.cu"),
}


def load_baseline(root: Path, dtype, t_max: int):
    """RWKV-LM's extension for this dtype, or None when its sources are absent."""
    from torch.utils.cpp_extension import load

    files = [root / f for f in BASELINES[dtype]]
    if not all(f.is_file() for f in files):
        return None
    work = Path(tempfile.mkdtemp(prefix="wkv4_baseline_"))
    sources = []
    for f in files:
        text = f.read_text()
        text = re.sub(r"TORCH_LIBRARY\(wkv, m\) \{.*?\n\}", "", text, flags=re.S)
        (work / f.name).write_text(text)
        sources.append(str(work / f.name))
    flags = ["-res-usage", "--maxrregcount 60", "--use_fast_math", "-O3", "-Xptxas -O3",
             "--extra-device-vectorization", f"-DTmax={t_max}"]
    if dtype == torch.bfloat16:
        flags += ["-t 4", "-std=c++17"]
    tag = "bf16" if dtype == torch.bfloat16 else "fp32"
    return load(name=f"rwkvlm_wkv4_{tag}_{t_max}", sources=sources, build_directory=str(work),
                extra_cuda_cflags=flags, verbose=False)


def device_ms(fn, inner: int, reps: int, warmup: int = 3) -> float:
    """Median device time per call (see the module docstring)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    spin = 2_000_000 * inner  # ~1 ms of spinning per call at ~2 GHz: more than the host needs to queue one
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(spin)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


class Ours:
    def __init__(self, w, u, k, v):
        self.w, self.u, self.k, self.v = w, u, k, v
        self.op = torch.ops.vision_rwkv

    def forward(self, save=False):
        return self.op.wkv4_forward(self.w, self.u, self.k, self.v, None, None, None, save)

    def fwd_bwd(self, gy):
        y, numT, denT, _, ckpt = self.forward(save=True)
        gw, gu, gk, gv, *_ = self.op.wkv4_backward(self.w, self.u, self.k, self.v, None, None, numT, denT, ckpt,
                                                   gy, None, None, None, False)
        return y, gw, gu, gk, gv


class RwkvLM:
    """RWKV-LM's calls, as its model.py makes them (w already -exp(time_decay), fp32 for both kernels)."""

    def __init__(self, ext, w, u, k, v):
        self.ext, self.w, self.k, self.v = ext, w, k, v
        self.u = u.to(k.dtype)  # the bf16 kernel takes u in bf16 (an input rounding ours does not have)
        self.bf16 = k.dtype == torch.bfloat16
        self.B, self.T, self.C = k.shape

    def forward(self):
        y = torch.empty_like(self.k)
        self.ext.forward(self.B, self.T, self.C, self.w, self.u, self.k, self.v, y)
        return y

    def fwd_bwd(self, gy):
        B, T, C = self.B, self.T, self.C
        y = self.forward()
        make = torch.empty if self.bf16 else torch.zeros  # fp32's kernel adds into dw, du
        gw = make(B, C, device=y.device, dtype=y.dtype)
        gu = make(B, C, device=y.device, dtype=y.dtype)
        gk, gv = torch.empty_like(self.k), torch.empty_like(self.k)
        if self.bf16:
            self.ext.backward(B, T, C, self.w, self.u, self.k, self.v, y, gy, gw, gu, gk, gv)
        else:
            self.ext.backward(B, T, C, self.w, self.u, self.k, self.v, gy, gw, gu, gk, gv)
        return y, gw.sum(0), gu.sum(0), gk, gv


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-dir", type=Path, required=True, help="holds RWKV-LM's RWKV-v4*/cuda/ files")
    ap.add_argument("--shapes", nargs="+", default=["8,1024,768", "64,64,768"], help="B,T,C ...")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--inner", type=int, default=20, help="calls per timed rep")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    reason = build()
    if reason is not None:
        raise SystemExit(f"bench/wkv4.py: our kernel does not build: {reason}")
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
    t_max = max(T for _, T, _ in shapes)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}")
    print(f"device time per call, median of {args.reps} reps of {args.inner} calls queued behind a spin kernel")
    rows = []
    for name in args.dtypes:
        dtype = dtypes[name]
        ext = load_baseline(args.baseline_dir, dtype, t_max)
        if ext is None:
            print(f"({name}: no RWKV-LM sources under {args.baseline_dir}; skipped)")
            continue
        for B, T, C in shapes:
            g = torch.Generator(device="cuda").manual_seed(0)
            w = -torch.exp(torch.randn(C, device="cuda", generator=g))
            u = torch.randn(C, device="cuda", generator=g) * 0.5
            k = (torch.randn(B, T, C, device="cuda", generator=g) * 2).to(dtype)
            v = torch.randn(B, T, C, device="cuda", generator=g).to(dtype)
            gy = torch.randn(B, T, C, device="cuda", generator=g).to(dtype)
            ours, base = Ours(w, u.to(dtype).float(), k, v), RwkvLM(ext, w, u, k, v)
            o, b = ours.fwd_bwd(gy), base.fwd_bwd(gy)
            errors = {n: rel(x, r) for n, x, r in zip(["y", "dw", "du", "dk", "dv"], (o[0], o[1] * w, *o[2:]), b)}
            t = {
                "fwd": tuple(device_ms(f, args.inner, args.reps) for f in (ours.forward, base.forward)),
                "fwd+bwd": tuple(device_ms(lambda f=f, gy=gy: f(gy), args.inner, args.reps)
                                 for f in (ours.fwd_bwd, base.fwd_bwd)),
            }
            rows.append((name, (B, T, C), t, errors))
            print(f"{name} B={B} T={T} C={C}: " + "  ".join(
                f"{p} ours {a:.4f} ms / RWKV-LM {r:.4f} ms = {r / a:.2f}x" for p, (a, r) in t.items()))
            print("    ours vs RWKV-LM (relative): " + "  ".join(f"{n} {e:.1e}" for n, e in errors.items()))
    print()
    print("| dtype | B, T, C | fwd ours (ms) | fwd RWKV-LM (ms) | speed-up | fwd+bwd ours (ms) | fwd+bwd RWKV-LM (ms) "
          "| speed-up | max rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, shape, t, errors in rows:
        (fa, fr), (ba, br) = t["fwd"], t["fwd+bwd"]
        print(f"| {name} | {', '.join(map(str, shape))} | {fa:.4f} | {fr:.4f} | {fr / fa:.2f}x | {ba:.4f} | {br:.4f} "
              f"| {br / ba:.2f}x | {max(errors.values()):.1e} |")


if __name__ == "__main__":
    main()
