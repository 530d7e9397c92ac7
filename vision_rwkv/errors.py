"""The one exception type for user errors (bad paths, configs, checkpoints, inputs), and the exit statuses.

Entry scripts print its message (one line) and exit with status 2 (EXIT_USAGE); OutputError, a write that
failed once work had begun (disk full, a read-only file system), exits 3 (EXIT_OUTPUT) and keeps what was
already written. Bugs stay ordinary tracebacks.

The library's own warnings start with "vision_rwkv: "; short_warnings() makes an entry script show
them as one line under its own name.
"""

from __future__ import annotations

import sys
import warnings

PREFIX = "vision_rwkv: "

EXIT_OK = 0
EXIT_ALL_FAILED = 1  # caption.py: every image failed
EXIT_USAGE = 2  # a bad option, config, path or checkpoint: nothing was done
EXIT_OUTPUT = 3  # an output could not be written: what was written before is kept, a re-run resumes
EXIT_INTERRUPTED = 130  # Ctrl-C


class VisionRWKVError(Exception):
    """A user error: the message says what was wrong and what was expected, on one line."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class OutputError(VisionRWKVError):
    """Writing an output failed (no space left, a read-only file system, permissions); reason: why, in words."""

    exit_code = EXIT_OUTPUT

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


def one_line(e: BaseException) -> str:
    """An error as one line. Hydra and OmegaConf spread a message over several lines and a chain of causes,
    with lines for debugging (full_key, object_type, hints): keep the words."""
    noise = ("full_key:", "object_type=", "reference_type=", "To append to your config", "See https://hydra.cc",
             "Set the environment variable HYDRA_FULL_ERROR")
    parts: list[str] = []
    cause: BaseException | None = e
    while cause is not None and len(parts) < 3:
        text = str(cause).split("Config search path:")[0]
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(noise)]
        if lines:
            parts.append(" ".join(lines).rstrip("."))
        cause = cause.__cause__
    return ": ".join(parts) or type(e).__name__


def short_warnings(prog: str) -> None:
    """Show the library's warnings as one line, "PROG: warning: ...", without Python's file:line and source
    line; other warnings keep the usual format."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if text.startswith(PREFIX):
            print(f"{prog}: warning: {text[len(PREFIX):]}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
