"""The investigation report rendered by a real headless Chromium.

Renders the report of a full scripted investigation to a PNG and checks the pixels: the planted
token's highlight (full-strength orange, rgb(255,140,0)) and the intervention bars (green / red)
are drawn, and the page's text (dumped DOM) holds the verdict. The screenshot goes to
$CIRCUITS_TEST_ARTIFACTS or benchmarks/out/. Skipped when chromium is not installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from scientist_support import REPO, TOKEN, run_agent

from circuits_labeler.scientist.report import write_report

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), shutil.which("google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")


def chromium(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'profile'}", *args], capture_output=True, text=True, timeout=120)


def test_chromium_renders_the_report(engine, scripted, tmp_path):
    from PIL import Image

    t, _ = run_agent(engine, scripted, tmp_path, max_steps=20)
    report = write_report(t, tmp_path / "report.html")
    out_dir = Path(os.environ.get("CIRCUITS_TEST_ARTIFACTS") or REPO / "benchmarks" / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "scientist_report.png"
    png.unlink(missing_ok=True)
    shot = chromium(f"--screenshot={png}", "--window-size=1200,5200", report.as_uri(), tmp_path=tmp_path)
    assert png.exists(), shot.stderr[-2000:]
    image = Image.open(png).convert("RGB")
    width, height = image.size
    pixels = image.load()
    counts = {"orange": 0, "green": 0, "red": 0}
    for y in range(0, height, 2):
        for x in range(0, width, 2):
            r, g, b = pixels[x, y]
            if abs(r - 255) < 6 and abs(g - 140) < 6 and b < 8:
                counts["orange"] += 1
            elif abs(r - 0x2E) < 8 and abs(g - 0x7D) < 8 and abs(b - 0x32) < 8:
                counts["green"] += 1
            elif abs(r - 0xC6) < 8 and abs(g - 0x28) < 8 and abs(b - 0x28) < 8:
                counts["red"] += 1
    assert counts["orange"] > 50, counts  # the planted token, highlighted at full strength
    assert counts["green"] + counts["red"] > 50, counts  # intervention effect bars
    dom = chromium("--dump-dom", report.as_uri(), tmp_path=tmp_path).stdout
    assert f"fires on the token {TOKEN}" in dom and "confidence high" in dom and 'id="score">8/8' in dom
