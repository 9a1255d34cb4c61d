"""A real headless Chromium (Debian's `chromium`) driven over the DevTools protocol: load a page, read it, screenshot.

CI installs chromium (.ci/run); elsewhere a test that needs it is skipped unless FEDSHOP_REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest


def chromium_path() -> str:
    """The chromium binary, or skip (fail under FEDSHOP_REQUIRE_BROWSER=1)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("FEDSHOP_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed (apt-get install chromium), and FEDSHOP_REQUIRE_BROWSER=1")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


class Browser:
    """One headless Chromium with one page, over the DevTools protocol (websocket)."""

    def __init__(self, url: str, width: int = 1000, height: int = 800) -> None:
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="fedshop-chromium-")
        self.proc = subprocess.Popen(
            [chromium_path(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port = self._devtools_port()
        deadline = time.time() + 30
        pages: list[dict[str, Any]] = []
        while not pages and time.time() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as resp:
                pages = [t for t in json.load(resp) if t.get("type") == "page"]
            time.sleep(0.2)
        assert pages, "chromium opened no page"
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=50 * 2**20)
        self._id = 0

    def _devtools_port(self) -> int:
        active = Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + 30
        while time.time() < deadline:
            if active.is_file() and active.read_text().strip():
                return int(active.read_text().split()[0])
            assert self.proc.poll() is None, f"chromium exited with {self.proc.returncode}"
            time.sleep(0.1)
        raise AssertionError("chromium did not open its DevTools port")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events before the reply are skipped)."""
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self._id:
                assert "error" not in msg, msg
                return dict(msg["result"])

    def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> Any:
        """Poll until the expression is truthy in the page (one that throws, as on a page still loading, is not
        yet); its value."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
            if "exceptionDetails" not in result and result["result"].get("value"):
                return result["result"]["value"]
            time.sleep(0.25)
        raise AssertionError(f"page never satisfied {expression!r}")

    def screenshot(self, path: Path) -> None:
        """The page as a PNG."""
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        """End chromium (the process group this object started: browser, renderer, zygote) and remove its profile."""
        self.ws.close()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
