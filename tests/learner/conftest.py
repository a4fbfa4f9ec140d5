import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("LOOPS_PURE_PYTHON", "1")
