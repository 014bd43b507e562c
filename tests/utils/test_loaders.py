"""StackedGraphLoader: the batches, random numbers and training runs of torch_geometric's DataLoader."""

import json
import signal
from pathlib import Path

import pytest
import torch
from run_kit import ROOT

pytest.importorskip("torch_geometric")

from torch.utils.data import DistributedSampler  # noqa: E402
from torch_geometric.data import Batch, Data  # noqa: E402
from torch_geometric.loader import DataLoader as GraphLoader  # noqa: E402

from ace.config import apply_overrides, config_from_dict, load_config  # noqa: E402
from ace.experiment import prepare_run, run  # noqa: E402
from ace.tasks.nbody import to_graphs  # noqa: E402
from ace.train import (
    Interrupted,  # noqa: E402
    Trainer,  # noqa: E402
)
from ace.utils import loaders as graph_loader  # noqa: E402
from ace.utils.loaders import (  # noqa: E402
    StackedGraphLoader,
    make_loader,  # noqa: E402
    stackable,
)


def _nbody_graphs(num: int = 50) -> list[Data]:
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(num, 5, 3, generator=g) for k in ("pos", "vel", "target")}
    tensors["charge"] = torch.randint(0, 2, (num, 5, 1), generator=g).float() * 2 - 1
    return to_graphs(tensors)


def _graph_level_graphs(num: int = 20) -> list[Data]:
    """Other layouts: per-edge features, a scalar and a per-graph vector target, int32 edges."""
    edge_index = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]], dtype=torch.int32)
    return [
        Data(x=torch.randn(4, 2), edge_index=edge_index, edge_attr=torch.randn(4, 3), t=torch.tensor(i),
             y=torch.randn(1, 6))
        for i in range(num)
    ]  # fmt: skip


def assert_same_batch(a: Batch, b: Batch) -> None:
    assert type(a) is type(b)
    assert list(a.to_dict()) == list(b.to_dict())  # same attributes in the same order
    for key, value in b.to_dict().items():
        assert a[key].dtype == value.dtype and torch.equal(a[key], value), key
    assert a.num_graphs == b.num_graphs
    for records in ("_slice_dict", "_inc_dict"):  # what get_example and to_data_list read
        mine, theirs = getattr(a, records), getattr(b, records)
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), (records, key)


@pytest.mark.parametrize("graphs", [_nbody_graphs, _graph_level_graphs])
@pytest.mark.parametrize("shuffle", [True, False])
def test_same_batches_and_random_numbers_as_torch_geometric(graphs, shuffle):
    graphs = graphs()
    loaders = StackedGraphLoader(graphs, batch_size=8, shuffle=shuffle), GraphLoader(graphs, 8, shuffle)
    assert len(loaders[0]) == len(loaders[1]) == -(-len(graphs) // 8)  # the last batch is smaller
    runs = []
    for loader in loaders:
        torch.manual_seed(3)
        batches = list(loader)
        runs.append((batches, torch.get_rng_state()))
        torch.manual_seed(3)  # the trainer's resume: replay the shuffle and skip the first batches
        it = iter(loader)
        next(it)
        runs.append(([next(it)], torch.get_rng_state()))
    (fast, fast_rng), (fast_skip, fast_skip_rng), (slow, slow_rng), (slow_skip, slow_skip_rng) = runs
    assert torch.equal(fast_rng, slow_rng) and torch.equal(fast_skip_rng, slow_skip_rng)
    assert len(fast) == len(slow)
    for a, b in zip(fast + fast_skip, slow + slow_skip):
        assert_same_batch(a, b)
    example = fast[1].get_example(2)
    assert torch.equal(example.edge_index, graphs[0].edge_index)


def test_distributed_sampler_gives_the_same_shards():
    graphs = _nbody_graphs(30)
    batches = []
    for cls in (StackedGraphLoader, GraphLoader):
        sampler = DistributedSampler(graphs, num_replicas=2, rank=1, shuffle=True, seed=5)
        sampler.set_epoch(3)
        batches.append(list(cls(graphs, batch_size=4, sampler=sampler)))
    assert len(batches[0]) == len(batches[1]) == 4
    for a, b in zip(*batches):
        assert_same_batch(a, b)


def _other_edges(graphs):
    graphs[3] = graphs[3].clone()
    graphs[3].edge_index = graphs[3].edge_index.flip(0)
    return graphs


def _other_size(graphs):
    return [*graphs, Data(pos=torch.randn(4, 3), edge_index=torch.tensor([[0, 1], [1, 0]]))]


def _named_num_nodes(graphs):
    return [Data(pos=g.pos, num_nodes=5) for g in graphs]


def _already_batched(graphs):
    return [Batch.from_data_list(graphs)]


@pytest.mark.parametrize("change", [_other_edges, _other_size, _named_num_nodes, _already_batched])
def test_make_loader_stacks_only_graphs_that_share_nodes_and_edges(change):
    graphs = _nbody_graphs(10)
    assert stackable(graphs)
    assert isinstance(make_loader(graphs, 4, shuffle=True), StackedGraphLoader)
    other = change(list(graphs))
    assert not stackable(other)
    loader = make_loader(other, 4, shuffle=True)
    assert type(loader) is GraphLoader
    with pytest.raises(ValueError, match="edge_index"):
        graph_loader.StackedGraphs(other)


TINY = [
    "data.train_size=64", "data.val_size=16", "data.test_size=16", "data.frame_in=2", "data.frame_out=4",
    "data.sample_freq=10", "model.layers=2", "model.hidden=16", "model.branch_hidden=16",
    "train.batch_size=16", "train.eval_batch_size=16", "train.epochs=2", "train.eval_samples=1",
    "train.eval_every=1", "log.every=1", "log.progress=false",
]  # fmt: skip


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "event" not in r]


def test_training_run_is_unchanged(tmp_path, monkeypatch):
    """A short run of configs/nbody.yaml logs the same numbers with both loaders."""
    cfg = load_config(ROOT / "configs" / "nbody.yaml", [*TINY, f"data.cache_dir={tmp_path}"])
    run(cfg, tmp_path / "fast")
    with monkeypatch.context() as m:
        m.setattr(graph_loader, "stackable", lambda graphs: False)
        run(cfg, tmp_path / "slow")
    assert sum("loss" in r for r in _records(tmp_path / "fast")) == 8
    assert _records(tmp_path / "fast") == _records(tmp_path / "slow")


def test_run_interrupted_in_mid_epoch_resumes_bit_for_bit(tmp_path, monkeypatch):
    """The trainer replays the epoch's shuffle from its saved random state and skips the batches done."""
    raw = {"method": "ace", "task": {"name": "nbody"}, "data": {"cache_dir": str(tmp_path)}}
    cfg = config_from_dict(apply_overrides(raw, TINY))
    run(cfg, tmp_path / "through")
    train_step = Trainer.train_step

    def interrupted_after_step_6(self, *args, **kwargs):  # 4 steps per epoch: in the second
        record = train_step(self, *args, **kwargs)
        if self.step == 6:
            signal.raise_signal(signal.SIGINT)
        return record

    with monkeypatch.context() as m, pytest.raises(Interrupted, match="after step 6"):
        m.setattr(Trainer, "train_step", interrupted_after_step_6)
        run(cfg, tmp_path / "resumed")
    assert isinstance(prepare_run(cfg, None)[1]["train"], StackedGraphLoader)
    run(cfg, tmp_path / "resumed", resume=True)
    assert _records(tmp_path / "resumed") == _records(tmp_path / "through")
