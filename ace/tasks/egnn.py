"""E(n)-equivariant graph neural network (EGNN, Satorras et al. 2021) as torch_geometric layers.

The variant is the paper's N-body model "EGNN-vel" (eq. 7), as in the public code (``E_GCL_vel``,
``main_nbody.py``): every layer receives the *input* velocities ``v_i``, which are never updated between
layers. The paper writes the layer through an intermediate velocity,

    v_i^{l+1} = phi_v(h_i^l) v_i + C sum_j (x_i^l - x_j^l) phi_x(m_ij),     x_i^{l+1} = x_i^l + v_i^{l+1},

but ``v^{l+1}`` feeds nothing except ``x^{l+1}``, so both read as the one coordinate update below.
Layer ``l`` on a graph with edges ``j -> i``:

    m_ij      = phi_e(h_i, h_j, |x_i - x_j|^2, a_ij)
    x_i'      = x_i + 1/deg(i) sum_j (x_i - x_j) phi_x(m_ij) + phi_v(h_i) v_i
    h_i'      = h_i + phi_h(h_i, sum_j m_ij)

with SiLU MLPs, the last layer of ``phi_x`` initialised with gain 0.001 (as in the public code), and
``deg(i)`` the in-degree (the mean, i.e. ``C = 1 / (M - 1)`` on the fully connected graph). The model
embeds ``h_i = W |v_i| + b`` and uses edge attributes ``a_ij = (q_i q_j, |x_i - x_j|^2)`` from the input
frame. The public code also clamps each coordinate message component to +-100; that is not
rotation-equivariant and is left out. Output: the predicted positions ``x^L``.

Since ``|x_i - x_j|``, ``|v_i|``, ``q_i q_j`` are E(3)-invariant and ``x_i - x_j``, ``v_i`` transform as
vectors, ``x^L`` is E(3)-equivariant (rotations, reflections, translations) and permutation-equivariant.

:class:`EGNNBranch` is the non-equivariant relaxation ``f_neq`` of a layer for ``ace.relax``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import degree

__all__ = ["EGNNLayer", "EGNN", "EGNNBranch"]


def _mlp(*sizes: int) -> nn.Sequential:
    """Linear layers of the given sizes with SiLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    return nn.Sequential(*layers[:-1])


class EGNNLayer(MessagePassing):
    """One EGNN-vel layer: ``(h, x) -> (h', x')`` (formulas in the module docstring).

    Args:
        hidden: width of ``h`` and of the messages ``m_ij``.
        edge_dim: number of edge attributes ``a_ij``.

    Shapes:
        h ``(N, hidden)``, pos and vel ``(N, 3)``, edge_index ``(2, E)``, edge_attr ``(E, edge_dim)``
        -> ``(h', pos')`` of shapes ``(N, hidden)`` and ``(N, 3)``.
    """

    def __init__(self, hidden: int = 64, edge_dim: int = 2) -> None:
        super().__init__(aggr="add")
        self.hidden = hidden
        self.edge_mlp = nn.Sequential(_mlp(2 * hidden + 1 + edge_dim, hidden, hidden), nn.SiLU())
        self.node_mlp = _mlp(2 * hidden, hidden, hidden)
        first, last = (
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, 1, bias=False),
        )  # in this order: seeded init
        self.coord_mlp = nn.Sequential(first, nn.SiLU(), last)
        nn.init.xavier_uniform_(last.weight, gain=0.001)
        self.vel_mlp = _mlp(hidden, hidden, 1)

    def forward(
        self,
        h: Tensor,
        pos: Tensor,
        vel: Tensor,
        edge_index: Tensor,
        edge_attr: Tensor,
        charge: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        # ``charge`` is unused here (charges enter EGNN-vel only through a_ij); it is an argument so that
        # the relaxation branch, called with the layer's arguments, can see each particle's own charge.
        # one pass aggregates [m_ij, (x_i - x_j) phi_x(m_ij)] by sum; the coordinate part becomes a mean
        out = self.propagate(edge_index, h=h, pos=pos, edge_attr=edge_attr)
        m, shift = out.split([self.hidden, pos.size(-1)], dim=-1)
        deg = degree(edge_index[1], h.size(0), dtype=pos.dtype).clamp(min=1).unsqueeze(-1)
        pos = pos + shift / deg + self.vel_mlp(h) * vel
        h = h + self.node_mlp(torch.cat([h, m], dim=-1))
        return h, pos

    def message(self, h_i: Tensor, h_j: Tensor, pos_i: Tensor, pos_j: Tensor, edge_attr: Tensor) -> Tensor:
        diff = pos_i - pos_j
        m = self.edge_mlp(torch.cat([h_i, h_j, diff.square().sum(-1, keepdim=True), edge_attr], dim=-1))
        return torch.cat([m, diff * self.coord_mlp(m)], dim=-1)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(hidden={self.hidden})"


class EGNN(nn.Module):
    """EGNN-vel for the charged N-body task: a stack of :class:`EGNNLayer` on each system's graph.

    Args:
        layers: number of EGNN layers (the paper uses 4).
        hidden: feature width (the paper uses 64).

    Forward takes a torch_geometric ``Data``/``Batch`` with ``pos (N, 3)``, ``vel (N, 3)``,
    ``charge (N, 1)`` and ``edge_index (2, E)`` (fully connected within each system) and returns the
    predicted positions ``(N, 3)``.
    """

    def __init__(self, layers: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.embedding = nn.Linear(1, hidden)
        self.layers = nn.ModuleList(EGNNLayer(hidden) for _ in range(layers))

    def forward(self, data) -> Tensor:
        pos, vel, charge, edge_index = data.pos, data.vel, data.charge, data.edge_index
        src, dst = edge_index
        sq_dist = (pos[dst] - pos[src]).square().sum(-1, keepdim=True)
        edge_attr = torch.cat([charge[dst] * charge[src], sq_dist], dim=-1)
        h = self.embedding(vel.norm(dim=-1, keepdim=True))
        for layer in self.layers:
            h, pos = layer(h, pos, vel, edge_index, edge_attr, charge)
        return pos


class EGNNBranch(nn.Module):
    """Non-equivariant relaxation of an :class:`EGNNLayer`, node-wise on raw coordinates.

        (dh_i, dx_i) = MLP([h_i, x_i, v_i, q_i])

    It sees absolute positions and velocity components, so it breaks rotations, reflections and
    translations (not permutations); ``ace.relax`` adds it gated, ``(h', x') + gamma (dh, dx)``. It also
    sees the particle's own charge ``q_i`` (0 when not given), which the EGNN only sees through the
    products ``q_i q_j``: a uniform field pushes each particle by ``q_i E``, which needs the sign of ``q_i``.

    Args:
        hidden: width of ``h`` in the relaxed layer.
        width: hidden width of the MLP.
        dim: spatial dimension.
    """

    def __init__(self, hidden: int = 64, width: int = 64, dim: int = 3) -> None:
        super().__init__()
        self.hidden, self.dim = hidden, dim
        self.mlp = _mlp(hidden + 2 * dim + 1, width, width, hidden + dim)

    def forward(
        self,
        h: Tensor,
        pos: Tensor,
        vel: Tensor,
        edge_index: Tensor | None = None,
        edge_attr: Tensor | None = None,
        charge: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        if charge is None:
            charge = pos.new_zeros(pos.size(0), 1)
        dh, dpos = self.mlp(torch.cat([h, pos, vel, charge.to(pos.dtype)], dim=-1)).split(
            [self.hidden, self.dim], dim=-1
        )
        return dh, dpos
