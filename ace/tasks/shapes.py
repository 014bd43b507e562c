"""Procedural point-cloud classification under full (SO(3)) or partial (upright) rotation symmetry.

Every sample is ``num_points`` points on the surface of one of eight kinds of shape, each with a
random size and aspect: sphere, ellipsoid, cube, cylinder, cone, torus, pyramid and (right-handed)
helix, drawn in a canonical pose whose axis is ``z``, then

* ``rotation: so3`` -- rotated by a uniformly random rotation: the label is a function of the
  shape up to rotation, so an SO(3)-invariant classifier is exactly right;
* ``rotation: upright`` -- rotated about the vertical ``z`` axis only, with three more classes
  that differ from one of the eight *only* by orientation: ``cone_down`` and ``pyramid_down``
  (upside down) and ``cylinder_lying`` (axis horizontal). A strictly SO(3)-invariant classifier
  cannot tell these pairs apart, so it loses about half of their samples; a relaxed model can
  use the vertical direction.

Gaussian noise of standard deviation ``noise`` is added to every coordinate and every cloud is
centred (its mean point moved to the origin). Data are seeded by ``DataConfig.seed`` alone (not
the run seed), so runs with different seeds share the data, and cached on disk.

Default sizes: 128 points per cloud keep the shapes recognisable (a cone's apex and a cube's
edges are visible) while a kNN graph of 128 x 8 edges per cloud keeps the e3nn tensor products
cheap; 1024 / 256 / 512 clouds give an epoch of a few tens of seconds on 2 CPU cores, a balanced
validation set of ~25 clouds per class and a test set whose accuracy is measured to ~2%.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch_geometric.data import Batch, Data

from ace.config.schema import opt
from ace.tasks.base import Task, accuracy
from ace.tasks.cache import cache_path, read_cache, write_cache
from ace.tasks.e3nn_net import ModelConfig, PointCloudClassifier, branch_factory, is_conv

__all__ = ["CLASSES", "DataConfig", "build", "make_split", "sample_shape"]

_CACHE_VERSION = 1
ROTATIONS = ("so3", "upright")


# --- surfaces: each draws its random size/aspect and n points in canonical pose (axis z) -------------------


def _uniform(g: torch.Generator, low: float, high: float, *shape: int) -> Tensor:
    return low + (high - low) * torch.rand(shape or (), generator=g, dtype=torch.float64)


def _pick(g: torch.Generator, n: int, areas: Sequence[float | Tensor]) -> Tensor:
    """Which part of a composite surface each of n points lies on, with probability ~ area."""
    return torch.multinomial(torch.tensor(areas, dtype=torch.float64), n, replacement=True, generator=g)


def _disk(g: torch.Generator, n: int, radius: float | Tensor) -> Tensor:
    """n points uniform on a disk in the xy plane, ``(n, 2)``."""
    r = radius * _uniform(g, 0, 1, n).sqrt()
    phi = _uniform(g, 0, 2 * math.pi, n)
    return torch.stack([r * phi.cos(), r * phi.sin()], -1)


def _sphere(g: torch.Generator, n: int) -> Tensor:
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return _uniform(g, 0.6, 1.0) * x / x.norm(dim=-1, keepdim=True)


def _ellipsoid(g: torch.Generator, n: int) -> Tensor:
    axes = torch.stack([_uniform(g, 0.8, 1.0), _uniform(g, 0.35, 0.65), _uniform(g, 0.35, 0.65)])
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return axes * x / x.norm(dim=-1, keepdim=True)


def _cube(g: torch.Generator, n: int) -> Tensor:
    half = _uniform(g, 0.4, 0.6) * _uniform(g, 0.9, 1.1, 3)  # nearly equal sides
    x = (2 * _uniform(g, 0, 1, n, 3) - 1) * half
    axis = _pick(g, n, [(half[1] * half[2]).item(), (half[0] * half[2]).item(), (half[0] * half[1]).item()])
    sign = torch.where(_uniform(g, 0, 1, n) < 0.5, -1.0, 1.0).to(torch.float64)
    rows = torch.arange(n)
    x[rows, axis] = sign * half[axis]
    return x


def _cylinder(g: torch.Generator, n: int) -> Tensor:
    r, h = _uniform(g, 0.3, 0.5), _uniform(g, 0.6, 1.0)  # radius, half height: a tall can
    part = _pick(g, n, [2 * math.pi * r * 2 * h, math.pi * r * r, math.pi * r * r])  # side, top, bottom
    phi = _uniform(g, 0, 2 * math.pi, n)
    side = torch.stack([r * phi.cos(), r * phi.sin(), _uniform(g, -1, 1, n) * h], -1)
    cap = torch.cat([_disk(g, n, r), torch.where(part == 1, h, -h)[:, None]], -1)
    return torch.where((part == 0)[:, None], side, cap)


def _cone(g: torch.Generator, n: int) -> Tensor:
    r, h = _uniform(g, 0.4, 0.6), _uniform(g, 0.9, 1.4)  # apex at z = h, base disk at z = 0
    part = _pick(g, n, [math.pi * r * math.hypot(r, h), math.pi * r * r])
    t = _uniform(g, 0, 1, n).sqrt()  # distance from the apex, uniform over the lateral area
    phi = _uniform(g, 0, 2 * math.pi, n)
    side = torch.stack([t * r * phi.cos(), t * r * phi.sin(), h * (1 - t)], -1)
    base = torch.cat([_disk(g, n, r), torch.zeros(n, 1, dtype=torch.float64)], -1)
    return torch.where((part == 0)[:, None], side, base)


def _torus(g: torch.Generator, n: int) -> Tensor:
    big, small = _uniform(g, 0.6, 0.8), _uniform(g, 0.15, 0.3)
    u, v = _uniform(g, 0, 2 * math.pi, n), _uniform(g, 0, 2 * math.pi, n)
    ring = big + small * v.cos()
    return torch.stack([ring * u.cos(), ring * u.sin(), small * v.sin()], -1)


def _pyramid(g: torch.Generator, n: int) -> Tensor:
    a, h = _uniform(g, 0.45, 0.65), _uniform(g, 0.8, 1.2)  # square base [-a, a]^2 at z = 0, apex at z = h
    corners = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]], dtype=torch.float64) * a
    slant = math.hypot(a.item(), h.item())
    part = _pick(g, n, [a.item() * slant] * 4 + [4 * a.item() ** 2])  # four faces, base
    s, t = _uniform(g, 0, 1, n), _uniform(g, 0, 1, n)
    flip = s + t > 1  # reflect into the triangle: uniform barycentric coordinates
    s, t = torch.where(flip, 1 - s, s), torch.where(flip, 1 - t, t)
    p0 = torch.cat([corners[part % 4], torch.zeros(n, 1, dtype=torch.float64)], -1)
    p1 = torch.cat([corners[(part + 1) % 4], torch.zeros(n, 1, dtype=torch.float64)], -1)
    apex = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64) * h
    face = p0 + s[:, None] * (p1 - p0) + t[:, None] * (apex - p0)
    base = torch.cat([(2 * _uniform(g, 0, 1, n, 2) - 1) * a, torch.zeros(n, 1, dtype=torch.float64)], -1)
    return torch.where((part < 4)[:, None], face, base)


def _helix(g: torch.Generator, n: int) -> Tensor:
    r, h, turns = _uniform(g, 0.35, 0.5), _uniform(g, 0.7, 1.0), _uniform(g, 2.0, 3.0)
    t = _uniform(g, -1, 1, n)
    phi = math.pi * turns * t  # counter-clockwise while climbing: right-handed
    tube = 0.05 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    return torch.stack([r * phi.cos(), r * phi.sin(), h * t], -1) + tube


_SURFACES: dict[str, Callable[[torch.Generator, int], Tensor]] = {
    "sphere": _sphere,
    "ellipsoid": _ellipsoid,
    "cube": _cube,
    "cylinder": _cylinder,
    "cone": _cone,
    "torus": _torus,
    "pyramid": _pyramid,
    "helix": _helix,
}


def _rot_x(angle: float) -> Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]], dtype=torch.float64)


def rotation_z(angle: Tensor) -> Tensor:
    c, s, zero, one = angle.cos(), angle.sin(), torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack(
        [torch.stack([c, -s, zero]), torch.stack([s, c, zero]), torch.stack([zero, zero, one])]
    )


# Classes told apart from a base class only by orientation: (base surface, fixed rotation).
_REORIENTED: dict[str, tuple[str, Tensor]] = {
    "cone_down": ("cone", _rot_x(math.pi)),
    "pyramid_down": ("pyramid", _rot_x(math.pi)),
    "cylinder_lying": ("cylinder", _rot_x(math.pi / 2)),
}

CLASSES: dict[str, tuple[str, ...]] = {
    "so3": tuple(_SURFACES),
    "upright": tuple(_SURFACES) + tuple(_REORIENTED),
}


def sample_shape(name: str, num_points: int, generator: torch.Generator, noise: float = 0.0) -> Tensor:
    """Points on one random shape of class ``name`` in its canonical (upright) pose, centred.

    A reoriented class (``cone_down``, ...) consumes the generator exactly like its base class, so
    with equal generator states ``sample_shape("cone_down", ...) == sample_shape("cone", ...) @ R.T``
    with ``R`` its fixed rotation: the two classes differ by orientation only.

    Returns:
        ``(num_points, 3)`` float64 coordinates with zero mean.
    """
    base, rotation = _REORIENTED.get(name, (name, None))
    if base not in _SURFACES:
        raise ValueError(f"unknown shape {name!r}; known: {sorted(_SURFACES) + sorted(_REORIENTED)}")
    pos = _SURFACES[base](generator, num_points)
    pos = pos + noise * torch.randn(pos.shape, generator=generator, dtype=torch.float64)
    if rotation is not None:
        pos = pos @ rotation.T
    return pos - pos.mean(0)


def random_rotation(generator: torch.Generator) -> Tensor:
    """Uniform random rotation ``(3, 3)`` float64 from a normalised Gaussian quaternion."""
    w, x, y, z = (q := torch.randn(4, generator=generator, dtype=torch.float64)) / q.norm()
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)]),
            torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)]),
            torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]),
        ]
    )


def make_split(size: int, num_points: int, rotation: str, noise: float, seed: int) -> tuple[Tensor, Tensor]:
    """Generate one split: ``size`` clouds, classes balanced and shuffled.

    Returns:
        ``pos`` ``(size, num_points, 3)`` float32 and ``y`` ``(size,)`` int64 class indices into
        ``CLASSES[rotation]``.
    """
    g = torch.Generator().manual_seed(seed)
    names = CLASSES[rotation]
    y = (torch.arange(size) % len(names))[torch.randperm(size, generator=g)]
    clouds = []
    for label in y.tolist():
        pos = sample_shape(names[label], num_points, g, noise)
        if rotation == "so3":
            rot = random_rotation(g)
        else:
            rot = rotation_z(_uniform(g, 0, 2 * math.pi))
        clouds.append(pos @ rot.T)
    return torch.stack(clouds).float(), y


@dataclass
class DataConfig:
    """Procedural shapes: sizes, symmetry setting, noise, seed and cache."""

    train_size: int = opt(1024, "number of training clouds")
    val_size: int = opt(256, "number of validation clouds")
    test_size: int = opt(512, "number of test clouds")
    num_points: int = opt(128, "points per cloud")
    rotation: str = opt(
        "so3",
        "'so3': random 3-D rotations, invariant labels; 'upright': rotations about z only, "
        "plus classes that differ only by orientation",
    )
    noise: float = opt(0.01, "standard deviation of Gaussian noise per coordinate")
    seed: int = opt(0, "seed of the data (independent of the run seed)")
    cache_dir: str = opt("data_cache", "folder for generated data ('' = no cache)")

    def __post_init__(self) -> None:
        if self.rotation not in ROTATIONS:
            raise ValueError(f"data.rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        for key in ("train_size", "val_size", "test_size", "num_points"):
            if getattr(self, key) <= 0:
                raise ValueError(f"data.{key} must be > 0, got {getattr(self, key)}")
        if self.noise < 0:
            raise ValueError(f"data.noise must be >= 0, got {self.noise}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"data.seed must be in [0, 2**63), got {self.seed}")


def _generate(cfg: DataConfig) -> dict[str, tuple[Tensor, Tensor]]:
    splits = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}
    # One independent stream per split, derived from (seed, split), so resizing one split leaves the others.
    seeds = {
        k: int.from_bytes(hashlib.sha256(f"{cfg.seed}/{k}".encode()).digest()[:8], "little") for k in splits
    }
    return {k: make_split(n, cfg.num_points, cfg.rotation, cfg.noise, seeds[k]) for k, n in splits.items()}


def load_or_generate(cfg: DataConfig) -> dict[str, tuple[Tensor, Tensor]]:
    """The three splits as ``{split: (pos, y)}``, read from the cache when it holds exactly these data.

    The cache file is named by a hash of every parameter that changes the data; a file that cannot be
    read or whose content does not match is regenerated with a warning.
    """
    params = {k: v for k, v in asdict(cfg).items() if k != "cache_dir"} | {"version": _CACHE_VERSION}
    if not cfg.cache_dir:
        return _generate(cfg)
    path = cache_path(cfg.cache_dir, "shapes-", params)

    def check(stored: dict) -> None:
        for k in ("train", "val", "test"):
            pos, y = stored[k]
            if pos.shape != (params[f"{k}_size"], cfg.num_points, 3) or y.shape != pos.shape[:1]:
                raise ValueError(f"split {k} has shape {tuple(pos.shape)}")

    stored = read_cache(path, params, check)
    if stored is not None:
        return {k: stored[k] for k in ("train", "val", "test")}
    splits = _generate(cfg)
    write_cache(path, params, splits)
    return splits


def point_cloud_task(splits: dict[str, list[Data]], num_classes: int, model: ModelConfig, seed: int) -> Task:
    """The parts every point-cloud task shares: e3nn classifier, SO(3) symmetry, cross entropy."""
    from ace.symmetry import Symmetry
    from ace.symmetry.groups import SO3

    with torch.random.fork_rng():  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        net = PointCloudClassifier(num_classes, model)
    return Task(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        model=net,
        symmetry=Symmetry(SO3(), inputs={"pos": "vector"}, output="scalar"),
        loss=torch.nn.functional.cross_entropy,
        metrics={"accuracy": accuracy},
        relax_where=is_conv,
        relax_branch=branch_factory(model.branch_hidden),
        example=Batch.from_data_list(splits["train"][:4]),
    )


def build(data: DataConfig, model: ModelConfig, seed: int) -> Task:
    """Procedural shapes classified by an SO(3)-invariant e3nn network (see the module docstring)."""
    splits = {
        k: [Data(pos=p.clone(), y=label.view(1).clone()) for p, label in zip(pos, y)]
        for k, (pos, y) in load_or_generate(data).items()
    }
    return point_cloud_task(splits, len(CLASSES[data.rotation]), model, seed)
