"""Tests that catch what slipped through (issue 21): each fails with the bug it names made by
hand, and passes without it."""

from __future__ import annotations

import json
import socket
import sys
import unittest

from llm_proxy import BucketPolicy, MemoryBucketStore
from tests.support import CLIENT_KEY, WAIT, FakeClock, ProxyTestCase, at_once


class ShortSwitchInterval:
    """Threads switch every microsecond (not every 5 ms): a read-modify-write that no lock
    guards loses updates within a few thousand operations."""

    def setUp(self):
        super().setUp()
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        self.addCleanup(sys.setswitchinterval, interval)


class BucketStoreLockTests(ShortSwitchInterval, unittest.TestCase):
    """The memory store's lock removed: takes and settlements from many threads lose
    tokens and counts."""

    THREADS, EACH = 8, 1500

    def test_every_take_and_settlement_counts_under_contention(self):
        store = MemoryBucketStore(FakeClock())
        total = self.THREADS * self.EACH
        policy = BucketPolicy(10 * total, 1, 300)

        def spend(_):
            for _ in range(self.EACH):
                store.take("k", 1, policy)
                store.settle("k", 1, policy, prompt=1, completion=1)
        at_once(self.THREADS, spend)
        self.assertEqual(store.peek("k", policy).remaining, 10 * total - 2 * total)
        self.assertEqual(store.usage("k"), {
            "requests": total, "limited_requests": 0, "prompt_tokens": total,
            "completion_tokens": total, "tokens_charged": 2 * total})


class QuietUpstreamHangUpTests(ProxyTestCase):
    """A client that hangs up while its upstream has gone quiet (two events, then nothing):
    the relay notices the hang-up itself, not at its next write, and the access line says so
    long before READ_TIMEOUT. Run with both relays."""

    RELAY = "loop"

    def setUp(self):
        super().setUp()
        self.restart(stream_relay=self.RELAY, read_timeout=WAIT * 6)

    def test_a_hang_up_is_seen_while_the_upstream_is_quiet(self):
        sock = socket.create_connection(("127.0.0.1", self.proxy.server_address[1]),
                                        timeout=WAIT)
        self.addCleanup(sock.close)
        body = json.dumps({"model": "fake-a", "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
                     b"Authorization: Bearer %s\r\nX-Fake-Scenario: stall\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (CLIENT_KEY.encode(), len(body), body))
        received = b""
        while received.count(b"data: ") < 2:
            data = sock.recv(65536)
            self.assertTrue(data, received)
            received += data
        sock.close()
        self.assertTrue(self.log.wait_for(lambda text: "client closed" in text),
                        self.log.getvalue())


class ThreadsRelayQuietUpstreamHangUpTests(QuietUpstreamHangUpTests):
    RELAY = "threads"


class AdminOriginWithKeysTests(ProxyTestCase):
    """Keys required: the API routes answer web pages (CORS_ORIGINS is * by default), so what
    keeps the admin routes and model management from another site's page is their own refusal
    of an Origin (or a cross-site Sec-Fetch-Site), whatever the key."""

    ADMIN = "sk-admin-SECRET-123456"

    def setUp(self):
        super().setUp()
        self.restart(proxy_api_keys=(CLIENT_KEY,), admin_api_key=self.ADMIN)

    def test_an_admin_route_refuses_a_page_even_with_the_admin_key(self):
        for path, method in (("/admin/keys", "GET"), ("/metrics", "GET"),
                             ("/admin/overview", "GET"), ("/api/pull", "POST")):
            for header in (("Origin", "https://chat.example"), ("Sec-Fetch-Site", "cross-site")):
                with self.subTest(path=path, header=header[0]):
                    status, _, body = self.request(method, path, b"{}" if method == "POST"
                                                   else None, key=self.ADMIN,
                                                   headers=dict([header]))
                    self.assertEqual(status, 403, body)
                    self.assertIn(b"do not answer web pages", body)
        self.assertEqual(self.request("GET", "/admin/keys", key=self.ADMIN)[0], 200)

    def test_an_api_route_answers_the_same_page(self):
        status, headers, _ = self.chat(headers={"Origin": "https://chat.example"})
        self.assertEqual(status, 200)
        self.assertEqual(headers.get("access-control-allow-origin"), "*")


if __name__ == "__main__":
    unittest.main()
