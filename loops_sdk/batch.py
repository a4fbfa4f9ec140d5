"""Columnar feedback records and their msgpack encoding (``FeedbackBatch.payload``, format 1).

Kept for existing imports: everything lives in :mod:`loops_sdk.records` (the one column table
and the blocks, encoding, decoding and slicing derived from it) and is re-exported here.
"""

from __future__ import annotations

from .records import *  # noqa: F401,F403
from .records import __all__  # noqa: F401
