"""The command line: `vision-rwkv COMMAND ...` (or `python -m vision_rwkv COMMAND ...`).

    vision-rwkv caption PATH... [key=value ...]     caption images and folders (caption.py)
    vision-rwkv train [key=value ...]               train a captioning model (train_caption.py; Hydra)
    vision-rwkv eval --karpathy ... [options]       COCO caption metrics (eval_coco.py)
    vision-rwkv serve [key=value ...]               serve captions over HTTP with a web page (serve.py)
    vision-rwkv embed PATH... --out OUT             embed images, or texts with --texts FILE (.npy + .jsonl)
    vision-rwkv prep STEP [options]                 one data preparation step (data_prep/STEP.py)

Each command imports only what it needs, so `vision-rwkv caption` starts without the training stack.
Hydra's configs ship inside the package (vision_rwkv/cli/conf), so the commands work from any folder.
"""

from __future__ import annotations

import gc
import importlib
import sys

COMMANDS = {
    "caption": ("vision_rwkv.cli.caption", "cli", "caption images and folders"),
    "train": ("vision_rwkv.cli.train", "cli", "train a captioning model (Hydra overrides)"),
    "eval": ("vision_rwkv.cli.eval", "main", "caption a Karpathy split and score it with the COCO metrics"),
    "serve": ("vision_rwkv.cli.serve", "cli", "serve captions over HTTP, with a web page (Hydra overrides)"),
    "embed": ("vision_rwkv.cli.embed", "cli", "embed texts or images into OUT.npy + OUT.jsonl"),
    "prep": ("vision_rwkv.cli.prep", "main", "data preparation: vision-rwkv prep --help lists the steps"),
}
PROG = "vision-rwkv"


def without_shutdown_stall(code: int) -> int:
    """Freeze the objects alive now so the interpreter's last garbage collections skip them: torch and its
    friends leave millions, and collecting them at exit took 0.5 to 0.8 s of every command on a 2-core CPU.
    Files are closed by then; objects freed by reference counting still are."""
    gc.freeze()
    return code


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {what}" for name, (_, _, what) in COMMANDS.items())
    return (f"usage: {PROG} COMMAND [ARGS ...]\n\nImage captioning with a frozen CLIP encoder and an RWKV decoder "
            f"(RWKV-7 or RWKV-4).\n\ncommands:\n{rows}\n\n`{PROG} COMMAND --help` describes each one.\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{PROG}: unknown command {name!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[name]
    prog = f"{PROG} {name}"
    sys.argv = [prog, *rest]  # Hydra and argparse read the program's name from argv[0]
    return without_shutdown_stall(getattr(importlib.import_module(module), function)(rest, prog=prog) or 0)
