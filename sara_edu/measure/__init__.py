"""Measurement: exact live-tensor memory (:mod:`.memory`, also on CPU) and step time (:mod:`.timing`)."""
from .memory import MemoryReport, MemoryTracker
from .timing import measure_step_time

__all__ = ["MemoryTracker", "MemoryReport", "measure_step_time"]
