"""The one exception type for user errors (bad paths, configs, checkpoints, inputs).

Entry scripts print its message (one line) and exit with status 2. Bugs stay ordinary tracebacks.
The library's own warnings start with "vision_rwkv: "; short_warnings() makes an entry script show
them as one line under its own name.
"""

import sys
import warnings

PREFIX = "vision_rwkv: "


class VisionRWKVError(Exception):
    """A user error: the message says what was wrong and what was expected, on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


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
