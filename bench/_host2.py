import time, torch, sys, cProfile, pstats
sys.path.insert(0, "bench")
from wkv7 import inputs, fwd_bwd
from vision_rwkv.ops.wkv7.cuda import wkv7_cuda
def per_call(fn, n=200):
    for _ in range(20): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n * 1e6
xs = inputs(1, 16, 1, 64, True); dy = torch.randn(1, 16, 1, 64, device="cuda", dtype=torch.bfloat16)
xn = inputs(1, 16, 1, 64, False)
run = fwd_bwd(lambda *x: wkv7_cuda(*x, layout=3), xs, dy)
def fwd():
    with torch.no_grad(): wkv7_cuda(*xn, layout=3)
def raw_fwd():
    torch.ops.vision_rwkv.wkv7_forward(*xn, None, False, 3)
print(f"tiny fwd+bwd {per_call(run):.1f} us/call; fwd no-grad {per_call(fwd):.1f}; raw op fwd {per_call(raw_fwd):.1f}")
y = torch.empty(1, device="cuda")
print(f"empty torch op (add_) {per_call(lambda: y.add_(1)):.1f} us")
pr = cProfile.Profile(); pr.enable()
for _ in range(300): run()
torch.cuda.synchronize(); pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(12)
