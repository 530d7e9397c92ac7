"""`python data_prep/export_model.py --help`: the same as `vision-rwkv prep export_model`.

The command lives in vision_rwkv/cli/prep/export_model.py.
"""

import sys

from vision_rwkv.cli.prep.export_model import main

if __name__ == "__main__":
    sys.exit(main())
