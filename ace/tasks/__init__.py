"""Built-in example tasks, imported lazily so that optional extras stay optional."""

from ace.tasks.base import Task

__all__ = ["Task"]
