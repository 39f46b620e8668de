"""The reports in a real browser (headless Chromium): no console errors, every figure
visible with a non-zero size, no overlapping text in a figure, no horizontal scrolling;
screenshots are saved under reports/browser/ for people to look at, at a desktop and a
laptop width (``tests.browser.WIDTHS``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moesim.plan.capacity import PlanRequest, plan_capacity
from moesim.plan.report import write_plan
from moesim.report.sweep import write_sweep_report
from tests.browser import WIDTHS, check_page, find_chromium
from tests.conftest import REPO, run_moesim
from tests.report_fixtures import write_sweep_fixture

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary (.ci/run installs Debian's chromium package)"
)
SHOTS = REPO / "reports" / "browser"


def _assert_good_page(page: Path, work: Path, name: str, figures: int) -> None:
    """The page reads well in a desktop and in a laptop window (``WIDTHS``)."""
    assert CHROMIUM is not None
    for label, width in WIDTHS.items():
        found = check_page(CHROMIUM, page, work / label, SHOTS / f"{name}-{label}.png", width)
        assert found["errors"] == [] and found["console"] == [], (label, found)
        assert len(found["figures"]) == figures, label
        for fig in found["figures"]:
            assert fig["visible"] and fig["width"] > 200 and fig["height"] > 100, (label, fig)
            assert fig["width"] <= width, (label, fig)
        assert found["overlaps"] == [], (label, found["overlaps"][:5])
        # nothing wider than the window: no horizontal scrolling
        assert found["pageWidth"] <= found["viewportWidth"], (label, found["pageWidth"])
        assert found["screenshot_ok"], (label, found["screenshot_log"])


def test_simulate_report_in_chromium(tmp_path):
    out = tmp_path / "demo"
    proc = run_moesim("demo", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    _assert_good_page(out / "report.html", tmp_path, "simulate-demo", figures=6)


def test_sweep_report_in_chromium(tmp_path):
    folder = write_sweep_fixture(tmp_path / "sweep")
    write_sweep_report(folder, folder)
    _assert_good_page(folder / "report.html", tmp_path, "sweep", figures=4)


def test_plan_report_in_chromium(tmp_path):
    req = PlanRequest(
        model="Mixtral-8x7B",
        hardware=("H100-SXM", "B200"),
        tokens_per_s=30_000,
        latency_slo_ms=25,
        prices_per_device_hour=(3.0, 6.0),
        max_drop_rate=0.001,  # a drop budget: capacity factors tried, drops figure drawn
    )
    write_plan(plan_capacity(req), req, tmp_path / "plan")
    _assert_good_page(
        tmp_path / "plan" / "report.html", tmp_path, "plan-capacity", figures=9
    )  # with the placement comparison


def test_the_probe_catches_errors_and_overlapping_labels(tmp_path):
    """The checks above can fail: a page with a script error and two labels on one spot."""
    assert CHROMIUM is not None
    page = tmp_path / "bad" / "report.html"
    page.parent.mkdir()
    page.write_text(
        "<!DOCTYPE html><html><head><title>x</title></head><body>"
        '<svg width="300" height="120"><text x="10" y="50">overlapping</text>'
        '<text x="14" y="52">overlapping</text></svg>'
        "<svg width='0' height='0'></svg>"
        "<script>console.error('boom'); undefinedFunction();</script></body></html>"
    )
    found = check_page(CHROMIUM, page, tmp_path, tmp_path / "bad.png", WIDTHS["laptop"])
    assert any("boom" in e for e in found["errors"])
    assert any("undefinedFunction" in e for e in found["errors"])
    assert len(found["overlaps"]) == 1
    assert found["figures"][1]["width"] == 0
