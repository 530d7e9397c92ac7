"""The server's running decode on its own, with no HTTP and no other thread: what a join and a step cost the
worker thread (issue 21).

    python bench/serve_worker.py [--rows 1,32,128] [--joins 1,16,64] [--steps 20] [--profile]
    python bench/serve_worker.py --device cpu --model demo --rows 1,4 --joins 1,4   # smoke run

The model is bench/caption_throughput.py's (ViT-B-16, mlp projector, RWKV-7 L12-D768 V65536, random weights;
bf16 weights under autocast on CUDA), or the shipped demo model with --model demo. It is warmed up as the
server warms it up (serve.continuous.warm_up: every graph captured first). Then, per --rows R:

  join       RunningBatch.admit of R images as one join: encode, prefill, rows placed (median of --repeats)
  step       one RunningBatch.step with R rows decoding, plain greedy: the choice of every row's token, the
             one host read, the rows' bookkeeping and the stepper's graph (median over --steps steps, or
             over those taken before every row ended: the demo model's captions can be shorter)
  bare       the stepper alone at the same capacity, on the same state: the step's floor

and, per --joins N, the join of N images with R = 0 rows decoding. Each figure is wall time on the host
(torch.cuda.synchronize after each call on CUDA). The gap between `step` and `bare` is the worker's own
host work a step; bench/serve_load.py shows what the HTTP side's threads add to it. --profile prints
cProfile's top functions (by own time) over the steps at the largest R, and over the overlapped launches.

On CUDA, per --rows R and --overlap N, a join overlapped as the server runs it (ServeConfig.overlap_joins):
R rows decode on the worker's stream while a join of N images runs on its own; the worker steps until the
join is done, as the scheduler does. It prints the host time the first launch took (it pays one-time
costs), then, as medians over --repeats more joins: the host time a launch took, the join's wall time from
launch to done (seen after each step, so to a step's precision), the steps taken meanwhile and their mean
time (each step's wall time, its stream synchronised, not the device): beside `join ms` and `step ms`
above, how much each slows the other; and the host time place_next() took to write the join's rows into
their slots (`place ms`; the server counts it as placing). --profile covers the launches after the first, and
their placing.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import _checkout  # noqa: F401 (this checkout's vision_rwkv before any installed one)
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from vision_rwkv import Captioner, SamplingConfig  # noqa: E402
from vision_rwkv.lm.graphs import rnn_stepper  # noqa: E402
from vision_rwkv.serve.continuous import RunningBatch, join_chunk, pads_joins, warm_up, worker_stream  # noqa: E402
from vision_rwkv.serve.scheduler import _Job  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", choices=["throughput", "demo"], default="throughput")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", default="1,32,128", help="comma-separated rows decoding")
    p.add_argument("--joins", default="1,16,64", help="comma-separated images joining an empty batch")
    p.add_argument("--steps", type=int, default=20, help="steps timed per --rows")
    p.add_argument("--repeats", type=int, default=5, help="joins timed per size (overlapped: after a first one)")
    p.add_argument("--overlap", default="16,64",
                   help="CUDA: comma-separated images in a join overlapped with each --rows' decode (empty: none)")
    p.add_argument("--profile", action="store_true",
                   help="cProfile the steps at the largest --rows, and each overlapped join's launch")
    p.add_argument("--no-pipeline", dest="pipelined", action="store_false", default=None,
                   help="read each step's tokens back before launching the next step (the server's way before "
                        "pipelined steps; default: RunningBatch's, pipelined on CUDA)")
    p.add_argument("--join-chunk", type=int, default=None,
                   help="an experiment: raise the encoder's and the prefill's graph limits (lm.graphs) so that "
                        "joins run in graphs of this many images (default: the library's limits)")
    args = p.parse_args(argv)
    args.row_list = [int(x) for x in args.rows.split(",") if x.strip()]
    args.join_list = [int(x) for x in args.joins.split(",") if x.strip()]
    args.overlap_list = [int(x) for x in args.overlap.split(",") if x.strip()]
    if not args.row_list or min(args.row_list + args.join_list + args.overlap_list) < 1 or args.steps < 1 \
            or args.repeats < 1:
        p.error("--rows, --joins and --overlap take positive counts (at least one row count); --steps and "
                "--repeats >= 1")
    return args


def load(args) -> Captioner:
    device = torch.device(args.device)
    if args.model == "demo":
        return Captioner.load(device=device)
    from caption_throughput import build_model

    model = build_model(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(torch.bfloat16)
    return Captioner(model, device, autocast=cuda)


def timed(fn, device) -> float:
    """fn()'s wall time in ms, the GPU's work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.join_chunk:
        from vision_rwkv.lm import graphs
        from vision_rwkv.serve import continuous

        graphs.MAX_ENCODER_GRAPH_BATCH = continuous.MAX_ENCODER_GRAPH_BATCH = args.join_chunk
        graphs.MAX_PREFILL_TOKENS = continuous.MAX_PREFILL_TOKENS = args.join_chunk * 256
    captioner = load(args)
    device = captioner.device
    size = captioner.model.encoder.image_size
    # uint8 pixels where the encoder's preprocess normalises on the device, as the server sends them
    uint8 = getattr(captioner.model.encoder.preprocess, "normalize", None) is not None
    pixels = torch.zeros(1, 3, *size, dtype=torch.uint8 if uint8 else torch.float32)
    # plain greedy, the server's default; the throughput model's random weights rarely emit the stop token,
    # so its rows live through every timed step (the demo model's may end early: a smoke run only)
    greedy = SamplingConfig(max_new_tokens=args.steps + 2)
    biggest = max(max(args.row_list) + max(args.overlap_list, default=0), *args.join_list)  # rows at once
    warm_up(captioner, biggest)
    chunk = join_chunk(captioner) if pads_joins(captioner) else None
    print(f"serve worker: {describe(captioner)}; joins padded in chunks of {chunk or 'none (not padded)'}")

    def job(n, cfg):
        return _Job(pixels.expand(n, -1, -1, -1).contiguous(), cfg)

    rows_out = []
    print(f"{'rows':>5} {'join ms':>8} {'step ms':>8} {'bare ms':>8} {'host ms/step':>12}")
    for r in args.row_list:
        batch = RunningBatch(captioner, pipelined=args.pipelined)
        join_ms = timed(lambda: batch.admit([job(r, greedy)]), device)  # noqa: B023 (called at once)
        steps = []
        profiler = cProfile.Profile() if args.profile and r == max(args.row_list) else None
        for _ in range(args.steps):
            if not batch:  # every row ended (the demo model's captions can be shorter than --steps)
                break
            if profiler:
                profiler.enable()
            steps.append(timed(batch.step, device))
            if profiler:
                profiler.disable()
        step_ms = statistics.median(steps) if steps else float("nan")
        if batch.capacity == 0:  # no row left to time the bare stepper on
            rows_out.append({"rows": r, "join_ms": join_ms, "step_ms": step_ms, "steps": len(steps)})
            print(f"{r:>5} {join_ms:>8.2f} {step_ms:>8.3f} {'':>8} {'':>12}  (every row ended after "
                  f"{len(steps)} steps)")
            continue
        tokens = torch.zeros(batch.capacity, dtype=torch.long, device=device)
        with torch.no_grad(), batch._context():  # as RunningBatch steps: no autograd, so the graphed stepper
            stepper = rnn_stepper(captioner.model.decoder)
            bare_ms = statistics.median(timed(lambda: stepper(tokens, batch.state), device)  # noqa: B023
                                        for _ in range(args.steps))
        rows_out.append({"rows": r, "capacity": batch.capacity, "join_ms": join_ms, "step_ms": step_ms,
                         "bare_ms": bare_ms})
        print(f"{r:>5} {join_ms:>8.2f} {step_ms:>8.3f} {bare_ms:>8.3f} {step_ms - bare_ms:>12.3f}")
        if profiler:
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
            print(out.getvalue())
    print(f"{'images':>6} {'join ms':>8} {'ms/image':>9}")
    for n in args.join_list:
        ms = statistics.median(timed(lambda: RunningBatch(captioner).admit([job(n, greedy)]), device)  # noqa: B023
                               for _ in range(args.repeats))
        rows_out.append({"join_images": n, "join_ms": ms})
        print(f"{n:>6} {ms:>8.2f} {ms / n:>9.3f}")
    if device.type == "cuda" and args.overlap_list:
        rows_out += overlapped(captioner, args, job)
    return rows_out


def overlapped(captioner, args, job) -> list[dict]:
    """Joins on their own stream beside a decode of R rows (see the module's docstring)."""
    device, out = captioner.device, []
    endless = SamplingConfig(max_new_tokens=10_000)  # the decoding rows outlive the measurement
    print("a join on its own stream while R rows decode (the server's overlap_joins):")
    print(f"{'rows':>5} {'images':>6} {'first launch':>12} {'launch ms':>9} {'join ms':>8} {'steps beside':>12} "
          f"{'step ms beside':>14} {'place ms':>8}")
    with worker_stream(device):
        worker = torch.cuda.current_stream(device)
        for r in args.row_list:
            for n in args.overlap_list:
                batch = RunningBatch(captioner, overlap=True, pipelined=args.pipelined)
                batch.admit([job(r, endless)])
                batch.step()
                # the first launch at a size pays one-time costs (pinned and device memory for its buffers);
                # the others show what each join costs the server once it runs: medians over --repeats
                profiler = cProfile.Profile() if args.profile else None
                runs = []
                for rep in range(1 + args.repeats):
                    steps = []
                    torch.cuda.synchronize(device)
                    profiling = profiler is not None and rep > 0
                    start = time.perf_counter()
                    if profiling:
                        profiler.enable()
                    batch.launch([job(n, SamplingConfig())])
                    if profiling:
                        profiler.disable()
                    launched = time.perf_counter()
                    while not batch.join_ready():
                        begin = time.perf_counter()
                        batch.step()
                        worker.synchronize()
                        steps.append((time.perf_counter() - begin) * 1000)
                    done = time.perf_counter()
                    if profiling:
                        profiler.enable()
                    batch.place_next()
                    placed = time.perf_counter()  # the host's time placing the rows (no device wait)
                    if profiling:
                        profiler.disable()
                    torch.cuda.synchronize(device)
                    runs.append(((launched - start) * 1000, (done - start) * 1000, len(steps),
                                 statistics.mean(steps) if steps else float("nan"), (placed - done) * 1000))
                first, later = runs[0], runs[1:]
                row = {"rows": r, "overlap_images": n, "first_launch_ms": first[0],
                       "launch_ms": statistics.median(x[0] for x in later),
                       "join_ms": statistics.median(x[1] for x in later),
                       "steps_beside": statistics.median(x[2] for x in later),
                       "step_ms_beside": statistics.median(x[3] for x in later),
                       "place_ms": statistics.median(x[4] for x in later)}
                out.append(row)
                print(f"{r:>5} {n:>6} {row['first_launch_ms']:>12.2f} {row['launch_ms']:>9.2f} {row['join_ms']:>8.2f} "
                      f"{row['steps_beside']:>12} {row['step_ms_beside']:>14.3f} {row['place_ms']:>8.3f}")
                if profiler:
                    text = io.StringIO()
                    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
                    print(f"the {args.repeats} launches after the first, and their placing:\n{text.getvalue()}")
    return out


def describe(captioner) -> str:
    dev = captioner.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    c = captioner.model.config.decoder
    return f"{name}, decoder L{c.n_layer}-D{c.n_embd} V{c.vocab_size}, autocast {'bf16' if captioner.bf16 else 'off'}"


if __name__ == "__main__":
    main()
