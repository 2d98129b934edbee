"""A self-contained HTML report: one file, inline CSS, PNGs embedded as ``data:`` URIs.

The page loads nothing from anywhere (no URL, font, script or style sheet outside the file; a
Content-Security-Policy meta tag makes the browser refuse any such load too), so it can be mailed,
archived or opened offline. Every text that comes from data (case names, label names, values) is
escaped with :func:`html.escape`.

A small inline script counts, on the window's ``load`` event, the images that decoded
(``img.complete && img.naturalWidth > 0``), writes ``"<loaded>/<total>"`` into
``document.body.dataset.imagesLoaded`` (the ``data-images-loaded`` attribute of ``<body>``, which
``chromium --headless --dump-dom`` shows) and reveals a warning if any image failed.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medseg.io.atomic import atomic_write_text

__all__ = ["render_report_html", "write_report_html"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 1.5em auto; max-width: 1100px; padding: 0 1em; color: #222; background: #fff; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; padding-bottom: 0.2em; }
p.note { color: #555; font-size: 0.9em; }
table.stats { border-collapse: collapse; margin: 0.6em 0; font-size: 0.85em; }
table.stats th, table.stats td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
table.stats th { background: #f0f0f0; text-align: left; }
table.stats td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.stats td.na { color: #999; text-align: right; }
nav.cases a { margin-right: 0.8em; }
section.case img { max-width: 100%; height: auto; border: 1px solid #ddd; }
#image-warning { background: #fee; border: 1px solid #c00; color: #900; padding: 0.5em 1em; font-weight: bold; }
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length;
  document.body.dataset.imagesLoaded = loaded + "/" + images.length;
  if (loaded < images.length) {
    var warning = document.getElementById("image-warning");
    warning.textContent = "Warning: " + (images.length - loaded) + " of " + images.length +
      " images could not be displayed; this report file may be damaged or truncated.";
    warning.hidden = false;
  }
});
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> tuple[str, str]:
    """(cell text, css class) of a table value."""
    if value is None:
        return "n/a", "na"
    if isinstance(value, bool):
        return str(value), ""
    if isinstance(value, int):
        return str(value), "num"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a", "na"
        if math.isinf(value):
            return ("inf" if value > 0 else "-inf"), "num"
        return (f"{value:.1f}" if abs(value) >= 100 else f"{value:.4g}"), "num"
    return str(value), ""


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return '<p class="note">(no rows)</p>'
    columns: list[str] = []
    for row in rows:
        columns.extend(str(k) for k in row if str(k) not in columns)
    parts = ['<table class="stats">', "<thead><tr>", *(f"<th>{_esc(c)}</th>" for c in columns), "</tr></thead>",
             "<tbody>"]
    for row in rows:
        parts.append("<tr>")
        lookup = {str(k): v for k, v in row.items()}
        for column in columns:
            text, css = _fmt(lookup.get(column))
            parts.append(f'<td class="{css}">{_esc(text)}</td>' if css else f"<td>{_esc(text)}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def _png_data_uri(png: bytes | str | os.PathLike[str]) -> str:
    data = png if isinstance(png, (bytes, bytearray)) else Path(png).read_bytes()
    return "data:image/png;base64," + base64.b64encode(bytes(data)).decode("ascii")


def render_report_html(title: str, summary_rows: Sequence[Mapping[str, Any]],
                       case_sections: Sequence[Mapping[str, Any]], intro: str | None = None) -> str:
    """The HTML text of :func:`write_report_html` (same arguments, nothing written)."""
    body: list[str] = [f"<h1>{_esc(title)}</h1>"]
    if intro:
        body.append(f'<p class="note">{_esc(intro)}</p>')
    body.append('<div id="image-warning" hidden></div>')
    body.append("<h2>Summary per label</h2>")
    body.append(_table(summary_rows))
    if case_sections:
        links = " ".join(f'<a href="#case-{i}">{_esc(s["case"])}</a>' for i, s in enumerate(case_sections))
        body.append(f'<nav class="cases"><strong>Cases:</strong> {links}</nav>')
    for i, section in enumerate(case_sections):
        case = str(section["case"])
        body.append(f'<section class="case" id="case-{i}">')
        body.append(f"<h2>{_esc(case)}</h2>")
        if section.get("note"):
            body.append(f'<p class="note">{_esc(section["note"])}</p>')
        if section.get("rows") is not None:
            body.append(_table(section["rows"]))
        if section.get("png") is not None:
            alt = section.get("alt") or f"label overlay of {case}"
            body.append(f'<img src="{_png_data_uri(section["png"])}" alt="{_esc(alt)}">')
        body.append("</section>")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style>",
        f"<script>{_SCRIPT}</script>",
        "</head>",
        "<body>",
        *body,
        "</body>",
        "</html>",
        "",
    ])


def write_report_html(out: str | os.PathLike[str], title: str, summary_rows: Sequence[Mapping[str, Any]],
                      case_sections: Sequence[Mapping[str, Any]], *, intro: str | None = None) -> Path:
    """Write a self-contained HTML report (atomically) and return its path.

    Parameters
    ----------
    out
        The ``.html`` file.
    title
        Page title and heading.
    summary_rows
        Rows of the summary table (``<table class="stats">``); the columns are the keys, in the
        order first seen. Floats are shown with 4 significant digits, NaN and None as "n/a".
    case_sections
        One section per case, in order, each a mapping with ``"case"`` (its name, the heading)
        and optionally ``"rows"`` (a table like ``summary_rows``), ``"png"`` (PNG bytes or the
        path of a PNG file, embedded as a ``data:image/png;base64,`` URI), ``"alt"`` (the
        image's alt text) and ``"note"`` (a line of text).
    intro
        A paragraph under the title.
    """
    return atomic_write_text(out, render_report_html(title, summary_rows, case_sections, intro))
