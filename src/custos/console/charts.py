"""Server-side SVG charts: bar, donut, stacked bar and line, each with a data-table fallback.

Charts are rendered here rather than in the browser so that a page is complete as served:
no chart library to vendor, nothing to run before the numbers can be read, and the same
markup works with scripts off. Every chart is a <figure> holding an SVG with role="img",
a <title> and a <desc> that a screen reader announces, and a <details> table with the
numbers. Colour never carries meaning alone: the legend and the table name every value.
No inline style attributes are used, so the console's Content-Security-Policy can forbid them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from markupsafe import Markup, escape

# colour-blind-safe palette (Okabe-Ito), darkened where needed for contrast on white
PALETTE = (
    "#0072B2",
    "#D55E00",
    "#009E73",
    "#CC79A7",
    "#8a6d00",
    "#56B4E9",
    "#5b5b5b",
    "#E69F00",
)
OTHER_COLOUR = "#9a9a9a"
_ids = itertools.count(1)

Series = Sequence[tuple[str, float]]


def colour(i: int) -> str:
    """The i-th series colour."""
    return PALETTE[i % len(PALETTE)]


def _num(v: float) -> str:
    """A value as people read it: integers without a decimal point."""
    return f"{int(v):,}" if float(v).is_integer() else f"{v:,.1f}"


def _uid(prefix: str) -> str:
    # ids only need to be unique within one page; a process-wide counter is enough
    return f"{prefix}-{next(_ids)}"


def top_n(data: Series, n: int, other: str = "Other") -> list[tuple[str, float]]:
    """The n largest entries, the rest summed into one `other` entry."""
    ordered = sorted(data, key=lambda kv: (-kv[1], kv[0]))
    if len(ordered) <= n:
        return list(ordered)
    rest = sum(v for _, v in ordered[n - 1 :])
    return [*ordered[: n - 1], (other, rest)]


def _figure(
    title: str, desc: str, svg_body: str, table: str, *, width: int, height: int, extra: str = ""
) -> Markup:
    cid = _uid("chart")
    return Markup(  # noqa: S704 - every interpolated text is escaped above
        f'<figure class="chart" aria-labelledby="{cid}-cap">'
        f'<figcaption id="{cid}-cap">{escape(title)}</figcaption>'
        f'<svg class="chart-svg" role="img" viewBox="0 0 {width} {height}" '
        f'aria-labelledby="{cid}-t {cid}-d" xmlns="http://www.w3.org/2000/svg" '
        f'preserveAspectRatio="xMidYMid meet">'
        f'<title id="{cid}-t">{escape(title)}</title><desc id="{cid}-d">{escape(desc)}</desc>'
        f"{svg_body}</svg>{extra}"
        f"<details><summary>Data table</summary>{table}</details></figure>"
    )


def _empty(title: str, message: str) -> Markup:
    return Markup(  # noqa: S704 - title and message are escaped
        f'<figure class="chart chart-empty"><figcaption>{escape(title)}</figcaption>'
        f'<p class="muted">{escape(message)}</p></figure>'
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f'<th scope="col">{escape(h)}</th>' for h in headers)
    body = "".join(
        "<tr>"
        + f'<th scope="row">{escape(r[0])}</th>'
        + "".join(f"<td>{escape(_num(v) if isinstance(v, int | float) else v)}</td>" for v in r[1:])
        + "</tr>"
        for r in rows
    )
    return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _describe(data: Series, unit: str) -> str:
    return "; ".join(f"{label}: {_num(v)} {unit}" for label, v in data)


def _legend(
    labels: Sequence[str],
    values: Sequence[float] | None = None,
    colours: Sequence[int] | None = None,
) -> str:
    items = []
    for i, label in enumerate(labels):
        val = f" ({_num(values[i])})" if values is not None else ""
        fill = colour(colours[i] if colours is not None else i)
        items.append(
            f'<li><svg class="swatch" viewBox="0 0 10 10" aria-hidden="true" focusable="false">'
            f'<rect width="10" height="10" fill="{fill}"/></svg>{escape(label)}{val}</li>'
        )
    return f'<ul class="legend">{"".join(items)}</ul>'


def bar_chart(
    title: str, data: Series, *, unit: str = "devices", empty: str = "No data yet."
) -> Markup:
    """Horizontal bars (long labels such as model names stay readable on a phone)."""
    data = [(str(k), float(v)) for k, v in data]
    if not data:
        return _empty(title, empty)
    top = max(v for _, v in data) or 1.0
    row_h, gap, label_w, width = 26, 8, 190, 600
    bar_w = width - label_w - 70
    height = len(data) * (row_h + gap) + gap
    parts = []
    for i, (label, v) in enumerate(data):
        y = gap + i * (row_h + gap)
        w = max(1.0, bar_w * v / top) if v else 0.0
        short = label if len(label) <= 26 else label[:25] + "…"
        parts.append(
            f"<g><title>{escape(label)}: {_num(v)} {escape(unit)}</title>"
            f'<text x="{label_w - 8}" y="{y + row_h * 0.68:.1f}" text-anchor="end" '
            f'class="lbl">{escape(short)}</text>'
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{row_h}" rx="3" '
            f'fill="{colour(0)}"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + row_h * 0.68:.1f}" class="val">'
            f"{_num(v)}</text></g>"
        )
    table = _table(["", unit.capitalize()], data)
    return _figure(title, _describe(data, unit), "".join(parts), table, width=width, height=height)


def donut_chart(
    title: str, data: Series, *, unit: str = "devices", empty: str = "No data yet."
) -> Markup:
    """Shares of a whole as a ring, with the total in the middle and a legend beside it."""
    # a series keeps its colour when others are empty (a slice's colour means the same)
    indexed = [(i, str(k), float(v)) for i, (k, v) in enumerate(data) if v > 0]
    data = [(k, v) for _, k, v in indexed]
    slots = [i for i, _, _ in indexed]
    total = sum(v for _, v in data)
    if not data or total <= 0:
        return _empty(title, empty)
    r, stroke, size = 60.0, 28.0, 180
    circ = 2 * math.pi * r
    c = size / 2
    parts = [
        f'<circle cx="{c}" cy="{c}" r="{r}" fill="none" stroke="#e6e6e6" stroke-width="{stroke}"/>'
    ]
    offset = 0.0
    for i, (label, v) in enumerate(data):
        length = circ * v / total
        pct = 100 * v / total
        # each slice is a dashed circle rotated to start where the previous one ended
        parts.append(
            f'<circle cx="{c}" cy="{c}" r="{r}" fill="none" stroke="{colour(slots[i])}" '
            f'stroke-width="{stroke}" stroke-dasharray="{length:.2f} {circ - length:.2f}" '
            f'stroke-dashoffset="{-offset:.2f}" transform="rotate(-90 {c} {c})">'
            f"<title>{escape(label)}: {_num(v)} ({pct:.0f}%)</title></circle>"
        )
        offset += length
    parts.append(
        f'<text x="{c}" y="{c - 4}" text-anchor="middle" class="total">{_num(total)}</text>'
        f'<text x="{c}" y="{c + 16}" text-anchor="middle" class="lbl">{escape(unit)}</text>'
    )
    rows = [(k, v, f"{100 * v / total:.0f}%") for k, v in data]
    table = _table(["", unit.capitalize(), "Share"], rows)
    return _figure(
        title,
        f"{_num(total)} {unit} in total. " + _describe(data, unit),
        "".join(parts),
        table,
        width=size,
        height=size,
        extra=_legend([k for k, _ in data], [v for _, v in data], slots),
    )


def stacked_bar(
    title: str,
    rows: Sequence[tuple[str, dict[str, int]]],
    keys: Sequence[str],
    *,
    unit: str = "devices",
    empty: str = "Nothing in progress.",
) -> Markup:
    """One horizontal bar per row, split by `keys` (e.g. a deployment's devices by state)."""
    rows = [(label, counts) for label, counts in rows if sum(counts.values()) > 0]
    if not rows:
        return _empty(title, empty)
    row_h, gap, label_w, width = 26, 10, 190, 600
    bar_w = width - label_w - 60
    height = len(rows) * (row_h + gap) + gap
    parts = []
    for i, (label, counts) in enumerate(rows):
        y = gap + i * (row_h + gap)
        total = sum(counts.values())
        x = float(label_w)
        short = label if len(label) <= 26 else label[:25] + "…"
        parts.append(
            f'<text x="{label_w - 8}" y="{y + row_h * 0.68:.1f}" text-anchor="end" '
            f'class="lbl">{escape(short)}</text>'
        )
        for k_i, key in enumerate(keys):
            n = counts.get(key, 0)
            if not n:
                continue
            w = bar_w * n / total
            parts.append(
                f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h}" '
                f'fill="{colour(k_i)}"><title>{escape(label)} — {escape(key)}: {n}</title></rect>'
            )
            x += w
        parts.append(
            f'<text x="{label_w + bar_w + 6}" y="{y + row_h * 0.68:.1f}" class="val">'
            f"{_num(total)}</text>"
        )
    table = _table(
        ["", *keys, "Total"], [(k, *(c.get(x, 0) for x in keys), sum(c.values())) for k, c in rows]
    )
    desc = "; ".join(
        f"{label}: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in keys) for label, counts in rows
    )
    return _figure(
        title, desc, "".join(parts), table, width=width, height=height, extra=_legend(list(keys))
    )


def line_chart(
    title: str,
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[float]]],
    *,
    unit: str = "devices",
    empty: str = "No data yet.",
) -> Markup:
    """One or more lines over the same x labels (e.g. days), with a y axis from zero."""
    series = [(name, [float(v) for v in values]) for name, values in series if values]
    if not labels or not series:
        return _empty(title, empty)
    width, height, left, right, top_pad, bottom = 600, 240, 48, 12, 12, 34
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    top = _nice_ceiling(max(max(vals) for _, vals in series) or 1.0)
    if top < 4 and all(v.is_integer() for _, vals in series for v in vals):
        top = 4.0  # counts: whole-number grid lines (0..4), never 0.25 of a device
    n = len(labels)

    def x_at(i: int) -> float:
        return left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y_at(v: float) -> float:
        return top_pad + plot_h * (1 - v / top)

    parts = []
    for t in range(5):  # horizontal grid lines with their values
        v = top * t / 4
        y = y_at(v)
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="axis">{_num(v)}</text>'
        )
    step = max(1, math.ceil(n / 7))  # at most ~7 x labels so they never overlap
    for i in range(0, n, step):
        parts.append(
            f'<text x="{x_at(i):.1f}" y="{height - 10}" text-anchor="middle" class="axis">'
            f"{escape(labels[i])}</text>"
        )
    for s_i, (name, values) in enumerate(series):
        pts = " ".join(f"{x_at(i):.1f},{y_at(v):.1f}" for i, v in enumerate(values[:n]))
        parts.append(
            f'<polyline points="{pts}" fill="none" stroke="{colour(s_i)}" stroke-width="2.5" '
            f'stroke-linejoin="round"/>'
        )
        for i, v in enumerate(values[:n]):
            parts.append(
                f'<circle cx="{x_at(i):.1f}" cy="{y_at(v):.1f}" r="3" fill="{colour(s_i)}">'
                f"<title>{escape(name)}, {escape(labels[i])}: {_num(v)}</title></circle>"
            )
    table = _table(
        ["", *(name for name, _ in series)],
        [(labels[i], *(vals[i] for _, vals in series)) for i in range(n)],
    )
    desc = "; ".join(
        f"{name}: from {_num(vals[0])} on {labels[0]} to {_num(vals[-1])} on {labels[n - 1]}, "
        f"highest {_num(max(vals))} {unit}"
        for name, vals in series
    )
    return _figure(
        title,
        desc,
        "".join(parts),
        table,
        width=width,
        height=height,
        extra=_legend([name for name, _ in series]),
    )


def _nice_ceiling(v: float) -> float:
    """The next 'round' number at or above v (1, 2, 2.5, 5 times a power of ten)."""
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * exp:
            return m * exp
    return 10 * exp
