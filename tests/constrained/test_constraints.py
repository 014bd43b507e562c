"""The constraint settings: the fixed penalty's formula, the deviation measured as configured, a tolerance
schedule checked far past its start."""

import pytest
import torch
from torch import nn

import ace
from ace.symmetry.deviation import equivariance_deviation

SO2 = ace.Symmetry(ace.groups.SO2(), inputs="vector", output="vector")


def test_a_fixed_penalty_is_w_relu_g_for_an_inequality_and_w_abs_g_for_an_equality():
    violation = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    inequality = ace.DeviationConstraint(penalty=3.0)
    equality = ace.GateConstraint(penalty=3.0, equality=True)
    assert inequality.penalty_term(violation).item() == 3.0 * 2.5
    assert equality.penalty_term(violation).item() == 3.0 * 3.5


def test_the_deviation_is_measured_with_the_constraints_samples_and_relative_and_reuses_the_output():
    torch.manual_seed(0)
    model = nn.Linear(2, 2).double()  # not rotation-equivariant: a deviation > 0
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(8, 2, dtype=torch.float64)
    for relative in (False, True):
        constraint = ace.DeviationConstraint(samples=3, relative=relative)
        expected = equivariance_deviation(
            model, x, SO2, samples=3, relative=relative, generator=torch.Generator().manual_seed(1)
        )
        output = model(x)
        calls.clear()
        measured = constraint.measure(model, x, SO2, torch.Generator().manual_seed(1), output=output)
        assert measured.shape == (1,) and measured.item() == expected.item() > 0
        assert len(calls) == 1  # the transformed inputs in one batch: the given output saves a pass
    absolute = ace.DeviationConstraint().measure(model, x, SO2, torch.Generator().manual_seed(1))
    assert absolute.item() != measured.item()


def test_a_tolerance_schedule_that_goes_negative_late_is_refused():
    with pytest.raises(ValueError, match="goes down to"):
        ace.GateConstraint(tolerance=lambda t: 1.0 - t / 5000)
    ace.GateConstraint(tolerance=lambda t: 1.0 / (1 + t))  # positive for ever: accepted


def test_a_fractional_number_of_samples_is_refused():
    with pytest.raises(ValueError, match="constraint 'deviation': samples must be an integer >= 1, got 2.5"):
        ace.DeviationConstraint(samples=2.5)
