"""Serve captions over HTTP with a web page: `python serve.py --help`. The same as `vision-rwkv serve`.

A thin wrapper; the command lives in vision_rwkv/cli/serve.py and the server in vision_rwkv/serve/.
"""

import sys

from vision_rwkv.cli.serve import cli, main  # noqa: F401  (main: the in-process entry point)

if __name__ == "__main__":
    sys.exit(cli())
