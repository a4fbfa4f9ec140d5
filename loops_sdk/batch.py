"""Deprecated alias of :mod:`loops_sdk.records` (the one column table and the blocks,
encoding, decoding and slicing derived from it); this name goes in the next release."""

import importlib as _importlib
import sys as _sys

from . import _moved

_moved.warn("loops_sdk.batch is deprecated and will be removed in the next release; "
            "import loops_sdk.records")
# The alias *is* the records module, so every name (and monkeypatching) keeps working.
_sys.modules[__name__] = _importlib.import_module("loops_sdk.records")
