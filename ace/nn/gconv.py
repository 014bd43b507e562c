"""Group convolutions on the square grid (Cohen & Welling 2016) and an E4-style block (He et al. 2021).

Feature maps are ``"image"`` fields ``(B, C, H, W)`` or ``"regular"`` fields ``(B, C, |G|, H, W)`` of a grid
group ``G`` (:class:`ace.groups.C4` for p4, :class:`ace.groups.D4` for p4m), see :mod:`ace.symmetry.groups`:

* :class:`LiftingConv`: image -> regular, ``out[h] = x * T_h w`` (one filter, seen in every pose);
* :class:`GroupConv`: regular -> regular, ``out[h] = sum_j f[j] * T_h w[h^-1 j]``;
* :class:`E4Block`: regular -> regular, a 1x1 group convolution generates a ``k x k`` kernel at every pixel
  and group element (shared by all channels), which is posed by its group element ``T_h`` and applied to the
  neighbourhood, then a 1x1 group convolution mixes channels; residual. The kernel generator makes the spatial
  filter depend on the input, as E4's, with ``k^2`` generated taps instead of ``C k^2`` learned ones;
* :class:`GroupPool`: regular -> image (max over the group axis); spatial pooling then gives invariants.

Every layer is exactly equivariant (rot90 and flips permute entries; ``tests/nn/test_gconv.py`` in float64).
:func:`cost` counts parameters and FLOPs (``torch.utils.flop_counter``) to set them beside a plain CNN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ace.symmetry.groups import GridGroup

__all__ = ["LiftingConv", "GroupConv", "E4Block", "GroupPool", "cost"]


def _check_kernel(kernel_size: int) -> None:
    if not (isinstance(kernel_size, int) and kernel_size >= 1 and kernel_size % 2 == 1):
        raise ValueError(f"kernel_size must be an odd integer >= 1 (a centred filter), got {kernel_size!r}")


def _grid_input(x: Tensor, kind: str, group: GridGroup, channels: int) -> None:
    shape = "(B, C, H, W)" if kind == "image" else f"(B, C, {group.order}, H, W)"
    dims = 4 if kind == "image" else 5
    if x.dim() != dims or x.shape[1] != channels or (kind == "regular" and x.shape[2] != group.order):
        raise ValueError(
            f"expected a {kind} field of shape {shape} with C = {channels} under {group!r}, "
            f"got {tuple(x.shape)}"
        )


class LiftingConv(nn.Module):
    """Image ``(B, C_in, H, W)`` -> regular ``(B, C_out, |G|, H, W)``: the filter in each of the |G| poses."""

    def __init__(
        self, group: GridGroup, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True
    ):
        super().__init__()
        _check_kernel(kernel_size)
        self.group, self.in_channels, self.out_channels = group, in_channels, out_channels
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        _grid_input(x, "image", self.group, self.in_channels)
        G, k = self.group.order, self.weight.shape[-1]
        kernel = torch.stack([self.group.spatial(i, self.weight) for i in range(G)], dim=1)
        out = F.conv2d(x, kernel.reshape(-1, self.in_channels, k, k), padding=k // 2)
        out = out.view(x.shape[0], self.out_channels, G, *out.shape[-2:])
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1, 1)


class GroupConv(nn.Module):
    """Regular ``(B, C_in, |G|, H, W)`` -> regular ``(B, C_out, |G|, H, W)``."""

    order: Tensor  # a buffer

    def __init__(
        self, group: GridGroup, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True
    ):
        super().__init__()
        _check_kernel(kernel_size)
        self.group, self.in_channels, self.out_channels = group, in_channels, out_channels
        G = group.order
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, G, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        # order[h, j] = index of h^-1 j: the input channel that pose h's filter reads in slot j
        self.register_buffer("order", group.pose_order(), persistent=False)

    def forward(self, f: Tensor) -> Tensor:
        _grid_input(f, "regular", self.group, self.in_channels)
        G, k = self.group.order, self.weight.shape[-1]
        kernel = torch.stack(
            [self.group.spatial(h, self.weight[:, :, self.order[h]]) for h in range(G)], dim=1
        )  # (C_out, G, C_in, G, k, k)
        out = F.conv2d(f.flatten(1, 2), kernel.reshape(-1, self.in_channels * G, k, k), padding=k // 2)
        out = out.view(f.shape[0], self.out_channels, G, *out.shape[-2:])
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1, 1)


class E4Block(nn.Module):
    """Regular -> regular, channels kept: ``f + mix(act(dynamic(f)))`` with per-pixel generated kernels."""

    def __init__(self, group: GridGroup, channels: int, kernel_size: int = 3, hidden: int | None = None):
        super().__init__()
        _check_kernel(kernel_size)
        self.group, self.channels, self.k = group, channels, kernel_size
        hidden = hidden or max(channels // 2, 1)
        self.generate = nn.Sequential(
            GroupConv(group, channels, hidden, 1), nn.SiLU(), GroupConv(group, hidden, kernel_size**2, 1)
        )
        self.mix = GroupConv(group, channels, channels, 1)

    def forward(self, f: Tensor) -> Tensor:
        _grid_input(f, "regular", self.group, self.channels)
        B, C, G, H, W = f.shape
        k = self.k
        taps = self.generate(f).permute(0, 2, 3, 4, 1).reshape(B, G, H, W, k, k)
        posed = torch.stack([self.group.spatial(h, taps[:, h]) for h in range(G)], dim=1)  # T_h on the taps
        posed = posed.reshape(B, G, H * W, k * k).permute(0, 1, 3, 2)  # (B, G, k^2, HW)
        patches = F.unfold(f.flatten(1, 2), k, padding=k // 2).view(B, C, G, k * k, H * W)
        dynamic = (patches * posed.unsqueeze(1)).sum(dim=3).view(B, C, G, H, W)
        return f + self.mix(F.silu(dynamic))


class GroupPool(nn.Module):
    """Regular ``(B, C, |G|, H, W)`` -> image ``(B, C, H, W)``: the maximum over the group axis."""

    def forward(self, f: Tensor) -> Tensor:
        if f.dim() != 5:
            raise ValueError(
                f"GroupPool expects a regular field (B, C, |G|, H, W), got shape {tuple(f.shape)}"
            )
        return f.amax(dim=2)


def cost(model: nn.Module, example: Tensor) -> dict[str, int]:
    """``{"parameters": ..., "flops": ...}`` of ``model`` on ``example`` (FLOPs of one forward pass, counted
    by ``torch.utils.flop_counter``: convolutions and matrix products, 2 per multiply-add)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return {"parameters": sum(p.numel() for p in model.parameters()), "flops": int(counter.get_total_flops())}
