"""Render a report page in headless Chromium: console errors, figure sizes, overlapping
text, and a full-page screenshot."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
#: desktop and laptop window widths the reports are checked at (CSS pixels)
WIDTHS = {"desktop": 1440, "laptop": 1024}

# Injected first in <head>: collects errors, then on load measures every figure and every
# pair of text labels inside a figure, and writes the findings into the DOM as JSON.
PROBE = """<script>
window.__moesimErrors = [];
window.addEventListener("error", function (e) {
  var t = e.target, what = e.message || (t && (t.src || t.href)) || "resource failed";
  window.__moesimErrors.push("error: " + what);
}, true);
(function () {
  var orig = console.error;
  console.error = function () {
    window.__moesimErrors.push("console.error: " + Array.prototype.join.call(arguments, " "));
    return orig.apply(console, arguments);
  };
})();
window.addEventListener("load", function () {
  var figures = [], overlaps = [];
  document.querySelectorAll("svg").forEach(function (svg, i) {
    var r = svg.getBoundingClientRect(), st = getComputedStyle(svg);
    figures.push({width: r.width, height: r.height,
                  visible: st.visibility !== "hidden" && st.display !== "none",
                  section: svg.closest("section") ? svg.closest("section").id : null});
    var boxes = [];
    svg.querySelectorAll("text").forEach(function (t) {
      var b = t.getBoundingClientRect();
      if (b.width > 0 && b.height > 0 && t.textContent.trim()) boxes.push([b, t.textContent]);
    });
    for (var a = 0; a < boxes.length; a++) {
      for (var c = a + 1; c < boxes.length; c++) {
        var p = boxes[a][0], q = boxes[c][0];
        // labels closer than 2 px side by side read as one (e.g. "1011"): count as overlap
        var w = Math.min(p.right, q.right) - Math.max(p.left, q.left) + 2;
        var h = Math.min(p.bottom, q.bottom) - Math.max(p.top, q.top);
        if (w > 0 && h > 0.3 * Math.min(p.height, q.height)) {
          overlaps.push({figure: i, a: boxes[a][1], b: boxes[c][1]});
        }
      }
    }
  });
  var out = document.createElement("pre");
  out.id = "moesim-probe";
  out.textContent = JSON.stringify({
    errors: window.__moesimErrors,
    figures: figures,
    overlaps: overlaps,
    pageWidth: document.documentElement.scrollWidth,
    pageHeight: document.documentElement.scrollHeight,
    viewportWidth: window.innerWidth
  });
  document.body.appendChild(out);
});
</script>"""


def find_chromium() -> str | None:
    for name in BINARIES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(binary: str, args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [
        binary,
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--no-first-run",
        "--disable-extensions",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def check_page(binary: str, page: Path, work: Path, screenshot: Path, width: int) -> dict:
    """Load ``page`` (with the probe injected) in a window ``width`` CSS pixels wide and
    screenshot the original page."""
    work.mkdir(parents=True, exist_ok=True)
    page = page.resolve()
    probed = work.resolve() / f"probe-{page.parent.name}.html"
    html = page.read_text()
    probed.write_text(html.replace("<head>", "<head>\n" + PROBE, 1))
    proc = _run(
        binary,
        [f"--window-size={width},900", "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()],
        work / "profile-dom",
    )
    m = re.search(r'<pre id="moesim-probe">(.*?)</pre>', proc.stdout, re.S)
    if m is None:
        raise AssertionError(f"the probe did not run; chromium said: {proc.stderr[-2000:]}")
    found = json.loads(
        m.group(1)
        .replace("&quot;", '"')
        .replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
    )
    found["console"] = [
        line
        for line in proc.stderr.splitlines()
        if "CONSOLE" in line and re.search(r"Uncaught|Error|error", line)
    ]
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    height = min(int(found["pageHeight"]) + 40, 16000)
    shot = _run(
        binary,
        [f"--window-size={width},{height}", f"--screenshot={screenshot}", page.as_uri()],
        work / "profile-shot",
    )
    found["screenshot_ok"] = screenshot.is_file() and screenshot.stat().st_size > 10_000
    found["screenshot_log"] = shot.stderr[-500:]
    return found
