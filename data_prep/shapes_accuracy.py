"""`python data_prep/shapes_accuracy.py --help`: the same as `vision-rwkv prep shapes_accuracy`.

The command lives in vision_rwkv/cli/prep/shapes_accuracy.py.
"""

import sys

from vision_rwkv.cli.prep.shapes_accuracy import main

if __name__ == "__main__":
    sys.exit(main())
