"""`noisyft experiment report`: the summary.json contract, report.md, and report.html in a real browser.

The browser test drives headless Chromium (Debian's `chromium`, installed by scripts/setup.sh where missing)
over the DevTools protocol: it loads report.html from disk, fails on any console error or uncaught exception,
checks every figure and table is in the DOM with its image decoded, and saves a full-page screenshot
(to $NOISYFT_SCREENSHOT_DIR when set, to look at).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from noisyft.experiment.cli import main
from noisyft.experiment.report import write_report

FAKE = Path(__file__).resolve().parent / "experiment_fixtures" / "fake_noisyft.py"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """2 seeds x (plain, neftune alpha 5 and 10) on the fake trial command."""
    root = tmp_path_factory.mktemp("exp")
    spec = {
        "name": "fake-report",
        "eval": {"analyses": ["loss", "memorization", "lengths"]},
        "seeds": [1, 2],
        "baseline": "plain",
        "variants": {
            "plain": {"method": "none"},
            "neftune": {"method": "neftune", "neftune": {"alpha": [5, 10]}},
        },
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    argv = [
        "run",
        str(root / "spec.yaml"),
        "--output-dir",
        str(root / "out"),
        "--workers",
        "2",
        "--no-progress",
    ]
    assert main([*argv, "--launcher", f"{sys.executable} {FAKE}"]) == 0
    return root / "out"


def test_summary_json_contract_and_paired_differences(experiment):
    summary = json.loads((experiment / "summary.json").read_text())
    assert summary["baseline"] == "plain"
    assert list(summary["variants"]) == ["plain", "neftune-alpha5", "neftune-alpha10"]
    plain, a10 = summary["variants"]["plain"], summary["variants"]["neftune-alpha10"]
    assert plain["trials"] == ["plain-s1", "plain-s2"] and plain["settings"]["method"] == "none"
    assert a10["settings"]["neftune"] == {"alpha": 10} and a10["axes"] == {"neftune.alpha": 10}
    held = a10["metrics"]["loss.sharegpt:heldout"]
    # fake closed form: mean over 8 examples of 2 + 0.01 i - 0.02 alpha + 0.001 seed -> 2.035 - 0.2 + 0.0015
    assert held["mean"] == pytest.approx(1.8365, abs=1e-12) and held["n"] == 2
    assert held["std"] == pytest.approx(0.001 / 2**0.5, abs=1e-12)
    # paired on (seed, example): every pair differs by exactly -0.02 * 10
    d = held["diff"]
    assert d["pairs"] == "units" and d["n"] == 16 and d["level"] == 0.95
    assert d["estimate"] == pytest.approx(-0.2, abs=1e-12)
    assert d["ci_low"] == pytest.approx(-0.2, abs=1e-12) and d["ci_high"] == pytest.approx(-0.2, abs=1e-12)
    assert "diff" not in plain["metrics"]["loss.sharegpt:heldout"]
    assert set(a10["metrics"]) >= {
        "loss.train",
        "memorization.rouge_l",
        "memorization.bleu",
        "lengths.mean_length",
    }
    md = (experiment / "report.md").read_text()
    assert "| loss.sharegpt:heldout |" in md and "-0.2 [-0.2, -0.2] (16 units)" in md


def _chromium_page(port_dir: Path, url: str):
    """Start headless Chromium on `url`; return (process, websocket of the page)."""
    import urllib.request

    import websocket

    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0",
         f"--user-data-dir={port_dir}", "--window-size=1280,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    active = port_dir / "DevToolsActivePort"
    deadline = time.time() + 30
    while not (active.is_file() and active.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    port = int(active.read_text().split()[0])
    pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
    page_url = next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"]
    ws = websocket.create_connection(
        page_url, timeout=30, suppress_origin=True
    )  # no Origin: DevTools allows it
    return proc, ws


class Page:
    """Just enough of the DevTools protocol: numbered commands, events collected on the way."""

    def __init__(self, ws):
        self.ws, self.next_id, self.events = ws, 0, []

    def send(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    def wait_for(self, event: str, timeout: float = 30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(e.get("method") == event for e in self.events):
                return
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(event)

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                out.append(p["exceptionDetails"].get("text", "exception"))
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(p["entry"]["text"])
        return out


def load_in_browser(path: Path, tmp_path: Path):
    proc, ws = _chromium_page(tmp_path / "chromium-profile", "about:blank")
    page = Page(ws)
    try:
        page.send("Runtime.enable")
        page.send("Log.enable")
        page.send("Page.enable")
        page.send("Page.navigate", url=path.resolve().as_uri())
        page.wait_for("Page.loadEventFired")
        dom = page.send(
            "Runtime.evaluate",
            expression="JSON.stringify({figures: [...document.querySelectorAll('figure')].map(f => "
            "({id: f.id, decoded: [...f.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0)})),"
            " tables: [...document.querySelectorAll('table')].map(t => ({id: t.id, rows: t.rows.length}))})",
            returnByValue=True,
        )["result"]["value"]
        shot = page.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        return json.loads(dom), page.errors(), shot
    finally:
        ws.close()
        proc.kill()
        proc.wait()


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not installed (Debian: apt-get install chromium; scripts/setup.sh does it as root)",
)


@needs_chromium
def test_report_html_in_headless_chromium(experiment, tmp_path):
    import base64

    paths = write_report(experiment)
    assert paths["figures"] == ["fig-curves", "fig-losses", "fig-memorization", "fig-lengths", "fig-sweep"]
    assert paths["tables"] == ["tab-metrics", "tab-diff", "tab-lengths", "tab-trials"]
    html = Path(paths["html"]).read_text()
    assert "http://" not in html and "https://" not in html  # nothing to fetch: readable offline
    dom, errors, shot = load_in_browser(Path(paths["html"]), tmp_path)
    assert errors == []
    assert [f["id"] for f in dom["figures"]] == paths["figures"] and all(f["decoded"] for f in dom["figures"])
    assert sorted(t["id"] for t in dom["tables"]) == sorted(paths["tables"])
    assert {t["id"]: t["rows"] for t in dom["tables"]}["tab-trials"] == 1 + 6
    png = base64.b64decode(shot)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    target = Path(os.environ.get("NOISYFT_SCREENSHOT_DIR") or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    (target / "experiment_report.png").write_bytes(png)


@needs_chromium
def test_the_browser_check_catches_console_errors_and_missing_images(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><body><figure id='fig-x'><img src='data:image/png;base64,AAAA'></figure>"
        "<script>console.error('broken on purpose'); undefinedFunction();</script></body></html>"
    )
    dom, errors, _ = load_in_browser(page, tmp_path)
    assert any("broken on purpose" in e for e in errors) and any(
        "undefinedFunction" in e or "Uncaught" in e for e in errors
    )
    assert dom["figures"] == [{"id": "fig-x", "decoded": False}]
