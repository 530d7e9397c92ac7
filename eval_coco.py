"""Caption a split of a Karpathy JSON and score it with the COCO metrics: `python eval_coco.py --help`.
The same as `vision-rwkv eval`; the command lives in vision_rwkv/cli/eval.py.
"""

import sys

from vision_rwkv.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
