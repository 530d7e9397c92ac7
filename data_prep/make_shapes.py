"""`python data_prep/make_shapes.py --help`: the same as `vision-rwkv prep make_shapes`.

The command lives in vision_rwkv/cli/prep/make_shapes.py.
"""

import sys

from vision_rwkv.cli.prep.make_shapes import main

if __name__ == "__main__":
    sys.exit(main())
