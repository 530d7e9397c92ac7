"""`vision-rwkv caption` and `python caption.py`: caption image files and folders (see USAGE, or --help).

Hydra composes the options from conf/caption.yaml, typed by CaptionJobConfig, so a misspelt key or a wrong
type fails before any work with Hydra's own message; vision_rwkv.caption.batch does the job.
"""

from __future__ import annotations

import os
import sys
from dataclasses import fields
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ..caption.batch import run, stderr_lines
from ..config import CaptionJobConfig
from ..errors import EXIT_INTERRUPTED, EXIT_USAGE, VisionRWKVError, one_line, short_warnings
from . import without_shutdown_stall

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
PROG = "caption.py"

USAGE = """\
usage: python caption.py PATH [PATH ...] [key=value ...] [-- PATH ...]

Caption images with a vision_rwkv model (frozen CLIP encoder -> projector -> RWKV-7 or RWKV-4 decoder).

PATH is an image file or a folder; folders are searched recursively for .bmp .gif .jpeg .jpg .png
.tif .tiff .webp files. Every argument without '=' is a path. Arguments after `--` are paths whatever
they look like (use it for names that start with '-', '+' or '~', or that contain '=' and start with
an option's name).

options (Hydra overrides, key=value; defaults in conf/caption.yaml):
  checkpoint=DIR          caption checkpoint folder (config.yaml, model.safetensors, tokenizer), or a
                          training run's <out_dir>/checkpoints/latest;
                          null (default): the demo model shipped in vision_rwkv/assets/demo
  out=FILE                where to write; null (default): standard output
  format=FORMAT           auto (default) | text | jsonl | csv | coco | txt (see below)
  sampling=NAME           decoding preset from conf/sampling: greedy (default) | beam | nucleus
  sampling.KEY=VALUE      any SamplingConfig field of the preset's strategy, e.g. sampling.max_new_tokens=32,
                          sampling=beam sampling.num_beams=5, sampling=nucleus sampling.top_p=0.9
                          sampling.temperature=0.7 sampling.seed=1; a field the strategy does not use
                          (top_p under greedy) is an error that names the preset to use
  batch_size=N            images encoded and decoded together (default 32)
  num_workers=N           processes decoding image files; null (default): one per CPU, at most 8;
                          0: in this process (never more than there are batches)
  device=DEVICE           auto (default: CUDA when available) | cpu | cuda | cuda:N
  dtype=DTYPE             auto (default: bf16 weights and autocast on CUDA, fp32 on the CPU) | bf16 | fp32
  progress=BOOL           progress bar with images/s on stderr; null (default): when stderr is a terminal
  overwrite=BOOL          false (default): resume what an earlier run with this out left, and leave an
                          existing NAME.txt alone (format=txt); true: start afresh and replace them
  paths=[A,B]             paths as a Hydra list (added to the positional ones)
                          (a value with spaces, commas or brackets needs Hydra's quotes: out="'my file.jsonl'")
  --cfg                   print the composed configuration and exit
  -h, --help              print this text and exit

output formats (format=auto picks from out's suffix: .jsonl -> jsonl, .csv -> csv, .json -> coco,
.txt -> text; no out -> text on standard output):
  text    one line per image: the caption, or PATH<TAB>CAPTION when there are several images;
          a failed image's line reads [error] REASON in place of the caption
  jsonl   one {"path", "caption", "score", "error"} object per line, appended and fsynced after
          every batch; a re-run with the same out skips the images already in the file, matched by
          the file they name however the path is spelt (resume; to retry failed images, delete
          their lines)
  csv     columns path, caption, score, error
  coco    COCO results JSON: [{"image_id", "caption"}]; image_id is the file name's number
          (000000123456.jpg, COCO_val2014_000000123456.jpg), else the image's position in the input;
          failed images are left out (the format has no place for them)
  txt     a sidecar NAME.txt holding the caption beside each image NAME.EXT (out must be unset;
          failed images get none); an image that already has a NAME.txt (often a caption written
          by hand) is left alone and counted in one line, unless overwrite=true
score is the caption's total log-probability under the model (higher is more likely).
csv, coco and text files are written whole at the end, through a temporary file and a rename; until
then the rows go to OUT.journal.jsonl beside out, batch by batch, so a killed or failed run loses at
most one batch and a re-run with the same out resumes from the journal. One run at a time per out:
a second run on the same out stops with one line.

A file that cannot be read (corrupt, truncated, not an image, too large, unreadable, a symlink loop)
gets one line on stderr and an error row; the run goes on. At the end stderr says
"captioned N images, M failed in T s (R images/s)" (T from the loaded model to the last image).
Exit status: 0 when done, 1 when every image failed, 2 on a usage, config or checkpoint error (before
any work), 3 when an output could not be written (disk full, read-only): one line says what, the rows
written before are kept and the same command resumes; 130 on Ctrl-C; 141 when standard output was
closed early (e.g. | head), quietly, as a process ended by SIGPIPE.

several processes (one per GPU; torchrun's own flags for several machines):
  torchrun --nproc_per_node=2 caption.py photos/ out=captions.jsonl
each process captions every 2nd pending image into out.part-R-of-W.jsonl beside out; process 0 then
merges the parts into out in input order. out is required (any format but text on standard output;
format=txt needs none). A killed run resumes with any number of processes, a single one included: the
parts it left are taken into out (or its journal) first, then removed.

examples:
  python caption.py photo.jpg
  python caption.py photos/ more.jpg sampling=beam sampling.num_beams=5 out=captions.jsonl
  python caption.py photos/ checkpoint=runs/x/checkpoints/step-0001000 batch_size=64 device=cpu
"""



ConfigStore.instance().store(name="caption_cli_schema", node=CaptionJobConfig)
EXIT_BROKEN_PIPE = 128 + 13  # as a process ended by SIGPIPE, what shells report for `yes | head -1`


# ---- the command line ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Run as `python caption.py ARGS` would, in-process; returns the exit status. prog names the command in
    what it prints."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    argv = list(sys.argv[1:] if argv is None else argv)
    options = argv[: argv.index("--")] if "--" in argv else argv
    if "-h" in options or "--help" in options:
        print(USAGE.replace("python caption.py", prog), end="")
        return 0
    try:
        paths, overrides, show_cfg = split_argv(argv)
        cfg = compose(overrides)
        if show_cfg:
            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        app = OmegaConf.to_object(cfg)
        app.paths = [*app.paths, *paths]
        return run(app, say=stderr_lines(prog))
    except BrokenPipeError:  # e.g. `caption.py photos/ | head -1`: the reader has gone; stop quietly
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (VisionRWKVError, HydraException, OmegaConfBaseException) as e:
        hint = "" if isinstance(e, VisionRWKVError) else f" ({prog} --help lists the options)"
        print(f"{prog}: {one_line(e)}{hint}", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_USAGE)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so the interpreter's last flush cannot fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (a test's captured stream)
        pass


def split_argv(argv: list[str]) -> tuple[list[str], list[str], bool]:
    """argv -> (paths, Hydra overrides, --cfg given).

    Paths never pass through Hydra: its override grammar gives meaning to spaces, commas, brackets,
    quotes, '$' and '=' in values, and no escaping survives every file name. They are kept aside and
    set on the composed config instead. For the same reason main() composes with Hydra's compose API
    rather than @hydra.main, which would also own argv, change the logging, and make an outputs/ folder
    in the working directory of every captioning run.
    """
    paths, overrides, show_cfg, only_paths = [], [], False, False
    for arg in argv:
        if only_paths:
            paths.append(arg)
        elif arg == "--":
            only_paths = True
        elif arg == "--cfg":
            show_cfg = True
        elif arg.startswith("-"):
            raise VisionRWKVError(f"unknown option {arg!r}; options are key=value (see --help), "
                                  "and paths that start with '-' go after --")
        elif arg.startswith(("+", "~")) or ("=" in arg and not _names_a_file(arg)):
            overrides.append(arg)
        else:
            paths.append(arg)
    return paths, overrides, show_cfg


def _names_a_file(arg: str) -> bool:
    """A name like 'a=b.jpg' that exists and does not start with an option's name is a path."""
    key = arg.split("=", 1)[0].split(".", 1)[0]
    return key not in {f.name for f in fields(CaptionJobConfig)} | {"hydra"} and os.path.lexists(arg)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None, job_name="caption"):
        return hydra_compose(config_name="caption", overrides=list(overrides))




def cli(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The command line: the library's warnings as one line each, then main()."""
    short_warnings(prog)
    return without_shutdown_stall(main(argv, prog))
