import copy
import math
import os
import warnings

import pytest
import torch
from torch_geometric.data import Batch, Data

from ace.tasks import shapes
from ace.tasks.e3nn_net import ModelConfig, PointCloudClassifier, knn_edges
from ace.tasks.shapes import CLASSES, DataConfig, build, make_split, random_rotation, sample_shape

SMALL = ModelConfig(
    hidden_irreps="4x0e+2x0o+2x1o+2x1e", num_layers=2, radial_hidden=8, readout_hidden=8, branch_hidden=8
)


def tiny(**kw) -> DataConfig:
    return DataConfig(
        **({"train_size": 12, "val_size": 4, "test_size": 4, "num_points": 24, "cache_dir": ""} | kw)
    )


@pytest.fixture(scope="module")
def net():
    """A small float64 network with 11 classes, built once (e3nn modules are slow to construct)."""
    torch.manual_seed(0)
    return PointCloudClassifier(11, SMALL).double()


@pytest.fixture(scope="module")
def task():
    return build(tiny(rotation="upright"), SMALL, seed=0)


def clouds(sizes=(20, 31, 17), seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch.from_data_list(
        [Data(pos=torch.randn(n, 3, generator=g, dtype=torch.float64)) for n in sizes]
    )


def moved(batch: Batch, seed=1) -> Batch:
    """Each cloud rotated by its own random rotation and translated."""
    g = torch.Generator().manual_seed(seed)
    rot = torch.stack([random_rotation(g) for _ in range(batch.num_graphs)])
    shift = torch.randn(batch.num_graphs, 3, generator=g, dtype=torch.float64)
    out = batch.clone()
    out.pos = torch.einsum("nij,nj->ni", rot[batch.batch], batch.pos) + shift[batch.batch]
    return out


def relative_error(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_knn_edges_match_brute_force_within_each_cloud():
    batch = clouds((5, 9, 3))
    src, dst = knn_edges(batch.pos, batch.batch, k=4)
    assert (batch.batch[src] == batch.batch[dst]).all() and (src != dst).all()
    for i in range(batch.num_nodes):
        same = (batch.batch == batch.batch[i]).nonzero().flatten()
        dist = (batch.pos[same] - batch.pos[i]).norm(dim=-1)
        dist[same == i] = math.inf
        expected = same[dist.argsort()[: min(4, len(same) - 1)]]
        assert sorted(src[dst == i].tolist()) == sorted(expected.tolist())


def test_network_is_exactly_rotation_and_translation_invariant_in_float64(net):
    batch = clouds()
    with torch.no_grad():
        logits = net(batch)
        assert logits.shape == (3, 11)
        assert relative_error(net(moved(batch)), logits) < 1e-8


def test_default_network_invariant_and_differentiable():
    torch.manual_seed(0)
    model = PointCloudClassifier(8).double()
    batch = clouds((40, 40))
    logits = model(batch)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert relative_error(model(moved(batch)).detach(), logits.detach()) < 1e-8


def test_single_cloud_without_batch_vector(net):
    pos = torch.randn(16, 3, dtype=torch.float64)
    assert torch.equal(net(Data(pos=pos)), net(Batch.from_data_list([Data(pos=pos)])))


def test_relaxed_model_breaks_invariance_and_strip_restores_it(task):
    ace = pytest.importorskip("ace")
    model = ace.relax(copy.deepcopy(task.model), where=task.relax_where, branch=task.relax_branch).double()
    assert sorted(ace.gates(model)) == ["layers.0", "layers.1"]
    batch = clouds()
    rotated = moved(batch)
    with torch.no_grad():
        assert relative_error(model(rotated), model(batch)) > 1e-3
        with ace.equivariant(model):
            exact = model(batch)
            assert relative_error(model(rotated), exact) < 1e-8
        stripped = ace.strip(model)
        assert relative_error(stripped(batch), exact) < 1e-12
        assert relative_error(stripped(rotated), exact) < 1e-8
        for gate in ace.gates(model).values():
            gate.zero_()
        assert relative_error(model(batch), exact) < 1e-12


def test_task_symmetry_measures_zero_deviation_for_the_plain_network(task):
    ace = pytest.importorskip("ace")
    model = copy.deepcopy(task.model).double()
    batch = Batch.from_data_list(task.train[:4])
    batch.pos = batch.pos.double()
    deviation = ace.equivariance_deviation(model, batch, task.symmetry, samples=2, relative=True)
    assert deviation.item() < 1e-16


def test_build_returns_a_runnable_task(task):
    assert (len(task.train), len(task.val), len(task.test)) == (12, 4, 4)
    item = task.train[0]
    assert item.pos.shape == (24, 3) and item.y.shape == (1,)
    assert torch.allclose(item.pos.mean(0), torch.zeros(3), atol=1e-6)
    logits = task.model(task.example)
    assert logits.shape == (4, len(CLASSES["upright"]))
    loss = task.loss(logits, task.example.y)
    assert loss.ndim == 0 and 0.0 <= task.metrics["accuracy"](logits, task.example.y).item() <= 1.0
    assert any(task.relax_where(n, m) for n, m in task.model.named_modules())


def test_same_seed_same_model_and_data(task):
    again = build(tiny(rotation="upright"), SMALL, seed=0)
    assert all(torch.equal(x.pos, y.pos) and torch.equal(x.y, y.y) for x, y in zip(task.test, again.test))
    assert all(torch.equal(p, q) for p, q in zip(task.model.parameters(), again.model.parameters()))
    other = shapes.load_or_generate(tiny(rotation="upright", seed=1))
    assert not torch.equal(torch.stack([d.pos for d in task.train]), other["train"][0])


def test_splits_are_balanced_and_independent_streams():
    pos, y = make_split(22, 16, "so3", 0.01, seed=5)
    assert pos.shape == (22, 16, 3) and pos.dtype == torch.float32
    assert y.bincount().tolist() == [3, 3, 3, 3, 3, 3, 2, 2]
    # growing the training split leaves validation and test untouched
    small, big = shapes.load_or_generate(tiny()), shapes.load_or_generate(tiny(train_size=20))
    assert torch.equal(small["val"][0], big["val"][0]) and torch.equal(small["test"][0], big["test"][0])


@pytest.mark.parametrize(
    "name, base, angle",
    [
        ("cone_down", "cone", math.pi),
        ("pyramid_down", "pyramid", math.pi),
        ("cylinder_lying", "cylinder", math.pi / 2),
    ],
)
def test_upright_classes_differ_only_by_orientation(net, name, base, angle):
    # A sample of `name` is a rotated sample of `base`: exactly, draw for draw.
    rot = torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, math.cos(angle), -math.sin(angle)], [0.0, math.sin(angle), math.cos(angle)]],
        dtype=torch.float64,
    )
    for seed in range(3):
        a = sample_shape(base, 64, torch.Generator().manual_seed(seed), noise=0.01)
        b = sample_shape(name, 64, torch.Generator().manual_seed(seed), noise=0.01)
        assert torch.allclose(b, a @ rot.T, atol=1e-12)
    # ... so an SO(3)-invariant network gives both the same logits and cannot tell them apart,
    with torch.no_grad():
        assert relative_error(net(Data(pos=b)), net(Data(pos=a))) < 1e-8
    # while a non-invariant statistic of the vertical coordinate separates every sample of the pair:
    # skewness of z (apex up: long upper tail) or spread of z (standing: tall).
    stat = (lambda z: (z**3).mean()) if name.endswith("down") else (lambda z: z.std())
    values = {
        cls: torch.stack(
            [stat(sample_shape(cls, 64, torch.Generator().manual_seed(s))[:, 2]) for s in range(20)]
        )
        for cls in (base, name)
    }
    assert values[base].min() > values[name].max()


def test_upright_rotations_keep_the_vertical_axis_and_so3_does_not():
    def heights(rotation):
        pos, y = make_split(33, 64, rotation, 0.0, seed=0)
        cyl = pos[y == CLASSES[rotation].index("cylinder")]
        return cyl[..., 2].std(dim=1)  # a standing cylinder is tall along z

    upright, so3 = heights("upright"), heights("so3")
    assert upright.min() > so3.min()


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="rotation"):
        DataConfig(rotation="o2")
    for key in ("train_size", "val_size", "test_size", "num_points"):
        with pytest.raises(ValueError, match=key):
            DataConfig(**{key: 0})
    with pytest.raises(ValueError, match="num_layers"):
        ModelConfig(num_layers=0)
    with pytest.raises(ValueError, match="scalars"):
        ModelConfig(hidden_irreps="4x1o")
    with pytest.raises(ValueError, match="unknown shape"):
        sample_shape("dodecahedron", 8, torch.Generator())


def test_cache_is_written_reused_and_regenerated_when_bad(tmp_path, monkeypatch):
    cfg = tiny(cache_dir=str(tmp_path))
    first = shapes.load_or_generate(cfg)
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("shapes-") and files[0].endswith(".pt")

    generate = shapes._generate
    monkeypatch.setattr(shapes, "_generate", lambda c: pytest.fail("cache not used"))
    again = shapes.load_or_generate(cfg)
    assert all(torch.equal(first[k][0], again[k][0]) for k in first)

    monkeypatch.setattr(shapes, "_generate", generate)
    shapes.load_or_generate(tiny(cache_dir=str(tmp_path), noise=0.02))  # other parameters, other file
    assert len(os.listdir(tmp_path)) == 2

    path = tmp_path / files[0]
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="regenerating"):
        repaired = shapes.load_or_generate(cfg)
    assert torch.equal(repaired["train"][0], first["train"][0])

    stored = torch.load(path, weights_only=True)
    stored["train"] = (stored["train"][0][:3], stored["train"][1][:3])  # right name, wrong content
    torch.save(stored, path)
    with pytest.warns(UserWarning, match="regenerating"):
        shapes.load_or_generate(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(shapes.load_or_generate(cfg)["train"][0], first["train"][0])


def test_no_cache_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shapes.load_or_generate(tiny(cache_dir=""))
    assert os.listdir(tmp_path) == []
