"""Smoke tests of the benchmark scripts: each runs with tiny sizes and prints its table (no timing checks)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from run_kit import ROOT

BENCHMARKS = ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()  # the scripts pin one thread for stable timings
    yield
    torch.set_num_threads(threads)


def test_overhead_quick(capsys):
    pytest.importorskip("torch_geometric")
    rows = _load("overhead").main(["--quick", "--models", "nbody", "--samples", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert "| model" in "\n".join(out) and "deviation k=1" in "\n".join(out)
    assert out[-1].startswith("gate-constraint ratio (trainer / plain loop): nbody ")
    assert {r[1] for r in rows} >= {"gate (ACE)", "gate, log every 1", "deviation k=1"}
    ops = {r[1]: [float(n) for n in r[7].split(" / ")] for r in rows}  # plain / trainer
    assert 0 < ops["gate (ACE)"][0] < ops["gate (ACE)"][1] < ops["deviation k=1"][1]


def test_deviation_quick(capsys):
    pytest.importorskip("torch_geometric")
    rows = _load("deviation").main(["--quick"])
    out = capsys.readouterr().out
    assert "fwd ratio" in out and "deviation saved MB" in out
    assert [(r[0], r[1]) for r in rows] == [(m, k) for m in ("nbody-egnn", "toy-mlp") for k in (1, 2)]


def test_data_quick(capsys):
    pytest.importorskip("torch_geometric")
    rows = _load("data").main(["--quick"])
    out = capsys.readouterr().out
    assert "generate CPU s" in out
    assert [r[0] for r in rows] == ["nbody", "shapes"]


def test_gconv_cost_table(capsys):
    _load("gconv_cost").main()
    out = capsys.readouterr().out
    assert "| C4() group CNN | 8 x 4" in out and "| plain CNN      | 32" in out


def test_scaling_table_fits_the_exponent(tmp_path, capsys):
    import json

    for n, err in ((100, 0.4), (400, 0.2), (1600, 0.1)):
        for seed in range(2):
            run = tmp_path / f"n{n}" / "cfg" / f"seed{seed}"
            run.mkdir(parents=True)
            # the relaxed model at error ~ n^-1/2, its f_eq at ~ n^-1
            eq = {"step": 1, "test": {"mse": err**2}}
            summary = {"selected": {"model": {"step": 1, "test": {"mse": err}}, "eq": eq}}
            (run / "summary.json").write_text(json.dumps(summary))
    runs = ["--runs", *(f"{n}={tmp_path / f'n{n}'}" for n in (100, 400, 1600))]
    _load("scaling").main(["cfg", *runs, "--variant", "model"])
    out = capsys.readouterr().out
    assert "| `cfg`  | 0.4 ± 0 (2) |" in out and "0.50 [0.50, 0.50]" in out
    _load("scaling").main(["cfg", *runs])  # f_eq by default
    assert "1.00 [1.00, 1.00]" in capsys.readouterr().out
    _load("scaling").main(["cfg", *runs, "--variant", "model", "--one-minus"])  # 0.6, 0.8, 0.9
    assert "| `cfg`  | 0.6 ± 0 (2) |" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is not None:
        _load("scaling").main(["cfg", *runs, "--plot", str(tmp_path / "scaling.png")])
        assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_alignment_tabulates_and_plots_a_tolerance_sweep_per_data_set(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from run_kit import CONFIGS, TINY

    from ace.config import load_config
    from ace.experiment import run

    sizes = ["data.train_size=16", "data.val_size=16", "data.test_size=16", "train.epochs=1"]  # one step
    tiny = [o for o in TINY if not o.startswith(("data.", "train.epochs"))] + sizes
    for breaking in (0.0, 0.5):  # the folders of two `ace sweep`s over data.breaking
        grid = [("free", f"method={m}") for m in ("unconstrained", "ace_resilient")]
        grid += [("eps", f"constraint.tolerance.end={e}") for e in ("1.0e-3", "1.0e-1")]
        grid += [("strict", "method=strict model.name=equivariant")]
        for sweep, override in grid:
            overrides = [*tiny, f"data.breaking={breaking}", *override.split()]
            out = tmp_path / sweep / f"{breaking}_{override.split()[0]}"
            run(load_config(CONFIGS / "toy.yaml", overrides), out)
    capsys.readouterr()
    args = ["--free", str(tmp_path / "free"), "--eps", str(tmp_path / "eps"), "--level", "data.breaking"]
    args += ["--strict", str(tmp_path / "strict")]
    sweeps = _load("alignment").main([*args, "--samples", "2", "--out", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert "| eps 0.001 | eps 0.1 |" in out.replace("  ", "")
    assert [s.label for s in sweeps] == ["breaking 0", "breaking 0.5"]
    for s in sweeps:
        assert list(s.tolerances) == [1e-3, 1e-1] and None not in (s.free, s.strict, s.chosen_slack)
        best = 0.0 if s.strict < min(s.metrics) else s.tolerances[s.metrics.index(min(s.metrics))]
        assert s.best_tolerance == best
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "tolerance_sweep.png",
        "tolerance_vs_asymmetry.png",
    ]


def _fake_long_run(path, val, gates, test):
    path.mkdir(parents=True)
    lines = [{"step": s, "loss": 1.0, "gate/layers.0": g, "gate/layers.1": -g / 2} for s, g in gates]
    lines += [{"step": s, "val/loss": v, "val/mse": v, "val/eq/mse": v} for s, v in val]
    (path / "metrics.jsonl").write_text("\n".join(__import__("json").dumps(r) for r in lines) + "\n")
    summary = {"selected": {"eq": {"test": {"mse": test}}}}
    (path / "summary.json").write_text(__import__("json").dumps(summary))


def test_long_budget_table_reads_crossings_and_the_convergence_claim(tmp_path, capsys, monkeypatch):
    for seed, offset in ((0, 0.0), (1, 0.1)):
        _fake_long_run(tmp_path / "strict" / f"seed{seed}", [(10, 3.0), (20, 2.0 + offset)], [], 2.0 + offset)
        gates = [(1, 1.0), (5, 0.05), (8, 0.02), (9, 0.005), (12, 0.001)]
        _fake_long_run(tmp_path / "ace" / f"seed{seed}", [(10, 1.5), (20, 1.0)], gates, 1.9 + offset)
    monkeypatch.setattr(
        sys, "argv", ["long_budget.py", str(tmp_path), "strict", "ace", "--plot", str(tmp_path / "p.png")]
    )
    _load("long_budget").main()
    rows = {
        line.split("|")[1].strip(): line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| `")
    }
    cells = [c.strip() for c in rows["`ace`"].split("|")[1:-1]]
    assert cells[1] == "2" and cells[3] == "-0.1, -0.1"  # paired with strict, seed by seed
    assert cells[4:7] == ["5, 5", "9, 9", "8, 8"]  # below 0.1 at 5, below 0.01 at 9, last above 0.01 at 8
    assert cells[7] == "10, 10"  # f_eq reaches strict's best validation (2.0, 2.1) at its first validation
    assert (tmp_path / "p.png").stat().st_size > 0


def test_run_cost_quick(capsys):
    rows = _load("run_cost").main(["--quick", "--tasks", "toy"])
    assert [r[1] for r in rows] == [
        "strict",
        "ace",
        "ace, closing gates",
        "ace, read-out at the end",
        "unconstrained",
    ]
    assert rows[0][3] == "1.00" and rows[0][6] == "1.00"  # strict against itself
    assert all(0 <= float(r[5]) <= float(r[4]) for r in rows)  # the evaluations are part of the run
    assert "| task | method | ms a step" in capsys.readouterr().out
