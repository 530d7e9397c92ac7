"""`python data_prep/make_coco_synthetic.py --help`: the same as `vision-rwkv prep make_coco_synthetic`.

The command lives in vision_rwkv/cli/prep/make_coco_synthetic.py.
"""

import sys

from vision_rwkv.cli.prep.make_coco_synthetic import main

if __name__ == "__main__":
    sys.exit(main())
