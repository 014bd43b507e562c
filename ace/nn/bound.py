"""Bounded branches: make a gate's size a certificate of how far a relaxed layer is from f_eq.

A relaxed layer computes ``f_eq(x) + gamma * f_neq(x)``. With a free branch the gate says nothing:
``gamma -> gamma / a, f_neq -> a f_neq`` gives the same function, so a small gate can hide a large
branch. :func:`bound_branch` fixes the branch's scale. Every ``nn.Linear`` of the branch gets

    W -> W / sigma_max(W)           (spectral normalisation, torch's power-iteration parametrisation)
    b -> b / max(1, ||b||)          (the bias projected onto the unit ball)

so each linear map has operator norm 1 and bias norm <= 1. With activations that shrink every
entry (``|act(z)| <= |z|``: SiLU, ReLU, GELU, tanh, LeakyReLU with slope <= 1), a branch that is a
chain of ``L`` such linear layers satisfies

    ||f_neq(x)|| <= ||x|| + L <= L (1 + ||x||)            (C = L, the number of linear layers)

for its input ``x`` (the concatenation of what the branch reads), and so the relaxed layer departs
from f_eq by at most ``|gamma| L (1 + ||x||)``: ``|gamma|`` now bounds the non-equivariant part,
as ACE's Theorems 4.1 and 4.2 assume (ACE's own EGNO code spectral-normalises its branches too).

A ``nn.Conv2d`` (zero padding) is bounded the same way, its weight as a ``(C_out, C_in k_h k_w)`` matrix and
then divided by ``sqrt(k_h k_w)``: every input pixel enters at most ``k_h k_w`` patches, so the convolution's
operator norm is at most 1. Its bias is added at each of the map's ``P`` pixels, so a branch of ``L`` such
layers satisfies ``||f_neq(x)|| <= ||x|| + L sqrt(P)``.

sigma_max is estimated by one power iteration per training forward pass (its vectors are buffers in
the model's ``state_dict``, so a resumed run continues bit for bit). The estimate approaches
sigma_max from below, so the bound holds up to the estimate's error (below 1e-3 relative once the
weights settle; ``tests/nn/test_bound.py`` trains a branch to maximise its output and checks it).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

__all__ = ["bound_branch", "branch_bound", "is_bounded", "NORMALIZE_CHOICES"]

NORMALIZE_CHOICES = ("spectral", "none")
_BOUNDABLE = (nn.Linear, nn.Conv2d)

#: activations with |act(z)| <= |z| entrywise, so they never enlarge a norm
_SHRINKING = (nn.SiLU, nn.ReLU, nn.GELU, nn.Tanh, nn.Identity, nn.Hardtanh, nn.Softsign, nn.Mish)


class _Scale(nn.Module):
    """Parametrisation ``w -> c w`` with a fixed ``c``."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.c


class _UnitBall(nn.Module):
    """Parametrisation ``b -> b / max(1, ||b||)``: the projection onto the unit ball."""

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return b / b.norm().clamp(min=1.0)


def bound_branch(branch: nn.Module) -> nn.Module:
    """Spectral-normalise every ``nn.Linear`` of ``branch`` and bound its bias (in place).

    Args:
        branch: a non-equivariant branch made of ``nn.Linear`` layers and shrinking activations
            (see the module docstring); containers and parameter-free modules are fine (a branch without
            parameters is a fixed function whose scale nothing can grow: it is left as it is).

    Returns:
        ``branch`` itself.

    Raises:
        ValueError: if ``branch`` holds a module with parameters other than ``nn.Linear`` (its scale
            could not be bounded), an activation that may enlarge a norm, or is already bounded.
    """
    if is_bounded(branch):
        raise ValueError(f"{type(branch).__name__} is already bounded")
    for name, m in branch.named_modules():
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.padding_mode == "zeros"):
            continue
        if isinstance(m, nn.LeakyReLU) and m.negative_slope <= 1:
            continue
        own = list(m.parameters(recurse=False))
        is_activation = type(m).__module__.startswith("torch.nn.modules.activation")
        if own or (is_activation and not isinstance(m, _SHRINKING)):
            raise ValueError(
                f"cannot bound branch module {name or '<root>'!r} ({type(m).__name__}): only nn.Linear, "
                "nn.Conv2d (zero padding) and activations with |act(z)| <= |z| have a known scale; use "
                "relax(normalize='none') or bound that module yourself"
            )
    for m in [m for m in branch.modules() if isinstance(m, _BOUNDABLE)]:  # none: a fixed function, bounded
        spectral_norm(m, "weight", n_power_iterations=1)
        if isinstance(m, nn.Conv2d):  # a pixel enters at most k_h k_w patches
            parametrize.register_parametrization(m, "weight", _Scale(1 / math.sqrt(math.prod(m.kernel_size))))
        if m.bias is not None:
            parametrize.register_parametrization(m, "bias", _UnitBall())
    return branch


def is_bounded(branch: nn.Module) -> bool:
    """Whether :func:`bound_branch` was applied to ``branch``."""
    return any(
        isinstance(m, _BOUNDABLE) and parametrize.is_parametrized(m, "weight") for m in branch.modules()
    )


def branch_bound(branch: nn.Module) -> int:
    """C of ``||f_neq(x)|| <= C (1 + ||x||)`` for a bounded branch: its number of linear (and convolution)
    layers; a convolution's bias term grows with the square root of the pixels (see the module docstring).

    Valid for a chain of linear layers and shrinking activations (the branches this package builds).
    """
    if not is_bounded(branch):
        raise ValueError(f"{type(branch).__name__} is not bounded: call bound_branch first")
    return sum(isinstance(m, _BOUNDABLE) for m in branch.modules())
