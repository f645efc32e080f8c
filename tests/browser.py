"""Minimal headless-Chromium driver over the DevTools protocol (CDP) on a pipe.

Standard library only; meant for tests that must run pages in a real browser::

    with Browser() as browser:          # skip the test first if find_chromium() is None
        page = browser.new_page()
        page.goto("http://127.0.0.1:8080/")
        page.type("#q", "hello"); page.click("#go")
        page.wait_for("document.querySelector('#out').textContent !== ''")
        assert not page.errors, page.errors

Chromium runs with ``--remote-debugging-pipe``: it reads NUL-terminated CDP JSON
messages from its fd 3 and writes replies and events to its fd 4. A reader thread
stores replies by id and routes events to pages by ``sessionId`` (pages attach with
``flatten=True``, so one pipe carries every session). Every command and every wait
has a timeout and raises TimeoutError saying what it waited for.

``python3 tests/browser.py`` runs a self-test against a local http.server.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable

__all__ = ["find_chromium", "Browser", "Page", "CDPError", "JSError"]


class CDPError(RuntimeError):
    """A DevTools command returned an error, or the browser went away."""


class JSError(RuntimeError):
    """JavaScript run by Page.evaluate threw; the message is the JS exception text."""


def find_chromium() -> str | None:
    """Path of a Chromium binary: $BROWSER_BIN, else chromium, chromium-browser, google-chrome on PATH."""
    env = os.environ.get("BROWSER_BIN")
    if env:
        return shutil.which(env)
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


class Browser:
    """One headless Chromium with a fresh profile; use as a context manager (or call close())."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions"]

    def __init__(self, binary: str | None = None, *, timeout: float = 10.0,
                 start_timeout: float = 30.0, extra_args: list[str] | None = None) -> None:
        binary = binary or find_chromium()
        if binary is None:
            raise FileNotFoundError("no Chromium found (set BROWSER_BIN or install chromium)")
        self.timeout = timeout  # default per-command timeout, seconds
        self._profile = tempfile.mkdtemp(prefix="cdp-browser-")
        self._cond = threading.Condition()  # guards _replies/_dead; notified on every message
        self._write_lock = threading.Lock()
        self._replies: dict[int, dict[str, Any]] = {}
        self._pages: dict[str, Page] = {}
        self._next_id, self._dead, self._closing = 0, False, False
        # fd 3 of the child reads what we write; fd 4 of the child is what we read. The child
        # ends are duplicated to fds >= 10 so the dup2 onto 3 and 4 below cannot clobber them.
        cmd_r, self._cmd_w = os.pipe()
        self._evt_r, evt_w = os.pipe()
        child_r = fcntl.fcntl(cmd_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_w = fcntl.fcntl(evt_w, fcntl.F_DUPFD_CLOEXEC, 10)
        for fd in (cmd_r, evt_w):
            os.close(fd)

        def remap_fds() -> None:  # runs in the child between fork and exec
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        self._stderr = open(os.path.join(self._profile, "stderr.log"), "wb")
        args = [binary, *self.FLAGS, f"--user-data-dir={self._profile}", *(extra_args or []),
                "--remote-debugging-pipe", "about:blank"]
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=self._stderr, pass_fds=(3, 4), preexec_fn=remap_fds,
                                         start_new_session=True)  # own process group: see close()
        except BaseException:
            for fd in (self._cmd_w, self._evt_r):
                os.close(fd)
            self._stderr.close()
            shutil.rmtree(self._profile, ignore_errors=True)
            raise
        finally:
            for fd in (child_r, child_w):
                os.close(fd)
        self._reader = threading.Thread(target=self._read_loop, name="cdp-reader", daemon=True)
        self._reader.start()
        try:
            self.version: str = self.send("Browser.getVersion", timeout=start_timeout)["product"]
        except BaseException as exc:
            tail = self.stderr_tail()
            self.close()
            raise CDPError(f"Chromium did not start ({exc}); stderr tail:\n{tail}") from exc

    # -- transport ---------------------------------------------------------------------------
    def _read_loop(self) -> None:
        buf = b""
        try:
            while not self._closing:
                if not select.select([self._evt_r], [], [], 0.2)[0]:
                    continue
                chunk = os.read(self._evt_r, 1 << 16)
                if not chunk:
                    break
                *messages, buf = (buf + chunk).split(b"\0")
                for raw in messages:
                    self._dispatch(json.loads(raw))
        finally:
            with self._cond:
                self._dead = True
                self._cond.notify_all()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "id" in msg:
            with self._cond:
                self._replies[msg["id"]] = msg
                self._cond.notify_all()
            return
        params = msg.get("params", {})
        page = self._pages.get(msg.get("sessionId") or params.get("sessionId", ""))
        if page is not None:
            page._on_event(msg["method"], params)
        with self._cond:
            self._cond.notify_all()

    def send(self, method: str, params: dict[str, Any] | None = None, *,
             session_id: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Send one CDP command and return its result; CDPError on error, TimeoutError if no reply."""
        timeout = self.timeout if timeout is None else timeout
        with self._cond:
            if self._dead:
                raise CDPError(f"{method}: browser is not running")
            self._next_id += 1
            msg_id = self._next_id
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session_id:
            msg["sessionId"] = session_id
        data = json.dumps(msg).encode() + b"\0"
        with self._write_lock:
            while data:
                data = data[os.write(self._cmd_w, data):]
        with self._cond:
            if not self._cond.wait_for(lambda: msg_id in self._replies or self._dead, timeout):
                raise TimeoutError(f"CDP command {method} got no reply within {timeout}s")
            reply = self._replies.pop(msg_id, None)
        if reply is None:
            raise CDPError(f"{method}: browser exited before replying")
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error'].get('message')} {reply['error'].get('data', '')}".strip())
        return reply.get("result", {})

    def wait_until(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Wait (on incoming messages, without polling) until predicate() is truthy; return it."""
        with self._cond:
            result = self._cond.wait_for(lambda: predicate() or self._dead, timeout)
            if self._dead and not predicate():
                raise CDPError(f"browser exited while waiting for {what}")
        if not result:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        return result

    def stderr_tail(self, lines: int = 20) -> str:
        """Last lines Chromium wrote to stderr (for diagnosing launch failures)."""
        try:
            with open(os.path.join(self._profile, "stderr.log"), "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""

    # -- pages and lifetime ------------------------------------------------------------------
    def new_page(self, width: int = 1280, height: int = 800, mobile: bool = False) -> Page:
        """Open a new tab on about:blank with events enabled and the given viewport."""
        target_id = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session_id = self.send("Target.attachToTarget", {"targetId": target_id, "flatten": True})["sessionId"]
        page = self._pages[session_id] = Page(self, target_id, session_id)
        for domain in ("Page", "Runtime", "Network", "Log"):
            page.send(f"{domain}.enable")
        page.set_viewport(width, height, mobile)
        return page

    def close(self) -> None:
        """Ask Chromium to quit, then terminate/kill it; join the reader; remove the profile."""
        if self._closing:
            return
        with contextlib.suppress(CDPError, TimeoutError, OSError):
            self.send("Browser.close", timeout=3)
        for stop in (None, self.proc.terminate, self.proc.kill):
            if stop:
                stop()
            try:
                self.proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        # Helpers (zygotes, renderers) exit with the browser but are reparented first; kill
        # any left in our process group and wait until the group is gone (reaped) for good.
        deadline = time.monotonic() + 5
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
            while time.monotonic() < deadline:
                os.killpg(self.proc.pid, 0)
                time.sleep(0.02)
        self._closing = True
        self._reader.join(timeout=5)
        for fd in (self._cmd_w, self._evt_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._stderr.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Page:
    """One tab. ``requests``: every request URL it made; ``console``: console messages,
    uncaught exceptions and browser log entries (e.g. CSP violations) as dicts with
    keys kind ("console" | "exception" | "log"), level and text."""

    def __init__(self, browser: Browser, target_id: str, session_id: str) -> None:
        self.browser, self.target_id, self.session_id = browser, target_id, session_id
        self.requests: list[str] = []
        self.console: list[dict[str, str]] = []
        self._loads = 0

    def _on_event(self, method: str, p: dict[str, Any]) -> None:  # runs on the reader thread
        if method == "Page.loadEventFired":
            self._loads += 1
        elif method == "Network.requestWillBeSent":
            self.requests.append(p["request"]["url"])
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", a.get("type")))) for a in p.get("args", []))
            self.console.append({"kind": "console", "level": p["type"], "text": text})
        elif method == "Runtime.exceptionThrown":
            self.console.append({"kind": "exception", "level": "error", "text": _exc_text(p["exceptionDetails"])})
        elif method == "Log.entryAdded":
            e = p["entry"]
            self.console.append({"kind": "log", "level": e["level"], "text": e["text"] + (f" ({e['url']})" if e.get("url") else "")})
        elif method == "Inspector.targetCrashed":
            self.console.append({"kind": "exception", "level": "error", "text": "page crashed"})

    @property
    def errors(self) -> list[dict[str, str]]:
        """Console entries of level error (includes uncaught exceptions and CSP violations)."""
        return [m for m in self.console if m["level"] == "error"]

    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Send a CDP command to this page's session."""
        return self.browser.send(method, params, session_id=self.session_id, timeout=timeout)

    def wait_until(self, predicate: Callable[[], Any], timeout: float = 10, what: str = "condition") -> Any:
        """Wait for a Python-side condition, e.g. on ``requests`` or ``console``."""
        return self.browser.wait_until(predicate, timeout, what)

    def goto(self, url: str, timeout: float = 10) -> None:
        """Navigate and wait for the load event. Raises CDPError if navigation fails
        (e.g. connection refused); same-document (#fragment) navigations return at once."""
        before, deadline = self._loads, time.monotonic() + timeout
        result = self.send("Page.navigate", {"url": url}, timeout=timeout)
        if result.get("errorText"):
            raise CDPError(f"navigation to {url} failed: {result['errorText']}")
        if result.get("loaderId"):
            self.wait_until(lambda: self._loads > before, max(0.0, deadline - time.monotonic()),
                            f"load event of {url}")

    def evaluate(self, expression: str, timeout: float = 10) -> Any:
        """Evaluate a JS expression (promises are awaited) and return its JSON value
        (undefined -> None; DOM nodes come back as {}). Raises JSError if it throws."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True, "userGesture": True}, timeout=timeout)
        if "exceptionDetails" in result:
            raise JSError(f"{_exc_text(result['exceptionDetails'])}\n  in: {expression}")
        return result["result"].get("value")

    def wait_for(self, predicate: str, timeout: float = 10, interval: float = 0.05) -> Any:
        """Poll a JS expression until truthy; return its value. A throwing predicate
        counts as false (e.g. element not there yet); the last error is in the TimeoutError."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = self.evaluate(predicate, timeout=max(0.5, deadline - time.monotonic()))
                if last:
                    return last
            except JSError as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for JS {predicate!r}; last: {last!r}")
            time.sleep(interval)

    def type(self, selector: str, text: str) -> None:
        """Set an input's value and dispatch input + change events (no key events)."""
        self.evaluate(f"""(() => {{ const el = {_query(selector)}; el.focus(); el.value = {json.dumps(text)};
            el.dispatchEvent(new Event('input', {{bubbles: true}}));
            el.dispatchEvent(new Event('change', {{bubbles: true}})); }})()""")

    def click(self, selector: str) -> None:
        """element.click(): fires the click handlers / submits, without hit-testing."""
        self.evaluate(f"{_query(selector)}.click()")

    def text(self, selector: str) -> str:
        """textContent of the first element matching selector."""
        return self.evaluate(f"{_query(selector)}.textContent")

    def set_viewport(self, width: int, height: int, mobile: bool = False, scale: float = 1) -> None:
        """Emulate a viewport (mobile also turns on touch emulation)."""
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile})
        self.send("Emulation.setTouchEmulationEnabled", {"enabled": mobile})

    def screenshot(self, path: str, full_page: bool = True) -> str:
        """Save a PNG of the viewport, or of the whole scrollable page; return path."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
            params["captureBeyondViewport"] = True
        data = self.send("Page.captureScreenshot", params, timeout=30)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path

    def session_storage(self) -> dict[str, str]:
        """sessionStorage of the current document's origin, as a dict."""
        return self.evaluate("Object.fromEntries(Object.entries(sessionStorage))")

    def set_session_storage(self, items: dict[str, str], clear: bool = False) -> None:
        """Write items into sessionStorage of the current origin (optionally clearing it first)."""
        self.evaluate(f"""(() => {{ {'sessionStorage.clear();' if clear else ''}
            for (const [k, v] of Object.entries({json.dumps(items)})) sessionStorage.setItem(k, v); }})()""")

    def close(self) -> None:
        """Close this tab."""
        self.browser.send("Target.closeTarget", {"targetId": self.target_id})
        self.browser._pages.pop(self.session_id, None)


def _query(selector: str) -> str:
    """JS expression for the element matching selector, throwing a clear error if none."""
    sel = json.dumps(selector)
    return f"(document.querySelector({sel}) ?? (() => {{ throw new Error('no element matches ' + {sel}); }})())"


def _exc_text(details: dict[str, Any]) -> str:
    exc = details.get("exception") or {}
    return exc.get("description") or str(exc.get("value", "")) or details.get("text", "JS exception")


# -- self-test ---------------------------------------------------------------------------------
_HTML = b"""<!doctype html><html><head><title>Self-test</title>
<meta name="viewport" content="width=device-width"><script src="/app.js" defer></script></head>
<body><form id="f"><input id="name"><button id="go" type="button">Greet</button></form>
<p id="out"></p><script>window.inlineRan = true;</script></body></html>"""
_JS = b"""document.getElementById('go').addEventListener('click', () => {
  const name = document.getElementById('name').value;
  sessionStorage.setItem('name', name);
  setTimeout(() => { document.getElementById('out').textContent = 'Hello, ' + name + '!'; }, 50);
  console.log('greeted', name);
});"""


def _self_test() -> None:
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, ctype = {"/": (_HTML, "text/html"), "/app.js": (_JS, "text/javascript")}.get(
                self.path, (b"not found", "text/plain"))
            self.send_response(200 if body != b"not found" else 404)
            self.send_header("Content-Type", ctype + "; charset=utf-8")
            self.send_header("Content-Security-Policy", "default-src 'self'")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with Browser() as browser:
            page = browser.new_page(width=800, height=600)
            page.goto(base + "/")
            assert page.evaluate("document.title") == "Self-test"
            page.type("#name", "Ada")
            page.click("#go")
            page.wait_for("document.getElementById('out').textContent !== ''")
            assert page.text("#out") == "Hello, Ada!", page.text("#out")
            assert page.evaluate("Promise.resolve(6 * 7)") == 42
            assert page.session_storage() == {"name": "Ada"}, page.session_storage()
            assert page.evaluate("window.inlineRan") is None, "CSP should block the inline script"
            page.wait_until(lambda: any("Content Security Policy" in m["text"] for m in page.errors),
                            5, "CSP violation report")
            page.wait_until(lambda: any(m["text"] == "greeted Ada" for m in page.console), 5, "console.log")
            for call, error, text in ((lambda: page.evaluate("null.x"), JSError, "TypeError"),
                                      (lambda: page.wait_for("false", 0.3), TimeoutError, "'false'")):
                try:
                    call()
                    raise AssertionError(f"{error.__name__} expected")
                except error as exc:
                    assert text in str(exc), exc
            page.set_viewport(390, 844, mobile=True)
            assert page.evaluate("innerWidth") == 390
            with open(page.screenshot("/tmp/browser_selftest.png"), "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
            assert page.requests and all(u.startswith(base + "/") for u in page.requests), page.requests
        assert browser.proc.poll() is not None and not browser._reader.is_alive()
        assert not os.path.exists(browser._profile)
    finally:
        server.shutdown()
        server.server_close()
    print("ok")


if __name__ == "__main__":
    _self_test()
