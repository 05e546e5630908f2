"""HTML building blocks shared by the report and the comparison page: one style sheet in the page,
escaped text, tables, image cards. No JavaScript, no external resource: every picture is a
``data:`` URI, so a page opens from disk or from an object-store download without a network."""

from __future__ import annotations

import datetime as dt
import html
import math
from typing import Any, Iterable

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1280px;
padding:0 18px 40px;color:#1b1b1b}
h1{font-size:22px;margin:18px 0 6px}
h2{font-size:18px;margin:26px 0 8px;border-bottom:2px solid #ddd;padding-bottom:4px}
h3{font-size:14px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.banner{background:#b00020;color:#fff;font-size:20px;font-weight:700;padding:14px 18px;margin:12px 0;
border:4px solid #600}
.banner small{display:block;font-size:13px;font-weight:400}
.note{color:#555;font-size:12px}.bad{color:#b00020;font-weight:600}.good{color:#1e7b34;font-weight:600}
.plots img{margin:4px 8px 4px 0;border:1px solid #eee;height:220px}
.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ddd;padding:6px;font-size:11px;width:min-content}
.card .pics{display:flex;gap:4px}.card img{display:block}
.card .uri{word-break:break-all;color:#555;max-width:400px}
code{font-size:11px;word-break:break-all}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers for tables: floats to ``digits`` decimals, NaN/None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return esc(value)


def page_start(title: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n"
    )


def page_end(what: str) -> str:
    from pipeline import __version__

    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f'<footer class="note"><p>{esc(what)} written by zsad {esc(__version__)} on {when}. Self-contained: every '
        "picture is inline; the page loads nothing from a network.</p></footer>\n</body></html>\n"
    )


def random_banner(random_weights: bool, what: str = "this run") -> str:
    if not random_weights:
        return ""
    return (
        '<div class="banner" id="random-weights-banner">RANDOM MODEL WEIGHTS: these scores and maps are NOT anomaly '
        f"detection results<small>{esc(what)} used randomly initialised models (allow_random_weights). Use it to check "
        "the pipeline, never to judge a method.</small></div>\n"
    )


def table(headers: Iterable[str], rows: Iterable[Iterable[Any]], *, numeric: Iterable[int] = (), cls: str = "") -> str:
    """An HTML table; cells are escaped unless they are :class:`Raw`; columns in ``numeric`` align right."""
    num = set(numeric)
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            text = v.text if isinstance(v, Raw) else (fmt(v) if isinstance(v, float) else esc(v))
            cells.append(f'<td class="num">{text}</td>' if i in num else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    attr = f' class="{esc(cls)}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>\n"


def kv_table(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v.text if isinstance(v, Raw) else esc(v)}</td></tr>" for k, v in pairs)
    return f"<table>{rows}</table>\n"


class Raw:
    """Markup that a table cell holds as is (already escaped)."""

    def __init__(self, text: str) -> None:
        self.text = text


def img(src: str, alt: str, *, title: str = "", cls: str = "") -> str:
    attrs = f' class="{esc(cls)}"' if cls else ""
    attrs += f' title="{esc(title)}"' if title else ""
    return f'<img src="{src}" alt="{esc(alt)}"{attrs}>'
