"""``tools/train.py`` with the toy engine components registered (for subprocess tests)."""
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import toy_training  # noqa: E402,F401  (registers the ToyEngine* classes)

runpy.run_path(os.path.join(ROOT, "tools", "train.py"), run_name="__main__")
