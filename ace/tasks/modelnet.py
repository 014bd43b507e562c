"""ModelNet40 (real CAD meshes) classified by the SO(3)-invariant e3nn network of the shapes task.

The meshes are read from a local folder through ``torch_geometric.datasets.ModelNet`` (nothing is
downloaded), in the layout that class expects::

    <root>/raw/<class>/train/<class>_0001.off
    <root>/raw/<class>/test/<class>_0001.off

i.e. the ``ModelNet40`` folder of ``ModelNet40.zip`` (modelnet.cs.princeton.edu) renamed to
``<root>/raw``. torch_geometric writes the parsed meshes to ``<root>/processed`` on first use.
Each mesh becomes ``num_points`` points sampled on its faces in proportion to their area
(``torch_geometric.transforms.SamplePoints``, once, under ``seed``), centred and scaled into the
unit ball (by its largest distance from the centre, so the scale does not depend on the pose),
then rotated according to ``rotation``. The validation split is drawn from the official
training split.

Default sizes: 512 points per cloud (half the usual 1024) keep the kNN graph, and so an epoch of
the e3nn network on CPU, affordable; all official training and test meshes are used.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass

import torch
from torch_geometric.data import Data
from torch_geometric.datasets import ModelNet
from torch_geometric.transforms import SamplePoints

from ace.config.schema import opt
from ace.tasks.base import Task
from ace.tasks.e3nn_net import ModelConfig
from ace.tasks.shapes import point_cloud_task, random_rotation, rotation_z

__all__ = ["DataConfig", "build"]

ROTATIONS = ("none", "upright", "so3")


@dataclass
class DataConfig:
    """ModelNet from a local folder: where, how many points, which poses, split sizes."""

    root: str = opt("data/ModelNet40", "folder holding raw/<class>/{train,test}/<class>_*.off")
    name: str = opt("40", "'40' (ModelNet40) or '10' (ModelNet10)")
    num_points: int = opt(512, "points sampled on each mesh")
    rotation: str = opt(
        "none",
        "'none': the data's own (upright) poses; 'upright': random rotations about z; "
        "'so3': random 3-D rotations",
    )
    train_size: int | None = opt(None, "use at most this many training meshes (null = all)")
    val_size: int = opt(500, "validation meshes, held out of the official train split")
    test_size: int | None = opt(None, "use at most this many test meshes (null = all)")
    seed: int = opt(0, "seed of the split, the point sampling and the rotations")

    def __post_init__(self) -> None:
        if self.name not in ("10", "40"):
            raise ValueError(f"data.name must be '10' or '40', got {self.name!r}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"data.rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        for key in ("num_points", "train_size", "val_size", "test_size"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"data.{key} must be > 0, got {value}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"data.seed must be in [0, 2**63), got {self.seed}")


def categories(root: str) -> list[str]:
    """Class folders under ``<root>/raw`` holding training meshes, sorted like ModelNet's labels."""
    found = sorted(
        os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(root, "raw", "*", "train"))
    )
    return [c for c in found if glob.glob(os.path.join(root, "raw", c, "train", f"{c}_*.off"))]


def _missing(root: str) -> FileNotFoundError:
    raw = os.path.join(root, "raw")
    return FileNotFoundError(
        f"no ModelNet meshes under {raw!r}: expected raw/<class>/train/<class>_0001.off (and "
        f"raw/<class>/test/...). Download ModelNet40.zip from http://modelnet.cs.princeton.edu, unzip it "
        f"and rename its 'ModelNet40' folder to {raw!r}; set data.root to its parent."
    )


class LocalModelNet(ModelNet):
    """``torch_geometric.datasets.ModelNet`` that never downloads: the classes are the folders found."""

    @property
    def raw_file_names(self) -> list[str]:
        return categories(self.root)

    def download(self) -> None:
        raise _missing(self.root)


def _clouds(dataset: ModelNet, index: list[int], cfg: DataConfig, g: torch.Generator) -> list[Data]:
    sample = SamplePoints(cfg.num_points)
    out = []
    for i in index:
        mesh = dataset[i]
        pos = sample(Data(pos=mesh.pos, face=mesh.face)).pos.double()
        pos = pos - pos.mean(0)
        pos = pos / pos.norm(dim=-1).max().clamp_min(1e-12)
        if cfg.rotation == "so3":
            pos = pos @ random_rotation(g).T
        elif cfg.rotation == "upright":
            pos = pos @ rotation_z(2 * math.pi * torch.rand((), generator=g, dtype=torch.float64)).T
        out.append(Data(pos=pos.float(), y=mesh.y.view(1)))
    return out


def build(data: DataConfig, model: ModelConfig, seed: int) -> Task:
    """ModelNet point clouds classified by the e3nn network; SO(3) acts on ``pos``, logits invariant."""
    classes = categories(data.root)
    if not classes:
        raise _missing(data.root)
    train = LocalModelNet(data.root, name=data.name, train=True)
    test = LocalModelNet(data.root, name=data.name, train=False)
    g = torch.Generator().manual_seed(data.seed)
    order = torch.randperm(len(train), generator=g).tolist()
    if data.val_size >= len(order):
        raise ValueError(
            f"data.val_size={data.val_size} leaves no training meshes (the split has {len(order)})"
        )
    index = {
        "train": order[data.val_size :][: data.train_size],
        "val": order[: data.val_size],
        "test": torch.randperm(len(test), generator=g).tolist()[: data.test_size],
    }
    with torch.random.fork_rng():  # SamplePoints draws from the global RNG: seed it, then restore
        torch.manual_seed(data.seed)
        splits = {k: _clouds(test if k == "test" else train, idx, data, g) for k, idx in index.items()}
    return point_cloud_task(splits, len(classes), model, seed)
