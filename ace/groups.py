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
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = [
    "GroupElement",
    "Group",
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
]

_AXES = {"x": 0, "y": 1, "z": 2}
_BUILTIN_KINDS = ("scalar", "vector", "position", "pseudovector")


@dataclass(frozen=True)
class GroupElement:
    """A batch of n group elements.

    Attributes:
        matrix: ``(n, d, d)`` orthogonal linear parts, or ``None`` for groups that do not act on
            feature vectors (``Permutation``).
        translation: ``(n, d)`` translations, or ``None``.
        permutation: for ``Permutation``: either ``(n, N)`` (row b reorders set b, ``x'[b, i] =
            x[b, perm[b, i]]``) or, for sets of different sizes stored one after another (graph
            nodes), a flat ``(sum of sizes,)`` index into that concatenation that never leaves a set.
        batch: ``(num_nodes,)`` graph of each node when the elements act on a torch_geometric batch
            (filled in by ``Symmetry.sample``), else ``None``.
    """

    matrix: Tensor | None = None
    translation: Tensor | None = None
    permutation: Tensor | None = None
    batch: Tensor | None = None

    def __len__(self) -> int:
        for part in (self.matrix, self.translation):
            if part is not None:
                return part.shape[0]
        if self.permutation is not None and self.permutation.dim() == 2:
            return self.permutation.shape[0]
        if self.batch is not None:  # a permutation of graph nodes: one element per graph
            return int(self.batch.max()) + 1 if self.batch.numel() else 0
        raise TypeError("a flat permutation does not know how many sets it acts on without its batch vector")

    def __getitem__(self, index) -> GroupElement:
        """Selects elements, e.g. ``g[2:4]``; not defined for flat (graph) permutations."""
        if self.batch is not None or (self.permutation is not None and self.permutation.dim() == 1):
            raise TypeError("cannot index elements that act on a graph batch")
        return replace(
            self, **{k: _take(getattr(self, k), index) for k in ("matrix", "translation", "permutation")}
        )

    def __matmul__(self, other: GroupElement) -> GroupElement:
        """Composition ``(self @ other) . x = self . (other . x)``, element by element.

        ``(R1, t1)(R2, t2) = (R1 R2, R1 t2 + t1)``; for permutations ``perm = perm2[perm1]`` per row.
        """
        if self.batch is not None or (self.permutation is not None and self.permutation.dim() == 1):
            raise TypeError("cannot compose elements that act on a graph batch")
        matrix = translation = permutation = None
        if self.matrix is not None:
            matrix = self.matrix @ other.matrix
        if self.translation is not None or other.translation is not None:
            t2 = other.translation if other.translation is not None else 0
            t2 = (self.matrix @ t2.unsqueeze(-1)).squeeze(-1) if torch.is_tensor(t2) else t2
            translation = t2 + (self.translation if self.translation is not None else 0)
        if self.permutation is not None:
            permutation = other.permutation.gather(1, self.permutation)
        return GroupElement(matrix, translation, permutation)


def _take(part: Tensor | None, index) -> Tensor | None:
    return None if part is None else part[index]


@functools.lru_cache(maxsize=64)
def _irreps(kind: str):
    import e3nn.o3  # lazily: e3nn is an optional extra

    try:
        return e3nn.o3.Irreps(kind)
    except (ValueError, AssertionError) as err:
        raise ValueError(
            f"unknown kind {kind!r}: expected one of {_BUILTIN_KINDS} or an e3nn irreps string "
            "such as '2x0e+1x1o'"
        ) from err


def _wigner(kind: str, R: Tensor) -> Tensor:
    """``Irreps(kind).D_from_matrix(R)``, exact to R's precision.

    e3nn builds its Lie algebra generators in the default dtype, which limits a float64 D to about
    1e-7 for l >= 2; building them in R's dtype keeps float64 equivariance checks exact.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(R.dtype if R.dtype in (torch.float32, torch.float64) else previous)
    try:
        return _irreps(kind).D_from_matrix(R)
    finally:
        torch.set_default_dtype(previous)


def _on(generator: torch.Generator | None, device) -> torch.device | None:
    # Draw on the generator's device (it must match), then move to the requested one.
    return generator.device if generator is not None else device


class Group:
    """Base class: a group acting linearly (plus optional translation) on ``dim``-dimensional space.

    Subclasses implement ``sample``; ``representation`` and ``width`` follow from ``element.matrix``.
    """

    dim: int | None = None

    def sample(
        self, n: int, generator: torch.Generator | None = None, dtype=torch.float32, device=None
    ) -> GroupElement:
        """Draws n elements (uniform / Haar for compact groups)."""
        raise NotImplementedError

    def width(self, kind: str) -> int | None:
        """Size m of the representation ``kind`` (``None``: any width, e.g. scalars).

        Raises:
            ValueError: if the kind is unknown or makes no sense for this group.
        """
        if kind == "scalar":
            return None
        if kind in ("vector", "position"):
            return self.dim
        if self.dim != 3:
            what = "kind 'pseudovector'" if kind == "pseudovector" else f"irreps {kind!r}"
            raise ValueError(f"{what} needs a group acting in 3-D, but {self!r} acts in {self.dim}-D")
        return 3 if kind == "pseudovector" else _irreps(kind).dim

    def representation(self, kind: str, element: GroupElement, width: int | None = None) -> Tensor:
        """Matrices ``rho(g)`` of shape ``(n, m, m)`` for the representation ``kind``.

        Args:
            kind: ``"scalar"`` (identity of size ``width``, default 1), ``"vector"`` / ``"position"``
                (``R``; positions are also translated, which is not linear), ``"pseudovector"``
                (``det(R) R``, 3-D only) or an e3nn irreps string such as ``"2x0e+1x1o"`` (3-D only;
                ``Irreps(kind).D_from_matrix(R)``, in e3nn's basis, with parity for improper R).
            element: a batch of n elements of this group.
            width: size of the scalar representation.
        """
        m = self.width(kind)
        R = element.matrix
        if kind == "scalar":
            return torch.eye(width or 1, dtype=R.dtype, device=R.device).expand(R.shape[0], -1, -1)
        if kind in ("vector", "position"):
            return R
        if kind == "pseudovector":
            return torch.linalg.det(R)[:, None, None] * R
        return _wigner(kind, R).reshape(R.shape[0], m, m)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))


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
        return GroupElement(_random_sign(n, generator, dtype, device)[:, None, None] * R)


def _random_sign(n, generator, dtype, device) -> Tensor:
    bits = torch.randint(0, 2, (n,), generator=generator, device=_on(generator, device)).to(device)
    return (1 - 2 * bits).to(dtype)


class _PlaneRotation(Group):
    """Rotations by an angle in the plane (d = 2) or about a coordinate axis of 3-D space."""

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
        return torch.eye(m, device=element.permutation.device).expand(n, -1, -1)


from .grid import C4, D4  # noqa: E402  (the grid groups build on Group, defined above)
