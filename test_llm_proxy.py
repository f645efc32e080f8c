#!/usr/bin/env python3
"""Tests for llm_proxy: python3 test_llm_proxy.py

Everything runs against a fake OpenAI upstream started in a thread on an ephemeral port: real
sockets, real HTTP, real streaming. Time is driven by an injected clock, never by sleeping. When
the official `openai` package is importable, real-client tests drive the proxy with it too.
The run ends with a plain "N passed, N failed, N skipped" line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import unittest.mock
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import llm_proxy
from llm_proxy import (BucketPolicy, Config, ConfigError, MemoryBucketStore, ProxyError,
                       ProxyServer, estimate_cost, normalize_path)

try:
    import openai
except ImportError:  # the real-client tests are skipped
    openai = None
try:
    import redis as redis_py
except ImportError:  # the Redis store's tests are skipped
    redis_py = None
REDIS_SERVER = shutil.which("redis-server")
NO_REDIS = ("redis-server is not installed" if REDIS_SERVER is None else
            "the redis package is not installed" if redis_py is None else "")
try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:  # /metrics is then checked by this file's own reading of it
    text_string_to_metric_families = None

HERE = os.path.dirname(os.path.abspath(__file__))
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

class FakeUpstreamHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible server. The X-Fake-Scenario request header picks a behaviour:
    faults (hang, close, status-N, html-500, gate, gate2, stall, stall-body, reset, endless) and
    the usage
    habits of real servers (no-usage, ollama, llamacpp, reject-stream-options)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # small chunked writes must not wait for delayed ACKs

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._serve()

    do_POST = do_DELETE = do_GET

    def _serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        server = self.server
        server.record(self.command, self.path, dict(self.headers.items()), body)
        server.peers.append(self.client_address)
        scenario = self.headers.get("X-Fake-Scenario", "")
        if scenario == "hang":
            server.stop.wait(WAIT * 3)
            self.close_connection = True
            return
        if scenario == "close":
            self.close_connection = True
            return
        if scenario.startswith("status-"):
            status = int(scenario.split("-")[1])
            return self._json(status, {"error": {"message": f"upstream says {status}",
                                                 "type": "server_error", "param": None,
                                                 "code": None}},
                              [("Retry-After", "7")])
        if scenario == "early-hints":  # interim answers before the real one (RFC 8297)
            self.wfile.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                             b"HTTP/1.1 102 Processing\r\n\r\n")
        if scenario == "body-after-204":  # a 204 followed by bytes that look like an answer
            leak = json.dumps(completion("/v1/chat/completions", "leaked")).encode()
            self.wfile.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
                             b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(leak), leak))
            return
        if scenario == "html-500":
            return self._send(500, b"<html>oops</html>", [("Content-Type", "text/html")])
        if scenario == "stall-body":  # a head and part of the body, then nothing
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b'{"id": "chatcmpl-x", ')
            server.stop.wait(WAIT * 3)
            self.close_connection = True
            return
        if scenario == "garbage":
            return self._send(200, b'{"id": "chatcmpl-x", "choices": [', [
                ("Content-Type", "application/json")])
        if scenario == "hop":
            return self._send(200, b"{}", [("Content-Type", "application/json"),
                                          ("Connection", "X-Up-Private"), ("X-Up-Private", "1"),
                                          ("Keep-Alive", "timeout=5"), ("Upgrade", "h2c"),
                                          ("X-Kept", "yes")])
        path = self.path.partition("?")[0]
        request = json.loads(body) if body.startswith(b"{") else {}
        if scenario == "reject-stream-options" and "stream_options" in request:
            return self._json(400, {"error": {"message": "Unrecognized request argument "
                                              "supplied: stream_options", "type":
                                              "invalid_request_error", "param": None,
                                              "code": None}})
        if path == "/v1/models":
            return self._json(200, {"object": "list", "data": [
                {"id": "fake-a", "object": "model", "created": 1, "owned_by": "fake"},
                {"id": "fake-b", "object": "model", "created": 1, "owned_by": "fake"}]},
                [("X-RateLimit-Limit", "999")])
        if path == "/v1/embeddings":
            tokens = fake_prompt_tokens(request)
            usage = {"prompt_tokens": tokens, "total_tokens": tokens}
            server.report(tokens)
            return self._json(200, {"object": "list", "model": "fake-embed", "data": [
                {"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                **({} if scenario == "no-usage" else {"usage": usage})})
        if path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
            if request.get("stream"):
                return self._stream(path, request, scenario)
            answer = completion(path, request.get("model", ""), request)
            server.report(answer["usage"]["total_tokens"])
            if scenario == "no-usage":
                del answer["usage"]
            return self._json(200, answer,
                              [("X-RateLimit-Remaining", "12345"), ("X-Upstream", "yes")])
        return self._json(404, {"error": {"message": "not found", "type": "invalid_request_error",
                                          "param": None, "code": None}})

    def _json(self, status, value, headers=()):
        self._send(status, json.dumps(value).encode(),
                   [("Content-Type", "application/json"), *headers])

    def _send(self, status, body, headers):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, path, request, scenario):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = stream_events(path, request.get("model", ""), request, scenario)
        if any(b'"usage": {' in e for e in events):
            self.server.report(usage_of(path, request, completion_tokens=3)["total_tokens"])
        delay = float(self.headers.get("X-Fake-Delay", "0"))
        try:
            for index, event in enumerate(events):
                if index == 1 and scenario == "gate" or index == 2 and scenario == "gate2":
                    self.server.release.wait(WAIT)
                if index == 2 and scenario == "stall":
                    self.server.stop.wait(WAIT * 3)
                    return
                if index == 1 and scenario == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.rfile.close()  # the last reference: close() now sends a reset
                    self.connection.close()
                    self.close_connection = True
                    return
                self._chunk(event)
                if delay:
                    time.sleep(delay)
            if scenario == "endless":
                deadline = time.monotonic() + WAIT
                while time.monotonic() < deadline:
                    self._chunk(events[1])
                    time.sleep(0.02)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.server.disconnected.set()
            self.close_connection = True

    def _chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


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

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


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


# ########################################################################### units ####

class ConfigTests(unittest.TestCase):
    def test_defaults(self):
        config = Config.from_env({}, [])
        self.assertEqual(config, Config())
        self.assertEqual((config.host, config.port), ("0.0.0.0", 8899))
        self.assertEqual(config.base_api_url, "http://127.0.0.1:11434/v1")

    def test_environment_aliases_and_flags(self):
        env = {"UPSTREAM_BASE_URL": "https://llm.example:8443/v1/", "UPSTREAM_API_KEY": "k",
               "UPSTREAM_MODEL": "m", "MAX_TOKENS": "50", "PROXY_API_KEYS": " a, b ,,",
               "LIMIT_RESPONSE": "429", "TRUST_FORWARDED_FOR": "1", "READ_TIMEOUT": "2.5"}
        config = Config.from_env(env, ["--max-tokens", "60", "--token-cost-mode", "estimate"])
        self.assertEqual(config.base_api_url, "https://llm.example:8443/v1")
        self.assertEqual((config.base_api_key, config.base_model), ("k", "m"))
        self.assertEqual(config.max_tokens, 60)  # the flag wins over the environment
        self.assertEqual(config.proxy_api_keys, ("a", "b"))
        self.assertEqual(config.limit_response, "429")
        self.assertEqual(config.token_cost_mode, "estimate")
        self.assertTrue(config.trust_forwarded_for)
        self.assertEqual(config.read_timeout, 2.5)
        # the primary name wins over its alias
        self.assertEqual(Config.from_env({"BASE_API_URL": "http://a/v1",
                                          "UPSTREAM_BASE_URL": "http://b/v1"}, []).base_api_url,
                         "http://a/v1")

    def test_invalid_values_name_the_variable(self):
        cases = {
            "MAX_TOKENS": "ten", "REFILL_TOKENS": "0", "REFILL_INTERVAL_SECONDS": "-5",
            "REQUEST_TOKEN_COST": "1.5", "TOKEN_COST_MODE": "tokens", "LIMIT_RESPONSE": "418",
            "BASE_API_URL": "ftp://host/v1", "PORT": "70000", "OPEN_TIMEOUT": "nan",
            "MAX_BODY_BYTES": "0", "TRUST_FORWARDED_FOR": "maybe", "RESPONSE_TOKEN_RESERVE": "-1",
            "BASE_API_KEY": "sk-abc\r\nX-Injected: 1",
        }
        for name, value in cases.items():
            with self.subTest(name=name):
                with self.assertRaises(ConfigError) as caught:
                    Config.from_env({name: value}, [])
                self.assertIn(name, str(caught.exception))

    def test_bad_config_exits_2_with_one_line(self):
        for env, argv in (({"MAX_TOKENS": "x"}, []), ({}, ["--no-such-flag"]),
                          ({"BASE_API_URL": "localhost:11434"}, [])):
            with self.subTest(env=env, argv=argv):
                proc = subprocess.run([sys.executable, os.path.join(HERE, "llm_proxy.py"), *argv],
                                      env={**os.environ, **env}, capture_output=True, text=True,
                                      timeout=WAIT)
                self.assertEqual(proc.returncode, 2)
                self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
                self.assertNotIn("Traceback", proc.stderr)

    def test_help_lists_every_setting_with_its_default(self):
        text = llm_proxy.build_arg_parser().format_help()
        for setting in llm_proxy.SETTINGS:
            self.assertIn(setting.flag, text)
            self.assertIn(setting.env, text)
        self.assertIn("default 8899", text)

    def test_estimate_mode_warns_when_bucket_is_below_reserve(self):
        self.assertEqual(Config().warnings(), [])
        warnings = Config(token_cost_mode="estimate", max_tokens=10).warnings()
        self.assertEqual(len(warnings), 1)
        self.assertIn("RESPONSE_TOKEN_RESERVE", warnings[0])


class BucketContract:
    """What every bucket store must do, run against the in-memory store and against Redis.
    Subclasses provide self.store, self.advance(seconds) and self.held() (buckets stored)."""

    policy = BucketPolicy(capacity=10, refill_tokens=2, refill_interval=300)

    def assertSeconds(self, actual, expected):
        self.assertAlmostEqual(actual, expected, delta=0.05)  # Redis' clock moves meanwhile

    def test_starts_full_and_refuses_when_empty(self):
        for expected in range(9, -1, -1):
            quota = self.store.take("k", 1, self.policy)
            self.assertTrue(quota.admitted)
            self.assertEqual(quota.remaining, expected)
        quota = self.store.take("k", 1, self.policy)
        self.assertFalse(quota.admitted)
        self.assertEqual(quota.remaining, 0)
        self.assertSeconds(quota.wait_seconds, 300)

    def test_discrete_refills_on_the_bucket_grid(self):
        self.store.take("k", 10, self.policy)
        self.advance(299)
        self.assertFalse(self.store.take("k", 1, self.policy).admitted)
        self.advance(1.01)  # first refill: +2
        self.assertEqual(self.store.peek("k", self.policy).remaining, 2)
        self.advance(450)  # 750 s in: a second refill at 600, the next at 900
        quota = self.store.peek("k", self.policy)
        self.assertEqual(quota.remaining, 4)
        self.assertSeconds(quota.reset_seconds, 150 - 0.01)
        self.advance(10_000)
        self.assertEqual(self.store.peek("k", self.policy).remaining, 10)

    def test_wait_counts_the_refills_a_cost_needs(self):
        self.store.take("k", 10, self.policy)
        self.advance(100)
        quota = self.store.take("k", 5, self.policy)  # needs 3 refills: at 300, 600, 900
        self.assertFalse(quota.admitted)
        self.assertSeconds(quota.wait_seconds, 800)

    def test_cost_above_capacity_waits_forever(self):
        self.assertEqual(self.store.take("k", 11, self.policy).wait_seconds, float("inf"))

    def test_full_buckets_are_forgotten(self):
        self.store.take("a", 1, self.policy)
        self.assertEqual(self.held(), 1)
        self.store.refund("a", 1, self.policy)
        self.assertEqual(self.held(), 0)
        self.store.take("b", 5, self.policy)
        self.store.peek("unseen", self.policy)
        self.assertEqual(self.held(), 1)  # peek creates nothing
        self.advance(600.01)
        self.assertEqual(self.store.peek("b", self.policy).remaining, 9)
        self.advance(300)
        self.assertEqual(self.store.peek("b", self.policy).remaining, 10)
        self.assertEqual(self.held(), 0)

    def test_a_full_bucket_behaves_like_a_new_one(self):
        self.store.take("old", 1, self.policy)
        self.advance(1000)  # refilled long ago; the grid restarts at the next spend
        self.store.take("old", 2, self.policy)
        self.store.take("new", 2, self.policy)
        self.advance(299)
        old, new = self.store.peek("old", self.policy), self.store.peek("new", self.policy)
        self.assertEqual((old.remaining, old.limit), (new.remaining, new.limit))
        self.assertSeconds(old.reset_seconds, new.reset_seconds)

    def test_debt_is_paid_by_refills_first_and_counted_in_the_wait(self):
        self.store.take("k", 4, self.policy)                 # 6 left, the grid starts now
        quota = self.store.settle("k", 9, self.policy)       # it really cost 13: 3 in debt
        self.assertEqual(quota.remaining, -3)
        quota = self.store.take("k", 1, self.policy)
        self.assertFalse(quota.admitted)
        self.assertSeconds(quota.wait_seconds, 600)          # +2 at 300 (-1), +2 at 600 (1)
        self.advance(300.01)
        self.assertEqual(self.store.peek("k", self.policy).remaining, -1)
        self.advance(300)
        self.assertTrue(self.store.take("k", 1, self.policy).admitted)
        self.assertEqual(self.store.settle("k", -100, self.policy).remaining, 10)  # never above

    def test_refund_never_exceeds_capacity(self):
        self.store.take("k", 1, self.policy)
        self.assertEqual(self.store.refund("k", 5, self.policy).remaining, 10)

    def test_usage_counters(self):
        self.store.record("a", requests=2, limited=1, prompt=10, completion=5)
        self.store.record("a", requests=1, charged=7)
        self.assertEqual(self.store.usage("a"), {"requests": 3, "limited_requests": 1,
                                                 "prompt_tokens": 10, "completion_tokens": 5,
                                                 "tokens_charged": 7})
        self.assertEqual(self.store.usage("b")["requests"], 0)

    def test_concurrent_takes_admit_exactly_the_balance(self):
        admitted = []
        barrier = threading.Barrier(40)

        def worker():
            barrier.wait()
            admitted.append(self.store.take("k", 1, self.policy).admitted)
        threads = [threading.Thread(target=worker) for _ in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        self.assertEqual(admitted.count(True), 10)


class BucketTests(BucketContract, unittest.TestCase):
    """The in-memory store: the contract, plus what only it has (a sweep, bounded counters)."""

    def setUp(self):
        self.clock = FakeClock()
        self.store = MemoryBucketStore(self.clock)

    def advance(self, seconds):
        self.clock.advance(seconds)

    def held(self):
        return len(self.store)

    def test_sweep_bounds_memory_under_a_flood_of_keys(self):
        for i in range(5000):
            self.store.take(f"random-{i}", 1, self.policy)
        self.assertEqual(len(self.store), 5000)
        self.clock.advance(300)   # every one of them has refilled to full
        self.store.take("fresh", 1, self.policy)
        self.assertEqual(len(self.store), 1)

    def test_usage_counters_are_bounded(self):
        self.store.record("a", requests=2)
        for i in range(llm_proxy.MAX_TRACKED_KEYS):
            self.store.record(f"k{i}", requests=1)
        self.assertEqual(self.store.usage("a")["requests"], 0)  # the least recently used went


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


@unittest.skipIf(NO_REDIS, NO_REDIS)
class RedisBucketTests(WithRedis, BucketContract, unittest.TestCase):
    """The same contract against the Redis store (time is Redis's own: advance() moves every
    bucket's grid back instead)."""

    def setUp(self):
        self.client = self.redis.client()
        self.addCleanup(self.client.close)
        self.client.flushall()
        self.log = LogCapture()
        config = Config(redis_url=self.redis.url)
        self.store = llm_proxy.RedisBucketStore(config, self.log.write, llm_proxy.Metrics())

    def advance(self, seconds):
        for name in self.client.scan_iter("llm_proxy:b:*"):
            self.client.hincrbyfloat(name, "a", -seconds)

    def held(self):
        return len(list(self.client.scan_iter("llm_proxy:b:*")))

    def test_keys_are_digests_and_expire_when_full_again(self):
        self.store.take("key:sk-secret-client-key", 3, self.policy)
        names = sorted(n.decode() for n in self.client.scan_iter("*"))
        digest = llm_proxy.key_digest("key:sk-secret-client-key")
        self.assertEqual(names, [f"llm_proxy:b:{{{digest}}}", f"llm_proxy:u:{{{digest}}}"])
        # 7 of 10: two refills (600 s) bring it back to full, and then it is not needed
        self.assertAlmostEqual(self.client.pttl(names[0]) / 1000, 600, delta=1)
        self.assertEqual(self.client.hget(names[1], "tokens_charged"), b"3")
        self.assertNotIn(b"sk-secret", b" ".join(self.client.keys("*")))

    def test_time_comes_from_the_redis_server(self):
        skewed = llm_proxy.RedisBucketStore(Config(redis_url=self.redis.url), self.log.write,
                                            llm_proxy.Metrics(), clock=FakeClock(now=-1e9))
        skewed.take("k", 10, self.policy)            # an instance whose clock is far off
        quota = self.store.take("k", 1, self.policy)  # and one whose clock is right
        self.assertFalse(quota.admitted)
        self.assertSeconds(quota.wait_seconds, 300)  # both measured on the server's clock

    def test_script_reloaded_after_script_flush(self):
        self.store.take("k", 1, self.policy)
        self.client.script_flush()  # NOSCRIPT on the next call: loaded again
        self.assertEqual(self.store.take("k", 1, self.policy).remaining, 8)


@unittest.skipIf(NO_REDIS, NO_REDIS)
class RedisProxyTests(WithRedis, ProxyTestCase):
    """Several proxy instances sharing one Redis, and Redis going away."""

    def setUp(self):
        super().setUp()
        client = self.redis.client()
        client.flushall()
        client.close()

    def instance(self, **settings):
        settings.setdefault("redis_url", self.redis.url)
        return self.start_proxy(**settings)

    def test_three_instances_admit_exactly_the_shared_balance(self):
        proxies = [self.instance(max_tokens=100) for _ in range(3)]
        results = []
        barrier = threading.Barrier(60)

        def worker(index):
            barrier.wait()
            for _ in range(5):
                results.append(self.chat(proxy=proxies[index % 3])[2])
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(60)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT * 3)
        self.assertEqual(len(results), 300)
        self.assertEqual(len(self.upstream.requests), 100)
        self.assertEqual(sum(b"limit reached" in r for r in results), 200)

    def test_usage_is_settled_across_instances(self):
        first, second = (self.instance(token_cost_mode="usage", max_tokens=1000)
                         for _ in range(2))
        self.chat(proxy=first)
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") == 1))
        status, _, body = self.request("GET", "/health", proxy=second)
        health = json.loads(body)
        self.assertEqual(health["quota"]["remaining"], 1000 - self.upstream.reported[0])
        self.assertEqual(health["usage"]["requests"], 1)
        self.assertEqual(health["store"], {"backend": "redis", "reachable": True,
                                           "failure_mode": "local"})

    def test_outage_in_local_mode_keeps_serving_and_recovers(self):
        proxy = self.instance()
        self.assertEqual(self.chat(proxy=proxy)[1]["x-ratelimit-remaining"], "9")
        self.redis.stop()
        try:
            for expected in ("9", "8"):  # this instance's own bucket, starting full
                self.assertEqual(self.chat(proxy=proxy)[1]["x-ratelimit-remaining"], expected)
            health = json.loads(self.request("GET", "/health", proxy=proxy)[2])
            self.assertFalse(health["store"]["reachable"])
        finally:
            self.redis.start()
        self.assertEqual(self.log.getvalue().count("Redis is unreachable"), 1)  # once an outage
        # the local bucket goes on 7, 6, ... and never shows 8 again; the restarted Redis (no
        # persistence) starts from a full bucket, 9 then 8: an 8 means Redis is in use again
        self.assertTrue(wait_until(
            lambda: self.chat(proxy=proxy)[1]["x-ratelimit-remaining"] == "8", timeout=3 * WAIT))
        self.assertIn("reachable again", self.log.getvalue())
        self.assertIn("llm_proxy_store_outages_total 1",
                      self.request("GET", "/metrics", proxy=proxy)[2].decode())
        # no thread was started for the outage: probes ride on requests, one at a time
        self.assertEqual([t.name for t in threading.enumerate() if "redis" in t.name.lower()], [])

    def test_outage_in_closed_mode_answers_503_and_recovers(self):
        proxy = self.instance(redis_failure_mode="closed")
        self.assertEqual(self.chat(proxy=proxy)[0], 200)
        self.redis.stop()
        try:
            status, headers, body = self.chat(proxy=proxy)
            self.assert_openai_error(status, body, 503, "store_unavailable")
            self.assertIn("retry-after", headers)
        finally:
            self.redis.start()
        self.assertTrue(wait_until(lambda: self.chat(proxy=proxy)[0] == 200, timeout=3 * WAIT))
        self.assertEqual(len(self.upstream.requests), 2)

    def test_start_up_with_redis_down(self):
        port = free_port()
        for mode, expected in (("local", 200), ("closed", 503)):
            with self.subTest(mode=mode):
                proxy = self.instance(redis_url=f"redis://:s3cret@127.0.0.1:{port}/0",
                                      redis_failure_mode=mode)
                self.assertEqual(self.chat(proxy=proxy)[0], expected)
                status, _, body = self.request("GET", "/health", proxy=proxy)
                self.assertEqual(status, 200)
                health = json.loads(body)
                self.assertEqual(health["ok"], mode == "local")
                self.assertFalse(health["store"]["reachable"])
                self.assertNotIn(b"s3cret", body)
        self.assertNotIn("s3cret", self.log.getvalue())

    def test_a_slow_redis_never_holds_a_request_past_its_timeout(self):
        stub = socket.socket()
        stub.bind(("127.0.0.1", 0))
        stub.listen(16)  # accepts connections, never answers
        self.addCleanup(stub.close)
        proxy = self.instance(redis_url=f"redis://127.0.0.1:{stub.getsockname()[1]}/0",
                              redis_timeout=0.5)
        started = time.monotonic()
        for _ in range(3):
            self.assertEqual(self.chat(proxy=proxy)[0], 200)
        # one request waited for the timeout; the others went straight to the local buckets
        self.assertLess(time.monotonic() - started, 0.5 + 2)

    def test_missing_redis_package_stops_start_up_with_one_line(self):
        fake = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, fake)
        os.mkdir(os.path.join(fake, "redis"))
        with open(os.path.join(fake, "redis", "__init__.py"), "w") as f:
            f.write("raise ImportError('no redis here')\n")
        proc = subprocess.run([sys.executable, os.path.join(HERE, "llm_proxy.py")],
                              env={**os.environ, "PYTHONPATH": fake, "REDIS_URL": self.redis.url,
                                   "PORT": "0"}, capture_output=True, text=True, timeout=WAIT)
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(proc.stderr.strip(), "llm_proxy: REDIS_URL needs the redis package: "
                                              "pip install 'llm-proxy[redis]'")


class CostTests(unittest.TestCase):
    def test_estimate_formula(self):
        body = {"model": "a-very-long-model-name-that-is-not-counted",
                "messages": [{"role": "user", "content": "12345678"}]}
        # strings: "user", "12345678" -> "user 12345678" = 13 chars -> ceil(13/4) = 4
        self.assertEqual(estimate_cost(body, 256), 4 + 256)

    def test_reserve_precedence(self):
        base = {"prompt": "abcd"}  # 1 token
        cases = [
            ({"max_completion_tokens": 10, "max_tokens": 20}, 11),
            ({"max_tokens": 20}, 21),
            ({"max_completion_tokens": -1, "max_tokens": 20}, 21),
            ({"max_completion_tokens": 2.5}, 1 + 256),
            ({"max_tokens": True}, 1 + 256),
            ({"max_tokens": "16"}, 1 + 256 + 1),  # a string is counted as text, not as R
            ({"max_tokens": 0}, 1),
            ({}, 1 + 256),
        ]
        for extra, expected in cases:
            with self.subTest(extra=extra):
                self.assertEqual(estimate_cost({**base, **extra}, 256), expected)

    def test_at_least_one(self):
        self.assertEqual(estimate_cost({}, 0), 1)

    def test_nested_model_keys_are_skipped_and_deep_nesting_is_safe(self):
        body = {"a": {"model": "xxxxxxxxxxxxxxxxxxxx", "b": ["abcd", {"c": "efgh"}]}}
        self.assertEqual(estimate_cost(body, 0), 3)  # "abcd efgh": 9 chars
        deep: object = "abcd"
        for _ in range(100_000):
            deep = [deep]
        self.assertEqual(estimate_cost({"x": deep}, 0), 1)

    def test_request_mode(self):
        self.assertEqual(llm_proxy.request_cost({"prompt": "x" * 1000},
                                                Config(request_token_cost=3).default_policy), 3)


class PathTests(unittest.TestCase):
    def test_spellings_normalise_to_one_route(self):
        for target in ["/v1/chat/completions", "/v1/chat/completions/", "//v1//chat/completions",
                       "/v1/chat/%63ompletions", "/v1/./chat/completions",
                       "/v1/models/../chat/completions", "/v1/chat/completions?x=1",
                       "/v1/chat/completions%2F", "/v1/chat/completions#frag",
                       "http://proxy:8899/v1/chat/completions", "/../v1/chat/completions"]:
            with self.subTest(target=target):
                self.assertEqual(normalize_path(target)[0], "/v1/chat/completions")

    def test_query_is_kept(self):
        self.assertEqual(normalize_path("/v1/models?limit=2"), ("/v1/models", "limit=2"))

    def test_invalid_targets(self):
        for target in ["*", "v1/models", "/v1/%ff", "/v1/a%00b", "/v1\\chat", "/v1/%5cchat",
                       "/v1/models?a=\x7f", "/v1/models?a=\x01", "/v1/a%7fb"]:
            with self.subTest(target=target):
                with self.assertRaises(ProxyError) as caught:
                    normalize_path(target)
                self.assertEqual(caught.exception.status, HTTPStatus.BAD_REQUEST)

    def test_upstream_path_replaces_v1_with_the_base_path(self):
        upstream = llm_proxy.Upstream.from_url("http://h:1/openai/v1")
        self.assertEqual(upstream.path_for("/v1/chat/completions", "a=1"),
                         "/openai/v1/chat/completions?a=1")
        self.assertEqual(upstream.path_for("/v1/files/a b", ""), "/openai/v1/files/a%20b")


class LimitTextTests(unittest.TestCase):
    def test_wait_text(self):
        for seconds, text in [(0.2, "1 s"), (59, "59 s"), (59.5, "1 min"), (60, "1 min"),
                              (61, "2 min"), (300, "5 min"), (299.1, "5 min")]:
            with self.subTest(seconds=seconds):
                self.assertEqual(llm_proxy.wait_text(seconds), text)

    def test_retry_headers(self):
        self.assertEqual(dict(llm_proxy.retry_headers(9.2)),
                         {"Retry-After": "10", "retry-after-ms": "9200"})
        self.assertEqual(dict(llm_proxy.retry_headers(300))["x-should-retry"], "false")


class KeyRingTests(unittest.TestCase):
    def test_accepts_only_listed_keys(self):
        ring = llm_proxy.load_key_ring(Config(proxy_api_keys=("alpha", "beta")))
        self.assertIsNotNone(ring.lookup("alpha"))
        self.assertIsNotNone(ring.lookup("beta"))
        for wrong in ["", "alph", "alphaa", "ALPHA", "gamma"]:
            self.assertIsNone(ring.lookup(wrong))
        self.assertFalse(llm_proxy.load_key_ring(Config()))


# ############################################################## proxy behaviour ####

class ForwardingTests(ProxyTestCase):
    def test_chat_is_forwarded_and_charged(self):
        status, headers, body = self.chat()
        self.assertEqual(status, 200)
        sent = json.loads(self.upstream.requests[0][3])
        self.assertEqual(json.loads(body), completion("/v1/chat/completions", "fake-a", sent))
        self.assertEqual(headers["x-ratelimit-limit"], "10")
        self.assertEqual(headers["x-ratelimit-remaining"], "9")  # the proxy's, not the upstream's
        self.assertEqual(headers["x-ratelimit-reset"], "300")
        self.assertEqual(headers["x-ratelimit-refill-tokens"], "2")
        self.assertEqual(headers["x-ratelimit-refill-seconds"], "300")
        self.assertEqual(headers["x-ratelimit-reset-seconds"], "0")
        self.assertEqual(headers["x-upstream"], "yes")
        self.assertEqual(headers["access-control-allow-origin"], "*")
        self.assertNotIn("retry-after", headers)
        self.assertEqual(self.upstream.paths(), ["/v1/chat/completions"])

    def test_body_is_forwarded_byte_for_byte(self):
        raw = b'{"model": "fake-a",  "messages": [{"role":"user","content":"\\u00e9"}]}'
        self.request("POST", "/v1/chat/completions", raw)
        self.assertEqual(self.upstream.requests[0][3], raw)

    def test_completions_route_is_charged(self):
        status, headers, body = self.request("POST", "/v1/completions",
                                             {"model": "fake-a", "prompt": "hi"})
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["object"], "text_completion")
        self.assertEqual(headers["x-ratelimit-remaining"], "9")

    def test_other_v1_routes_are_forwarded_uncharged(self):
        status, headers, body = self.request("POST", "/v1/embeddings",
                                             {"model": "e", "input": "hello"})
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["data"][0]["embedding"], [0.1, 0.2, 0.3])
        self.assertNotIn("x-ratelimit-remaining", headers)
        status, headers, body = self.request("GET", "/v1/models")
        self.assertEqual([m["id"] for m in json.loads(body)["data"]], ["fake-a", "fake-b"])
        self.assertEqual(headers["x-ratelimit-limit"], "999")  # the upstream's own, untouched
        self.assertEqual(self.remaining(), 10)

    def test_upstream_key_replaces_the_client_key(self):
        self.restart(base_api_key=UPSTREAM_KEY)
        self.chat(headers={"X-Custom": "kept", "Connection": "X-Drop", "X-Drop": "1",
                           "Proxy-Authorization": "Basic eA=="})
        headers = {k.lower(): v for k, v in self.upstream.requests[0][2].items()}
        self.assertEqual(headers["authorization"], f"Bearer {UPSTREAM_KEY}")
        self.assertEqual(headers["x-custom"], "kept")
        self.assertEqual(headers["host"], f"127.0.0.1:{self.upstream.server_address[1]}")
        self.assertEqual(headers["x-forwarded-for"], "127.0.0.1")
        for dropped in ("x-drop", "proxy-authorization"):
            self.assertNotIn(dropped, headers)
        self.assertNotIn(CLIENT_KEY, json.dumps(self.upstream.requests[0][2]))

    def test_client_key_is_not_forwarded_without_an_upstream_key(self):
        self.chat()
        self.assertNotIn("authorization", {k.lower() for k in self.upstream.requests[0][2]})

    def test_base_model_rewrites_model_and_answers_models(self):
        self.restart(base_model="served-model")
        status, _, body = self.chat(model="whatever")
        self.assertEqual(json.loads(self.upstream.requests[0][3])["model"], "served-model")
        status, _, body = self.request("GET", "/v1/models")
        self.assertEqual(status, 200)
        self.assertEqual([m["id"] for m in json.loads(body)["data"]], ["served-model"])
        self.assertEqual(len(self.upstream.requests), 1)  # answered by the proxy
        self.request("POST", "/v1/embeddings", {"model": "keep-me", "input": "x"})
        self.assertEqual(json.loads(self.upstream.requests[-1][3])["model"], "keep-me")

    def test_keep_alive_on_both_sides(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=WAIT)
        self.addCleanup(conn.close)
        body = json.dumps({"model": "m", "messages": []})
        for _ in range(3):
            conn.request("POST", "/v1/chat/completions", body,
                         {"Authorization": f"Bearer {CLIENT_KEY}"})
            resp = conn.getresponse()
            self.assertEqual(resp.status, 200)
            resp.read()
        for stream in (False, True):
            conn.request("POST", "/v1/chat/completions",
                         json.dumps({"model": "m", "messages": [], "stream": stream}))
            resp = conn.getresponse()
            resp.read()
        self.assertEqual(len(self.upstream.requests), 5)
        self.assertEqual(len(set(self.upstream.peers)), 1)  # one upstream connection, reused

    def test_interim_answers_are_skipped_and_never_reach_another_client(self):
        for name in ("alice", "bob", "carol"):
            status, _, body = self.chat(model=name, headers={"X-Fake-Scenario": "early-hints"})
            self.assertEqual((status, json.loads(body)["model"]), (200, name))
        self.assertEqual(len(set(self.upstream.peers)), 1)  # the connection stayed usable

    def test_bytes_after_a_bodiless_answer_never_reach_the_next_client(self):
        status, _, body = self.chat(model="alice", headers={"X-Fake-Scenario": "body-after-204"})
        self.assertEqual((status, body), (204, b""))
        for name in ("bob", "carol"):
            status, _, body = self.chat(model=name)
            self.assertEqual((status, json.loads(body)["model"]), (200, name))

    def test_http_1_0_client_gets_the_stream_until_close(self):
        body = json.dumps({"model": "m", "messages": [], "stream": True}).encode()
        answer = self.raw(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s"
                          % (len(body), body))
        head, _, rest = answer.partition(b"\r\n\r\n")
        self.assertIn(b" 200 ", head.split(b"\r\n")[0])
        self.assertNotIn(b"chunked", head.lower())
        self.assertTrue(rest.endswith(b"data: [DONE]\n\n"))

    def test_chunked_request_body_is_accepted(self):
        body = json.dumps({"model": "m", "messages": []}).encode()
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                   b"\r\nConnection: close\r\n\r\n%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
                   % (10, body[:10], len(body) - 10, body[10:]))
        answer = self.raw(request)
        self.assertIn(b" 200 ", answer.split(b"\r\n")[0])
        self.assertEqual(self.upstream.requests[0][3], body)


class TlsUpstreamTests(ProxyTestCase):
    """An https upstream: certificate checked, keep-alive, streaming and timeouts over TLS.
    The proxy trusts the test certificate the way an operator would have it trust a private
    CA: SSL_CERT_FILE."""

    def setUp(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        self.cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        for path, text in ((self.cert, TLS_CERT), (key, TLS_KEY)):
            with open(path, "w") as f:
                f.write(text)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key)
        self.upstream = FakeUpstream()
        self.upstream.socket = context.wrap_socket(self.upstream.socket, server_side=True)
        self._serve(self.upstream)
        self.addCleanup(self.upstream.stop.set)
        self.clock = FakeClock()
        self.log = LogCapture()
        self.proxy = self.start_proxy()

    def start_proxy(self, trusted=True, **settings):
        settings.setdefault("base_api_url", f"https://localhost:{self.upstream.server_address[1]}/v1")
        with unittest.mock.patch.dict(os.environ, {"SSL_CERT_FILE": self.cert} if trusted else {}):
            return super().start_proxy(**settings)

    def test_chat_and_stream_over_one_kept_alive_connection(self):
        status, headers, body = self.chat()
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["object"], "chat.completion")
        self.assertEqual(headers["x-ratelimit-remaining"], "9")
        status, _, body = self.chat(stream=True)
        self.assertEqual(status, 200)
        self.assertEqual(sse_events(body)[-1], b"[DONE]")
        self.assertEqual(self.upstream.requests[0][2]["Host"],
                         f"localhost:{self.upstream.server_address[1]}")
        self.assertEqual(len({port for _, port in self.upstream.peers}), 1)  # one connection

    def test_an_untrusted_certificate_is_refused(self):
        self.restart(trusted=False)
        status, _, body = self.chat()
        self.assert_openai_error(status, body, 502, "upstream_unreachable")
        self.assertEqual(self.remaining(), 10)

    def test_timeouts_over_tls(self):
        self.restart(read_timeout=0.5)
        status, _, body = self.chat(headers={"X-Fake-Scenario": "hang"})
        self.assert_openai_error(status, body, 504, "upstream_timeout")
        with self.assertRaises(http.client.IncompleteRead):
            self.chat(headers={"X-Fake-Scenario": "stall-body"})
        self.assertTrue(self.log.wait_for(lambda text: "upstream broke off: timeout" in text))
        self.assertEqual(self.chat()[0], 200)


class StreamingTests(ProxyTestCase):
    def open_stream(self, path="/v1/chat/completions", scenario="", **fields):
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=WAIT)
        self.addCleanup(conn.close)
        body = {"model": "fake-a", "stream": True, **fields}
        body.update({"messages": [{"role": "user", "content": "hi"}]}
                    if path.endswith("chat/completions") else {"prompt": "hi"})
        conn.request("POST", path, json.dumps(body),
                     {"Authorization": f"Bearer {CLIENT_KEY}", "X-Fake-Scenario": scenario})
        return conn, conn.getresponse()

    def test_events_pass_through_unchanged(self):
        for path in ("/v1/chat/completions", "/v1/completions"):
            with self.subTest(path=path):
                _, resp = self.open_stream(path)
                self.assertEqual(resp.status, 200)
                self.assertEqual(resp.getheader("Transfer-Encoding"), "chunked")
                self.assertEqual(resp.getheader("Content-Type"), "text/event-stream")
                self.assertIsNotNone(resp.getheader("X-RateLimit-Remaining"))
                self.assertEqual(resp.read(), b"".join(stream_events(path, "fake-a")))

    def test_first_event_arrives_before_the_upstream_finishes(self):
        _, resp = self.open_stream(scenario="gate")
        first = resp.readline()  # the upstream holds the rest until `release` is set
        self.assertTrue(first.startswith(b"data: "), first)
        self.assertIn(b'"role": "assistant"', first)
        self.assertFalse(self.upstream.release.is_set())
        self.upstream.release.set()
        rest = resp.read()
        self.assertTrue(rest.endswith(b"data: [DONE]\n\n"))

    def test_client_disconnect_closes_the_upstream(self):
        conn, resp = self.open_stream(scenario="endless")
        self.assertTrue(resp.readline().startswith(b"data: "))
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        self.assertTrue(self.upstream.disconnected.wait(WAIT))
        # the handler ended and logged the request; the proxy keeps serving
        self.assertTrue(self.log.wait_for(lambda text: "client closed" in text))
        self.assertEqual(self.chat()[0], 200)

    def test_upstream_stall_mid_stream_ends_with_an_error_event(self):
        self.restart(read_timeout=0.5)
        conn, resp = self.open_stream(scenario="stall")
        body = resp.read()  # a properly terminated chunked body
        events = sse_events(body)
        self.assertIn(b'"role": "assistant"', events[0])
        error = json.loads(events[-1])["error"]
        self.assertEqual(error["type"], "server_error")
        self.assertEqual(conn.sock.recv(1), b"")  # and the connection is closed
        self.assertTrue(self.log.wait_for(lambda text: "upstream broke off" in text))
        self.assertEqual(self.chat()[0], 200)

    def test_upstream_stall_mid_body_closes_the_connection(self):
        """A plain body that stops arriving: READ_TIMEOUT ends it (the head is out, so the
        client sees a short body and a closed connection), and the log says it timed out."""
        self.restart(read_timeout=0.5)
        with self.assertRaises(http.client.IncompleteRead) as caught:
            self.chat(headers={"X-Fake-Scenario": "stall-body"})
        self.assertEqual(caught.exception.partial, b'{"id": "chatcmpl-x", ')
        self.assertTrue(self.log.wait_for(lambda text: "upstream broke off: timeout" in text))
        self.assertEqual(self.chat()[0], 200)

    def test_upstream_reset_mid_stream_ends_with_an_error_event(self):
        _, resp = self.open_stream(scenario="reset")
        events = sse_events(resp.read())
        self.assertIn("error", json.loads(events[-1]))


class LimitTests(ProxyTestCase):
    def drain(self, key=CLIENT_KEY):
        for _ in range(10):
            self.assertEqual(self.chat(key=key)[0], 200)

    def test_message_answer_non_stream_chat(self):
        self.drain()
        status, headers, body = self.chat(model="my-model")
        self.assertEqual(status, 200)
        answer = json.loads(body)
        self.assertEqual(answer["object"], "chat.completion")
        self.assertEqual(answer["model"], "my-model")
        self.assertEqual(answer["choices"][0]["message"],
                         {"role": "assistant", "content": "limit reached, wait 5 min"})
        self.assertEqual(answer["choices"][0]["finish_reason"], "stop")
        self.assertEqual(answer["usage"], {"prompt_tokens": 0, "completion_tokens": 0,
                                           "total_tokens": 0})
        self.assertEqual(headers["retry-after"], "300")
        self.assertEqual(headers["x-ratelimit-remaining"], "0")
        self.assertEqual(headers["x-ratelimit-reset-seconds"], "300")
        self.assertEqual(len(self.upstream.requests), 10)

    def test_message_answer_non_stream_completion(self):
        self.drain()
        self.clock.advance(250)
        status, _, body = self.request("POST", "/v1/completions", {"model": "m", "prompt": "x"})
        answer = json.loads(body)
        self.assertEqual(answer["object"], "text_completion")
        self.assertEqual(answer["choices"][0]["text"], "limit reached, wait 50 s")

    def test_message_answer_stream_chat(self):
        self.drain()
        for include_usage in (False, True):
            with self.subTest(include_usage=include_usage):
                extra = {"stream_options": {"include_usage": True}} if include_usage else {}
                status, headers, body = self.chat(stream=True, **extra)
                self.assertEqual(status, 200)
                self.assertTrue(headers["content-type"].startswith("text/event-stream"))
                events = sse_events(body)
                self.assertEqual(events[-1], b"[DONE]")
                chunks = [json.loads(e) for e in events[:-1]]
                self.assertTrue(all(c["object"] == "chat.completion.chunk" for c in chunks))
                self.assertEqual(len({c["id"] for c in chunks}), 1)
                self.assertEqual(chunks[0]["choices"][0]["delta"]["role"], "assistant")
                self.assertEqual(chunks[1]["choices"][0]["delta"]["content"],
                                 "limit reached, wait 5 min")
                self.assertEqual(chunks[2]["choices"][0]["finish_reason"], "stop")
                if include_usage:
                    self.assertEqual(len(chunks), 4)
                    self.assertEqual(chunks[3]["choices"], [])
                    self.assertEqual(chunks[3]["usage"]["total_tokens"], 0)
                    self.assertTrue(all(c["usage"] is None for c in chunks[:3]))
                else:
                    self.assertEqual(len(chunks), 3)
                    self.assertTrue(all("usage" not in c for c in chunks))

    def test_message_answer_stream_completion(self):
        self.drain()
        status, _, body = self.request("POST", "/v1/completions",
                                       {"model": "m", "prompt": "x", "stream": True})
        chunks = [json.loads(e) for e in sse_events(body)[:-1]]
        self.assertTrue(all(c["object"] == "text_completion" for c in chunks))
        self.assertEqual(chunks[0]["choices"][0]["text"], "limit reached, wait 5 min")
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop")

    def test_429_mode(self):
        self.restart(limit_response="429")
        self.drain()
        status, headers, body = self.chat()
        error = self.assert_openai_error(status, body, 429, "rate_limit_exceeded")
        self.assertEqual(error["type"], "requests")
        self.assertIn("300s", error["message"])
        self.assertEqual(headers["retry-after"], "300")
        self.assertEqual(headers["retry-after-ms"], "300000")
        self.assertEqual(headers["x-should-retry"], "false")  # longer than the SDK would wait
        self.clock.advance(250)
        _, headers, _ = self.chat()
        self.assertEqual(headers["retry-after"], "50")
        self.assertNotIn("x-should-retry", headers)

    def test_refill_admits_again(self):
        self.drain()
        self.clock.advance(300)
        self.assertEqual(self.chat()[1]["x-ratelimit-remaining"], "1")
        self.assertEqual(self.chat()[1]["x-ratelimit-remaining"], "0")
        self.assertEqual(len(self.upstream.requests), 12)

    def test_keys_have_their_own_buckets_and_keyless_callers_share_their_ip(self):
        self.drain("key-a")
        self.assertEqual(self.chat(key="key-b")[1]["x-ratelimit-remaining"], "9")
        self.assertEqual(self.chat(key=None)[1]["x-ratelimit-remaining"], "9")
        self.assertEqual(self.chat(key=None)[1]["x-ratelimit-remaining"], "8")

    def test_forwarded_for_is_trusted_only_when_configured(self):
        for trust, expected in ((False, "8"), (True, "9")):
            with self.subTest(trust=trust):
                self.restart(trust_forwarded_for=trust)
                self.chat(key=None, headers={"X-Forwarded-For": "10.0.0.1"})
                _, headers, _ = self.chat(key=None, headers={"X-Forwarded-For": "10.0.0.2"})
                self.assertEqual(headers["x-ratelimit-remaining"], expected)

    def test_concurrent_requests_admit_exactly_the_balance(self):
        results = []
        barrier = threading.Barrier(30)

        def worker():
            barrier.wait()
            results.append(self.chat()[2])
        threads = [threading.Thread(target=worker) for _ in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        limited = [b for b in results if b"limit reached" in b]
        self.assertEqual(len(results), 30)
        self.assertEqual(len(limited), 20)
        self.assertEqual(len(self.upstream.requests), 10)

    def test_estimate_mode_and_a_cost_that_can_never_be_admitted(self):
        self.restart(token_cost_mode="estimate", max_tokens=100, response_token_reserve=50)
        _, headers, _ = self.chat(max_tokens=16)  # "user hi" = 7 chars -> 2, + 16
        self.assertEqual(headers["x-ratelimit-remaining"], str(100 - 18))
        status, _, body = self.chat()  # 2 + 50 = 52 > 82? no: admitted
        self.assertEqual(status, 200)
        status, _, body = self.chat(max_tokens=500)
        self.assert_openai_error(status, body, 400, "request_exceeds_bucket")
        self.assertIn("can never be admitted", json.loads(body)["error"]["message"])
        self.assertEqual(self.remaining(), 100 - 18 - 52)
        self.assertEqual(len(self.upstream.requests), 2)


class ErrorTests(ProxyTestCase):
    def test_invalid_json_and_non_object_bodies(self):
        for body in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
            with self.subTest(body=body):
                status, _, answer = self.request("POST", "/v1/chat/completions", body)
                self.assert_openai_error(status, answer, 400)
        deep = b"[" * 100_000 + b"]" * 100_000
        status, _, answer = self.request("POST", "/v1/chat/completions", deep)
        self.assert_openai_error(status, answer, 400)
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.remaining(), 10)

    def test_body_over_the_limit_is_refused_from_content_length(self):
        self.restart(max_body_bytes=1000)
        with socket.create_connection(("127.0.0.1", self.proxy.server_address[1]),
                                      timeout=WAIT) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Length: 5000000\r\n\r\n")  # no body is sent at all
            answer = s.recv(65536)
        status = int(answer.split(b" ")[1])
        self.assert_openai_error(status, answer.partition(b"\r\n\r\n")[2], 413,
                                 "request_too_large")

    def test_unknown_or_missing_key(self):
        self.restart(proxy_api_keys=("good-key", "other-key"))
        for key in (None, "bad-key", "good-ke"):
            with self.subTest(key=key):
                for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                                     ("POST", "/v1/embeddings")):
                    status, headers, body = self.request(method, path, {"model": "m"}, key=key)
                    self.assert_openai_error(status, body, 401, "invalid_api_key")
                    self.assertEqual(headers["access-control-allow-origin"], "*")
        self.assertEqual(self.chat(key="good-key")[0], 200)
        self.assertEqual(len(self.upstream.requests), 1)

    def test_upstream_unreachable_is_502_and_not_charged(self):
        self.restart(base_api_url=f"http://127.0.0.1:{free_port()}/v1")
        status, _, body = self.chat()
        self.assert_openai_error(status, body, 502, "upstream_unreachable")
        self.assertEqual(self.remaining(), 10)

    def test_upstream_timeout_is_504_and_not_charged(self):
        self.restart(read_timeout=0.5)
        status, _, body = self.chat(headers={"X-Fake-Scenario": "hang"})
        self.assert_openai_error(status, body, 504, "upstream_timeout")
        self.assertEqual(self.remaining(), 10)

    def test_upstream_errors_pass_through(self):
        for scenario, status, charged in (("status-500", 500, False), ("status-503", 503, False),
                                          ("status-429", 429, True), ("status-400", 400, True),
                                          ("html-500", 500, False)):
            with self.subTest(scenario=scenario):
                self.restart()
                got, headers, body = self.chat(headers={"X-Fake-Scenario": scenario})
                self.assertEqual(got, status)
                if scenario == "html-500":
                    self.assertEqual(body, b"<html>oops</html>")
                else:
                    self.assertEqual(json.loads(body)["error"]["message"],
                                     f"upstream says {status}")
                    self.assertEqual(headers["retry-after"], "7")
                self.assertEqual(self.remaining(), 9 if charged else 10)

    def test_upstream_closing_without_answer_is_502(self):
        status, _, body = self.chat(headers={"X-Fake-Scenario": "close"})
        self.assert_openai_error(status, body, 502)
        self.assertEqual(self.remaining(), 10)

    def test_paths_outside_v1_are_404_and_never_forwarded(self):
        for path in ("/slots", "/props", "/v1/../slots", "/V1/chat/completions",
                     "/", "/v10/models"):
            with self.subTest(path=path):
                status, _, body = self.request("GET", path)
                self.assert_openai_error(status, body, 404)
        self.assertEqual(self.upstream.requests, [])

    def test_path_spellings_cannot_bypass_charging(self):
        spellings = ["/v1/chat/completions/", "//v1//chat/completions", "/v1/chat/%63ompletions",
                     "/v1/./chat/completions", "/v1/models/../chat/completions",
                     "/v1/chat/completions?stream=false", "/v1/chat/completions%2f"]
        for index, path in enumerate(spellings):
            with self.subTest(path=path):
                status, headers, _ = self.chat(path=path)
                self.assertEqual(status, 200)
                self.assertEqual(headers["x-ratelimit-remaining"], str(9 - index))
        forwarded = [p.partition("?")[0] for p in self.upstream.paths()]
        self.assertEqual(forwarded, ["/v1/chat/completions"] * len(spellings))

    def test_malformed_http_gets_400_and_the_server_keeps_serving(self):
        for data in (b"GARBAGE\r\n\r\n", b"GET /v1/models HTTP/9.9\r\n\r\n",
                     b"GET /v1/models\r\n", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n"):
            with self.subTest(data=data):
                answer = self.raw(data)
                head, _, body = answer.partition(b"\r\n\r\n")
                self.assertIn(int(head.split(b" ")[1]), (400, 505))
                self.assertIn(b'"error"', body)
        for length in (b"-5", b"abc", b"1, 2"):
            with self.subTest(length=length):
                answer = self.raw(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: " +
                                  length + b"\r\n\r\n{}")
                self.assertEqual(int(answer.split(b" ")[1]), 400)
        answer = self.raw(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        self.assertEqual(int(answer.split(b" ")[1]), 400)
        for header in (b"X-Split: a\rInjected: b", b"Bad Name: x", b" folded", b"NoColon",
                       b"X-Nul: a\x00b"):
            with self.subTest(header=header):
                answer = self.raw(b"GET /v1/models HTTP/1.1\r\n" + header + b"\r\n\r\n")
                self.assertEqual(int(answer.split(b" ")[1]), 400)
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.chat()[0], 200)
        self.assertNotIn("Traceback", self.log.getvalue())

    def test_unsupported_method_is_an_openai_error(self):
        status, _, body = self.request("TRACE", "/v1/models")
        self.assert_openai_error(status, body, 501)


class UsageModeTests(ProxyTestCase):
    """TOKEN_COST_MODE=usage: reserve the estimate, settle with the upstream's usage."""

    CAPACITY = 100_000

    def setUp(self):
        super().setUp()
        self.restart(token_cost_mode="usage", max_tokens=self.CAPACITY,
                     response_token_reserve=50)

    def charged(self, key=CLIENT_KEY):
        return self.CAPACITY - self.remaining(key)

    def settled(self, count=1):
        """Settlement happens after the last byte went out: wait for the access lines."""
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") >= count))

    def direct(self, path, body, scenario=""):
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream.server_address[1],
                                          timeout=WAIT)
        self.addCleanup(conn.close)
        conn.request("POST", path, json.dumps(body), {"X-Fake-Scenario": scenario})
        return conn.getresponse().read()

    def test_non_stream_is_settled_exactly(self):
        status, headers, body = self.chat(max_tokens=20)
        self.settled()
        reported = json.loads(body)["usage"]["total_tokens"]
        reserved = llm_proxy.estimate_cost(json.loads(self.upstream.requests[0][3]), 50)
        self.assertNotEqual(reported, reserved)
        # the head went out before the body could be read: it shows the reservation
        self.assertEqual(headers["x-ratelimit-remaining"], str(self.CAPACITY - reserved))
        self.assertEqual(self.charged(), reported)
        self.assertIn(f"cost={reported} ", self.log.getvalue())

    def test_stream_without_include_usage_is_asked_and_the_usage_chunk_stripped(self):
        for path in ("/v1/chat/completions", "/v1/completions"):
            with self.subTest(path=path):
                request = {"model": "m", "stream": True, "messages": [{"role": "user",
                           "content": "hi"}]} if "chat" in path else \
                    {"model": "m", "stream": True, "prompt": "hi", "stream_options": {}}
                before = self.charged()
                status, _, body = self.request("POST", path, request)
                self.settled(len(self.upstream.requests))
                sent = json.loads(self.upstream.requests[-1][3])
                self.assertEqual(sent["stream_options"], {"include_usage": True})
                self.assertEqual(self.charged() - before, self.upstream.reported[-1])
                self.assertEqual(body, self.direct(path, request))  # byte for byte

    def test_stream_with_include_usage_is_forwarded_untouched(self):
        request = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}],
                   "stream_options": {"include_usage": True}}
        _, _, body = self.request("POST", "/v1/chat/completions", request)
        self.settled()
        self.assertEqual(body, self.direct("/v1/chat/completions", request))
        self.assertEqual(self.upstream.requests[0][3], json.dumps(request).encode())
        self.assertIn(b'"choices": [], "usage": {', body)
        self.assertEqual(self.charged(), self.upstream.reported[0])

    def test_server_habits(self):
        for scenario, path in (("ollama", "/v1/completions"), ("llamacpp", "/v1/chat/completions"),
                               ("llamacpp", "/v1/completions")):
            with self.subTest(scenario=scenario, path=path):
                before, seen = self.charged(), len(self.upstream.requests)
                request = {"model": "m", "stream": True, "prompt": "hello there",
                           "messages": [{"role": "user", "content": "hello there"}]}
                _, _, body = self.request("POST", path, request,
                                          headers={"X-Fake-Scenario": scenario})
                self.settled(seen + 1)
                self.assertEqual(body, self.direct(path, request, scenario))
                self.assertEqual(self.charged() - before, self.upstream.reported[-1])

    def test_no_usage_is_settled_by_estimate(self):
        for stream, generated in ((False, "proxy ok"), (True, "Hello world")):
            with self.subTest(stream=stream):
                before, seen = self.charged(), len(self.upstream.requests)
                self.chat(stream=stream, headers={"X-Fake-Scenario": "no-usage"})
                self.settled(seen + 1)
                prompt = llm_proxy.prompt_estimate(json.loads(self.upstream.requests[-1][3]))
                self.assertEqual(self.charged() - before, prompt + -(-len(generated) // 4))

    def test_client_disconnect_mid_stream_charges_the_prompt_and_what_was_generated(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=WAIT)
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Authorization": f"Bearer {CLIENT_KEY}", "X-Fake-Scenario": "gate2"})
        resp = conn.getresponse()
        self.assertIn(b'"role"', resp.readline())
        resp.readline()
        self.assertIn(b"Hello", resp.readline())  # then the upstream holds the rest
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        self.assertTrue(self.log.wait_for(lambda text: "client closed" in text))
        self.upstream.release.set()
        prompt = llm_proxy.prompt_estimate(body)
        self.assertEqual(self.charged(), prompt + 2)  # "Hello": 5 characters

    def test_failures(self):
        self.chat(headers={"X-Fake-Scenario": "status-503"})
        self.settled()
        self.assertEqual(self.charged(), 0)  # refunded whole
        self.restart(token_cost_mode="usage", max_tokens=self.CAPACITY, read_timeout=0.5,
                     response_token_reserve=50)
        self.chat(stream=True, headers={"X-Fake-Scenario": "stall"})
        self.assertTrue(self.log.wait_for(lambda text: "upstream broke off" in text))
        prompt = llm_proxy.prompt_estimate(json.loads(self.upstream.requests[-1][3]))
        self.assertEqual(self.charged(), prompt + 2)  # the prompt and "Hello"

    def test_upstream_refusing_stream_options_is_asked_again_without(self):
        status, _, body = self.chat(stream=True,
                                    headers={"X-Fake-Scenario": "reject-stream-options"})
        self.settled()
        self.assertEqual(status, 200)
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
        first, second = (json.loads(r[3]) for r in self.upstream.requests)
        self.assertIn("stream_options", first)
        self.assertNotIn("stream_options", second)
        self.assertEqual(self.charged(), llm_proxy.prompt_estimate(second) + 3)  # "Hello world"
        # a 400 about something else reaches the client unchanged
        status, _, body = self.chat(stream=True, headers={"X-Fake-Scenario": "status-400"})
        self.assertEqual((status, json.loads(body)["error"]["message"]), (400, "upstream says 400"))

    def test_embeddings_are_charged_in_usage_and_estimate_modes(self):
        request = {"model": "e", "input": ["some words to embed", "and more"]}
        _, headers, _ = self.request("POST", "/v1/embeddings", request)
        self.settled()
        self.assertEqual(self.charged(), self.upstream.reported[0])
        self.restart(token_cost_mode="estimate", max_tokens=1000)
        _, headers, _ = self.request("POST", "/v1/embeddings", request)
        self.assertEqual(headers["x-ratelimit-remaining"],
                         str(1000 - llm_proxy.prompt_estimate(request)))

    def test_responses_route(self):
        request = {"model": "m", "input": "hello", "max_output_tokens": 30}
        _, headers, body = self.request("POST", "/v1/responses", request)
        self.settled()
        self.assertEqual(headers["x-ratelimit-remaining"],
                         str(self.CAPACITY - llm_proxy.estimate_cost(request, 50)))
        self.assertEqual(self.charged(), json.loads(body)["usage"]["total_tokens"])
        before = self.charged()
        _, _, body = self.request("POST", "/v1/responses", {**request, "stream": True})
        self.settled(2)
        self.assertIn(b"event: response.completed", body)
        self.assertEqual(self.charged() - before, self.upstream.reported[-1])
        # limited: the 429 error, whatever LIMIT_RESPONSE says
        self.restart(token_cost_mode="usage", max_tokens=40, response_token_reserve=50)
        status, _, body = self.request("POST", "/v1/responses", request)
        self.assertEqual(status, 200)
        status, _, body = self.request("POST", "/v1/responses", request)
        self.assert_openai_error(status, body, 429, "rate_limit_exceeded")

    def test_debt_shows_in_the_limit_message(self):
        self.restart(token_cost_mode="usage", max_tokens=60, response_token_reserve=1)
        self.chat(max_tokens=1)  # reserves 3; the fake reports more (the prompt is ~17)
        self.settled()
        self.remaining()
        self.restart(token_cost_mode="usage", max_tokens=60, response_token_reserve=1)
        spent = 0
        while self.remaining() > 0:
            self.chat(max_tokens=1)
            spent += 1
            self.settled(spent)
        debt = -self.remaining()
        self.assertGreater(debt, 0)
        _, headers, body = self.chat(max_tokens=1)
        steps = -(-(debt + 3) // 2)  # refills of 2 tokens until the 3-token reservation fits
        self.assertEqual(headers["retry-after"], str(steps * 300))

    def test_counters_in_health(self):
        self.restart(token_cost_mode="usage", max_tokens=200, response_token_reserve=50)
        self.chat()
        self.chat(stream=True)
        self.settled(2)
        for _ in range(3):
            self.chat(max_tokens=150)
        self.settled(5)
        usage = json.loads(self.request("GET", "/health")[2])["usage"]
        prompt = sum(usage_of("/v1/chat/completions", json.loads(r[3]))["prompt_tokens"]
                     for r in self.upstream.requests)
        self.assertEqual(usage["prompt_tokens"], prompt)
        self.assertEqual(usage["completion_tokens"], 2 * (len(self.upstream.requests) - 1) + 3)
        self.assertEqual(usage["requests"], 5)
        self.assertEqual(usage["limited_requests"], 5 - len(self.upstream.requests))
        self.assertGreater(usage["limited_requests"], 0)

    def test_a_thousand_mixed_requests_are_charged_exactly(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=WAIT)
        self.addCleanup(conn.close)
        for i in range(1000):
            path = ("/v1/chat/completions", "/v1/completions")[i % 2]
            stream = i % 3 == 0
            words = " ".join(["word"] * (i % 37))
            body = {"model": "m", "stream": stream, "max_tokens": 10 + i % 50,
                    "messages": [{"role": "user", "content": words}], "prompt": words}
            if i % 5 == 0:
                body["stream_options"] = {"include_usage": True}
            conn.request("POST", path, json.dumps(body), {"Authorization": f"Bearer {CLIENT_KEY}"})
            resp = conn.getresponse()
            resp.read()
            self.assertEqual(resp.status, 200)
        self.settled(1000)
        self.assertEqual(len(self.upstream.reported), 1000)
        self.assertEqual(self.charged(), sum(self.upstream.reported))


class LocalRouteTests(ProxyTestCase):
    def test_health_shows_the_callers_bucket_without_creating_one(self):
        status, _, body = self.request("GET", "/health")
        self.assertEqual(status, 200)
        answer = json.loads(body)
        self.assertEqual(answer, {"ok": True, "quota": {
            "limit": 10, "remaining": 10, "reset_seconds": 0, "refill_tokens": 2,
            "refill_interval_seconds": 300.0}, "usage": {
            "requests": 0, "limited_requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
            "tokens_charged": 0}, "store": {"backend": "memory"}})
        self.assertEqual(len(self.proxy.store), 0)
        self.chat()
        quota = json.loads(self.request("GET", "/health")[2])["quota"]
        self.assertEqual((quota["remaining"], quota["reset_seconds"]), (9, 300))
        self.assertNotIn(str(self.upstream.server_address[1]), body.decode())

    def test_health_with_required_keys(self):
        self.restart(proxy_api_keys=("good",))
        self.assertEqual(json.loads(self.request("GET", "/health", key=None)[2]),
                         {"ok": True, "store": {"backend": "memory"}})
        self.assertEqual(self.request("GET", "/health", key="bad")[0], 401)
        self.assertIn("quota", json.loads(self.request("GET", "/health", key="good")[2]))

    def test_cors_preflight_and_headers(self):
        status, headers, body = self.request("OPTIONS", "/v1/chat/completions", key=None,
                                             headers={"Origin": "http://ui.local",
                                                      "Access-Control-Request-Method": "POST",
                                                      "Access-Control-Request-Headers":
                                                          "authorization, x-stainless-os"})
        self.assertEqual(status, 204)
        self.assertEqual(body, b"")
        self.assertEqual(headers["access-control-allow-origin"], "*")
        self.assertEqual(headers["access-control-allow-headers"], "authorization, x-stainless-os")
        self.assertIn("POST", headers["access-control-allow-methods"])
        _, headers, _ = self.chat()
        exposed = headers["access-control-expose-headers"].lower()
        for name in ("retry-after", "x-ratelimit-remaining", "x-ratelimit-reset-seconds"):
            self.assertIn(name, exposed)
        self.assertEqual(self.upstream.requests[0][1], "/v1/chat/completions")


class SecretTests(ProxyTestCase):
    def test_keys_never_reach_logs_or_responses(self):
        self.restart(base_api_key=UPSTREAM_KEY, limit_response="429")
        answers = []
        for _ in range(11):
            answers.append(self.chat())
        answers.append(self.chat(headers={"X-Fake-Scenario": "status-500"}))
        answers.append(self.request("GET", "/health"))
        answers.append(self.request("GET", f"/v1/models?key={CLIENT_KEY}"))
        self.restart(base_api_key=UPSTREAM_KEY, base_api_url=f"http://127.0.0.1:{free_port()}/v1")
        answers.append(self.chat())
        text = self.log.getvalue()
        self.assertIn(llm_proxy.short_hash(llm_proxy.key_digest(CLIENT_KEY)), text)
        for secret in (UPSTREAM_KEY, CLIENT_KEY):
            self.assertNotIn(secret, text)
            for _, headers, body in answers:
                self.assertNotIn(secret.encode(), body)
                self.assertNotIn(secret, json.dumps(headers))

    def test_access_log_line(self):
        self.chat()
        self.assertTrue(self.log.wait_for(lambda text: "remaining=9" in text))
        line = self.log.getvalue().strip().splitlines()[-1]
        self.assertRegex(line, r'127\.0\.0\.1 key=[0-9a-f]{10} "POST /v1/chat/completions" 200 '
                               r'cost=1 remaining=9 \d+\.\dms$')

    def test_control_characters_are_escaped_in_the_log(self):
        self.raw(b"GET /v1/\x1b[31mred HTTP/1.1\r\nConnection: close\r\n\r\n")
        self.assertTrue(self.log.wait_for(lambda text: "400" in text))
        self.assertNotIn("\x1b", self.log.getvalue())
        self.assertIn("\\x1b", self.log.getvalue())


class ServerTests(ProxyTestCase):
    def test_drain_waits_for_in_flight_requests(self):
        _, resp = StreamingTests.open_stream(self, scenario="gate")
        resp.readline()
        self.assertFalse(self.proxy.drain(timeout=0.1))
        self.upstream.release.set()
        resp.read()
        self.assertTrue(self.proxy.drain(timeout=WAIT))

    def test_sigterm_stops_the_process_cleanly(self):
        env = {**os.environ, "PORT": "0", "HOST": "127.0.0.1", "BASE_API_URL": self.upstream.url}
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "llm_proxy.py")], env=env,
                                stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.kill)
        first = proc.stderr.readline()
        self.assertIn("listening on http://127.0.0.1:", first)
        port = int(first.rsplit(":", 1)[1])
        startup = proc.stderr.readline() + proc.stderr.readline()
        self.assertIn("buckets: 10 tokens, +2 every 300 s", startup)
        self.assertNotIn(self.upstream.url, startup)  # the host and port, not the URL path
        proxy = type("P", (), {"server_address": ("127.0.0.1", port)})
        self.assertEqual(self.request("GET", "/health", proxy=proxy)[0], 200)
        proc.terminate()
        self.assertEqual(proc.wait(WAIT), 0)


ALICE, BOB, GUEST = "sk-alice-0001", "sk-bob-0002", "sk-guest-0003"


class KeysFileTests(ProxyTestCase):
    """KEYS_FILE: named keys with their own policies, reloaded without a restart."""

    def write_keys(self, entries, name="keys.json"):
        path = os.path.join(self.tmp, name)
        with open(path + ".tmp", "w") as f:
            json.dump({"keys": entries}, f)
        os.replace(path + ".tmp", path)
        return path

    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        self.entries = [
            {"name": "alice", "key": ALICE, "max_tokens": 3},
            {"name": "bob", "key_sha256": llm_proxy.key_digest(BOB), "request_token_cost": 2,
             "models": ["fake-a", "fake-b"]},
            {"name": "guest", "key": GUEST, "limit_response": "429", "max_tokens": 1,
             "refill_interval_seconds": 60},
            {"name": "gone", "key": "sk-disabled", "disabled": True},
        ]
        self.path = self.write_keys(self.entries)
        self.restart(keys_file=self.path, proxy_api_keys=("sk-plain",))

    def restart(self, **settings):
        self.proxy = self.start_proxy(key_check_interval=0.05, **settings)

    def start_proxy(self, key_check_interval=1.0, **settings):
        settings.setdefault("base_api_url", self.upstream.url)
        proxy = ProxyServer(Config(host="127.0.0.1", port=0, **settings), clock=self.clock,
                            log_stream=self.log, key_check_interval=key_check_interval)
        self._serve(proxy)
        return proxy

    def test_per_key_overrides(self):
        for expected in ("2", "1", "0"):
            self.assertEqual(self.chat(key=ALICE)[1]["x-ratelimit-remaining"], expected)
        self.assertIn(b"limit reached", self.chat(key=ALICE)[2])
        self.assertEqual(self.chat(key=BOB)[1]["x-ratelimit-remaining"], "8")  # cost 2
        self.assertEqual(self.chat(key=GUEST)[0], 200)
        status, headers, body = self.chat(key=GUEST)
        self.assert_openai_error(status, body, 429, "rate_limit_exceeded")
        self.assertEqual(headers["retry-after"], "60")
        # PROXY_API_KEYS still work, with the global settings
        self.assertEqual(self.chat(key="sk-plain")[1]["x-ratelimit-remaining"], "9")

    def test_only_listed_keys_disabled_keys_and_models(self):
        for key in (None, "sk-unknown"):
            self.assert_openai_error(*self.chat(key=key)[::2], 401, "invalid_api_key")
        status, _, body = self.chat(key="sk-disabled")
        self.assertIn("disabled", self.assert_openai_error(status, body, 401)["message"])
        status, _, body = self.chat(key=BOB, model="fake-c")
        error = self.assert_openai_error(status, body, 403, "model_not_allowed")
        self.assertIn("fake-a, fake-b", error["message"])
        status, _, body = self.request("POST", "/v1/embeddings", {"model": "e", "input": "x"},
                                       key=BOB)
        self.assertEqual(status, 403)
        self.assertEqual(self.chat(key=BOB, model="fake-b")[0], 200)
        self.assertEqual(len(self.upstream.requests), 1)

    def test_logs_show_the_key_name(self):
        self.chat(key=ALICE)
        self.chat(key="sk-plain")
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") == 2))
        text = self.log.getvalue()
        self.assertIn('key=alice "POST /v1/chat/completions" 200', text)
        self.assertIn(f"key={llm_proxy.key_digest('sk-plain')[:10]} ", text)
        for secret in (ALICE, "sk-plain"):
            self.assertNotIn(secret, text)

    def test_reload_on_file_change_keeps_balances(self):
        for _ in range(2):
            self.chat(key=ALICE)  # 1 left of 3
        self.chat(key=BOB)        # 8 left of 10
        entries = [dict(self.entries[0], max_tokens=20), dict(self.entries[1], max_tokens=5),
                   {"name": "carol", "key": "sk-carol"}]
        self.write_keys(entries)
        self.assertTrue(self.log.wait_for(lambda text: "keys file reloaded: 4 keys" in text))
        self.assertEqual(self.chat(key=ALICE)[1]["x-ratelimit-remaining"], "0")   # kept
        self.assertEqual(self.chat(key=BOB)[1]["x-ratelimit-remaining"], "3")     # 5, clamped
        self.assertEqual(self.chat(key="sk-carol")[0], 200)                         # added
        self.assertEqual(self.chat(key=GUEST)[0], 401)                              # removed

    def test_invalid_reload_keeps_the_old_keys(self):
        with open(self.path, "w") as f:
            f.write('{"keys": [{"name": "alice", "key": "x", "max_tokenz": 3}]}')
        self.assertTrue(self.log.wait_for(lambda text: "keys file not reloaded" in text))
        line = [l for l in self.log.getvalue().splitlines() if "not reloaded" in l][0]
        self.assertIn("keys[0] (alice): unknown field 'max_tokenz'", line)
        self.assertEqual(self.chat(key=ALICE)[1]["x-ratelimit-remaining"], "2")
        self.assertEqual(self.chat(key=GUEST)[0], 200)

    def test_reload_on_sighup(self):
        env = {**os.environ, "PORT": "0", "HOST": "127.0.0.1", "BASE_API_URL": self.upstream.url,
               "KEYS_FILE": self.path}
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "llm_proxy.py")], env=env,
                                stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.wait, WAIT)
        self.addCleanup(proc.kill)
        port = int(proc.stderr.readline().rsplit(":", 1)[1])
        proxy = type("P", (), {"server_address": ("127.0.0.1", port)})
        self.assertEqual(self.request("GET", "/health", key=GUEST, proxy=proxy)[0], 200)
        # same size, same inode, same mtime: only the signal can make the proxy read it again
        before = os.stat(self.path)
        with open(self.path, "r+") as f:
            text = f.read()
            f.seek(0)
            f.write(text.replace('"guest"', '"gu3st"'))
        os.utime(self.path, ns=(before.st_atime_ns, before.st_mtime_ns))
        proc.send_signal(signal.SIGHUP)
        while "keys file reloaded" not in proc.stderr.readline():
            pass
        self.chat(key=GUEST, proxy=proxy)
        while True:
            line = proc.stderr.readline()
            if "POST" in line:
                break
        self.assertIn("key=gu3st", line)

    def test_invalid_file_at_start_up(self):
        cases = [
            ([{"name": "a", "key": "k", "colour": "blue"}], "keys[0] (a): unknown field 'colour'"),
            ([{"key": "k"}], "keys[0]: name is required"),
            ([{"name": "a", "key": "k", "key_sha256": "0" * 64}], "exactly one of key"),
            ([{"name": "a", "key": "k"}, {"name": "a", "key": "j"}], "keys[1] (a): name is used"),
            ([{"name": "a", "key": "k", "max_tokens": 0}], "keys[0] (a): max_tokens must be"),
            ([{"name": "a", "key_sha256": "xyz"}], "keys[0] (a): key_sha256 must be 64 hex"),
        ]
        for entries, expected in cases:
            with self.subTest(expected=expected):
                path = self.write_keys(entries, "bad.json")
                proc = subprocess.run([sys.executable, os.path.join(HERE, "llm_proxy.py")],
                                      env={**os.environ, "KEYS_FILE": path, "PORT": "0"},
                                      capture_output=True, text=True, timeout=WAIT)
                self.assertEqual(proc.returncode, 2)
                self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
                self.assertIn(path, proc.stderr)
                self.assertIn(expected, proc.stderr)

    @unittest.skipIf(sys.version_info < (3, 11), "TOML keys files need tomllib (Python 3.11)")
    def test_toml_keys_file(self):
        path = os.path.join(self.tmp, "keys.toml")
        with open(path, "w") as f:
            f.write('[[keys]]\nname = "tom"\nkey = "sk-tom"\nmax_tokens = 2\n'
                    'models = ["fake-a"]\n')
        self.restart(keys_file=path)
        self.assertEqual(self.chat(key="sk-tom")[1]["x-ratelimit-remaining"], "1")
        self.assertEqual(self.chat(key="sk-tom", model="other")[0], 403)

    def test_keygen_output_is_accepted(self):
        out = subprocess.run([sys.executable, os.path.join(HERE, "llm_proxy.py"), "keygen",
                              "--name", "dana"], capture_output=True, text=True,
                             timeout=WAIT).stdout
        key = re.search(r"(sk-\S+)", out).group(1)
        self.assertGreaterEqual(len(key), 3 + 43)  # 32 random bytes, base64
        entry = json.loads(out.split("JSON entry:")[1].split("TOML entry:")[0])
        self.assertEqual(entry, {"name": "dana", "key_sha256": llm_proxy.key_digest(key)})
        self.assertNotIn(key, out.split("JSON entry:")[1])  # only the digest goes in the file
        self.restart(keys_file=self.write_keys([entry]))
        self.assertEqual(self.chat(key=key)[0], 200)

    def test_key_lookup_among_many_keys(self):
        entries = [{"name": f"k{i}", "key_sha256": llm_proxy.key_digest(f"sk-{i}")}
                   for i in range(10_000)]
        self.restart(keys_file=self.write_keys(entries))
        self.assertEqual(self.chat(key="sk-9999")[0], 200)
        self.assertEqual(self.chat(key="sk-10000")[0], 401)


class AdminTests(ProxyTestCase):
    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        self.keys_path = os.path.join(self.tmp, "keys.json")
        with open(self.keys_path, "w") as f:
            json.dump({"keys": [{"name": 'al"ice', "key": ALICE, "max_tokens": 3},
                                {"name": "bob", "key": BOB}]}, f)
        self.restart(keys_file=self.keys_path)

    def metrics(self, key=None):
        status, headers, body = self.request("GET", "/metrics", key=key)
        self.assertEqual(status, 200, body)
        self.assertTrue(headers["content-type"].startswith("text/plain; version=0.0.4"))
        return body.decode()

    def test_metrics_after_a_known_sequence(self):
        for _ in range(4):
            self.chat(key=ALICE)          # 3 admitted, 1 limited
        self.chat(key=BOB, headers={"X-Fake-Scenario": "status-500"})
        self.request("GET", "/v1/models", key=BOB)
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") == 6))
        text = self.metrics()
        samples = parse_metrics(text)
        chat = "/v1/chat/completions"
        self.assertEqual(samples[("llm_proxy_requests_total",
                                  (("key", 'al"ice'), ("route", chat), ("status", "2xx")))], 4)
        self.assertEqual(samples[("llm_proxy_requests_total",
                                  (("key", "bob"), ("route", chat), ("status", "5xx")))], 1)
        self.assertEqual(samples[("llm_proxy_requests_total",
                                  (("key", "bob"), ("route", "/v1/models"), ("status", "2xx")))], 1)
        self.assertEqual(samples[("llm_proxy_limited_requests_total", (("key", 'al"ice'),))], 1)
        self.assertEqual(samples[("llm_proxy_tokens_charged_total", (("key", 'al"ice'),))], 3)
        self.assertNotIn(("llm_proxy_tokens_charged_total", (("key", "bob"),)), samples)
        self.assertEqual(samples[("llm_proxy_upstream_errors_total", (("kind", "5xx"),))], 1)
        self.assertEqual(samples[("llm_proxy_buckets", ())], 1)
        self.assertEqual(samples[("llm_proxy_keys", ())], 2)
        self.assertEqual(samples[("llm_proxy_requests_in_flight", ())], 1)  # this very request
        self.assertEqual(samples[("llm_proxy_upstream_latency_seconds_count", ())], 5)
        self.assertEqual(samples[("llm_proxy_upstream_ttfb_seconds_bucket", (("le", "+Inf"),))], 5)
        self.assertIn('key="al\\"ice"', text)  # label values are escaped
        if text_string_to_metric_families is not None:  # the official parser agrees
            families = {f.name: f for f in text_string_to_metric_families(text)}
            self.assertEqual(families["llm_proxy_upstream_ttfb_seconds"].type, "histogram")
            self.assertIn("llm_proxy_requests", families)

    def test_admin_keys(self):
        self.chat(key=ALICE)
        self.assertTrue(self.log.wait_for(lambda text: " cost=1 " in text))
        status, _, body = self.request("GET", "/admin/keys")
        report = json.loads(body)
        alice = [k for k in report["keys"] if k["name"] == 'al"ice'][0]
        self.assertEqual((alice["limit"], alice["balance"], alice["next_refill_seconds"]),
                         (3, 2, 300))
        self.assertEqual((alice["requests"], alice["tokens_charged"]), (1, 1))
        for secret in (ALICE, BOB, llm_proxy.key_digest(ALICE)):
            self.assertNotIn(secret.encode(), body)

    def test_admin_key_when_set(self):
        self.restart(keys_file=self.keys_path, admin_api_key="sk-admin")
        for path in ("/metrics", "/admin/keys"):
            with self.subTest(path=path):
                for key in (None, "sk-wrong", ALICE):
                    self.assertEqual(self.request("GET", path, key=key)[0], 401)
                self.assertEqual(self.request("GET", path, key="sk-admin")[0], 200)

    def test_without_admin_key_only_loopback_clients(self):
        class FarAway(llm_proxy.ProxyHandler):
            def setup(self):
                super().setup()
                self.client_address = ("203.0.113.9", 40000)
        far = ProxyServer(Config(host="127.0.0.1", port=0, base_api_url=self.upstream.url),
                          log_stream=self.log, handler=FarAway)
        self._serve(far)
        for path in ("/metrics", "/admin/keys"):
            with self.subTest(path=path):
                self.assert_openai_error(*self.request("GET", path, proxy=far)[::2], 404)
                self.assertEqual(self.request("GET", path)[0], 200)

    def test_json_logs(self):
        self.restart(keys_file=self.keys_path, log_format="json")
        self.chat(key=ALICE)
        self.assertTrue(self.log.wait_for(lambda text: '"cost": 1' in text))
        entry = json.loads(self.log.getvalue().strip().splitlines()[-1])
        self.assertEqual({k: entry[k] for k in ("client", "key", "method", "path", "status",
                                                 "cost", "remaining")},
                         {"client": "127.0.0.1", "key": 'al"ice', "method": "POST",
                          "path": "/v1/chat/completions", "status": 200, "cost": 1,
                          "remaining": 2})
        self.assertIsInstance(entry["duration_ms"], float)
        self.assertRegex(entry["time"], r"^\d{4}-\d\d-\d\dT")


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
    import traceback
    frames = sys._current_frames()
    return "\n".join(f"{t.name}: {''.join(traceback.format_stack(frames[t.ident], limit=4))}"
                     for t in threading.enumerate() if t.ident in frames)


def open_fds():
    return len(os.listdir("/proc/self/fd"))


class HardeningTests(ProxyTestCase):
    """Client timeouts, size limits, connection caps, framing: what a hostile client meets."""

    def connect(self, proxy=None):
        sock = socket.create_connection(("127.0.0.1", (proxy or self.proxy).server_address[1]),
                                        timeout=WAIT)
        self.addCleanup(sock.close)
        return sock

    def read_all(self, sock):
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def test_slow_headers_are_cut_off(self):
        self.restart(client_header_timeout=1)
        sock = self.connect()
        stop = threading.Event()

        def trickle():  # a byte every 0.2 s: each read succeeds, the whole never arrives
            for byte in b"GET /v1/models HTTP/1.1\r\nX-Slow: " + b"a" * 200:
                if stop.wait(0.2):
                    return
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    return
        thread = threading.Thread(target=trickle)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(stop.set)
        started = time.monotonic()
        self.assertEqual(self.read_all(sock), b"")  # closed, well before the trickle ends
        self.assertLess(time.monotonic() - started, 20)
        self.assertEqual(self.upstream.requests, [])

    def test_slow_body_gets_408_and_no_charge(self):
        self.restart(client_body_timeout=1)
        sock = self.connect()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer "
                     + CLIENT_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"model\"")
        answer = self.read_all(sock)
        self.assertIn(b" 408 ", answer.split(b"\r\n")[0])
        self.assertIn(b'"error"', answer)
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.remaining(), 10)

    def test_idle_keep_alive_connections_are_closed(self):
        self.restart(keepalive_timeout=1)
        sock = self.connect()
        sock.sendall(b"GET /health HTTP/1.1\r\n\r\n")
        first = sock.recv(65536)
        self.assertIn(b" 200 ", first)
        self.assertEqual(self.read_all(sock), b"")

    def test_size_limits(self):
        self.restart(max_header_bytes=4096)
        answer = self.raw(b"GET /v1/" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n")
        self.assertIn(b" 414 ", answer.split(b"\r\n")[0])
        answer = self.raw(b"GET /v1/models HTTP/1.1\r\n" + b"X-Big: " + b"b" * 5000 + b"\r\n\r\n")
        self.assertIn(b" 431 ", answer.split(b"\r\n")[0])
        sock = self.connect()

        def flood():  # a 10 MB header: the proxy stops reading long before the end
            try:
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nX-Huge: " + b"h" * 10_000_000)
            except OSError:
                pass
        thread = threading.Thread(target=flood)
        thread.start()
        answer = self.read_all(sock)
        thread.join(WAIT)
        self.assertIn(b" 431 ", answer.split(b"\r\n")[0])
        self.assertEqual(self.chat()[0], 200)

    def test_connections_over_the_cap_get_503(self):
        self.restart(max_connections=2)
        idle = [self.connect(), self.connect()]
        for sock in idle:  # make sure both are accepted and held by a handler
            sock.sendall(b"GET /health HTTP/1.1\r\n\r\n")
            self.assertIn(b" 200 ", sock.recv(65536))
        sock = self.connect()
        sock.sendall(b"GET /health HTTP/1.1\r\n\r\n")
        answer = self.read_all(sock)
        self.assertIn(b" 503 ", answer.split(b"\r\n")[0])
        self.assertEqual(json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"],
                         "too_many_connections")
        for sock in idle:
            sock.close()
        self.assertTrue(wait_until(lambda: self.proxy.connections == 0))
        self.assertEqual(self.chat()[0], 200)

    def test_hop_by_hop_headers_are_not_relayed(self):
        status, headers, _ = self.request("GET", "/v1/models",
                                          headers={"X-Fake-Scenario": "hop"})
        self.assertEqual(headers["x-kept"], "yes")
        for name in ("x-up-private", "keep-alive", "upgrade"):
            self.assertNotIn(name, headers)
        self.assertNotEqual(headers.get("connection"), "X-Up-Private")

    def test_expect_100_continue_is_answered_not_forwarded(self):
        sock = self.connect()
        body = json.dumps({"model": "m", "messages": []}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        self.assertTrue(sock.recv(65536).startswith(b"HTTP/1.1 100 Continue"))
        sock.sendall(body)
        self.assertIn(b" 200 ", self.read_all(sock).split(b"\r\n")[0])
        self.assertNotIn("expect", {k.lower() for k in self.upstream.requests[0][2]})

    def test_invalid_upstream_json_is_passed_through(self):
        status, _, body = self.chat(headers={"X-Fake-Scenario": "garbage"})
        self.assertEqual((status, body), (200, b'{"id": "chatcmpl-x", "choices": ['))

    def test_hostile_clients_leave_nothing_behind(self):
        """Every client fault: a clear error where one can still be sent, no traceback, no
        thread or socket left over, no charge, and the next request works."""
        self.chat()  # warm up: the upstream pool holds its connection from here on
        self.assertTrue(self.log.wait_for(lambda text: " cost=1 " in text))
        threads, fds = threading.active_count(), open_fds()
        port = self.proxy.server_address[1]
        deep = b"[" * 200_000 + b"]" * 200_000
        cases = [
            (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 50\r\n\r\n", None),
            (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"mo", None),
            (b"\x00\xff garbage \x16\x03\r\n\r\n", 400),
            (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: ten\r\n\r\n", 400),
            (b"GET /v1/models\r\n", 400),
            (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 4\r\n\r\n\xff\xfe\xfd{", 400),
            (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
             % (len(deep), deep), 400),
            (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 104857600\r\n\r\n"
             b'{"messages": "' + b"x" * 65536, 413),
        ]
        for data, expected in cases:
            with self.subTest(data=data[:40]):
                sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
                try:
                    sock.sendall(data)
                except OSError:
                    pass
                if expected is None:  # the client goes away before its body is complete
                    sock.close()
                    continue
                answer = self.read_all(sock) if b"Connection" in data else sock.recv(65536)
                sock.close()
                self.assertIn(b" %d " % expected, answer.split(b"\r\n")[0])
                self.assertIn(b'"error"', answer)
        self.assertTrue(wait_until(lambda: threading.active_count() <= threads),
                        threading.enumerate())
        self.assertTrue(wait_until(lambda: open_fds() <= fds))
        self.assertEqual(self.remaining(), 9)
        self.assertEqual(len(self.upstream.requests), 1)
        self.assertEqual(self.chat()[0], 200)
        self.assertNotIn("Traceback", self.log.getvalue())


    def test_upstream_faults_leave_nothing_behind(self):
        self.restart(read_timeout=0.5)
        self.chat()
        self.assertTrue(self.log.wait_for(lambda text: " cost=1 " in text))
        connections = self.proxy.connections  # the proxy's handler threads
        outcomes = {}
        for scenario, stream in (("hang", False), ("stall", True), ("reset", True),
                                 ("close", False), ("garbage", False), ("html-500", False),
                                 ("status-503", False)):
            status, _, body = self.chat(stream=stream, headers={"X-Fake-Scenario": scenario,
                                                                "Connection": "close"})
            outcomes[scenario] = status
            if stream:
                self.assertIn(b'data: {"error": {', body)
        self.assertEqual(outcomes, {"hang": 504, "stall": 200, "reset": 200, "close": 502,
                                    "garbage": 200, "html-500": 500, "status-503": 503})
        self.upstream.stop.set()  # let the fake's own stuck handlers go
        # every handler thread of the proxy ended; no broken upstream connection was kept
        self.assertTrue(wait_until(lambda: self.proxy.connections <= connections),
                        thread_stacks())
        self.assertTrue(all(conn.sock is not None for conn in self.proxy.pool._idle))
        # charged: the first request, the two streams that started, the garbage 200
        self.assertEqual(self.remaining(), 6)
        self.assertEqual(self.chat()[0], 200)
        self.assertNotIn("Traceback", self.log.getvalue())


class FairQueueTests(ProxyTestCase):
    """MAX_UPSTREAM_CONCURRENCY: a fair queue in front of a small upstream."""

    def hold_the_slot(self, key):
        """A stream that holds the only upstream slot until the fake's `release` is set."""
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=WAIT)
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/chat/completions",
                     json.dumps({"model": "hold", "stream": True, "messages": []}),
                     {"Authorization": f"Bearer {key}", "X-Fake-Scenario": "gate"})
        resp = conn.getresponse()
        resp.readline()
        return resp

    def queue(self, key, model, results):
        def send():
            results.append((model, self.chat(key=key, model=model)[0]))
        thread = threading.Thread(target=send)
        thread.start()
        self.addCleanup(thread.join, WAIT)
        return thread

    def waiting(self):
        gate = self.proxy.gate
        with gate._lock:
            return sum(len(q) for q in gate._waiting.values())

    def order_with(self, fair):
        self.restart(max_upstream_concurrency=1, fair_queue=fair)
        held = self.hold_the_slot("key-a")
        results = []
        threads = []
        for index, (key, model) in enumerate((("key-a", "a2"), ("key-a", "a3"),
                                              ("key-a", "a4"), ("key-b", "b1"))):
            threads.append(self.queue(key, model, results))
            self.assertTrue(wait_until(lambda: self.waiting() == index + 1))
        self.upstream.release.set()
        held.read()
        for thread in threads:
            thread.join(WAIT)
        self.assertEqual([status for _, status in results], [200] * 4)
        return [json.loads(r[3])["model"] for r in self.upstream.requests]

    def test_a_freed_slot_goes_to_the_key_with_fewest_in_flight(self):
        self.assertEqual(self.order_with(fair=True), ["hold", "b1", "a2", "a3", "a4"])

    def test_fifo_when_fairness_is_off(self):
        self.assertEqual(self.order_with(fair=False), ["hold", "a2", "a3", "a4", "b1"])

    def test_waiting_past_the_timeout_is_503_and_refunded(self):
        self.restart(max_upstream_concurrency=1, upstream_queue_timeout=0.5)
        self.hold_the_slot("key-a")
        status, headers, body = self.chat(key="key-b")
        self.assert_openai_error(status, body, 503, "upstream_busy")
        self.assertEqual(headers["retry-after"], "1")
        self.assertEqual(self.remaining("key-b"), 10)
        self.upstream.release.set()

    def test_a_queued_client_that_leaves_is_not_charged(self):
        self.restart(max_upstream_concurrency=1)
        self.hold_the_slot("key-a")
        sock = socket.create_connection(("127.0.0.1", self.proxy.server_address[1]),
                                        timeout=WAIT)
        body = json.dumps({"model": "left", "messages": []}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer key-b\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.assertTrue(wait_until(lambda: self.waiting() == 1))
        sock.close()
        self.assertTrue(wait_until(lambda: self.waiting() == 0))
        self.assertTrue(self.log.wait_for(lambda text: "client closed" in text))
        self.assertEqual(self.remaining("key-b"), 10)
        self.upstream.release.set()
        self.assertNotIn("left", [json.loads(r[3])["model"] for r in self.upstream.requests])

    def test_per_key_concurrency_cap(self):
        for mode, expected in (("message", 200), ("429", 429)):
            with self.subTest(mode=mode):
                self.upstream.release.clear()
                self.restart(max_concurrent_per_key=1, limit_response=mode)
                held = self.hold_the_slot("key-a")
                status, _, body = self.chat(key="key-a")
                self.assertEqual(status, expected)
                if mode == "message":
                    self.assertIn("too many requests at once",
                                  json.loads(body)["choices"][0]["message"]["content"])
                else:
                    self.assert_openai_error(status, body, 429, "concurrency_limit_exceeded")
                self.assertEqual(self.chat(key="key-b")[0], 200)  # other keys are not held up
                self.upstream.release.set()
                held.read()
                self.assertEqual(self.remaining("key-a"), 9)  # the held stream only


class ScriptTests(ProxyTestCase):
    def start_script(self, **env):
        env = {**os.environ, "PORT": "0", "HOST": "127.0.0.1", "BASE_API_URL": self.upstream.url,
               **env}
        proc = subprocess.Popen(["sh", os.path.join(HERE, "run_local_proxy.sh")], env=env,
                                stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.wait, WAIT)
        self.addCleanup(proc.terminate)
        first = proc.stderr.readline()
        self.assertIn("listening on http://127.0.0.1:", first)
        return proc, int(first.rsplit(":", 1)[1])

    def test_run_script_starts_the_proxy_with_overrides(self):
        proc, port = self.start_script(MAX_TOKENS="3", UPSTREAM_MODEL="from-alias")
        self.assertIn("buckets: 3 tokens", proc.stderr.readline() + proc.stderr.readline())
        proxy = type("P", (), {"server_address": ("127.0.0.1", port)})
        status, _, body = self.request("GET", "/v1/models", proxy=proxy)
        self.assertEqual([m["id"] for m in json.loads(body)["data"]], ["from-alias"])

    @unittest.skipIf(shutil.which("curl") is None, "curl is not installed")
    def test_curl_script_sends_the_smoke_request_and_shows_headers(self):
        for stream in ("0", "1"):
            with self.subTest(stream=stream):
                env = {**os.environ, "PROXY_URL": f"http://127.0.0.1:{self.proxy.server_address[1]}",
                       "STREAM": stream, "PROMPT": 'say "hi" \\ please'}
                out = subprocess.run(["sh", os.path.join(HERE, "curl_local_proxy.sh")], env=env,
                                     capture_output=True, text=True, timeout=WAIT).stdout
                self.assertTrue(out.startswith("HTTP/1.1 200 OK"), out)
                self.assertIn("X-RateLimit-Remaining:", out)
                self.assertIn("proxy ok" if stream == "0" else "data: [DONE]", out)
        sent = json.loads(self.upstream.requests[0][3])
        self.assertEqual(sent["messages"][0]["content"], 'say "hi" \\ please')
        self.assertEqual(sent["max_tokens"], 16)


# ################################################################## openai client ####

@unittest.skipIf(openai is None, "the official openai package is not installed")
class OpenAIClientTests(ProxyTestCase):
    def client(self, key=CLIENT_KEY, max_retries=0):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.proxy.server_address[1]}/v1",
                             api_key=key, max_retries=max_retries, timeout=WAIT)

    def test_chat_stream_models_embeddings(self):
        client = self.client()
        answer = client.chat.completions.create(
            model="fake-a", messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(answer.choices[0].message.content, "proxy ok")
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="fake-a", messages=[{"role": "user", "content": "hi"}], stream=True)]
        self.assertEqual("".join(pieces), "Hello world")
        self.assertEqual([m.id for m in client.models.list()], ["fake-a", "fake-b"])
        embedding = client.embeddings.create(model="e", input="hello")
        self.assertEqual(embedding.data[0].embedding, [0.1, 0.2, 0.3])
        completion_ = client.completions.create(model="fake-a", prompt="hi")
        self.assertEqual(completion_.choices[0].text, "proxy ok")

    def test_limit_message_in_both_shapes(self):
        client = self.client()
        for _ in range(10):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        answer = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}])
        self.assertEqual(answer.choices[0].message.content, "limit reached, wait 5 min")
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True,
            stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, "limit reached, wait 5 min")
        self.assertEqual(chunks[-1].usage.total_tokens, 0)

    def test_rate_limit_error_in_429_mode(self):
        self.restart(limit_response="429")
        client = self.client()
        for _ in range(10):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        with self.assertRaises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        self.assertEqual(caught.exception.code, "rate_limit_exceeded")
        self.assertEqual(caught.exception.response.headers["retry-after"], "300")

    def test_sdk_retries_then_gets_the_limit_when_retry_after_is_short(self):
        self.restart(limit_response="429", refill_interval_seconds=1)
        client = self.client()
        for _ in range(10):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        # The injected clock never moves, so the SDK's retry (after waiting Retry-After: 1 s)
        # is refused too: one retry, two 429s in all, both logged.
        with self.assertRaises(openai.RateLimitError):
            self.client(max_retries=1).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}])
        self.assertTrue(self.log.wait_for(lambda text: text.count('" 429 ') == 2))

    def test_authentication_error(self):
        self.restart(proxy_api_keys=("good",))
        with self.assertRaises(openai.AuthenticationError):
            self.client(key="bad").models.list()

    def test_stream_error_event_raises_api_error(self):
        self.restart(read_timeout=0.5)
        stream = self.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True,
            extra_headers={"X-Fake-Scenario": "stall"})
        with self.assertRaises(openai.APIError):
            for _ in stream:
                pass


# ########################################################################## runner ####

class CountingResult(unittest.TextTestResult):
    """Counts passes itself: what testsRun includes differs between Python versions."""

    passed = 0

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed += 1


def main(argv: list[str]) -> int:
    """Run every test (or the ones named, e.g. StreamingTests or LimitTests.test_429_mode)."""
    names = [a for a in argv if not a.startswith("-")]
    loader = unittest.defaultTestLoader
    module = sys.modules[__name__]
    suite = (loader.loadTestsFromNames(names, module) if names
             else loader.loadTestsFromModule(module))
    runner = unittest.TextTestRunner(verbosity=2 if "-v" in argv else 1,
                                     resultclass=CountingResult)
    result = runner.run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    print(f"{result.passed} passed, {failed} failed, {len(result.skipped)} skipped")
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
