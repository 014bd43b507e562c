"""The README and the documentation pages: result tables show the runs of the command printed above them; the
summary table is the same in both; the layout page is the package's."""

import re

from run_kit import ROOT

README = (ROOT / "README.md").read_text()
PAGES = {p: p.read_text() for p in sorted((ROOT / "docs").rglob("*.md"))}
METHODS = {"strict", "unconstrained", "penalty", "ace", "ace_resilient", "scheduled", "cr"}


def result_tables(text: str):
    """``(command, [config names])`` for every compare table: the nearest ```bash block above it."""
    command = ""
    for block in re.split(r"\n(?=```bash\n)", text):
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
    tables = [table for text in [README, *PAGES.values()] for table in result_tables(text)]
    assert len(tables) >= 6
    for command, names in tables:
        assert names, command
        assert [n for n in names if not covers(command, n)] == [], command


def test_the_layout_names_every_module_and_none_that_is_gone():
    """The Layout page is the map of ``ace/``: a module added, moved or removed shows there."""
    layout = PAGES[ROOT / "docs" / "design" / "layout.md"].split("```text", 1)[1].split("```", 1)[0]
    named, folder = set(), None
    for line in layout.splitlines():
        if m := re.match(r"(\S+/)\s", line):
            folder = m.group(1) if m.group(1).startswith("ace/") else None
        named |= {f"{folder}{name}.py" for name in re.findall(r"(\w+)\.py", line)} if folder else set()
    modules = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "ace").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py") and p.parent.name != "tasks"
    }
    assert named == modules


def test_the_summary_table_is_the_same_in_the_readme_and_on_the_site():
    def summary(text):
        return re.search(r"\| task, budget \|.*?\n\n", text, re.S).group(0)

    assert summary(README) == summary(PAGES[ROOT / "docs" / "results.md"])


def test_every_documentation_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    assert [p for p in PAGES if str(p.relative_to(ROOT / "docs")) not in nav] == []
