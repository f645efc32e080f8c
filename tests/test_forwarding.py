"""Forwarding and streaming, over plain http and over TLS."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import ssl
import tempfile
import threading
import unittest
import unittest.mock


from tests.support import (
    CLIENT_KEY, FakeClock, FakeUpstream, LogCapture, ProxyTestCase, TLS_CERT, TLS_KEY,
    UPSTREAM_KEY, WAIT, completion, sse_events, stream_events, wait_until)


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
        self.assertNotIn("access-control-allow-origin", headers)  # open mode: no pages
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
        self.assertEqual(headers["host"], self.upstream.host)
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

    def test_connections_the_upstream_closed_while_idle_are_not_reused(self):
        """A server may close idle keep-alive connections without a word (llama.cpp's server
        closes them after streams when many were open at once): the next requests go out on
        live connections, the pooled ones seen closed before use, never a 502."""
        statuses = []

        def stream_then_close():
            statuses.append(self.chat(stream=True, headers={"X-Fake-Scenario": "then-close"})[0])
        threads = [threading.Thread(target=stream_then_close) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        self.assertEqual(statuses, [200] * 4)
        self.assertTrue(wait_until(lambda: self.upstream.closed == 4))
        for _ in range(3):
            self.assertEqual(self.chat()[0], 200)
            self.assertEqual(self.chat(stream=True)[0], 200)

    def test_a_connection_the_upstream_reset_while_idle_is_not_reused(self):
        """A reset pooled connection (a load balancer's idle timeout, an upstream that closed
        with bytes unread) is dropped before use: the next request goes out on a new one."""
        for stream in (False, True):
            with self.subTest(stream=stream):
                closed = self.upstream.closed
                status, _, _ = self.chat(stream=stream,
                                         headers={"X-Fake-Scenario": "then-reset"})
                self.assertEqual(status, 200)
                self.assertTrue(wait_until(lambda: self.upstream.closed == closed + 1))
                self.assertEqual(self.chat()[0], 200)

    def test_a_reset_right_after_a_stream_leaves_the_client_its_whole_answer(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1],
                                          timeout=WAIT)
        self.addCleanup(conn.close)
        body = json.dumps({"model": "m", "stream": True, "messages": []})
        conn.request("POST", "/v1/chat/completions", body,
                     {"Authorization": f"Bearer {CLIENT_KEY}", "X-Fake-Scenario": "then-reset"})
        resp = conn.getresponse()
        self.assertEqual((resp.status, sse_events(resp.read())[-1]), (200, b"[DONE]"))
        conn.request("POST", "/v1/chat/completions", json.dumps({"model": "m", "messages": []}),
                     {"Authorization": f"Bearer {CLIENT_KEY}"})
        resp = conn.getresponse()  # the next answer on this connection is the next request's
        self.assertEqual(resp.status, 200)
        self.assertEqual(json.loads(resp.read())["object"], "chat.completion")

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


class StreamingTests(ProxyTestCase):
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


class TlsUpstream:
    """Serves the fake upstream over https instead: the proxy trusts its certificate the way an
    operator would have it trust a private CA (SSL_CERT_FILE). Mixed into a test class, it
    re-runs that class's tests over TLS."""

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
        self.upstream.tls = True
        self._serve(self.upstream)
        self.addCleanup(self.upstream.stop.set)
        self.clock = FakeClock()
        self.log = LogCapture()
        self.proxy = self.start_proxy()

    def start_proxy(self, trusted=True, **settings):
        with unittest.mock.patch.dict(os.environ, {"SSL_CERT_FILE": self.cert} if trusted else {}):
            return super().start_proxy(**settings)


class TlsUpstreamTests(TlsUpstream, ProxyTestCase):
    """What only TLS has: one kept-alive TLS connection, certificate checks, timeouts."""

    def test_chat_and_stream_over_one_kept_alive_connection(self):
        status, headers, body = self.chat()
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["object"], "chat.completion")
        self.assertEqual(headers["x-ratelimit-remaining"], "9")
        status, _, body = self.chat(stream=True)
        self.assertEqual(status, 200)
        self.assertEqual(sse_events(body)[-1], b"[DONE]")
        self.assertEqual(self.upstream.requests[0][2]["Host"], self.upstream.host)
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


class TlsForwardingTests(TlsUpstream, ForwardingTests):
    """ForwardingTests, against an https upstream."""


class TlsStreamingTests(TlsUpstream, StreamingTests):
    """StreamingTests, against an https upstream."""
