"""Small inline-SVG charts for ``report.html``: a line chart of one metric over steps and a horizontal bar chart.

Pure functions returning SVG text meant to sit inside an HTML page: no ``id`` attributes (so any number of charts
share one page without clashes), no external references, no ``xmlns`` (HTML5 parses inline SVG without it).
Each chart is drawn in one caller-chosen colour, so a rendered page shows which charts drew.
"""

from __future__ import annotations

import math
from html import escape
from typing import Optional, Sequence

WIDTH, HEIGHT = 360, 210
"""The line chart's viewBox; the page scales it to the column's width."""
LEFT, RIGHT, TOP, BOTTOM = 54, 12, 10, 26
"""Plot-area margins inside the viewBox (room for tick labels)."""
AXIS, GRID, TEXT = "#9a9a9a", "#e6e6e6", "#333333"

Point = tuple[float, Optional[float]]
"""(step, value); a ``None`` value (NaN/inf in metrics.jsonl) breaks the line."""


def nice_ticks(lo: float, hi: float, count: int = 5, *, integer: bool = False) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 x 10^k) covering [lo, hi]; whole numbers only when
    ``integer`` (step axes)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = max((hi - lo) / max(count - 1, 1), 1.0 if integer else 0.0)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))  # the nearest round step
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def value_range(values: Sequence[float]) -> tuple[float, float]:
    """[min, max] of ``values``, widened when flat so a constant series sits mid-chart."""
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    return lo, hi


def _fmt(value: float) -> str:
    """A tick or bar label: whole numbers in full (step 1500, not 1.5e+03), others to 3 significant digits."""
    return str(int(value)) if value == int(value) and abs(value) < 1e7 else f"{value:.3g}"


def _scale(lo: float, hi: float, out_lo: float, out_hi: float):
    span = hi - lo or 1.0
    return lambda v: out_lo + (v - lo) / span * (out_hi - out_lo)


def line_path(points: Sequence[Point], x, y) -> str:
    """SVG path data through ``points`` (already in step order), starting a new run after each ``None``."""
    parts, pen_down = [], False
    for step, value in points:
        if value is None:
            pen_down = False
            continue
        parts.append(f"{'L' if pen_down else 'M'}{x(step):.1f},{y(value):.1f}")
        pen_down = True
    return " ".join(parts)


def _axes(xs: list[float], x, ys: list[float], y) -> list[str]:
    """Grid lines, tick labels and the plot frame for the line chart."""
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    out = [f'<rect x="{LEFT}" y="{TOP}" width="{right - LEFT}" height="{bottom - TOP}" fill="none" '
           f'stroke="{AXIS}" stroke-width="1"/>']
    for tick in ys:
        out.append(f'<line x1="{LEFT}" x2="{right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="{GRID}"/>')
        out.append(f'<text x="{LEFT - 4}" y="{y(tick) + 3.5:.1f}" text-anchor="end">{_fmt(tick)}</text>')
    for tick in xs:
        out.append(f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{TOP}" y2="{bottom}" stroke="{GRID}"/>')
        out.append(f'<text x="{x(tick):.1f}" y="{bottom + 14}" text-anchor="middle">{_fmt(tick)}</text>')
    return out


def line_chart(points: Sequence[Point], colour: str, *, label: str, markers: bool = False) -> str:
    """One metric over steps; ``markers`` draws a dot per point (for sparse series such as evaluations)."""
    finite = [(s, v) for s, v in points if v is not None]
    if not finite:
        return _empty(label)
    lo, hi = value_range([v for _, v in finite])
    step_lo, step_hi = min(s for s, _ in finite), max(s for s, _ in finite)
    if step_hi == step_lo:
        step_lo, step_hi = step_lo - 1, step_hi + 1
    x = _scale(step_lo, step_hi, LEFT + 6, WIDTH - RIGHT - 6)
    y = _scale(lo, hi, HEIGHT - BOTTOM - 6, TOP + 6)
    ys = [t for t in nice_ticks(lo, hi) if lo <= t <= hi] or [lo]
    xs = [t for t in nice_ticks(step_lo, step_hi, integer=True) if step_lo <= t <= step_hi]
    body = _axes(xs, x, ys, y)
    body.append(f'<path d="{line_path(points, x, y)}" fill="none" stroke="{colour}" stroke-width="2" '
                'stroke-linejoin="round" stroke-linecap="round"/>')
    if markers:
        body += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="3.5" fill="{colour}"/>' for s, v in finite]
    return _svg(WIDTH, HEIGHT, label, body)


def bar_chart(bars: Sequence[tuple[str, float]], colour: str, *, label: str, unit: str = "s") -> str:
    """Horizontal bars, one per (name, value), with the value written after each bar."""
    if not bars:
        return _empty(label)
    row, name_width, value_width = 22, 150, 70
    height = row * len(bars) + 8
    top = max(value for _, value in bars) or 1.0
    x = _scale(0.0, top, name_width, WIDTH * 1.5 - value_width)
    body = []
    for i, (name, value) in enumerate(bars):
        y = 4 + i * row
        body.append(f'<text x="{name_width - 6}" y="{y + 15}" text-anchor="end">{escape(name)}</text>')
        width = max(x(value) - name_width, 1)
        body.append(f'<rect x="{name_width}" y="{y + 3}" width="{width:.1f}" height="{row - 6}" fill="{colour}"/>')
        body.append(f'<text x="{x(value) + 5:.1f}" y="{y + 15}">{_fmt(value)} {escape(unit)}</text>')
    return _svg(int(WIDTH * 1.5), height, label, body)


def _empty(label: str) -> str:
    return _svg(WIDTH, 40, label, [f'<text x="{WIDTH / 2}" y="24" text-anchor="middle">no finite values</text>'])


def _svg(width: int, height: int, label: str, body: list[str]) -> str:
    return (f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}" '
            f'font-family="sans-serif" font-size="11" fill="{TEXT}">' + "".join(body) + "</svg>")
