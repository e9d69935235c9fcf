"""report.html: self-contained (loads nothing), one chart per logged curve, the timing, config and samples in it,
and, rendered in headless Chromium where it is installed, every chart visibly drawn in its own colour."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from dpo_rl.run_report import PALETTE, TIMING_COLOUR, RunRecords, build_report, chart_colours, curve_keys, \
    timing_table, write_report

ONLINE_CURVES = ["loss", "objective/scores", "rewards/margins", "rewards/accuracies", "objective/kl",
                 "response_length/mean", "val/contain_eos_token", "eval/win_rate"]
CONFIG = "training:\n  stage: online_dpo  # <script>alert(1)</script>\n  tokenizer: https://example.com/tok\n"


def online_records(steps: int = 12) -> RunRecords:
    """A synthetic online-DPO run: every charted curve, a key not charted, a NaN, evaluations at 6 and 12."""
    history = []
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 0.69 - 0.02 * step, "objective/scores": -5 + 0.5 * step,
               "rewards/margins": 0.01 * step, "rewards/accuracies": min(1.0, 0.1 * step), "objective/kl": 0.003 * step,
               "response_length/mean": 8 + (step % 3), "val/contain_eos_token": 1.0 - 0.02 * step, "actor/lr": 1e-3}
        if step == 4:
            row["objective/kl"] = None  # NaN in metrics.jsonl: the line breaks there
        if step % 6 == 0:
            row["eval/win_rate"] = 0.4 + 0.02 * step
        history.append(row)
    timing = [{"step": s, "timing/step": 0.5 + 0.1 * s, "timing/generate": 0.2, "timing/update": 0.1 * s,
               "throughput/tokens_per_s": 500.0} for s in range(1, steps + 1)]
    samples = [{"prompt": "Describe the farm.", "before": "It was fine.</s>", "before_score": -9.5,
                "after": "Sweet <b>clouds</b>.</s>", "after_score": 5.25}]
    return RunRecords(history, timing, CONFIG, {"eval/win_rate": 0.65625, "eval/scores": -2.98, "samples": samples})


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text of <style>."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.style, self._in_style = "", False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data


def test_one_chart_per_logged_curve_in_order():
    html = build_report("online_dpo", "runs/x", online_records())
    page = Elements(html)
    charts = [attrs["data-key"] for tag, attrs in page.tags if tag == "figure" and "data-key" in attrs]
    assert charts == ONLINE_CURVES  # actor/lr is logged but not a report curve
    assert sum(tag == "svg" for tag, _ in page.tags) == len(ONLINE_CURVES) + 1  # + the timing bars
    # the NaN at step 4 starts a second run of the KL line: two "M" moves in its path
    kl_path = html.split('data-key="objective/kl"')[1].split('<path d="')[1].split('"')[0]
    assert kl_path.count("M") == 2 and kl_path.count("L") == 12 - 1 - 2


def test_page_loads_nothing_and_escapes_its_text():
    html = build_report("online_dpo", "runs/x", online_records())
    page = Elements(html)
    loaders = {"script", "link", "img", "iframe", "object", "embed", "video", "audio", "source", "image", "use", "base"}
    assert not [tag for tag, _ in page.tags if tag in loaders]
    assert not [(tag, a) for tag, attrs in page.tags for a in attrs if a in {"src", "href", "xlink:href", "srcset",
                                                                            "action", "poster", "data"}]
    assert "url(" not in page.style and "@import" not in page.style and "@font-face" not in page.style
    assert not [(tag, v) for tag, attrs in page.tags for v in attrs.values() if v and "//" in v]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # the config is text, not markup
    assert "Sweet &lt;b&gt;clouds&lt;/b&gt;.&lt;/s&gt;" in html and "-9.5" in html  # so are the samples
    assert "eval/win_rate</th><td>0.6562" in html  # headline numbers


def test_curve_keys_keep_only_logged_ones_and_add_the_stage_keys():
    reward = [{"step": 1, "loss": 0.7, "accuracy": 0.5, "margin": 0.0, "scores/chosen": 1.0},
              {"step": 2, "loss": 0.6, "eval/loss": 0.65, "eval/accuracy": 0.6}]
    assert curve_keys(reward) == ["loss", "accuracy", "margin", "eval/accuracy", "eval/loss"]
    assert curve_keys(reward, ["scores/chosen", "missing"]) == ["loss", "accuracy", "margin", "scores/chosen",
                                                               "eval/accuracy", "eval/loss"]
    assert curve_keys([{"step": 1}]) == []
    assert list(chart_colours(["a", "b"]).values()) == list(PALETTE[:2])


def test_timing_table_medians_means_totals():
    rows = timing_table([{"step": 1, "timing/step": 1.0, "timing/update": 0.2, "throughput/tokens_per_s": 10.0},
                         {"step": 2, "timing/step": 3.0, "timing/update": 0.4, "throughput/tokens_per_s": 30.0},
                         {"step": 3, "timing/step": 2.0, "timing/update": 0.9, "throughput/tokens_per_s": 20.0}])
    assert [r[0] for r in rows] == ["timing/step", "timing/update", "throughput/tokens_per_s"]  # slowest first
    assert rows[0][1:] == pytest.approx((2.0, 2.0, 6.0)) and rows[1][1:] == pytest.approx((0.4, 0.5, 1.5))


def test_write_report_reads_the_run_directory(tmp_path):
    records = online_records()
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records.history))
    (tmp_path / "timing.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records.timing))
    (tmp_path / "config.yaml").write_text(CONFIG)
    path = write_report(tmp_path, "online_dpo", records.summary)
    assert path == tmp_path / "report.html"
    assert path.read_text() == build_report("online_dpo", str(tmp_path), records)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "<h1>sft run report</h1>" in write_report(empty, "sft", {}).read_text()  # no files yet: still a page


# --- rendered in headless Chromium -------------------------------------------------------------------------------

CHROMIUM_NAMES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "chrome")
# Chromium's own traffic off (updates, field trials, sync, DNS prefetch...); every host name unresolvable.
QUIET_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
               "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-default-apps", "--no-pings",
               "--disable-breakpad", "--disable-domain-reliability", "--metrics-recording-only",
               "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider,NetworkPrediction,"
               "AutofillServerCommunication,CertificateTransparencyComponentUpdater",
               "--host-resolver-rules=MAP * ~NOTFOUND")
WINDOW = (1280, 1600)


def chromium() -> str | None:
    found = (shutil.which(name) for name in CHROMIUM_NAMES)
    return next((path for path in found if path), None)


def no_network_prefix() -> list[str]:
    """``unshare`` into a network namespace of its own (no interface but a down loopback) when allowed: as root
    ``--net``, else through a user namespace; nothing when neither works (the flags above still hold)."""
    for prefix in (["unshare", "--net"], ["unshare", "--user", "--map-root-user", "--net"]):
        if shutil.which("unshare") and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return []


def screenshot(binary: str, page: Path, out: Path) -> None:
    cmd = [*no_network_prefix(), binary, *QUIET_FLAGS, f"--user-data-dir={out.parent / 'profile'}",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={out}", page.as_uri()]
    env = dict(os.environ, HOME=str(out.parent))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0 and out.is_file(), f"{cmd} failed:\n{done.stderr[-3000:]}"


def count_colour(pixels: np.ndarray, colour: str, tolerance: int = 8) -> int:
    """Pixels (an H x W x 3 array) within ``tolerance`` per channel of ``colour`` (#rrggbb). Tight: the core of a
    2-px line is the exact colour, while its anti-aliased edges (blends towards white) must not pass for another
    palette colour."""
    target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels.astype(np.int16) - target) <= tolerance).all(axis=-1).sum())


def test_chromium_draws_every_chart(tmp_path):
    binary = chromium()
    if binary is None:
        pytest.skip("no Chromium binary on PATH (Debian: apt-get install chromium-headless-shell, as .ci/run does)")
    from PIL import Image  # deferred: only this test reads PNGs (matplotlib brings Pillow)

    page = tmp_path / "report.html"
    page.write_text(build_report("online_dpo", "runs/x", online_records()))
    shot = tmp_path / "report.png"
    screenshot(binary, page, shot)
    image = Image.open(shot).convert("RGB")
    assert image.size == WINDOW
    pixels = np.asarray(image)
    colours = chart_colours(ONLINE_CURVES)
    drawn = {key: count_colour(pixels, colour) for key, colour in colours.items()}
    # a 2-px line across a chart (~300 px wide) or two 3.5-px dots (~70 px); an undrawn chart leaves none
    assert all(n >= 60 for n in drawn.values()), drawn
    assert count_colour(pixels, TIMING_COLOUR) >= 500  # the timing bars
    unused = [c for c in PALETTE if c not in colours.values()]
    assert all(count_colour(pixels, c) == 0 for c in unused), "an unused palette colour shows: the check is blind"
