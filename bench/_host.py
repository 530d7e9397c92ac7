import time, torch, sys
sys.path.insert(0, "bench")
from wkv7 import inputs, fwd_bwd, median_ms
from vision_rwkv.ops.wkv7.cuda import wkv7_cuda
from torch.profiler import profile, ProfilerActivity
for spec in ["64,64,12", "8,1024,12"]:
    B, T, H = map(int, spec.split(","))
    xs = inputs(B, T, H, 64, True)
    dy = torch.randn(B, T, H, 64, device="cuda", dtype=torch.bfloat16)
    run = fwd_bwd(lambda *x: wkv7_cuda(*x, layout=3), xs, dy)
    ms = median_ms(run, inner=10)
    torch.cuda.synchronize()
    # host time per call when the device is not the limit: 100 calls, no sync inside
    t = time.perf_counter()
    for _ in range(100):
        run()
    host = (time.perf_counter() - t) / 100 * 1e3
    torch.cuda.synchronize()
    tot = (time.perf_counter() - t) / 100 * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            run()
        torch.cuda.synchronize()
    dev = {}
    for e in prof.key_averages():
        if e.device_time_total > 0:
            dev[e.key] = e.device_time_total / 10 / 1e3
    print(f"{spec}: bench {ms:.3f} ms; host enqueue {host:.3f} ms/call; wall {tot:.3f} ms/call; device per call:",
          {k[:40]: round(v, 4) for k, v in sorted(dev.items(), key=lambda kv: -kv[1])[:6]})
