"""Relaxed layers: gated f_eq + gamma f_neq around any module, bounded branches, and equivariant
layers of the example tasks (group convolutions, sign-equivariant layers).

Imports :mod:`ace.symmetry` and :mod:`ace.utils`.
"""

from ace.nn import bound, gconv, sign
from ace.nn.bound import bound_branch, branch_bound, is_bounded
from ace.nn.gconv import E4Block, GroupConv, GroupPool, LiftingConv
from ace.nn.relaxed import GatedLayer, MLPBranch, equivariant, gates, relax, strip, weights
from ace.nn.sign import SignEquivariantGate, SignEquivariantMessage, SignNet

__all__ = [
    "E4Block",
    "GatedLayer",
    "GroupConv",
    "GroupPool",
    "LiftingConv",
    "MLPBranch",
    "SignEquivariantGate",
    "SignEquivariantMessage",
    "SignNet",
    "bound",
    "bound_branch",
    "branch_bound",
    "equivariant",
    "gates",
    "gconv",
    "is_bounded",
    "relax",
    "sign",
    "strip",
    "weights",
]
