"""Imported by the bench scripts before vision_rwkv: this checkout's package comes first on sys.path.

Run as `python bench/NAME.py`, a script would otherwise import whichever vision_rwkv is installed, and an
editable install may point at another checkout (a `.ci/run` in a clone re-points it at the clone).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))
