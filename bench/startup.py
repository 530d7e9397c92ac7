"""Time to first caption, against `python -c "import torch"`, measured in one run.

    python bench/startup.py [--rounds 7] [--image examples/shapes_test_3.png] [-- extra caption.py args]

Each round starts, one after the other, a fresh `python -c "import torch"` and a fresh
`python caption.py IMAGE` (the shipped demo model on the CPU unless told otherwise), and times each from
start to exit; for caption.py it also times the first caption line on stdout. It prints the medians and the
ratio to importing torch. Start-up is what dominates a one-image command: the captioning itself is
about 0.2 s of it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _checkout  # noqa: F401 (this checkout's vision_rwkv before any installed one)

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds to the first stdout line, seconds to exit)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    proc.stdout.readline()
    first = time.perf_counter() - start
    proc.stdout.read()
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {proc.returncode}")
    return first, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--image", default=str(ROOT / "examples" / "shapes_test_3.png"))
    ap.add_argument("extra", nargs="*", help="more caption.py arguments (after --)")
    args = ap.parse_args()
    torch_cmd = [sys.executable, "-c", "import torch"]
    caption_cmd = [sys.executable, str(ROOT / "caption.py"), args.image, *args.extra]
    timed(torch_cmd)  # warm the file cache once, untimed
    timed(caption_cmd)
    torch_s, first_s, caption_s = [], [], []
    for _ in range(args.rounds):
        torch_s.append(timed(torch_cmd)[1])
        first, total = timed(caption_cmd)
        first_s.append(first)
        caption_s.append(total)
    t, f, c = (statistics.median(x) for x in (torch_s, first_s, caption_s))
    print(f"python {sys.version.split()[0]}, {args.rounds} rounds, medians (min-max):")
    print(f"  python -c 'import torch'         {t:.2f} s ({min(torch_s):.2f}-{max(torch_s):.2f})")
    print(f"  caption.py: first caption         {f:.2f} s ({min(first_s):.2f}-{max(first_s):.2f})  {f / t:.2f}x")
    print(f"  caption.py: exit                  {c:.2f} s ({min(caption_s):.2f}-{max(caption_s):.2f})  {c / t:.2f}x")


if __name__ == "__main__":
    main()
