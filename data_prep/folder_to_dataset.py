"""`python data_prep/folder_to_dataset.py --help`: the same as `vision-rwkv prep folder_to_dataset`.

The command lives in vision_rwkv/cli/prep/folder_to_dataset.py.
"""

import sys

from vision_rwkv.cli.prep.folder_to_dataset import main

if __name__ == "__main__":
    sys.exit(main())
