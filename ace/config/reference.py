"""The Markdown reference of every config key (``ace config --reference``, the README's table)."""

from __future__ import annotations

import dataclasses
import typing

import yaml

from ace.config.loading import _section_classes
from ace.config.schema import TASKS, Config, ConfigError

__all__ = ["reference"]


def reference() -> str:
    """Markdown reference of every config key, generated from the schema and the task modules."""
    lines = ["| key | default | meaning |", "|---|---|---|"]

    def add(cls: type, prefix: str, note: str = "") -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if cls is Config and f.name in ("data", "model"):
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                add(hints[f.name], f"{prefix}{f.name}.")
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            text = f.metadata.get("help", "")
            if "choices" in f.metadata:
                text += f" (one of: {', '.join(map(str, f.metadata['choices']))})"
            if "bound" in f.metadata:
                op, bound = f.metadata["bound"]
                text += f" (must be {op} {bound:g})"
            shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            text = text.replace("|", "\\|")  # a raw pipe would split the markdown cell
            lines.append(f"| `{prefix}{f.name}` | `{shown}` | {note}{text} |")

    add(Config, "")
    for name in TASKS:
        try:
            sections = _section_classes(name)
        except ConfigError:
            continue
        for section, cls in sections.items():
            add(cls, f"{section}.", note=f"*{name}:* ")
    return "\n".join(lines)
