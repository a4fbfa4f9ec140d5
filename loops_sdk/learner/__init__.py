"""The central learner: durable event store, reward join, ridge trainer, gRPC service.

Run one with ``loops learner --db loops.sqlite --port 7070`` or in Python::

    with Learner("loops.sqlite", port=7070) as learner:
        learner.wait()
"""

from .insights import holdout_lift, learning_curve, policy_insights
from .join import Joiner, JoinResult, PolicyBook
from .promotion import Gate, GateResult, evaluate_candidate
from .service import Learner, LearnerServicer, RollbackRefused, VersionConflict
from .store import EventStore
from .train import RidgeStats, Trainer

__all__ = ["Learner", "LearnerServicer", "VersionConflict", "RollbackRefused", "EventStore",
           "Joiner", "JoinResult", "PolicyBook", "RidgeStats", "Trainer", "Gate", "GateResult",
           "evaluate_candidate", "policy_insights", "holdout_lift", "learning_curve"]
