"""MkDocs hook: the config reference page is generated from the schema at build time, never copied."""

from __future__ import annotations


def on_page_markdown(markdown: str, page, **_) -> str:
    if page.file.src_uri == "config-reference.md":
        from ace.config.reference import reference

        return markdown.replace("<!-- generated: ace config --reference -->", reference())
    return markdown
