"""Export: the exported f_eq is exactly equivariant."""

import torch
from run_kit import CONFIGS, TINY

from ace import experiment
from ace.cli import main
from ace.config import load_config
from ace.export import export
from ace.symmetry import assert_equivariant


def test_export_writes_an_exactly_equivariant_model(runs, tmp_path, capsys):
    gated, plain = runs
    out = tmp_path / "feq.pt"
    assert main(["export", str(gated), str(out), "--equivariant"]) == 0
    assert "equivariance error" in capsys.readouterr().out
    model = torch.load(out, weights_only=False)
    state = torch.load(tmp_path / "feq.state_dict.pt", weights_only=True)
    assert not any("gate" in k or "branch" in k for k in state)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    cfg = load_config(CONFIGS / "toy_relaxed.yaml", TINY)
    x = experiment.build_task(cfg).val.tensors[0]
    symmetry = experiment.build_task(cfg).symmetry
    assert assert_equivariant(model, x, symmetry, samples=8) < 1e-8

    errors = export(gated, tmp_path / "relaxed.pt")
    assert errors["max_abs_error"] > 1e-6  # the relaxed model keeps its symmetry-breaking branches
    assert main(["export", str(plain), str(tmp_path / "x.pt"), "--equivariant"]) == 1
    assert "no gated layers" in capsys.readouterr().err
