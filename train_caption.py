"""Train a captioning model: `python train_caption.py experiment=shapes_demo`. The same as `vision-rwkv train`.

Kept at the top of the repository because users know it; the command lives in vision_rwkv/cli/train.py.
"""

import sys

from vision_rwkv.cli.train import cli, main  # noqa: F401  (main: the in-process entry point)

if __name__ == "__main__":
    sys.exit(cli())
