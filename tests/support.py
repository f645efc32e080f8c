"""What the tests share: the fake upstream, the proxy test base class, small helpers.

The fake upstream is an OpenAI-compatible server on an ephemeral port whose answers follow the
documented formats. The X-Fake-Scenario request header picks one of SCENARIOS (faults, and the
habits of real servers); without it the fake answers as an OpenAI server does.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import unittest
import unittest.mock
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import llm_proxy  # noqa: E402
from llm_proxy import Config, ProxyServer  # noqa: E402

try:
    import redis as redis_py
except ImportError:  # the Redis store's tests are skipped
    redis_py = None
REDIS_SERVER = shutil.which("redis-server")
NO_REDIS = ("redis-server is not installed" if REDIS_SERVER is None else
            "the redis package is not installed" if redis_py is None else "")

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project folder
UPSTREAM_KEY = "sk-upstream-SECRET-0123456789"
CLIENT_KEY = "sk-client-SECRET-abcdef"
WAIT = 10  # seconds any blocking wait in a test may take before the test fails
#: A self-signed certificate for localhost and 127.0.0.1 (valid until 2126) and its key, for
#: the fake upstream's TLS tests. Made with: openssl req -x509 -newkey ec -pkeyopt
#: ec_paramgen_curve:prime256v1 -nodes -days 36500 -subj /CN=localhost
#: -addext subjectAltName=DNS:localhost,IP:127.0.0.1
TLS_CERT = """\
-----BEGIN CERTIFICATE-----
MIIBnDCCAUGgAwIBAgIUehfT799Yxjon5UGatClbZ+NsS4UwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyMzA0NTAwOVoYDzIxMjYxMDMw
MDQ1MDA5WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAASrPcYsL+u6WeYlnCf9SwGpGEp3l1BkHXTnro2L2f+owyOxPW67bA3l
tfb5u0WUDQRv5Ry9biEAJX1vQgAxMEuLo28wbTAdBgNVHQ4EFgQURSWTs4LEhg6I
jy/RKyzPRaFq4MUwHwYDVR0jBBgwFoAURSWTs4LEhg6Ijy/RKyzPRaFq4MUwDwYD
VR0TAQH/BAUwAwEB/zAaBgNVHREEEzARgglsb2NhbGhvc3SHBH8AAAEwCgYIKoZI
zj0EAwIDSQAwRgIhAMvlXZzw+DrN7nYgZFl2UYH1JOPV7bVrNC2u52nrjk5eAiEA
sEH/OIDp4MljFKTkHHcEioE0vxIxTtvHq9X8VOtIzmk=
-----END CERTIFICATE-----
"""
TLS_KEY = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgqAv2/Zjt0+uj9Nmy
TeHOV9rXWaKibGEX24SH+/XyV4GhRANCAASrPcYsL+u6WeYlnCf9SwGpGEp3l1Bk
HXTnro2L2f+owyOxPW67bA3ltfb5u0WUDQRv5Ry9biEAJX1vQgAxMEuL
-----END PRIVATE KEY-----
"""



# ################################################################### fake upstream ####

#: name -> what the fake does when a request carries "X-Fake-Scenario: name". Each is a
#: function of the handler and the parsed request; its docstring says what it plays.
SCENARIOS: dict[str, Callable[["FakeUpstreamHandler", str, dict], None]] = {}


def scenario(name: str):
    def register(function):
        SCENARIOS[name] = function
        return function
    return register


class FakeUpstreamHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible server (chat, completions, responses, embeddings, models)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # small chunked writes must not wait for delayed ACKs

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._serve()

    do_POST = do_DELETE = do_PUT = do_PATCH = do_GET

    def _serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        server = self.server
        server.record(self.command, self.path, dict(self.headers.items()), body)
        server.peers.append(self.client_address)
        name = self.headers.get("X-Fake-Scenario", "")
        request = json.loads(body) if body.startswith(b"{") else {}
        path = self.path.partition("?")[0]
        if name.startswith("status-"):
            return self.error(int(name.split("-")[1]), [("Retry-After", "7")])
        if name in SCENARIOS:
            return SCENARIOS[name](self, path, request)
        self.answer(path, request)

    def answer(self, path, request, habit=""):
        """The normal answer to `path`, with a server's usage `habit` (see stream_events)."""
        server = self.server
        if path == "/v1/models":
            return self.json(200, {"object": "list", "data": [
                {"id": "fake-a", "object": "model", "created": 1, "owned_by": "fake"},
                {"id": "fake-b", "object": "model", "created": 1, "owned_by": "fake"}]},
                [("X-RateLimit-Limit", "999")])
        if path == "/v1/embeddings":
            tokens = fake_prompt_tokens(request)
            server.report(tokens)
            usage = {} if habit == "no-usage" else {
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
            return self.json(200, {"object": "list", "model": "fake-embed", "data": [
                {"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}], **usage})
        if path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
            if request.get("stream"):
                return self.stream(path, request, habit)
            answer = completion(path, request.get("model", ""), request)
            server.report(answer["usage"]["total_tokens"])
            if habit == "no-usage":
                del answer["usage"]
            return self.json(200, answer,
                             [("X-RateLimit-Remaining", "12345"), ("X-Upstream", "yes")])
        return self.error(404)

    def stream(self, path, request, habit="", pause_at=None, stop_at=None, reset_at=None,
               endless=False):
        """An SSE answer, event by event: wait for server.release before event `pause_at`,
        go silent before `stop_at`, reset the connection before `reset_at`, or repeat an event
        for WAIT seconds at the end (`endless`)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = stream_events(path, request.get("model", ""), request, habit)
        if any(b'"usage": {' in e for e in events):
            self.server.report(usage_of(path, request, completion_tokens=3)["total_tokens"])
        delay = float(self.headers.get("X-Fake-Delay", "0"))
        try:
            for index, event in enumerate(events):
                if index == pause_at:
                    self.server.release.wait(WAIT)
                if index == stop_at:
                    self.server.stop.wait(WAIT * 3)
                    return
                if index == reset_at:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.rfile.close()  # the last reference: close() now sends a reset
                    self.connection.close()
                    self.close_connection = True
                    return
                self.chunk(event)
                if delay:
                    time.sleep(delay)
            if endless:
                deadline = time.monotonic() + WAIT
                while time.monotonic() < deadline:
                    self.chunk(events[1])
                    time.sleep(0.02)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.server.disconnected.set()
            self.close_connection = True

    def json(self, status, value, headers=()):
        self.send(status, json.dumps(value).encode(),
                  [("Content-Type", "application/json"), *headers])

    def error(self, status, headers=()):
        self.json(status, {"error": {"message": f"upstream says {status}" if status != 404
                                     else "not found", "type": "invalid_request_error"
                                     if status < 500 else "server_error", "param": None,
                                     "code": None}}, headers)

    def send(self, status, body, headers):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


@scenario("hang")
def _hang(h, path, request):
    """Take the request and never answer."""
    h.server.stop.wait(WAIT * 3)
    h.close_connection = True


@scenario("close")
def _close(h, path, request):
    """Close the connection without answering."""
    h.close_connection = True


@scenario("html-500")
def _html_500(h, path, request):
    """A 500 whose body is an HTML page, not JSON."""
    h.send(500, b"<html>oops</html>", [("Content-Type", "text/html")])


@scenario("stall-body")
def _stall_body(h, path, request):
    """A head and part of a plain body, then nothing."""
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", "100")
    h.end_headers()
    h.wfile.write(b'{"id": "chatcmpl-x", ')
    h.server.stop.wait(WAIT * 3)
    h.close_connection = True


@scenario("garbage")
def _garbage(h, path, request):
    """A 200 whose JSON body is cut short."""
    h.send(200, b'{"id": "chatcmpl-x", "choices": [', [("Content-Type", "application/json")])


@scenario("hop")
def _hop(h, path, request):
    """A 200 carrying hop-by-hop headers (and one named by Connection)."""
    h.send(200, b"{}", [("Content-Type", "application/json"), ("Connection", "X-Up-Private"),
                        ("X-Up-Private", "1"), ("Keep-Alive", "timeout=5"), ("Upgrade", "h2c"),
                        ("X-Kept", "yes")])


@scenario("early-hints")
def _early_hints(h, path, request):
    """Interim answers (103 Early Hints, 102 Processing) before the real one (RFC 8297)."""
    h.wfile.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                  b"HTTP/1.1 102 Processing\r\n\r\n")
    h.answer(path, request)


@scenario("body-after-204")
def _body_after_204(h, path, request):
    """A 204 followed by bytes that look like another answer."""
    leak = json.dumps(completion("/v1/chat/completions", "leaked")).encode()
    h.wfile.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
                  b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(leak), leak))


@scenario("reject-stream-options")
def _reject_stream_options(h, path, request):
    """A server that refuses stream_options with a 400 naming them (old LM Studio)."""
    if "stream_options" not in request:
        return h.answer(path, request)
    h.json(400, {"error": {"message": "Unrecognized request argument supplied: stream_options",
                           "type": "invalid_request_error", "param": None, "code": None}})


for _habit in ("no-usage", "ollama", "llamacpp"):
    SCENARIOS[_habit] = lambda h, path, request, habit=_habit: h.answer(path, request, habit)
    SCENARIOS[_habit].__doc__ = f"Usage reported the way {_habit} does (see stream_events)."


#: Streams that go wrong part-way (arguments of FakeUpstreamHandler.stream).
for _name, _doc, _options in (
        ("gate", "holds its second event until the test sets server.release", {"pause_at": 1}),
        ("gate2", "holds its third event until the test sets server.release", {"pause_at": 2}),
        ("stall", "goes silent after two events", {"stop_at": 2}),
        ("reset", "has its connection reset after the first event", {"reset_at": 1}),
        ("endless", "keeps sending events for WAIT seconds (until its reader goes away)",
         {"endless": True})):
    SCENARIOS[_name] = lambda h, path, request, options=_options: h.stream(path, request,
                                                                          **options)
    SCENARIOS[_name].__doc__ = f"A stream that {_doc}."


def fake_prompt_tokens(request):
    """The fake's "tokenizer": deterministic, and not the proxy's characters/4 estimate."""
    text = json.dumps([request.get(k) for k in ("messages", "prompt", "input")])
    return 3 + len(text.split()) + len(text) // 7


def usage_of(path, request, completion_tokens=2):
    prompt = fake_prompt_tokens(request)
    if path == "/v1/responses":
        return {"input_tokens": prompt, "output_tokens": completion_tokens,
                "total_tokens": prompt + completion_tokens}
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens}


def completion(path, model, request=None):
    usage = usage_of(path, request or {})
    if path == "/v1/chat/completions":
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "proxy ok"},
                             "finish_reason": "stop"}], "usage": usage}
    if path == "/v1/responses":
        return {"id": "resp_fake", "object": "response", "created_at": 1, "model": model,
                "status": "completed", "output": [{"type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": "proxy ok"}]}], "usage": usage}
    return {"id": "cmpl-fake", "object": "text_completion", "created": 1, "model": model,
            "choices": [{"text": "proxy ok", "index": 0, "finish_reason": "stop"}],
            "usage": usage}


def stream_events(path, model, request=None, scenario=""):
    """The SSE events of a streamed answer ("Hello world"), with usage as real servers send it:
    OpenAI/vLLM style by default (with include_usage: "usage": null on every chunk and a final
    chunk with empty choices), "ollama" (zeroed usage on every /v1/completions chunk), "llamacpp"
    (usage with timings on the last chunk, asked or not), "no-usage" (never)."""
    request = request or {}
    options = request.get("stream_options") or {}
    asked = options.get("include_usage") is True and scenario != "no-usage"
    usage = usage_of(path, request, completion_tokens=3)
    if path == "/v1/responses":
        events = [("response.created", {"type": "response.created"}),
                  ("response.output_text.delta", {"type": "response.output_text.delta",
                                                  "delta": "Hello"}),
                  ("response.output_text.delta", {"type": "response.output_text.delta",
                                                  "delta": " world"}),
                  ("response.completed", {"type": "response.completed", "response": {
                      "id": "resp_fake", "status": "completed",
                      **({} if scenario == "no-usage" else {"usage": usage})}})]
        return [b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(e).encode())
                for name, e in events]
    if path == "/v1/chat/completions":
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1,
                "model": model}
        deltas = [({"role": "assistant", "content": ""}, None), ({"content": "Hello"}, None),
                  ({"content": " world"}, None), ({}, "stop")]
        chunks = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": f}]}
                  for d, f in deltas]
    else:
        base = {"id": "cmpl-fake", "object": "text_completion", "created": 1, "model": model}
        chunks = [{**base, "choices": [{"text": t, "index": 0, "finish_reason": f}]}
                  for t, f in (("Hello", None), (" world", None), ("", "stop"))]
    if scenario == "ollama" and path == "/v1/completions":
        for chunk in chunks:
            chunk["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    elif asked and scenario != "llamacpp":
        for chunk in chunks:
            chunk["usage"] = None
    if scenario == "llamacpp":
        chunks[-1]["usage"] = usage
        chunks[-1]["timings"] = {"prompt_n": usage["prompt_tokens"], "predicted_ms": 12.5}
    elif asked:
        chunks.append({**base, "choices": [], "usage": usage})
    return [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


class FakeUpstream(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeUpstreamHandler)
        self.lock = threading.Lock()
        self.requests = []
        self.release = threading.Event()
        self.stop = threading.Event()
        self.disconnected = threading.Event()
        self.reported = []  # total_tokens of every usage the fake reported
        self.peers = []  # the address each request came from

    def record(self, method, path, headers, body):
        with self.lock:
            self.requests.append((method, path, headers, body))

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def report(self, total):
        with self.lock:
            self.reported.append(total)

    def paths(self):
        with self.lock:
            return [path for _, path, _, _ in self.requests]

    tls = False  # TlsUpstream serves it over https, as localhost (the certificate's name)

    @property
    def host(self):
        return f"{'localhost' if self.tls else '127.0.0.1'}:{self.server_address[1]}"

    @property
    def url(self):
        return f"{'https' if self.tls else 'http'}://{self.host}/v1"


class LogCapture(io.StringIO):
    """The proxy's log stream. The access line is written after the response is sent, so a test
    that looks for it waits on a condition instead of racing the handler thread."""

    def __init__(self):
        super().__init__()
        self.changed = threading.Condition()

    def write(self, text):
        with self.changed:
            n = super().write(text)
            self.changed.notify_all()
            return n

    def wait_for(self, predicate, timeout=WAIT):
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self.getvalue()), timeout)


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



# ########################################################################## helpers ####

def parse_metrics(text):
    """{(name, labels): value} from the Prometheus text format, read strictly."""
    samples = {}
    pattern = re.compile(r'^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$')
    label = re.compile(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, labels, value = pattern.match(line).groups()
        pairs = tuple((k, v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\"))
                      for k, v in label.findall(labels or ""))
        samples[(name, pairs)] = float(value)
    return samples


def wait_until(predicate, timeout=WAIT):
    """Wait for a condition another thread brings about (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def thread_stacks():
    """Where every thread is, for a failure message."""
    frames = sys._current_frames()
    return "\n".join(f"{t.name}: {''.join(traceback.format_stack(frames[t.ident], limit=4))}"
                     for t in threading.enumerate() if t.ident in frames)


def open_fds():
    return len(os.listdir("/proc/self/fd"))


class RedisServer:
    """A real redis-server on an ephemeral port, for one test class; stop() and start() again
    on the same port to play an outage."""

    def __init__(self):
        self.port = free_port()
        self.dir = tempfile.mkdtemp()
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        client = redis_py.Redis(port=self.port, socket_timeout=1)
        assert wait_until(lambda: self._pings(client)), "redis-server did not start"
        client.close()

    @staticmethod
    def _pings(client):
        try:
            return client.ping()
        except redis_py.RedisError:
            return False

    def stop(self):
        self.proc.terminate()
        self.proc.wait(WAIT)

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        return redis_py.Redis(port=self.port, socket_timeout=WAIT)


class WithRedis:
    """One redis-server for the test class."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = RedisServer()

    @classmethod
    def tearDownClass(cls):
        cls.redis.close()
        super().tearDownClass()



# ########################################################################### bases ####

class ProxyTestCase(unittest.TestCase):
    """Starts a fake upstream and, per test, a proxy in front of it (both on ephemeral ports)."""

    def setUp(self):
        self.upstream = FakeUpstream()
        self._serve(self.upstream)
        self.addCleanup(self.upstream.stop.set)
        self.clock = FakeClock()
        self.log = LogCapture()
        self.proxy = self.start_proxy()

    def _serve(self, server):
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  daemon=True)
        thread.start()

        def stop():
            server.shutdown()
            server.server_close()
            thread.join(WAIT)
        self.addCleanup(stop)

    def start_proxy(self, **settings):
        settings.setdefault("base_api_url", self.upstream.url)
        config = Config(host="127.0.0.1", port=0, **settings)
        proxy = ProxyServer(config, clock=self.clock, log_stream=self.log)
        self._serve(proxy)
        return proxy

    def restart(self, **settings):
        self.proxy = self.start_proxy(**settings)

    def request(self, method, path, body=None, key=CLIENT_KEY, headers=None, proxy=None):
        """(status, headers as a dict with lower-case names, body bytes)."""
        proxy = proxy or self.proxy
        conn = http.client.HTTPConnection("127.0.0.1", proxy.server_address[1], timeout=WAIT)
        self.addCleanup(conn.close)
        all_headers = dict(headers or {})
        if key:
            all_headers["Authorization"] = f"Bearer {key}"
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=body, headers=all_headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def chat(self, key=CLIENT_KEY, headers=None, path="/v1/chat/completions", proxy=None,
             **fields):
        body = {"model": "fake-a", "messages": [{"role": "user", "content": "hi"}], **fields}
        return self.request("POST", path, body, key=key, headers=headers, proxy=proxy)

    def raw(self, data, proxy=None, read_all=True):
        """Send raw bytes; return everything the proxy answers until it closes (or a timeout)."""
        proxy = proxy or self.proxy
        with socket.create_connection(("127.0.0.1", proxy.server_address[1]), timeout=WAIT) as s:
            s.sendall(data)
            chunks = []
            while True:
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
                if not read_all:
                    break
        return b"".join(chunks)

    def open_stream(self, path="/v1/chat/completions", scenario="", **fields):
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=WAIT)
        self.addCleanup(conn.close)
        body = {"model": "fake-a", "stream": True, **fields}
        body.update({"messages": [{"role": "user", "content": "hi"}]}
                    if path.endswith("chat/completions") else {"prompt": "hi"})
        conn.request("POST", path, json.dumps(body),
                     {"Authorization": f"Bearer {CLIENT_KEY}", "X-Fake-Scenario": scenario})
        return conn, conn.getresponse()

    def assert_openai_error(self, status, body, expected_status, code=None):
        self.assertEqual(status, expected_status, body)
        error = json.loads(body)["error"]
        self.assertEqual(set(error), {"message", "type", "param", "code"})
        self.assertTrue(error["message"])
        if code is not None:
            self.assertEqual(error["code"], code)
        return error

    def remaining(self, key=CLIENT_KEY):
        status, _, body = self.request("GET", "/health", key=key)
        self.assertEqual(status, 200)
        return json.loads(body)["quota"]["remaining"]


def sse_events(body):
    return [line[len(b"data: "):] for line in body.split(b"\n") if line.startswith(b"data: ")]


