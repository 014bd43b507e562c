"""The training run: the Trainer loop around :class:`ace.PrimalDual`, its checkpoints, evaluations,
model selection, fault handling and the held-out read-out.

Imports :mod:`ace.constrained`, :mod:`ace.nn`, :mod:`ace.symmetry`, :mod:`ace.runs`, :mod:`ace.utils`.
"""

from ace.train.evaluation import evaluate
from ace.train.faults import Interrupted, NonFiniteError
from ace.train.trainer import Trainer

__all__ = ["Interrupted", "NonFiniteError", "Trainer", "evaluate"]
