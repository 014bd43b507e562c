r"""Toy task: a planar vector field with rotation symmetry, small enough to train in seconds on a CPU.

Data: points ``x ~ N(0, I_2)`` and targets

$$
y = \cos(|x|)\, x + \tfrac12 \sin(2|x|)\, J x + \beta\, e_1 + \sigma\, \xi, \qquad
J = \begin{pmatrix} 0 & -1 \\ 1 & 0 \end{pmatrix},
$$

which is exactly SO(2)-equivariant (``y(Rx) = R y(x)``) for ``beta = 0`` (``data.breaking``); a
constant field ``beta e_1`` breaks the symmetry in proportion to beta (partially symmetric data).

Models (``model.name``):

* ``mlp``: a plain MLP, not equivariant: train it with a deviation constraint (``constraint.kind:
  deviation``);
* ``equivariant``: :class:`RadialVectorNet`, exactly SO(2)-equivariant, whose layers ``ace.relax``
  gates with :class:`VectorBranch` MLPs (``constraint.kind: gate`` or ``deviation``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ace.config.schema import check_positive_ints, opt
from ace.tasks.base import Task

__all__ = [
    "DataConfig",
    "ModelConfig",
    "RadialVectorLayer",
    "RadialVectorNet",
    "VectorBranch",
    "build",
    "target",
]


@dataclass
class DataConfig:
    train_size: int = opt(1024, "training points")
    val_size: int = opt(256, "validation points")
    test_size: int = opt(256, "test points")
    group: str = opt("so2", "symmetry measured by the deviation: 'so2' or 'cN' (cyclic, e.g. 'c4')")
    breaking: float = opt(0.0, "strength beta of the constant field that breaks the symmetry (0 = symmetric)")
    noise: float = opt(0.05, "standard deviation of the target noise")

    def __post_init__(self) -> None:
        check_positive_ints("data", self, "train_size", "val_size", "test_size")
        if not re.fullmatch(r"so2|c[1-9][0-9]*", self.group):
            raise ValueError(f"data.group: expected 'so2' or 'cN' such as 'c4', got {self.group!r}")
        if not self.noise >= 0:
            raise ValueError(f"data.noise: must be >= 0, got {self.noise!r}")


@dataclass
class ModelConfig:
    name: str = opt(
        "mlp",
        "'mlp' (plain MLP) or 'equivariant' (RadialVectorNet, relaxable)",
        choices=("mlp", "equivariant"),
    )
    hidden: int = opt(64, "hidden width")
    layers: int = opt(2, "hidden layers (mlp) or vector layers (equivariant)")
    channels: int = opt(8, "vector channels between equivariant layers")

    def __post_init__(self) -> None:
        check_positive_ints("model", self, "hidden", "layers", "channels")


def target(x: torch.Tensor, breaking: float = 0.0) -> torch.Tensor:
    """The noiseless field y(x) for points ``x`` of shape (N, 2)."""
    r = x.norm(dim=-1, keepdim=True)
    jx = torch.stack([-x[..., 1], x[..., 0]], dim=-1)
    offset = torch.tensor([breaking, 0.0], dtype=x.dtype, device=x.device)
    return torch.cos(r) * x + 0.5 * torch.sin(2 * r) * jx + offset


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class RadialVectorLayer(nn.Module):
    r"""SO(2)-equivariant map between stacks of planar vectors.

    $$
    v'_o = \sum_c a_{oc}(|v|)\, v_c + b_{oc}(|v|)\, J v_c
    $$

    with ``a, b`` an MLP of the invariant norms ``|v_1|..|v_C|``; ``J`` commutes with rotations.
    Shapes: (B, C_in, 2) -> (B, C_out, 2).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.coefficients = mlp([in_channels, hidden, 2 * out_channels * in_channels])

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        ab = self.coefficients(v.norm(dim=-1)).view(-1, 2, self.out_channels, self.in_channels)
        jv = torch.stack([-v[..., 1], v[..., 0]], dim=-1)
        return torch.einsum("boc,bcd->bod", ab[:, 0], v) + torch.einsum("boc,bcd->bod", ab[:, 1], jv)


class RadialVectorNet(nn.Module):
    """Stack of :class:`RadialVectorLayer`: (B, 2) -> (B, 2), exactly SO(2)- (hence C_n-) equivariant."""

    def __init__(self, hidden: int = 64, layers: int = 2, channels: int = 8):
        super().__init__()
        sizes = [1] + [channels] * (layers - 1) + [1]
        self.layers = nn.ModuleList(RadialVectorLayer(a, b, hidden) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.unsqueeze(1)
        for layer in self.layers:
            v = layer(v)
        return v.squeeze(1)


class VectorBranch(nn.Module):
    """Non-equivariant branch f_neq for a :class:`RadialVectorLayer`: an MLP on the flattened vectors."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int):
        super().__init__()
        self.out_channels = out_channels
        self.net = mlp([2 * in_channels, hidden, 2 * out_channels])

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.net(v.flatten(1)).view(-1, self.out_channels, 2)


def _points(n: int, breaking: float, noise: float, generator: torch.Generator) -> TensorDataset:
    x = torch.randn(n, 2, generator=generator)
    y = target(x, breaking) + noise * torch.randn(n, 2, generator=generator)
    return TensorDataset(x, y)


def build(data: DataConfig, model: ModelConfig, seed: int) -> Task:
    from ace.symmetry.action import Symmetry
    from ace.symmetry.groups import SO2, Cyclic

    generator = torch.Generator().manual_seed(seed)
    splits = [
        _points(n, data.breaking, data.noise, generator)
        for n in (data.train_size, data.val_size, data.test_size)
    ]
    torch.manual_seed(seed)
    group = SO2() if data.group == "so2" else Cyclic(int(data.group[1:]))
    if model.name == "mlp":
        net: nn.Module = mlp([2] + [model.hidden] * model.layers + [2])
        where = branch = None
    else:
        net = RadialVectorNet(model.hidden, model.layers, model.channels)

        def where(name: str, module: nn.Module) -> bool:
            return isinstance(module, RadialVectorLayer)

        def branch(name: str, module: nn.Module) -> nn.Module:
            assert isinstance(module, RadialVectorLayer), "where selects the RadialVectorLayers"
            return VectorBranch(module.in_channels, module.out_channels, model.hidden)

    return Task(
        train=splits[0],
        val=splits[1],
        test=splits[2],
        model=net,
        symmetry=Symmetry(group, inputs="vector", output="vector"),
        loss=nn.functional.mse_loss,
        metrics={"mse": nn.functional.mse_loss},
        relax_where=where,
        relax_branch=branch,
        example=splits[0].tensors[0][:4],
        layer_symmetries=(  # each radial layer maps a stack of planar vectors to another
            {f"layers.{i}": Symmetry(group, inputs="vector", output="vector") for i in range(model.layers)}
            if model.name != "mlp"
            else None
        ),
    )
