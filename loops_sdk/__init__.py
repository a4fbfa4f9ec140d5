"""LOOPS: decide in a microsecond, learn from every decision, replace manual A/B tests.

Public API::

    from loops_sdk import DecisionClient, ClientConfig, Policy

This imports the embedded SDK only (what runs in a game server's process); the servers and
security classes named in ``__all__`` load on first use, the learner and the ``loops`` command
live in :mod:`loops_sdk.learner` and :mod:`loops_sdk.cli` (README "Architecture").
"""

from __future__ import annotations

from .records import DecisionBlock, FeedbackRecords, OutcomeBlock, decode_records, encode_records
from . import _moved
from .client import ClientConfig, DecisionClient
from .decision import DecisionBatch, Reason, format_event_id, parse_event_id
from .errors import (ArgumentError, BatchError, EvaluationError, FeatureError, LoopsError,
                     PolicyError, SecurityError, UnknownActionError)
from .evaluation import (Estimate, LoggedData, baseline_targets, direct_method, doubly_robust,
                         evaluate, ips, snips, switch_dr, target_probabilities)
from .policy import (Action, Exploration, Feature, Holdout, LearningSettings, Policy,
                     PromotionRule, RewardDefinition)
from .rules import BudgetCap, Condition, EligibilityRule, FrequencyCap
from .scorer import IMPLEMENTATION, Decision, stable_hash
from .sink import FileSink, read_feedback_file

__version__ = "0.1.0"

# Moved modules keep their old import paths for one release (loops_sdk.transport, ...).
_moved.install(__name__)

__all__ = [
    "DecisionClient", "ClientConfig", "Decision", "DecisionBatch", "Reason",
    "Policy", "Feature", "Action", "Exploration", "Holdout", "LearningSettings",
    "EligibilityRule", "Condition", "FrequencyCap", "BudgetCap",
    "RewardDefinition", "PromotionRule",
    "FeedbackRecords", "DecisionBlock", "OutcomeBlock", "encode_records", "decode_records",
    "FileSink", "read_feedback_file", "format_event_id", "parse_event_id", "stable_hash",
    "LoggedData", "Estimate", "evaluate", "ips", "snips", "direct_method", "doubly_robust",
    "switch_dr", "baseline_targets", "target_probabilities",
    "LoopsError", "PolicyError", "FeatureError", "UnknownActionError", "BatchError",
    "EvaluationError", "ArgumentError",
    "SecurityError", "DecisionServer", "DecisionServerPool", "ServerSecurity", "ChannelSecurity", "TokenSet",
    "open_channel", "make_dev_certs",
    "IMPLEMENTATION", "__version__",
]

# gRPC-based parts load on first use, so `import loops_sdk` stays free of grpc for offline use.
_LAZY = {"DecisionServer": "serve.service", "DecisionServerPool": "serve.pool",
         "ServerSecurity": "net.auth",
         "ChannelSecurity": "net.channel", "TokenSet": "net.auth", "open_channel": "net.channel",
         "make_dev_certs": "net.devcerts"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
