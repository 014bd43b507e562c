"""Symmetry groups, their elements and representations.

Every group here acts on d-dimensional space through an orthogonal matrix and, for the Euclidean
groups, a translation:

    g . v = R v          (vectors)            g . p = R p + t      (positions)

``Permutation`` acts on sets instead: it reorders the elements of a set (or the nodes of a graph) and
leaves every feature vector as it is. Elements are sampled in batches from a ``torch.Generator``:

    >>> g = SO3().sample(8, generator=torch.Generator().manual_seed(0))
    >>> g.matrix.shape
    torch.Size([8, 3, 3])
    >>> SO3().representation("1x0e+1x1o", g).shape      # e3nn irreps, imported lazily
    torch.Size([8, 4, 4])

The symmetries of the square grid, rotations by 90 degrees (``C4``) and with reflections (``D4``):

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
import math

import torch
from torch import Tensor

from ace.symmetry.group import _AXES, _BUILTIN_KINDS, Group, GroupElement, _irreps, _on

__all__ = [
    "SO3",
    "O3",
    "SO2",
    "Cyclic",
    "Translation",
    "Euclidean",
    "Permutation",
    "SignFlip",
    "C4",
    "D4",
    "GridGroup",
]


class SO3(Group):
    """Rotations of 3-D space, sampled uniformly (Haar) as normalised Gaussian quaternions."""

    dim = 3

    def sample(self, n, generator=None, dtype=torch.float32, device=None) -> GroupElement:
        q = torch.randn(n, 4, generator=generator, dtype=dtype, device=_on(generator, device)).to(device)
        w, x, y, z = (q / q.norm(dim=1, keepdim=True)).unbind(1)
        R = torch.stack(
            [
                torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
                torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
                torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
            ],
            -2,
        )
        return GroupElement(R)


class O3(Group):
    """Rotations and reflections of 3-D space: a uniform rotation times a uniform sign ``s = +-1``."""

    dim = 3

    def sample(self, n, generator=None, dtype=torch.float32, device=None) -> GroupElement:
        R = SO3().sample(n, generator, dtype, device).matrix
        assert R is not None
        return GroupElement(_random_sign(n, generator, dtype, device)[:, None, None] * R)


def _random_sign(n, generator, dtype, device) -> Tensor:
    bits = torch.randint(0, 2, (n,), generator=generator, device=_on(generator, device)).to(device)
    return (1 - 2 * bits).to(dtype)


class _PlaneRotation(Group):
    """Rotations by an angle in the plane (d = 2) or about a coordinate axis of 3-D space."""

    dim: int

    def __init__(self, axis: str | None = None):
        if axis is not None and axis not in _AXES:
            raise ValueError(f"axis must be one of 'x', 'y', 'z' or None (planar), got {axis!r}")
        self.axis = axis
        self.dim = 2 if axis is None else 3

    def angles(self, n, generator, dtype, device) -> Tensor:
        raise NotImplementedError

    def sample(self, n, generator=None, dtype=torch.float32, device=None) -> GroupElement:
        theta = self.angles(n, generator, dtype, device)
        c, s = theta.cos(), theta.sin()
        if self.axis is None:
            return GroupElement(torch.stack([c, -s, s, c], -1).view(*c.shape, 2, 2))
        # The rotation acts in the plane (i, j) that follows the axis cyclically: z -> (x, y), x -> (y, z).
        a = _AXES[self.axis]
        i, j = (a + 1) % 3, (a + 2) % 3
        R = torch.zeros(n, 3, 3, dtype=dtype, device=device)
        R[:, a, a] = 1
        R[:, i, i], R[:, i, j], R[:, j, i], R[:, j, j] = c, -s, s, c
        return GroupElement(R)

    def _axis_repr(self) -> str:
        return "" if self.axis is None else f"axis={self.axis!r}"


class SO2(_PlaneRotation):
    """Rotations of the plane (``SO2()``, d = 2) or of 3-D space about an axis (``SO2(axis="z")``).

    Angles are uniform on ``[0, 2 pi)``.
    """

    def angles(self, n, generator, dtype, device) -> Tensor:
        u = torch.rand(n, generator=generator, dtype=dtype, device=_on(generator, device)).to(device)
        return 2 * math.pi * u

    def __repr__(self) -> str:
        return f"SO2({self._axis_repr()})"


class Cyclic(_PlaneRotation):
    """The rotations by ``2 pi k / order``, k uniform in ``{0, ..., order-1}``; planar or about ``axis``."""

    def __init__(self, order: int, axis: str | None = None):
        if int(order) < 1:
            raise ValueError(f"Cyclic order must be a positive integer, got {order!r}")
        super().__init__(axis)
        self.order = int(order)

    def angles(self, n, generator, dtype, device) -> Tensor:
        k = torch.randint(0, self.order, (n,), generator=generator, device=_on(generator, device)).to(device)
        return 2 * math.pi * k.to(dtype) / self.order

    def __repr__(self) -> str:
        return f"Cyclic({', '.join(filter(None, [str(self.order), self._axis_repr()]))})"


class Translation(Group):
    """Translations of ``dim``-dimensional space, ``t ~ N(0, scale^2 I)``; the linear part is ``I``.

    Only ``"position"`` fields move; vectors and scalars are invariant.
    """

    dim: int

    def __init__(self, dim: int = 3, scale: float = 1.0):
        self.dim = int(dim)
        self.scale = float(scale)

    def sample(self, n, generator=None, dtype=torch.float32, device=None) -> GroupElement:
        t = torch.randn(n, self.dim, generator=generator, dtype=dtype, device=_on(generator, device)).to(
            device
        )
        eye = torch.eye(self.dim, dtype=dtype, device=device).expand(n, -1, -1)
        return GroupElement(eye, self.scale * t)

    def __repr__(self) -> str:
        return f"Translation(dim={self.dim}, scale={self.scale})"


class Euclidean(Group):
    """A linear group together with translations: ``g . p = R p + t``, ``t ~ N(0, scale^2 I)``.

    ``Euclidean(O3())`` is E(3), ``Euclidean(SO3())`` is SE(3), ``Euclidean(SO2())`` is SE(2).
    """

    dim: int

    def __init__(self, base: Group, scale: float = 1.0):
        if not isinstance(base, Group) or base.dim is None or isinstance(base, (Translation, Euclidean)):
            raise ValueError(f"Euclidean needs a linear group such as O3() or SO3() as base, got {base!r}")
        self.base = base
        self.dim = base.dim
        self.scale = float(scale)

    def sample(self, n, generator=None, dtype=torch.float32, device=None) -> GroupElement:
        R = self.base.sample(n, generator, dtype, device).matrix
        t = torch.randn(n, self.dim, generator=generator, dtype=dtype, device=_on(generator, device)).to(
            device
        )
        return GroupElement(R, self.scale * t)

    def __repr__(self) -> str:
        return f"Euclidean({self.base!r}, scale={self.scale})"


class SignFlip(Group):
    """Sign flips in ``dim`` dimensions: ``{+I, -I}`` (each with probability 1/2) or, with ``independent``,
    ``(Z_2)^dim``: each coordinate flips on its own, ``diag(s_1, ..., s_dim)``. The latter is the symmetry of
    ``dim`` Laplacian eigenvectors stacked as node features ``(num_nodes, dim)`` (kind ``"vector"``): each
    eigenvector is defined up to its sign, one draw per graph."""

    dim: int

    def __init__(self, dim: int = 3, independent: bool = False):
        self.dim = int(dim)
        self.independent = bool(independent)

    def sample(self, n, generator=None, dtype=torch.float32, device=None) -> GroupElement:
        eye = torch.eye(self.dim, dtype=dtype, device=device)
        if self.independent:
            signs = _random_sign(n * self.dim, generator, dtype, device).view(n, self.dim)
            return GroupElement(torch.diag_embed(signs))
        return GroupElement(_random_sign(n, generator, dtype, device)[:, None, None] * eye)

    def __repr__(self) -> str:
        return f"SignFlip({self.dim}, independent=True)" if self.independent else f"SignFlip({self.dim})"


class Permutation(Group):
    """Permutations of the elements of a set (dim 1 of a ``(B, N, ...)`` tensor) or of the nodes of
    each graph in a torch_geometric batch, uniform over ``S_N``.

    Feature vectors are not transformed, so every representation is the identity.
    """

    def sample(
        self, n, generator=None, dtype=torch.float32, device=None, size: int | Tensor | None = None
    ) -> GroupElement:
        """Draws n permutations.

        Args:
            size: the set size N (gives ``permutation`` of shape ``(n, N)``) or a tensor of the n set
                sizes, for sets stored one after another (gives a flat permutation of all elements
                that keeps each element inside its set).
        """
        if size is None:
            raise ValueError("Permutation.sample needs the set size: pass size=N (or a tensor of n sizes)")
        where = _on(generator, device)
        if isinstance(size, int):
            keys = torch.rand(n, size, generator=generator, device=where)
            return GroupElement(permutation=keys.argsort(dim=1).to(device))
        owner = torch.repeat_interleave(torch.arange(n, device=where), size.to(where))
        # Sorting set index + uniform key in [0, 1) shuffles within each set and keeps the sets in order.
        keys = owner.double() + torch.rand(
            owner.shape[0], generator=generator, dtype=torch.float64, device=where
        )
        return GroupElement(permutation=keys.argsort().to(device))

    def width(self, kind: str) -> int | None:
        return None if kind in _BUILTIN_KINDS else _irreps(kind).dim

    def representation(self, kind: str, element: GroupElement, width: int | None = None) -> Tensor:
        """Identity ``(n, m, m)``; ``m = width`` (default 1) except for irreps strings."""
        m = self.width(kind) or width or 1
        n = len(element)
        assert element.permutation is not None, "a permutation's element is its permutation"
        return torch.eye(m, device=element.permutation.device).expand(n, -1, -1)


_R = ((0, -1), (1, 0))  # rotation by 90 degrees: rot90 of the (H, W) axes
_F = ((1, 0), (0, -1))  # reflection: flip of the width axis


@functools.cache
def _elements(order: int) -> tuple[tuple[tuple[int, int], tuple[int, int]], ...]:
    """The matrices ``R^k F^m``, index ``k + 4 m`` (``m = 0`` only for C4)."""
    R, F = torch.tensor(_R), torch.tensor(_F)
    out = []
    for m in range(order // 4):
        for k in range(4):
            (a, b), (c, d) = (torch.linalg.matrix_power(R, k) @ torch.linalg.matrix_power(F, m)).tolist()
            out.append(((a, b), (c, d)))
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
        assert g.matrix is not None, f"{self!r} acts through matrices"
        table = self.matrices(g.matrix.dtype, g.matrix.device)
        hit = (g.matrix[:, None] - table[None]).abs().amax(dim=(-1, -2)) < 0.5
        if not bool(hit.any(dim=1).all()):
            raise ValueError(f"{self!r}: an element is not a symmetry of the square grid")
        return hit.float().argmax(dim=1)

    def pose_order(self) -> Tensor:
        """``order[h, j]`` = index of ``h^-1 j`` (``(order, order)``, long): the group axis as element ``h``
        permutes it, ``(h . f)(j) = f(h^-1 j)``; also the slot a group convolution's pose ``h`` reads."""
        return _pose_order(self)

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
            out[rows] = self.apply(i, x[rows], kind)
        return out

    def apply(self, i: int, x: Tensor, kind: str) -> Tensor:
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
def _pose_order(group: GridGroup) -> Tensor:
    m = group.matrices(torch.float64)
    products = torch.einsum("iab,jbc->ijac", m.transpose(-1, -2), m).reshape(-1, 2, 2)  # h^-1 = h^T
    return group.index(GroupElement(products)).reshape(group.order, group.order)


class C4(GridGroup):
    """Rotations of the square grid by multiples of 90 degrees (p4's point group), sampled uniformly."""

    order = 4


class D4(GridGroup):
    """Rotations by multiples of 90 degrees and reflections of the square grid (p4m's point group)."""

    order = 8
