"""Profiling: how a task uses every expert, attention expert and head.

``profile_model`` (run.py) reads task data (data.py), runs it through the model with read-only
hooks (hooks.py) and returns ``ProfileStats`` (stats.py): sums that save, load and merge.
``sequential=True`` runs one decoder layer at a time from the safetensors (sequential.py);
under torchrun the ranks split the data and all-reduce (distributed.py). view.py turns stats
into what ``mfprune show`` prints and draws.
"""

from mfprune.profiling.data import Shard
from mfprune.profiling.run import profile_model
from mfprune.profiling.stats import ExpertStats, HeadStats, ProfileStats, StatsMeta, merge_stats

__all__ = [
    "ExpertStats",
    "HeadStats",
    "ProfileStats",
    "Shard",
    "StatsMeta",
    "merge_stats",
    "profile_model",
]
