"""The sharded learner: N learner shards and one coordinator, as Ray actors.

``loops cluster --shards N --data DIR [--address RAY_ADDRESS]`` starts it. Ray is needed only
by :mod:`~loops_sdk.cluster.actors` (``pip install 'loops-sdk[ray]'``); :mod:`.merge` and
:mod:`.shard` are plain Python.
"""

from .actors import LearnerCluster, ray_available
from .merge import concat_windows, tree_merge
from .shard import Coordinator, Shard, read_announcement

__all__ = ["LearnerCluster", "Shard", "Coordinator", "tree_merge", "concat_windows",
           "read_announcement", "ray_available"]
