"""Every point-cloud config runs a few steps from its YAML, the way `ace train CONFIG` reads it."""

import pytest
from run_kit import ROOT

from ace.config import load_config
from ace.experiment import run

CONFIGS = ROOT / "configs"
SHAPES = sorted(CONFIGS.glob("shapes_*.yaml"))
# Tiny everything: a smoke test of config -> data -> (relaxed) model -> constraints -> trainer, not a fit.
TINY = [
    "data.num_points=16",
    "train.batch_size=4",
    "train.max_steps=2",
    "train.eval_batch_size=8",
    "train.eval_samples=1",
    "log.every=1",
    "log.progress=false",
    "model.hidden_irreps=4x0e+2x0o+2x1o+2x1e",
    "model.num_layers=2",
    "model.lmax=1",
    "model.num_neighbors=4",
    "model.radial_hidden=8",
    "model.readout_hidden=8",
    "model.branch_hidden=8",
]
#: every point-cloud config and the methods it is measured with in the README
METHODS = {
    "shapes": ("strict", "unconstrained", "ace", "ace_resilient"),
    "shapes_upright": ("strict", "unconstrained", "ace", "ace_resilient"),
    "shapes_dev": ("scheduled", "ace_resilient"),
    "shapes_upright_dev": ("scheduled", "ace_resilient"),
}


def test_one_config_per_data_variant():
    assert {p.stem for p in SHAPES} == set(METHODS) - {"shapes"}
    assert (CONFIGS / "shapes.yaml").exists() and (CONFIGS / "modelnet40.yaml").exists()


@pytest.mark.parametrize("name", ["shapes", "shapes_dev"])
@pytest.mark.parametrize("method", ["strict", "ace", "ace_resilient", "scheduled"])
def test_the_upright_config_is_its_twin_but_for_the_rotation(name, method):
    upright = name.replace("shapes", "shapes_upright")
    a, b = (load_config(CONFIGS / f"{n}.yaml", [f"method={method}"]) for n in (name, upright))
    assert (a.data.rotation, b.data.rotation) == ("so3", "upright")
    b.data.rotation = "so3"
    assert a == b


# the upright twins run the same code on other data (the test above): one of them runs here, the rest are slow
RUNS = [
    pytest.param(name, m, marks=pytest.mark.slow if "upright" in name and m != "strict" else ())
    for name, methods in METHODS.items()
    for m in methods
]


@pytest.mark.parametrize(("name", "method"), RUNS)
def test_shapes_config_runs_a_few_steps(name, method, tmp_path):
    overrides = [
        "data.train_size=8",
        "data.val_size=4",
        "data.test_size=4",
        f"data.cache_dir={tmp_path / 'cache'}",
        *TINY,
        f"method={method}",
    ]
    cfg = load_config(CONFIGS / f"{name}.yaml", overrides)
    summary = run(cfg, tmp_path / "run")
    assert summary["steps"] == 2
    assert "test/accuracy" in summary["test"]
    gated = cfg.method != "strict"
    assert ("test/eq/accuracy" in summary["test"]) == gated
    assert len(summary["gates"]) == (cfg.model.num_layers if gated else 0)
    if cfg.method in ("ace", "ace_resilient") and cfg.constraint.kind == "gate":
        assert {f"gate.layers.{i}" for i in range(2)} <= set(summary["constraints"])
    if cfg.method == "ace_resilient":
        assert all("slack" in row for row in summary["constraints"].values())


def test_modelnet40_config_validates_and_runs_on_a_fabricated_folder(tmp_path):
    from test_modelnet import BOX, BOX_FACES, TETRA, TETRA_FACES, write_off

    cfg = load_config(CONFIGS / "modelnet40.yaml")
    assert cfg.task.name == "modelnet40" and cfg.method == "ace"
    for name, (vertices, faces) in {"box": (BOX, BOX_FACES), "tetra": (TETRA, TETRA_FACES)}.items():
        for split, count in (("train", 3), ("test", 2)):
            folder = tmp_path / "raw" / name / split
            folder.mkdir(parents=True)
            for i in range(count):
                write_off(folder / f"{name}_{i + 1:04d}.off", vertices, faces, 1 + 0.5 * i)
    cfg = load_config(CONFIGS / "modelnet40.yaml", [f"data.root={tmp_path}", "data.val_size=2", *TINY])
    summary = run(cfg, tmp_path / "run")
    assert summary["steps"] == 2 and "test/eq/accuracy" in summary["test"]
