"""`python -m vision_rwkv COMMAND ...`: the same as `vision-rwkv COMMAND ...`."""

import sys

from .cli import main

sys.exit(main())
