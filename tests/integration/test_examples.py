"""The README's and the tutorials' examples are the example files, and the examples run as written."""

import runpy

import pytest
from run_kit import ROOT


def test_readme_shows_the_wrap_example_verbatim():
    code = (ROOT / "examples" / "wrap_model.py").read_text().split("\n", 2)[2].strip()
    assert code in (ROOT / "README.md").read_text()


def test_the_own_loop_tutorial_shows_the_example_verbatim():
    code = (ROOT / "examples" / "own_loop.py").read_text().split("\n", 2)[2].strip()
    assert code in (ROOT / "docs" / "tutorials" / "own-loop.md").read_text()


@pytest.mark.parametrize("name", ["wrap_model.py", "relax_model.py", "own_loop.py", "lightning_module.py"])
def test_example_runs(name, capsys):
    if name.startswith("lightning"):
        pytest.importorskip("lightning")
    runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")
    assert "multiplier" in capsys.readouterr().out
