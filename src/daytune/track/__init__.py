"""Tracking: every run gets its own folder with config, command, git state, metrics and a summary."""

from daytune.track.runstore import RunDir, peak_rss_mb

__all__ = ["RunDir", "peak_rss_mb"]
