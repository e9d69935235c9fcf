"""The inline SVG charts: round ticks, lines that break at NaN, nothing that could clash or load when inlined."""

from __future__ import annotations

import re

import pytest

from dpo_rl.svg_chart import bar_chart, line_chart, line_path, nice_ticks, value_range


@pytest.mark.parametrize("lo, hi, kwargs, expected", [
    (0.0, 1.0, {}, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
    (-6.3, -2.1, {}, [-6.0, -5.0, -4.0, -3.0]),
    (1, 3, {"integer": True}, [1, 2, 3]),  # whole steps, never 1.5
    (1, 20, {"integer": True}, [5, 10, 15, 20]),
    (2.0, 2.0, {}, [2.0]),
])
def test_nice_ticks(lo, hi, kwargs, expected):
    assert nice_ticks(lo, hi, **kwargs) == pytest.approx(expected)


def test_flat_series_gets_a_range_around_it():
    assert value_range([1.0, 1.0]) == pytest.approx((0.9, 1.1))
    assert value_range([0.0]) == (-1.0, 1.0)


def test_line_breaks_at_missing_values():
    path = line_path([(1, 0.0), (2, None), (3, 1.0), (4, 2.0)], lambda s: s * 10, lambda v: v)
    assert path == "M10.0,0.0 M30.0,1.0 L40.0,2.0"


def test_charts_have_no_ids_or_references_and_escape_labels():
    svgs = [line_chart([(1, 0.5), (2, 0.7)], "#123456", label="a<b", markers=True),
            bar_chart([("update<x>", 0.25)], "#654321", label="t"), line_chart([(1, None)], "#123456", label="nan")]
    for svg in svgs:
        assert svg.startswith("<svg ") and svg.endswith("</svg>")
        assert not re.search(r"\b(id|href|xlink:href|src)=", svg) and "url(" not in svg and "xmlns" not in svg
    assert 'aria-label="a&lt;b"' in svgs[0] and svgs[0].count("<circle") == 2 and 'stroke="#123456"' in svgs[0]
    assert "update&lt;x&gt;" in svgs[1] and 'fill="#654321"' in svgs[1]
    assert "no finite values" in svgs[2]
