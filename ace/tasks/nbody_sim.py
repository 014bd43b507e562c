"""Charged-particle N-body simulator (Kipf et al. 2018, in 3-D as in Fuchs et al. 2020 and EGNN).

What is implemented, following ``ChargedParticlesSim`` and ``generate_dataset.py`` of the public EGNN
code (vgsatorras/egnn, ``n_body_system/dataset``) and its loader (``dataset_nbody.py``, "nbody_small"):

* ``n`` particles (default 5) of unit mass with charges ``q_i`` drawn from {-1, +1} with probability 1/2
  each; positions ``x_i ~ N(0, s^2 I_3)`` with ``s = loc_std * (n / 5)^(1/3)`` (loc_std = 1); velocities of
  uniformly random direction and norm exactly ``vel_norm`` (0.5). No box.
* Coulomb-like forces, like charges repel, plus the optional uniform external field ``E`` along z:

      F_i = k sum_{j != i} q_i q_j (x_i - x_j) / |x_i - x_j|^3  +  q_i E e_z,      k = interaction_strength.

* Symplectic Euler (the EGNN code's "leapfrog", a kick followed by a drift) with step ``delta_t`` = 1e-3:

      v_s = v_{s-1} + delta_t F(x_{s-1}),      x_s = x_{s-1} + delta_t v_s,      s = 1, 2, ...

  so the stored velocity ``v_s`` is the one that moved the particles from ``x_{s-1}`` to ``x_s``.
* Frame ``f`` (0-based) is the state after ``(f + 1) * sample_freq`` steps, as in the EGNN arrays (their
  frame 0 overwrites the initial state). The loader takes input = (x, v, q) at frame 30 and target =
  x at frame 40 with sample_freq = 100: steps 3100 -> 4100, i.e. 1000 steps (time 1.0) ahead.
* The conserved energy (with ``delta_t``-sized oscillations, see ``energy``) is

      H = 1/2 sum_i |v_i|^2 + k sum_{i<j} q_i q_j / |x_i - x_j|  -  E sum_i q_i z_i.

Deviations from the EGNN code, all deliberate:

* By default the force on each particle is clipped in norm, ``F_i <- F_i min(1, max_force / |F_i|)``,
  not per Cartesian component as in the original (``F_ic <- clamp(F_ic, -max_force, max_force)``, with
  ``max_force = 0.1 / delta_t = 100``): per-component clipping is not rotation-equivariant, and the
  symmetric data must be exactly symmetric. ``clip="component"`` gives the original rule. Both only act
  in close encounters (``|F| > 100`` needs ``|x_i - x_j| < 0.1`` for unit charges).
* The original reflects initial positions beyond +-5 (its unused box) once at t = 0; that breaks
  translation symmetry and almost never triggers (a 5-sigma event), so it is left out.
* Random numbers come from a seeded ``torch.Generator`` in float64, so the samples follow the same
  distribution as the EGNN files but are not bit-identical to them.
* ``field_strength`` (the uniform field) is our addition; 0 gives the original, E(3)-symmetric system.

A property of the protocol worth knowing: opposite charges often fall onto each other. Within the
4100 simulated steps about 40% of trajectories bring a pair closer than 0.1 (where the clipping
acts) and more than half closer than 0.2; ``delta_t = 1e-3`` does not resolve those encounters and the
energy jumps there. Elsewhere ``H`` below is conserved to ~1e-3 relative (median; at most 2e-2,
see tests/tasks/test_nbody.py).
As a check against the published numbers, the best constant-velocity extrapolation
``x + t v`` (fitted ``t ~ 0.69``) has test MSE 0.088 on our data; EGNN reports 0.0819 for its
"Linear" baseline on theirs.

Everything is vectorised over trajectories; internally states are stored coordinate-major
``(3, n, B)`` so that each operation runs over the long trajectory axis.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["simulate", "sample_initial_state", "energy"]


def sample_initial_state(
    num: int,
    num_particles: int = 5,
    loc_std: float = 1.0,
    vel_norm: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw ``num`` initial states of the EGNN charged-particle protocol.

    Returns:
        ``(pos, vel, charge)`` in float64 with shapes ``(num, n, 3)``, ``(num, n, 3)``, ``(num, n, 1)``.
    """
    kw: dict[str, Any] = {"generator": generator, "dtype": torch.float64}
    charge = torch.randint(0, 2, (num, num_particles, 1), generator=generator).double() * 2 - 1
    pos = torch.randn(num, num_particles, 3, **kw) * (loc_std * (num_particles / 5) ** (1 / 3))
    vel = torch.randn(num, num_particles, 3, **kw)
    vel = vel * (vel_norm / vel.norm(dim=-1, keepdim=True))
    return pos, vel, charge


def _incidence(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(n, pairs)`` matrix with +1 at ``i`` and -1 at ``j`` in the column of each pair ``i < j``.

    Its transpose maps positions to pair differences ``x_i - x_j``; itself scatters pair forces
    back onto the particles (``+f`` on ``i``, ``-f`` on ``j``). As matmuls over the long trajectory
    axis both beat indexing and ``index_add``.
    """
    i, j = torch.triu_indices(n, n, 1, device=device)
    pairs = torch.arange(i.numel(), device=device)
    incidence = torch.zeros(n, i.numel(), dtype=dtype, device=device)
    incidence[i, pairs], incidence[j, pairs] = 1.0, -1.0
    return incidence


def simulate(
    pos: Tensor,
    vel: Tensor,
    charge: Tensor,
    steps: int,
    sample_every: int = 1,
    delta_t: float = 1e-3,
    interaction_strength: float = 1.0,
    field_strength: float = 0.0,
    max_force: float | None = 100.0,
    clip: str = "norm",
) -> tuple[Tensor, Tensor]:
    """Integrate ``steps`` symplectic-Euler steps from the given states (see the module docstring).

    Args:
        pos, vel: ``(B, n, 3)`` initial positions and velocities.
        charge: ``(B, n, 1)`` or ``(B, n)`` charges.
        steps: number of integration steps.
        sample_every: record the state after every ``sample_every`` steps.
        delta_t: integration step.
        interaction_strength: Coulomb constant ``k``.
        field_strength: uniform external field ``E`` along z (force ``q E e_z``).
        max_force: clip each particle's force at this value; ``None`` disables clipping.
        clip: ``"norm"`` scales ``F_i`` down to norm ``max_force`` (rotation-equivariant); ``"component"``
            clamps each Cartesian component to ``[-max_force, max_force]`` (the EGNN generator's rule).

    Returns:
        ``(pos, vel)`` of shape ``(steps // sample_every, B, n, 3)``: frame ``f`` is the state after
        ``(f + 1) * sample_every`` steps.
    """
    if clip not in ("norm", "component"):
        raise ValueError(f"clip must be 'norm' or 'component', got {clip!r}")
    # coordinate-major (3, n, B): every op runs over the long trajectory axis
    x = pos.permute(2, 1, 0).contiguous()
    v = vel.permute(2, 1, 0).contiguous()
    q = charge.reshape(charge.shape[0], -1).T.contiguous()  # (n, B)
    i, j = torch.triu_indices(x.size(1), x.size(1), 1, device=x.device)
    pair_strength = interaction_strength * q[i] * q[j]  # (pairs, B), in the column order of _incidence
    incidence = _incidence(x.size(1), x.dtype, x.device)
    external = field_strength * q

    def force(x: Tensor) -> Tensor:
        d = incidence.T @ x  # (3, pairs, B): x_i - x_j
        f = incidence @ (d * (d.square().sum(0).pow(-1.5) * pair_strength))
        if field_strength:
            f[2] += external
        if max_force is not None and clip == "norm":
            f = f * (max_force / f.square().sum(0).sqrt()).clamp(max=1.0)
        elif max_force is not None:
            f = f.clamp(-max_force, max_force)
        return f

    frames_x, frames_v = [], []
    threads = torch.get_num_threads()
    # Thousands of small element-wise ops: thread hand-offs cost more than they save, and on a busy
    # machine spinning intra-op threads slow the loop down by an order of magnitude.
    torch.set_num_threads(1)
    try:
        for s in range(1, steps + 1):
            v.add_(force(x), alpha=delta_t)
            x.add_(v, alpha=delta_t)
            if s % sample_every == 0:
                frames_x.append(x.permute(2, 1, 0).clone())
                frames_v.append(v.permute(2, 1, 0).clone())
    finally:
        torch.set_num_threads(threads)
    return torch.stack(frames_x), torch.stack(frames_v)


def energy(
    pos: Tensor,
    vel: Tensor,
    charge: Tensor,
    interaction_strength: float = 1.0,
    field_strength: float = 0.0,
) -> Tensor:
    """Total energy ``H = 1/2 sum |v|^2 + k sum_{i<j} q_i q_j / r_ij - E sum q_i z_i`` per system.

    The simulator's stored velocity lags the positions by half a step, so ``H`` evaluated on stored
    states oscillates by ``O(delta_t |F| |v|)`` around a conserved value (exactly conserved: a modified
    energy of the symplectic integrator).

    Args:
        pos, vel: ``(..., n, 3)``; charge: ``(..., n, 1)``.

    Returns:
        ``(...)`` energies.
    """
    i, j = torch.triu_indices(pos.size(-2), pos.size(-2), 1, device=pos.device)
    q = charge[..., 0]
    r = (pos[..., i, :] - pos[..., j, :]).norm(dim=-1)
    potential = interaction_strength * (q[..., i] * q[..., j] / r).sum(-1)
    return 0.5 * vel.square().sum((-2, -1)) + potential - field_strength * (q * pos[..., 2]).sum(-1)
