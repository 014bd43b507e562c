"""Suite-wide settings."""

import pytest
import torch

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
