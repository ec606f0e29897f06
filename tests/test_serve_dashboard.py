"""The dashboard rendered by headless Chromium (skipped where no chromium is installed: ``apt-get install
-y chromium-headless-shell``): the page's own script draws every chart from ``/api/state`` with no
network beyond 127.0.0.1. ``MAML_STOP_DASHBOARD_PNG=docs/serve_dashboard.png`` keeps the screenshot."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import pytest

pytest.importorskip("uvicorn")

from serve_helpers import free_port, make_config, post_all, questions, service  # noqa: E402
from test_feature_subsets import harvested  # noqa: E402,F401  (a fixture)
from test_generate_cmd import artifact  # noqa: E402,F401  (a fixture)

CHROMIUM = next((shutil.which(n) for n in ("chromium-headless-shell", "chromium", "chromium-browser")
                 if shutil.which(n)), None)


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1100,760",
                           "--virtual-time-budget=4000", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install -y chromium-headless-shell)")
def test_dashboard_renders_in_headless_chromium(harvested, artifact, tmp_path):  # noqa: F811
    import uvicorn

    from maml_stop.serve.app import create_app

    cfg = make_config(harvested, artifact, tmp_path / "dash.sqlite", online={"sample_rate": 0.5})
    svc = service(harvested, cfg)
    qs = questions(16, seed=2)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        import httpx

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            for i in range(0, len(qs), 4):
                out = post_all(c, [q.question for q in qs[i:i + 4]])
                for o, q in zip(out, qs[i:i + 4]):
                    assert c.post("/feedback", json={"request_id": o["id"], "gold": q.gold}).status_code == 200
        time.sleep(0.5)  # the queued learning steps
        url = f"http://127.0.0.1:{port}/"
        dom = _chromium("--dump-dom", url)
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert 'data-ready="1"' in dom.stdout  # the script ran to its end
        for chart in ("tokens", "bound", "tau", "rps"):
            start = dom.stdout.index(f'<svg id="{chart}"')
            svg = dom.stdout[start:dom.stdout.index("</svg>", start)]
            assert "<polyline" in svg, f"chart {chart} drew no line"
        assert "requests<b>16</b>" in dom.stdout
        png = os.environ.get("MAML_STOP_DASHBOARD_PNG") or str(tmp_path / "dashboard.png")
        shot = _chromium(f"--screenshot={os.path.abspath(png)}", url)
        assert shot.returncode == 0 and os.path.getsize(png) > 10_000, shot.stderr[-2000:]
    finally:
        server.should_exit = True
        thread.join(30)
