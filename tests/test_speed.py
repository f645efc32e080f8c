"""What the hot path leans on to be fast, kept honest: the log written in batches from its own
thread, the look at a pooled connection through TCP_INFO (a system call that keeps the
interpreter lock), and the short switch interval only while streams are relayed."""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import sys
import tempfile
import unittest

import llm_proxy
from llm_proxy import AccessLog, SocketReader, Upstream, UpstreamPool
from tests.support import CLIENT_KEY, WAIT, ProxyTestCase, until
from tests.test_keys_admin import ADMIN, KeysAdminCase


class BatchedLogTests(unittest.TestCase):
    """Into a file, lines go in batches from the log's thread; whole, in order, none left."""

    def setUp(self):
        self.file = tempfile.NamedTemporaryFile("w+", encoding="utf-8", delete=False)
        self.addCleanup(os.unlink, self.file.name)
        self.addCleanup(self.file.close)
        self.log = AccessLog(self.file, json_lines=False)
        self.addCleanup(self.log.close)

    def text(self):
        with open(self.file.name, encoding="utf-8") as f:
            return f.read()

    def test_lines_reach_the_file_whole_and_in_order_without_a_close(self):
        for i in range(500):
            self.log.message(f"line {i}")
        until(self, lambda: self.text().count("\n") == 500)
        lines = self.text().splitlines()
        self.assertEqual([line.split(" ", 1)[1] for line in lines],
                         [f"line {i}" for i in range(500)])

    def test_a_line_after_a_batch_went_is_not_left_waiting(self):
        self.log.message("first")
        until(self, lambda: "first" in self.text())
        self.log.message("second")  # (the log's thread is idle again: this one wakes it)
        until(self, lambda: "second" in self.text())

    def test_close_writes_what_waits_and_later_lines_go_at_once(self):
        for i in range(50):
            self.log.message(f"line {i}")
        self.log.close()
        self.assertEqual(self.text().count("\n"), 50)
        self.log.message("after close")
        self.assertIn("after close", self.text())  # (no thread any more: written at once)

    def test_a_memory_stream_gets_each_line_at_once(self):
        stream = io.StringIO()
        AccessLog(stream, json_lines=False).message("now")
        self.assertIn("now", stream.getvalue())


class ArrivedTests(unittest.TestCase):
    """SocketReader.arrived: what the kernel received beyond what was read, from TCP_INFO."""

    def setUp(self):
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        self.ours = socket.create_connection(listener.getsockname(), timeout=WAIT)
        self.theirs, _ = listener.accept()
        self.addCleanup(self.ours.close)
        self.addCleanup(self.theirs.close)
        self.reader = SocketReader(self.ours)
        if not self.reader.tcp_info or self.reader.arrived() is None:
            self.skipTest("TCP_INFO with tcpi_bytes_received: Linux 4.1 and later")

    def test_bytes_received_and_not_read_and_the_peer_closing_are_seen(self):
        self.assertFalse(self.reader.arrived())
        self.theirs.sendall(b"answer")
        until(self, lambda: self.reader.arrived())
        buffer = bytearray(64)
        self.assertEqual(self.reader.readinto(buffer), 6)
        self.assertFalse(self.reader.arrived())  # (all of it read)
        self.theirs.shutdown(socket.SHUT_WR)
        until(self, lambda: self.reader.arrived())  # (the peer's closing)

    def test_a_pooled_connection_that_received_bytes_while_idle_is_not_reused(self):
        """Bytes no request asked for, arrived while the connection was idle: seen without a
        read, the connection closed, the next request on a new one."""
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        host, port = listener.getsockname()
        pool = UpstreamPool(Upstream.from_url(f"http://{host}:{port}/v1"), WAIT, WAIT)
        self.addCleanup(pool.close)
        conn, reused = pool.acquire()
        server_side, _ = listener.accept()
        self.addCleanup(server_side.close)
        self.assertFalse(reused)
        self.assertTrue(conn.raw.tcp_info)
        pool.release(conn)
        again, reused = pool.acquire()
        self.assertTrue(reused)  # (nothing came: reused)
        pool.release(again)
        server_side.sendall(b"HTTP/1.1 200 OK\r\n\r\n")  # (for no request)
        until(self, lambda: again.raw.arrived())
        fresh, reused = pool.acquire()
        self.addCleanup(fresh.close)
        listener.accept()[0].close()
        self.assertFalse(reused)
        self.assertIsNot(fresh, again)


class SwitchIntervalTests(ProxyTestCase):
    """The switch interval is short while a stream is relayed by the stream relay, and the
    interpreter's usual one otherwise (see StreamRelay.pace)."""

    def test_short_while_a_stream_is_relayed_then_as_it_was(self):
        streams = self.proxy.streams
        if streams is None:
            self.skipTest("the stream relay runs on Linux")
        usual = sys.getswitchinterval()
        self.addCleanup(sys.setswitchinterval, usual)
        streams.switch_interval = usual / 4
        self.addCleanup(setattr, streams, "switch_interval", None)
        resp = self.hold_stream(CLIENT_KEY)
        until(self, lambda: sys.getswitchinterval() == usual / 4)
        self.upstream.release.set()
        resp.read()
        until(self, lambda: sys.getswitchinterval() == usual)


class SwitchIntervalStaysWithoutRelayTests(unittest.TestCase):
    def test_a_relay_not_told_to_pace_leaves_the_interval_alone(self):
        if not llm_proxy.StreamRelay.available:
            self.skipTest("the stream relay runs on Linux")
        relay = llm_proxy.StreamRelay(send_timeout=WAIT)
        self.addCleanup(relay.close)
        before = sys.getswitchinterval()
        relay.pace()
        self.assertEqual(sys.getswitchinterval(), before)


if __name__ == "__main__":
    unittest.main()


class KnownCallerTests(KeysAdminCase):
    """A connection remembers who its last request was from (no hash, no lookup for the next
    one with the same key): what changes the key still applies to the very next request."""

    def post(self, conn, key):
        conn.request("POST", "/v1/chat/completions",
                     json.dumps({"model": "fake-a", "messages": []}),
                     {"Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    def connection(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1],
                                          timeout=WAIT)
        self.addCleanup(conn.close)
        return conn

    def test_a_key_disabled_or_deleted_is_refused_on_a_kept_alive_connection(self):
        secret, conn = self.create("bob"), self.connection()
        self.assertEqual(self.post(conn, secret)[0], 200)
        self.assertEqual(self.admin("PATCH", "/admin/keys/bob", {"disabled": True})[0], 200)
        self.assertEqual(self.post(conn, secret)[0], 401)
        self.assertEqual(self.admin("PATCH", "/admin/keys/bob", {"disabled": False})[0], 200)
        self.assertEqual(self.post(conn, secret)[0], 200)
        self.assertEqual(self.request("DELETE", "/admin/keys/bob", key=ADMIN)[0], 204)
        self.assertEqual(self.post(conn, secret)[0], 401)

    def test_a_key_that_expires_is_refused_on_a_kept_alive_connection(self):
        secret, conn = self.create("temp", expires_at="2027-01-16"), self.connection()
        self.assertEqual(self.post(conn, secret)[0], 200)
        self.wall.advance(86400)
        status, body = self.post(conn, secret)
        self.assertEqual((status, body["error"]["code"]), (401, "key_expired"))

    def test_another_key_on_the_same_connection_is_its_own(self):
        first, second = self.create("ann", max_tokens=1000), self.create("bob", max_tokens=2000)
        conn = self.connection()
        limits = []
        for key in (first, second, first):
            conn.request("POST", "/v1/chat/completions",
                         json.dumps({"model": "fake-a", "messages": []}),
                         {"Authorization": f"Bearer {key}"})
            resp = conn.getresponse()
            resp.read()
            limits.append(resp.getheader("x-ratelimit-limit"))
        self.assertEqual(limits, ["1000", "2000", "1000"])
        self.assertEqual(self.post(conn, "sk-nobody")[0], 401)
