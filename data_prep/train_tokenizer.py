"""`python data_prep/train_tokenizer.py --help`: the same as `vision-rwkv prep train_tokenizer`.

The command lives in vision_rwkv/cli/prep/train_tokenizer.py.
"""

import sys

from vision_rwkv.cli.prep.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
