"""An SO(3)-invariant point-cloud classifier built from e3nn gated point convolutions.

Each layer is a point convolution on a k-nearest-neighbour graph (built with ``torch.cdist`` and
``topk``, so neither torch-cluster nor pyg-lib is needed):

    m_i = (1/|N(i)|) sum_{j in N(i)} TP(x_j, Y(r_ij); R(|r_ij|)),      r_ij = p_j - p_i
    x_i' = Gate(W_self x_i + W_msg m_i)

with ``Y`` the spherical harmonics up to ``lmax``, ``R`` a radial MLP that gives the weights of the
channel-wise ("uvu") tensor product ``TP``, and ``Gate`` the e3nn gate non-linearity (scalars
through SiLU / tanh, higher orders multiplied by sigmoid gates). The scalar channels of the last
layer (even ``0e`` and odd ``0o``, both invariant under rotations) are mean- and max-pooled per
cloud and mapped to class logits by an MLP. Every step commutes with rotations, so the logits are
exactly SO(3)-invariant (and translation-invariant: only differences of positions enter). The
pseudo-scalars ``0o`` change sign under reflections, so the model can tell a shape from its mirror
image (a left- from a right-handed helix): it is SO(3)- but not O(3)-invariant.

:class:`PointBranch` is the non-equivariant branch ``f_neq`` that ``ace.relax`` adds to a layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from e3nn import o3
from e3nn.math import soft_one_hot_linspace
from e3nn.nn import FullyConnectedNet, Gate
from torch import Tensor, nn
from torch_geometric.utils import scatter, to_dense_batch

from ace.config.schema import opt

# Odd scalars need odd activations for the gate to stay equivariant under parity.
_SCALAR_ACT = {1: nn.functional.silu, -1: torch.tanh}


def knn_edges(pos: Tensor, batch: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Directed k-nearest-neighbour edges within each cloud of a batch.

    Args:
        pos: ``(N, 3)`` point coordinates.
        batch: ``(N,)`` sorted cloud index of each point.
        k: neighbours per point (fewer if a cloud has at most ``k`` points).

    Returns:
        ``(src, dst)``, each ``(E,)``: point ``dst`` receives a message from its neighbour ``src``;
        no self loops, never across clouds.
    """
    dense, mask = to_dense_batch(pos, batch)  # (B, n, 3), (B, n)
    n = dense.shape[1]
    k = min(k, n - 1)
    with torch.no_grad():  # only the indices are needed; gradients flow through pos[src] - pos[dst]
        dist = torch.cdist(dense, dense)
        eye = torch.eye(n, dtype=torch.bool, device=pos.device)
        invalid = ~(mask[:, :, None] & mask[:, None, :]) | eye
        near, idx = dist.masked_fill(invalid, float("inf")).topk(k, dim=-1, largest=False)
    offset = (mask.sum(1).cumsum(0) - mask.sum(1))[:, None, None]  # first node of each cloud
    dst = (offset + torch.arange(n, device=pos.device)[None, :, None]).expand(-1, -1, k)
    src = offset + idx
    keep = near.isfinite()  # drops padded rows and missing neighbours of tiny clouds
    return src[keep], dst[keep]


class PointConv(nn.Module):
    """Gated point convolution ``x_i' = Gate(W_self x_i + W_msg mean_j TP(x_j, Y(r_ij); R(|r_ij|)))``.

    Args:
        irreps_in: irreps of the input point features.
        irreps_hidden: irreps of the output before gating, e.g. ``"16x0e+8x0o+8x1o+8x1e"``;
            scalars pass through SiLU (``0e``) or tanh (``0o``), each higher-order irrep is
            multiplied by its own sigmoid gate.
        irreps_sh: irreps of the spherical-harmonic edge features.
        num_basis: radial basis functions.
        radial_hidden: width of the radial MLP that outputs the tensor-product weights.

    Shapes:
        forward(x ``(N, irreps_in.dim)``, pos ``(N, 3)``, src ``(E,)``, dst ``(E,)``,
        edge_sh ``(E, irreps_sh.dim)``, edge_emb ``(E, num_basis)``) -> ``(N, irreps_out.dim)``.
    """

    def __init__(
        self, irreps_in: str, irreps_hidden: str, irreps_sh: str, num_basis: int, radial_hidden: int
    ) -> None:
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        hidden = o3.Irreps(irreps_hidden).simplify()
        scalars = o3.Irreps([(mul, ir) for mul, ir in hidden if ir.l == 0])
        gated = o3.Irreps([(mul, ir) for mul, ir in hidden if ir.l > 0])
        self.gate = Gate(
            scalars,
            [_SCALAR_ACT[ir.p] for _, ir in scalars],
            f"{gated.num_irreps}x0e" if gated else "",
            [torch.sigmoid] if gated else [],
            gated,
        )
        self.irreps_out = self.gate.irreps_out
        target = self.gate.irreps_in
        sh = o3.Irreps(irreps_sh)
        mid: list[tuple[int, Any]] = []
        instructions: list[tuple[int, int, int, str, bool]] = []
        for i, (mul, ir_in) in enumerate(self.irreps_in):
            for j, (_, ir_sh) in enumerate(sh):
                for ir_out in ir_in * ir_sh:
                    if ir_out in target:
                        instructions.append((i, j, len(mid), "uvu", True))
                        mid.append((mul, ir_out))
        self.tp = o3.TensorProduct(
            self.irreps_in,
            irreps_sh,
            o3.Irreps(mid),
            instructions,
            shared_weights=False,
            internal_weights=False,
        )
        self.radial = FullyConnectedNet([num_basis, radial_hidden, self.tp.weight_numel], nn.functional.silu)
        self.lin_msg = o3.Linear(self.tp.irreps_out, target)
        self.lin_self = o3.Linear(self.irreps_in, target)

    def forward(
        self, x: Tensor, pos: Tensor, src: Tensor, dst: Tensor, edge_sh: Tensor, edge_emb: Tensor
    ) -> Tensor:
        messages = self.tp(x[src], edge_sh, self.radial(edge_emb))
        mean = scatter(messages, dst, dim=0, dim_size=x.shape[0], reduce="mean")
        return self.gate(self.lin_self(x) + self.lin_msg(mean))


class PointBranch(nn.Module):
    """Non-equivariant branch ``f_neq(x, pos) = MLP([x_i, p_i])`` for a :class:`PointConv`.

    It treats the irreps features and the raw coordinates of each point as plain numbers, so it
    is not equivariant; it accepts (and ignores) the graph arguments of the layer it relaxes.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim + 3, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))

    def forward(self, x: Tensor, pos: Tensor, *graph: Tensor) -> Tensor:
        return self.mlp(torch.cat([x, pos], dim=-1))


@dataclass
class ModelConfig:
    """The e3nn point-cloud classifier (shared by the ``shapes`` and ``modelnet40`` tasks)."""

    hidden_irreps: str = opt("16x0e+8x0o+8x1o+8x1e", "irreps of each layer's features before gating")
    num_layers: int = opt(3, "number of gated point convolutions")
    lmax: int = opt(2, "highest order of the spherical-harmonic edge features")
    num_neighbors: int = opt(8, "k of the k-nearest-neighbour graph")
    max_radius: float = opt(1.0, "radius where the radial basis ends (data units)")
    num_basis: int = opt(8, "radial basis functions")
    radial_hidden: int = opt(32, "width of the radial MLP")
    readout_hidden: int = opt(64, "width of the MLP from pooled scalars to logits")
    branch_hidden: int = opt(64, "width of the relaxation branch MLP f_neq")

    def __post_init__(self) -> None:
        o3.Irreps(self.hidden_irreps)  # fails with e3nn's message on a malformed string
        for key in (
            "num_layers",
            "num_neighbors",
            "num_basis",
            "radial_hidden",
            "readout_hidden",
            "branch_hidden",
        ):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be > 0, got {getattr(self, key)}")
        if self.lmax < 0:
            raise ValueError(f"model.lmax must be >= 0, got {self.lmax}")
        if self.max_radius <= 0:
            raise ValueError(f"model.max_radius must be > 0, got {self.max_radius}")
        if not any(ir.l == 0 for _, ir in o3.Irreps(self.hidden_irreps)):
            raise ValueError(
                f"model.hidden_irreps needs scalars (0e or 0o) for the readout: {self.hidden_irreps}"
            )


class PointCloudClassifier(nn.Module):
    """SO(3)-invariant classifier: gated point convolutions, pooled scalars, MLP to logits.

    Shapes:
        forward(data) with ``data.pos`` ``(N, 3)`` and ``data.batch`` ``(N,)`` (``None`` for one
        cloud) -> logits ``(num_graphs, num_classes)``.
    """

    def __init__(self, num_classes: int, config: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = config or ModelConfig()
        self.num_neighbors, self.max_radius, self.num_basis = cfg.num_neighbors, cfg.max_radius, cfg.num_basis
        self.irreps_sh = o3.Irreps.spherical_harmonics(cfg.lmax)
        irreps, layers = o3.Irreps("0e"), []  # every point starts with the constant scalar 1
        for _ in range(cfg.num_layers):
            layers.append(
                PointConv(irreps, cfg.hidden_irreps, self.irreps_sh, cfg.num_basis, cfg.radial_hidden)
            )
            irreps = layers[-1].irreps_out
        self.layers = nn.ModuleList(layers)
        self.scalar_index = torch.cat(
            [torch.arange(s.start, s.stop) for (_, ir), s in zip(irreps, irreps.slices()) if ir.l == 0]
        ).tolist()
        width = 2 * len(self.scalar_index)  # mean- and max-pooled
        self.readout = nn.Sequential(
            nn.Linear(width, cfg.readout_hidden), nn.SiLU(), nn.Linear(cfg.readout_hidden, num_classes)
        )

    def forward(self, data) -> Tensor:
        pos = data.pos
        batch = data.batch if data.batch is not None else pos.new_zeros(len(pos), dtype=torch.long)
        num_graphs = getattr(data, "num_graphs", None) or int(batch.max()) + 1
        src, dst = knn_edges(pos, batch, self.num_neighbors)
        vec = pos[src] - pos[dst]
        edge_sh = o3.spherical_harmonics(self.irreps_sh, vec, normalize=True, normalization="component")
        edge_emb = soft_one_hot_linspace(
            vec.norm(dim=-1), 0.0, self.max_radius, self.num_basis, basis="smooth_finite", cutoff=True
        ).mul(self.num_basis**0.5)
        x = pos.new_ones(len(pos), 1)
        for layer in self.layers:
            x = layer(x, pos, src, dst, edge_sh, edge_emb)
        s = x[:, self.scalar_index]
        pooled = torch.cat(
            [scatter(s, batch, 0, num_graphs, reduce="mean"), scatter(s, batch, 0, num_graphs, reduce="max")],
            dim=-1,
        )
        return self.readout(pooled)


def is_conv(name: str, module: nn.Module) -> bool:
    """``relax_where`` of the point-cloud tasks: gate every :class:`PointConv`."""
    return isinstance(module, PointConv)


def branch_factory(hidden: int):
    """``relax_branch`` of the point-cloud tasks: a :class:`PointBranch` sized to the layer."""

    def make(name: str, module: nn.Module) -> nn.Module:
        assert isinstance(module, PointConv), "is_conv selects the PointConv layers"
        return PointBranch(module.irreps_in.dim, module.irreps_out.dim, hidden)

    return make
