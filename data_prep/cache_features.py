"""`python data_prep/cache_features.py --help`: the same as `vision-rwkv prep cache_features`.

The command lives in vision_rwkv/cli/prep/cache_features.py.
"""

import sys

from vision_rwkv.cli.prep.cache_features import main

if __name__ == "__main__":
    sys.exit(main())
