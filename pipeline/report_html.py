"""``report.html``: the report's tables, plots (embedded as base64 PNG) and glossary in one
self-contained file (no scripts, no external resources)."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.report import Table

__all__ = ["render_html"]

CSS = """
body { font-family: sans-serif; margin: 2em; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0 1.5em; }
dt { font-family: monospace; font-weight: bold; margin-top: 0.4em; }
"""


def _cell(value: object) -> str:
    from pipeline.report import fmt

    return html.escape(fmt(value))


def _table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in t.rows
    )
    return f"<h2>{html.escape(t.title)}</h2>\n<table><thead><tr>{head}</tr></thead>" + (
        f"<tbody>{body}</tbody></table>"
    )


def _summary(summary: Mapping[str, Any]) -> str:
    keys = ("final_acc", "final_acc_low", "final_acc_high", "final_loss", "float_acc",
            "size_mb", "target_size_mb", "weight_compression",
            "activation_compression")  # fmt: skip
    items = []
    for k in keys:
        v = summary.get(k)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        items.append(f"<li><code>{k}</code>: {_cell(v)}</li>")
    done = f"{summary.get('stages_done')}/{summary.get('stages_total')} stages done"
    return f"<p>{html.escape(done)}</p><ul>{''.join(items)}</ul>"


def render_html(
    title: str,
    tables: Sequence[Table],
    images: Sequence[tuple[str, bytes]],
    glossary: Mapping[str, str],
    summary: Mapping[str, Any],
) -> str:
    """The whole page as text."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        _summary(summary),
    ]
    parts += [_table(t) for t in tables]
    for name, png in images:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(f'<img alt="{html.escape(name)} plot" src="data:image/png;base64,{data}">')
    parts.append("<h2>Glossary</h2><dl>")
    for key, meaning in glossary.items():
        parts.append(f"<dt>{html.escape(key)}</dt><dd>{html.escape(meaning)}</dd>")
    parts.append("</dl></body></html>")
    return "\n".join(parts) + "\n"
