"""``report.html``: one self-contained page per training stage, written beside ``curves.png``.

It shows the stage's curves (loss, reward/score, margin, accuracy, KL, response length, EOS rate and the
``eval/*`` metrics, whichever the history holds), the wall-clock time per phase from ``timing.jsonl``, the
headline numbers and (online DPO) the before/after samples of ``summary.json``, and the resolved ``config.yaml``.
Everything is inline (SVG charts from :mod:`dpo_rl.svg_chart`, one ``<style>``): the page loads nothing, so it
opens offline and can be mailed or archived as one file. ``build_report`` is pure; ``write_report`` reads the
run directory's files and writes the page.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Optional, Sequence

from dpo_rl.svg_chart import bar_chart, line_chart

CURVE_KEYS = ("loss", "objective/scores", "rewards/margins", "rewards/accuracies", "objective/kl",
              "response_length/mean", "val/contain_eos_token", "accuracy", "margin")
"""Training curves shown when the history has them, in this order (online DPO's TRL names, then the reward
stage's); a stage's own ``plot_keys`` and every ``eval/*`` key follow."""
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#393b79", "#637939", "#e7ba52")
"""One colour per chart, in chart order (cycling after twelve); distinct enough to tell the charts apart."""
TIMING_COLOUR = "#6b6ecf"
"""The timing bar chart's colour (not in ``PALETTE``)."""
SAMPLE_COLUMNS = ("prompt", "before", "before_score", "after", "after_score")
UNSHOWN_SUMMARY = ("samples", "report")
"""Summary entries not in the headline table (the samples have their own table)."""


@dataclass
class RunRecords:
    """What one run directory holds, as the report reads it."""

    history: list[dict[str, Any]]
    """metrics.jsonl rows: ``step`` and the seed-determined metrics (``None`` where a value was NaN/inf)."""
    timing: list[dict[str, Any]] = field(default_factory=list)
    """timing.jsonl rows: ``step`` and ``timing/*`` / ``throughput/*`` wall-clock values."""
    config_text: str = ""
    """config.yaml as written at the start of the run."""
    summary: dict[str, Any] = field(default_factory=dict)
    """The stage's summary (headline numbers; ``samples`` for online DPO)."""


def curve_keys(history: Sequence[dict[str, Any]], extra: Sequence[str] = ()) -> list[str]:
    """The metrics charted: ``CURVE_KEYS`` then ``extra`` then the sorted ``eval/*`` keys, each only if logged."""
    present = {key for row in history for key in row if key != "step"}
    wanted = list(dict.fromkeys([*CURVE_KEYS, *extra]))
    return [k for k in wanted if k in present] + sorted(k for k in present if k.startswith("eval/") and k not in wanted)


def chart_colours(keys: Sequence[str]) -> dict[str, str]:
    """Chart key -> its line colour (``PALETTE`` in chart order)."""
    return {key: PALETTE[i % len(PALETTE)] for i, key in enumerate(keys)}


def series(history: Sequence[dict[str, Any]], key: str) -> list[tuple[float, Optional[float]]]:
    """(step, value) of the rows that logged ``key``."""
    return [(row["step"], row[key]) for row in history if key in row]


def timing_table(timing: Sequence[dict[str, Any]]) -> list[tuple[str, float, float, float]]:
    """(key, median, mean, total) per ``timing/*`` / ``throughput/*`` key, slowest median first."""
    keys = sorted({key for row in timing for key in row if key != "step"})
    rows = []
    for key in keys:
        values = [row[key] for row in timing if isinstance(row.get(key), (int, float))]
        if values:
            rows.append((key, statistics.median(values), statistics.fmean(values), sum(values)))
    return sorted(rows, key=lambda r: (not r[0].startswith("timing/"), -r[1]))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(str(value))


def _charts_section(history: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    colours = chart_colours(keys)
    figures = []
    for key in keys:
        points = series(history, key)
        last = next((v for _, v in reversed(points) if v is not None), None)
        caption = f"{escape(key)}<span>last {_fmt(last)}</span>" if last is not None else escape(key)
        chart = line_chart(points, colours[key], label=key, markers=key.startswith("eval/") or len(points) <= 30)
        figures.append(f'<figure class="chart" data-key="{escape(key)}"><figcaption>{caption}</figcaption>'
                       f"{chart}</figure>")
    return '<h2>Curves</h2><div class="grid">' + "".join(figures) + "</div>" if figures else ""


def _timing_section(timing: Sequence[dict[str, Any]]) -> str:
    rows = timing_table(timing)
    if not rows:
        return ""
    step_total = next((total for key, _, _, total in rows if key == "timing/step"), None)
    lines = ["<tr><th>phase</th><th>median</th><th>mean</th><th>total</th><th>share of step time</th></tr>"]
    for key, median, mean, total in rows:
        unit = "" if key.startswith("throughput/") else " s"
        share = f"{total / step_total:.0%}" if step_total and unit and key != "timing/step" else ""
        total_cell = f"{total:.4g}{unit}" if unit else ""
        lines.append(f"<tr><td>{escape(key)}</td><td>{median:.4g}{unit}</td><td>{mean:.4g}{unit}</td>"
                     f"<td>{total_cell}</td><td>{share}</td></tr>")
    bars = [(key.removeprefix("timing/"), median) for key, median, _, _ in rows if key.startswith("timing/")]
    chart = bar_chart(bars, TIMING_COLOUR, label="median seconds per phase")
    total = f"<p>Total step time: <b>{step_total:.4g} s</b> over {len(timing)} steps.</p>" if step_total else ""
    return (f'<h2>Time per phase</h2>{total}<div class="pair"><figure class="chart timing">'
            f"<figcaption>median seconds per step</figcaption>{chart}</figure>"
            f'<table class="timing">{"".join(lines)}</table></div>')


def _headline_section(summary: dict[str, Any]) -> str:
    rows = [f"<tr><th>{escape(key)}</th><td>{_fmt(value)}</td></tr>" for key, value in sorted(summary.items())
            if key not in UNSHOWN_SUMMARY and isinstance(value, (int, float, str, bool))]
    return f'<h2>Summary</h2><table class="summary">{"".join(rows)}</table>' if rows else ""


def _samples_section(samples: Sequence[dict[str, Any]]) -> str:
    if not samples:
        return ""
    head = "".join(f"<th>{escape(c.replace('_', ' '))}</th>" for c in SAMPLE_COLUMNS)
    body = "".join("<tr>" + "".join(f'<td class="{"num" if c.endswith("score") else "text"}">{_fmt(row.get(c, ""))}'
                                    "</td>" for c in SAMPLE_COLUMNS) + "</tr>" for row in samples)
    return f'<h2>Samples before and after training</h2><table class="samples"><tr>{head}</tr>{body}</table>'


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.sub{color:#666;font-size:13px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:12px}
figure{margin:0;border:1px solid #e3e3e3;border-radius:6px;padding:6px 8px;background:#fff}
figcaption{font-size:13px;font-weight:600;display:flex;justify-content:space-between}
figcaption span{font-weight:400;color:#666}
svg{width:100%;height:auto;display:block}
.pair{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start} .pair figure{flex:1 1 480px;max-width:640px}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f6f6f6} table.timing td:not(:first-child){text-align:right;font-variant-numeric:tabular-nums}
td.num{text-align:right;white-space:nowrap} td.text{max-width:420px}
pre{background:#f6f6f6;padding:10px;font-size:12px;overflow:auto;max-height:600px}
"""


def build_report(stage: str, run_dir: str, records: RunRecords, extra_keys: Sequence[str] = ()) -> str:
    """The page for ``stage``'s run in ``run_dir`` (a name for the title) from its ``records``."""
    keys = curve_keys(records.history, extra_keys)
    steps = [row["step"] for row in records.history]
    span = f"steps {min(steps)}-{max(steps)}" if steps else "no steps logged"
    config = (f"<h2>Resolved config</h2><details open><summary>config.yaml</summary><pre>"
              f"{escape(records.config_text)}</pre></details>") if records.config_text else ""
    sections = [_headline_section(records.summary), _charts_section(records.history, keys),
                _samples_section(records.summary.get("samples", [])), _timing_section(records.timing), config]
    title = f"{escape(stage)} run report"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}: {escape(run_dir)}'
            f"</title><style>{STYLE}</style></head><body><h1>{title}</h1>"
            f'<div class="sub">{escape(run_dir)} &middot; {span}</div>' + "".join(sections) + "</body></html>\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file; none when it does not exist."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def read_records(run_dir: Path, summary: dict[str, Any]) -> RunRecords:
    """The run directory's metrics.jsonl, timing.jsonl and config.yaml, with ``summary``."""
    config = run_dir / "config.yaml"
    return RunRecords(history=read_jsonl(run_dir / "metrics.jsonl"), timing=read_jsonl(run_dir / "timing.jsonl"),
                      config_text=config.read_text() if config.is_file() else "", summary=summary)


def write_report(run_dir: str | Path, stage: str, summary: dict[str, Any], extra_keys: Sequence[str] = (),
                 name: str = "report.html") -> Path:
    """Write ``run_dir/name`` for ``stage`` from the run directory's files and ``summary``; return its path."""
    run_dir = Path(run_dir)
    path = run_dir / name
    path.write_text(build_report(stage, str(run_dir), read_records(run_dir, summary), extra_keys))
    return path
