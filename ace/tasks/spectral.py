"""Spectral task: link prediction from Laplacian eigenvectors, whose signs are arbitrary (Lim et al. 2023).

Data (generated, seeded, nothing downloaded; extra ``graphs``): each graph is two copies of an Erdos-Renyi
graph on ``data.nodes`` nodes (a random path added so each copy is connected) joined by ``data.bridges``
random edges. A fraction ``data.held_out`` of its edges is removed and becomes the positive pairs to predict,
with as many random non-edges as negatives; the node features are the first ``data.eigenvectors`` non-trivial
eigenvectors of the remaining graph's Laplacian, each with a random sign (the symmetry: any sign is as good).
Automorphic-looking nodes of the two copies differ only in the relative signs of their eigenvector entries,
which a sign-invariant encoder throws away and a sign-equivariant one keeps.

Variants (``data.variant``): ``symmetric`` (above: random signs, every held-out edge is a positive) and
``partial``, where the sign carries information: each eigenvector gets the canonical sign that makes its
entries on the first copy sum to > 0 (where they sum to ~0, its largest entry positive: a rule only the
generator knows, since the node order is hidden from the model), and the targets are the held-out links *of
the first copy*: held-out edges of the second copy and the bridges are negatives, next to as many random
non-edges as there are positives. The copies are drawn alike and only the canonical sign tells which one is
first, so a sign-invariant score is mis-specified: at best it ranks edges above non-edges, an AUC of about
0.75; a model that reads the canonical sign can reach 1.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ace.config.schema import check_positive_ints, opt
from ace.tasks.base import Task

__all__ = ["DataConfig", "ModelConfig", "build", "make_graph", "auc"]

VARIANTS = ("symmetric", "partial")


@dataclass
class DataConfig:
    train_size: int = opt(400, "training graphs")
    val_size: int = opt(100, "validation graphs")
    test_size: int = opt(200, "test graphs")
    nodes: int = opt(12, "nodes of each of the two copies")
    edge_probability: float = opt(0.25, "Erdos-Renyi edge probability within a copy")
    bridges: int = opt(2, "random edges joining the two copies")
    held_out: float = opt(0.2, "fraction of the edges removed and predicted (at least one per graph)")
    eigenvectors: int = opt(8, "Laplacian eigenvectors per node (the first non-trivial ones)")
    variant: str = opt(
        "symmetric",
        "'symmetric' (random signs, every held-out edge a link) or 'partial' (canonical signs, the first "
        "copy's links only)",
        choices=VARIANTS,
    )
    seed: int = opt(0, "seed of the graphs (independent of the run seed)")

    def __post_init__(self) -> None:
        check_positive_ints(
            "data", self, "train_size", "val_size", "test_size", "nodes", "bridges", "eigenvectors"
        )
        if not 0 < self.edge_probability <= 1:
            raise ValueError(f"data.edge_probability: must be in (0, 1], got {self.edge_probability!r}")
        if not 0 < self.held_out < 1:
            raise ValueError(f"data.held_out: must be in (0, 1), got {self.held_out!r}")
        if self.eigenvectors >= 2 * self.nodes:
            raise ValueError(
                f"data.eigenvectors: a graph of {2 * self.nodes} nodes has {2 * self.nodes - 1} non-trivial "
                f"eigenvectors, {self.eigenvectors} asked for"
            )


@dataclass
class ModelConfig:
    name: str = opt(
        "equivariant", "'equivariant', 'signnet' or 'mlp'", choices=("equivariant", "signnet", "mlp")
    )
    hidden: int = opt(32, "hidden width")
    layers: int = opt(2, "message-passing layers")

    def __post_init__(self) -> None:
        check_positive_ints("model", self, "hidden", "layers")


def make_graph(data: DataConfig, g: torch.Generator):
    """One graph: ``Data(eig, edge_index, pair_index, y)`` (see the module docstring for the two variants).

    Redrawn while the remaining graph is disconnected (more than one zero eigenvalue: its eigenvectors would
    not be the graph's) or, in the partial variant, while no held-out edge lies in the first copy; a repeated
    eigenvalue among the chosen ones (then more than a sign is arbitrary) is warned about."""
    from torch_geometric.data import Data

    n = data.nodes
    partial = data.variant == "partial"
    for _ in range(100):
        edges = set()
        for copy in (0, n):
            a, b = torch.triu_indices(n, n, 1)
            keep = torch.rand(len(a), generator=g) < data.edge_probability
            edges |= {(int(i) + copy, int(j) + copy) for i, j in zip(a[keep], b[keep])}
            path = torch.randperm(n, generator=g) + copy
            edges |= {tuple(sorted((int(i), int(j)))) for i, j in zip(path[:-1], path[1:])}
        ends = torch.randint(n, (data.bridges, 2), generator=g)
        edges |= {(int(i), int(j) + n) for i, j in ends}
        edges = sorted(edges)
        order = torch.randperm(len(edges), generator=g)
        k = max(1, round(data.held_out * len(edges)))
        held_out = [edges[i] for i in order[:k]]
        kept = [edges[i] for i in order[k:]]
        A = torch.zeros(2 * n, 2 * n, dtype=torch.float64)
        for i, j in kept:
            A[i, j] = A[j, i] = 1.0
        values, vectors = torch.linalg.eigh(torch.diag(A.sum(1)) - A)
        positives = [e for e in held_out if e[1] < n] if partial else held_out
        if int((values < 1e-9).sum()) == 1 and positives:
            break
    else:
        raise ValueError(
            "could not draw a connected graph with a held-out link in 100 tries (data.edge_probability or "
            "data.held_out too small?)"
        )
    chosen = values[1 : data.eigenvectors + 1]
    if (chosen.diff().abs() < 1e-8).any() or (values[data.eigenvectors + 1] - chosen[-1]).abs() < 1e-8:
        warnings.warn(
            "a repeated Laplacian eigenvalue: the basis of its eigenspace, not only signs, is arbitrary",
            stacklevel=2,
        )
    vectors = vectors[:, 1 : data.eigenvectors + 1]
    if partial:
        # an eigenvector that lives on the second copy sums to ~0 on the first: its largest entry decides
        first = vectors[:n].sum(0)
        largest = vectors.gather(0, vectors.abs().argmax(0, keepdim=True)).squeeze(0)
        signs = torch.where(first.abs() > 1e-6, first, largest).sign()
    else:
        signs = 1 - 2 * torch.randint(2, (data.eigenvectors,), generator=g).to(torch.float64)
    eig = (vectors * signs).float()
    present = set(edges)
    negatives = [e for e in held_out if e not in positives]
    non_edges = []
    while len(non_edges) < len(positives):
        i, j = sorted(torch.randint(2 * n, (2,), generator=g).tolist())
        if i != j and (i, j) not in present:
            non_edges.append((i, j))
    negatives += non_edges
    kept_index = torch.tensor(kept, dtype=torch.long).T
    pair_index = torch.tensor(positives + negatives, dtype=torch.long).T
    y = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))])
    return Data(
        eig=eig,
        edge_index=torch.cat([kept_index, kept_index.flip(0)], 1),
        pair_index=pair_index,
        y=y,
        num_nodes=2 * n,
    )


def auc(logits: Tensor, target: Tensor) -> Tensor:
    """Area under the ROC curve (Mann-Whitney: the chance a positive outscores a negative, ties count 1/2)."""
    pos, neg = logits[target > 0.5], logits[target <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return torch.tensor(float("nan"))
    diff = pos[:, None] - neg[None, :]
    return (diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()


class PairScore(nn.Module):
    """Logit of a pair from sign-invariant features: ``MLP(h_i * h_j, |h_i|, |h_j|)``, symmetric in i, j."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * width, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, h: Tensor, pairs: Tensor) -> Tensor:
        a, b = h[pairs[0]], h[pairs[1]]
        return self.mlp(torch.cat([a * b, a.abs() + b.abs()], dim=-1)).squeeze(-1)


class SpectralLinkPredictor(nn.Module):
    """Eigenvectors -> node features (sign-equivariant layers, SignNet or a plain MLP) -> pair logits."""

    def __init__(self, k: int, model: ModelConfig):
        super().__init__()
        from ace.nn.sign import SignEquivariantMessage, SignNet

        self.name = model.name
        if model.name == "equivariant":
            self.layers = nn.ModuleList(SignEquivariantMessage(k, model.hidden) for _ in range(model.layers))
            width = k
        elif model.name == "signnet":
            self.encoder = SignNet(k, model.hidden, model.hidden)
            width = model.hidden
        else:
            self.encoder = nn.Sequential(
                nn.Linear(k, model.hidden), nn.SiLU(), nn.Linear(model.hidden, model.hidden)
            )
            width = model.hidden
        self.score = PairScore(width, model.hidden)

    def forward(self, data) -> Tensor:
        if self.name == "equivariant":
            h = data.eig
            for layer in self.layers:
                h = layer(h, data.edge_index)
        else:
            h = self.encoder(data.eig)
        return self.score(h, data.pair_index)


class NodeBranch(nn.Module):
    """A non-equivariant branch for a sign-equivariant layer: an MLP of the raw eigenvector entries."""

    def __init__(self, k: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(k, hidden), nn.SiLU(), nn.Linear(hidden, k))

    def forward(self, v: Tensor, edge_index: Tensor) -> Tensor:
        return self.net(v)


def build(data: DataConfig, model: ModelConfig, seed: int) -> Task:
    """Link prediction on joined graph copies from sign-ambiguous eigenvectors (see the module docstring)."""
    from torch_geometric.data import Batch

    from ace.nn.sign import SignEquivariantMessage
    from ace.symmetry import Symmetry
    from ace.symmetry.groups import SignFlip

    sizes = {"train": data.train_size, "val": data.val_size, "test": data.test_size}
    splits = {}
    for offset, (name, size) in enumerate(sizes.items()):
        g = torch.Generator().manual_seed(data.seed * 3 + offset)
        splits[name] = [make_graph(data, g) for _ in range(size)]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = SpectralLinkPredictor(data.eigenvectors, model)
    return Task(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        model=net,
        symmetry=Symmetry(
            SignFlip(data.eigenvectors, independent=True), inputs={"eig": "vector"}, output="scalar"
        ),
        loss=F.binary_cross_entropy_with_logits,
        metrics={"auc": auc},
        relax_where=(lambda name, m: isinstance(m, SignEquivariantMessage))
        if model.name == "equivariant"
        else None,
        relax_branch=lambda name, m: NodeBranch(data.eigenvectors, model.hidden),
        example=Batch.from_data_list(splits["train"][:4]),
    )
