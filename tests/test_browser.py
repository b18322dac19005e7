"""A real browser (headless Chromium from Debian's packages, installed by .ci/run) renders a
generated report and a running optuna-dashboard for a finished tiny study; screenshots are saved
(to ``$AUTOML_DIFF_SCREENSHOTS`` when set, else the test's temporary folder)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from automl_diff.cli import main
from tests.conftest import REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

# outside CI a machine without Chromium skips these; in CI (CI set), where .ci/run installs it, its absence fails
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="needs Chromium (apt-get install chromium)")


@pytest.fixture(autouse=True)
def _chromium_present() -> None:
    if CHROMIUM is None:
        pytest.fail("CI is set but Chromium is missing: .ci/run installs Debian's chromium package")


def _browse(url: str, shots: Path, name: str) -> str:
    """The DOM after the page's scripts ran, and a screenshot of it."""
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--virtual-time-budget=20000"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    shots.mkdir(parents=True, exist_ok=True)
    subprocess.run([*base, f"--screenshot={shots / name}", "--window-size=1280,1600", url], capture_output=True, timeout=180)
    assert (shots / name).is_file() and (shots / name).stat().st_size > 1000
    return dom


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    return Path(os.environ.get("AUTOML_DIFF_SCREENSHOTS", tmp_path / "screenshots"))


@pytest.fixture
def finished(study_factory, tmp_path, capsys):
    config = study_factory(n_trials=2)
    assert main(["run", str(config), "--quiet"]) == 0
    capsys.readouterr()
    return f"sqlite:///{tmp_path / 'study.db'}"


def test_report_renders_in_a_browser(finished, tmp_path, shots, capsys):
    out = tmp_path / "report.html"
    assert main(["report", "--storage", finished, "--out", str(out), "--samples", "8"]) == 0
    dom = _browse(out.as_uri(), shots, "report.png")
    pareto = dom[dom.index('id="pareto-plot"') :]
    assert 'class="main-svg"' in pareto[:200000]  # plotly drew the figure, offline
    assert dom.count('class="main-svg"') >= 5
    assert "scatterlayer" in pareto and 'class="point"' in pareto
    assert 'id="choices-plot"' in dom
    assert '<table class="pareto">' in dom and "data:image/png;base64," in dom


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_renders_trials_with_their_samples(finished, tmp_path, shots):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "automl_diff.study", "dashboard", "--storage", finished, "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{base}/dashboard", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("optuna-dashboard did not start")
        trials = _browse(f"{base}/dashboard/studies/1/trials", shots, "dashboard_trials.png")
        assert "Trial 0" in trials and "Trial 1" in trials
        assert 'src="/artifacts/1/' in trials  # the trial's note shows its sample grid artifact
        with urllib.request.urlopen(f"{base}/artifacts/1/1/" + trials.split('src="/artifacts/1/1/')[1].split('"')[0]) as r:
            assert r.headers["Content-Type"] == "image/png" and r.read(8) == b"\x89PNG\r\n\x1a\n"
        overview = _browse(f"{base}/dashboard/studies/1", shots, "dashboard_study.png")
        assert "Pareto Front" in overview and 'class="main-svg"' in overview
        assert "macs" in overview and "fid" in overview  # objectives carry their names
        # a second dashboard on the same port: one line, exit 2
        busy = subprocess.run(
            [sys.executable, "-m", "automl_diff.study", "dashboard", "--storage", finished, "--port", str(port)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert busy.returncode == 2 and f"--port {port}" in busy.stderr and "Traceback" not in busy.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)
