"""Every N-body config trains for a few steps; the comparison script aggregates and resumes."""

import importlib.util
import json
import math

import pytest
import yaml
from run_kit import ROOT

pytest.importorskip("torch_geometric")

from ace.cli import main  # noqa: E402
from ace.config import load_config  # noqa: E402
from ace.experiment import run  # noqa: E402

NBODY_CONFIGS = sorted((ROOT / "configs").glob("nbody_*.yaml"))  # nbody.yaml's data variants
TINY = [
    "data.train_size=16",
    "data.val_size=8",
    "data.test_size=8",
    "train.batch_size=8",
    "train.eval_batch_size=8",
    "train.epochs=1",
    "train.max_steps=2",
    "train.eval_samples=1",
    "log.every=1",
    "log.progress=false",
]


def _compare():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "benchmarks" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("nbody_cache")


ALL = ("strict", "unconstrained", "penalty", "cr", "ace", "ace_resilient", "scheduled")
#: every N-body config and the methods it is measured with in the README
METHODS = {
    "nbody": ALL,
    "nbody_field": ("strict", "unconstrained", "ace", "ace_resilient"),
    "nbody_dev": ("ace_resilient", "scheduled"),
    "nbody_field_dev": ("ace_resilient", "scheduled"),
    "nbody_paper": ("ace", "ace_resilient"),
}


def test_one_config_per_data_variant():
    assert {p.stem for p in NBODY_CONFIGS} == set(METHODS) - {"nbody"} and (
        ROOT / "configs/nbody.yaml"
    ).exists()


@pytest.mark.parametrize("name", ["nbody", "nbody_dev"])
@pytest.mark.parametrize("method", ALL)
def test_the_field_config_is_its_symmetric_twin_but_for_the_field(name, method):
    field = load_config(
        ROOT / "configs" / f"{name.replace('nbody', 'nbody_field')}.yaml", [f"method={method}"]
    )
    twin = load_config(ROOT / "configs" / f"{name}.yaml", [f"method={method}"])
    assert field.data.field_strength > 0 == twin.data.field_strength
    field.data.field_strength = 0.0
    assert field == twin


# the field configs run the same code on other data (the test above): one of them runs here, the rest are slow
RUNS = [
    pytest.param(name, m, marks=pytest.mark.slow if name == "nbody_field" and m != "strict" else ())
    for name, methods in METHODS.items()
    for m in methods
]


@pytest.mark.parametrize(("name", "method"), RUNS)
def test_config_trains_a_few_steps(name, method, tmp_path, cache_dir):
    cfg = load_config(
        ROOT / "configs" / f"{name}.yaml", [*TINY, f"data.cache_dir={cache_dir}", f"method={method}"]
    )
    assert (cfg.data.field_strength != 0) == ("field" in name)
    assert (cfg.constraint.kind == "deviation") == ("dev" in name)
    summary = run(cfg, tmp_path / "run")
    assert summary["steps"] == 2
    test = summary["test"]
    assert math.isfinite(test["test/mse"]) and "test/deviation" in test
    if cfg.method != "strict":
        assert len(summary["gates"]) == cfg.model.layers
        assert test["test/eq/deviation"] < 1e-6 < test["test/deviation"] or cfg.method == "cr"
    if cfg.method in ("ace", "ace_resilient", "scheduled"):
        expected = {f"gate.layers.{i}" for i in range(cfg.model.layers)}
        assert set(summary["constraints"]) == (expected if cfg.constraint.kind == "gate" else {"deviation"})
        assert all("multiplier" in row for row in summary["constraints"].values())


@pytest.mark.parametrize("method", ["ace", "ace_resilient"])
def test_the_paper_recipe_steps_gates_and_multipliers_with_adam(method, cache_dir):
    import torch

    from ace.experiment import prepare_run

    overrides = [*TINY, f"data.cache_dir={cache_dir}", f"method={method}"]
    cfg = load_config(ROOT / "configs" / "nbody_paper.yaml", overrides)
    trainer, loaders = prepare_run(cfg, None)
    core = trainer.core
    (adam,) = core.optimizers
    held = {id(p) for group in adam.param_groups for p in group["params"]}
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 9.0e-4
    assert all(id(g) in held for g in core.gates.values()) and core.primal.gate_lr is None
    assert isinstance(core.duals.optimizer.dual_optimizers[0], torch.optim.Adam)
    assert core.dual.formulation == "lagrangian" and core.dual.scale == "none"
    assert core.primal.gate_max_step is None
    x = next(iter(loaders["train"]))
    before = {n: g.item() for n, g in core.gates.items()}
    trainer.train_step(x)
    # Adam's first step moves every gate by lr, and every multiplier by the dual lr (8e-4), whatever the
    # gradient
    for n, g in core.gates.items():
        assert abs(g.item() - before[n]) == pytest.approx(9.0e-4, rel=1e-3)
    multipliers = core.multipliers()["gate"]  # the violations gamma_i = 1 (and |gamma_i| - u_i = 1) > 0
    assert torch.allclose(multipliers, torch.full_like(multipliers, 8.0e-4), rtol=1e-3)


@pytest.mark.parametrize("method", ["strict", "ace"])
def test_issue_short_run_from_the_cli(method, tmp_path, cache_dir, capsys):
    args = [
        "train.epochs=2",
        "data.train_size=200",
        "data.val_size=100",
        "data.test_size=100",
        f"method={method}",
    ]
    config = str(ROOT / "configs" / "nbody.yaml")
    out = tmp_path / "run"
    args += [f"data.cache_dir={cache_dir}", "log.progress=false"]
    assert main(["train", config, "--out", str(out), *args]) == 0
    assert "test: " in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def _fake_summary(mse, eq_mse=None, gates=(), slack=None, wall=10.0, metric="mse", best=None, step=7):
    """A summary.json: final test values ``mse``/``eq_mse``; with ``best = (mse, eq_mse)`` also the test
    values at the best validation step (``selected``, model at ``step``, f_eq at ``step + 1``)."""
    test = {"step": 9, "epoch": 1, "test/loss": mse, f"test/{metric}": mse, "test/deviation": 0.5}
    if eq_mse is not None:
        test[f"test/eq/{metric}"] = eq_mse
        test["test/eq/deviation"] = 0.0
    constraints = {f"gate.g{i}": {"gate": g, "slack": slack} for i, g in enumerate(gates)} if slack else {}
    summary = {
        "test": test,
        "gates": {f"g{i}": g for i, g in enumerate(gates)},
        "constraints": constraints,
        "wall_time": wall,
    }
    if best is not None:
        model = {"step": step, "selected_on": "val/loss", "test": {"loss": best[0], metric: best[0]}}
        summary["selected"] = {"model": model}
        if best[1] is not None:
            summary["selected"]["eq"] = {
                "step": step + 1,
                "selected_on": "val/eq/loss",
                "test": {metric: best[1]},
            }
    return summary


def test_compare_aggregates_mean_and_sample_std():
    compare = _compare()
    summaries = {
        "strict": [
            _fake_summary(9.0, best=(1.0, None)),
            _fake_summary(9.0, wall=20.0, best=(3.0, None), step=9),
        ],
        "ace": [
            _fake_summary(2.0, 1.0, gates=(0.5, -1.0), slack=0.25, best=(1.5, 0.5)),
            _fake_summary(4.0, 3.0, gates=(0.0,), slack=0.75, best=(3.5, 2.5), step=20),
        ],
    }
    metrics, rows = compare.aggregate(summaries)
    assert metrics == ["mse"]
    strict, ace = rows
    assert strict["mse"] == strict["eq/mse"] == (2.0, pytest.approx(math.sqrt(2.0)))  # no gates: f_eq = model
    assert strict["final/mse"] == strict["final/eq/mse"] == (9.0, 0.0)
    assert strict["wall_time"] == (15.0, pytest.approx(math.sqrt(50.0)))
    assert (strict["best_step"], strict["eq/best_step"], strict["fallback"]) == (8, 8, 0)
    assert math.isnan(strict["max_abs_gate"][0])
    assert ace["mse"][0] == 2.5 and ace["eq/mse"][0] == 1.5 and ace["final/eq/mse"][0] == 2.0
    assert (ace["best_step"], ace["eq/best_step"]) == (13.5, 14.5)
    assert ace["max_abs_gate"][0] == 0.5 and ace["max_slack"][0] == 0.5
    table = compare.format_markdown(metrics, rows)
    header = table.splitlines()[0]
    assert "test mse (f_eq)" in header and "test mse (f_eq, final)" in header and "median best step" in header
    assert "| `strict` | 2 | 2 ± 1.4 | 2 ± 1.4 | 8 / 8 | 9 ± 0 |" in table
    assert "| `ace` | 2 | 2.5 ± 1.4 | 1.5 ± 1.4 | 13.5 / 14.5 | 3 ± 1.4 |" in table and "†" not in table
    accuracy = {"a": [_fake_summary(0.9, 0.8, metric="accuracy", best=(0.95, 0.85))]}
    assert compare.aggregate(accuracy)[0] == ["accuracy"]
    assert "test accuracy (relaxed)" in compare.format_markdown(*compare.aggregate(accuracy))


def test_compare_falls_back_to_final_values_for_older_summaries():
    compare = _compare()
    older = _fake_summary(2.0, 1.0, gates=(0.5,))  # no "selected": written before test at best validation
    assert compare.run_values(older, ["mse"]) | {"max_abs_gate": None} == {
        "selected": False,
        "best_step": None,
        "eq/best_step": None,
        "mse": 2.0,
        "eq/mse": 1.0,
        "final/mse": 2.0,
        "final/eq/mse": 1.0,
        "deviation": 0.5,
        "max_abs_gate": None,
        "max_slack": None,
        "wall_time": 10.0,
    }
    metrics, rows = compare.aggregate({"ace": [older, _fake_summary(4.0, 3.0, best=(3.0, 2.0))]})
    assert rows[0]["fallback"] == 1 and rows[0]["mse"][0] == 2.5 and rows[0]["best_step"] == 7
    table = compare.format_markdown(metrics, rows)
    assert "| `ace` | 2 | 2.5 ± 0.71 † | 1.5 ± 0.71 † | 7 / 8 |" in table
    assert table.splitlines()[-1].startswith("† seeds without `selected`") and "`ace` 1 of 2" in table


def test_compare_resolves_configs_and_methods(tmp_path):
    compare = _compare()
    runs = compare.resolve_targets(
        [
            "nbody_field:strict,ace",
            "nbody_field:ace",
            "nbody_dev",
            str(ROOT / "configs" / "toy.yaml"),
            "toy_relaxed",
        ],
        methods=["ace", "strict"],
    )
    assert [(r.name, r.path.stem, r.method) for r in runs] == [
        ("nbody_field_strict", "nbody_field", "strict"),
        ("nbody_field_ace", "nbody_field", "ace"),
        ("nbody_dev_ace", "nbody_dev", "ace"),
        ("nbody_dev_strict", "nbody_dev", "strict"),
        ("toy_ace", "toy", "ace"),
        ("toy_strict", "toy", "strict"),
        ("toy_relaxed_ace", "toy_relaxed", "ace"),
        ("toy_relaxed_strict", "toy_relaxed", "strict"),
    ]
    # no methods: the config's own, after the overrides
    (own,) = compare.resolve_targets(["toy"])
    assert (own.name, own.method) == ("toy_scheduled", None)
    (switched,) = compare.resolve_targets(["toy"], overrides=["method=unconstrained"])
    assert switched.name == "toy_unconstrained"
    # a per-method file of ace 0.1 (its stem ends in its method) keeps its name
    old = tmp_path / "toy_ace.yaml"
    old.write_text((ROOT / "configs" / "toy_relaxed.yaml").read_text())
    names = [r.name for r in compare.resolve_targets([str(old), f"{old}:strict"])]
    assert names == ["toy_ace", "toy_ace_strict"]
    with pytest.raises(SystemExit, match="config not found: no_such_config"):
        compare.resolve_targets(["no_such_config"])
    with pytest.raises(SystemExit, match="unknown method 'acee'"):
        compare.resolve_targets(["toy:acee"])


def test_compare_quick_run_writes_the_table_and_resumes(tmp_path, capsys):
    compare = _compare()
    argv = [str(ROOT / "configs" / "toy_relaxed.yaml:ace"), "--quick", "--seeds", "2", "--out", str(tmp_path)]
    assert compare.main(argv) == 0
    first = capsys.readouterr()
    assert "| `toy_relaxed_ace` | 2 |" in first.out and "training 2 run(s)" in first.err
    assert (tmp_path / "table.md").read_text().startswith("`python benchmarks/compare.py")
    summary = tmp_path / "toy_relaxed_ace" / "seed1" / "summary.json"
    stamp = summary.stat().st_mtime_ns
    assert compare.main(argv) == 0
    assert "training" not in capsys.readouterr().err
    assert summary.stat().st_mtime_ns == stamp
    result = json.loads((tmp_path / "results.json").read_text())["toy_relaxed_ace"][1]
    assert result["selected"] is True and result["mse"] is not None and result["final/mse"] is not None
    assert 1 <= result["best_step"] <= 3 and "†" not in first.out
    # --table-only trains nothing: a third seed is missing, so it is left out and the table keeps two
    assert compare.main([*argv[:-4], "--seeds", "3", "--out", str(tmp_path), "--table-only"]) == 0
    third = capsys.readouterr()
    assert "| `toy_relaxed_ace` | 2 |" in third.out and "1 unfinished run(s) left out" in third.err
    assert not (tmp_path / "toy_relaxed_ace" / "seed2").exists()


def test_compare_data_seeds_give_each_seed_its_own_data(tmp_path, capsys):
    compare = _compare()
    argv = [
        "images:unconstrained",
        "data.seed=5",
        "--quick",
        "--seeds",
        "2",
        "--data-seeds",
        "--out",
        str(tmp_path),
    ]
    assert compare.main(argv) == 0
    seeds = [
        yaml.safe_load((tmp_path / "images_unconstrained" / f"seed{s}" / "config.yaml").read_text())
        for s in (0, 1)
    ]
    assert [(c["seed"], c["data"]["seed"]) for c in seeds] == [(0, 5), (1, 6)]
    with pytest.raises(ValueError, match="has no data.seed"):
        compare.main(["toy_relaxed:ace", "--quick", "--data-seeds", "--out", str(tmp_path / "toy")])
