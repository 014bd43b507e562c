"""What every group provides: :class:`Group` (sampling, composing, inverting, representations) and
:class:`GroupElement` (a batch of elements: their matrices and, for Euclidean groups, translations).

The groups themselves are in :mod:`ace.symmetry.groups`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = ["Group", "GroupElement"]


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
            assert other.matrix is not None, "elements of one group have the same parts"
            matrix = self.matrix @ other.matrix
        if other.translation is not None:
            assert self.matrix is not None, "a translation comes with its linear part"
            moved = (self.matrix @ other.translation.unsqueeze(-1)).squeeze(-1)
            translation = moved if self.translation is None else moved + self.translation
        else:
            translation = self.translation
        if self.permutation is not None:
            assert other.permutation is not None, "elements of one group have the same parts"
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
        assert R is not None, f"{self!r} acts through matrices"
        if kind == "scalar":
            return torch.eye(width or 1, dtype=R.dtype, device=R.device).expand(R.shape[0], -1, -1)
        if kind in ("vector", "position"):
            return R
        if kind == "pseudovector":
            return torch.linalg.det(R)[:, None, None] * R
        assert m is not None, "an irreps string has a fixed width"
        return _wigner(kind, R).reshape(R.shape[0], m, m)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))
