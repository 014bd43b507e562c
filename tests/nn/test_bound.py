"""Bounded branches: the bound ||f_neq(x)|| <= ||x|| + L holds after training a branch to break it."""

import copy

import pytest
import torch
from torch import nn

import ace
from ace.nn import MLPBranch, bound_branch, branch_bound, is_bounded


def grow(branch: nn.Module, x: torch.Tensor, steps: int = 300) -> None:
    """Train ``branch`` to make its output as large as it can."""
    opt = torch.optim.Adam(branch.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        (-branch(x).norm(dim=-1).mean()).backward()
        opt.step()


@pytest.mark.parametrize("normalize", [True, False])
def test_bound_holds_after_maximising_the_output(normalize):
    torch.manual_seed(0)
    branch = MLPBranch(4, 3, hidden=16)
    if normalize:
        bound_branch(branch)
    x = torch.randn(256, 4)
    grow(branch, x)
    with torch.no_grad():  # the weights settle: the power iteration catches up with the last updates
        for _ in range(30):
            branch(x)
    branch.eval()
    probe = torch.cat([x, 5 * torch.randn(256, 4)])
    with torch.no_grad():
        ratio = (branch(probe).norm(dim=-1) / (probe.norm(dim=-1) + 2)).max().item()  # L = 2 linear layers
    if normalize:
        assert branch_bound(branch) == 2
        assert ratio <= 1 + 1e-3
        assert ratio > 0.5  # the maximisation pushed the branch close to its bound
        for m in branch.modules():  # every linear map has operator norm 1 and bias norm <= 1
            if isinstance(m, nn.Linear):
                assert torch.linalg.matrix_norm(m.weight, 2).item() == pytest.approx(1.0, abs=1e-3)
                assert m.bias.norm().item() <= 1 + 1e-6
    else:
        assert ratio > 10  # a free branch grows without limit: the gate alone says nothing


def test_relax_bounds_every_branch_of_the_tasks():
    from ace.tasks.e3nn_net import PointBranch
    from ace.tasks.egnn import EGNNBranch

    for branch in (EGNNBranch(8, 16), PointBranch(5, 7, 16), MLPBranch(3, 2)):
        bound_branch(branch)
        assert is_bounded(branch) and branch_bound(branch) >= 2
    model = ace.relax(nn.Sequential(nn.Linear(3, 3)), where=["0"])
    assert is_bounded(model[0].branch)
    free = ace.relax(nn.Sequential(nn.Linear(3, 3)), where=["0"], normalize="none")
    assert not is_bounded(free[0].branch)


def test_branches_of_unknown_scale_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="cannot bound branch module '1' \\(Conv1d\\)"):
        bound_branch(nn.Sequential(nn.Linear(2, 2), nn.Conv1d(1, 1, 1)))
    with pytest.raises(ValueError, match="Sigmoid"):  # sigmoid(0) = 0.5: not a shrinking activation
        bound_branch(nn.Sequential(nn.Linear(2, 2), nn.Sigmoid()))
    branch = bound_branch(MLPBranch(2, 2))
    with pytest.raises(ValueError, match="already bounded"):
        bound_branch(branch)
    with pytest.raises(ValueError, match="normalize must be one of"):
        ace.relax(nn.Sequential(nn.Linear(3, 3)), where=["0"], normalize="weight")


def test_one_normalisation_per_step_so_the_deviation_sees_one_function():
    # a relaxed layer whose branch is zeroed by its gate contributes nothing; with the gate on, the deviation
    # of an invariant-in-disguise model is measured against the same normalised weights as the loss
    torch.manual_seed(0)
    model = ace.relax(nn.Sequential(nn.Linear(2, 2, bias=False)), where=["0"])
    sym = ace.Symmetry(ace.groups.Cyclic(1), inputs="vector", output="vector")  # the trivial group: D = 0
    x = torch.randn(8, 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x), batch_size=8)
    trainer = ace.Trainer(
        model,
        nn.functional.mse_loss,
        torch.optim.SGD(model.parameters(), lr=0.1),
        symmetry=sym,
        constraints=[ace.DeviationConstraint(tolerance=0.0)],
        log_every=1,
        progress=False,
    )
    trainer.fit(loader, max_steps=3, print_summary=False)
    # under the trivial group f(g.x) = f(x) exactly, unless two forward passes saw different weights
    assert all(r["constraint/deviation/deviation"] == 0.0 for r in trainer.history if "loss" in r)


def test_a_convolutional_branch_stays_bounded_after_maximising_its_output():
    torch.manual_seed(0)
    branch = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.SiLU(), nn.Conv2d(8, 3, 5, padding=2, bias=False)
    )
    free = copy.deepcopy(branch)
    bound_branch(branch)
    x = torch.randn(16, 3, 12, 12)
    for net in (branch, free):
        opt = torch.optim.Adam(net.parameters(), 1e-2)
        for _ in range(200):
            opt.zero_grad()
            (-net(x).pow(2).sum()).backward()
            opt.step()
    with torch.no_grad():
        ratio = lambda net: float((net(x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).max())  # noqa: E731
        assert ratio(branch) <= 1 + 1e-3 < 10 < ratio(free)
    with pytest.raises(ValueError, match="nn.Conv2d \\(zero padding\\)"):
        bound_branch(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular")))
