"""`python data_prep/convert_checkpoint.py --help`: the same as `vision-rwkv prep convert_checkpoint`.

The command lives in vision_rwkv/cli/prep/convert_checkpoint.py.
"""

import sys

from vision_rwkv.cli.prep.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
