"""Parameters and FLOPs of group-convolutional networks against a plain CNN of the same width.

    python benchmarks/gconv_cost.py

Three 3-layer networks on a 28x28 one-channel image, 32 feature maps per layer: a plain CNN (3x3
convolutions), a group CNN (lifting + two group convolutions, 32 / |G| channels x |G| poses) and an E4-style
network (lifting + two E4 blocks). FLOPs of one forward pass (torch.utils.flop_counter, 2 per multiply-add).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ace.nn.gconv import E4Block, GroupConv, LiftingConv, cost  # noqa: E402
from ace.runs.metrics import format_table  # noqa: E402
from ace.symmetry import C4, D4  # noqa: E402

WIDTH = 32


def networks():
    yield (
        "plain CNN",
        f"{WIDTH}",
        nn.Sequential(
            nn.Conv2d(1, WIDTH, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(WIDTH, WIDTH, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(WIDTH, WIDTH, 3, padding=1),
        ),
    )
    for G in (C4(), D4()):
        c = WIDTH // G.order
        yield (
            f"{G!r} group CNN",
            f"{c} x {G.order}",
            nn.Sequential(LiftingConv(G, 1, c), nn.SiLU(), GroupConv(G, c, c), nn.SiLU(), GroupConv(G, c, c)),
        )
        yield (
            f"{G!r} E4 blocks",
            f"{c} x {G.order}",
            nn.Sequential(LiftingConv(G, 1, c), nn.SiLU(), E4Block(G, c), E4Block(G, c)),
        )


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, 28, 28)
    rows = []
    for name, width, model in networks():
        c = cost(model, x)
        rows.append([name, width, f"{c['parameters']:,}", f"{c['flops'] / 1e6:.1f}"])
    print(format_table(["network", "feature maps", "parameters", "MFLOPs"], rows))


if __name__ == "__main__":
    main()
