"""`vision-rwkv embed`: embed texts (the decoder's free sentence embedding) or images (the encoder's pooled
vectors) into OUT.npy, with OUT.jsonl saying what each row is. See --help."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import EXIT_INTERRUPTED, EXIT_USAGE, VisionRWKVError, one_line, short_warnings
from . import without_shutdown_stall

PROG = "vision-rwkv embed"

DESCRIPTION = """\
Embed texts or images with a vision_rwkv caption model, into OUT.npy (float32, one row per text or
image) and OUT.jsonl (one {"index", "text", "line"} or {"index", "path"} object per row, in row order).

texts: --texts FILE, a UTF-8 file with one text per line; blank lines are skipped ("line" gives each
row's line number). A text's embedding is the decoder's ln_out hidden state at its last position
(--pool last, the default) or the mean over its positions (--pool mean), computed in chunks of
--chunk-len tokens with the recurrent state carried, so any length fits in fixed memory.
images: PATH arguments, image files or folders (searched recursively, sorted); a row is the encoder's
pooled vector. An image that cannot be read stops the run with one line naming it.
Rows are L2-normalised unless --no-normalize, so a dot product is the cosine similarity.

Both files are written whole at the end (a temporary file, then a rename); existing outputs are never
replaced unless --overwrite. Exit status: 0 when done, 2 on a usage or input error (one line, nothing
written), 3 when an output could not be written, 130 on Ctrl-C."""

EXAMPLES = """\
examples:
  vision-rwkv embed --texts captions.txt --out runs/text_emb
  vision-rwkv embed photos/ more.jpg --out runs/image_emb --checkpoint runs/x/checkpoints/latest
"""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage-and-message exit -> our one line, exit 2
        raise _UsageError(message)


def parser(prog: str = PROG) -> argparse.ArgumentParser:
    ap = _Parser(prog=prog, description=DESCRIPTION, epilog=EXAMPLES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders (not with --texts)")
    ap.add_argument("--texts", metavar="FILE", help="embed the lines of this UTF-8 text file")
    ap.add_argument("--out", required=True, metavar="OUT", help="writes OUT.npy and OUT.jsonl")
    ap.add_argument("--checkpoint", metavar="DIR", default=None,
                    help="caption checkpoint folder or Hub model; default: the demo model in vision_rwkv/assets/demo")
    ap.add_argument("--pool", choices=("last", "mean"), default="last", help="texts: how positions pool (default last)")
    ap.add_argument("--chunk-len", type=int, default=256, help="texts: tokens per GPT-mode chunk (default 256)")
    ap.add_argument("--no-normalize", action="store_true", help="keep the raw vectors (default: unit length)")
    ap.add_argument("--batch-size", type=int, default=64, help="texts or images per forward pass (default 64)")
    ap.add_argument("--num-workers", type=int, default=0, help="images: processes decoding files (default 0)")
    ap.add_argument("--device", default="auto", help="auto (default: CUDA when available) | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="auto", help="auto (default: bf16 on CUDA, fp32 on the CPU) | bf16 | fp32")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT.npy and OUT.jsonl if they exist")
    return ap


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Run as `vision-rwkv embed ARGS` would, in-process; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser(prog).parse_args(argv)
        say = lambda line: print(f"{prog}: {line}", file=sys.stderr)  # noqa: E731
        n, npy, index = run(args)
        say(f"embedded {n} {'texts' if args.texts else 'images'} into {npy} and {index}")
        return 0
    except SystemExit as e:  # --help
        return e.code or 0
    except _UsageError as e:
        print(f"{prog}: {e} ({prog} --help lists the options)", file=sys.stderr)
        return EXIT_USAGE
    except VisionRWKVError as e:
        print(f"{prog}: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run(args) -> tuple[int, Path, Path]:
    from ..caption.captioner import Captioner
    from ..caption.images import find_images
    from ..lm.embedding import embed_texts
    from ..lm.embedding_files import check_outputs, save_embeddings

    if bool(args.texts) == bool(args.paths):
        raise VisionRWKVError("give either --texts FILE or image PATHs (one of the two)")
    for name in ("chunk_len", "batch_size"):
        if getattr(args, name) < 1:
            raise VisionRWKVError(f"--{name.replace('_', '-')} is {getattr(args, name)}; expected a positive integer")
    if args.num_workers < 0:
        raise VisionRWKVError(f"--num-workers is {args.num_workers}; expected 0 or more")
    npy, index = check_outputs(args.out, args.overwrite)
    normalize = not args.no_normalize
    if args.texts:
        lines, texts = read_texts(args.texts)
        captioner = Captioner.load(args.checkpoint, device=args.device, dtype=args.dtype)
        vectors = embed_texts(captioner.model.decoder, captioner.model.tokenizer, texts, pool=args.pool,
                              chunk_len=args.chunk_len, batch_size=args.batch_size, normalize=normalize)
        rows = [{"text": t, "line": n} for n, t in zip(lines, texts)]
    else:
        paths = [str(p) for p in find_images(args.paths)]
        captioner = Captioner.load(args.checkpoint, device=args.device, dtype=args.dtype)
        vectors = captioner.embed_images(paths, batch_size=args.batch_size, num_workers=args.num_workers,
                                         normalize=normalize)
        rows = [{"path": p} for p in paths]
    save_embeddings(args.out, vectors, rows)
    return len(rows), npy, index


def read_texts(path) -> tuple[list[int], list[str]]:
    """A UTF-8 text file -> (line numbers, texts) of its non-blank lines, each stripped."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise VisionRWKVError(f"cannot read --texts {path}: {e.strerror}; expected a readable text file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise VisionRWKVError(f"--texts {path} is not UTF-8 (byte {e.start}); expected a UTF-8 text file") from None
    numbered = [(n, line.strip()) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not numbered:
        raise VisionRWKVError(f"--texts {path} has no text; expected one text per line")
    return [n for n, _ in numbered], [t for _, t in numbered]


def cli(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The command line: the library's warnings as one line each, then main()."""
    short_warnings(prog)
    return without_shutdown_stall(main(argv, prog))
