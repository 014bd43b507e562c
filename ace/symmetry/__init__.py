"""What a symmetry is: groups and their representations, how they act on a model's inputs and
outputs, the measured equivariance deviation, a test kit, and diagnostics of data and layers.

Imports only :mod:`ace.utils`.
"""

from ace.symmetry import diagnostics, groups, testing
from ace.symmetry.action import Symmetry, call_model, is_graph
from ace.symmetry.deviation import equivariance_deviation, mean_squared_norm
from ace.symmetry.group import Group, GroupElement
from ace.symmetry.groups import (
    C4,
    D4,
    O3,
    SO2,
    SO3,
    Cyclic,
    Euclidean,
    GridGroup,
    Permutation,
    SignFlip,
    Translation,
)
from ace.symmetry.testing import assert_equivariant

__all__ = [
    "C4",
    "D4",
    "O3",
    "SO2",
    "SO3",
    "Cyclic",
    "Euclidean",
    "GridGroup",
    "Group",
    "GroupElement",
    "Permutation",
    "SignFlip",
    "Symmetry",
    "Translation",
    "assert_equivariant",
    "call_model",
    "diagnostics",
    "equivariance_deviation",
    "groups",
    "is_graph",
    "mean_squared_norm",
    "testing",
]
