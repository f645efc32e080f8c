"""What the hot path leans on to be fast, kept honest: the look at a pooled connection through
TCP_INFO (a system call that keeps the interpreter lock), the short switch interval only while
streams are relayed, the caller a connection remembers, and the script started again as a
module (a script's parse tree is held for as long as it runs)."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import unittest

import llm_proxy
from llm_proxy import SocketReader, Upstream, UpstreamPool
from tests.support import CLIENT_KEY, HERE, WAIT, ProxyTestCase, until
from tests.test_keys_admin import ADMIN, KeysAdminCase


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


@unittest.skipUnless(sys.platform.startswith("linux"), "reads /proc/PID/cmdline")
class StartAsModuleTests(unittest.TestCase):
    """`python3 llm_proxy.py` starts again, in the same process, as the module imported: the
    same pid, the interpreter's options kept, the file named on the command line."""

    def test_the_script_starts_again_as_a_module_with_its_options(self):
        proc = subprocess.Popen(
            [sys.executable, "-X", "utf8", os.path.join(HERE, "llm_proxy.py")],
            env={**os.environ, "HOST": "127.0.0.1", "PORT": "0", "STATE_DB": "off",
                 "BASE_API_URL": "http://127.0.0.1:9/v1"},
            stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.wait, WAIT)
        self.addCleanup(proc.terminate)
        first = proc.stderr.readline()  # (written by main(), after the start again)
        port = re.search(r"listening on http://127\.0\.0\.1:([0-9]+)", first)
        self.assertIsNotNone(port, first)
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            args = f.read().decode().split("\0")[:-1]
        self.assertEqual(args[1:4], ["-X", "utf8", "-c"])
        self.assertIn(repr(os.path.join(HERE, "llm_proxy.py")), args[4])
        self.assertIn("run_module('llm_proxy'", args[4])
        conn = http.client.HTTPConnection("127.0.0.1", int(port.group(1)), timeout=WAIT)
        conn.request("GET", "/health")
        self.assertEqual(conn.getresponse().status, 200)
        conn.close()

    def test_a_copy_whose_name_is_no_module_runs_as_the_script_it_is(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        with open(os.path.join(HERE, "llm_proxy.py")) as f:
            # (marked, to tell it from another llm_proxy the interpreter could import)
            text = f.read().replace('description="Share one', 'description="Marked: share one')
        for name in ("llm-proxy", "proxy_copy.py"):
            copy = os.path.join(folder, name)
            with open(copy, "w") as f:
                f.write(text)
            done = subprocess.run([sys.executable, copy, "--help"], capture_output=True,
                                  text=True, timeout=WAIT, cwd=folder)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertIn("Marked: share one", done.stdout)  # (itself, not an installed one)
            self.assertEqual(done.stderr, "")


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


if __name__ == "__main__":
    unittest.main()
