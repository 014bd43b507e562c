"""Suite-wide settings and shared fixtures."""

import pytest
import torch
from fault_kit import ARGS, TOY, cli

# The tests run tiny models, for which extra threads only add contention (on a loaded 2-core machine two
# threads made small ops ~15x slower); a test that needs more threads sets them itself.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """A resilient gate run (slacks) and a deviation-constrained MLP run (tiny toy runs, shared)."""
    from run_kit import CONFIGS, TINY

    from ace.config import load_config
    from ace.experiment import run

    root = tmp_path_factory.mktemp("runs")
    gated, plain = root / "gated", root / "plain"
    run(load_config(CONFIGS / "toy_relaxed.yaml", [*TINY, "method=ace_resilient"]), gated)
    run(load_config(CONFIGS / "toy.yaml", TINY), plain)
    return gated, plain


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()  # train.threads=1 must not slow down the rest of the test session
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    assert cli("train", TOY, "--out", str(out), *ARGS) == 0
    return out
