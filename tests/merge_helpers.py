"""Statistics for tiny models: the profiler's one pass (``moekit.profile``), quietly."""

from __future__ import annotations

from moekit.profile.profile import ProfileConfig, profile
from moekit.profile.stats import ExpertStats


def tiny_stats(model, tokens) -> ExpertStats:
    return profile(model, ProfileConfig(progress=False), tokens=tokens)
