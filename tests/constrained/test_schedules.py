import dataclasses
import math

import numpy as np
import pytest

from ace.config.schedule_specs import schedule_from_config, to_config
from ace.constrained.schedules import (
    Constant,
    Cosine,
    Geometric,
    Join,
    Linear,
    Piecewise,
    Schedule,
    Triangular,
    is_nonincreasing,
)


def values(schedule: Schedule, n: int) -> np.ndarray:
    return np.array([schedule(t) for t in range(n)])


def test_constant():
    np.testing.assert_array_equal(values(Constant(0.3), 5), np.full(5, 0.3))


def test_linear_with_delay():
    # hold 1.0 for 3 steps, ramp to 0.2 over 4 steps, then hold
    expected = np.concatenate([np.full(3, 1.0), 1.0 + (0.2 - 1.0) * np.arange(4) / 4, np.full(4, 0.2)])
    got = values(Linear(1.0, 0.2, steps=4, delay=3), 11)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)
    assert got[0] == 1.0 and got[3] == 1.0 and got[7] == 0.2 and got[-1] == 0.2  # exact endpoints


def test_cosine():
    t = np.arange(12)
    w = np.clip((t - 2) / 8, 0, 1)
    expected = 0.3 + (0.1 - 0.3) * (1 - np.cos(np.pi * w)) / 2
    got = values(Cosine(0.3, 0.1, steps=8, delay=2), 12)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)
    assert got[2] == 0.3 and got[10] == 0.1
    assert got[6] == pytest.approx(0.2)  # half way


def test_geometric_is_log_linear():
    got = values(Geometric(1e-1, 1e-4, steps=6), 8)
    expected = 10.0 ** np.concatenate([np.linspace(-1, -4, 7), [-4]])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got[0] == 1e-1 and got[6] == 1e-4
    ratios = got[1:7] / got[:6]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-12)  # the same factor every step


def test_triangular():
    got = values(Triangular(0.1, 0.5, steps=4, delay=1), 8)
    expected = [0.1, 0.1, 0.3, 0.5, 0.3, 0.1, 0.1, 0.1]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)
    assert got[3] == 0.5 and got[5] == 0.1
    falling = Triangular(0.7, 0.1, steps=2)  # 0.7 + (0.1 - 0.7) != 0.1 in floats: the peak is exact
    assert falling(1) == 0.1 and Triangular(0.1, 0.5, steps=0)(0) == 0.1


def test_piecewise():
    got = values(Piecewise(boundaries=(2, 5), values=(1.0, 0.5, 0.0)), 7)
    np.testing.assert_array_equal(got, [1.0, 1.0, 0.5, 0.5, 0.5, 0.0, 0.0])


def test_zero_steps_jumps_at_delay():
    np.testing.assert_array_equal(values(Linear(1.0, 0.0, steps=0, delay=2), 4), [1.0, 1.0, 0.0, 0.0])


def test_join_runs_each_phase_on_its_own_clock():
    s = Join(((Constant(0.5), 3), (Linear(0.5, 0.1, steps=4), 4), (Constant(0.1), 2)))
    expected = [0.5, 0.5, 0.5, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1]  # last phase keeps running
    np.testing.assert_allclose(values(s, 11), expected, rtol=0, atol=1e-15)
    listed = Join([[Constant(1.0), "2"], [Constant(0.0), 2.0]])  # lists and numeric strings, as YAML gives
    assert listed == Join(((Constant(1.0), 2), (Constant(0.0), 2))) and listed(1) == 1.0 and listed(2) == 0.0


def test_auto_start():
    s = Join(((Constant("auto"), 2), (Linear("auto", 0.0, steps=2), 2)))
    assert s.needs_start
    with pytest.raises(ValueError, match="resolve"):
        s(0)
    resolved = s.resolve(start=0.8)
    assert not resolved.needs_start and s.needs_start  # a copy, the original is unchanged
    np.testing.assert_allclose(values(resolved, 5), [0.8, 0.8, 0.8, 0.4, 0.0])
    assert Linear(1.0, 0.0, 3).resolve(start=5.0) == Linear(1.0, 0.0, 3)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Linear(1.0, 0.0, 3).start = 2.0


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: Linear(1.0, 0.0, steps=-1), "Linear: 'steps' must be a non-negative integer, got -1"),
        (lambda: Cosine(1.0, 0.0, steps=5, delay=-2), "Cosine: 'delay'"),
        (lambda: Linear(1.0, 0.0, steps=2.5), "Linear: 'steps'"),
        (
            lambda: Linear("fast", 0.0, steps=2),
            "Linear: 'start' must be a finite number or \"auto\", got 'fast'",
        ),
        (lambda: Linear(1.0, "auto", steps=2), "Linear: 'end' must be a finite number, got 'auto'"),
        (lambda: Constant(math.nan), "Constant: 'value'"),
        (lambda: Geometric(1.0, 0.0, steps=3), "Geometric: 'end'"),
        (lambda: Geometric(-1.0, 0.1, steps=3), "Geometric: 'start'"),
        (lambda: Piecewise((1, 2), (1.0, 0.5)), "values"),
        (lambda: Piecewise((3, 2), (1.0, 0.5, 0.1)), "boundaries"),
        (lambda: Triangular(0.0, None, steps=3), "Triangular: 'peak' must be a finite number, got None"),
        (lambda: Triangular("x", 1.0, steps=3), "Triangular: 'low'"),
        (lambda: Triangular(0.0, 1.0, steps=-3), "Triangular: 'steps'"),
        (lambda: Triangular(0.0, 1.0, steps=3, delay=0.5), "Triangular: 'delay'"),
        (lambda: Join(()), "phases"),
        (lambda: Join(((0.1, 3),)), "phases"),
        (lambda: Join([(Constant(0.1), -1)]), "Join: 'length'"),
        (lambda: Join(0.1), "Join: 'phases' must be a sequence"),
        (lambda: Join(()), "^Join: 'phases' must not be empty$"),
        (lambda: Constant("x"), "Constant: 'value'"),
        (lambda: Piecewise((1.5,), (1.0, 0.5)), "Piecewise: 'boundaries'"),
        (lambda: Piecewise(3, (1.0, 0.5)), "Piecewise: 'boundaries' must be a sequence"),
        (lambda: Piecewise((1,), (1.0, "x")), "Piecewise: 'values'"),
        (lambda: Piecewise((1,), 0.5), "Piecewise: 'values' must be a sequence"),
        (lambda: Piecewise((2, 2), (1.0, 0.5, 0.1)), "strictly increasing"),
        (lambda: Piecewise((1, 2), (1.0,)), r"len\(boundaries\) \+ 1 = 3 entries, got 1"),
    ],
)
def test_invalid_arguments_name_the_parameter(build, name):
    with pytest.raises(ValueError, match=name):
        build()


def test_numeric_strings_are_numbers():
    assert Linear("1e-3", "0", steps="10", delay="2") == Linear(1e-3, 0.0, steps=10, delay=2)
    assert Triangular("0.1", "1", steps="4", delay="1") == Triangular(0.1, 1.0, steps=4, delay=1)


def test_from_config():
    assert schedule_from_config(0.01, 100) == Constant(0.01)
    assert schedule_from_config("1e-3", 100) == Constant(1e-3)
    assert schedule_from_config({"type": "Linear", "start": "auto", "end": "1e-3"}, 100) == Linear(
        "auto", 1e-3, steps=100
    )
    assert schedule_from_config({"type": "cosine", "start": 1, "end": 0, "steps": None, "delay": 5}, 50) == (
        Cosine(1.0, 0.0, steps=50, delay=5)
    )
    spec = {
        "type": "join",
        "phases": [
            {"type": "constant", "value": 0.1, "length": 10},
            {"type": "geometric", "start": 0.1, "end": 1e-3},  # no length: the rest; no steps: its length
        ],
    }
    assert schedule_from_config(spec, 100) == Join(((Constant(0.1), 10), (Geometric(0.1, 1e-3, 90), 90)))
    s = Linear(1.0, 0.0, 3)
    assert schedule_from_config(s) is s


@pytest.mark.parametrize(
    "schedule",
    [
        Constant(0.2),
        Linear("auto", 0.0, steps=30, delay=3),
        Cosine(1.0, 0.1, steps=10),
        Geometric(1.0, 1e-3, steps=7, delay=1),
        Piecewise((3, 9), (1.0, 0.3, 0.0)),
        Triangular(0.0, 1.0, steps=12),
        Join(((Constant(1.0), 4), (Join(((Linear(1.0, 0.0, 4), 4),)), 6))),
    ],
)
def test_config_round_trip(schedule):
    spec = to_config(schedule)
    assert spec["type"] == type(schedule).__name__.lower()
    assert schedule_from_config(spec, total_steps=1) == schedule


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"type": "exponential", "start": 1.0}, "exponential"),
        ({"start": 1.0}, "type"),
        ({"type": "linear", "start": 1.0, "end": 0.0, "rate": 2}, "rate"),
        ({"type": "linear", "end": 0.0}, "start"),
        (
            {
                "type": "join",
                "phases": [{"type": "constant", "value": 1.0}, {"type": "constant", "value": 0.0}],
            },
            "length",
        ),
        ({"type": "join", "phases": []}, "phases"),
        ({"type": "join", "phases": [{"type": "constant", "value": 1.0, "length": 10, "delay": 1}]}, "delay"),
        ({"type": "piecewise", "boundaries": [1], "values": [1.0, "x"]}, "values"),
        ([1.0, 2.0], "value"),
    ],
)
def test_from_config_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        schedule_from_config(spec, 100)


def test_from_config_needs_steps():
    with pytest.raises(ValueError, match="steps"):
        schedule_from_config({"type": "linear", "start": 1.0, "end": 0.0})


def test_is_nonincreasing():
    assert is_nonincreasing(Cosine(1.0, 0.0, steps=1000, delay=10), 1100)
    assert is_nonincreasing(Geometric(1.0, 1e-6, steps=999), 1000)
    assert is_nonincreasing(Piecewise((5, 9), (1.0, 1.0, 0.0)), 20)
    assert is_nonincreasing(Constant(0.0), 10)
    assert not is_nonincreasing(Linear(0.0, 1.0, steps=10), 10)
    assert not is_nonincreasing(Triangular(0.0, 1.0, steps=10), 10)
    assert not is_nonincreasing(Join(((Constant(0.1), 5), (Constant(0.2), 5))), 10)
    assert is_nonincreasing(Linear(0.0, 1.0, steps=10, delay=20), 20)  # the rise is past the horizon
    # a rise of a rounding error relative to its own value is none; a rise of 5e-5 relative is one, however
    # small in absolute terms
    assert is_nonincreasing(Piecewise((1, 2), (2.0, 1.0, 1.0 + 1e-15)), 3)
    assert not is_nonincreasing(Piecewise((1, 2), (1.0, 1e-8, 1.00005e-8)), 3)


def test_the_cosine_learning_rate_falls_from_one_to_its_floor():
    from ace.constrained.schedules import lr_schedule

    schedule = lr_schedule("cosine", 100, min_factor=0.1)
    assert schedule(0) == 1.0 and schedule(100) == pytest.approx(0.1) and schedule(50) == pytest.approx(0.55)
    assert all(schedule(t + 1) <= schedule(t) for t in range(100))
    warm = lr_schedule("cosine", 100, warmup=10)
    assert warm(0) == pytest.approx(0.1) and warm(9) == pytest.approx(1.0) and warm(100) == pytest.approx(0.0)


def test_the_step_learning_rate_decays_by_its_factor_every_period_after_the_warm_up():
    from ace.constrained.schedules import lr_schedule

    default = lr_schedule("step", 90)  # a third of the run: x0.1 at 30 and 60
    assert [default(t) for t in (0, 29, 30, 59, 60, 89)] == [1.0, 1.0, 0.1, 0.1, 0.1**2, 0.1**2]
    warm = lr_schedule("step", 50, warmup=10, decay_every=0.2, decay_factor=0.5)  # every 10 steps after 10
    assert [warm(t) for t in (0, 9, 10, 19, 20, 30, 49)] == [0.1, 1.0, 1.0, 1.0, 0.5, 0.25, 0.125]
    assert lr_schedule("constant", 100) is None
    constant = lr_schedule("constant", 100, warmup=4)
    assert [constant(t) for t in (0, 1, 3, 4, 99)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert lr_schedule("cosine", 100, warmup=1)(0) == 1.0  # one warm-up step: the full rate at once
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'"):
        lr_schedule("linear", 100)


def test_a_length_is_a_fraction_of_the_run_below_one_and_a_step_count_from_one_on():
    from ace.constrained.schedules import steps_of

    assert steps_of(0.25, 100) == 25 and steps_of(0.0, 100) == 0 and steps_of(1, 100) == 1
    assert steps_of(7, 100) == 7 and steps_of("0.5", 10) == 5
    with pytest.raises(ValueError, match=">= 0"):
        steps_of(-1, 100)
    with pytest.raises(ValueError, match="^schedule: 'length' must be a finite number"):
        steps_of("half", 100)


def test_a_schedule_settles_at_the_first_step_that_holds_its_final_value():
    from ace.constrained.schedules import settles_at

    assert settles_at(Linear(1.0, 0.0, steps=10, delay=5), 100) == 15
    assert settles_at(Piecewise((3,), (1.0, 0.0)), 100) == 3
    assert settles_at(Constant(0.1), 100) == 0
    assert settles_at(Linear(1.0, 0.0, steps=200), 100) == 100  # still moving at the end


def test_learning_rates_scale_every_group_but_the_skipped_ones_from_their_base():
    import torch

    from ace.constrained.schedules import LearningRates

    a, b, c = (torch.zeros(1, requires_grad=True) for _ in range(3))
    first = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 2.0}])
    second = torch.optim.SGD([c], lr=4.0)
    rates = LearningRates(Piecewise((2,), (0.5, 0.25)), [first, second], skip=[b])
    rates.factor = 0.5
    for step in (0, 2):  # from the base each time, not compounded
        rates.apply(step)
    assert [g["lr"] for o in (first, second) for g in o.param_groups] == [0.125, 2.0, 0.5]
    assert rates.rate(8.0, 0) == 2.0 and rates.rate(8.0, 0, scheduled=False) == 4.0
    assert LearningRates(None, [second]).rate(8.0, 5) == 8.0
    LearningRates(None, [second]).apply(3)
    assert second.param_groups[0]["lr"] == 0.5  # no schedule: the rates are left alone
