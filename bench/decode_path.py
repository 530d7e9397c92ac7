"""Decoding on the product path, old loops against new, side by side in one run (issue 19).

    python bench/decode_path.py [--layers 12 --embd 768 --vocab 65536 --batches 1,64,256 --new-tokens 20]
    python bench/decode_path.py --device cpu --layers 2 --embd 64 --vocab 1000 --batches 1,4   # smoke run

Greedy decoding and beam search (--beams, default 3) from random prompts through an RWKV-7 decoder with
random weights (every matrix random, so beams really differ), bf16 weights under bf16 autocast on CUDA as
caption.py runs them, fp32 on the CPU. Every row runs exactly --new-tokens tokens (min_new_tokens bans the
stop token until then), so both loops do the same steps.

  old   tests/decode_reference.py: the loops before issue 19, which read tokens back to the host at every
        step and, for beams, advance each image in Python and gather the whole state per step.
  new   vision_rwkv.lm.generate.decode_loop and vision_rwkv.lm.beam.beam_search: bookkeeping on the device,
        a lagged stop check, the beam state reordered in place.

Both step through the same rnn_stepper (CUDA graph replays of the fused step on CUDA: graph against graph),
so the difference is the loop around the step. Times are medians over --repeats runs of a whole decode
(CUDA events on CUDA, after a warm-up run that captures the graphs), given per step (ms/token) and as new
tokens per second over the batch (for beam search, the B captions' tokens, not B x beams). `syncs` counts
what torch's CUDA sync debug mode flags in one decode; `same` says whether both loops gave the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import _checkout  # noqa: F401 (this checkout's vision_rwkv before any installed one)
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the reference loops live beside the tests that use them
import decode_reference as old  # noqa: E402
from rnn_step import randomize  # noqa: E402

from vision_rwkv import RWKV7, RWKV7Config, SamplingConfig  # noqa: E402
from vision_rwkv.lm.beam import beam_search  # noqa: E402
from vision_rwkv.lm.generate import decode_loop  # noqa: E402
from vision_rwkv.lm.readback import count_syncs  # noqa: E402


def median_ms(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of fn() in ms, after one warm-up call; CUDA events on CUDA."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def tokens_of(result) -> list:
    """The token ids of a decode_loop result (lists of ids) or a beam_search result (Hypothesis lists)."""
    return [[h.ids for h in row] if row and hasattr(row[0], "ids") else row for row in result]


def build(args, device: torch.device) -> RWKV7:
    cfg = RWKV7Config(vocab_size=args.vocab, n_layer=args.layers, n_embd=args.embd, head_size=args.head_size)
    torch.manual_seed(0)
    lm = randomize(RWKV7(cfg).to(device).eval())
    return lm.to(torch.bfloat16) if device.type == "cuda" else lm


@torch.no_grad()
def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (CUDA when there is one), cuda or cpu")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--batches", default="1,64,256", help="batch sizes (images), comma-separated")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--beams", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=8, help="prompt length (GPT mode, not timed)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    lm = build(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    dtype = "bf16 weights, bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"{name}, torch {torch.__version__}, RWKV-7 L{args.layers}-D{args.embd} V{args.vocab}, {dtype}; "
          f"{args.new_tokens} new tokens per row, beam search with {args.beams} beams; both loops step "
          f"through rnn_stepper ({'CUDA graphs' if device.type == 'cuda' else 'no graphs on the CPU'})")
    T = args.new_tokens
    strategies = {
        "greedy": (SamplingConfig(max_new_tokens=T, min_new_tokens=T), old.decode_loop, decode_loop),  # cfg, old, new
        "beam": (SamplingConfig(strategy="beam", num_beams=args.beams, max_new_tokens=T, min_new_tokens=T),
                 old.beam_search, beam_search),
    }
    print(f"{'strategy':<9}{'batch':>6}{'rows':>6}{'old ms/tok':>12}{'new ms/tok':>12}{'old tok/s':>11}"
          f"{'new tok/s':>11}{'ratio':>7}{'old syncs':>10}{'new syncs':>10}  same")
    g = torch.Generator(device=device).manual_seed(1)
    rows = []
    for batch in map(int, args.batches.split(",")):
        prompts = torch.randint(0, args.vocab, (batch, args.prompt), device=device, generator=g)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, state = lm(prompts, last_only=True)
            for strategy, (cfg, *loops) in strategies.items():
                row = dict(strategy=strategy, batch=batch, rows=batch * (cfg.num_beams if strategy == "beam" else 1))
                row.update(compare(lm, logits, state, cfg, loops, device, args.repeats))
                rows.append(row)
                print_row(row)
    return rows


def compare(lm, logits, state, cfg: SamplingConfig, loops, device: torch.device, repeats: int) -> dict:
    """Time the old and the new loop on the same prefix; count their syncs; compare their tokens."""
    T, B = cfg.max_new_tokens, logits.shape[0]
    runs = []
    for loop in loops:
        def decode(loop=loop):
            return loop(lm, logits, state.clone(), cfg, [0])

        syncs = count_syncs(decode) if device.type == "cuda" else None
        runs.append((median_ms(decode, device, repeats), syncs, tokens_of(decode())))
    (old_ms, old_syncs, old_tokens), (new_ms, new_syncs, new_tokens) = runs
    return dict(old_ms_per_token=old_ms / T, new_ms_per_token=new_ms / T, old_tokens_per_s=B * T / (old_ms / 1e3),
                new_tokens_per_s=B * T / (new_ms / 1e3), ratio=old_ms / new_ms, old_syncs=old_syncs,
                new_syncs=new_syncs, same=old_tokens == new_tokens)


def print_row(row: dict) -> None:
    syncs = [("-" if row[k] is None else str(row[k])) for k in ("old_syncs", "new_syncs")]
    print(f"{row['strategy']:<9}{row['batch']:>6}{row['rows']:>6}{row['old_ms_per_token']:>12.3f}"
          f"{row['new_ms_per_token']:>12.3f}{row['old_tokens_per_s']:>11.0f}{row['new_tokens_per_s']:>11.0f}"
          f"{row['ratio']:>6.2f}x{syncs[0]:>10}{syncs[1]:>10}  {'yes' if row['same'] else 'NO'}", flush=True)

if __name__ == "__main__":
    main()
