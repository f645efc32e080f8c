"""What the tests share: the fake upstream, the proxy test base class, small helpers.

The fake upstream is a server on an ephemeral port that speaks three APIs, each following its
documented format: OpenAI's under /v1, Anthropic's Messages API (/v1/messages), and Ollama's
native API at the root (/api/...); see api_of. The X-Fake-Scenario request header picks one of
SCENARIOS (faults, and the habits of real servers); without it the fake answers as the API
that owns the path does. Tests compute the expected answers with the same functions the fake
uses: completion / stream_events / usage_of (OpenAI), anthropic_message / anthropic_events /
anthropic_usage (Anthropic), ollama_answer / ollama_lines / ollama_counts (Ollama), all from
fake_prompt_tokens; wire() gives the exact bytes of the Anthropic and Ollama JSON.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import os
import re
import shutil
import socket
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
# No test writes the user's state folder: proxies keep their state in memory, or in the file a
# test of the state gives them (this also reaches the proxies tests start as processes).
os.environ["STATE_DB"] = "off"

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


def api_of(path):
    """Which API of the fake serves `path` (without its query string):

    "anthropic"  /v1/messages and /v1/messages/count_tokens (reached through BASE_API_URL);
    "ollama"     / and /api/... : Ollama's native API, at the server ROOT (the proxy forwards
                 these to BASE_API_URL without its trailing /v1);
    "openai"     everything else (the OpenAI-compatible API under /v1)."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    if path in ("/", "/api") or path.startswith("/api/"):
        return "ollama"
    return "openai"


def wire(value):
    """JSON as Go servers (Ollama) and the Anthropic API write it: compact, no spaces. The
    OpenAI answers keep Python's json.dumps spacing, as before."""
    return json.dumps(value, separators=(",", ":")).encode()


#: Ollama's native routes: path -> (HTTP methods Ollama accepts there, handler method). Gin
#: answers another method with 405 and an unknown path with 404, both as plain text.
#: "/api/blobs/" stands for every /api/blobs/sha256:<digest>.
OLLAMA_ROUTES = {
    "/": ("GET HEAD", "ollama_read"),
    "/api/version": ("GET HEAD", "ollama_read"),
    "/api/tags": ("GET HEAD", "ollama_read"),
    "/api/ps": ("GET", "ollama_read"),
    "/api/show": ("POST", "ollama_read"),
    "/api/chat": ("POST", "ollama_generate"),
    "/api/generate": ("POST", "ollama_generate"),
    "/api/embed": ("POST", "ollama_embed"),
    "/api/embeddings": ("POST", "ollama_embed"),
    "/api/pull": ("POST", "ollama_progress"),
    "/api/push": ("POST", "ollama_progress"),
    "/api/create": ("POST", "ollama_progress"),
    "/api/copy": ("POST", "ollama_admin"),
    "/api/delete": ("DELETE", "ollama_admin"),
    "/api/blobs/": ("HEAD POST", "ollama_admin"),
}
OLLAMA_JSON = "application/json; charset=utf-8"  # Gin's c.JSON
OLLAMA_NDJSON = "application/x-ndjson"  # Ollama's streamResponse
#: The Go struct each streaming route's body is decoded into (named in its 400 for a bad stream).
OLLAMA_REQUEST_TYPES = {"/api/chat": "ChatRequest", "/api/generate": "GenerateRequest",
                        "/api/pull": "PullRequest", "/api/push": "PushRequest",
                        "/api/create": "CreateRequest"}
OLLAMA_RUN_ERROR = "an error was encountered while running the model"


class FakeUpstreamHandler(BaseHTTPRequestHandler):
    """One server, three documented APIs, picked by path (api_of):

    - `openai`: an OpenAI-compatible server under /v1 (chat, completions, responses,
      embeddings, models), platform.openai.com/docs/api-reference;
    - `anthropic`: Anthropic's Messages API, POST /v1/messages and /v1/messages/count_tokens,
      docs.claude.com/en/api/messages (and messages-streaming, messages-count-tokens, errors);
    - `ollama`: Ollama's native API at the root, /api/... (ollama/ollama docs/api.md, field
      order from api/types.go), dispatched through OLLAMA_ROUTES.
    """

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # small chunked writes must not wait for delayed ACKs

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._serve()

    do_POST = do_DELETE = do_PUT = do_PATCH = do_GET

    def do_HEAD(self):
        """Only Ollama's routes answer HEAD (/, /api/version, /api/tags, /api/blobs/...);
        elsewhere the fake says 501, as the standard library does for a method it lacks."""
        if api_of(self.path.partition("?")[0]) != "ollama":
            return self.send_error(501, "Unsupported method (%r)" % self.command)
        self._serve()

    def _serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.body = body
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
        """The normal answer to `path` from the API that serves it, with a server's `habit`
        (a SCENARIOS name changing how usage is reported; see stream_events,
        anthropic_events, ollama_lines)."""
        return getattr(self, api_of(path))(path, request, habit)

    # ------------------------------------------------------------------------- OpenAI ----

    def openai(self, path, request, habit=""):
        """The OpenAI API: /v1/models, /v1/embeddings, and /v1/chat/completions,
        /v1/completions, /v1/responses (SSE when "stream" is truthy; see stream_events)."""
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
            if habit == "llamacpp-n":
                answer, truth = llamacpp_n_answer(request)
                server.report(truth)
                return self.json(200, answer)
            answer = completion(path, request.get("model", ""), request)
            if habit == "gzip":  # sent encoded although the proxy asked for identity
                server.report(answer["usage"]["total_tokens"])
                return self.send(200, gzip.compress(json.dumps(answer).encode()),
                                 [("Content-Type", "application/json"),
                                  ("Content-Encoding", "gzip")])
            server.report(answer["usage"]["total_tokens"])
            if habit == "no-usage":
                del answer["usage"]
            return self.json(200, answer,
                             [("X-RateLimit-Remaining", "12345"), ("X-Upstream", "yes")])
        return self.error(404)

    # ---------------------------------------------------------------------- Anthropic ----

    def anthropic(self, path, request, habit=""):
        """Anthropic's Messages API. POST /v1/messages answers anthropic_message(), or with
        "stream": true the SSE events of anthropic_events(); POST /v1/messages/count_tokens
        answers {"input_tokens": P}. P is fake_prompt_tokens(request) (it counts "system").
        Reports input + output tokens (cache fields included) like the OpenAI paths: always
        for a plain answer, for a stream when its events carry usage. Other paths or methods:
        an Anthropic not_found_error."""
        if self.command != "POST" or path not in ("/v1/messages", "/v1/messages/count_tokens"):
            return self.error(404)
        if path == "/v1/messages/count_tokens":
            return self.send(200, wire({"input_tokens": fake_prompt_tokens(request)}),
                             ANTHROPIC_HEADERS)
        if request.get("stream") is True:
            return self.stream(path, request, habit)
        if habit == "anthropic-error":
            return self.error(529)
        self.server.report(fake_prompt_tokens(request) + 2)
        self.send(200, wire(anthropic_message(request.get("model", ""), request, habit)),
                  ANTHROPIC_HEADERS)

    # ------------------------------------------------------------------------- Ollama ----

    def ollama(self, path, request, habit=""):
        """Ollama's native API through OLLAMA_ROUTES, after the checks Ollama makes first:
        Gin's plain-text 404/405; 400 {"error": "missing request body"} for an empty POST;
        400 for a `stream` that is not a JSON bool (Go's decoding error); 404 {"error": "model
        'missing' not found"} when the request names the model "missing"."""
        route = OLLAMA_ROUTES.get("/api/blobs/" if path.startswith("/api/blobs/") else path)
        if route is None:
            return self.send(404, b"404 page not found", [("Content-Type", "text/plain")])
        methods, handler = route
        if self.command not in methods.split():
            return self.send(405, b"405 method not allowed", [("Content-Type", "text/plain")])
        refusal = ollama_refusal(path, request, self.body, self.command)
        if refusal:
            return self.ollama_json(*refusal)
        return getattr(self, handler)(path, request, habit)

    def ollama_generate(self, path, request, habit):
        """/api/chat and /api/generate: NDJSON (ollama_lines) unless "stream" is false, then
        one object (ollama_answer). Reports prompt_eval_count + eval_count, P + eval_count,
        even when the final line leaves prompt_eval_count out ("ollama-cached"): the tests
        compare that total with what the proxy charges (its own estimate of the prompt plus
        eval_count). A stream whose lines carry no count ("no-usage", "ollama-error") reports
        nothing; a plain answer always reports, as the OpenAI paths do."""
        if request.get("stream") is not False:  # absent or null: Ollama streams
            return self.stream(path, request, habit)
        if habit == "ollama-error":  # before the first byte: a real status and the error
            return self.ollama_json(500, {"error": OLLAMA_RUN_ERROR})
        self.server.report(fake_prompt_tokens(request) + 2)
        self.ollama_json(200, ollama_answer(path, request.get("model", ""), request, habit))

    def ollama_embed(self, path, request, habit):
        """/api/embed (one embedding per input, prompt_eval_count P: reported) and the older
        /api/embeddings (one embedding, no count: nothing reported)."""
        if path == "/api/embed":
            self.server.report(fake_prompt_tokens(request))
        self.ollama_json(200, ollama_answer(path, request.get("model", ""), request, habit))

    def ollama_read(self, path, request, habit):
        """/ ("Ollama is running"), /api/version, /api/tags, /api/ps, /api/show."""
        if path == "/":
            return self.send(200, b"Ollama is running",
                             [("Content-Type", "text/plain; charset=utf-8")])
        self.ollama_json(200, ollama_answer(path, request.get("model", ""), request, habit))

    def ollama_progress(self, path, request, habit):
        """/api/pull, /api/push, /api/create: progress as NDJSON (ollama_lines) unless
        "stream" is false, then one {"status": "success"}."""
        if request.get("stream") is not False:
            return self.stream(path, request, habit)
        self.ollama_json(200, ollama_answer(path, request.get("model", ""), request, habit))

    def ollama_admin(self, path, request, habit):
        """/api/copy, /api/delete, HEAD|POST /api/blobs/sha256:...: 200 {"status": "success"}
        so that a test sees the request went through (real Ollama answers 200 with an empty
        body here, and 201 for an uploaded blob; its client reads only the status)."""
        self.ollama_json(200, ollama_answer(path, request.get("model", ""), request, habit))

    def ollama_json(self, status, value):
        self.send(status, wire(value), [("Content-Type", OLLAMA_JSON)])

    # ------------------------------------------------------------------------ sending ----

    def stream(self, path, request, habit="", pause_at=None, stop_at=None, reset_at=None,
               endless=False):
        """A streamed answer (SSE, or NDJSON for Ollama; see stream_of), event by event, each
        its own chunk: wait for server.release before event `pause_at`, go silent before
        `stop_at`, reset the connection before `reset_at`, or repeat a content event for
        WAIT seconds at the end (`endless`)."""
        headers, events, total, repeat = stream_of(path, request.get("model", ""), request,
                                                   habit)
        self.send_response(200)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if total is not None:
            self.server.report(total)
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
                    self.chunk(events[repeat])
                    time.sleep(0.02)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.server.disconnected.set()
            self.close_connection = True

    def json(self, status, value, headers=()):
        self.send(status, json.dumps(value).encode(),
                  [("Content-Type", "application/json"), *headers])

    def error(self, status, headers=()):
        """An error in the shape of the API that serves the request's path: OpenAI's
        {"error": {message, type, param, code}}, Anthropic's {"type": "error", "error":
        {type, message}}, Ollama's {"error": "..."}."""
        api = api_of(self.path.partition("?")[0])
        if api == "anthropic":
            return self.send(status, wire(anthropic_error(status)),
                             [*ANTHROPIC_HEADERS, *headers])
        if api == "ollama":
            return self.send(status, wire({"error": f"upstream says {status}"}),
                             [("Content-Type", OLLAMA_JSON), *headers])
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
        if self.command != "HEAD":
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


@scenario("big")
def _big(h, path, request):
    """A plain answer of 8 MB, sent as fast as the reader takes it."""
    h.send(200, b'{"pad": "' + b"x" * (8 * 1024 * 1024) + b'"}', [("Content-Type", "application/json")])


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


#: The flood: 48 MiB, more than the proxy holds for a client (256 KiB) and the kernel's
#: buffers between it and the upstream (up to tcp_rmem's 32 MiB and tcp_wmem's 4 MiB).
FLOOD_EVENTS, FLOOD_TEXT = 3072, 16 * 1024


def flood_event(index):
    return b"data: " + json.dumps({"id": "chatcmpl-flood", "object": "chat.completion.chunk",
                                   "created": 1, "model": "fake-a", "choices": [{
                                       "index": 0, "delta": {"content": f"{index:08d}".ljust(
                                           FLOOD_TEXT, "x")}, "finish_reason": None}]}
                                  ).encode() + b"\n\n"


@scenario("flood")
def _flood(h, path, request):
    """A stream of flood_event events of 16 KiB, written as fast as the reader takes them;
    server.flood_sent counts the bytes written so far. X-Fake-Events: N sends N events instead
    of FLOOD_EVENTS, and X-Fake-Then: stall goes silent after them, reset resets the
    connection (else the stream ends as usual)."""
    count = int(h.headers.get("X-Fake-Events") or FLOOD_EVENTS)
    then = h.headers.get("X-Fake-Then", "")
    h.send_response(200)
    h.send_header("Content-Type", "text/event-stream")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    try:
        for index in range(count):
            event = flood_event(index)
            h.chunk(event)
            h.server.flood_sent += len(event)
        h.wfile.flush()
        if then == "stall":
            h.server.stop.wait(WAIT * 3)
            h.close_connection = True
            return
        if then == "reset":
            return _reset(h)
        h.chunk(b"data: [DONE]\n\n")
        h.wfile.write(b"0\r\n\r\n")
    except OSError:
        h.server.disconnected.set()
        h.close_connection = True


def _reset(h):
    """Close the connection with a reset (RST), not the usual FIN."""
    h.wfile.flush()
    h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    h.rfile.close()
    h.connection.close()
    h.close_connection = True
    with h.server.lock:
        h.server.closed += 1


@scenario("then-reset")
def _then_reset(h, path, request):
    """The usual answer (streamed when asked), then the connection reset (RST) at once, as a
    load balancer's idle timeout or a server closing with bytes unread does;
    server.closed counts them."""
    h.answer(path, request)
    _reset(h)


@scenario("odd-chunks")
def _odd_chunks(h, path, request):
    """The usual stream framed the ways a server may: upper-case sizes with leading zeros and
    an extension, an event split across two chunks and a chunk split across two writes,
    several chunks in one write, and a trailer after the last chunk."""
    events = stream_events(path, request.get("model", ""), request)
    h.send_response(200)
    h.send_header("Content-Type", "text/event-stream")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    first, second, *rest = events
    h.wfile.write(b"%04X;note=1\r\n%s\r\n" % (len(first), first))
    h.wfile.flush()
    half = len(second) // 2
    h.wfile.write(b"%X\r\n%s" % (half, second[:half]))
    h.wfile.flush()
    h.wfile.write(b"\r\n%x\r\n%s\r\n" % (len(second) - half, second[half:]))
    h.wfile.flush()
    h.wfile.write(b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in rest)
                  + b"0\r\nX-Checksum: none\r\n\r\n")


@scenario("after-last-chunk")
def _after_last_chunk(h, path, request):
    """The usual stream, then bytes after its last chunk that no request asked for."""
    events = stream_events(path, request.get("model", ""), request)
    h.send_response(200)
    h.send_header("Content-Type", "text/event-stream")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    h.wfile.write(b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)
                  + b"0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")


@scenario("then-close")
def _then_close(h, path, request):
    """The usual answer, then the connection closed without a word (as a server may close an
    idle keep-alive connection at any time); server.closed counts them."""
    h.answer(path, request)
    h.wfile.flush()
    h.connection.shutdown(socket.SHUT_WR)
    h.close_connection = True
    with h.server.lock:
        h.server.closed += 1


@scenario("reject-stream-options")
def _reject_stream_options(h, path, request):
    """A server that refuses stream_options with a 400 naming them (old LM Studio)."""
    if "stream_options" not in request:
        return h.answer(path, request)
    h.json(400, {"error": {"message": "Unrecognized request argument supplied: stream_options",
                           "type": "invalid_request_error", "param": None, "code": None}})


#: Habits: the normal answer, with usage reported (or failing) the way a real server does.
for _habit, _doc in (
        ("no-usage", "Usage never reported: no usage (OpenAI, Anthropic), no prompt_eval_count "
                     "or eval_count (Ollama)."),
        ("ollama", "Usage reported the way Ollama's OpenAI API does (see stream_events)."),
        ("llamacpp", "Usage reported the way llama.cpp does (see stream_events)."),
        ("llamacpp-n", "n answers as llama.cpp's server gives them: a plain answer's usage counts "
                       "the first only; a stream sends one usage chunk per answer (see "
                       "llamacpp_n_answer, llamacpp_n_events)."),
        ("gzip", "A plain chat answer sent gzip-encoded although identity was asked for."),
        ("anthropic-cache", "/v1/messages usage split as llama.cpp and Anthropic do with a "
                            "prompt cache: input_tokens 1 (uncached), cache_read_input_tokens "
                            "the rest, cache_creation_input_tokens 0 (see anthropic_usage)."),
        ("anthropic-error", "/v1/messages fails: a stream sends message_start, then an "
                            "`event: error` (overloaded_error) and ends; a plain answer is a "
                            "529 overloaded_error."),
        ("ollama-cached", "/api/chat, /api/generate leave prompt_eval_count out (Ollama does "
                          "when the prompt was cached); the fake still reports P + eval_count."),
        ("ollama-error", "/api/chat, /api/generate fail: a stream sends one line, then "
                         '{"error": "..."} and ends (status 200); a plain answer is a 500.')):
    SCENARIOS[_habit] = lambda h, path, request, habit=_habit: h.answer(path, request, habit)
    SCENARIOS[_habit].__doc__ = _doc


#: Streams that go wrong part-way (arguments of FakeUpstreamHandler.stream), on every API's
#: streaming routes alike (OpenAI SSE, Anthropic SSE, Ollama NDJSON): event k is the k-th
#: event or line of stream_events / anthropic_events / ollama_lines.
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
    """The fake's "tokenizer": deterministic, and not the proxy's estimate. It
    counts "messages", "prompt", "input" and, when present, "system" (Anthropic's top-level
    system prompt, Ollama's /api/generate system)."""
    parts = [request.get(k) for k in ("messages", "prompt", "input")]
    if "system" in request:
        parts.append(request["system"])
    text = json.dumps(parts)
    return 3 + len(text.split()) + len(text) // 7


def stream_of(path, model, request=None, habit=""):
    """What FakeUpstreamHandler.stream sends on `path`: (headers before Transfer-Encoding,
    the events, the total it reports or None, the index of the event `endless` repeats)."""
    request = request or {}
    api = api_of(path)
    prompt = fake_prompt_tokens(request)
    if api == "anthropic":
        events = anthropic_events(model, request, habit)
        total = None if habit == "no-usage" else prompt if habit == "anthropic-error" \
            else prompt + 3
        return ANTHROPIC_SSE_HEADERS, events, total, min(3, len(events) - 1)
    if api == "ollama":
        lines = ollama_lines(path, model, request, habit)
        counted = path in ("/api/chat", "/api/generate") and habit not in (
            "no-usage", "ollama-error")
        return [("Content-Type", OLLAMA_NDJSON)], lines, prompt + 3 if counted else None, 1
    events = stream_events(path, model, request, habit)
    total = (usage_of(path, request, completion_tokens=3)["total_tokens"]
             if any(b'"usage": {' in e for e in events) else None)
    if habit == "llamacpp-n":  # what its counters say: the prompt once, every answer's tokens
        usages = [json.loads(e[6:])["usage"] for e in events
                  if e.startswith(b"data: {") and b'"choices": [], "usage"' in e]
        total = (usages[0]["prompt_tokens"] + sum(u["completion_tokens"] for u in usages)
                 if usages else None)
    return [("Content-Type", "text/event-stream")], events, total, 1


# ------------------------------------------------------------------ OpenAI's formats ----

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


def responses_events(model, usage):
    """A Responses API stream of the answer "Hello world" as a server sends it (llama.cpp,
    vLLM, OpenAI): every event named and numbered, the response object at the start and, whole
    with its usage (unless None), in response.completed."""
    item_id = "msg_fake"
    response = {"id": "resp_fake", "object": "response", "created_at": 1, "status": "in_progress",
                "model": model, "output": [], "usage": None}
    part = {"type": "output_text", "text": "Hello world", "annotations": []}
    item = {"id": item_id, "type": "message", "status": "completed", "role": "assistant",
            "content": [part]}
    at = {"item_id": item_id, "output_index": 0, "content_index": 0}
    done = {**response, "status": "completed", "output": [item]}
    if usage is not None:
        done["usage"] = usage
    events = [("response.created", {"response": response}),
              ("response.in_progress", {"response": response}),
              ("response.output_item.added", {"output_index": 0,
                                              "item": {**item, "status": "in_progress",
                                                       "content": []}}),
              ("response.content_part.added", {**at, "part": {**part, "text": ""}}),
              ("response.output_text.delta", {**at, "delta": "Hello"}),
              ("response.output_text.delta", {**at, "delta": " world"}),
              ("response.output_text.done", {**at, "text": "Hello world"}),
              ("response.content_part.done", {**at, "part": part}),
              ("response.output_item.done", {"output_index": 0, "item": item}),
              ("response.completed", {"response": done})]
    return [b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(
                {"type": name, "sequence_number": number, **data}).encode())
            for number, (name, data) in enumerate(events)]


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
        return responses_events(model, usage if scenario != "no-usage" else None)
    if scenario == "llamacpp-n":
        return llamacpp_n_events(request, asked)
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


#: What llama.cpp's server generates for each answer of a request with n > 1 (the fake's).
N_ANSWERS = ("proxy ok", "a longer second answer", "and a third answer, the longest of the three")


def llamacpp_n_answer(request):
    """A chat answer with n choices, or a completion of a prompt array, as llama.cpp's server
    gives them: the usage counts the first choice (and the first prompt) only, and `timings`
    follow it (llama.cpp's server puts them on every plain answer). Returns (answer, the truth:
    every prompt and every choice, a token being four characters here)."""
    prompts = request.get("prompt")
    several = isinstance(prompts, list) and prompts and isinstance(prompts[0], str)
    texts = N_ANSWERS[:len(prompts) if several else request.get("n", 1)]
    prompt = fake_prompt_tokens({"prompt": prompts[0]} if several else request)
    first = -(-len(texts[0]) // 4)
    if several:
        choices = [{"text": t, "index": i, "finish_reason": "stop"} for i, t in enumerate(texts)]
    else:
        choices = [{"index": i, "message": {"role": "assistant", "content": t},
                    "finish_reason": "stop"} for i, t in enumerate(texts)]
    answer = {"id": "chatcmpl-fake", "object": "text_completion" if several
              else "chat.completion", "created": 1, "model": request.get("model", ""),
              "choices": choices, "usage": {"prompt_tokens": prompt, "completion_tokens": first,
                                            "total_tokens": prompt + first},
              "timings": {"prompt_n": prompt, "predicted_n": first, "predicted_ms": 12.5}}
    return answer, fake_prompt_tokens(request) + sum(-(-len(t) // 4) for t in texts)


def llamacpp_n_events(request, asked):
    """A chat stream with n choices as llama.cpp's server sends it: each choice's chunks and,
    when usage was asked for, one usage chunk after each choice's last (its prompt counted
    again each time, no index), then one [DONE]."""
    prompt = fake_prompt_tokens(request)
    base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1,
            "model": request.get("model", "")}
    events = []
    for index, text in enumerate(N_ANSWERS[:request.get("n", 1)]):
        for delta, finish in (({"role": "assistant", "content": None}, None),
                              ({"content": text}, None), ({}, "stop")):
            events.append({**base, "choices": [{"index": index, "delta": delta,
                                                "finish_reason": finish}]})
        if asked:
            tokens = -(-len(text) // 4)
            events.append({**base, "choices": [], "usage": {
                "prompt_tokens": prompt, "completion_tokens": tokens,
                "total_tokens": prompt + tokens}})
    return [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


# --------------------------------------------------------------- Anthropic's formats ----
# docs.claude.com/en/api/messages, /en/docs/build-with-claude/streaming, /en/api/errors. The
# JSON is compact, as the Anthropic API and llama.cpp write it; answers carry "request-id".

ANTHROPIC_HEADERS = [("Content-Type", "application/json"), ("request-id", "req_fake")]
ANTHROPIC_SSE_HEADERS = [("Content-Type", "text/event-stream"), ("request-id", "req_fake")]
#: HTTP status -> Anthropic error type (docs.claude.com/en/api/errors); other 4xx are
#: invalid_request_error, other 5xx api_error.
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                         402: "billing_error", 403: "permission_error", 404: "not_found_error",
                         413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                         504: "timeout_error", 529: "overloaded_error"}


def anthropic_error(status):
    """The body of an Anthropic error answer with `status`."""
    kind = ANTHROPIC_ERROR_TYPES.get(status, "invalid_request_error" if status < 500
                                     else "api_error")
    message = "Overloaded" if status == 529 else "not found" if status == 404 \
        else f"upstream says {status}"
    return {"type": "error", "error": {"type": kind, "message": message},
            "request_id": "req_fake"}


def anthropic_usage(request, output_tokens, habit=""):
    """Messages usage for a prompt of fake_prompt_tokens(request) tokens. With the
    "anthropic-cache" habit the prompt is split as llama.cpp does for a cached prompt (and
    Anthropic with prompt caching): input_tokens 1 is the uncached part and
    cache_read_input_tokens the rest, so input + cache_creation + cache_read = P."""
    prompt = fake_prompt_tokens(request or {})
    if habit == "anthropic-cache":
        return {"input_tokens": 1, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": prompt - 1, "output_tokens": output_tokens}
    return {"input_tokens": prompt, "output_tokens": output_tokens}


def anthropic_message(model, request=None, habit=""):
    """The non-stream /v1/messages answer ("proxy ok", 2 output tokens), as the dict the fake
    sends (its bytes: wire(anthropic_message(...))). "no-usage" leaves usage out."""
    message = {"id": "msg_fake", "type": "message", "role": "assistant",
               "content": [{"type": "text", "text": "proxy ok"}], "model": model,
               "stop_reason": "end_turn", "stop_sequence": None,
               "usage": anthropic_usage(request, 2, habit)}
    if habit == "no-usage":
        del message["usage"]
    return message


def anthropic_events(model, request=None, habit=""):
    """The SSE events (exact bytes, `event: NAME\\ndata: JSON\\n\\n` each) of a streamed
    /v1/messages answer ("Hello world"): message_start (usage with input_tokens and
    output_tokens 0), content_block_start, ping, two content_block_delta, content_block_stop,
    message_delta (stop_reason end_turn, usage {"output_tokens": 3}: output only, as llama.cpp
    sends it), message_stop. No [DONE]. Habits: "anthropic-cache" (see anthropic_usage),
    "no-usage" (no usage in message_start or message_delta: the anthropic SDK's accumulator
    cannot read such a stream, it is for the proxy's meter), "anthropic-error" (message_start,
    then `event: error` with an overloaded_error, and the stream ends)."""
    start = {"id": "msg_fake", "type": "message", "role": "assistant", "content": [],
             "model": model, "stop_reason": None, "stop_sequence": None,
             "usage": anthropic_usage(request, 0, habit)}
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                "stop_sequence": None},
             "usage": {"output_tokens": 3}}
    if habit == "no-usage":
        del start["usage"], delta["usage"]
    events = [("message_start", {"type": "message_start", "message": start}),
              ("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}}),
              ("ping", {"type": "ping"}),
              *(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": text}})
                for text in ("Hello", " world")),
              ("content_block_stop", {"type": "content_block_stop", "index": 0}),
              ("message_delta", delta),
              ("message_stop", {"type": "message_stop"})]
    if habit == "anthropic-error":
        events = events[:1] + [("error", {"type": "error", "error": {
            "type": "overloaded_error", "message": "Overloaded"}})]
    return [b"event: %s\ndata: %s\n\n" % (name.encode(), wire(data)) for name, data in events]


# ------------------------------------------------------------------ Ollama's formats ----
# ollama/ollama docs/api.md and docs/api/errors.mdx; keys in the order of api/types.go. Go
# writes compact JSON; a stream is one object and "\n" a line.

OLLAMA_CREATED_AT = "2026-12-01T00:00:00.000000Z"
OLLAMA_MODELS = ("fake-a:latest", "fake-b:latest")  # /api/tags and /api/ps, name == model
OLLAMA_DETAILS = {"parent_model": "", "format": "gguf", "family": "fake", "families": ["fake"],
                  "parameter_size": "1M", "quantization_level": "Q4_0"}
OLLAMA_PROGRESS = {"/api/pull": "pulling manifest", "/api/push": "retrieving manifest",
                   "/api/create": "gathering model components"}


def ollama_refusal(path, request, body=b"{}", method="POST"):
    """(status, {"error": ...}) when Ollama refuses the request before answering, else None:
    an empty POST body; a `stream` that is not a JSON bool (null is allowed: it streams); the
    model "missing" (404, worded as each handler words it)."""
    if method == "POST" and not body and not path.startswith("/api/blobs/"):
        return 400, {"error": "missing request body"}
    stream = request.get("stream")
    if path in OLLAMA_REQUEST_TYPES and stream is not None and not isinstance(stream, bool):
        kind = ("string" if isinstance(stream, str) else "number"
                if isinstance(stream, (int, float)) else "array" if isinstance(stream, list)
                else "object")
        return 400, {"error": f"json: cannot unmarshal {kind} into Go struct field "
                              f"{OLLAMA_REQUEST_TYPES[path]}.stream of type bool"}
    if path == "/api/copy" and request.get("source") == "missing":
        return 404, {"error": 'model "missing" not found'}
    if path in ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show",
                "/api/delete") and "missing" in (request.get("model"), request.get("name")):
        return 404, {"error": "model 'missing' not found"}
    return None


def ollama_counts(request, eval_count, habit=""):
    """The durations and counts of a final line: prompt_eval_count P =
    fake_prompt_tokens(request), eval_count; "ollama-cached" leaves prompt_eval_count out
    (as Ollama does for a cached prompt: the field is omitempty), "no-usage" both counts."""
    counts = {"total_duration": 1000, "load_duration": 10,
              "prompt_eval_count": fake_prompt_tokens(request or {}),
              "prompt_eval_duration": 100, "eval_count": eval_count, "eval_duration": 500}
    if habit in ("ollama-cached", "no-usage"):
        del counts["prompt_eval_count"]
    if habit == "no-usage":
        del counts["eval_count"]
    return counts


def _ollama_part(path, model, text, request=None, habit="", eval_count=None):
    """One /api/chat or /api/generate object; the final one when eval_count is given."""
    part = {"model": model, "created_at": OLLAMA_CREATED_AT}
    if path == "/api/chat":
        part["message"] = {"role": "assistant", "content": text}
    else:
        part["response"] = text
    part["done"] = eval_count is not None
    if eval_count is not None:
        part["done_reason"] = "stop"
        if path == "/api/generate":
            part["context"] = [1, 2, 3]
        part.update(ollama_counts(request, eval_count, habit))
    return part


def ollama_lines(path, model, request=None, habit=""):
    """The NDJSON lines (exact bytes, each ending in "\\n") of a streamed answer on `path`.
    /api/chat, /api/generate: "Hello", " world" (done false), then the final line (content
    "", done true, done_reason stop, durations, prompt_eval_count P, eval_count 3; /api/generate
    adds context). Habits: "ollama-cached", "no-usage" (see ollama_counts), "ollama-error" (the
    first line, then {"error": "an error was encountered while running the model"}).
    /api/pull, /api/push, /api/create: a progress status, then {"status": "success"}."""
    if path in OLLAMA_PROGRESS:
        parts = [{"status": OLLAMA_PROGRESS[path]}, {"status": "success"}]
    else:
        parts = [_ollama_part(path, model, "Hello"), _ollama_part(path, model, " world"),
                 _ollama_part(path, model, "", request, habit, eval_count=3)]
        if habit == "ollama-error":
            parts = [parts[0], {"error": OLLAMA_RUN_ERROR}]
    return [wire(part) + b"\n" for part in parts]


def ollama_model(name, running=False):
    """An entry of /api/tags (or, running, of /api/ps)."""
    if running:
        return {"name": name, "model": name, "size": 1, "digest": "abc",
                "details": OLLAMA_DETAILS, "expires_at": "2026-12-01T00:05:00Z",
                "size_vram": 1, "context_length": 2048}
    return {"name": name, "model": name, "modified_at": "2026-11-01T00:00:00Z", "size": 1,
            "digest": "abc", "details": OLLAMA_DETAILS}


def ollama_answer(path, model, request=None, habit=""):
    """The JSON object the fake answers on an Ollama `path` when it does not stream (its
    bytes: wire(ollama_answer(...))): /api/chat, /api/generate ("proxy ok", done, eval_count
    2; habits as in ollama_lines), /api/embed (one [0.1, 0.2, 0.3] per input,
    prompt_eval_count P unless "no-usage"), /api/embeddings, /api/tags, /api/ps,
    /api/version, /api/show, and {"status": "success"} for the administration routes."""
    request = request or {}
    if path in ("/api/chat", "/api/generate"):
        return _ollama_part(path, model, "proxy ok", request, habit, eval_count=2)
    if path == "/api/embed":
        inputs = request.get("input")
        count = 1 if isinstance(inputs, str) else len(inputs or [])
        answer = {"model": model, "embeddings": [[0.1, 0.2, 0.3] for _ in range(count)],
                  "total_duration": 1, "load_duration": 1,
                  "prompt_eval_count": fake_prompt_tokens(request)}
        if habit == "no-usage":
            del answer["prompt_eval_count"]
        return answer
    if path == "/api/embeddings":
        return {"embedding": [0.1, 0.2, 0.3]}
    if path in ("/api/tags", "/api/ps"):
        return {"models": [ollama_model(name, path == "/api/ps") for name in OLLAMA_MODELS]}
    if path == "/api/version":
        return {"version": "0.14.0"}
    if path == "/api/show":
        return {"modelfile": "FROM fake\n", "parameters": "num_ctx 2048",
                "template": "{{ .Prompt }}", "details": OLLAMA_DETAILS,
                "model_info": {"general.architecture": "fake"}, "capabilities": ["completion"],
                "modified_at": "2026-11-01T00:00:00Z"}
    return {"status": "success"}


class FakeUpstream(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeUpstreamHandler)
        self.lock = threading.Lock()
        self.requests = []
        self.release = threading.Event()
        self.stop = threading.Event()
        self.disconnected = threading.Event()
        self.flood_sent = 0  # bytes the flood scenario has written
        self.closed = 0  # connections the then-close scenario has closed
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
        """BASE_API_URL for the proxy: the OpenAI and Anthropic APIs live under it."""
        return f"{'https' if self.tls else 'http'}://{self.host}/v1"

    @property
    def root_url(self):
        """The server root, where Ollama's native API (/api/...) lives."""
        return f"{'https' if self.tls else 'http'}://{self.host}"


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


def until(test: unittest.TestCase, predicate: Callable[[], object]) -> None:
    """Wait (in short waits on an event, not sleeps) until predicate() holds, or fail `test`."""
    done = threading.Event()
    for _ in range(10_000):
        if predicate():
            return
        done.wait(0.001)
    test.fail("never happened")


def at_once(count: int, target: Callable[[int], object], timeout: float = 0) -> None:
    """Run target(0) ... target(count - 1) in `count` threads released together by a barrier,
    and wait for them all (each for `timeout`, WAIT by default)."""
    barrier = threading.Barrier(count)

    def run(index: int) -> None:
        barrier.wait()
        target(index)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout or WAIT)


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
        settings.setdefault("state_db", "off")
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

    def open_stream(self, path="/v1/chat/completions", scenario="", proxy=None, **fields):
        proxy = proxy or self.proxy
        conn = http.client.HTTPConnection("127.0.0.1", proxy.server_address[1], timeout=WAIT)
        self.addCleanup(conn.close)
        body = {"model": "fake-a", "stream": True, **fields}
        body.update({"messages": [{"role": "user", "content": "hi"}]}
                    if path.endswith("chat/completions") else {"prompt": "hi"})
        conn.request("POST", path, json.dumps(body),
                     {"Authorization": f"Bearer {CLIENT_KEY}", "X-Fake-Scenario": scenario})
        return conn, conn.getresponse()

    def hold_stream(self, key):
        """A stream that stays in flight (holding its upstream slot) until the fake upstream's
        `release` is set."""
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=WAIT)
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/chat/completions",
                     json.dumps({"model": "hold", "stream": True, "messages": []}),
                     {"Authorization": f"Bearer {key}", "X-Fake-Scenario": "gate"})
        resp = conn.getresponse()
        resp.readline()
        resp.conn = conn  # (for a test whose client hangs up: resp.conn.sock.shutdown)
        return resp

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


