"""Tracking: every run gets its own folder with config, command, git state and diff, environment, code, metrics,
system samples, lineage and a summary; W&B and MLflow mirror it when configured; the doctor and reports read it."""

from daytune.track.runstore import RunDir, peak_rss_mb
from daytune.track.tracker import Tracker, record_eval

__all__ = ["RunDir", "Tracker", "peak_rss_mb", "record_eval"]
