import os

import pytest
import torch

from ace.tasks.e3nn_net import ModelConfig
from ace.tasks.modelnet import DataConfig, build, categories

SMALL = ModelConfig(
    hidden_irreps="4x0e+2x0o+2x1o+2x1e", num_layers=2, radial_hidden=8, readout_hidden=8, branch_hidden=8
)

BOX = [(x, y, z) for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]
BOX_FACES = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]  # quads
TETRA = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]
TETRA_FACES = [(0, 2, 1), (0, 1, 3), (0, 3, 2), (1, 2, 3)]


def write_off(path, vertices, faces, scale, glued=False):
    # Some ModelNet files lack the newline after "OFF"; torch_geometric's reader copes, and so must we.
    head = "OFF" if glued else "OFF\n"
    lines = [f"{head}{len(vertices)} {len(faces)} 0"]
    lines += [" ".join(f"{scale * c:.4f}" for c in v) for v in vertices]
    lines += [f"{len(f)} " + " ".join(map(str, f)) for f in faces]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def root(tmp_path):
    """A ModelNet-layout folder: raw/<class>/{train,test}/<class>_0001.off, two classes."""
    for name, (vertices, faces) in {"box": (BOX, BOX_FACES), "tetra": (TETRA, TETRA_FACES)}.items():
        for split, count in (("train", 4), ("test", 2)):
            folder = tmp_path / "raw" / name / split
            folder.mkdir(parents=True)
            for i in range(count):
                write_off(folder / f"{name}_{i + 1:04d}.off", vertices, faces, 1 + 0.5 * i, glued=i == 0)
    return tmp_path


def test_reads_a_local_modelnet_folder(root):
    assert categories(str(root)) == ["box", "tetra"]
    task = build(DataConfig(root=str(root), num_points=32, val_size=2), SMALL, seed=0)
    assert (len(task.train), len(task.val), len(task.test)) == (6, 2, 4)
    assert os.path.exists(root / "processed" / "training.pt")
    labels = sorted(d.y.item() for d in task.train + task.val)
    assert labels == [0, 0, 0, 0, 1, 1, 1, 1]
    for item in task.train + task.test:
        assert item.pos.shape == (32, 3) and item.y.shape == (1,)
        assert torch.allclose(item.pos.mean(0), torch.zeros(3), atol=1e-6)
        assert abs(item.pos.norm(dim=-1).max().item() - 1.0) < 1e-6
    box = next(d for d in task.test if d.y.item() == 0)
    low, high = box.pos.min(0).values, box.pos.max(0).values
    on_face = ((box.pos - low).abs() < 1e-5) | ((box.pos - high).abs() < 1e-5)
    assert on_face.any(dim=-1).all()  # sampled on the faces of the (axis-aligned) box
    assert task.model(task.example).shape == (4, 2)


def test_sampling_is_seeded_and_rotation_only_changes_the_pose(root):
    cfg = dict(root=str(root), num_points=16, val_size=1, train_size=3, test_size=2)
    a = build(DataConfig(**cfg), SMALL, seed=0)
    b = build(DataConfig(**cfg), SMALL, seed=1)
    assert len(a.train) == 3 and len(a.test) == 2
    assert all(torch.equal(x.pos, y.pos) for x, y in zip(a.train + a.test, b.train + b.test))
    rotated = build(DataConfig(**cfg, rotation="so3"), SMALL, seed=0)
    for x, y in zip(a.train, rotated.train):
        assert not torch.allclose(x.pos, y.pos, atol=1e-3)
        assert torch.allclose(x.pos @ x.pos.T, y.pos @ y.pos.T, atol=1e-5)  # same cloud, other pose


def test_missing_folder_is_a_clear_error_not_a_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="raw/<class>/train"):
        build(DataConfig(root=str(tmp_path / "nowhere")), SMALL, seed=0)


def test_config_validation(root):
    with pytest.raises(ValueError, match="rotation"):
        DataConfig(rotation="so2")
    with pytest.raises(ValueError, match="name"):
        DataConfig(name="20")
    with pytest.raises(ValueError, match="num_points"):
        DataConfig(num_points=0)
    with pytest.raises(ValueError, match="val_size"):
        build(DataConfig(root=str(root), val_size=8), SMALL, seed=0)
