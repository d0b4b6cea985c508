"""HTML helpers every section of the page uses."""

from __future__ import annotations

import html


def escape(value) -> str:
    return html.escape(str(value), quote=True)


def img_tag(uri: str | None, alt: str) -> str:
    """An inlined chart (a data: URI), or nothing when the chart was not drawn."""
    return f'<img src="{uri}" alt="{escape(alt)}">' if uri else ""
