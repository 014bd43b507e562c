"""The run directory: its layout, checkpoints, the metrics log, reading a finished run, plots,
reports and comparisons.
"""

from ace.runs.checkpoint import CheckpointError
from ace.runs.layout import OutputError, RunDirError
from ace.runs.metrics import MetricsLog, read_metrics
from ace.runs.reader import RunData

__all__ = ["CheckpointError", "MetricsLog", "OutputError", "RunData", "RunDirError", "read_metrics"]
