"""Charged-particle N-body task: predict positions 1000 steps ahead with an EGNN (Satorras et al. 2021).

Data follow the EGNN "nbody_small" protocol (simulator and deviations in :mod:`ace.tasks.nbody_sim`):
5 particles with charges +-1; input = positions, velocities and charges at frame 30, target =
positions at frame 40 (sample_freq 100, so 1000 steps of delta_t = 1e-3 later); 3000 / 2000 / 2000
systems (EGNN generated 10000 training systems and used the first 3000). ``field_strength`` adds a
uniform electric field along z, which breaks the symmetry down to rotations about z, reflections in
planes containing z and translations; 0 gives the E(3)-symmetric system.

Each split is generated from its own seed (derived from ``data.seed`` and the split name), so the
validation and test sets do not change with ``train_size``, and is cached in ``cache_dir`` under a hash
of every generation parameter. A cache file that cannot be read or holds other parameters or shapes
is regenerated with a warning.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ace.config.schema import opt
from ace.tasks.base import Task
from ace.tasks.cache import cache_path, read_cache, write_cache
from ace.tasks.egnn import EGNN, EGNNBranch, EGNNLayer
from ace.tasks.nbody_sim import sample_initial_state, simulate

__all__ = ["DataConfig", "ModelConfig", "build", "load_data", "generate"]

SIM_VERSION = 1  # bump when the simulator's output changes, so old cache files are not reused
SPLITS = ("train", "val", "test")
log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Data set of the N-body task (defaults: the EGNN "nbody_small" protocol)."""

    train_size: int = opt(3000, "number of training systems")
    val_size: int = opt(2000, "number of validation systems")
    test_size: int = opt(2000, "number of test systems")
    num_particles: int = opt(5, "particles per system")
    field_strength: float = opt(
        0.0, "uniform external electric field along z (force q E); 0 = E(3)-symmetric"
    )
    cache_dir: str = opt("data_cache", "folder for generated data sets; empty string = no cache")
    seed: int = opt(43, "data seed, independent of the run seed (EGNN used 43)")
    frame_in: int = opt(30, "input frame")
    frame_out: int = opt(40, "target frame")
    sample_freq: int = opt(100, "simulation steps between frames")
    delta_t: float = opt(1e-3, "integration time step")
    interaction_strength: float = opt(1.0, "Coulomb constant k")
    loc_std: float = opt(1.0, "std of initial positions (scaled by (n/5)^(1/3))")
    vel_norm: float = opt(0.5, "norm of each initial velocity")
    max_force: float | None = opt(
        100.0, "bound on each particle's force, applied as data.clip says; null = no clipping"
    )
    clip: str = opt(
        "norm",
        "how max_force clips: the force's norm (rotation-equivariant) or each Cartesian component "
        "(the EGNN generator's rule; breaks rotation symmetry)",
        choices=("norm", "component"),
    )

    def __post_init__(self) -> None:
        for key in ("train_size", "val_size", "test_size", "num_particles", "sample_freq", "frame_out"):
            _check_int(self, key, minimum=2 if key == "num_particles" else 1)
        _check_int(self, "seed", minimum=0)
        _check_int(self, "frame_in", minimum=0)
        if self.frame_out <= self.frame_in:
            raise ValueError(
                f"data.frame_out ({self.frame_out}) must be after data.frame_in ({self.frame_in})"
            )
        for key in ("field_strength", "interaction_strength", "delta_t", "loc_std", "vel_norm", "max_force"):
            if key != "max_force" or self.max_force is not None:
                _check_number(self, key)
        for key in ("delta_t", "loc_std", "max_force"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"data.{key} must be > 0, got {getattr(self, key)!r}")
        if self.clip not in ("norm", "component"):
            raise ValueError(f"data.clip must be 'norm' or 'component', got {self.clip!r}")
        if self.vel_norm < 0:
            raise ValueError(f"data.vel_norm must be >= 0, got {self.vel_norm!r}")
        if not isinstance(self.cache_dir, (str, os.PathLike)):
            raise ValueError(f"data.cache_dir must be a path or '', got {self.cache_dir!r}")
        self.cache_dir = os.fspath(self.cache_dir)


@dataclass
class ModelConfig:
    """EGNN of the N-body task (defaults as in the EGNN paper)."""

    layers: int = opt(4, "number of EGNN layers")
    hidden: int = opt(64, "feature width of the EGNN")
    branch_hidden: int = opt(64, "width of the non-equivariant MLP branch of each relaxed layer")

    def __post_init__(self) -> None:
        for key in ("layers", "hidden", "branch_hidden"):
            _check_int(self, key, minimum=1, prefix="model")


def _check_int(cfg: object, key: str, minimum: int | None, prefix: str = "data") -> None:
    value = getattr(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{prefix}.{key} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{prefix}.{key} must be >= {minimum}, got {value!r}")
    setattr(cfg, key, int(value))


def _check_number(cfg: object, key: str) -> None:
    """Accept ints, floats and numeric strings (YAML reads ``1e-3`` as a string); store a float."""
    value = getattr(cfg, key)
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"data.{key} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"data.{key} must be finite, got {value!r}")
    setattr(cfg, key, number)


def _params(data: DataConfig, split: str) -> dict:
    """Everything that determines the content of one split (the cache key)."""
    params = asdict(data)
    for key in ("train_size", "val_size", "test_size", "cache_dir"):
        del params[key]
    return {"version": SIM_VERSION, "split": split, "size": getattr(data, f"{split}_size"), **params}


def _generator(data: DataConfig, split: str) -> torch.Generator:
    seed = np.random.SeedSequence([data.seed, SPLITS.index(split)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(seed))


def generate(data: DataConfig, splits: tuple[str, ...] = SPLITS) -> dict[str, dict[str, Tensor]]:
    """Simulate the given splits in one vectorised run.

    Returns:
        split -> ``{"pos", "vel", "charge", "target"}`` in float64, shapes ``(size, n, 3)`` and
        ``(size, n, 1)`` for the charges.
    """
    sizes = [getattr(data, f"{s}_size") for s in splits]
    states = [
        sample_initial_state(size, data.num_particles, data.loc_std, data.vel_norm, _generator(data, s))
        for s, size in zip(splits, sizes)
    ]
    pos, vel, charge = (torch.cat(t) for t in zip(*states))
    frames_x, frames_v = simulate(
        pos,
        vel,
        charge,
        steps=(data.frame_out + 1) * data.sample_freq,
        sample_every=data.sample_freq,
        delta_t=data.delta_t,
        interaction_strength=data.interaction_strength,
        field_strength=data.field_strength,
        max_force=data.max_force,
        clip=data.clip,
    )
    out = {"pos": frames_x[data.frame_in], "vel": frames_v[data.frame_in], "charge": charge}
    out["target"] = frames_x[data.frame_out]
    chunks = {k: v.split(sizes) for k, v in out.items()}
    # clone: the chunks are views of all recorded frames, which torch.save would store whole
    return {s: {k: chunks[k][i].clone() for k in chunks} for i, s in enumerate(splits)}


def _check(stored: dict, params: dict) -> None:
    shape = (params["size"], params["num_particles"])
    for key, last in (("pos", 3), ("vel", 3), ("target", 3), ("charge", 1)):
        t = stored.get(key)
        if not (isinstance(t, Tensor) and t.dtype == torch.float64 and tuple(t.shape) == (*shape, last)):
            raise ValueError(f"'{key}' is not a float64 tensor of shape {(*shape, last)}")


def load_data(data: DataConfig, splits: tuple[str, ...] = SPLITS) -> dict[str, dict[str, Tensor]]:
    """Load the splits from ``data.cache_dir``, generating (and caching) the missing or invalid ones."""
    if not data.cache_dir:
        return generate(data, splits)
    params = {split: _params(data, split) for split in splits}
    paths = {split: cache_path(data.cache_dir, f"nbody_{split}_", params[split]) for split in splits}
    result = {}
    for split in splits:
        stored = read_cache(paths[split], params[split], functools.partial(_check, params=params[split]))
        if stored is not None:
            result[split] = {k: stored[k] for k in ("pos", "vel", "charge", "target")}
    missing = tuple(s for s in splits if s not in result)
    if missing:
        log.info("generating N-body splits %s", missing)
        for split, tensors in generate(data, missing).items():
            result[split] = tensors
            write_cache(paths[split], params[split], tensors)
    return result


def _complete_graph(n: int) -> Tensor:
    """``(2, n (n - 1))`` edge index of the complete directed graph without self-loops."""
    index = torch.arange(n)
    src, dst = index.repeat_interleave(n), index.repeat(n)
    keep = src != dst
    return torch.stack([src[keep], dst[keep]])


def to_graphs(tensors: dict[str, Tensor], dtype: torch.dtype | None = None) -> list:
    """One torch_geometric ``Data(pos, vel, charge, edge_index, y)`` per system."""
    from torch_geometric.data import Data

    dtype = dtype or torch.get_default_dtype()
    pos, vel, charge, target = (tensors[k].to(dtype) for k in ("pos", "vel", "charge", "target"))
    edge_index = _complete_graph(pos.size(1))
    return [
        Data(pos=pos[i], vel=vel[i], charge=charge[i], y=target[i], edge_index=edge_index.clone())
        for i in range(pos.size(0))
    ]


def _is_egnn_layer(name: str, module: nn.Module) -> bool:
    return isinstance(module, EGNNLayer)


def build(data: DataConfig, model: ModelConfig, seed: int) -> Task:
    """The N-body task: data splits, an EGNN initialised from ``seed``, and the E(3) symmetry.

    The symmetry acts on positions by ``x -> R x + t`` (``R`` in O(3)), on velocities by ``v -> R v``,
    leaves charges unchanged, and moves the predicted positions like the input positions.
    """
    from torch_geometric.data import Batch

    from ace.symmetry.action import Symmetry
    from ace.symmetry.groups import O3, Euclidean

    splits = {s: to_graphs(t) for s, t in load_data(data).items()}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = EGNN(layers=model.layers, hidden=model.hidden)

    def branch(name: str, module: nn.Module) -> nn.Module:
        assert isinstance(module, EGNNLayer), "_is_egnn_layer selects the EGNN layers"
        return EGNNBranch(module.hidden, model.branch_hidden)

    return Task(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        model=net,
        symmetry=Symmetry(
            Euclidean(O3()),
            inputs={"pos": "position", "vel": "vector", "charge": "scalar"},
            output="position",
        ),
        loss=F.mse_loss,
        metrics={"mse": F.mse_loss},
        relax_where=_is_egnn_layer,
        relax_branch=branch,
        example=Batch.from_data_list(splits["train"][:8]),
    )
