# The compiled decision scorer: policy kernels, decision points with their columnar recorders,
# and the Engine that DecisionClient builds on. twin.py (next to this file) is its pure-Python
# twin; both must give identical actions, probabilities and event ids for the same inputs, so
# any change to the arithmetic here is mirrored there (tests/test_scorer.py runs both).
#
# One compiled module built from included files, one per concern (declarations in core.pxd):
#   _hash.pxi       stable hashes of keys, the public mix64 / stable_hash / draw
#   _kernel.pxi     Kernel: a compiled policy (scores, exploration, rules) + input checks
#   _recorders.pxi  Recorder / OutcomeRecorder: preallocated record columns
#   _caps.pxi       CapTable: per-player cap state
#   _point.pxi      Decision, DecisionPoint: decide / decide_batch under the point's mutex
#   _engine.pxi     OutcomeLog, Engine: what DecisionClient builds on
#
# Concurrency: each DecisionPoint has one cython.pymutex that covers its kernel pointer, its
# scratch buffers, its recorder and its per-player cap table. The mutex drops the GIL while it
# waits, so Python code running inside the critical section (dict look-ups, rare allocations)
# cannot deadlock.
#
# Rules, caps and apprentice mode (loops_sdk/rules.py has the model): a kernel compiled from a
# policy with any of them is "constrained" and its decisions take _decide_row, which narrows
# the eligible set (rules, then caps), decides, and logs why. Kernels without them keep the
# original fast paths untouched.

cimport cython
cimport numpy as cnp
from libc.math cimport INFINITY, NAN, exp, fabs, isfinite, sqrt
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint64_t
from libc.string cimport memcpy, memset
from cpython.ref cimport Py_REFCNT

import os
from collections.abc import Mapping

import numpy as np

from ..records import DecisionBlock, FeedbackRecords, OutcomeBlock
from ..records import FLAG_APPRENTICE, FLAG_CAPPED, FLAG_DEFAULT, FLAG_DEFERRED, FLAG_HOLDOUT
from ..records import FLAG_INPUTS, FLAG_RULE
from ..records import OUTCOME_ACTIVATE, OUTCOME_OBSERVE, OUTCOME_REWARD
from ..records import DECISION_COLUMNS, OUTCOME_COLUMNS, decision_buffers, outcome_buffers
from ..decision import REASONS, DecisionBatch, format_event_id, parse_event_id
from ..errors import ArgumentError, FeatureError, UnknownActionError, argument_error
from ..rules import CAP_BIT_SHIFT, OP_CODES, attribute_error, batch_attributes, batch_baselines
from ..rules import SCORE_LIMIT, safe_norm, score_overflow_error
from .codes import KIND_CODES
from .shared import drain_records, engine_stats, kinds_in_order, point_stats

# The recorders write every column of the record table through these C types: a column added
# to the table, or a dtype changed there, must be handled here too (and in the twin's
# Recorder.write), so refuse to load rather than ship unwritten or mistyped rows.
_C_DTYPES = {"event_hi": "<u8", "event_lo": "<u8", "ts_ns": "<i8", "version": "<u8",
             "user_hash": "<u8", "x": "<f8", "eligible": "u1", "action": "<i4", "prob": "<f8",
             "flags": "u1", "rules": "<u8", "policy_action": "<i4", "policy_prob": "<f8",
             "requested": "u1", "attr_num": "<f8", "attr_hash": "<u8", "cap_used": "<f8",
             "type": "u1", "value": "<f8", "kind": "<u2"}
for _c in DECISION_COLUMNS + OUTCOME_COLUMNS:
    if _c.name not in _C_DTYPES or _c.dtype != np.dtype(_C_DTYPES[_c.name]):
        raise ImportError(f"record column {_c.name!r} ({_c.dtype}) is not what the recorder "
                          f"writes ({_C_DTYPES.get(_c.name)})")

cnp.import_array()

IMPLEMENTATION = "cython"

# The C constants of core.pxd against the Python ones they mirror, once at import.
assert (F_HOLDOUT, F_DEFAULT, F_DEFERRED, F_CAPPED, F_RULE, F_APPRENTICE, F_INPUTS) == \
    (FLAG_HOLDOUT, FLAG_DEFAULT, FLAG_DEFERRED, FLAG_CAPPED, FLAG_RULE, FLAG_APPRENTICE,
     FLAG_INPUTS)
assert (O_REWARD, O_OBSERVE, O_ACTIVATE) == (OUTCOME_REWARD, OUTCOME_OBSERVE, OUTCOME_ACTIVATE)
assert LOOPS_SCORE_LIMIT == SCORE_LIMIT
assert (KIND_GREEDY, KIND_EPSILON, KIND_SOFTMAX, KIND_SQUARECB, KIND_THOMPSON) == \
    tuple(KIND_CODES[k] for k in ("greedy", "epsilon_greedy", "softmax", "squarecb", "thompson"))
assert [REASONS[c] for c in (R_POLICY, R_HOLDOUT, R_NO_ELIGIBLE, R_CAPPED, R_RULE,
                             R_APPRENTICE)] == ["POLICY", "HOLDOUT", "NO_ELIGIBLE_ACTION",
                                                "CAPPED", "RULE", "APPRENTICE"]
assert CAP_SHIFT == CAP_BIT_SHIFT
assert [OP_IN, OP_NOT_IN, OP_IS_TRUE, OP_IS_FALSE, OP_EQ, OP_NE, OP_LT, OP_LE, OP_GT, OP_GE] == \
    [OP_CODES[o] for o in ("in", "not_in", "is_true", "is_false", "==", "!=", "<", "<=", ">",
                           ">=")]

include "_hash.pxi"
include "_kernel.pxi"
include "_recorders.pxi"
include "_caps.pxi"
include "_point.pxi"
include "_engine.pxi"
