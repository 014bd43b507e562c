"""Sign-equivariant and sign-invariant layers for eigenvector inputs (Lim et al., NeurIPS 2023).

Laplacian eigenvectors ``V`` (``(num_nodes, k)``, one column per eigenvector) are defined up to the sign of
each column: a model that reads them should not depend on the choice. With ``S = diag(s_1 .. s_k)``,
``s_j = +-1``:

* :class:`SignEquivariantGate`: ``V -> V * MLP(|V|)`` (entrywise), so ``f(V S) = f(V) S``;
* :class:`SignEquivariantMessage`: one message-passing step
  ``out_i = V_i * a(|V_i|) + sum_{j ~ i} V_j * b(V_i * V_j, |V_i|, |V_j|)``: the products ``V_i * V_j``
  and the norms are sign invariant, so each column keeps the sign of ``V``; it mixes nodes, which a
  sign-invariant network cannot do without losing the relative signs of two nodes (what link prediction
  needs);
* :class:`SignNet`: the sign-invariant baseline ``rho(phi(V) + phi(-V))`` (Lim et al. 2022),
  ``f(V S) = f(V)``.

Exact in float64 (``tests/nn/test_sign.py``). Use them with ``ace.Symmetry(ace.groups.SignFlip(k,
independent=True), inputs={"eig": "vector"}, output=...)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SignEquivariantGate", "SignEquivariantMessage", "SignNet"]


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    return nn.Sequential(*layers[:-1])


class SignEquivariantGate(nn.Module):
    """``V (N, k) -> V * MLP(|V|)``: each eigenvector scaled entrywise by a sign-invariant gate."""

    def __init__(self, k: int, hidden: int = 32):
        super().__init__()
        self.gate = _mlp([k, hidden, k])

    def forward(self, v: Tensor) -> Tensor:
        return v * self.gate(v.abs())


class SignEquivariantMessage(nn.Module):
    """One sign-equivariant message-passing step over ``edge_index`` (``(2, E)``, from row 0 to row 1)."""

    def __init__(self, k: int, hidden: int = 32):
        super().__init__()
        self.self_gate = _mlp([k, hidden, k])
        self.message = _mlp([3 * k, hidden, k])

    def forward(self, v: Tensor, edge_index: Tensor) -> Tensor:
        src, dst = edge_index
        invariant = torch.cat([v[src] * v[dst], v[src].abs(), v[dst].abs()], dim=-1)
        messages = v[src] * self.message(invariant)
        out = v * self.self_gate(v.abs())
        return out.index_add(0, dst, messages)


class SignNet(nn.Module):
    """``V (N, k) -> rho(phi(V) + phi(-V))`` with ``phi`` applied to each eigenvector column on its own:
    ``(N, out)`` node features, invariant to every column's sign."""

    def __init__(self, k: int, hidden: int = 32, out: int = 32):
        super().__init__()
        self.phi = _mlp([1, hidden, hidden])
        self.rho = _mlp([k * hidden, hidden, out])

    def forward(self, v: Tensor) -> Tensor:
        column = v.unsqueeze(-1)  # (N, k, 1)
        both = self.phi(column) + self.phi(-column)  # (N, k, hidden)
        return self.rho(both.flatten(1))
