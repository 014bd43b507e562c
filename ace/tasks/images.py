"""Images task: handwritten digits under rotations by 90 degrees (C4) or with reflections too (D4).

Data: scikit-learn's bundled 8x8 digits (1,797 images, nothing downloaded; extra ``images``), scaled to
[0, 1], upsampled to ``data.size`` pixels a side (bilinear), shuffled and split with ``data.seed``, and each
image moved by a random element of the group (one draw per image, seeded):

* ``data.variant: symmetric``: every image is moved and the ambiguous pair is merged (a 9 is labelled 6: a 6
  turned by 180 degrees is a 9), 9 classes: labels invariant, data distribution invariant;
* ``data.variant: partial``: every image is moved except the 6s and 9s, which stay upright and keep their
  labels, 10 classes: the symmetry holds for 8 classes; an invariant model cannot tell an upright 6 from an
  upright 9 turned by 180 degrees, a relaxed one can use their orientation.

Models (``model.name``), all 3 layers of ``model.channels`` x |G| feature maps, then a spatial mean and a
linear classifier: ``gcnn`` (lifting + group convolutions, group max pooling: exactly invariant; its group
convolutions are relaxed with a plain convolution branch), ``e4`` (lifting + :class:`ace.gconv.E4Block`, the
E4 blocks relaxed) and ``cnn`` (a plain CNN of the same width, for deviation constraints).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ace.config.schema import check_positive_ints, opt
from ace.tasks.base import Task, accuracy

__all__ = ["DataConfig", "ModelConfig", "RegularConvBranch", "build", "load_digits"]

VARIANTS = ("symmetric", "partial")
GROUPS = ("c4", "d4")
DIGITS = 1797


@dataclass
class DataConfig:
    train_size: int = opt(1000, "training images (train + val + test <= 1797)")
    val_size: int = opt(300, "validation images")
    test_size: int = opt(497, "test images")
    group: str = opt("c4", "'c4' (rotations by 90 degrees) or 'd4' (and reflections)", choices=GROUPS)
    variant: str = opt(
        "symmetric",
        "'symmetric' (6 and 9 merged) or 'partial' (6 and 9 upright, 10 classes)",
        choices=VARIANTS,
    )
    size: int = opt(8, "pixels a side (8: the digits as they are; more: bilinear upsampling)")
    seed: int = opt(0, "seed of the split and of the image poses (independent of the run seed)")

    def __post_init__(self) -> None:
        check_positive_ints("data", self, "train_size", "val_size", "test_size", "size")
        total = self.train_size + self.val_size + self.test_size
        if total > DIGITS:
            raise ValueError(f"data: train + val + test = {total} images, but the digits set holds {DIGITS}")
        if self.size < 8:
            raise ValueError(f"data.size: must be >= 8 (the digits are 8x8), got {self.size}")


@dataclass
class ModelConfig:
    name: str = opt(
        "gcnn", "'gcnn' (group CNN), 'e4' (E4 blocks) or 'cnn' (plain CNN)", choices=("gcnn", "e4", "cnn")
    )
    channels: int = opt(8, "channels per group element (the plain CNN has channels x |G|)")
    kernel_size: int = opt(3, "odd filter size")

    def __post_init__(self) -> None:
        check_positive_ints("model", self, "channels")
        if not (isinstance(self.kernel_size, int) and self.kernel_size > 0 and self.kernel_size % 2 == 1):
            raise ValueError(f"model.kernel_size: must be an odd positive integer, got {self.kernel_size!r}")


def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as ``(images (1797, 8, 8) in [0, 1], labels (1797,))``."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as err:
        raise ImportError("the images task needs scikit-learn: pip install -e '.[images]'") from err
    digits = sklearn_digits()
    return torch.tensor(digits.images, dtype=torch.float32) / 16.0, torch.tensor(digits.target)


def _splits(data: DataConfig, group) -> dict[str, TensorDataset]:
    images, labels = load_digits()
    g = torch.Generator().manual_seed(data.seed)
    order = torch.randperm(len(images), generator=g)
    images = F.interpolate(
        images[order, None], size=(data.size, data.size), mode="bilinear", align_corners=False
    )
    labels = labels[order]
    pose = torch.randint(group.order, (len(images),), generator=g)
    if data.variant == "partial":
        pose[(labels == 6) | (labels == 9)] = 0  # the pair that only orientation tells apart stays upright
    else:
        labels = torch.where(labels == 9, torch.tensor(6), labels)  # a 9 is a turned 6: one class
    posed = torch.stack([group.apply(int(i), x[None], "image")[0] for i, x in zip(pose, images)])
    sizes = {"train": data.train_size, "val": data.val_size, "test": data.test_size}
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = TensorDataset(posed[start : start + n], labels[start : start + n])
        start += n
    return out


class RegularConvBranch(nn.Module):
    """A non-equivariant branch for a regular -> regular layer: a plain convolution over all ``C x |G|``
    feature maps (it mixes the poses freely)."""

    def __init__(self, in_channels: int, out_channels: int, order: int, kernel_size: int):
        super().__init__()
        self.out_channels, self.order = out_channels, order
        self.conv = nn.Conv2d(
            in_channels * order, out_channels * order, kernel_size, padding=kernel_size // 2
        )

    def forward(self, f: Tensor) -> Tensor:
        out = self.conv(f.flatten(1, 2))
        return out.view(f.shape[0], self.out_channels, self.order, *out.shape[-2:])


class _Classifier(nn.Module):
    """Feature layers, then (group max pooling for group CNNs) a spatial mean and a linear map."""

    def __init__(self, features: nn.Module, width: int, classes: int, grouped: bool):
        super().__init__()
        self.features, self.grouped = features, grouped
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)
        if self.grouped:
            f = f.amax(dim=2)
        return self.head(f.mean(dim=(-2, -1)))


def _network(model: ModelConfig, group, classes: int) -> nn.Module:
    from ace.nn.gconv import E4Block, GroupConv, LiftingConv

    c, k, G = model.channels, model.kernel_size, group.order
    if model.name == "cnn":
        w = c * G
        layers = [nn.Conv2d(1, w, k, padding=k // 2), nn.SiLU()]
        for _ in range(2):
            layers += [nn.Conv2d(w, w, k, padding=k // 2), nn.SiLU()]
        return _Classifier(nn.Sequential(*layers), w, classes, grouped=False)
    layers = [LiftingConv(group, 1, c, k), nn.SiLU()]
    for _ in range(2):
        layers += [GroupConv(group, c, c, k), nn.SiLU()] if model.name == "gcnn" else [E4Block(group, c, k)]
    return _Classifier(nn.Sequential(*layers), c, classes, grouped=True)


def build(data: DataConfig, model: ModelConfig, seed: int) -> Task:
    """The digits under the grid group (see the module docstring)."""
    from ace.nn.gconv import E4Block, GroupConv
    from ace.symmetry import Symmetry
    from ace.symmetry.groups import C4, D4

    group = C4() if data.group == "c4" else D4()
    splits = _splits(data, group)
    classes = 9 if data.variant == "symmetric" else 10
    with torch.random.fork_rng():  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        net = _network(model, group, classes)

    def where(name: str, module: nn.Module) -> bool:
        return isinstance(module, (GroupConv, E4Block))

    def branch(name: str, module: nn.Module) -> nn.Module:
        channels = module.channels if isinstance(module, E4Block) else module.in_channels
        out = module.channels if isinstance(module, E4Block) else module.out_channels
        return RegularConvBranch(channels, out, group.order, model.kernel_size)

    return Task(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        model=net,
        symmetry=Symmetry(group, inputs="image", output="scalar"),
        loss=F.cross_entropy,
        metrics={"accuracy": accuracy},
        relax_where=where if model.name != "cnn" else None,
        relax_branch=branch,
        example=splits["train"].tensors[0][:4],
    )
