"""The constrained problem and its step: constraints and their tolerance schedules, the primal side
(weights, gates, slacks), the multipliers, and one primal-dual update for any training loop.

The only sub-package that imports cooper. Imports :mod:`ace.nn`, :mod:`ace.symmetry`, :mod:`ace.utils`.
"""

from ace.constrained import schedules
from ace.constrained.constraints import Constraint, DeviationConstraint, GateConstraint, Tolerance
from ace.constrained.multipliers import DualSettings
from ace.constrained.primal_dual import PrimalDual
from ace.constrained.step_result import StepResult

__all__ = [
    "Constraint",
    "DeviationConstraint",
    "DualSettings",
    "GateConstraint",
    "PrimalDual",
    "StepResult",
    "Tolerance",
    "schedules",
]
