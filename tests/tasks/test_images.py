"""The images task: digits under the grid groups, exactly invariant group CNNs, every config runs."""

import pytest
import torch
from run_kit import ROOT

pytest.importorskip("sklearn")

import ace  # noqa: E402
from ace.config import load_config  # noqa: E402
from ace.experiment import run  # noqa: E402
from ace.tasks import images  # noqa: E402

CONFIGS = ROOT / "configs"
#: every images config and the methods it is measured with in the README
METHODS = {
    "images": ("strict", "unconstrained", "ace", "ace_resilient", "scheduled"),
    "images_partial": ("strict", "unconstrained", "ace", "ace_resilient", "scheduled"),
    "images_dev": ("unconstrained", "scheduled", "ace_resilient"),
    "images_partial_dev": ("unconstrained", "scheduled", "ace_resilient"),
}
# every (config, method) runs in the slow suite; the default suite runs one method per config (the rest are
# other methods on the same code, which the other tasks' config tests cover)
FAST = {
    ("images", "strict"),
    ("images", "ace_resilient"),
    ("images_partial", "ace"),
    ("images_dev", "scheduled"),
}
RUNS = [
    pytest.param(name, m, marks=() if (name, m) in FAST else pytest.mark.slow)
    for name, methods in METHODS.items()
    for m in methods
]


def task(**data):
    return images.build(images.DataConfig(**data), images.ModelConfig(), seed=0)


def test_variants_label_and_pose_the_digits_as_documented():
    originals = images.load_digits()[0]
    sym = task()
    labels = torch.cat([sym.train.tensors[1], sym.val.tensors[1], sym.test.tensors[1]])
    assert set(labels.tolist()) == set(range(9))  # 9 merged into 6
    part = task(variant="partial")
    x, y = part.train.tensors
    assert set(y.tolist()) == set(range(10))
    upright = lambda img: bool((originals == img[0]).flatten(1).all(1).any())  # noqa: E731
    assert all(upright(img) for img, label in zip(x, y) if label in (6, 9))  # 6 and 9 are never turned
    others = [upright(img) for img, label in zip(x, y) if label not in (6, 9)]
    assert 0.15 < sum(others) / len(others) < 0.4  # a quarter of the rest drew the identity


@pytest.mark.parametrize("group", ["c4", "d4"])
@pytest.mark.parametrize("name", ["gcnn", "e4"])
def test_group_networks_are_exactly_invariant(group, name):
    t = images.build(images.DataConfig(group=group), images.ModelConfig(name=name), seed=0)
    x = t.train.tensors[0][:8].double()
    assert ace.testing.assert_equivariant(t.model.double(), x, t.symmetry, samples=4, atol=1e-12) < 1e-12


def test_the_relaxed_group_cnn_has_bounded_convolution_branches_and_a_measurable_plain_cnn():
    t = task()
    model = ace.relax(t.model, where=t.relax_where, branch=t.relax_branch, example=t.example)
    assert len(ace.gates(model)) == 2 and all(
        ace.bound.is_bounded(m.branch) for m in model.modules() if isinstance(m, ace.GatedLayer)
    )
    cnn = images.build(images.DataConfig(), images.ModelConfig(name="cnn"), seed=0)
    x = cnn.train.tensors[0][:32].double()
    assert ace.equivariance_deviation(cnn.model.double(), x, cnn.symmetry, samples=4, relative=True) > 1e-8


def test_bad_sizes_are_named():
    with pytest.raises(
        ValueError, match="train \\+ val \\+ test = 2000 images, but the digits set holds 1797"
    ):
        images.DataConfig(train_size=1500, val_size=300, test_size=200)
    with pytest.raises(ValueError, match="odd positive integer"):
        images.ModelConfig(kernel_size=4)


def test_one_config_per_data_variant():
    assert {p.stem for p in CONFIGS.glob("images*.yaml")} == set(METHODS)


@pytest.mark.parametrize(("name", "method"), RUNS)
def test_images_config_runs_a_few_steps(name, method, tmp_path):
    tiny = [
        "data.train_size=16",
        "data.val_size=8",
        "data.test_size=8",
        "train.batch_size=8",
        "train.max_steps=2",
        "train.epochs=0",
        "log.every=1",
        "log.progress=false",
    ]
    summary = run(load_config(CONFIGS / f"{name}.yaml", [*tiny, f"method={method}"]), tmp_path / "run")
    assert summary["steps"] == 2 and 0 <= summary["test"]["test/accuracy"] <= 1
