"""A model the package has never seen: an O(3)-invariant polynomial as e3nn's tetris example writes it.

Two ``FullyConnectedTensorProduct``\\ s of spherical harmonics on a torch_geometric batch, a sum over
neighbours and over nodes; the output ``0o + 6x0e`` tells the 8 tetris shapes apart (the pseudoscalar the two
chiral ones). Neighbours within 1.1 are found with ``torch.cdist`` (no torch-cluster here).
"""

from __future__ import annotations

import torch
from e3nn import o3
from torch import nn
from torch_geometric.data import Batch, Data

SHAPES = [
    [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 1, 0)],  # chiral 1
    [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, -1, 0)],  # chiral 2
    [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)],  # square
    [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3)],  # line
    [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0)],  # corner
    [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0)],  # L
    [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 1)],  # T
    [(0, 0, 0), (1, 0, 0), (1, 1, 0), (2, 1, 0)],  # zigzag
]
LABELS = torch.tensor(
    [[1, 0, 0, 0, 0, 0, 0], [-1, 0, 0, 0, 0, 0, 0]]
    + [[0] + [int(i == j) for i in range(6)] for j in range(6)],
    dtype=torch.get_default_dtype(),
)


def tetris(rotate: torch.Generator | None = None) -> Batch:
    """The 8 shapes as one batch (``pos``, ``y`` of shape (8, 7)), each randomly rotated if ``rotate``."""
    graphs = []
    for shape, label in zip(SHAPES, LABELS, strict=True):
        pos = torch.tensor(shape, dtype=torch.get_default_dtype())
        if rotate is not None:
            q, r = torch.linalg.qr(torch.randn(3, 3, generator=rotate))
            q = q * torch.sign(torch.diagonal(r))
            pos = pos @ (q * torch.det(q)).T  # a rotation
        graphs.append(Data(pos=pos, y=label[None]))
    return Batch.from_data_list(graphs)


def scatter_sum(src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    return src.new_zeros(size, *src.shape[1:]).index_add_(0, index, src)


class Polynomial(nn.Module):
    """e3nn's ``InvariantPolynomial`` of the tetris example, with spherical harmonics up to l = 3."""

    def __init__(self) -> None:
        super().__init__()
        self.irreps_sh = o3.Irreps.spherical_harmonics(3)
        irreps_mid = o3.Irreps("64x0e + 24x1e + 24x1o + 16x2e + 16x2o")
        self.tp1 = o3.FullyConnectedTensorProduct(self.irreps_sh, self.irreps_sh, irreps_mid)
        self.tp2 = o3.FullyConnectedTensorProduct(irreps_mid, self.irreps_sh, o3.Irreps("0o + 6x0e"))

    def forward(self, data: Batch) -> torch.Tensor:
        pos, batch = data.pos, data.batch
        same = batch[:, None] == batch[None, :]
        close = (
            (torch.cdist(pos, pos) < 1.1) & same & ~torch.eye(len(pos), dtype=torch.bool, device=pos.device)
        )
        dst, src = close.nonzero(as_tuple=True)
        sh = o3.spherical_harmonics(
            self.irreps_sh, pos[src] - pos[dst], normalize=False, normalization="component"
        )
        n, norm = len(pos), 2**0.5  # about two neighbours a node
        nodes = scatter_sum(sh, dst, n) / norm
        nodes = scatter_sum(self.tp1(nodes[src], sh), dst, n) / norm
        nodes = scatter_sum(self.tp2(nodes[src], sh), dst, n) / norm
        return scatter_sum(nodes, batch, int(batch.max()) + 1) / 2  # sqrt(4 nodes)
