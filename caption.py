"""Caption image files and folders: `python caption.py --help`. The same as `vision-rwkv caption`.

Kept at the top of the repository because users know it; the command lives in vision_rwkv/cli/caption.py.
"""

import sys

from vision_rwkv.cli.caption import cli, main  # noqa: F401  (main: the in-process entry point)

if __name__ == "__main__":
    sys.exit(cli())
