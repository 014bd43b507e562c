"""The symmetries of the square grid: rotations by 90 degrees (``C4``) and with reflections (``D4``).

An element is stored as its 2x2 integer matrix ``R^k F^m`` (``R`` the rotation by 90 degrees,
``F = diag(1, -1)`` the reflection of the width axis), so elements compose, invert and sample like the other
groups'. Field kinds:

* ``"image"``: a tensor ``(B, C, H, W)`` with ``H = W``; ``g . x`` moves the pixels (``torch.flip`` of the
  width axis ``m`` times, then ``torch.rot90`` ``k`` times), channels untouched;
* ``"regular"``: a group feature map ``(B, C, |G|, H, W)`` (one channel per group element, as produced by a
  group convolution): the pixels move and the group axis is permuted, ``(g . f)(h, p) = f(g^-1 h, g^-1 p)``;
* ``"scalar"``: invariant (class scores), and ``"vector"``: ``(..., 2)`` rotated by the matrix.

Both actions are exact permutations of the entries, so equivariance holds to the last bit in any dtype.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .groups import Group, GroupElement, _on

__all__ = ["C4", "D4", "GridGroup"]

_R = ((0, -1), (1, 0))  # rotation by 90 degrees: rot90 of the (H, W) axes
_F = ((1, 0), (0, -1))  # reflection: flip of the width axis


@functools.cache
def _elements(order: int) -> tuple[tuple[tuple[int, int], tuple[int, int]], ...]:
    """The matrices ``R^k F^m``, index ``k + 4 m`` (``m = 0`` only for C4)."""
    R, F = torch.tensor(_R), torch.tensor(_F)
    out = []
    for m in range(order // 4):
        for k in range(4):
            M = torch.linalg.matrix_power(R, k) @ torch.linalg.matrix_power(F, m)
            out.append(tuple(map(tuple, M.tolist())))
    return tuple(out)


class GridGroup(Group):
    """Base of :class:`C4` and :class:`D4`: the point group of the square grid, ``order`` elements."""

    dim = 2
    order = 4
    kinds = ("image", "regular")  # handled by :meth:`act`; "scalar" and "vector" as for any 2-D group

    def sample(self, n, generator=None, dtype=torch.float32, device=None) -> GroupElement:
        index = torch.randint(self.order, (n,), generator=generator, device=_on(generator, device)).to(device)
        return GroupElement(self.matrices(dtype, device)[index])

    def matrices(self, dtype=torch.float32, device=None) -> Tensor:
        """All elements, ``(order, 2, 2)``, in the order of the regular representation's group axis."""
        return torch.tensor(_elements(self.order), dtype=dtype, device=device)

    def index(self, g: GroupElement) -> Tensor:
        """The index of each element (``(n,)``, long): its position in :meth:`matrices`."""
        table = self.matrices(g.matrix.dtype, g.matrix.device)
        hit = (g.matrix[:, None] - table[None]).abs().amax(dim=(-1, -2)) < 0.5
        if not bool(hit.any(dim=1).all()):
            raise ValueError(f"{self!r}: an element is not a symmetry of the square grid")
        return hit.float().argmax(dim=1)

    def pose_order(self) -> Tensor:
        """``order[h, j]`` = index of ``h^-1 j`` (``(order, order)``, long): the group axis as element ``h``
        permutes it, ``(h . f)(j) = f(h^-1 j)``; also the slot a group convolution's pose ``h`` reads."""
        return _pose_order(type(self))

    def width(self, kind: str) -> int | None:
        if kind in self.kinds:
            return None
        if kind in ("scalar", "vector"):
            return super().width(kind)
        raise ValueError(
            f"kind {kind!r} is not defined for {self!r}: use 'image', 'regular', 'scalar' or 'vector'"
        )

    def act(self, name: str, kind: str, x: Tensor, g: GroupElement) -> Tensor:
        """``g . x`` for an ``"image"`` or ``"regular"`` field named ``name`` (one element per sample)."""
        spatial = 4 if kind == "image" else 5
        if x.dim() != spatial or x.shape[-1] != x.shape[-2]:
            shape = "(B, C, H, W)" if kind == "image" else f"(B, C, {self.order}, H, W)"
            raise ValueError(
                f"field {name!r}: kind {kind!r} under {self!r} needs a square grid of shape {shape} with "
                f"H = W, got shape {tuple(x.shape)}"
            )
        if kind == "regular" and x.shape[2] != self.order:
            raise ValueError(
                f"field {name!r}: kind 'regular' under {self!r} needs a group axis of size {self.order} "
                f"(dim 2), got shape {tuple(x.shape)}"
            )
        index = self.index(g)
        out = torch.empty_like(x)
        for i in torch.unique(index).tolist():
            rows = index == i
            out[rows] = self._apply(i, x[rows], kind)
        return out

    def _apply(self, i: int, x: Tensor, kind: str) -> Tensor:
        k, m = i % 4, i // 4
        if m:
            x = torch.flip(x, dims=(-1,))
        x = torch.rot90(x, k, dims=(-2, -1))
        if kind == "regular":  # (g . f)(h) = f(g^-1 h)
            x = x[:, :, self.pose_order()[i].to(x.device)]
        return x

    def spatial(self, i: int, kernel: Tensor) -> Tensor:
        """Element ``i`` moving the last two (spatial) axes of ``kernel`` (filters of group convolutions)."""
        k, m = i % 4, i // 4
        return torch.rot90(torch.flip(kernel, dims=(-1,)) if m else kernel, k, dims=(-2, -1))


@functools.cache
def _pose_order(cls: type) -> Tensor:
    group = cls()
    m = group.matrices(torch.float64)
    products = torch.einsum("iab,jbc->ijac", m.transpose(-1, -2), m).reshape(-1, 2, 2)  # h^-1 = h^T
    return group.index(GroupElement(products)).reshape(group.order, group.order)


class C4(GridGroup):
    """Rotations of the square grid by multiples of 90 degrees (p4's point group), sampled uniformly."""

    order = 4


class D4(GridGroup):
    """Rotations by multiples of 90 degrees and reflections of the square grid (p4m's point group)."""

    order = 8
