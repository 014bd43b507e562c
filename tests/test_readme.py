"""The README: result tables show the runs of the command printed above them; the layout is the package's."""

import re
from pathlib import Path

README = (Path(__file__).parent.parent / "README.md").read_text()
METHODS = {"strict", "unconstrained", "penalty", "ace", "ace_resilient", "scheduled", "cr"}


def result_tables():
    """``(command, [config names])`` for every compare table: the nearest ```bash block above it."""
    command = ""
    for block in re.split(r"\n(?=```bash\n)", README):
        if block.startswith("```bash\n"):
            command = block.split("\n```", 1)[0]
        for table in re.findall(r"\n\| config \| seeds \|.*?(?=\n\n|\Z)", block, re.S):
            yield command, re.findall(r"^\| `([\w.-]+)` \|", table, re.M)


def covers(command: str, name: str) -> bool:
    """Whether the ``benchmarks/compare.py`` targets in ``command`` (``configs/X.yaml``, ``X``, ``X:m1,m2``;
    one without methods runs under ``--methods`` or its own) train the run named ``name`` (``X_m``)."""
    for stem, listed in re.findall(r"(?:configs/)?\b([a-z][a-z0-9_]*)(?:\.yaml)?(?::([a-z_,]+))?", command):
        methods = listed.split(",") if listed else METHODS
        if name == stem or any(name == f"{stem}_{m}" for m in methods):
            return True
    return False


def test_every_result_row_is_a_run_of_the_command_above_its_table():
    tables = list(result_tables())
    assert len(tables) >= 6
    for command, names in tables:
        assert names, command
        assert [n for n in names if not covers(command, n)] == [], command


def test_the_layout_names_every_module_and_none_that_is_gone():
    """The README's Layout block is the map of ``ace/``: a module added or removed shows there."""
    root = Path(__file__).parent.parent
    layout = README.split("## Layout", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    named = set(re.findall(r"ace/(\w+)\.py", layout))
    modules = {p.stem for p in (root / "ace").glob("*.py")} - {"__init__", "__main__"}
    assert named == modules
