"""A small driver for a real headless Chromium over the DevTools protocol (a websocket), shared by acceptance tests.

A page is attached to before it navigates, so every console message, exception and request of the page is seen from
the very start. :func:`require_chromium` skips a test where there is no Chromium, and fails it instead when
``UPSCALED_REQUIRE_ALL=1`` (CI, where a skipped browser test would hide a broken page).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_binary() -> str | None:
    """The Chromium (or Chrome) on PATH, else /usr/bin/chromium if it exists, else None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def require_chromium() -> str:
    """The Chromium binary; without one the test is skipped, or fails when ``UPSCALED_REQUIRE_ALL=1``."""
    binary = chromium_binary()
    problem = None
    if binary is None:
        problem = "no chromium binary (install it with `apt-get install chromium`)"
    else:
        try:
            import websocket  # noqa: F401 - websocket-client, in the test extra
        except ImportError:
            problem = "websocket-client is missing: pip install -e '.[test]'"
    if problem is not None:
        if os.environ.get("UPSCALED_REQUIRE_ALL") == "1":
            pytest.fail(f"UPSCALED_REQUIRE_ALL=1 and {problem}")
        pytest.skip(problem)
    assert binary is not None
    return binary


class DevTools:
    """A minimal DevTools-protocol client over one target's websocket: commands, and every event kept in order."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        # Chromium refuses websocket handshakes that carry an Origin it was not told to allow.
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.events: list[dict[str, Any]] = []
        self._id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.settimeout(60)
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_for(self, event: str, since: int = 0, timeout: float = 60.0) -> dict[str, Any]:
        """The first ``event`` at or after index ``since`` of :attr:`events`, waiting for it if need be."""
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events[since:]:
                if e["method"] == event:
                    return e
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {event} within {timeout}s")
            self.ws.settimeout(max(0.05, left))
            msg = json.loads(self.ws.recv())
            if "method" in msg:
                self.events.append(msg)

    def close(self) -> None:
        self.ws.close()


class Page:
    """One tab: navigate, evaluate, drag the mouse, take screenshots; its console errors, exceptions, requests."""

    def __init__(self, ws_url: str) -> None:
        self.dt = DevTools(ws_url)
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.dt.call(f"{domain}.enable")

    def navigate(self, url: str, timeout: float = 60.0) -> None:
        """Load ``url`` and wait for its load event."""
        since = len(self.dt.events)
        result = self.dt.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise RuntimeError(f"navigating to {url}: {result['errorText']}")
        self.dt.wait_for("Page.loadEventFired", since, timeout)

    def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        """The value of a JavaScript expression; an exception in it fails with its description."""
        res = self.dt.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=await_promise)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression!r} threw: {res['exceptionDetails'].get('exception', res)}")
        return res["result"].get("value")

    def wait(self, expression: str, timeout: float = 30.0) -> Any:
        """Poll ``expression`` until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} stayed falsy for {timeout}s")
            time.sleep(0.05)

    def images_decoded(self, selector: str = "img") -> list[dict[str, Any]]:
        """Every image matching ``selector``: whether it decoded, and its natural size (waits for each)."""
        return self.evaluate(
            f"""
            Promise.all(Array.from(document.querySelectorAll({json.dumps(selector)})).map(i =>
                i.decode().then(() => true, () => false)))
              .then(ok => Array.from(document.querySelectorAll({json.dumps(selector)})).map((i, k) => ({{
                alt: i.alt, decoded: ok[k], complete: i.complete, naturalWidth: i.naturalWidth,
                naturalHeight: i.naturalHeight, src: i.currentSrc}})))""",
            await_promise=True,
        )

    def drag(self, x0: float, y0: float, x1: float, y1: float, steps: int = 8) -> None:
        """A real mouse drag (pressed, moved in ``steps``, released), in CSS pixels of the viewport."""
        self.dt.call("Input.dispatchMouseEvent", type="mouseMoved", x=x0, y=y0)
        self.dt.call("Input.dispatchMouseEvent", type="mousePressed", x=x0, y=y0, button="left", clickCount=1)
        for i in range(1, steps + 1):
            self.dt.call(
                "Input.dispatchMouseEvent",
                type="mouseMoved",
                x=x0 + (x1 - x0) * i / steps,
                y=y0 + (y1 - y0) * i / steps,
                button="left",
                buttons=1,
            )
        self.dt.call("Input.dispatchMouseEvent", type="mouseReleased", x=x1, y=y1, button="left", clickCount=1)

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the first element matching ``selector``."""
        box = self.evaluate(f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
            e.scrollIntoView({{block: "center"}}); const r = e.getBoundingClientRect();
            return [r.left + r.width / 2, r.top + r.height / 2]; }})()""")
        x, y = box
        self.dt.call("Input.dispatchMouseEvent", type="mousePressed", x=x, y=y, button="left", clickCount=1)
        self.dt.call("Input.dispatchMouseEvent", type="mouseReleased", x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: Path, full_page: bool = True, max_height: int = 8000) -> Path:
        """A PNG of the page (the whole page, up to ``max_height`` CSS px) at ``path``."""
        params: dict[str, Any] = dict(format="png")
        if full_page:
            size = self.dt.call("Page.getLayoutMetrics")["cssContentSize"]
            params.update(
                captureBeyondViewport=True,
                clip=dict(x=0, y=0, width=size["width"], height=min(size["height"], max_height), scale=1),
            )
        shot = self.dt.call("Page.captureScreenshot", **params)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def console_errors(self) -> list[dict[str, Any]]:
        """Errors the browser logged (failed loads, CSP violations) and console.error/assert calls."""
        out = [
            e["params"]["entry"]
            for e in self.dt.events
            if e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
        ]
        out += [
            e["params"]
            for e in self.dt.events
            if e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert")
        ]
        return out

    def exceptions(self) -> list[dict[str, Any]]:
        return [e["params"] for e in self.dt.events if e["method"] == "Runtime.exceptionThrown"]

    def requests(self) -> list[str]:
        """Every URL the page asked for, in order."""
        return [e["params"]["request"]["url"] for e in self.dt.events if e["method"] == "Network.requestWillBeSent"]

    def responses(self) -> dict[str, int]:
        """URL -> HTTP status of every response the page got."""
        return {
            e["params"]["response"]["url"]: e["params"]["response"]["status"]
            for e in self.dt.events
            if e["method"] == "Network.responseReceived"
        }

    def close(self) -> None:
        self.dt.close()


class Browser:
    """A headless Chromium with remote debugging, in its own throw-away profile. Use as a context manager."""

    def __init__(self, binary: str, window: tuple[int, int] = (1280, 900)) -> None:
        self.profile = tempfile.mkdtemp(prefix="upscaled-chromium-")
        self.proc = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--disable-extensions",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--force-device-scale-factor=1",
                f"--user-data-dir={self.profile}",
                "--remote-debugging-port=0",
                f"--window-size={window[0]},{window[1]}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        port = None
        deadline = time.monotonic() + 60
        assert self.proc.stderr is not None
        while port is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                port = int(m.group(1))
        if port is None:
            self.close()
            raise RuntimeError(f"chromium did not start its DevTools endpoint (exit code {self.proc.poll()})")
        self.endpoint = f"http://127.0.0.1:{port}"

    def new_page(self) -> Page:
        """A fresh tab on about:blank, attached before anything loads in it."""
        req = urllib.request.Request(f"{self.endpoint}/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(req, timeout=30) as resp:
            target = json.loads(resp.read())
        return Page(target["webSocketDebuggerUrl"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
